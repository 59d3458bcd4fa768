"""Anthropic's Messages API."""

from __future__ import annotations

from typing import Any

from batchexec.catalog import ModelSpec
from batchexec.errors import FatalProviderError, ProviderNotConfiguredError
from batchexec.providers.base import ChatRequest, Completion, Provider
from batchexec.providers.http import ErrorDetail, Wire, dig, fetch_json, malformed, token_count

DEFAULT_BASE_URL = "https://api.anthropic.com"
API_VERSION = "2023-06-01"
KEY_ENV = "ANTHROPIC_API_KEY"
#: The API requires ``max_tokens``; used when the model's params do not give it.
DEFAULT_MAX_TOKENS = 1024


def _read_error(body: object) -> ErrorDetail:
    message = dig(body, "error", "message")
    # A monthly spend cap answers 429 too, but no wait within a batch lifts it.
    capped = dig(body, "error", "details", "error_code") == "enforced_spend_limit_reached"
    return ErrorDetail(
        message if isinstance(message, str) else None, retryable=False if capped else None
    )


WIRE = Wire("Anthropic", _read_error)


class AnthropicProvider(Provider):
    """Claude models through ``/v1/messages``; needs ``ANTHROPIC_API_KEY`` or the model's key."""

    name = "anthropic"

    def missing_configuration(self, model: ModelSpec) -> str | None:
        key_env = model.api_key_env or KEY_ENV
        if self.settings.secret(key_env) is None:
            return f"Model {model.name!r} needs {key_env} to be set."
        return None

    async def complete(self, model: ModelSpec, request: ChatRequest) -> Completion:
        key = self.settings.secret(model.api_key_env or KEY_ENV)
        if key is None:
            raise ProviderNotConfiguredError(self.missing_configuration(model) or WIRE.label)
        payload: dict[str, Any] = {
            "max_tokens": DEFAULT_MAX_TOKENS,
            **request.params,
            "model": model.wire_id,
            "messages": [{"role": "user", "content": request.prompt}],
        }
        if request.system_prompt:
            payload["system"] = request.system_prompt
        body = await fetch_json(
            self.session,
            "POST",
            f"{(model.base_url or DEFAULT_BASE_URL).rstrip('/')}/v1/messages",
            WIRE,
            payload=payload,
            headers={"x-api-key": key, "anthropic-version": API_VERSION},
            secrets=(key,),
            max_bytes=self.settings.max_response_bytes,
        )
        if dig(body, "stop_reason") == "refusal":
            raise FatalProviderError(f"{WIRE.label}: the model declined to answer this prompt")
        blocks = dig(body, "content")
        if not isinstance(blocks, list):
            raise malformed(WIRE, "content")
        # Only text blocks are the answer; thinking and tool blocks are not.
        text = "".join(
            block["text"]
            for block in blocks
            if dig(block, "type") == "text" and isinstance(dig(block, "text"), str)
        )
        return Completion(
            text=text,
            prompt_tokens=token_count(dig(body, "usage", "input_tokens")),
            completion_tokens=token_count(dig(body, "usage", "output_tokens")),
        )
