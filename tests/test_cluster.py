"""Several replicas of the real app on one PostgreSQL schema: any replica answers, leases hold."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient

from batchexec.api import BATCHES, CANCEL, RETRY, download_path, events_path
from batchexec.records import ExecutionStatus
from batchexec.store import StoreError
from batchexec.web.keys import REGISTRY, REPLICA, RESULT_WORKBOOKS
from tests.helpers import AUTH, gated, results, sheet_rows, submit
from tests.postgres import base_url
from tests.test_web_lifecycle import read_events

Replicas = Callable[..., Awaitable[TestClient[Any, Any]]]
#: How long a test waits for the cluster to reach a state it must reach.
_WAIT_S = 20.0


@pytest.fixture
def replica(postgres_url, make_client, make_settings, tmp_path) -> Replicas:
    """Starts a replica of the app on the test's schema, each with a results folder of its own."""
    count = 0

    async def make(**overrides: Any) -> TestClient[Any, Any]:
        nonlocal count
        count += 1
        values: dict[str, Any] = {
            "database_url": postgres_url,
            "public_dir": tmp_path / f"replica-{count}",
            "lease_s": 2.0,
        }
        values.update(overrides)
        client: TestClient[Any, Any] = await make_client(make_settings(**values))
        return client

    return make


async def eventually(check: Callable[[], Awaitable[bool]], what: str) -> None:
    """Wait until ``check()`` holds (the cluster works over real connections); fail after long."""
    deadline = time.monotonic() + _WAIT_S
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened: {what}")
        await asyncio.sleep(0.02)


async def ended(client: TestClient[Any, Any], invocation_id: str) -> dict[str, Any]:
    """The results once the batch has ended, as ``client`` answers them."""
    body: dict[str, Any] = {}

    async def check() -> bool:
        nonlocal body
        body = await results(client, invocation_id)
        return bool(body["status"] not in ("queued", "processing"))

    await eventually(check, f"batch {invocation_id} ended")
    return body


def holds(client: TestClient[Any, Any], invocation_id: str) -> bool:
    return bool(client.app[REGISTRY].holds(invocation_id))


async def test_a_batch_sent_to_one_replica_reads_the_same_through_another(replica):
    a = await replica()
    rows = [{"prompt": f"row {n}", "model": "gated"} for n in range(1, 6)]
    invocation_id = await submit(a, rows)
    b = await replica()
    gated(a).open()
    gated(b).open()

    through_b = await ended(b, invocation_id)
    through_a = await ended(a, invocation_id)
    assert through_b["status"] == "completed"
    assert through_b["csv_content"] == through_a["csv_content"]
    assert [e["result"] for e in through_b["executions"]] == [
        f"answer(row {n})" for n in range(1, 6)
    ]

    listed = await (await b.get(BATCHES, headers=AUTH)).json()
    assert [(x["invocationId"], x["status"]) for x in listed["batches"]] == [
        (invocation_id, "completed")
    ]

    # Whichever replica wrote the workbook, the other makes it from the store.
    for client in (a, b):
        response = await client.get(
            download_path(through_b["xlsx_url"].rsplit("/", 1)[1]), headers=AUTH
        )
        assert response.status == 200
        sheet = sheet_rows(await response.read())
        assert len(sheet) == 6

    stream = await b.get(events_path(invocation_id), headers=AUTH)
    names = [name for name, _ in await read_events(stream)]
    assert names.count("execution") == 5 and names[-1] == "done"


async def test_events_through_another_replica_follow_the_rows_as_they_end(replica):
    a = await replica()
    rows = [{"prompt": f"row {n}", "model": "gated"} for n in range(1, 4)]
    invocation_id = await submit(a, rows)
    await eventually(lambda: _true(holds(a, invocation_id)), "replica A claimed the batch")
    b = await replica()

    stream = await b.get(events_path(invocation_id), headers=AUTH)
    reading = asyncio.create_task(read_events(stream))
    provider = gated(a)
    for n in range(1, 4):
        await provider.wait_started(n)
        provider.open(f"row {n}")
    events = await asyncio.wait_for(reading, _WAIT_S)
    executions = [data for name, data in events if name == "execution"]
    assert sorted(e["index"] for e in executions) == [1, 2, 3]
    assert {e["status"] for e in executions} == {"succeeded"}
    assert events[-1][0] == "done" and events[-1][1]["status"] == "completed"
    assert gated(b).started == []  # B never ran a row of it


async def test_a_cancel_sent_to_another_replica_stops_the_batch_where_it_runs(replica):
    a = await replica(max_threads=1)
    rows = [{"prompt": f"row {n}", "model": "gated"} for n in range(1, 6)]
    invocation_id = await submit(a, rows)
    provider = gated(a)
    await provider.wait_started(1)
    b = await replica()

    response = await b.post(CANCEL, json={"invocation_id": invocation_id}, headers=AUTH)
    assert response.status == 200, await response.text()
    body = await response.json()
    assert body["status"] == "cancelled"
    assert {e["status"] for e in body["executions"]} == {"cancelled"}
    # The call in flight was cancelled, and no other call started after the cancel.
    assert provider.started == ["row 1"]
    assert gated(b).started == []

    again = await b.post(CANCEL, json={"invocation_id": invocation_id}, headers=AUTH)
    assert again.status == 409


async def test_a_queued_batch_nobody_runs_is_cancelled_by_the_replica_asked(replica):
    a = await replica(max_concurrent_batches=1, max_threads=1)
    first = await submit(a, [{"prompt": "hold", "model": "gated"}])
    await gated(a).wait_started(1)
    queued = await submit(a, [{"prompt": "waits", "model": "gated"}])

    response = await a.post(CANCEL, json={"invocation_id": queued}, headers=AUTH)
    body = await response.json()
    assert response.status == 200, body
    assert body["status"] == "cancelled"
    assert "waits" not in gated(a).started
    gated(a).open()
    assert (await ended(a, first))["status"] == "completed"


async def test_a_replica_that_cannot_renew_its_lease_lets_go_and_another_finishes(
    replica, monkeypatch
):
    a = await replica(max_threads=2, lease_s=1.0)
    rows = [{"prompt": f"row {n}", "model": "gated"} for n in range(1, 5)]
    invocation_id = await submit(a, rows)
    provider_a = gated(a)
    await provider_a.wait_started(2)
    provider_a.open("row 1")
    await eventually(
        lambda: _succeeded(a, invocation_id, 1), "row 1 finished on replica A and is durable"
    )
    await provider_a.wait_started(3)

    # A is cut off from the database: its heartbeats and claims fail from now on.
    async def unreachable(*args: Any, **kwargs: Any) -> Any:
        raise StoreError("the database cannot be reached")

    monkeypatch.setattr(a.app[REGISTRY].store, "renew", unreachable)
    monkeypatch.setattr(a.app[REGISTRY].store, "claim", unreachable)
    await eventually(lambda: _true(not holds(a, invocation_id)), "replica A let the batch go")
    assert provider_a.in_flight == 0  # its calls in flight were cancelled
    let_go_at = time.monotonic()

    b = await replica(max_threads=2, lease_s=1.0)
    gated(b).open()
    body = await ended(b, invocation_id)
    assert body["status"] == "completed"
    assert all(e["status"] == "succeeded" for e in body["executions"])
    # Row 1 finished on A and was kept; B ran only the rows A had not finished.
    assert sorted(gated(b).started) == ["row 2", "row 3", "row 4"]
    assert body["executions"][1]["attempts"] == 2  # row 2 was sent once on each
    assert time.monotonic() >= let_go_at


async def test_every_batch_of_many_sent_round_robin_runs_once(replica):
    clients = [await replica(max_concurrent_batches=2) for _ in range(3)]
    for client in clients:
        gated(client).open()
    ids = []
    for n in range(30):
        client = clients[n % 3]
        ids.append(
            await submit(client, [{"prompt": f"b{n} r{r}", "model": "gated"} for r in (1, 2)])
        )
    for invocation_id in ids:
        assert (await ended(clients[0], invocation_id))["status"] == "completed"
    started = [prompt for client in clients for prompt in gated(client).started]
    assert sorted(started) == sorted(f"b{n} r{r}" for n in range(30) for r in (1, 2))


async def test_the_queue_bound_counts_the_batches_no_replica_has_claimed(replica):
    a = await replica(max_concurrent_batches=1, max_queued_batches=1, max_threads=1)
    await submit(a, [{"prompt": "runs", "model": "gated"}])
    await gated(a).wait_started(1)
    await submit(a, [{"prompt": "waits", "model": "gated"}])
    b = await replica(max_concurrent_batches=1, max_queued_batches=1, max_threads=1)
    # B claims the waiting one as it starts; fill its slot too.
    await eventually(lambda: _true(len(gated(b).started) == 1), "replica B took the queued batch")
    await submit(b, [{"prompt": "waits again", "model": "gated"}])
    refused = await b.post(
        "/experience/batch_execution/execute_batch/invoke",
        json={"executions": [{"prompt": "one too many", "model": "gated"}]},
        headers=AUTH,
    )
    assert refused.status == 429


async def test_retry_through_another_replica_reruns_only_the_failed_rows(replica):
    a = await replica()
    gated(a).open()
    invocation_id = await submit(
        a, [{"prompt": "fine", "model": "gated"}, {"prompt": "fail:always", "model": "gated"}]
    )
    assert (await ended(a, invocation_id))["status"] == "completed"
    b = await replica()
    gated(b).open()
    response = await b.post(RETRY, json={"invocation_id": invocation_id}, headers=AUTH)
    assert response.status == 200, await response.text()
    retried = (await response.json())["invocationId"]
    body = await ended(b, retried)
    assert [e["status"] for e in body["executions"]] == ["succeeded", "failed"]
    assert body["executions"][0]["result"] == "answer(fine)"
    started = gated(a).started + gated(b).started
    assert sorted(started) == ["fail:always", "fail:always", "fine"]


async def test_a_replica_stopping_gives_its_batches_to_another_at_once(replica):
    a = await replica(max_threads=1, lease_s=30.0)
    invocation_id = await submit(a, [{"prompt": f"row {n}", "model": "gated"} for n in (1, 2)])
    await gated(a).wait_started(1)
    b = await replica(max_threads=1, lease_s=30.0)
    gated(b).open()
    await a.close()  # a shutdown: the lease is given up, not left to lapse for 30 s
    body = await ended(b, invocation_id)
    assert body["status"] == "completed"
    assert b.app[REPLICA] is not None


async def _true(value: bool) -> bool:
    return value


async def _succeeded(client: TestClient[Any, Any], invocation_id: str, count: int) -> bool:
    batch = client.app[REGISTRY].cached(invocation_id)
    return batch is not None and batch.counts[ExecutionStatus.SUCCEEDED] >= count


async def test_a_batch_goes_on_when_the_database_drops_every_connection(replica):
    a = await replica(max_threads=2)
    rows = [{"prompt": f"row {n}", "model": "gated"} for n in range(1, 7)]
    invocation_id = await submit(a, rows)
    provider = gated(a)
    await provider.wait_started(2)
    provider.open("row 1")
    await eventually(lambda: _succeeded(a, invocation_id, 1), "row 1 finished")

    # What a database restart does to this replica: every connection of it is cut.
    store = a.app[REGISTRY].store
    killer = await asyncpg.connect(base_url())
    try:
        cut = await killer.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE application_name = $1",
            f"batchexec {store.replica}"[:63],
        )
    finally:
        await killer.close()
    assert cut >= 2  # the pool's connections and the listener's

    provider.open()
    body = await ended(a, invocation_id)
    assert body["status"] == "completed"
    assert [e["result"] for e in body["executions"]] == [f"answer(row {n})" for n in range(1, 7)]
    # And notices flow again: a replica started now follows the next batch through events.
    b = await replica()
    second = await submit(b, [{"prompt": "after", "model": "gated"}])
    gated(b).open()
    assert (await ended(a, second))["status"] == "completed"


async def test_an_expired_batchs_workbook_goes_from_every_replicas_disk(replica, tmp_path):
    ttl = {"results_ttl_hours": 2.0 / 3600}
    a = await replica(**ttl)
    gated(a).open()
    invocation_id = await submit(a, [{"prompt": "short-lived", "model": "gated"}])
    body = await ended(a, invocation_id)
    name = body["xlsx_url"].rsplit("/", 1)[1]
    b = await replica(**ttl)
    await a.app[RESULT_WORKBOOKS].idle()
    # B has no copy: the download is made on its disk, from the store.
    assert (await b.get(download_path(name), headers=AUTH)).status == 200
    copies = [
        tmp_path / replica_dir / "batch_execution_results" / name
        for replica_dir in ("replica-1", "replica-2")
    ]
    assert copies[1].is_file()  # B's own, made from the store

    async def gone() -> bool:
        return not any(copy.exists() for copy in copies)

    await eventually(gone, "both copies of the workbook removed")
    response = await b.post(
        "/system/batch_execution/results", json={"invocation_id": invocation_id}, headers=AUTH
    )
    assert response.status == 404


async def test_a_write_the_database_refuses_lets_the_batch_go_to_be_resumed_not_failed(
    replica, monkeypatch
):
    a = await replica(max_threads=2, lease_s=1.0)
    invocation_id = await submit(a, [{"prompt": f"row {n}", "model": "gated"} for n in (1, 2)])
    provider = gated(a)
    await provider.wait_started(2)
    store = a.app[REGISTRY].store
    apply = store.apply
    refused = 0

    async def refuse_once(changes: Any) -> frozenset[str]:
        nonlocal refused
        if refused == 0:
            refused += 1
            raise StoreError("The PostgreSQL store cannot be used: something went wrong")
        lost: frozenset[str] = await apply(changes)
        return lost

    await a.app[REGISTRY].flush()
    monkeypatch.setattr(store, "apply", refuse_once)
    provider.open("row 1")
    await eventually(lambda: _true(refused == 1), "the write of row 1's end was refused")
    provider.open()
    body = await ended(a, invocation_id)
    assert body["status"] == "completed"
    assert [e["result"] for e in body["executions"]] == ["answer(row 1)", "answer(row 2)"]
    # The end that could not be written was never shown; the row ran again.
    assert provider.started.count("row 1") == 2
