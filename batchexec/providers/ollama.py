"""Ollama's native ``/api/chat``."""

from __future__ import annotations

from yarl import URL

from batchexec.catalog import ModelSpec
from batchexec.errors import FatalProviderError
from batchexec.providers.base import ChatRequest, Completion, Provider
from batchexec.providers.http import (
    ErrorDetail,
    Wire,
    chat_messages,
    dig,
    fetch_json,
    require_str,
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


class OllamaProvider(Provider):
    """A local or remote Ollama server; no key, always one non-streamed answer."""

    name = "ollama"

    async def complete(self, model: ModelSpec, request: ChatRequest) -> Completion:
        base_url = host_url(model.base_url or self.settings.ollama_host or DEFAULT_HOST)
        top_level = {k: v for k, v in request.params.items() if k in TOP_LEVEL_PARAMS}
        options = {k: v for k, v in request.params.items() if k not in TOP_LEVEL_PARAMS}
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
