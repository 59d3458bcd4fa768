"""Batch lifecycle through the real app: progress, events, cancel, list, retry, retention."""

from __future__ import annotations

import asyncio
import io
import json
from typing import Any

import openpyxl

from batchexec.api import BATCHES, CANCEL, RESULTS, RETRY, download_path, events_path
from batchexec.records import ExecutionStatus
from batchexec.web.keys import ENGINE
from tests.helpers import AUTH, batch_of, finished, gated, results, submit, until


async def read_events(response) -> list[tuple[str | None, dict[str, Any]]]:
    """Every event of a server-sent event stream, until the server ends it."""
    events = []
    name = None
    async for raw in response.content:
        line = raw.decode().rstrip("\n")
        if line.startswith("event: "):
            name = line.removeprefix("event: ")
        elif line.startswith("data: "):
            events.append((name, json.loads(line.removeprefix("data: "))))
    return events


async def test_progress_rises_and_events_arrive_one_per_row(make_client):
    client = await make_client(max_threads=4)
    rows = [{"prompt": f"row {n}", "model": "gated"} for n in range(1, 21)]
    invocation_id = await submit(client, rows)
    stream = await client.get(events_path(invocation_id), headers=AUTH)
    assert stream.status == 200
    assert stream.headers["Content-Type"] == "text/event-stream"
    reading = asyncio.create_task(read_events(stream))
    provider = gated(client)
    seen_succeeded = []
    for n in range(1, 21):
        await provider.wait_started(n)
        provider.open(f"row {n}")
        batch = batch_of(client, invocation_id)
        await until(lambda: batch.counts[ExecutionStatus.SUCCEEDED] >= n)  # noqa: B023
        body = await results(client, invocation_id)
        seen_succeeded.append(body["progress"]["succeeded"])
        assert len(body["executions"]) == body["progress"]["succeeded"]
        assert sum(v for k, v in body["progress"].items() if k != "total") == 20
    assert seen_succeeded == list(range(1, 21))
    events = await reading
    executions = [data for name, data in events if name == "execution"]
    assert sorted(e["index"] for e in executions) == list(range(1, 21))
    assert all(e["status"] == "succeeded" for e in executions)
    assert events[-1][0] == "done"
    assert events[-1][1]["status"] == "completed"
    assert events[-1][1]["xlsx_url"].endswith(f"batch_execution_{invocation_id}.xlsx")
    assert any(name == "progress" for name, _ in events)


async def test_each_row_is_told_started_before_it_ends_and_a_late_client_learns_who_runs(
    make_client,
):
    client = await make_client(max_threads=2)
    rows = [{"prompt": f"row {n}", "model": "gated"} for n in range(1, 4)]
    invocation_id = await submit(client, rows)
    provider = gated(client)
    stream = await client.get(events_path(invocation_id), headers=AUTH)
    reading = asyncio.create_task(read_events(stream))
    await provider.wait_started(2)
    # A client connecting now is told of the rows running (at once, or as their starts
    # become durable), though no row has ended.
    late = await client.get(events_path(invocation_id), headers=AUTH)
    told: list[str] = []
    started_now: set[int] = set()
    while started_now != {1, 2}:
        block = (await late.content.readuntil(b"\n\n")).decode()
        name = block.split("\n", 1)[0].removeprefix("event: ")
        told.append(name)
        if name == "started":
            started_now.add(json.loads(block.split("data: ", 1)[1])["index"])
    assert "execution" not in told
    late.close()
    provider.open()
    events = await reading

    order = [(name, data["index"]) for name, data in events if name in ("started", "execution")]
    for n in (1, 2, 3):
        assert order.index(("started", n)) < order.index(("execution", n))
    started = [data for name, data in events if name == "started"]
    assert [(e["model"], e["attempts"]) for e in started] == [("gated", 1)] * 3
    assert events[-1][0] == "done"


async def test_a_late_client_gets_the_current_state_first(make_client):
    client = await make_client()
    invocation_id = await submit(client, [{"prompt": f"p{n}", "model": "echo"} for n in range(3)])
    await finished(client, invocation_id)
    stream = await client.get(events_path(invocation_id), headers=AUTH)
    events = await read_events(stream)
    assert [name for name, _ in events] == ["execution"] * 3 + ["progress", "done"]
    assert events[3][1]["succeeded"] == 3


async def test_events_need_the_owner_key(make_client):
    client = await make_client(integrations_api_keys="key-a,key-b")
    invocation_id = await submit(client, [{"prompt": "p", "model": "echo"}], key="key-a")
    response = await client.get(
        events_path(invocation_id), headers={"Integrations-API-Key": "key-b"}
    )
    assert response.status == 404
    response = await client.get(events_path(invocation_id))
    assert response.status == 401


async def test_cancel_keeps_finished_rows_and_stops_model_calls(make_client):
    client = await make_client(max_threads=2)
    rows = [{"prompt": f"r{n}", "model": "gated"} for n in range(1, 7)]
    invocation_id = await submit(client, rows)
    provider = gated(client)
    provider.open("r1")
    await provider.wait_started(3)
    response = await client.post(CANCEL, json={"invocation_id": invocation_id}, headers=AUTH)
    assert response.status == 200
    body = await response.json()
    calls_at_cancel = len(provider.started)
    assert body["status"] == "cancelled"
    assert [e["status"] for e in body["executions"]] == ["succeeded"] + ["cancelled"] * 5
    lines = body["csv_content"].splitlines()
    assert lines[1] == "r1,gated,answer(r1)"
    assert lines[2] == "r2,gated,Error: Cancelled by request."
    path = body["xlsx_url"].removeprefix(str(client.make_url("")).rstrip("/"))
    workbook = await client.get(path, headers=AUTH)
    sheet = openpyxl.load_workbook(io.BytesIO(await workbook.read()))["Results"]
    assert [cell.value for cell in sheet["D"]][1:] == ["succeeded"] + ["cancelled"] * 5
    provider.open()
    for _ in range(50):
        await asyncio.sleep(0)
    assert len(provider.started) == calls_at_cancel
    again = await client.post(CANCEL, json={"invocation_id": invocation_id}, headers=AUTH)
    assert again.status == 409
    assert "already ended" in (await again.json())["detail"]


async def test_cancel_a_queued_batch(make_client):
    client = await make_client(max_concurrent_batches=1)
    first = await submit(client, [{"prompt": "busy", "model": "gated"}])
    second = await submit(client, [{"prompt": "waiting", "model": "gated"}])
    await gated(client).wait_started(1)
    response = await client.post(CANCEL, json={"invocation_id": second}, headers=AUTH)
    body = await response.json()
    assert body["status"] == "cancelled"
    assert body["progress"]["cancelled"] == 1
    gated(client).open()
    assert (await finished(client, first))["status"] == "completed"
    assert gated(client).started == ["busy"]


async def test_list_is_newest_first_with_filters(make_client):
    client = await make_client(integrations_api_keys="key-a,key-b")
    ids = [
        await submit(client, [{"prompt": f"{n}", "model": "echo"}], key="key-a") for n in range(3)
    ]
    await submit(client, [{"prompt": "other", "model": "echo"}], key="key-b")
    running = await submit(client, [{"prompt": "slow", "model": "gated"}], key="key-a")
    for invocation_id in ids:
        await client.app[ENGINE].join(invocation_id)
    key_a = {"Integrations-API-Key": "key-a"}
    body = await (await client.get(BATCHES, headers=key_a)).json()
    assert [b["invocationId"] for b in body["batches"]] == [running, *reversed(ids)]
    first = body["batches"][1]
    assert first["status"] == "completed"
    assert first["progress"]["total"] == 1
    assert first["created_at"] and first["finished_at"]
    body = await (await client.get(BATCHES + "?limit=2&status=completed", headers=key_a)).json()
    assert [b["invocationId"] for b in body["batches"]] == [ids[2], ids[1]]
    body = await (await client.get(BATCHES + "?status=processing", headers=key_a)).json()
    assert [b["invocationId"] for b in body["batches"]] == [running]
    bad = await client.get(BATCHES + "?status=bogus&limit=0", headers=key_a)
    assert bad.status == 422
    assert {e["field"] for e in (await bad.json())["errors"]} == {"status", "limit"}
    gated(client).open()


async def test_retry_reruns_exactly_the_failed_rows(make_client):
    client = await make_client()
    rows = [
        {"prompt": "steady one", "model": "gated"},
        {"prompt": "flaky: two", "model": "gated"},
        {"prompt": "steady three", "model": "gated"},
        {"prompt": "flaky: four", "model": "gated"},
        {"prompt": "five uses ${output.1}", "model": "gated"},
    ]
    provider = gated(client)
    provider.open()
    original_id = await submit(client, rows)
    original = await finished(client, original_id)
    assert original["message"] == "Execution completed with 2 errors."
    provider.started.clear()
    response = await client.post(RETRY, json={"invocation_id": original_id}, headers=AUTH)
    assert response.status == 200
    started = await response.json()
    assert started["retry_of"] == original_id
    assert started["rerun"] == [2, 4]
    body = await finished(client, started["invocationId"])
    assert sorted(provider.started) == ["flaky: four", "flaky: two"]
    assert body["status"] == "completed"
    assert body["message"] == "Execution completed successfully."
    assert [e["result"] for e in body["executions"]] == [
        "answer(steady one)",
        "answer(flaky: two)",
        "answer(steady three)",
        "answer(flaky: four)",
        "answer(five uses answer(steady one))",
    ]
    assert len(body["csv_content"].splitlines()) == 6
    again = await client.post(RETRY, json={"invocation_id": started["invocationId"]}, headers=AUTH)
    assert again.status == 409


async def test_retry_of_a_running_batch_is_409(make_client):
    client = await make_client()
    invocation_id = await submit(client, [{"prompt": "slow", "model": "gated"}])
    response = await client.post(RETRY, json={"invocation_id": invocation_id}, headers=AUTH)
    assert response.status == 409
    gated(client).open()


async def test_expired_batches_and_files_disappear(make_client, tmp_path):
    client = await make_client(results_ttl_hours=0.3 / 3600)
    invocation_id = await submit(client, [{"prompt": "short-lived", "model": "echo"}])
    body = await finished(client, invocation_id)
    name = body["xlsx_url"].rsplit("/", 1)[1]
    path = tmp_path / "public" / "batch_execution_results" / name
    assert path.is_file()
    for _ in range(200):
        response = await client.post(RESULTS, json={"invocation_id": invocation_id}, headers=AUTH)
        if response.status == 404 and not path.exists():
            break
        await asyncio.sleep(0.05)
    assert response.status == 404
    assert not path.exists()
    download = await client.get(download_path(name), headers=AUTH)
    assert download.status == 404


async def test_every_route_takes_the_id_as_invocationId_too(make_client):
    client = await make_client()
    provider = gated(client)
    running = await submit(client, [{"prompt": "waits", "model": "gated"}])
    await provider.wait_started(1)
    body = {"invocationId": running}
    results_answer = await client.post(RESULTS, json={**body, "since": 0}, headers=AUTH)
    assert results_answer.status == 200, await results_answer.text()
    assert (await results_answer.json())["invocationId"] == running
    cancelled = await client.post(CANCEL, json=body, headers=AUTH)
    assert cancelled.status == 200, await cancelled.text()
    assert (await cancelled.json())["status"] == "cancelled"
    retried = await client.post(RETRY, json=body, headers=AUTH)
    assert retried.status == 200, await retried.text()
    assert (await retried.json())["retry_of"] == running
    provider.open()
    # Both spellings at once must name one batch.
    same = await client.post(RESULTS, json={**body, "invocation_id": running}, headers=AUTH)
    assert same.status == 200
    two = await client.post(RESULTS, json={**body, "invocation_id": "other"}, headers=AUTH)
    assert two.status == 422
    assert (await two.json())["errors"] == [
        {
            "index": None,
            "field": None,
            "message": "invocation_id and invocationId name different batches; send one",
        }
    ]


async def test_a_bad_query_string_is_called_a_query_string(make_client):
    client = await make_client()
    response = await client.get(BATCHES + "?limit=0", headers=AUTH)
    assert response.status == 422
    body = await response.json()
    assert body["detail"] == "The query string is invalid."
    assert [error["field"] for error in body["errors"]] == ["limit"]


async def test_the_retry_of_a_one_row_batch_says_so_in_the_singular(make_client):
    client = await make_client()
    gated(client).open()
    original = await submit(client, [{"prompt": "fail: once", "model": "gated"}])
    await finished(client, original)
    response = await client.post(RETRY, json={"invocation_id": original}, headers=AUTH)
    started = await response.json()
    assert started["response"][0]["message"] == (
        f"Retrying the one execution of {original}. Use invocation ID "
        f"{started['invocationId']} to check status and retrieve results."
    )
    await finished(client, started["invocationId"])
