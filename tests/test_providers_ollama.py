"""The Ollama provider against a fake server speaking the native ``/api/chat``."""

from __future__ import annotations

import pytest

from batchexec.catalog import ModelSpec
from batchexec.config import Settings
from batchexec.errors import FatalProviderError, RetryableProviderError
from batchexec.providers.base import ChatOptions, ChatRequest, Completion, Turn
from batchexec.providers.ollama import OllamaProvider, host_url

pytest_plugins = ["tests.providerfakes"]

CHAT = "/api/chat"
MODEL = ModelSpec(name="llama", provider="ollama", model_id="llama3.2")

RESPONSE = {
    "model": "llama3.2",
    "created_at": "2023-12-12T14:13:43.416799Z",
    "message": {"role": "assistant", "content": "Hello! How are you today?"},
    "done": True,
    "done_reason": "stop",
    "total_duration": 5191566416,
    "load_duration": 2154458,
    "prompt_eval_count": 26,
    "prompt_eval_duration": 383809000,
    "eval_count": 298,
    "eval_duration": 4799921000,
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
def provider(fake, no_provider_env, http_session):
    # OLLAMA_HOST is usually written without a scheme.
    host = fake.url().removeprefix("http://")
    return OllamaProvider(Settings(ollama_host=host), http_session)


async def test_success_sends_the_documented_request(fake, provider):
    fake.on(CHAT, fake.reply(RESPONSE))
    request = ChatRequest(
        "why is the sky blue?",
        system_prompt="Be brief.",
        params={"temperature": 0.7, "num_predict": 256, "keep_alive": "5m", "format": "json"},
    )
    completion = await provider.complete(MODEL, request)
    assert completion == Completion(
        "Hello! How are you today?", prompt_tokens=26, completion_tokens=298
    )
    (seen,) = fake.seen(CHAT)
    assert seen.method == "POST"
    assert "Authorization" not in seen.headers
    assert seen.json() == {
        "model": "llama3.2",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "why is the sky blue?"},
        ],
        "stream": False,
        "options": {"temperature": 0.7, "num_predict": 256},
        "keep_alive": "5m",
        "format": "json",
    }


async def test_history_and_every_option_become_ollama_settings(fake, provider):
    fake.on(CHAT, fake.reply(RESPONSE))
    request = ChatRequest(
        "Another one?", system_prompt="Be brief.", history=HISTORY, options=EVERY_OPTION
    )
    await provider.complete(MODEL, request)
    assert fake.seen(CHAT)[0].json() == {
        "model": "llama3.2",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Name a colour."},
            {"role": "assistant", "content": "Blue."},
            {"role": "user", "content": "Another one?"},
        ],
        "stream": False,
        "options": {
            "temperature": 0.3,
            "num_predict": 50,
            "top_p": 0.9,
            "stop": ["\n\n"],
            "seed": 7,
        },
        "format": SCHEMA,
    }


async def test_set_options_win_over_the_catalogs_params(fake, provider):
    fake.on(CHAT, fake.reply(RESPONSE))
    params = {
        "temperature": 0.7,
        "num_predict": 256,
        "stop": ["END"],
        "num_ctx": 4096,
        "format": "json",
        "keep_alive": "5m",
    }
    options = ChatOptions(temperature=0.0, max_tokens=10, response_format={"type": "text"})
    await provider.complete(MODEL, ChatRequest("hi", params=params, options=options))
    # Text is Ollama's default: the catalog's format goes, and none is sent.
    assert fake.seen(CHAT)[0].json() == {
        "model": "llama3.2",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": False,
        "options": {"temperature": 0.0, "num_predict": 10, "stop": ["END"], "num_ctx": 4096},
        "keep_alive": "5m",
    }


async def test_json_object_is_ollamas_json_format(fake, provider):
    fake.on(CHAT, fake.reply(RESPONSE))
    options = ChatOptions(response_format={"type": "json_object"})
    await provider.complete(MODEL, ChatRequest("hi", params={"format": SCHEMA}, options=options))
    assert fake.seen(CHAT)[0].json()["format"] == "json"


def test_unsupported_refuses_only_what_is_no_openai_response_format(provider):
    assert provider.unsupported(EVERY_OPTION) == []
    assert provider.unsupported(ChatOptions(response_format={"type": "regex"})) == [
        "response_format: Ollama's /api/chat takes type text, json_object or json_schema, "
        'not "regex"'
    ]
    no_schema = {"type": "json_schema", "json_schema": {"name": "colour", "schema": "{}"}}
    assert provider.unsupported(ChatOptions(response_format=no_schema)) == [
        "response_format: Ollama's /api/chat needs json_schema.schema, a JSON Schema object"
    ]


async def test_a_refused_option_is_never_sent(fake, provider):
    fake.on(CHAT, fake.reply(RESPONSE))
    bad = ChatOptions(response_format={"type": "regex"})
    with pytest.raises(FatalProviderError, match=r"^Not sent: response_format: "):
        await provider.complete(MODEL, ChatRequest("hi", options=bad))
    assert fake.seen(CHAT) == []


async def test_counts_may_be_absent(fake, provider):
    body = {k: v for k, v in RESPONSE.items() if k != "prompt_eval_count"}
    fake.on(CHAT, fake.reply(body))
    completion = await provider.complete(MODEL, ChatRequest("hi"))
    assert completion == Completion("Hello! How are you today?", completion_tokens=298)
    assert "options" not in fake.seen(CHAT)[0].json()


async def test_model_base_url_wins(fake, no_provider_env, http_session):
    provider = OllamaProvider(Settings(ollama_host="http://192.0.2.1:1"), http_session)
    fake.on(CHAT, fake.reply(RESPONSE))
    model = MODEL.model_copy(update={"base_url": fake.url("/")})
    assert (await provider.complete(model, ChatRequest("hi"))).text == "Hello! How are you today?"


@pytest.mark.parametrize(
    ("host", "url"),
    [
        ("127.0.0.1:11434", "http://127.0.0.1:11434"),
        ("0.0.0.0", "http://127.0.0.1:11434"),
        ("localhost", "http://localhost:11434"),
        ("myhost:8080", "http://myhost:8080"),
        (":11435", "http://127.0.0.1:11435"),
        ('"gpu-box"', "http://gpu-box:11434"),
        ("http://ollama.internal", "http://ollama.internal"),
        ("https://ollama.example.com/", "https://ollama.example.com"),
        ("https://example.com/ollama", "https://example.com/ollama"),
    ],
)
def test_host_url(host, url):
    assert host_url(host) == url


@pytest.mark.parametrize("host", ["http://", "http://[bad", "myhost:99999"])
def test_bad_host_is_fatal(host):
    with pytest.raises(FatalProviderError, match="not a valid address"):
        host_url(host)


async def test_unknown_model_is_fatal(fake, provider):
    body = {"error": 'model "llama3.2" not found, try pulling it first'}
    fake.on(CHAT, fake.reply(body, status=404))
    with pytest.raises(FatalProviderError) as caught:
        await provider.complete(MODEL, ChatRequest("hi"))
    assert str(caught.value) == (
        'Ollama: model "llama3.2" not found, try pulling it first (HTTP 404)'
    )


async def test_full_queue_is_retryable(fake, provider):
    body = {"error": "server busy, please try again.  maximum pending requests exceeded"}
    fake.on(CHAT, fake.reply(body, status=503, headers={"Retry-After": "3"}))
    with pytest.raises(RetryableProviderError) as caught:
        await provider.complete(MODEL, ChatRequest("hi"))
    assert caught.value.retry_after_s == 3.0
    assert "maximum pending requests exceeded" in str(caught.value)


async def test_rate_limit_is_retryable(fake, provider):
    fake.on(
        CHAT, fake.reply({"error": "too many requests"}, status=429, headers={"Retry-After": "5"})
    )
    with pytest.raises(RetryableProviderError) as caught:
        await provider.complete(MODEL, ChatRequest("hi"))
    assert caught.value.retry_after_s == 5.0


async def test_server_error_is_retryable(fake, provider):
    fake.on(CHAT, fake.reply({"error": "model requires more system memory"}, status=500))
    with pytest.raises(RetryableProviderError, match="more system memory"):
        await provider.complete(MODEL, ChatRequest("hi"))


async def test_unauthorized_is_fatal_with_ollamas_message(fake, provider):
    fake.on(CHAT, fake.reply({"error": "unauthorized"}, status=401))
    with pytest.raises(FatalProviderError) as caught:
        await provider.complete(MODEL, ChatRequest("hi"))
    assert str(caught.value) == "Ollama: unauthorized (HTTP 401)"


async def test_malformed_success_is_retryable(fake, provider):
    fake.on(CHAT, fake.reply_raw('{"model": "llama3.2", "message": {"role": "assis'))
    with pytest.raises(RetryableProviderError, match="not valid JSON"):
        await provider.complete(MODEL, ChatRequest("hi"))


async def test_success_without_message_is_retryable(fake, provider):
    fake.on(CHAT, fake.reply({"model": "llama3.2", "done": True}))
    with pytest.raises(RetryableProviderError, match=r"has no message\.content"):
        await provider.complete(MODEL, ChatRequest("hi"))


async def test_never_answering_server_leaves_the_call_pending(fake, provider):
    fake.on(CHAT, fake.hang)
    await fake.assert_never_answered(provider.complete(MODEL, ChatRequest("hi")))


async def test_dropped_connection_is_retryable(fake, provider):
    fake.on(CHAT, fake.drop_midway(b'{"model": "llama3.2", "created_at": "2023-12-12T14:13'))
    with pytest.raises(RetryableProviderError, match="connection broke"):
        await provider.complete(MODEL, ChatRequest("hi"))
