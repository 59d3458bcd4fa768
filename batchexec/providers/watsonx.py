"""IBM watsonx.ai text chat, signed in with an IBM Cloud IAM token exchanged for the API key."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp

from batchexec.catalog import ModelSpec
from batchexec.config import Settings
from batchexec.errors import ProviderError, ProviderNotConfiguredError
from batchexec.providers.base import ChatOptions, ChatRequest, Completion, Provider
from batchexec.providers.http import (
    ErrorDetail,
    Wire,
    bearer,
    chat_messages,
    dig,
    fetch_json,
    require_str,
    response_format_problem,
    token_count,
)

#: The dated API version watsonx.ai requires on every call; the one IBM's examples use.
API_VERSION = "2025-02-11"
DEFAULT_IAM_URL = "https://iam.cloud.ibm.com/identity/token"
KEY_ENV = "WATSONX_APIKEY"
#: Names a different IAM token endpoint (a private or test one).
IAM_URL_ENV = "WATSONX_IAM_URL"
#: A token is replaced this long before it expires, so no call carries a dying one.
REFRESH_MARGIN_S = 60.0
#: IAM tokens live an hour at most; assumed when the exchange does not say.
DEFAULT_TOKEN_LIFETIME_S = 3600.0
_GRANT_TYPE = "urn:ibm:params:oauth:grant-type:apikey"


def _read_error(body: object) -> ErrorDetail:
    message, code = dig(body, "errors", 0, "message"), dig(body, "errors", 0, "code")
    # An expired token is not the key's fault: the next try signs in afresh.
    expired = code == "authentication_token_expired"
    return ErrorDetail(
        message if isinstance(message, str) else None, retryable=True if expired else None
    )


def _read_iam_error(body: object) -> ErrorDetail:
    message, code = dig(body, "errorMessage"), dig(body, "errorCode")
    if not isinstance(message, str):
        return ErrorDetail(None)
    return ErrorDetail(f"{message} [{code}]" if isinstance(code, str) else message)


WIRE = Wire("watsonx.ai", _read_error)
IAM_WIRE = Wire("IBM Cloud IAM", _read_iam_error)
#: The API as refusals name it.
API = "watsonx.ai's chat API"


@dataclass(frozen=True)
class _Token:
    value: str
    #: When to exchange the key again, on the provider's clock.
    refresh_at: float


class WatsonxProvider(Provider):
    """watsonx.ai's ``/ml/v1/text/chat``; one IAM token per API key, shared by all calls.

    The chat endpoint, not ``/ml/v1/text/generation``: the earlier turns go as
    ``messages`` with their roles, never rendered into one prompt string with
    a template the model may not have been trained on. Its parameters share
    OpenAI's names, so ``temperature``, ``max_tokens``, ``top_p``, ``stop``,
    ``seed`` and ``response_format`` (json_object, json_schema) go on as they
    are; a text ``response_format`` is sent as none, the default. Nothing is
    refused but a ``response_format`` that is not one of OpenAI's.
    """

    name = "watsonx"

    def __init__(self, settings: Settings, session: aiohttp.ClientSession) -> None:
        super().__init__(settings, session)
        self.iam_url = settings.secret(IAM_URL_ENV) or DEFAULT_IAM_URL
        #: Seconds, monotonic; tests replace it to expire tokens without waiting.
        self.clock: Callable[[], float] = time.monotonic
        self._tokens: dict[str, _Token] = {}
        self._refreshing = asyncio.Lock()

    def missing_configuration(self, model: ModelSpec) -> str | None:
        required = {
            "WATSONX_URL": model.base_url or self.settings.watsonx_url,
            model.api_key_env or KEY_ENV: self.settings.secret(model.api_key_env or KEY_ENV),
            "WATSONX_PROJECT_ID": self.settings.watsonx_project_id,
        }
        unset = [name for name, value in required.items() if not value]
        if unset:
            return f"watsonx.ai is not configured: set {', '.join(unset)}."
        return None

    def unsupported(self, options: ChatOptions) -> list[str]:
        problem = response_format_problem(options, API)
        return [problem] if problem else []

    async def complete(self, model: ModelSpec, request: ChatRequest) -> Completion:
        base_url = model.base_url or self.settings.watsonx_url
        key_env = model.api_key_env or KEY_ENV
        apikey = self.settings.secret(key_env)
        project_id = self.settings.watsonx_project_id
        if not (base_url and apikey and project_id):
            raise ProviderNotConfiguredError(self.missing_configuration(model) or "watsonx.ai")
        self.refuse_unsupported(request.options)
        token = await self._token(key_env, apikey)
        payload = {
            **_params(request),
            "model_id": model.wire_id,
            "project_id": project_id,
            "messages": chat_messages(request),
        }
        try:
            body = await fetch_json(
                self.session,
                "POST",
                f"{base_url.rstrip('/')}/ml/v1/text/chat?version={API_VERSION}",
                WIRE,
                payload=payload,
                headers={**bearer(token), "Accept": "application/json"},
                secrets=(apikey, token),
                max_bytes=self.settings.max_response_bytes,
            )
        except ProviderError as exc:
            if exc.status == 401:
                self._forget(key_env, token)
            raise
        return Completion(
            text=require_str(body, WIRE, "choices", 0, "message", "content"),
            prompt_tokens=token_count(dig(body, "usage", "prompt_tokens")),
            completion_tokens=token_count(dig(body, "usage", "completion_tokens")),
        )

    async def _token(self, key_env: str, apikey: str) -> str:
        """A live bearer token for the key in ``key_env``; one exchange at a time."""
        token = self._tokens.get(key_env)
        if token is None or self.clock() >= token.refresh_at:
            async with self._refreshing:
                # Calls that queued behind the refresh find the new token here.
                token = self._tokens.get(key_env)
                if token is None or self.clock() >= token.refresh_at:
                    token = self._tokens[key_env] = await self._exchange(apikey)
        return token.value

    async def _exchange(self, apikey: str) -> _Token:
        """Trade the API key for an IAM access token."""
        issued_at = self.clock()
        body = await fetch_json(
            self.session,
            "POST",
            self.iam_url,
            IAM_WIRE,
            form={"grant_type": _GRANT_TYPE, "apikey": apikey},
            headers={"Accept": "application/json"},
            secrets=(apikey,),
            max_bytes=self.settings.max_response_bytes,
        )
        value = require_str(body, IAM_WIRE, "access_token")
        lifetime_s = _lifetime_s(body)
        # Short-lived tokens (tests, odd IAM setups) keep at least half their life.
        margin_s = min(REFRESH_MARGIN_S, lifetime_s / 2)
        return _Token(value, issued_at + lifetime_s - margin_s)

    def _forget(self, key_env: str, value: str) -> None:
        """Drop a token the chat endpoint refused, unless a newer one already replaced it."""
        token = self._tokens.get(key_env)
        if token is not None and token.value == value:
            del self._tokens[key_env]


def _params(request: ChatRequest) -> dict[str, Any]:
    """The catalog's params with each set option in its place; the chat API shares OpenAI's names.

    ``max_tokens`` takes the name the catalog's params use for it, which may be
    the newer ``max_completion_tokens``.
    """
    given = request.options.given()
    params = dict(request.params)
    if "stop" in given:
        given["stop"] = list(given["stop"])
    named = request.options.max_tokens_as == "max_completion_tokens"
    if "max_tokens" in given and (named or "max_completion_tokens" in params):
        given["max_completion_tokens"] = given.pop("max_tokens")
    if (request.options.response_format or {}).get("type") == "text":
        # Text is the default: sent as no format at all, whatever the catalog gave.
        del given["response_format"]
        params.pop("response_format", None)
    return {**params, **given}


def _lifetime_s(body: object) -> float:
    expires_in = dig(body, "expires_in")
    if isinstance(expires_in, int | float) and expires_in > 0:
        return float(expires_in)
    expiration = dig(body, "expiration")
    if isinstance(expiration, int | float):
        return max(0.0, expiration - time.time())
    return DEFAULT_TOKEN_LIFETIME_S
