"""Scenarios 9 to 11: what keeping batches in SQLite costs, next to ``memory://``.

9. ``store-rows``: 10,000 instant echo rows through HTTP, submit until the list
   route shows the batch completed, on a SQLite server and a ``memory://``
   server side by side (runs interleaved): SQLite at least 0.8 x memory and at
   least 10,000 rows/s.
10. ``store-makespan``: scenario 1's 2,000 x 0.1 s rows on the SQLite server:
    at most 1.05 x the ideal 2.0 s (the ``memory://`` server's run for reference).
11. ``store-memory``: a fresh SQLite server's resident memory after 1 and after
    50 finished 10,000-row batches, each read after a few idle seconds: flat
    within 20 %.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from batchexec import api
from benchmarks import client as http
from benchmarks import makespan as scenario_makespan
from benchmarks.client import BatchClient
from benchmarks.common import RUNS, Figure, Samples, Target, progress
from benchmarks.overhead import instant_rows
from benchmarks.server import MEMORY_URL, Server

LIST = api.BATCHES
ROWS = 10_000
#: How often the list route is asked whether the batch has completed.
POLL_S = 0.01
WARM_UP_ROWS = 200
MIN_RATIO = 0.8
TARGET_ROWS_PER_S = 10_000.0
MAKESPAN_MAX = 1.05
MEMORY_BATCHES = 50
MEMORY_MAX = 1.2
#: Idle time before each resident-memory reading, so that it is not caught mid-batch.
IDLE_S = 3.0


@contextmanager
def servers(workdir: Path) -> Iterator[tuple[Server, Server]]:
    """A SQLite server and a ``memory://`` server, both running until the block ends."""
    with (
        Server(workdir / "store-sqlite", name="sqlite-server") as sqlite,
        Server(workdir / "store-memory", name="memory-server", database_url=MEMORY_URL) as memory,
    ):
        progress("store", f"SQLite server pid {sqlite.pid}, memory:// server pid {memory.pid}")
        yield sqlite, memory


async def warm_up(*clients: BatchClient) -> None:
    for client in clients:
        await client.run(instant_rows(WARM_UP_ROWS))


async def listed(client: BatchClient, batch_id: str) -> dict[str, Any]:
    """The batch's entry in the list route, once it shows the batch finished."""
    while True:
        async with client.session.get(
            client.base_url + LIST, params={"limit": "1"}, headers=client.headers
        ) as answer:
            payload = await answer.json()
            if answer.status != 200:
                raise RuntimeError(f"list: HTTP {answer.status}: {str(payload)[:500]}")
        # Newest first, and the harness submits one batch at a time: it is the first.
        entry: dict[str, Any] = payload["batches"][0]
        if entry["invocationId"] != batch_id:
            raise RuntimeError(f"list shows {entry['invocationId']} first, not {batch_id}")
        if entry["status"] in http.FINISHED:
            return entry
        await asyncio.sleep(POLL_S)


def _check(entry: dict[str, Any], total: int) -> None:
    succeeded = entry["progress"]["succeeded"]
    if entry["status"] != "completed" or succeeded != total:
        raise RuntimeError(
            f"batch {entry['invocationId']}: {entry['status']}, {succeeded} of {total} "
            f"succeeded: {entry['message']}"
        )


async def listed_s(client: BatchClient, rows: list[dict[str, str]]) -> float:
    """Seconds from submitting ``rows`` until the list route shows them all succeeded."""
    started = time.perf_counter()
    batch_id = await client.submit(rows)
    entry = await listed(client, batch_id)
    elapsed = time.perf_counter() - started
    _check(entry, len(rows))
    return elapsed


async def rows_per_s(sqlite: BatchClient, memory: BatchClient) -> Figure:
    """Scenario 9: the same instant batches on both stores, runs interleaved."""
    rows = instant_rows(ROWS)
    values: dict[str, list[float]] = {"SQLite": [], "memory://": []}
    for run in range(1, RUNS + 1):
        pair = [("SQLite", sqlite), ("memory://", memory)]
        # Alternate which goes first, so a drift of the machine does not favour one.
        for store, client in pair if run % 2 else pair[::-1]:
            seconds = await listed_s(client, rows)
            values[store].append(len(rows) / seconds)
            progress(
                "store rows/s",
                f"run {run}/{RUNS} {store}: {seconds:.3f} s, {values[store][-1]:,.0f} rows/s",
            )
    on_sqlite = Samples.of(values["SQLite"], "rows/s")
    on_memory = Samples.of(values["memory://"], "rows/s")
    return Figure(
        key="store_rows",
        title="instant rows/s, SQLite vs memory://",
        how=f"{ROWS:,} instant echo rows through HTTP: `execute_batch`, then the list route "
        f"every {POLL_S * 1000:g} ms until it shows the batch completed; a SQLite server and a "
        "memory:// server side by side, runs interleaved",
        measured=f"SQLite {on_sqlite.text(thousands=True)}",
        reference=f"memory:// {on_memory.text(thousands=True)}",
        ratio=on_sqlite.median / on_memory.median,
        target=Target(
            ">=", MIN_RATIO, f">= {MIN_RATIO:g}, SQLite >= {TARGET_ROWS_PER_S:,.0f} rows/s"
        ),
        also_met=on_sqlite.median >= TARGET_ROWS_PER_S,
        data={
            "samples": on_sqlite.as_json(),
            "memory_samples": on_memory.as_json(),
            "rows": ROWS,
            "poll_s": POLL_S,
        },
    )


async def makespan(sqlite: BatchClient, memory: BatchClient) -> Figure:
    """Scenario 10: scenario 1 on the SQLite server, the memory:// server for reference."""
    rows = scenario_makespan.independent_rows()
    ideal = len(rows) / scenario_makespan.IN_FLIGHT * scenario_makespan.LATENCY_S
    values: dict[str, list[float]] = {"SQLite": [], "memory://": []}
    for run in range(1, RUNS + 1):
        pair = [("SQLite", sqlite), ("memory://", memory)]
        for store, client in pair if run % 2 else pair[::-1]:
            _, elapsed = await scenario_makespan.makespan_s(client, rows)
            values[store].append(elapsed)
            progress("store makespan", f"run {run}/{RUNS} {store}: {elapsed:.3f} s")
    on_sqlite = Samples.of(values["SQLite"], "s")
    on_memory = Samples.of(values["memory://"], "s")
    return Figure(
        key="store_makespan",
        title="makespan vs ideal, SQLite",
        how=f"scenario 1 ({len(rows):,} rows of a {scenario_makespan.LATENCY_S:g} s echo model, "
        f"{scenario_makespan.IN_FLIGHT} in flight, HTTP submit to the `done` event) on the "
        "SQLite server; the memory:// server's runs interleaved",
        measured=f"SQLite {on_sqlite.text(3)}",
        reference=f"ideal {ideal:.2f} s; memory:// {on_memory.text(3)} "
        f"({on_memory.median / ideal:.3f})",
        ratio=on_sqlite.median / ideal,
        target=Target("<=", MAKESPAN_MAX),
        data={
            "samples": on_sqlite.as_json(),
            "memory_samples": on_memory.as_json(),
            "ideal_s": ideal,
        },
    )


def memory_growth(workdir: Path) -> Figure:
    """Scenario 11, on a server of its own: nothing but these batches in its store."""
    with Server(workdir / "store-rss", name="sqlite-rss-server") as server:
        progress("store memory", f"SQLite server pid {server.pid}")
        return asyncio.run(_memory_growth(server))


async def _memory_growth(server: Server) -> Figure:
    rows = instant_rows(ROWS)
    after_each: list[float] = []
    async with http.session() as session:
        client = BatchClient(session, server.url)
        for batch in range(1, MEMORY_BATCHES + 1):
            batch_id = await client.run(rows)
            _check(await listed(client, batch_id), len(rows))
            after_each.append(server.rss_mb())
            if batch == 1:
                await asyncio.sleep(IDLE_S)
                first_mb = server.rss_mb()
                progress("store memory", f"after 1 batch: {first_mb:.1f} MB")
            elif batch % 10 == 0:
                progress("store memory", f"after {batch} batches: {after_each[-1]:.1f} MB")
        await asyncio.sleep(IDLE_S)
        last_mb = server.rss_mb()
    peak_mb = server.peak_rss_mb()
    progress("store memory", f"after {MEMORY_BATCHES} batches: {last_mb:.1f} MB")
    return Figure(
        key="store_memory",
        title="memory after 50 batches vs 1, SQLite",
        how=f"a fresh SQLite server's RSS (`VmRSS`) {IDLE_S:g} s after its 1st and its "
        f"{MEMORY_BATCHES}th finished batch of {ROWS:,} instant echo rows, run one after "
        "another (submit to the `done` event)",
        measured=f"{last_mb:,.0f} MB after {MEMORY_BATCHES} (peak `VmHWM` {peak_mb:,.0f} MB)",
        reference=f"{first_mb:,.0f} MB after 1",
        ratio=last_mb / first_mb,
        target=Target("<=", MEMORY_MAX, f"<= {MEMORY_MAX:g} (flat within 20 %)"),
        data={
            "first_mb": first_mb,
            "last_mb": last_mb,
            "peak_mb": peak_mb,
            "after_each_batch_mb": after_each,
            "batches": MEMORY_BATCHES,
            "rows": ROWS,
            "idle_s": IDLE_S,
        },
    )
