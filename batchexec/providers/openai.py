"""OpenAI-compatible chat completions: OpenAI itself, vLLM, llama.cpp, LiteLLM, Ollama's ``/v1``."""

from __future__ import annotations

from typing import Any

import aiohttp

from batchexec.catalog import ModelSpec
from batchexec.config import Settings
from batchexec.errors import FatalProviderError
from batchexec.providers.base import ChatOptions, ChatRequest, Completion, Provider
from batchexec.providers.http import (
    ErrorDetail,
    Wire,
    bearer,
    chat_messages,
    dig,
    fetch_json,
    malformed,
    token_count,
)

DEFAULT_BASE_URL = "https://api.openai.com/v1"
KEY_ENV = "OPENAI_API_KEY"


def _read_error(body: object) -> ErrorDetail:
    error = dig(body, "error")
    if isinstance(error, str):
        # vLLM's 401: {"error": "Unauthorized"}
        return ErrorDetail(error)
    # Older vLLM puts the fields at the top level: {"object": "error", "message": ...}.
    fields = error if isinstance(error, dict) else body
    message = dig(fields, "message")
    # Out of credits answers 429 too, but waiting will not bring them back.
    quota = "insufficient_quota" in (dig(fields, "code"), dig(fields, "type"))
    return ErrorDetail(
        message if isinstance(message, str) else None, retryable=False if quota else None
    )


WIRE = Wire("OpenAI-compatible server", _read_error)


class OpenAIProvider(Provider):
    """Any server that speaks OpenAI's ``/chat/completions``; keyless for local servers.

    History and options need no mapping: the body is OpenAI's own, with the
    earlier turns as ``messages`` and each set option under its name.
    """

    name = "openai"

    def missing_configuration(self, model: ModelSpec) -> str | None:
        key_env = model.api_key_env or KEY_ENV
        # Local servers need no key; OpenAI itself, or a model that names one, does.
        needs_key = model.api_key_env is not None or self._base_url(model) == DEFAULT_BASE_URL
        if needs_key and self.settings.secret(key_env) is None:
            return f"Model {model.name!r} needs {key_env} to be set."
        return None

    def unsupported(self, options: ChatOptions) -> list[str]:
        """Nothing: every option goes on under its own name, for the server to judge."""
        return []

    async def complete(self, model: ModelSpec, request: ChatRequest) -> Completion:
        self.refuse_unsupported(request.options)
        key = self.settings.secret(model.api_key_env or KEY_ENV)
        payload = {
            **request.params,
            **_option_fields(request),
            "model": model.wire_id,
            "messages": chat_messages(request),
        }
        body = await fetch_json(
            self.session,
            "POST",
            f"{self._base_url(model)}/chat/completions",
            WIRE,
            payload=payload,
            headers=bearer(key),
            secrets=(key,),
            max_bytes=self.settings.max_response_bytes,
        )
        message = dig(body, "choices", 0, "message")
        if not isinstance(message, dict) or "content" not in message:
            raise malformed(WIRE, "choices", 0, "message", "content")
        text = message["content"]
        if not isinstance(text, str):
            raise _no_text(message, dig(body, "choices", 0, "finish_reason"))
        return Completion(
            text=text,
            prompt_tokens=token_count(dig(body, "usage", "prompt_tokens")),
            completion_tokens=token_count(dig(body, "usage", "completion_tokens")),
        )

    def _base_url(self, model: ModelSpec) -> str:
        return _strip(model.base_url or self.settings.openai_base_url or DEFAULT_BASE_URL)


async def discover_models(settings: Settings, session: aiohttp.ClientSession) -> list[ModelSpec]:
    """Catalog entries for the models an ``OPENAI_BASE_URL`` server lists; none when it is unset."""
    if not settings.openai_base_url:
        return []
    key = settings.secret(KEY_ENV)
    url = f"{_strip(settings.openai_base_url)}/models"
    body = await fetch_json(
        session,
        "GET",
        url,
        WIRE,
        headers=bearer(key),
        secrets=(key,),
        max_bytes=settings.max_response_bytes,
    )
    listed = dig(body, "data")
    if not isinstance(listed, list):
        raise malformed(WIRE, "data")
    ids = [dig(entry, "id") for entry in listed]
    return [
        ModelSpec(
            name=model_id,
            provider=OpenAIProvider.name,
            model_id=model_id,
            description="listed by OPENAI_BASE_URL",
        )
        for model_id in dict.fromkeys(ids)
        if isinstance(model_id, str) and model_id.strip()
    ]


def _option_fields(request: ChatRequest) -> dict[str, Any]:
    """The set options as body fields: OpenAI's own names, so passed on as they are.

    ``max_tokens`` takes the name the catalog's params use for it:
    ``max_completion_tokens`` where they give that, since OpenAI's reasoning
    models refuse ``max_tokens``.
    """
    given = request.options.given()
    if "stop" in given:
        given["stop"] = list(given["stop"])
    named = request.options.max_tokens_as == "max_completion_tokens"
    if "max_tokens" in given and (named or "max_completion_tokens" in request.params):
        given["max_completion_tokens"] = given.pop("max_tokens")
    return given


def _no_text(message: dict[str, object], finish_reason: object) -> FatalProviderError:
    """A well-formed answer without text: a refusal, or a reply we did not ask for (tools)."""
    refusal = message.get("refusal")
    if isinstance(refusal, str) and refusal:
        return FatalProviderError(f"{WIRE.label}: the model refused: {refusal}")
    reason = f" (finish_reason {finish_reason})" if isinstance(finish_reason, str) else ""
    return FatalProviderError(f"{WIRE.label}: the model gave no text{reason}")


def _strip(url: str) -> str:
    return url.rstrip("/")
