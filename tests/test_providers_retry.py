"""Each provider through the engine's retry path: a 500, then the answer."""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass
from typing import Any

import pytest

from batchexec.catalog import ModelSpec
from batchexec.config import Settings
from batchexec.providers import build_providers
from batchexec.providers.base import ChatRequest
from batchexec.retry import Attempts, RetryPolicy, call_with_retries

pytest_plugins = ["tests.providerfakes"]


@dataclass(frozen=True)
class Case:
    provider: str
    path: str
    answer: dict[str, Any]
    server_error: dict[str, Any]


CASES = [
    Case(
        "openai",
        "/v1/chat/completions",
        {
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "hello"}}],
            "usage": {"prompt_tokens": 4, "completion_tokens": 1},
        },
        {"error": {"message": "The server had an error", "type": "server_error"}},
    ),
    Case(
        "anthropic",
        "/v1/messages",
        {
            "id": "msg_01",
            "type": "message",
            "role": "assistant",
            "content": [{"type": "text", "text": "hello"}],
            "stop_reason": "end_turn",
            "usage": {"input_tokens": 4, "output_tokens": 1},
        },
        {"type": "error", "error": {"type": "api_error", "message": "Internal server error"}},
    ),
    Case(
        "ollama",
        "/api/chat",
        {
            "model": "llama3.1:8b",
            "message": {"role": "assistant", "content": "hello"},
            "done": True,
            "prompt_eval_count": 4,
            "eval_count": 1,
        },
        {"error": "llama runner process has terminated"},
    ),
    Case(
        "watsonx",
        "/ml/v1/text/chat",
        {
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "hello"}}],
            "usage": {"prompt_tokens": 4, "completion_tokens": 1},
        },
        {"errors": [{"code": "internal_error", "message": "Internal error"}], "status_code": 500},
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[case.provider for case in CASES])
async def test_a_server_error_then_the_answer(
    case, fake, http_session, no_provider_env, monkeypatch
):
    base = fake.url("").rstrip("/")
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-test")
    monkeypatch.setenv("WATSONX_APIKEY", "ibm-test")
    monkeypatch.setenv("WATSONX_IAM_URL", f"{base}/identity/token")
    fake.on(
        "/identity/token",
        fake.reply({"access_token": "t", "token_type": "Bearer", "expires_in": 3600}),
    )
    fake.on(case.path, fake.reply(case.server_error, status=500), fake.reply(case.answer))
    settings = Settings(_env_file=None, watsonx_url=base, watsonx_project_id="project-1")
    provider = build_providers(settings, http_session)[case.provider]
    base_url = f"{base}/v1" if case.provider == "openai" else base
    model = ModelSpec(
        name="m",
        provider=case.provider,
        model_id="some-model",
        base_url=None if case.provider == "watsonx" else base_url,
    )
    attempts = Attempts()
    completion = await call_with_retries(
        lambda: provider.complete(model, ChatRequest(prompt="hi")),
        RetryPolicy(max_retries=2, base_delay_s=0),
        attempts=attempts,
        deadline=asyncio.get_running_loop().time() + 30,
        rng=random.Random(0),
    )
    assert completion.text == "hello"
    assert (completion.prompt_tokens, completion.completion_tokens) == (4, 1)
    assert attempts.count == 2
    assert len(fake.seen(case.path)) == 2
