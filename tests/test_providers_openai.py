"""The OpenAI-compatible provider against a fake server speaking ``/v1/chat/completions``."""

from __future__ import annotations

import pytest

from batchexec.catalog import ModelSpec
from batchexec.config import Settings
from batchexec.errors import FatalProviderError, RetryableProviderError
from batchexec.providers.base import ChatOptions, ChatRequest, Completion, Turn
from batchexec.providers.openai import OpenAIProvider, discover_models

pytest_plugins = ["tests.providerfakes"]

KEY = "sk-proj-test-5f2a9c0b7d1e"
CHAT = "/v1/chat/completions"
MODEL = ModelSpec(name="GPT mini", provider="openai", model_id="gpt-4o-mini")

# Bodies as OpenAI documents them (see notes/providers-wire.md).
COMPLETION = {
    "id": "chatcmpl-123",
    "object": "chat.completion",
    "created": 1677652288,
    "model": "gpt-4o-mini",
    "system_fingerprint": "fp_44709d6fcb",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Hello there.", "refusal": None},
            "logprobs": None,
            "finish_reason": "stop",
        }
    ],
    "usage": {"prompt_tokens": 9, "completion_tokens": 12, "total_tokens": 21},
}
BAD_KEY = {
    "error": {
        "message": "Incorrect API key provided: sk-proj-***1e. You can find your API key at "
        "https://platform.openai.com/account/api-keys.",
        "type": "invalid_request_error",
        "param": None,
        "code": "invalid_api_key",
    }
}
RATE_LIMITED = {
    "error": {
        "message": "Rate limit reached for gpt-4o-mini on tokens per min (TPM). "
        "Please try again in 644ms.",
        "type": "tokens",
        "param": None,
        "code": "rate_limit_exceeded",
    }
}
NO_QUOTA = {
    "error": {
        "message": "You exceeded your current quota, please check your plan and billing details.",
        "type": "insufficient_quota",
        "param": None,
        "code": "insufficient_quota",
    }
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


@pytest.fixture
def settings(fake, no_provider_env):
    return Settings(openai_base_url=fake.url("/v1"))


@pytest.fixture
def provider(settings, http_session):
    return OpenAIProvider(settings, http_session)


@pytest.fixture
def with_key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)


async def test_success_sends_the_documented_request(fake, provider, with_key):
    fake.on(CHAT, fake.reply(COMPLETION))
    request = ChatRequest("Say hello.", system_prompt="Be brief.", params={"temperature": 0.2})
    completion = await provider.complete(MODEL, request)
    assert completion == Completion("Hello there.", prompt_tokens=9, completion_tokens=12)
    (seen,) = fake.seen(CHAT)
    assert seen.method == "POST"
    assert seen.headers["Authorization"] == f"Bearer {KEY}"
    assert seen.headers["Content-Type"] == "application/json"
    assert seen.json() == {
        "model": "gpt-4o-mini",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Say hello."},
        ],
        "temperature": 0.2,
    }


async def test_history_and_every_option_go_on_under_openais_names(fake, provider):
    fake.on(CHAT, fake.reply(COMPLETION))
    request = ChatRequest(
        "Another one?", system_prompt="Be brief.", history=HISTORY, options=EVERY_OPTION
    )
    await provider.complete(MODEL, request)
    assert fake.seen(CHAT)[0].json() == {
        "model": "gpt-4o-mini",
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
    fake.on(CHAT, fake.reply(COMPLETION))
    params = {
        "temperature": 1.0,
        "max_tokens": 999,
        "stop": ["END"],
        "response_format": {"type": "json_object"},
        "frequency_penalty": 0.5,
    }
    # Falsy values are set all the same: zero, an empty list, plain text.
    options = ChatOptions(temperature=0.0, max_tokens=10, stop=(), response_format={"type": "text"})
    await provider.complete(MODEL, ChatRequest("hi", params=params, options=options))
    assert fake.seen(CHAT)[0].json() == {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "hi"}],
        "temperature": 0.0,
        "max_tokens": 10,
        "stop": [],
        "response_format": {"type": "text"},
        "frequency_penalty": 0.5,
    }


async def test_max_tokens_takes_the_name_the_catalog_gives_it(fake, provider):
    fake.on(CHAT, fake.reply(COMPLETION))
    request = ChatRequest(
        "hi", params={"max_completion_tokens": 999}, options=ChatOptions(max_tokens=10)
    )
    await provider.complete(MODEL, request)
    body = fake.seen(CHAT)[0].json()
    assert body["max_completion_tokens"] == 10
    assert "max_tokens" not in body


def test_unsupported_refuses_nothing(provider):
    assert provider.unsupported(EVERY_OPTION) == []
    # The server judges what it takes: vLLM, for one, has types of its own.
    assert provider.unsupported(ChatOptions(response_format={"type": "structural_tag"})) == []


async def test_no_key_sends_no_authorization_and_usage_may_be_missing(fake, provider):
    body = {**COMPLETION, "usage": None}
    fake.on(CHAT, fake.reply(body))
    completion = await provider.complete(MODEL, ChatRequest("hi"))
    assert completion == Completion("Hello there.")
    (seen,) = fake.seen(CHAT)
    assert "Authorization" not in seen.headers
    assert seen.json()["messages"] == [{"role": "user", "content": "hi"}]


async def test_model_base_url_and_own_key_env(fake, http_session, no_provider_env, monkeypatch):
    monkeypatch.setenv("LOCAL_KEY", "local-secret")
    provider = OpenAIProvider(Settings(), http_session)
    model = ModelSpec(
        name="local", provider="openai", base_url=fake.url("/llm/v1/"), api_key_env="LOCAL_KEY"
    )
    fake.on("/llm/v1/chat/completions", fake.reply(COMPLETION))
    await provider.complete(model, ChatRequest("hi"))
    (seen,) = fake.seen("/llm/v1/chat/completions")
    assert seen.headers["Authorization"] == "Bearer local-secret"
    assert seen.json()["model"] == "local"


def test_missing_configuration(http_session, no_provider_env, monkeypatch):
    official = OpenAIProvider(Settings(), http_session)
    assert (
        official.missing_configuration(MODEL) == "Model 'GPT mini' needs OPENAI_API_KEY to be set."
    )
    local = OpenAIProvider(Settings(openai_base_url="http://127.0.0.1:8000/v1"), http_session)
    assert local.missing_configuration(MODEL) is None
    keyed = MODEL.model_copy(update={"api_key_env": "LOCAL_KEY"})
    assert local.missing_configuration(keyed) == "Model 'GPT mini' needs LOCAL_KEY to be set."
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    assert official.missing_configuration(MODEL) is None


async def test_rate_limit_honours_retry_after_ms(fake, provider, with_key):
    headers = {"retry-after-ms": "644", "Retry-After": "1"}
    fake.on(CHAT, fake.reply(RATE_LIMITED, status=429, headers=headers))
    with pytest.raises(RetryableProviderError) as caught:
        await provider.complete(MODEL, ChatRequest("hi"))
    assert caught.value.retry_after_s == pytest.approx(0.644)
    assert str(caught.value).startswith("OpenAI-compatible server: Rate limit reached")
    assert str(caught.value).endswith("(HTTP 429)")


async def test_rate_limit_with_retry_after_seconds(fake, provider):
    fake.on(CHAT, fake.reply(RATE_LIMITED, status=429, headers={"Retry-After": "20"}))
    with pytest.raises(RetryableProviderError) as caught:
        await provider.complete(MODEL, ChatRequest("hi"))
    assert caught.value.retry_after_s == 20.0


async def test_exhausted_quota_is_fatal(fake, provider, with_key):
    fake.on(CHAT, fake.reply(NO_QUOTA, status=429, headers={"Retry-After": "20"}))
    with pytest.raises(FatalProviderError, match="You exceeded your current quota"):
        await provider.complete(MODEL, ChatRequest("hi"))


async def test_server_error_is_retryable(fake, provider):
    error = {"error": {"message": "The server had an error.", "type": "server_error"}}
    fake.on(CHAT, fake.reply(error, status=500))
    with pytest.raises(RetryableProviderError) as caught:
        await provider.complete(MODEL, ChatRequest("hi"))
    assert str(caught.value) == "OpenAI-compatible server: The server had an error. (HTTP 500)"


async def test_bad_key_is_fatal_with_the_servers_message(fake, provider, with_key):
    fake.on(CHAT, fake.reply(BAD_KEY, status=401))
    with pytest.raises(FatalProviderError) as caught:
        await provider.complete(MODEL, ChatRequest("hi"))
    assert "Incorrect API key provided: sk-proj-***1e." in str(caught.value)
    assert caught.value.status == 401
    assert KEY not in str(caught.value)


@pytest.mark.parametrize(
    ("status", "body", "message"),
    [
        (401, {"error": "Unauthorized"}, "Unauthorized"),
        (
            404,
            {"object": "error", "message": "The model `x` does not exist.", "code": 404},
            "The model `x` does not exist.",
        ),
        (
            404,
            {"error": {"message": "The model `x` does not exist.", "type": "NotFoundError"}},
            "The model `x` does not exist.",
        ),
    ],
    ids=["vllm-401", "vllm-flat", "vllm-nested"],
)
async def test_vllm_error_shapes(fake, provider, status, body, message):
    fake.on(CHAT, fake.reply(body, status=status))
    with pytest.raises(FatalProviderError) as caught:
        await provider.complete(MODEL, ChatRequest("hi"))
    assert str(caught.value) == f"OpenAI-compatible server: {message} (HTTP {status})"


async def test_malformed_success_is_retryable(fake, provider):
    fake.on(CHAT, fake.reply_raw('{"id": "chatcmpl-123", "choices": [{"message": {"con'))
    with pytest.raises(RetryableProviderError, match="not valid JSON"):
        await provider.complete(MODEL, ChatRequest("hi"))


async def test_success_without_choices_is_retryable(fake, provider):
    fake.on(CHAT, fake.reply({"id": "chatcmpl-123", "choices": []}))
    with pytest.raises(RetryableProviderError, match=r"has no choices\[0\]\.message\.content"):
        await provider.complete(MODEL, ChatRequest("hi"))


async def test_refusal_is_fatal(fake, provider):
    message = {"role": "assistant", "content": None, "refusal": "I can't help with that."}
    body = {**COMPLETION, "choices": [{"index": 0, "message": message, "finish_reason": "stop"}]}
    fake.on(CHAT, fake.reply(body))
    with pytest.raises(FatalProviderError, match=r"the model refused: I can't help with that\."):
        await provider.complete(MODEL, ChatRequest("hi"))


async def test_never_answering_server_leaves_the_call_pending(fake, provider):
    fake.on(CHAT, fake.hang)
    await fake.assert_never_answered(provider.complete(MODEL, ChatRequest("hi")))


async def test_dropped_connection_is_retryable(fake, provider):
    fake.on(CHAT, fake.drop_midway(b'{"id": "chatcmpl-123", "choices": [{"index": 0, '))
    with pytest.raises(RetryableProviderError, match="connection broke"):
        await provider.complete(MODEL, ChatRequest("hi"))


async def test_discover_models(fake, settings, http_session, with_key):
    listed = {
        "object": "list",
        "data": [
            {"id": "llama3.2:latest", "object": "model", "created": 1, "owned_by": "library"},
            {"id": "qwen2.5:7b", "object": "model", "created": 2, "owned_by": "library"},
        ],
    }
    fake.on("/v1/models", fake.reply(listed))
    models = await discover_models(settings, http_session)
    assert [(m.name, m.provider, m.model_id) for m in models] == [
        ("llama3.2:latest", "openai", "llama3.2:latest"),
        ("qwen2.5:7b", "openai", "qwen2.5:7b"),
    ]
    assert models[0].description == "listed by OPENAI_BASE_URL"
    (seen,) = fake.seen("/v1/models")
    assert seen.method == "GET"
    assert seen.headers["Authorization"] == f"Bearer {KEY}"


async def test_discover_models_failures(fake, settings, http_session, no_provider_env):
    assert await discover_models(Settings(), http_session) == []
    fake.on("/v1/models", fake.reply({"error": "Unauthorized"}, status=401))
    with pytest.raises(FatalProviderError, match="Unauthorized"):
        await discover_models(settings, http_session)
    fake.on("/v1/models", fake.reply({"object": "list"}))
    with pytest.raises(RetryableProviderError, match="has no data"):
        await discover_models(settings, http_session)
