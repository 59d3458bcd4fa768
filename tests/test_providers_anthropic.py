"""The Anthropic provider against a fake server speaking ``/v1/messages``."""

from __future__ import annotations

import pytest

from batchexec.catalog import ModelSpec
from batchexec.config import Settings
from batchexec.errors import FatalProviderError, ProviderNotConfiguredError, RetryableProviderError
from batchexec.providers.anthropic import AnthropicProvider
from batchexec.providers.base import ChatRequest, Completion

pytest_plugins = ["tests.providerfakes"]

KEY = "sk-ant-api03-test-b81f6a"
MESSAGES = "/v1/messages"

MESSAGE = {
    "id": "msg_013Zva2CMHLNnXjNJJKqJ2EF",
    "type": "message",
    "role": "assistant",
    "model": "claude-sonnet-4-5",
    "content": [
        {"type": "thinking", "thinking": "Short answer.", "signature": "abc"},
        {"type": "text", "text": "Hi! "},
        {"type": "text", "text": "How can I help?"},
    ],
    "stop_reason": "end_turn",
    "stop_sequence": None,
    "usage": {
        "input_tokens": 12,
        "output_tokens": 6,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
    },
}


def error(kind, message):
    return {
        "type": "error",
        "error": {"type": kind, "message": message},
        "request_id": "req_011CSLsW7mFqvHHnzrKdKjAE",
    }


@pytest.fixture
def model(fake):
    return ModelSpec(
        name="Claude Sonnet",
        provider="anthropic",
        model_id="claude-sonnet-4-5",
        base_url=fake.url(),
    )


@pytest.fixture
def provider(no_provider_env, monkeypatch, http_session):
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
    return AnthropicProvider(Settings(), http_session)


async def test_success_sends_the_documented_request(fake, provider, model):
    fake.on(MESSAGES, fake.reply(MESSAGE))
    request = ChatRequest("Hello", system_prompt="You are terse.", params={"temperature": 0.5})
    completion = await provider.complete(model, request)
    assert completion == Completion("Hi! How can I help?", prompt_tokens=12, completion_tokens=6)
    (seen,) = fake.seen(MESSAGES)
    assert seen.method == "POST"
    assert seen.headers["x-api-key"] == KEY
    assert seen.headers["anthropic-version"] == "2023-06-01"
    assert seen.headers["Content-Type"] == "application/json"
    assert "Authorization" not in seen.headers
    assert seen.json() == {
        "model": "claude-sonnet-4-5",
        "max_tokens": 1024,
        "system": "You are terse.",
        "messages": [{"role": "user", "content": "Hello"}],
        "temperature": 0.5,
    }


async def test_params_override_max_tokens(fake, provider, model):
    fake.on(MESSAGES, fake.reply(MESSAGE))
    await provider.complete(model, ChatRequest("Hello", params={"max_tokens": 64}))
    body = fake.seen(MESSAGES)[0].json()
    assert body["max_tokens"] == 64
    assert "system" not in body


def test_missing_configuration(no_provider_env, http_session):
    provider = AnthropicProvider(Settings(), http_session)
    model = ModelSpec(name="claude", provider="anthropic")
    assert (
        provider.missing_configuration(model) == "Model 'claude' needs ANTHROPIC_API_KEY to be set."
    )
    own = model.model_copy(update={"api_key_env": "TEAM_ANTHROPIC_KEY"})
    assert provider.missing_configuration(own) == (
        "Model 'claude' needs TEAM_ANTHROPIC_KEY to be set."
    )


async def test_no_key_is_not_configured(no_provider_env, http_session, model):
    provider = AnthropicProvider(Settings(), http_session)
    with pytest.raises(ProviderNotConfiguredError, match="ANTHROPIC_API_KEY"):
        await provider.complete(model, ChatRequest("hi"))


async def test_rate_limit_is_retryable_after_the_wait(fake, provider, model):
    body = error(
        "rate_limit_error", "This request would exceed the rate limit for your organization."
    )
    fake.on(MESSAGES, fake.reply(body, status=429, headers={"retry-after": "12"}))
    with pytest.raises(RetryableProviderError) as caught:
        await provider.complete(model, ChatRequest("hi"))
    assert caught.value.retry_after_s == 12.0
    assert str(caught.value) == (
        "Anthropic: This request would exceed the rate limit for your organization. (HTTP 429)"
    )


async def test_spend_limit_is_fatal(fake, provider, model):
    body = error("rate_limit_error", "You have reached your monthly spend limit.")
    body["error"]["details"] = {"error_code": "enforced_spend_limit_reached"}
    fake.on(MESSAGES, fake.reply(body, status=429, headers={"retry-after": "12"}))
    with pytest.raises(FatalProviderError, match="monthly spend limit"):
        await provider.complete(model, ChatRequest("hi"))


@pytest.mark.parametrize(("status", "kind"), [(500, "api_error"), (529, "overloaded_error")])
async def test_server_errors_are_retryable(fake, provider, model, status, kind):
    fake.on(MESSAGES, fake.reply(error(kind, "Overloaded"), status=status))
    with pytest.raises(RetryableProviderError) as caught:
        await provider.complete(model, ChatRequest("hi"))
    assert str(caught.value) == f"Anthropic: Overloaded (HTTP {status})"


async def test_bad_key_is_fatal_with_anthropics_message(fake, provider, model):
    fake.on(MESSAGES, fake.reply(error("authentication_error", "invalid x-api-key"), status=401))
    with pytest.raises(FatalProviderError) as caught:
        await provider.complete(model, ChatRequest("hi"))
    assert str(caught.value) == "Anthropic: invalid x-api-key (HTTP 401)"
    assert KEY not in str(caught.value)


async def test_refusal_is_fatal(fake, provider, model):
    fake.on(MESSAGES, fake.reply({**MESSAGE, "content": [], "stop_reason": "refusal"}))
    with pytest.raises(FatalProviderError, match="declined to answer"):
        await provider.complete(model, ChatRequest("hi"))


async def test_malformed_success_is_retryable(fake, provider, model):
    fake.on(MESSAGES, fake.reply_raw('{"id": "msg_01", "type": "message", "content": [{"ty'))
    with pytest.raises(RetryableProviderError, match="not valid JSON"):
        await provider.complete(model, ChatRequest("hi"))


async def test_success_without_content_is_retryable(fake, provider, model):
    fake.on(MESSAGES, fake.reply({"id": "msg_01", "type": "message"}))
    with pytest.raises(RetryableProviderError, match="has no content"):
        await provider.complete(model, ChatRequest("hi"))


async def test_never_answering_server_leaves_the_call_pending(fake, provider, model):
    fake.on(MESSAGES, fake.hang)
    await fake.assert_never_answered(provider.complete(model, ChatRequest("hi")))


async def test_dropped_connection_is_retryable(fake, provider, model):
    fake.on(MESSAGES, fake.drop_midway(b'{"id": "msg_013Zva2CMHLNnXjNJJKqJ2EF", "type": "mes'))
    with pytest.raises(RetryableProviderError, match="connection broke"):
        await provider.complete(model, ChatRequest("hi"))
