"""Durability through the real app: what one app leaves in its SQLite file, the next one serves.

Each test starts an app, stops it (``client.close()`` runs its shutdown, with
no grace: work in flight is cut off), then starts another on the same
database file, the default ``sqlite:///batchexec.db`` in the test's folder.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
from collections.abc import Callable
from typing import Any

from aiohttp.test_utils import TestClient

from batchexec.api import BATCHES, HEALTH, PROCESS_CSV, RESULTS, RETRY, download_path, events_path
from batchexec.catalog import ModelSpec
from batchexec.providers import ChatRequest, Completion
from batchexec.records import ExecutionStatus
from batchexec.registry import Registry
from batchexec.store import BatchEnded, StoreError
from batchexec.store.sqlite import SQLiteStore
from batchexec.web.keys import REGISTRY, SETTINGS
from tests.fakes import GatedProvider
from tests.helpers import (
    API_KEY,
    AUTH,
    ClientFactory,
    batch_of,
    finished,
    gated,
    results,
    sheet_rows,
    submit,
)

#: A failure bound for waits on the background: a test that passes never waits this long.
PATIENCE_S = 5.0

Client = TestClient[Any, Any]


async def restart(make_client: ClientFactory, client: Client, **overrides: Any) -> Client:
    """Stop ``client``'s app, as a shutdown does, and start another on the same database."""
    await client.close()
    return await make_client(**overrides)


async def committed(client: Client, condition: Callable[[], bool], *, rounds: int = 1000) -> None:
    """Wait until ``condition()`` holds, a group commit of the app's store at a time.

    Rows become visible only once written, in a thread: counting commits
    rather than loop turns (as ``until`` does) keeps a slow disk from failing it.
    """
    registry: Registry = client.app[REGISTRY]
    for _ in range(rounds):
        if condition():
            return
        await registry.flush()
        # A small group is committed on the loop's own thread: a flush with nothing
        # pending then returns at once, so the loop is let turn too.
        await asyncio.sleep(0)
    raise AssertionError("condition never became true")


async def workbook_rows(client: Client, name: str) -> list[list[Any]]:
    """The rows of a downloaded workbook, its header first."""
    response = await client.get(download_path(name), headers=AUTH)
    assert response.status == 200, await response.text()
    return sheet_rows(await response.read())


def csv_rows(body: dict[str, Any]) -> list[dict[str, str]]:
    """The rows of a results answer's ``csv_content``."""
    return list(csv.DictReader(io.StringIO(body["csv_content"])))


async def next_event(lines: Any) -> tuple[str, dict[str, Any]]:
    """The next server-sent event of a stream's lines."""
    name = None
    async for raw in lines:
        line = raw.decode().rstrip("\n")
        if line.startswith("event: "):
            name = line.removeprefix("event: ")
        elif line.startswith("data: "):
            assert name is not None
            return name, json.loads(line.removeprefix("data: "))
    raise AssertionError("the stream ended")


async def test_a_batch_cut_off_mid_way_resumes_under_its_id_and_runs_only_what_was_left(
    make_client,
):
    client = await make_client(max_threads=4)
    rows = [
        {"prompt": "first", "model": "gated"},
        {"prompt": "second", "model": "gated"},
        {"prompt": "third", "model": "gated"},
        {"prompt": "uses ${output.1}", "model": "gated"},
    ]
    invocation_id = await submit(client, rows)
    provider = gated(client)
    await provider.wait_started(3)  # the fourth row waits for the first
    provider.open("first")
    await provider.wait_started(4)
    provider.open("second")
    batch = batch_of(client, invocation_id)
    await committed(client, lambda: batch.counts[ExecutionStatus.SUCCEEDED] == 2)
    before = await results(client, invocation_id)
    assert before["status"] == "processing"
    assert [e["index"] for e in before["executions"]] == [1, 2]

    client = await restart(make_client, client, max_threads=4)

    provider = gated(client)
    await provider.wait_started(2)
    # Finished rows are not sent again; the fourth is filled from the stored result.
    assert sorted(provider.started) == ["third", "uses answer(first)"]
    resumed = batch_of(client, invocation_id)
    await committed(client, lambda: resumed.counts[ExecutionStatus.RUNNING] == 2)
    during = await results(client, invocation_id)
    assert during["status"] == "processing"
    assert during["executions"] == before["executions"]
    # Calls from the first life count on.
    assert [e.attempts for e in resumed.executions] == [1, 1, 2, 2]

    provider.open()
    body = await finished(client, invocation_id)
    assert body["status"] == "completed"
    assert body["invocationId"] == invocation_id
    assert body["message"] == "Execution completed successfully."
    assert [(e["index"], e["status"], e["result"], e["attempts"]) for e in body["executions"]] == [
        (1, "succeeded", "answer(first)", 1),
        (2, "succeeded", "answer(second)", 1),
        (3, "succeeded", "answer(third)", 2),
        (4, "succeeded", "answer(uses answer(first))", 2),
    ]
    assert body["executions"][:2] == before["executions"]
    assert body["usage"] == {
        "prompt_tokens": 12,
        "completion_tokens": 20,
        "cost": None,
        "currency": "USD",
        "uncosted": 4,
        "models": {
            "gated": {"prompt_tokens": 12, "completion_tokens": 20, "cost": None, "uncosted": 4}
        },
    }
    assert [(row["prompt"], row["result"]) for row in csv_rows(body)] == [
        ("first", "answer(first)"),
        ("second", "answer(second)"),
        ("third", "answer(third)"),
        ("uses answer(first)", "answer(uses answer(first))"),
    ]
    assert sorted(provider.finished) == ["third", "uses answer(first)"]
    sheet = await workbook_rows(client, f"batch_execution_{invocation_id}.xlsx")
    header = sheet[0]
    assert [dict(zip(header, row, strict=True))["result"] for row in sheet[1:]] == [
        "answer(first)",
        "answer(second)",
        "answer(third)",
        "answer(uses answer(first))",
    ]
    assert [dict(zip(header, row, strict=True))["attempts"] for row in sheet[1:]] == [1, 1, 2, 2]


async def test_a_batch_finished_before_a_restart_is_served_as_it_was(make_client):
    keys = f"{API_KEY},other-key"
    other = {"Integrations-API-Key": "other-key"}
    client = await make_client(integrations_api_keys=keys)
    gated(client).open()
    invocation_id = await submit(
        client, [{"prompt": "kept", "model": "echo"}, {"prompt": "fail:once", "model": "gated"}]
    )
    before = await finished(client, invocation_id)
    assert before["status"] == "completed"
    name = f"batch_execution_{invocation_id}.xlsx"
    sheet_before = await workbook_rows(client, name)

    client = await restart(make_client, client, integrations_api_keys=keys)

    after = await results(client, invocation_id)
    assert after.pop("xlsx_url").endswith(download_path(name))  # a new port, the same file
    before.pop("xlsx_url")
    assert after == before
    assert csv_rows(after)[1]["result"].startswith("Error: the model refused")

    listed = await (await client.get(BATCHES, headers=AUTH)).json()
    assert [(b["invocationId"], b["status"]) for b in listed["batches"]] == [
        (invocation_id, "completed")
    ]
    assert listed["batches"][0]["progress"]["succeeded"] == 1
    assert listed["batches"][0]["progress"]["failed"] == 1

    assert await workbook_rows(client, name) == sheet_before
    (client.app[SETTINGS].results_dir / name).unlink()
    assert await workbook_rows(client, name) == sheet_before  # made again from the records

    # Another key sees nothing of it.
    for response in (
        await client.post(RESULTS, json={"invocation_id": invocation_id}, headers=other),
        await client.post(RETRY, json={"invocation_id": invocation_id}, headers=other),
        await client.get(events_path(invocation_id), headers=other),
        await client.get(download_path(name), headers=other),
    ):
        assert response.status == 404
    assert (await (await client.get(BATCHES, headers=other)).json())["batches"] == []

    gated(client).open()
    response = await client.post(RETRY, json={"invocation_id": invocation_id}, headers=AUTH)
    assert response.status == 200, await response.text()
    retried = await response.json()
    assert (retried["retry_of"], retried["rerun"]) == (invocation_id, [2])
    rerun = await finished(client, retried["invocationId"])
    assert [(e["status"], e["result"]) for e in rerun["executions"]] == [
        ("succeeded", "kept"),
        ("failed", None),
    ]
    assert gated(client).started == ["fail:once"]


async def test_queued_batches_are_resumed_in_order_and_run_to_completion(make_client):
    client = await make_client(max_concurrent_batches=1)
    first = await submit(client, [{"prompt": "a1", "model": "gated"}])
    second = await submit(client, [{"prompt": "b1", "model": "gated"}])
    await gated(client).wait_started(1)
    assert (await results(client, second))["status"] == "queued"

    client = await restart(make_client, client, max_concurrent_batches=1)

    provider = gated(client)
    await provider.wait_started(1)
    assert provider.started == ["a1"]
    await client.app[REGISTRY].flush()  # the batch's start is visible
    assert (await results(client, first))["status"] == "processing"
    assert (await results(client, second))["status"] == "queued"
    provider.open()
    for invocation_id, prompt in ((first, "a1"), (second, "b1")):
        body = await finished(client, invocation_id)
        assert body["status"] == "completed"
        assert [e["result"] for e in body["executions"]] == [f"answer({prompt})"]
    assert provider.started == ["a1", "b1"]


async def test_the_event_stream_of_a_resumed_batch_sends_its_backlog_then_done(make_client):
    client = await make_client()
    invocation_id = await submit(
        client, [{"prompt": "early", "model": "gated"}, {"prompt": "late", "model": "gated"}]
    )
    provider = gated(client)
    await provider.wait_started(2)
    provider.open("early")
    batch = batch_of(client, invocation_id)
    await committed(client, lambda: batch.counts[ExecutionStatus.SUCCEEDED] == 1)

    client = await restart(make_client, client)

    await gated(client).wait_started(1)
    await client.app[REGISTRY].flush()  # the row's start, recorded before its call, is visible
    stream = await client.get(events_path(invocation_id), headers=AUTH)
    assert stream.status == 200
    async with asyncio.timeout(PATIENCE_S):
        name, data = await next_event(stream.content)
        assert (name, data["index"], data["status"]) == ("execution", 1, "succeeded")
        name, data = await next_event(stream.content)
        assert (name, data["index"]) == ("started", 2)  # running again in this process
        name, data = await next_event(stream.content)
        assert (name, data["succeeded"], data["running"]) == ("progress", 1, 1)
        gated(client).open("late")
        events = [await next_event(stream.content) for _ in range(3)]
    assert [name for name, _ in events] == ["execution", "progress", "done"]
    assert (events[0][1]["index"], events[0][1]["status"]) == (2, "succeeded")
    assert events[2][1]["status"] == "completed"
    assert events[2][1]["invocationId"] == invocation_id
    assert events[2][1]["xlsx_url"].endswith(f"batch_execution_{invocation_id}.xlsx")


async def test_a_store_that_fails_mid_batch_fails_the_batch_and_the_server_goes_on(
    make_client, monkeypatch
):
    client = await make_client()
    disk_full = True
    apply = SQLiteStore.apply

    async def apply_unless_full(self: SQLiteStore, changes: Any) -> frozenset[str]:
        if disk_full:
            raise StoreError("The SQLite store cannot be written: database or disk is full")
        return await apply(self, changes)

    invocation_id = await submit(
        client, [{"prompt": "x1", "model": "gated"}, {"prompt": "x2", "model": "gated"}]
    )
    provider = gated(client)
    await provider.wait_started(2)
    await client.app[REGISTRY].flush()  # both rows' starts are written
    monkeypatch.setattr(SQLiteStore, "apply", apply_unless_full)
    provider.open("x1")

    async with asyncio.timeout(PATIENCE_S):
        body = await finished(client, invocation_id)
    assert body["status"] == "failed"
    assert "database or disk is full" in body["message"]
    assert body["progress"]["running"] == body["progress"]["pending"] == 0
    assert (await client.get(HEALTH)).status == 200

    disk_full = False
    provider.open()
    again = await submit(client, [{"prompt": "after", "model": "echo"}])
    async with asyncio.timeout(PATIENCE_S):
        body = await finished(client, again)
    assert body["status"] == "completed"
    assert [e["result"] for e in body["executions"]] == ["after"]


async def test_batches_and_workbooks_past_their_ttl_are_swept_after_a_restart(
    make_client, monkeypatch
):
    client = await make_client()
    invocation_id = await submit(client, [{"prompt": "old", "model": "echo"}])
    await finished(client, invocation_id)
    template = await client.post(
        PROCESS_CSV, json={"csv_content": "prompt,model\nlater,echo\n"}, headers=AUTH
    )
    assert template.status == 200, await template.text()
    folder = client.app[SETTINGS].results_dir
    workbooks = {
        folder / f"batch_execution_{invocation_id}.xlsx",
        folder / f"batch_execution_{(await template.json())['invocationId']}.xlsx",
    }
    assert all(path.is_file() for path in workbooks)

    client = await restart(make_client, client, results_ttl_hours=1e-9)

    registry: Registry = client.app[REGISTRY]
    rounds_started = 0
    second_round = asyncio.Event()
    expire = registry.expire

    async def counted_expire(older_than: float) -> list[str]:
        # A round deletes its files before the next one begins.
        nonlocal rounds_started
        rounds_started += 1
        if rounds_started == 2:
            second_round.set()
        return await expire(older_than)

    monkeypatch.setattr(registry, "expire", counted_expire)
    running = await submit(client, [{"prompt": "held", "model": "gated"}])
    async with asyncio.timeout(PATIENCE_S):
        await second_round.wait()

    assert not any(path.exists() for path in workbooks)
    response = await client.post(RESULTS, json={"invocation_id": invocation_id}, headers=AUTH)
    assert response.status == 404
    assert await registry.store.load(invocation_id) is None
    # An unfinished batch is not swept, however short the TTL.
    await registry.flush()
    assert (await results(client, running))["status"] == "processing"
    listed = (await (await client.get(BATCHES, headers=AUTH)).json())["batches"]
    assert [batch["invocationId"] for batch in listed] == [running]


class HugeUsageProvider(GatedProvider):
    """The gated provider, reporting more prompt tokens than SQLite's integers hold."""

    async def complete(self, model: ModelSpec, request: ChatRequest) -> Completion:
        completion = await super().complete(model, request)
        return Completion(completion.text, prompt_tokens=2**64, completion_tokens=1)


async def test_what_a_client_saw_finished_is_what_a_restart_shows(make_client):
    client = await make_client(extra_providers=(HugeUsageProvider,))
    gated(client).open()
    invocation_id = await submit(client, [{"prompt": "p", "model": "gated"}])
    before = await finished(client, invocation_id)

    client = await restart(make_client, client, extra_providers=(HugeUsageProvider,))

    after = await results(client, invocation_id)
    assert (after["status"], after["progress"]) == (before["status"], before["progress"])


async def test_a_finished_batch_reads_back_the_same_whatever_its_text(make_client):
    client = await make_client()
    invocation_id = await submit(client, [{"prompt": "a\ud800b", "model": "echo"}])
    before = await finished(client, invocation_id)
    assert before["executions"][0]["result"] == "a\ud800b"

    client = await restart(make_client, client)

    after = await results(client, invocation_id)
    assert after["executions"] == before["executions"]
    assert after["csv_content"] == before["csv_content"]


async def test_a_batch_of_models_side_by_side_resumes_as_it_was_planned(make_client):
    client = await make_client(max_threads=4)
    text = "prompt\nfirst\nuses ${output.1}\n"
    response = await client.post(
        PROCESS_CSV,
        json={"csv_content": text, "execute": True, "models": ["gated", "gated-b"]},
        headers=AUTH,
    )
    assert response.status == 200, await response.text()
    invocation_id = (await response.json())["invocationId"]
    provider = gated(client)
    await provider.wait_started(2)
    provider.open("first")
    batch = batch_of(client, invocation_id)
    await committed(client, lambda: batch.counts[ExecutionStatus.SUCCEEDED] == 2)

    client = await restart(make_client, client, max_threads=4)

    provider = gated(client)
    await provider.wait_started(2)
    # Each model's second row, filled from that model's stored first answer.
    assert provider.started == ["uses answer(first)"] * 2
    provider.open()
    body = await finished(client, invocation_id)
    assert body["status"] == "completed"
    assert [(e["index"], e["model"], e["status"]) for e in body["executions"]] == [
        (1, "gated", "succeeded"),
        (2, "gated-b", "succeeded"),
        (3, "gated", "succeeded"),
        (4, "gated-b", "succeeded"),
    ]
    assert list(csv_rows(body)[0]) == ["prompt", "result [gated]", "result [gated-b]"]
    sheet = await workbook_rows(client, f"batch_execution_{invocation_id}.xlsx")
    assert len(sheet) == 3 and "status [gated-b]" in sheet[0]


async def test_a_batch_whose_end_is_written_during_shutdown_gets_its_workbook(
    make_client, monkeypatch
):
    """The workbook is started when the end is shown; an end still being written when the
    server stops is shown before the stop waits for the workbooks."""
    ending, release = asyncio.Event(), asyncio.Event()
    apply = SQLiteStore.apply

    async def slow_end(self: SQLiteStore, changes: Any) -> frozenset[str]:
        if any(isinstance(change, BatchEnded) for change in changes):
            ending.set()
            await release.wait()
        return await apply(self, changes)

    monkeypatch.setattr(SQLiteStore, "apply", slow_end)
    client = await make_client()
    folder = client.app[SETTINGS].results_dir
    invocation_id = await submit(client, [{"prompt": "hello", "model": "echo"}])
    await asyncio.wait_for(ending.wait(), PATIENCE_S)
    closing = asyncio.ensure_future(client.close())
    await asyncio.sleep(0.05)
    release.set()
    await asyncio.wait_for(closing, PATIENCE_S)
    assert (folder / f"batch_execution_{invocation_id}.xlsx").is_file()
