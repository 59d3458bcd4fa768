"""Ollama's native ``/api/chat``."""

from __future__ import annotations

from typing import Any

from yarl import URL

from batchexec.catalog import ModelSpec
from batchexec.errors import FatalProviderError
from batchexec.providers.base import ChatOptions, ChatRequest, Completion, Provider
from batchexec.providers.http import (
    ErrorDetail,
    Wire,
    chat_messages,
    dig,
    fetch_json,
    require_str,
    response_format_problem,
    response_schema,
    token_count,
)

DEFAULT_HOST = "http://127.0.0.1:11434"
DEFAULT_PORT = 11434
#: Request fields that are not Modelfile options; every other param goes into ``options``.
TOP_LEVEL_PARAMS = frozenset({"format", "keep_alive", "think"})
#: Addresses a server binds to but a client cannot dial.
_ANY_ADDRESS = frozenset({"0.0.0.0", "::"})  # noqa: S104 - compared against, never bound


def _read_error(body: object) -> ErrorDetail:
    message = dig(body, "error")
    return ErrorDetail(message if isinstance(message, str) else None)


WIRE = Wire("Ollama", _read_error)
#: The API as refusals name it.
API = "Ollama's /api/chat"


class OllamaProvider(Provider):
    """A local or remote Ollama server; no key, always one non-streamed answer.

    The system prompt, the earlier turns and the prompt go as ``messages``.
    Options map into ``options`` as ``temperature``, ``top_p``, ``stop``,
    ``seed`` and ``num_predict`` (for ``max_tokens``); ``response_format``
    becomes the top-level ``format``: ``"json"`` for json_object, the schema
    itself for json_schema (always enforced), none for text. Nothing is
    refused but a ``response_format`` that is not one of OpenAI's.
    """

    name = "ollama"

    def unsupported(self, options: ChatOptions) -> list[str]:
        problem = response_format_problem(options, API)
        return [problem] if problem else []

    async def complete(self, model: ModelSpec, request: ChatRequest) -> Completion:
        self.refuse_unsupported(request.options)
        base_url = host_url(model.base_url or self.settings.ollama_host or DEFAULT_HOST)
        params = _params(request)
        top_level = {k: v for k, v in params.items() if k in TOP_LEVEL_PARAMS}
        options = {k: v for k, v in params.items() if k not in TOP_LEVEL_PARAMS}
        payload = {
            **top_level,
            "model": model.wire_id,
            "messages": chat_messages(request),
            # Ollama streams unless told otherwise.
            "stream": False,
        }
        if options:
            payload["options"] = options
        body = await fetch_json(
            self.session,
            "POST",
            f"{base_url}/api/chat",
            WIRE,
            payload=payload,
            max_bytes=self.settings.max_response_bytes,
        )
        return Completion(
            text=require_str(body, WIRE, "message", "content"),
            prompt_tokens=token_count(dig(body, "prompt_eval_count")),
            completion_tokens=token_count(dig(body, "eval_count")),
        )


def _params(request: ChatRequest) -> dict[str, Any]:
    """The catalog's params with each set option as the Ollama setting it replaces."""
    options = request.options
    renamed = {
        "temperature": options.temperature,
        "num_predict": options.max_tokens,
        "top_p": options.top_p,
        "stop": list(options.stop) if options.stop is not None else None,
        "seed": options.seed,
    }
    params = {**request.params, **{name: v for name, v in renamed.items() if v is not None}}
    kind = (options.response_format or {}).get("type")
    if kind is not None:
        # The option replaces the catalog's format; text, Ollama's default, is none at all.
        params.pop("format", None)
        if kind == "json_object":
            params["format"] = "json"
        elif kind == "json_schema":
            params["format"] = response_schema(options)
    return params


def host_url(host: str) -> str:
    """``OLLAMA_HOST`` read as Ollama reads it: no scheme means ``http`` on port 11434."""
    host = host.strip().strip("\"'")
    if host.startswith(":"):
        # ":11435" means this machine, as it does to Ollama.
        host = f"127.0.0.1{host}"
    try:
        if "://" in host:
            url = URL(host)
        else:
            url = URL(f"http://{host}")
            if url.explicit_port is None:
                url = url.with_port(DEFAULT_PORT)
        if url.host is None:
            raise ValueError("no host")
        if url.host in _ANY_ADDRESS:
            url = url.with_host("127.0.0.1")
    except ValueError as exc:
        raise FatalProviderError(f"{WIRE.label}: '{host}' is not a valid address") from exc
    return str(url).rstrip("/")
