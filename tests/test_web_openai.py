"""A batch through the real app and the real ``openai`` provider, against a loopback server."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
from aiohttp import web

from batchexec.api import HEALTH, MODELS
from tests.helpers import AUTH, finished, submit

SECRET_KEY = "sk-test-never-show-me-4b1d"


def openai_compatible_server() -> tuple[web.Application, list[dict[str, Any]]]:
    """Answers ``ANSWER[<last user message>]``; model ``busy`` is always rate limited."""
    seen: list[dict[str, Any]] = []

    async def chat(request: web.Request) -> web.Response:
        body = await request.json()
        seen.append({"body": body, "authorization": request.headers.get("Authorization")})
        if body["model"] == "busy":
            error = {"message": "Rate limit reached for busy.", "type": "requests"}
            return web.json_response(
                {"error": {**error, "code": "rate_limit_exceeded", "param": None}},
                status=429,
                headers={"Retry-After": "0"},
            )
        if body["model"] == "locked":
            error = {"message": f"Incorrect API key provided: {SECRET_KEY}.", "type": "x"}
            return web.json_response({"error": error}, status=401)
        prompt = body["messages"][-1]["content"]
        return web.json_response(
            {
                "id": "chatcmpl-1",
                "object": "chat.completion",
                "model": body["model"],
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": f"ANSWER[{prompt}]"},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10},
            }
        )

    async def models(request: web.Request) -> web.Response:
        return web.json_response(
            {"object": "list", "data": [{"id": "listed-model", "object": "model"}]}
        )

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/v1/models", models)
    return app, seen


@pytest.fixture
async def upstream(aiohttp_server):
    app, seen = openai_compatible_server()
    server = await aiohttp_server(app)
    return str(server.make_url("/v1")), seen


@pytest.fixture
async def client(make_client, make_settings, tmp_path, upstream):
    base_url, _ = upstream
    catalog = tmp_path / "openai.toml"
    catalog.write_text(
        f"""
[models."local"]
provider = "openai"
base_url = "{base_url}"
model_id = "llama3.1:8b"
system_prompt = "Be brief."
params = {{ temperature = 0.2 }}

[models."busy"]
provider = "openai"
base_url = "{base_url}"

[models."locked"]
provider = "openai"
base_url = "{base_url}"
api_key_env = "LOCKED_KEY"
"""
    )
    return await make_client(
        make_settings(models_path=catalog, max_retries=2, execution_timeout_s=30)
    )


async def test_answers_and_chains_through_a_real_openai_server(client, upstream):
    _, seen = upstream
    invocation_id = await submit(
        client,
        [
            {"prompt": "Name a river.", "model": "local"},
            {"prompt": "Where is ${output.1}?", "model": "local"},
        ],
    )
    body = await finished(client, invocation_id)
    assert [e["result"] for e in body["executions"]] == [
        "ANSWER[Name a river.]",
        "ANSWER[Where is ANSWER[Name a river.]?]",
    ]
    assert body["usage"] == {
        "prompt_tokens": 14,
        "completion_tokens": 6,
        "cost": None,
        "currency": "USD",
        "uncosted": 2,
        "models": {
            "local": {"prompt_tokens": 14, "completion_tokens": 6, "cost": None, "uncosted": 2}
        },
    }
    assert body["executions"][0]["prompt_tokens"] == 7
    first = seen[0]["body"]
    assert first["model"] == "llama3.1:8b"
    assert first["temperature"] == 0.2
    assert first["messages"][0] == {"role": "system", "content": "Be brief."}
    assert seen[0]["authorization"] is None


async def test_rate_limited_model_is_retried_then_fails_with_the_server_message(client, upstream):
    _, seen = upstream
    body = await finished(client, await submit(client, [{"prompt": "hi", "model": "busy"}]))
    execution = body["executions"][0]
    assert execution["status"] == "failed"
    assert execution["attempts"] == 3
    assert len(seen) == 3
    assert "Rate limit reached for busy." in execution["error"]
    assert "HTTP 429" in execution["error"]
    assert body["status"] == "completed"


async def test_secrets_never_reach_responses_or_logs(client, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("LOCKED_KEY", SECRET_KEY)
    body = await finished(client, await submit(client, [{"prompt": "hi", "model": "locked"}]))
    assert body["executions"][0]["status"] == "failed"
    assert "HTTP 401" in body["executions"][0]["error"]
    assert SECRET_KEY not in json.dumps(body)
    assert SECRET_KEY not in caplog.text
    models = await client.get(MODELS, headers=AUTH)
    assert SECRET_KEY not in await models.text()


async def test_openai_base_url_models_join_the_catalog(make_client, make_settings, upstream):
    base_url, _ = upstream
    client = await make_client(make_settings(openai_base_url=base_url))
    response = await client.get(MODELS, headers=AUTH)
    names = {model["name"]: model for model in (await response.json())["models"]}
    assert names["listed-model"]["provider"] == "openai"
    assert names["listed-model"]["configured"] is True


async def test_failed_model_listing_only_warns(make_client, make_settings, caplog):
    client = await make_client(make_settings(openai_base_url="http://127.0.0.1:9/v1"))
    assert "could not list its models" in caplog.text
    assert (await client.get(HEALTH)).status == 200
