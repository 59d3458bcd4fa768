"""Log lines: JSON ones that name their batch, each failed row logged once, and no key shown."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import signal
import sys
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from aiohttp import web

from batchexec.api import API_KEY_HEADER, EXECUTE_BATCH
from batchexec.catalog import Catalog
from batchexec.logs import MASK, JSONFormatter, TextFormatter, bind_batch
from batchexec.serving import log_secrets
from batchexec.web.keys import ENGINE
from tests.helpers import (
    PROCESS_TIMEOUT_S,
    cli_process,
    finished,
    free_port,
    gated,
    owner_of,
    results,
    submit,
)

pytest_plugins = ["tests.providerfakes"]

JSONLines = Callable[[], list[dict[str, Any]]]
SECRET = "sk-leaky-9f8e7d6c5b4a"


@pytest.fixture
def json_lines() -> Iterator[JSONLines]:
    """What the ``batchexec`` loggers write from INFO up, each line parsed with ``json.loads``."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JSONFormatter())
    logger = logging.getLogger("batchexec")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield lambda: [json.loads(line) for line in stream.getvalue().splitlines()]
    logger.removeHandler(handler)
    logger.setLevel(level)


def record(message: str = "row 2 failed", *args: object, **extra: object) -> logging.LogRecord:
    """A WARNING of ``batchexec.engine``, with ``extra`` as its attributes."""
    fields = {"name": "batchexec.engine", "levelname": "WARNING", "levelno": logging.WARNING}
    return logging.makeLogRecord({**fields, "msg": message, "args": args, **extra})


def test_a_json_line_holds_the_record_and_the_batch_it_was_given():
    line = json.loads(JSONFormatter().format(record(batch_id="b-1", owner="fp-1")))
    assert line["level"] == "WARNING"
    assert line["logger"] == "batchexec.engine"
    assert line["message"] == "row 2 failed"
    assert (line["batch_id"], line["owner"]) == ("b-1", "fp-1")
    assert line["timestamp"].endswith("+00:00")
    assert "exception" not in line


def test_a_json_line_carries_the_exception_text():
    try:
        raise ValueError("bad value")
    except ValueError:
        error = record("it broke", exc_info=sys.exc_info())
    line = json.loads(JSONFormatter().format(error))
    assert line["exception"].startswith("Traceback")
    assert "ValueError: bad value" in line["exception"]


async def test_a_task_bound_to_a_batch_names_it_in_its_lines():
    formatter = JSONFormatter()

    async def in_batch() -> dict[str, Any]:
        bind_batch("b-2", "fp-2")
        line: dict[str, Any] = json.loads(formatter.format(record()))
        return line

    line = await asyncio.create_task(in_batch())
    assert (line["batch_id"], line["owner"]) == ("b-2", "fp-2")
    # Bound to that task only.
    assert "batch_id" not in json.loads(formatter.format(record()))


def test_both_formats_mask_the_secrets_they_are_given():
    leaky = record("key %s rejected", f"{SECRET}-and-more")
    try:
        raise RuntimeError(f"auth {SECRET}")
    except RuntimeError:
        leaky.exc_info = sys.exc_info()
    for formatter in (JSONFormatter([SECRET, "sk"]), TextFormatter([SECRET])):
        text = formatter.format(leaky)
        assert SECRET not in text
        assert f"{MASK}-and-more" in text


def test_log_secrets_are_the_api_keys_and_the_provider_keys(make_settings, monkeypatch, tmp_path):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai-1")
    monkeypatch.setenv("MY_KEY", "sk-mine-2")
    catalog = tmp_path / "keys.toml"
    catalog.write_text('[models."mine"]\nprovider = "openai"\napi_key_env = "MY_KEY"\n')
    settings = make_settings(models_path=catalog, integrations_api_keys="dev-only-token,k-3")
    secrets = log_secrets(settings, Catalog.load(catalog))
    assert sorted(secrets) == ["k-3", "sk-mine-2", "sk-openai-1"]


async def test_a_failed_row_is_logged_once_with_its_batch_and_error(make_client, json_lines):
    client = await make_client(integrations_api_keys="key-of-the-test-42")
    key = "key-of-the-test-42"
    invocation_id = await submit(
        client,
        [
            {"prompt": "hello", "model": "gated"},
            {"prompt": "fail: no", "model": "gated"},
            {"prompt": "then ${output.2}", "model": "gated"},
        ],
        key=key,
    )
    gated(client).open()
    await client.app[ENGINE].join(invocation_id)
    body = await results(client, invocation_id, key=key)
    assert [e["status"] for e in body["executions"]] == ["succeeded", "failed", "skipped"]

    lines = json_lines()
    failures = [line for line in lines if line["level"] == "WARNING"]
    assert len(failures) == 1, failures
    failure = failures[0]
    assert failure["batch_id"] == invocation_id
    assert failure["owner"] == owner_of(client.app, key)
    assert "execution 2" in failure["message"]
    assert "the model refused" in failure["message"]
    assert key not in json.dumps(lines)


async def test_a_provider_key_in_its_error_never_reaches_a_log_line(
    make_client, make_settings, monkeypatch, tmp_path, fake, json_lines
):
    async def echo_the_key(request: web.Request) -> web.Response:
        said = f"Incorrect API key provided: {request.headers['Authorization']}"
        return web.json_response({"error": {"message": said}}, status=401)

    fake.on("/v1/chat/completions", echo_the_key)
    monkeypatch.setenv("LEAKY_KEY", SECRET)
    catalog = tmp_path / "leaky.toml"
    catalog.write_text(
        f'[models."leaky"]\nprovider = "openai"\nbase_url = "{fake.url("/v1")}"\n'
        'api_key_env = "LEAKY_KEY"\n'
    )
    client = await make_client(make_settings(models_path=catalog))
    invocation_id = await submit(client, [{"prompt": "hi", "model": "leaky"}])
    body = await finished(client, invocation_id)

    assert fake.seen("/v1/chat/completions")[0].headers["Authorization"] == f"Bearer {SECRET}"
    assert body["executions"][0]["status"] == "failed"
    lines = json_lines()
    failures = [line for line in lines if line.get("batch_id") == invocation_id]
    assert len(failures) == 1
    assert f"Bearer {MASK}" in failures[0]["message"]
    assert SECRET not in json.dumps(lines)


def test_the_server_logs_json_lines_when_asked(tmp_path):
    port = free_port()
    key = "server-key-0123456789"
    env = {
        "LOG_FORMAT": "json",
        "INTEGRATIONS_API_KEYS": key,
        "PUBLIC_DIR": str(tmp_path / "public"),
        # echo answers with the prompt: a longer one fails its row.
        "MAX_RESULT_LENGTH": "5",
    }
    rows = [{"prompt": "hi", "model": "echo"}, {"prompt": "far too long", "model": "echo"}]
    with cli_process("serve", "--port", str(port), cwd=tmp_path, env=env) as process:
        assert process.stderr is not None
        lines: list[dict[str, Any]] = []
        for raw in process.stderr:
            lines.append(json.loads(raw))
            if "listening" in lines[-1]["message"]:
                break
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}{EXECUTE_BATCH}",
            data=json.dumps({"executions": rows}).encode(),
            headers={API_KEY_HEADER: key, "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            invocation_id = json.load(response)["invocationId"]
        for raw in process.stderr:
            lines.append(json.loads(raw))
            if lines[-1].get("batch_id") == invocation_id:
                break
        process.send_signal(signal.SIGTERM)
        lines.extend(json.loads(raw) for raw in process.stderr)
        assert process.wait(timeout=PROCESS_TIMEOUT_S) == 0

    failure = next(line for line in lines if line.get("batch_id") == invocation_id)
    assert failure["level"] == "WARNING"
    assert "MAX_RESULT_LENGTH" in failure["message"]
    assert {"timestamp", "level", "logger", "message"} <= failure.keys()
    assert not any(key in json.dumps(line) for line in lines)
