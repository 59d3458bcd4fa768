"""The watsonx.ai provider against fake IAM and watsonx.ai servers."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest

from batchexec.catalog import ModelSpec
from batchexec.config import Settings
from batchexec.errors import FatalProviderError, ProviderNotConfiguredError, RetryableProviderError
from batchexec.providers.base import ChatOptions, ChatRequest, Completion, Turn
from batchexec.providers.watsonx import API_VERSION, WatsonxProvider

pytest_plugins = ["tests.providerfakes"]

APIKEY = "ibm-apikey-test-7c41d2e9"
PROJECT = "8a3b2d1c-0000-4000-8000-123456789abc"
IAM = "/identity/token"
CHAT = "/ml/v1/text/chat"
MODEL = ModelSpec(
    name="Granite 3 8B Instruct", provider="watsonx", model_id="ibm/granite-3-8b-instruct"
)

CHAT_RESPONSE = {
    "id": "chatcmpl-5293",
    "model_id": "ibm/granite-3-8b-instruct",
    "model": "ibm/granite-3-8b-instruct",
    "model_version": "1.1.0",
    "created": 1731000000,
    "created_at": "2024-11-07T12:00:00.000Z",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "J'adore programmer.", "tool_calls": []},
            "finish_reason": "stop",
        }
    ],
    "usage": {"completion_tokens": 7, "prompt_tokens": 30, "total_tokens": 37},
}
IAM_BAD_KEY = {
    "errorCode": "BXNIM0415E",
    "errorMessage": "Provided API key could not be found.",
    "context": {"requestId": "583ab", "requestType": "incoming.Identity_Token"},
}


HISTORY = (Turn("user", "Name a colour."), Turn("assistant", "Blue."))
SCHEMA = {
    "type": "object",
    "properties": {"colour": {"type": "string"}},
    "required": ["colour"],
    "additionalProperties": False,
}
JSON_SCHEMA = {
    "type": "json_schema",
    "json_schema": {"name": "colour", "schema": SCHEMA, "strict": True},
}
EVERY_OPTION = ChatOptions(
    temperature=0.3, max_tokens=50, top_p=0.9, stop=("\n\n",), seed=7, response_format=JSON_SCHEMA
)


def token(access_token="token-1", expires_in=3600):
    return {
        "access_token": access_token,
        "refresh_token": "not_supported",
        "token_type": "Bearer",
        "expires_in": expires_in,
        "expiration": 1581031424,
        "scope": "ibm openid",
    }


def watsonx_error(code, message, status):
    return {
        "errors": [
            {
                "code": code,
                "message": message,
                "more_info": "https://cloud.ibm.com/apidocs/watsonx-ai",
            }
        ],
        "trace": "fc4afd38813180730e10a5a3d56c1f25",
        "status_code": status,
    }


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self):
        self.now_s = 1000.0

    def __call__(self):
        return self.now_s


@pytest.fixture
def settings(fake, no_provider_env, monkeypatch):
    monkeypatch.setenv("WATSONX_APIKEY", APIKEY)
    monkeypatch.setenv("WATSONX_IAM_URL", fake.url(IAM))
    return Settings(watsonx_url=fake.url(""), watsonx_project_id=PROJECT)


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def provider(settings, http_session, clock):
    provider = WatsonxProvider(settings, http_session)
    provider.clock = clock
    return provider


async def test_success_exchanges_the_key_and_sends_the_documented_request(fake, provider):
    fake.on(IAM, fake.reply(token()))
    fake.on(CHAT, fake.reply(CHAT_RESPONSE))
    request = ChatRequest(
        "Translate: I love coding.",
        system_prompt="Answer in French.",
        params={"max_tokens": 100, "temperature": 0},
    )
    completion = await provider.complete(MODEL, request)
    assert completion == Completion("J'adore programmer.", prompt_tokens=30, completion_tokens=7)

    (exchange,) = fake.seen(IAM)
    assert exchange.method == "POST"
    assert exchange.headers["Content-Type"] == "application/x-www-form-urlencoded"
    assert exchange.form() == {
        "grant_type": "urn:ibm:params:oauth:grant-type:apikey",
        "apikey": APIKEY,
    }
    (chat,) = fake.seen(CHAT)
    assert chat.query == {"version": API_VERSION}
    assert chat.headers["Authorization"] == "Bearer token-1"
    assert chat.json() == {
        "model_id": "ibm/granite-3-8b-instruct",
        "project_id": PROJECT,
        "messages": [
            {"role": "system", "content": "Answer in French."},
            {"role": "user", "content": "Translate: I love coding."},
        ],
        "max_tokens": 100,
        "temperature": 0,
    }


async def test_history_and_every_option_go_on_under_the_chat_apis_names(fake, provider):
    fake.on(IAM, fake.reply(token()))
    fake.on(CHAT, fake.reply(CHAT_RESPONSE))
    request = ChatRequest(
        "Another one?", system_prompt="Be brief.", history=HISTORY, options=EVERY_OPTION
    )
    await provider.complete(MODEL, request)
    assert fake.seen(CHAT)[0].json() == {
        "model_id": "ibm/granite-3-8b-instruct",
        "project_id": PROJECT,
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Name a colour."},
            {"role": "assistant", "content": "Blue."},
            {"role": "user", "content": "Another one?"},
        ],
        "temperature": 0.3,
        "max_tokens": 50,
        "top_p": 0.9,
        "stop": ["\n\n"],
        "seed": 7,
        "response_format": JSON_SCHEMA,
    }


async def test_set_options_win_over_the_catalogs_params(fake, provider):
    fake.on(IAM, fake.reply(token()))
    fake.on(CHAT, fake.reply(CHAT_RESPONSE))
    params = {
        "temperature": 1.0,
        "max_completion_tokens": 999,
        "stop": ["END"],
        "response_format": {"type": "json_object"},
        "time_limit": 10000,
    }
    options = ChatOptions(
        temperature=0.0, max_tokens=10, stop=(), seed=0, response_format={"type": "text"}
    )
    await provider.complete(MODEL, ChatRequest("hi", params=params, options=options))
    # max_tokens keeps the catalog's name for it; text is sent as no format, the default.
    assert fake.seen(CHAT)[0].json() == {
        "model_id": "ibm/granite-3-8b-instruct",
        "project_id": PROJECT,
        "messages": [{"role": "user", "content": "hi"}],
        "temperature": 0.0,
        "max_completion_tokens": 10,
        "stop": [],
        "seed": 0,
        "time_limit": 10000,
    }


def test_unsupported_refuses_only_what_is_no_openai_response_format(provider):
    assert provider.unsupported(EVERY_OPTION) == []
    assert provider.unsupported(ChatOptions(response_format={"type": "json_object"})) == []
    assert provider.unsupported(ChatOptions(response_format={"type": "grammar"})) == [
        "response_format: watsonx.ai's chat API takes type text, json_object or json_schema, "
        'not "grammar"'
    ]
    assert provider.unsupported(ChatOptions(response_format={"type": "json_schema"})) == [
        "response_format: watsonx.ai's chat API needs json_schema.schema, a JSON Schema object"
    ]


async def test_a_refused_option_is_never_sent(fake, provider):
    fake.on(IAM, fake.reply(token()))
    fake.on(CHAT, fake.reply(CHAT_RESPONSE))
    bad = ChatOptions(response_format={"type": "grammar"})
    with pytest.raises(FatalProviderError, match=r"^Not sent: response_format: "):
        await provider.complete(MODEL, ChatRequest("hi", options=bad))
    assert fake.requests == []


async def test_concurrent_calls_share_one_token_exchange(fake, provider):
    fake.on(IAM, fake.reply(token()))
    fake.on(CHAT, fake.reply(CHAT_RESPONSE))
    results = await asyncio.gather(
        *(provider.complete(MODEL, ChatRequest(f"prompt {n}")) for n in range(10))
    )
    assert len(results) == 10
    assert len(fake.seen(IAM)) == 1
    assert {chat.headers["Authorization"] for chat in fake.seen(CHAT)} == {"Bearer token-1"}


async def test_token_is_refreshed_before_it_expires(fake, provider, clock):
    fake.on(IAM, fake.reply(token("token-1", 3600)), fake.reply(token("token-2", 3600)))
    fake.on(CHAT, fake.reply(CHAT_RESPONSE))
    await provider.complete(MODEL, ChatRequest("one"))
    clock.now_s += 3600 - 61
    await provider.complete(MODEL, ChatRequest("two"))
    assert len(fake.seen(IAM)) == 1
    clock.now_s += 2  # now inside the last minute of the token's life
    await provider.complete(MODEL, ChatRequest("three"))
    assert len(fake.seen(IAM)) == 2
    auth = [chat.headers["Authorization"] for chat in fake.seen(CHAT)]
    assert auth == ["Bearer token-1", "Bearer token-1", "Bearer token-2"]


async def test_failed_exchange_is_fatal_with_iams_message(fake, provider):
    fake.on(IAM, fake.reply(IAM_BAD_KEY, status=400))
    with pytest.raises(FatalProviderError) as caught:
        await provider.complete(MODEL, ChatRequest("hi"))
    assert str(caught.value) == (
        "IBM Cloud IAM: Provided API key could not be found. [BXNIM0415E] (HTTP 400)"
    )
    assert APIKEY not in str(caught.value)
    assert fake.seen(CHAT) == []


async def test_iam_outage_is_retryable(fake, provider):
    fake.on(IAM, fake.reply_raw("<html>Service Unavailable</html>", 503, "text/html"))
    with pytest.raises(RetryableProviderError, match=r"IBM Cloud IAM: Service Unavailable"):
        await provider.complete(MODEL, ChatRequest("hi"))


async def test_expired_token_is_dropped_and_retryable(fake, provider):
    expired = watsonx_error(
        "authentication_token_expired",
        "Failed to authenticate the request due to an expired token",
        401,
    )
    fake.on(IAM, fake.reply(token("token-1")), fake.reply(token("token-2")))
    fake.on(CHAT, fake.reply(expired, status=401), fake.reply(CHAT_RESPONSE))
    with pytest.raises(RetryableProviderError) as caught:
        await provider.complete(MODEL, ChatRequest("hi"))
    assert str(caught.value) == (
        "watsonx.ai: Failed to authenticate the request due to an expired token (HTTP 401)"
    )
    assert "token-1" not in str(caught.value)
    await provider.complete(MODEL, ChatRequest("hi"))
    assert [chat.headers["Authorization"] for chat in fake.seen(CHAT)] == [
        "Bearer token-1",
        "Bearer token-2",
    ]


async def test_rejected_token_is_fatal_with_watsonx_message(fake, provider):
    rejected = watsonx_error("authorization_rejected", "Authorization rejected.", 401)
    fake.on(IAM, fake.reply(token()))
    fake.on(CHAT, fake.reply(rejected, status=401))
    with pytest.raises(FatalProviderError) as caught:
        await provider.complete(MODEL, ChatRequest("hi"))
    assert str(caught.value) == "watsonx.ai: Authorization rejected. (HTTP 401)"
    assert APIKEY not in str(caught.value)


async def test_unknown_model_is_fatal(fake, provider):
    message = "Model 'ibm/granite-13b-chat-v2' was not found."
    fake.on(IAM, fake.reply(token()))
    fake.on(CHAT, fake.reply(watsonx_error("model_not_supported", message, 404), status=404))
    with pytest.raises(FatalProviderError, match="was not found"):
        await provider.complete(MODEL, ChatRequest("hi"))


async def test_rate_limit_with_an_http_date(fake, provider):
    when = datetime.now(UTC) + timedelta(seconds=30)
    headers = {"Retry-After": format_datetime(when, usegmt=True)}
    body = watsonx_error("rate_limit_reached", "Too many requests.", 429)
    fake.on(IAM, fake.reply(token()))
    fake.on(CHAT, fake.reply(body, status=429, headers=headers))
    with pytest.raises(RetryableProviderError) as caught:
        await provider.complete(MODEL, ChatRequest("hi"))
    assert caught.value.retry_after_s is not None
    assert 25 < caught.value.retry_after_s <= 30


async def test_server_error_is_retryable(fake, provider):
    fake.on(IAM, fake.reply(token()))
    fake.on(CHAT, fake.reply(watsonx_error("internal_error", "Oops.", 500), status=500))
    with pytest.raises(RetryableProviderError, match=r"watsonx.ai: Oops. \(HTTP 500\)"):
        await provider.complete(MODEL, ChatRequest("hi"))


async def test_malformed_success_is_retryable(fake, provider):
    fake.on(IAM, fake.reply(token()))
    fake.on(CHAT, fake.reply_raw('{"id": "chatcmpl-5293", "choi'))
    with pytest.raises(RetryableProviderError, match="not valid JSON"):
        await provider.complete(MODEL, ChatRequest("hi"))


async def test_never_answering_server_leaves_the_call_pending(fake, provider):
    fake.on(IAM, fake.reply(token()))
    fake.on(CHAT, fake.hang)
    await fake.assert_never_answered(provider.complete(MODEL, ChatRequest("hi")))


async def test_dropped_connection_is_retryable(fake, provider):
    fake.on(IAM, fake.reply(token()))
    fake.on(CHAT, fake.drop_midway(b'{"id": "chatcmpl-5293", "model_id": "ibm/gra'))
    with pytest.raises(RetryableProviderError, match="connection broke"):
        await provider.complete(MODEL, ChatRequest("hi"))


async def test_missing_configuration(http_session, no_provider_env):
    provider = WatsonxProvider(Settings(), http_session)
    expected = "watsonx.ai is not configured: set WATSONX_URL, WATSONX_APIKEY, WATSONX_PROJECT_ID."
    assert provider.missing_configuration(MODEL) == expected
    with pytest.raises(ProviderNotConfiguredError, match="WATSONX_URL, WATSONX_APIKEY"):
        await provider.complete(MODEL, ChatRequest("hi"))


def test_ready_when_configured(settings, http_session):
    assert WatsonxProvider(settings, http_session).missing_configuration(MODEL) is None
    assert WatsonxProvider(settings, http_session).iam_url.endswith(IAM)
