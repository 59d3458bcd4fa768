"""The Anthropic provider against a fake server speaking ``/v1/messages``."""

from __future__ import annotations

from dataclasses import replace

import pytest

from batchexec.catalog import ModelSpec
from batchexec.config import Settings
from batchexec.errors import FatalProviderError, ProviderNotConfiguredError, RetryableProviderError
from batchexec.providers.anthropic import AnthropicProvider
from batchexec.providers.base import ChatOptions, ChatRequest, Completion, Turn

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
#: Every option the Messages API has: all but a seed.
EVERY_OPTION = ChatOptions(
    temperature=0.3, max_tokens=50, top_p=0.9, stop=("\n\n",), response_format=JSON_SCHEMA
)


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


async def test_history_and_every_option_become_messages_api_fields(fake, provider, model):
    fake.on(MESSAGES, fake.reply(MESSAGE))
    request = ChatRequest(
        "Another one?", system_prompt="Be brief.", history=HISTORY, options=EVERY_OPTION
    )
    await provider.complete(model, request)
    assert fake.seen(MESSAGES)[0].json() == {
        "model": "claude-sonnet-4-5",
        "max_tokens": 50,
        "system": "Be brief.",
        "messages": [
            {"role": "user", "content": "Name a colour."},
            {"role": "assistant", "content": "Blue."},
            {"role": "user", "content": "Another one?"},
        ],
        "temperature": 0.3,
        "top_p": 0.9,
        "stop_sequences": ["\n\n"],
        "output_config": {"format": {"type": "json_schema", "schema": SCHEMA}},
    }


async def test_set_options_win_over_the_catalogs_params(fake, provider, model):
    fake.on(MESSAGES, fake.reply(MESSAGE))
    params = {
        "max_tokens": 4096,
        "temperature": 1.0,
        "stop_sequences": ["END"],
        "top_k": 5,
        "output_config": {"effort": "low", "format": {"type": "json_schema", "schema": {}}},
    }
    options = ChatOptions(temperature=0.0, max_tokens=10, stop=(), response_format=JSON_SCHEMA)
    await provider.complete(model, ChatRequest("hi", params=params, options=options))
    assert fake.seen(MESSAGES)[0].json() == {
        "model": "claude-sonnet-4-5",
        "max_tokens": 10,
        "messages": [{"role": "user", "content": "hi"}],
        "temperature": 0.0,
        "stop_sequences": [],
        "top_k": 5,
        # The catalog's effort stays; only the format is the option's.
        "output_config": {"effort": "low", "format": {"type": "json_schema", "schema": SCHEMA}},
    }


async def test_text_response_format_drops_the_catalogs_format(fake, provider, model):
    fake.on(MESSAGES, fake.reply(MESSAGE))
    text = ChatOptions(response_format={"type": "text"})
    catalog_format = {"format": {"type": "json_schema", "schema": SCHEMA}}
    await provider.complete(
        model, ChatRequest("hi", params={"output_config": catalog_format}, options=text)
    )
    await provider.complete(
        model,
        ChatRequest(
            "hi", params={"output_config": {**catalog_format, "effort": "high"}}, options=text
        ),
    )
    first, second = (seen.json() for seen in fake.seen(MESSAGES))
    assert "output_config" not in first
    assert second["output_config"] == {"effort": "high"}


def test_unsupported_refuses_a_seed_and_json_without_a_schema(provider):
    assert provider.unsupported(EVERY_OPTION) == []
    assert provider.unsupported(replace(EVERY_OPTION, seed=7)) == [
        "seed: Anthropic's Messages API has no seed"
    ]
    assert provider.unsupported(ChatOptions(seed=0, response_format={"type": "json_object"})) == [
        "seed: Anthropic's Messages API has no seed",
        "response_format: Anthropic's Messages API constrains output only to a JSON schema; "
        "give json_schema rather than json_object",
    ]
    assert provider.unsupported(ChatOptions(response_format={"type": "xml"})) == [
        'response_format: Anthropic\'s Messages API takes type text or json_schema, not "xml"'
    ]
    no_schema = {"type": "json_schema", "json_schema": {"name": "colour"}}
    assert provider.unsupported(ChatOptions(response_format=no_schema)) == [
        "response_format: Anthropic's Messages API needs json_schema.schema, a JSON Schema object"
    ]


async def test_a_refused_option_is_never_sent(fake, provider, model):
    fake.on(MESSAGES, fake.reply(MESSAGE))
    with pytest.raises(FatalProviderError) as caught:
        await provider.complete(model, ChatRequest("hi", options=ChatOptions(seed=7)))
    assert str(caught.value) == "Not sent: seed: Anthropic's Messages API has no seed."
    assert fake.seen(MESSAGES) == []


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
