"""The answer cache: the same request from the same key answered again without a call."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from batchexec.answer_cache import AnswerCache
from batchexec.api import EXECUTE_BATCH, RESULTS, download_path
from batchexec.cli import main
from batchexec.records import ExecutionStatus, Outcome
from batchexec.store.memory import MemoryStore
from batchexec.web.keys import ENGINE, RESULT_WORKBOOKS
from tests.helpers import AUTH, chat_completion, column, finished, sheet_rows, write_csv

OTHER = {"Integrations-API-Key": "other-key"}


class Upstream:
    """An OpenAI-compatible server answering ``<prompt>!``, counting its calls."""

    def __init__(self) -> None:
        self.calls = 0

    async def chat(self, request: web.Request) -> web.Response:
        self.calls += 1
        body = await request.json()
        answer = body["messages"][-1]["content"] + "!"
        return web.json_response(chat_completion(body["model"], answer, (4, 2)))


@pytest.fixture
async def upstream(aiohttp_server: Any) -> Upstream:
    fake = Upstream()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", fake.chat)
    server = await aiohttp_server(app)
    fake.url = str(server.make_url("/v1"))  # type: ignore[attr-defined]
    return fake


@pytest.fixture
async def client(make_client, make_settings, tmp_path: Path, upstream) -> Any:
    catalog = tmp_path / "cached.toml"
    catalog.write_text(
        f'[models."m"]\nprovider = "openai"\nbase_url = "{upstream.url}"\n'
        "input_per_mtok = 1.0\noutput_per_mtok = 2.0\n"
    )
    return await make_client(
        make_settings(
            models_path=catalog,
            default_model="m",
            integrations_api_keys=f"{AUTH['Integrations-API-Key']},other-key",
        )
    )


async def run(client: Any, executions: list[dict[str, Any]], headers=AUTH, **fields: Any):
    response = await client.post(
        EXECUTE_BATCH, json={"executions": executions, **fields}, headers=headers
    )
    assert response.status == 200, await response.text()
    return await finished_as(client, (await response.json())["invocationId"], headers)


async def finished_as(client: Any, invocation_id: str, headers: dict[str, str]):
    if headers is AUTH:
        return await finished(client, invocation_id)
    await client.app[ENGINE].join(invocation_id)
    await client.app[RESULT_WORKBOOKS].idle()
    response = await client.post(RESULTS, json={"invocation_id": invocation_id}, headers=headers)
    return await response.json()


ROWS = [{"prompt": f"question {n}"} for n in range(50)]


async def test_a_batch_run_again_with_the_cache_makes_no_call_and_marks_every_row(
    client, upstream
) -> None:
    first = await run(client, ROWS, cache=True)
    assert upstream.calls == 50
    assert not any(e["cached"] for e in first["executions"])

    again = await run(client, ROWS, cache=True)
    assert upstream.calls == 50
    assert [e["result"] for e in again["executions"]] == [f"question {n}!" for n in range(50)]
    assert all(e["cached"] and e["cost"] == 0 for e in again["executions"])
    assert again["usage"]["cost"] == 0
    name = again["xlsx_url"].rsplit("/", 1)[1]
    workbook = await client.get(download_path(name), headers=AUTH)
    assert column(sheet_rows(await workbook.read()), "cached") == [True] * 50

    # Another key never sees this key's answers.
    other = await run(client, ROWS, OTHER, cache=True)
    assert upstream.calls == 100
    assert not any(e["cached"] for e in other["executions"])


async def test_the_cache_is_off_unless_asked_and_false_bypasses_it(client, upstream) -> None:
    await run(client, ROWS[:3], cache=True)
    await run(client, ROWS[:3])
    await run(client, ROWS[:3], cache=False)
    assert upstream.calls == 9


async def test_identical_requests_within_a_batch_are_sent_once(client, upstream) -> None:
    body = await run(client, [{"prompt": "same"}] * 5 + [{"prompt": "other"}], cache=True)
    assert upstream.calls == 2
    assert [e["result"] for e in body["executions"]] == ["same!"] * 5 + ["other!"]
    assert sum(e["cached"] for e in body["executions"]) == 4


async def test_a_different_parameter_is_a_different_request(client, upstream) -> None:
    await run(client, [{"prompt": "p"}], cache=True)
    await run(client, [{"prompt": "p", "temperature": 0.5}], cache=True)
    await run(client, [{"prompt": "p", "system": "Be brief."}], cache=True)
    assert upstream.calls == 3


async def test_run_with_cache_sends_identical_rows_once(upstream, tmp_path) -> None:
    # run keeps its rows in a journal that goes when the run ends: its cache is the run's.
    catalog = tmp_path / "cli.toml"
    catalog.write_text(f'[models."m"]\nprovider = "openai"\nbase_url = "{upstream.url}"\n')
    write_csv(tmp_path / "p.csv", ["prompt"], [["one"], ["two"], ["one"], ["one"]])
    args = ["run", "p.csv", "-o", "out.xlsx", "--catalog", str(catalog), "--model", "m"]
    assert await asyncio.to_thread(main, [*args, "--cache"]) == 0
    assert upstream.calls == 2
    assert column(sheet_rows(tmp_path / "out.xlsx"), "cached") == [False, False, True, True]


async def test_a_row_waiting_for_the_same_request_keeps_to_its_own_timeout() -> None:
    cache = AnswerCache(MemoryStore(), ttl_s=60)
    never = asyncio.Event()
    asked: list[float] = []

    async def hangs(left_s: float) -> Outcome:
        asked.append(left_s)
        await never.wait()
        raise AssertionError("never answers")

    leader = asyncio.ensure_future(cache.answer("o", "k", hangs, timeout_s=30))
    await asyncio.sleep(0)
    waiter = await cache.answer("o", "k", hangs, timeout_s=0.01)
    assert waiter.status is ExecutionStatus.TIMED_OUT
    assert "waiting for the same request" in (waiter.error or "")
    assert len(asked) == 1  # the waiter never asked for itself
    leader.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await leader


async def test_when_the_first_ask_fails_the_next_is_shared_too() -> None:
    cache = AnswerCache(MemoryStore(), ttl_s=60)
    calls = 0
    first_may_end = asyncio.Event()

    async def ask(left_s: float) -> Outcome:
        nonlocal calls
        calls += 1
        if calls == 1:
            await first_may_end.wait()
            return Outcome(ExecutionStatus.FAILED, error="down")
        await asyncio.sleep(0)
        return Outcome(ExecutionStatus.SUCCEEDED, result="ok", attempts=1)

    rows = [asyncio.ensure_future(cache.answer("o", "k", ask, timeout_s=30)) for _ in range(4)]
    await asyncio.sleep(0)
    first_may_end.set()
    outcomes = await asyncio.gather(*rows)
    assert calls == 2
    assert [o.status for o in outcomes] == [ExecutionStatus.FAILED] + [
        ExecutionStatus.SUCCEEDED
    ] * 3
    assert sum(o.cached for o in outcomes) == 2
