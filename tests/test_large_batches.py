"""Batches large enough to take the paths that keep the event loop free (issue 11).

Above a few thousand rows, a batch's run is set up in a thread, a late
events client's backlog is made and sent in slices, and a finished batch's
size for the cache is kept as its rows end rather than added up. These
tests run batches just past those bounds and check that nothing about the
answers changed: every row once, chains filled in, sizes exact.
"""

from __future__ import annotations

import asyncio
from typing import Any

from batchexec import engine, exports
from batchexec.api import RETRY, download_path, events_path
from batchexec.events import Event
from batchexec.exports import csv_sheet, render_csv
from batchexec.records import Batch, ExecutionStatus
from batchexec.schemas import execution_fields
from batchexec.web import streams
from tests.helpers import AUTH, batch_of, finished, gated, sheet_rows, submit, until
from tests.test_web_lifecycle import read_events

#: Just past the engine's bound for setting a run up on the loop.
ENGINE_ROWS = engine._SET_UP_INLINE_ROWS + 100
#: A late client's backlog of more than two slices, the last one short.
BACKLOG_ROWS = 2 * streams._BACKLOG_SLICE + 37


def chained_rows(count: int) -> list[dict[str, Any]]:
    """``count`` echo rows; every tenth uses the answer of the row before it."""
    rows = []
    for n in range(1, count + 1):
        prompt = f"after ${{output.{n - 1}}}" if n % 10 == 0 else f"row {n}"
        rows.append({"prompt": prompt, "model": "echo"})
    return rows


def expected_size(batch: Batch) -> int:
    """``Batch.size_bytes`` added up afresh over the batch's rows."""
    return 1000 + sum(
        e.input_bytes() + (e.outcome_bytes() if e.status.finished else 0) for e in batch.executions
    )


async def test_a_batch_set_up_off_the_loop_runs_every_row_and_fills_its_chains(make_client):
    client = await make_client(max_executions_per_batch=ENGINE_ROWS, max_threads=8)
    invocation_id = await submit(client, chained_rows(ENGINE_ROWS))
    body = await finished(client, invocation_id)

    assert body["status"] == "completed"
    assert body["progress"]["succeeded"] == ENGINE_ROWS
    batch = batch_of(client, invocation_id)
    for n in range(10, ENGINE_ROWS + 1, 10):
        assert batch.executions[n - 1].result == f"after row {n - 1}"
    assert batch.executions[10].result == "row 11"
    assert batch.size_bytes() == expected_size(batch)


async def test_a_large_batch_s_answer_and_workbook_hold_every_row_once(make_client):
    # Its answer is made in slices on the loop, its workbook by a writer process.
    assert ENGINE_ROWS > exports._APART_ROWS
    client = await make_client(max_executions_per_batch=ENGINE_ROWS)
    invocation_id = await submit(client, chained_rows(ENGINE_ROWS))
    body = await finished(client, invocation_id)

    batch = batch_of(client, invocation_id)
    assert [e["index"] for e in body["executions"]] == list(range(1, ENGINE_ROWS + 1))
    assert body["executions"] == [execution_fields(e) for e in batch.executions]
    assert body["csv_content"] == render_csv(csv_sheet(batch))
    response = await client.get(download_path(body["xlsx_url"].rsplit("/", 1)[1]), headers=AUTH)
    assert response.status == 200
    rows = sheet_rows(await response.read())
    assert len(rows) == ENGINE_ROWS + 1
    assert rows[0][:3] == ["prompt", "model", "result"]
    assert [row[2] for row in rows[1:]] == [e.result for e in batch.executions]


async def test_a_large_retry_feeds_the_rows_it_reruns_from_the_rows_that_succeeded(make_client):
    client = await make_client(max_executions_per_batch=ENGINE_ROWS, max_threads=8)
    rows = chained_rows(ENGINE_ROWS)
    # Row 20 fails the first time; row 21 names it, so it is skipped, then rerun.
    rows[19] = {"prompt": "flaky: twenty", "model": "gated"}
    rows[20] = {"prompt": "uses ${output.20}", "model": "echo"}
    invocation_id = await submit(client, rows)
    gated(client).open()
    body = await finished(client, invocation_id)
    assert body["progress"]["failed"] == 1
    assert body["progress"]["skipped"] == 1

    response = await client.post(RETRY, json={"invocation_id": invocation_id}, headers=AUTH)
    assert response.status == 200, await response.text()
    retried = (await response.json())["invocationId"]
    body = await finished(client, retried)
    assert body["progress"]["succeeded"] == ENGINE_ROWS
    batch = batch_of(client, retried)
    assert batch.executions[20].result == "uses answer(flaky: twenty)"
    # Rows kept from the first batch: row 30 names row 29, which did not run again.
    assert batch.executions[29].result == "after row 29"


async def test_a_late_client_of_a_large_finished_batch_gets_each_row_once(make_client):
    client = await make_client(max_executions_per_batch=BACKLOG_ROWS)
    rows = [{"prompt": f"p{n}", "model": "echo"} for n in range(1, BACKLOG_ROWS + 1)]
    invocation_id = await submit(client, rows)
    await finished(client, invocation_id)

    stream = await client.get(events_path(invocation_id), headers=AUTH)
    events = await read_events(stream)
    names = [name for name, _ in events]
    assert names == ["execution"] * BACKLOG_ROWS + ["progress", "done"]
    indexes = [data["index"] for name, data in events if name == "execution"]
    assert sorted(indexes) == list(range(1, BACKLOG_ROWS + 1))
    # In the order the rows ended, as a client following from the start saw them.
    batch = batch_of(client, invocation_id)
    assert indexes == sorted(indexes, key=lambda index: batch.executions[index - 1].seq)
    assert events[-2][1]["succeeded"] == BACKLOG_ROWS


async def test_a_client_joining_a_large_batch_midway_gets_each_end_once(make_client):
    client = await make_client(max_executions_per_batch=BACKLOG_ROWS, max_threads=4)
    early = BACKLOG_ROWS - 40
    rows = [{"prompt": f"r{n}", "model": "gated"} for n in range(1, BACKLOG_ROWS + 1)]
    invocation_id = await submit(client, rows)
    provider = gated(client)
    provider.open(*(f"r{n}" for n in range(1, early + 1)))
    batch = batch_of(client, invocation_id)
    await until(lambda: batch.counts[ExecutionStatus.SUCCEEDED] == early, rounds=200_000)
    await provider.wait_started(early + 4)

    stream = await client.get(events_path(invocation_id), headers=AUTH)
    reading = asyncio.create_task(read_events(stream))
    # The rows left end while the backlog is still being sent, a slice at a time.
    provider.open()
    events = await reading

    ended = [data["index"] for name, data in events if name == "execution"]
    assert sorted(ended) == list(range(1, BACKLOG_ROWS + 1))
    started = {data["index"] for name, data in events if name == "started"}
    # The four running when it joined, and every row that started after.
    assert set(range(early + 1, BACKLOG_ROWS + 1)) == started
    assert events[-1][0] == "done"
    assert batch.size_bytes() == expected_size(batch)


async def test_a_stream_gathers_what_arrives_before_its_next_write_but_never_holds_the_end():
    """Between two writes a stream gathers events (one write, not one a row); a final event
    ends the gathering at once, and past the moment what is queued goes out unwaited."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Event] = asyncio.Queue()
    gathering = asyncio.ensure_future(
        streams._gathered(queue, Event("started", {"index": 1}), loop.time() + 3600)
    )
    for index in (1, 2, 3):
        queue.put_nowait(Event("execution", {"index": index}))
        await asyncio.sleep(0)
    assert not gathering.done()
    queue.put_nowait(Event("done", {}))
    gathered = await asyncio.wait_for(gathering, 30)
    assert [event.name for event in gathered] == ["started", *["execution"] * 3, "done"]

    queue.put_nowait(Event("execution", {"index": 4}))
    queue.put_nowait(Event("progress", {}))
    gathered = await asyncio.wait_for(
        streams._gathered(queue, Event("started", {"index": 5}), loop.time() - 1), 30
    )
    assert [event.name for event in gathered] == ["started", "execution", "progress"]
    assert queue.empty()
