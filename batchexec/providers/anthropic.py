"""Anthropic's Messages API."""

from __future__ import annotations

from typing import Any

from batchexec.catalog import ModelSpec
from batchexec.errors import FatalProviderError, ProviderNotConfiguredError
from batchexec.providers.base import ChatOptions, ChatRequest, Completion, Provider
from batchexec.providers.http import (
    ErrorDetail,
    Wire,
    conversation,
    dig,
    fetch_json,
    malformed,
    response_format_problem,
    response_schema,
    token_count,
)

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
#: The API as refusals name it.
API = "Anthropic's Messages API"


class AnthropicProvider(Provider):
    """Claude models through ``/v1/messages``; needs ``ANTHROPIC_API_KEY`` or the model's key.

    The system prompt goes top-level as ``system``, the earlier turns and the
    prompt as ``messages``. Options map to ``max_tokens``, ``temperature``,
    ``top_p``, ``stop_sequences`` and, for a json_schema ``response_format``,
    ``output_config.format`` (always enforced, whatever ``strict`` says).
    Refused: ``seed``, which the API lacks, and ``json_object``, since it
    constrains output only to a schema.
    """

    name = "anthropic"

    def missing_configuration(self, model: ModelSpec) -> str | None:
        key_env = model.api_key_env or KEY_ENV
        if self.settings.secret(key_env) is None:
            return f"Model {model.name!r} needs {key_env} to be set."
        return None

    def unsupported(self, options: ChatOptions) -> list[str]:
        problems = []
        if options.seed is not None:
            problems.append(f"seed: {API} has no seed")
        if (options.response_format or {}).get("type") == "json_object":
            problems.append(
                f"response_format: {API} constrains output only to a JSON schema; "
                "give json_schema rather than json_object"
            )
        elif problem := response_format_problem(options, API, ("text", "json_schema")):
            problems.append(problem)
        return problems

    async def complete(self, model: ModelSpec, request: ChatRequest) -> Completion:
        key = self.settings.secret(model.api_key_env or KEY_ENV)
        if key is None:
            raise ProviderNotConfiguredError(self.missing_configuration(model) or WIRE.label)
        self.refuse_unsupported(request.options)
        payload: dict[str, Any] = {
            "max_tokens": DEFAULT_MAX_TOKENS,
            **_params(request),
            "model": model.wire_id,
            "messages": conversation(request),
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


def _params(request: ChatRequest) -> dict[str, Any]:
    """The catalog's params with each set option as the Messages API field it replaces."""
    options = request.options
    renamed = {
        "max_tokens": options.max_tokens,
        "temperature": options.temperature,
        "top_p": options.top_p,
        "stop_sequences": list(options.stop) if options.stop is not None else None,
    }
    params = {**request.params, **{name: v for name, v in renamed.items() if v is not None}}
    if options.response_format is not None:
        # The format is the option's; an effort the catalog set stays.
        output_config = dict(params.pop("output_config", None) or {})
        output_config.pop("format", None)
        schema = response_schema(options)
        if schema is not None:
            output_config["format"] = {"type": "json_schema", "schema": schema}
        if output_config:
            params["output_config"] = output_config
    return params
