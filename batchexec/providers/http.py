"""What the HTTP providers share: one JSON call, every failure mapped to a ``ProviderError``."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import aiohttp

from batchexec.errors import FatalProviderError, ProviderError, RetryableProviderError
from batchexec.providers.base import ChatOptions, ChatRequest

#: Statuses below 500 that another try may fix: timeout, conflict, rate limit.
RETRYABLE_STATUSES = frozenset({408, 409, 429})
#: Longest provider message quoted in an error; some servers send whole HTML pages.
MAX_MESSAGE_CHARS = 500
#: Bytes of an error body read: enough for any message, whatever the server sends.
MAX_ERROR_BODY_BYTES = 64 * 1024
#: Bytes read from the socket at a time.
_READ_CHUNK_BYTES = 64 * 1024
#: The ``response_format`` types of OpenAI's chat completions.
RESPONSE_FORMAT_TYPES = ("text", "json_object", "json_schema")


@dataclass(frozen=True)
class ErrorDetail:
    """What a provider's error body says: its message and, rarely, whether to retry."""

    message: str | None
    #: Overrides the status's verdict, e.g. a 429 for an exhausted quota is not worth a retry.
    retryable: bool | None = None


@dataclass(frozen=True)
class Wire:
    """A provider's name in error messages and the reader of its error bodies."""

    label: str
    read_error: Callable[[object], ErrorDetail]


async def fetch_json(
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    wire: Wire,
    *,
    payload: Mapping[str, Any] | None = None,
    form: Mapping[str, str] | None = None,
    headers: Mapping[str, str] | None = None,
    secrets: Iterable[str | None] = (),
    max_bytes: int,
) -> object:
    """Make one request and return its parsed JSON body; raise a ``ProviderError`` otherwise.

    At most ``max_bytes`` of a successful body are read (``MAX_RESPONSE_BYTES``):
    a larger one is a ``FatalProviderError``, since asking again would bring
    the same. Any of ``secrets`` found in a message (some servers echo keys
    back) is masked.
    """
    hidden = tuple(secret for secret in secrets if secret)
    try:
        async with session.request(
            method,
            url,
            json=payload,
            data=form,
            headers=headers,
            # Never follow a redirect: it could carry the key to another host.
            allow_redirects=False,
            raise_for_status=False,
        ) as response:
            ok = 200 <= response.status < 300
            raw = await _read_at_most(response, max_bytes if ok else MAX_ERROR_BODY_BYTES)
    except (aiohttp.ClientError, OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
        raise _connection_error(wire, exc, hidden) from exc
    if not ok:
        raise _status_error(wire, response, raw or b"", hidden)
    if raw is None:
        raise FatalProviderError(
            f"{wire.label}: the response is larger than {max_bytes} bytes, "
            "the limit (MAX_RESPONSE_BYTES)",
            status=response.status,
        )
    try:
        return json.loads(raw)
    except ValueError as exc:
        # A 2xx body that does not parse was most likely cut short on the way.
        raise RetryableProviderError(
            f"{wire.label}: the response is not valid JSON", status=response.status
        ) from exc


async def _read_at_most(response: aiohttp.ClientResponse, limit: int) -> bytes | None:
    """The body if it is at most ``limit`` bytes; None for a larger success body.

    An error body is cut at ``limit`` instead: only its message is wanted.
    Nothing past ``limit`` is read, whatever the server announced or sends.
    """
    ok = 200 <= response.status < 300
    if ok and response.content_length is not None and response.content_length > limit:
        return None
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_chunked(_READ_CHUNK_BYTES):
        size += len(chunk)
        if size > limit:
            if ok:
                return None
            chunks.append(chunk[: limit - size])
            break
        chunks.append(chunk)
    return b"".join(chunks)


def chat_messages(request: ChatRequest) -> list[dict[str, str]]:
    """The request as chat messages: the system prompt, if any, then ``conversation``."""
    system = [{"role": "system", "content": request.system_prompt}] if request.system_prompt else []
    return [*system, *conversation(request)]


def conversation(request: ChatRequest) -> list[dict[str, str]]:
    """The earlier turns in order, then the prompt as the final user message."""
    turns = [{"role": turn.role, "content": turn.content} for turn in request.history]
    return [*turns, {"role": "user", "content": request.prompt}]


def response_format_problem(
    options: ChatOptions, api: str, types: tuple[str, ...] = RESPONSE_FORMAT_TYPES
) -> str | None:
    """Why ``options.response_format`` cannot be mapped for ``api``; None when it can, or is unset.

    For the providers that translate it rather than pass it on: they know
    OpenAI's ``types`` alone, and need a json_schema's schema as an object.
    """
    response_format = options.response_format
    if response_format is None:
        return None
    kind = response_format.get("type")
    if kind not in types:
        known = f"{', '.join(types[:-1])} or {types[-1]}" if len(types) > 1 else types[0]
        return f"response_format: {api} takes type {known}, not {json.dumps(kind)}"
    if kind == "json_schema" and response_schema(options) is None:
        return f"response_format: {api} needs json_schema.schema, a JSON Schema object"
    return None


def response_schema(options: ChatOptions) -> dict[str, Any] | None:
    """The JSON Schema of a json_schema ``response_format``; None for any other."""
    response_format = options.response_format or {}
    schema = dig(response_format.get("json_schema"), "schema")
    if response_format.get("type") != "json_schema" or not isinstance(schema, dict):
        return None
    return schema


def bearer(token: str | None) -> dict[str, str]:
    """An ``Authorization`` header for ``token``; none at all without one."""
    return {"Authorization": f"Bearer {token}"} if token else {}


def dig(data: object, *path: str | int) -> object:
    """The value at ``path`` (keys, list indexes) in parsed JSON; None where a step is missing."""
    for step in path:
        if isinstance(step, int):
            data = data[step] if isinstance(data, list) and 0 <= step < len(data) else None
        else:
            data = data.get(step) if isinstance(data, dict) else None
    return data


def require_str(data: object, wire: Wire, *path: str | int) -> str:
    """The string at ``path``; its absence means a truncated or foreign body, worth a retry."""
    value = dig(data, *path)
    if not isinstance(value, str):
        raise malformed(wire, *path)
    return value


def malformed(wire: Wire, *path: str | int) -> RetryableProviderError:
    """The error for a 2xx body that lacks the field at ``path``."""
    where = "".join(f"[{step}]" if isinstance(step, int) else f".{step}" for step in path)
    return RetryableProviderError(f"{wire.label}: the response has no {where.lstrip('.')}")


#: Counts above this (JSON's largest exact integer) are no token counts; a store could not
#: hold them either.
_MAX_TOKEN_COUNT = 2**53


def token_count(value: object) -> int | None:
    """A token count from a response; None when absent or not a count, never a made-up 0."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= _MAX_TOKEN_COUNT:
        return value
    return None


def retry_after_s(headers: Mapping[str, str], *, now: datetime | None = None) -> float | None:
    """The wait a response asks for: ``retry-after-ms``, else ``Retry-After`` (seconds or date)."""
    try:
        delay_s = float(headers.get("retry-after-ms", "")) / 1000
    except ValueError:
        delay_s = math.nan
    if not math.isfinite(delay_s):
        value = headers.get("Retry-After", "").strip()
        try:
            delay_s = float(value)
        except ValueError:
            delay_s = _seconds_until(value, now or datetime.now(UTC))
    if not math.isfinite(delay_s):
        return None
    # A date already past means "now", not a negative wait.
    return max(0.0, delay_s)


def _seconds_until(http_date: str, now: datetime) -> float:
    try:
        when = parsedate_to_datetime(http_date)
    except (TypeError, ValueError, IndexError):
        return math.nan
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return (when - now).total_seconds()


def _status_error(
    wire: Wire, response: aiohttp.ClientResponse, raw: bytes, secrets: tuple[str, ...]
) -> ProviderError:
    status = response.status
    if 300 <= status < 400:
        location = response.headers.get("Location", "an unnamed address")
        message = f"redirected to {location}; configure the final URL instead"
        return FatalProviderError(_mask(f"{wire.label}: {message}", secrets), status=status)
    try:
        detail = wire.read_error(json.loads(raw))
    except ValueError:
        detail = ErrorDetail(_plain_text(response, raw))
    message = detail.message or response.reason or "request failed"
    text = _mask(f"{wire.label}: {_shorten(message)}", secrets)
    retryable = detail.retryable
    if retryable is None:
        retryable = status in RETRYABLE_STATUSES or status >= 500
    if retryable:
        return RetryableProviderError(
            text, status=status, retry_after_s=retry_after_s(response.headers)
        )
    return FatalProviderError(text, status=status)


def _plain_text(response: aiohttp.ClientResponse, raw: bytes) -> str | None:
    """A plain-text error body (``Internal Server Error``); never an HTML page."""
    if response.content_type != "text/plain":
        return None
    return raw.decode("utf-8", "replace").strip() or None


def _connection_error(wire: Wire, exc: BaseException, secrets: tuple[str, ...]) -> ProviderError:
    """Name what went wrong on the connection in words, never as a Python repr."""
    error: type[ProviderError] = RetryableProviderError
    if isinstance(exc, aiohttp.InvalidURL):
        error, message = FatalProviderError, f"invalid URL {exc.url}"
    elif isinstance(exc, aiohttp.NonHttpUrlClientError):
        error, message = FatalProviderError, f"not an http:// or https:// URL: {exc}"
    elif isinstance(exc, aiohttp.ClientConnectorCertificateError):
        error, message = FatalProviderError, f"the TLS certificate of {exc.host} was refused"
    elif isinstance(exc, aiohttp.ClientConnectorDNSError):
        message = f"cannot resolve host {exc.host}"
    elif isinstance(exc, aiohttp.ClientConnectorError):
        message = f"cannot connect to {exc.host}:{exc.port}"
    elif isinstance(exc, aiohttp.ServerDisconnectedError):
        message = "the server closed the connection without answering"
    elif isinstance(exc, aiohttp.ClientPayloadError | asyncio.IncompleteReadError):
        message = "the connection broke while the response was being read"
    elif isinstance(exc, TimeoutError):
        message = "the connection timed out"
    elif isinstance(exc, aiohttp.ClientConnectionError | OSError):
        message = "the connection failed"
    else:
        message = "the server sent an invalid HTTP response"
    return error(_mask(f"{wire.label}: {message}", secrets))


def _shorten(message: str) -> str:
    message = " ".join(message.split())
    if len(message) <= MAX_MESSAGE_CHARS:
        return message
    return message[: MAX_MESSAGE_CHARS - 1] + "…"


def _mask(text: str, secrets: tuple[str, ...]) -> str:
    for secret in secrets:
        text = text.replace(secret, "***")
    return text
