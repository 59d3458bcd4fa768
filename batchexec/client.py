"""An async Python client of a batchexec server: submit a batch, follow it, fetch its results.

    async with Client("http://127.0.0.1:8080", api_key) as client:
        invocation_id = await client.submit([{"prompt": "Hi", "model": "echo"}])
        async for event in client.follow(invocation_id):
            print(event.name, event.data)
        body = await client.results(invocation_id)
        workbook = await client.download(body["xlsx_url"])

Every error the server answers with is raised as a ``ClientError`` subclass
chosen by its HTTP status; a server that cannot be reached, or breaks off, is
``ConnectionFailed``. It loads none of the server: only aiohttp, aiofiles, the
API's names and the project's errors and atomic file writes.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from pathlib import Path, PurePosixPath
from types import TracebackType
from typing import Any, NamedTuple
from urllib.parse import quote, unquote, urlsplit

import aiofiles
import aiohttp

from batchexec import api
from batchexec.errors import BatchexecError, FieldError
from batchexec.files import atomic_path

DEFAULT_CONNECT_TIMEOUT_S = 30.0
#: The events route sends a keep-alive comment every 15 s; a longer silence is a dead link.
DEFAULT_READ_TIMEOUT_S = 60.0
#: The events after which the server closes a stream (the server's ``FINAL_EVENTS``).
_LAST_EVENTS = frozenset({"done", "interrupted"})
#: Characters of a non-JSON error answer kept as its ``detail``.
_DETAIL_CHARS = 500
#: Bytes of a download written at a time.
_CHUNK_BYTES = 64 * 1024


class ClientError(BatchexecError):
    """The server refused a request, or gave no usable answer.

    ``status`` is the HTTP status (``None`` when there was no answer),
    ``detail`` the server's message, ``errors`` its per-row problems (a refused
    batch's), ``retry_after_s`` its ``Retry-After`` in seconds, if it sent one.
    """

    def __init__(
        self,
        detail: str,
        *,
        status: int | None = None,
        errors: Sequence[FieldError] = (),
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.status = status
        self.errors = list(errors)
        self.retry_after_s = retry_after_s

    def __str__(self) -> str:
        if self.status is None:
            return self.detail
        return f"{self.detail} (HTTP {self.status})"


class ConnectionFailed(ClientError):
    """No answer: the server could not be reached, timed out or broke off."""


class BadAnswer(ClientError):
    """The server answered, but not as a batchexec server does (not JSON, fields missing)."""


class AuthError(ClientError):
    """401: the server did not accept the API key."""


class NotFound(ClientError):
    """404: no such batch, workbook or route, or it belongs to another key."""


class Conflict(ClientError):
    """409: the batch is not in a state that allows this (retry a running batch, ...)."""


class InvalidRequest(ClientError):
    """400, 413, 422: the request or batch is invalid; ``errors`` names each row's problem."""


class BusyError(ClientError):
    """429, 503: the server is full or stopping; try again after ``retry_after_s``."""


#: The class raised for each error status; any other is a plain ``ClientError``.
_ERRORS: dict[int, type[ClientError]] = {
    400: InvalidRequest,
    401: AuthError,
    404: NotFound,
    409: Conflict,
    413: InvalidRequest,
    422: InvalidRequest,
    429: BusyError,
    503: BusyError,
}


class Event(NamedTuple):
    """One server-sent event: ``execution``, ``progress``, ``done`` or ``interrupted``."""

    name: str
    data: dict[str, Any]


class Client:
    """The batch routes of the server at ``base_url`` (with its mount prefix, if any).

    Use it as ``async with Client(...) as client``. With ``session`` it sends
    its requests there and leaves that session open; otherwise it makes one
    and closes it on leaving the block.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        session: aiohttp.ClientSession | None = None,
        connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
        read_timeout_s: float = DEFAULT_READ_TIMEOUT_S,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._headers = {api.API_KEY_HEADER: api_key}
        self._session = session
        self._owns_session = session is None
        # No total: following a batch lasts as long as the batch.
        self._timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=connect_timeout_s, sock_read=read_timeout_s
        )

    async def __aenter__(self) -> Client:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the session this client made (never one it was given)."""
        if self._owns_session and self._session is not None:
            await self._session.close()
            self._session = None

    async def submit(
        self,
        executions: Sequence[Mapping[str, Any]],
        *,
        columns: Sequence[str] | None = None,
        models: Sequence[str] = (),
        response_schema: Mapping[str, Any] | None = None,
        max_cost: float | None = None,
        cache: bool | None = None,
    ) -> str:
        """Start a batch; its invocation id.

        Each execution has a ``prompt`` and optionally a ``model`` or an
        ``assistant``; other keys are carried into the outputs, in the order
        ``columns`` gives (a file's header), else after ``prompt`` and ``model``.
        ``models`` runs every row on each of them, side by side;
        ``response_schema`` is the JSON Schema every answer must match; ``max_cost``
        the batch's budget; ``cache`` uses (True) or bypasses (False) the answer cache.
        """
        request: dict[str, Any] = {"executions": list(executions)}
        if columns is not None:
            request["columns"] = list(columns)
        if models:
            request["models"] = list(models)
        if response_schema is not None:
            request["response_schema"] = dict(response_schema)
        if max_cost is not None:
            request["max_cost"] = max_cost
        if cache is not None:
            request["cache"] = cache
        body = await self._post(api.EXECUTE_BATCH, request)
        return _invocation_id(body)

    async def results(self, invocation_id: str) -> dict[str, Any]:
        """The batch's status and results, as the results route answers them.

        Keys: ``status``, ``message``, ``progress`` (counts by state),
        ``usage``, ``executions`` (the rows ended so far) and, once the batch
        has ended, ``xlsx_url`` and ``csv_content``.
        """
        return await self._post(api.RESULTS, {"invocation_id": invocation_id})

    async def cancel(self, invocation_id: str) -> dict[str, Any]:
        """Cancel a queued or running batch; its results once it has stopped."""
        return await self._post(api.CANCEL, {"invocation_id": invocation_id})

    async def retry(self, invocation_id: str) -> str:
        """Rerun the rows of an ended batch that did not succeed; the new batch's invocation id."""
        body = await self._post(api.RETRY, {"invocation_id": invocation_id})
        return _invocation_id(body)

    async def batches(
        self, *, status: str | None = None, limit: int | None = None
    ) -> list[dict[str, Any]]:
        """This key's batches, newest first (``invocationId``, ``status``, ``progress``, ...)."""
        query = {"status": status, "limit": None if limit is None else str(limit)}
        params = {name: value for name, value in query.items() if value is not None}
        async with self._request("GET", api.BATCHES, params=params) as response:
            body = await _json_object(response)
        found = body.get("batches")
        if not isinstance(found, list):
            raise BadAnswer("the answer has no list of batches")
        return [batch for batch in found if isinstance(batch, dict)]

    async def download(self, xlsx_url_or_file_name: str) -> bytes:
        """The workbook an ``xlsx_url`` points to (or named so), fetched from this server."""
        async with self._request("GET", _download_path(xlsx_url_or_file_name)) as response:
            return await response.read()

    async def download_to(self, xlsx_url_or_file_name: str, path: Path) -> None:
        """Like ``download``, written to ``path`` as it arrives, never whole in memory.

        Written (with aiofiles) to a temporary file beside ``path`` and renamed
        at the end, so ``path`` is never half a workbook.
        """
        with atomic_path(path) as temporary:
            async with (
                self._request("GET", _download_path(xlsx_url_or_file_name)) as response,
                aiofiles.open(temporary, "wb") as file,
            ):
                async for chunk in response.content.iter_chunked(_CHUNK_BYTES):
                    await file.write(chunk)

    async def follow(self, invocation_id: str) -> AsyncGenerator[Event, None]:
        """The batch's server-sent events as they come; ends after ``done``.

        A client that starts late first gets the current state: an
        ``execution`` event per ended row, then ``progress``. The stream also
        ends after ``interrupted``, when the server stops; follow again once
        it is back. A stream that breaks off raises ``ConnectionFailed``.
        """
        path = api.events_path(quote(invocation_id, safe=""))
        headers = {"Accept": "text/event-stream"}
        async with (
            self._request("GET", path, headers=headers) as response,
            contextlib.aclosing(_parse_events(response.content)) as events,
        ):
            async for event in events:
                yield event
                if event.name in _LAST_EVENTS:
                    return

    async def _post(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        async with self._request("POST", path, json=body) as response:
            return await _json_object(response)

    @contextlib.asynccontextmanager
    async def _request(
        self,
        method: str,
        path: str,
        *,
        headers: Mapping[str, str] | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """An answer with a success status; aiohttp's errors, while reading it too, mapped."""
        if self._session is None:
            raise RuntimeError("use the client as `async with Client(...) as client`")
        try:
            async with self._session.request(
                method,
                self.base_url + path,
                headers={**self._headers, **(headers or {})},
                timeout=self._timeout,
                **kwargs,
            ) as response:
                await _raise_for_status(response)
                yield response
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ConnectionFailed(_reason(exc)) from exc


async def _parse_events(lines: aiohttp.StreamReader) -> AsyncGenerator[Event, None]:
    """The events of a ``text/event-stream`` body, each one's data parsed as JSON."""
    name = "message"
    data: list[str] = []
    async for raw in lines:
        try:
            line = raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError as exc:
            raise BadAnswer(f"the event stream is not UTF-8: {exc}") from exc
        if not line:
            if data:
                yield Event(name, _json_dict("\n".join(data)))
            name, data = "message", []
        elif not line.startswith(":"):
            field, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if field == "event":
                name = value
            elif field == "data":
                data.append(value)


async def _raise_for_status(response: aiohttp.ClientResponse) -> None:
    """Raise the ``ClientError`` of an error answer, with the server's detail and row errors."""
    if response.status < 400:
        return
    text = await response.text(errors="replace")
    detail = text.strip()[:_DETAIL_CHARS] or response.reason or ""
    errors: list[FieldError] = []
    with contextlib.suppress(ValueError):
        body = json.loads(text)
        if isinstance(body, dict):
            detail = str(body.get("detail", detail))
            listed = body.get("errors") or []
            errors = [_field_error(error) for error in listed if isinstance(error, dict)]
    error_class = _ERRORS.get(response.status, ClientError)
    raise error_class(
        detail,
        status=response.status,
        errors=errors,
        retry_after_s=_seconds(response.headers.get("Retry-After")),
    )


def _field_error(error: dict[str, Any]) -> FieldError:
    index, field = error.get("index"), error.get("field")
    return FieldError(
        index if isinstance(index, int) else None,
        field if isinstance(field, str) else None,
        str(error.get("message", "")),
    )


async def _json_object(response: aiohttp.ClientResponse) -> dict[str, Any]:
    try:
        answer = await response.json()
    except (aiohttp.ContentTypeError, ValueError) as exc:
        raise BadAnswer(str(exc) or type(exc).__name__) from exc
    if not isinstance(answer, dict):
        raise BadAnswer("the answer is not a JSON object")
    return answer


def _json_dict(text: str) -> dict[str, Any]:
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise BadAnswer(f"an event's data is not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise BadAnswer("an event's data is not a JSON object")
    return data


def _invocation_id(body: Mapping[str, Any]) -> str:
    invocation_id = body.get("invocationId")
    if not isinstance(invocation_id, str):
        raise BadAnswer("the answer has no invocationId")
    return invocation_id


def _seconds(retry_after: str | None) -> float | None:
    """``Retry-After`` in seconds; ``None`` when absent or an HTTP date."""
    try:
        seconds = float(retry_after or "")
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def _reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    return str(exc) or type(exc).__name__


def _download_path(xlsx_url_or_file_name: str) -> str:
    name = xlsx_url_or_file_name
    if "/" in name:
        # The URL's host may be a public name; the file is fetched where the client points.
        name = unquote(PurePosixPath(urlsplit(name).path).name)
    if not name:
        raise ValueError(f"no workbook file name in {xlsx_url_or_file_name!r}")
    return api.download_path(quote(name, safe=""))
