"""Scenarios 9 to 11: what keeping batches in SQLite or PostgreSQL costs, next to ``memory://``.

9. ``store-rows``: 10,000 instant echo rows through HTTP, submit until the list
   route shows the batch completed, on a SQLite server, a ``memory://`` server
   and a PostgreSQL server side by side (runs interleaved): SQLite at least
   0.8 x memory and at least 10,000 rows/s; PostgreSQL's figure is reported,
   with no target.
10. ``store-makespan``: scenario 1's 2,000 x 0.1 s rows on the same servers:
    SQLite at most 1.05 x the ideal 2.0 s (the ``memory://`` server's run for
    reference); PostgreSQL's reported.
11. ``store-memory``: a fresh SQLite server's resident memory after 1 and after
    50 finished 10,000-row batches, each read after a few idle seconds: flat
    within 20 %.

The PostgreSQL server runs on a fresh schema of ``BENCH_POSTGRES_URL``'s
server (the local ``test`` database by default), dropped after; where that
server does not answer, its rows say skipped and why.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from batchexec import api
from benchmarks import client as http
from benchmarks import makespan as scenario_makespan
from benchmarks.client import BatchClient
from benchmarks.common import RUNS, Figure, Samples, Target, progress
from benchmarks.overhead import instant_rows
from benchmarks.report import skipped
from benchmarks.server import (
    MEMORY_URL,
    Server,
    postgres_schema,
    postgres_unreachable,
    postgres_where,
)

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


SQLITE, MEMORY, POSTGRES = "SQLite", "memory://", "PostgreSQL"
ROWS_POSTGRES = ("store_rows_postgres", "instant rows/s, PostgreSQL vs memory://")
MAKESPAN_POSTGRES = ("store_makespan_postgres", "makespan vs ideal, PostgreSQL")
NO_TARGET = Target(None, label="report (no target)")


@dataclass(frozen=True)
class StoreServers:
    """The servers of scenarios 9 and 10; no ``postgres`` where ``postgres_skipped`` says why."""

    sqlite: Server
    memory: Server
    postgres: Server | None
    postgres_skipped: str


@dataclass(frozen=True)
class Stores:
    """A client of each of the ``StoreServers``, by store name (PostgreSQL's if it runs)."""

    clients: dict[str, BatchClient]
    postgres_skipped: str

    @classmethod
    def of(cls, servers: StoreServers, session: aiohttp.ClientSession) -> Stores:
        clients = {
            SQLITE: BatchClient(session, servers.sqlite.url),
            MEMORY: BatchClient(session, servers.memory.url),
        }
        if servers.postgres is not None:
            clients[POSTGRES] = BatchClient(session, servers.postgres.url)
        return cls(clients, servers.postgres_skipped)

    def in_turn(self, run: int) -> list[tuple[str, BatchClient]]:
        """The stores in the order run ``run`` uses: each run starts one further along,
        so that a drift of the machine does not favour one."""
        pairs = list(self.clients.items())
        shift = (run - 1) % len(pairs)
        return pairs[shift:] + pairs[:shift]


@contextmanager
def servers(workdir: Path) -> Iterator[StoreServers]:
    """A SQLite, a ``memory://`` and (if reachable) a PostgreSQL server, until the block ends."""
    with ExitStack() as stack:
        sqlite = stack.enter_context(Server(workdir / "store-sqlite", name="sqlite-server"))
        memory = stack.enter_context(
            Server(workdir / "store-memory", name="memory-server", database_url=MEMORY_URL)
        )
        reason = postgres_unreachable()
        postgres = None
        if reason is None:
            url = stack.enter_context(postgres_schema("store"))
            postgres = stack.enter_context(
                Server(workdir / "store-postgres", name="postgres-server", database_url=url)
            )
        on_postgres = f", PostgreSQL server pid {postgres.pid}" if postgres else f"; {reason}"
        progress(
            "store",
            f"SQLite server pid {sqlite.pid}, memory:// server pid {memory.pid}{on_postgres}",
        )
        yield StoreServers(sqlite, memory, postgres, reason or "")


async def warm_up(stores: Stores) -> None:
    for client in stores.clients.values():
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
    """Seconds from submitting ``rows`` until the list route shows them all succeeded;
    then (untimed) until its workbook is written, so that no later run pays for it."""
    started = time.perf_counter()
    batch_id = await client.submit(rows)
    entry = await listed(client, batch_id)
    elapsed = time.perf_counter() - started
    _check(entry, len(rows))
    await client.settle(batch_id)
    return elapsed


def _per_row_us(samples: Samples) -> str:
    return f"{1e6 / samples.median:,.0f} µs per row"


async def rows_per_s(stores: Stores) -> list[Figure]:
    """Scenario 9: the same instant batches on every store, runs interleaved."""
    rows = instant_rows(ROWS)
    values: dict[str, list[float]] = {store: [] for store in stores.clients}
    for run in range(1, RUNS + 1):
        for store, client in stores.in_turn(run):
            seconds = await listed_s(client, rows)
            values[store].append(len(rows) / seconds)
            progress(
                "store rows/s",
                f"run {run}/{RUNS} {store}: {seconds:.3f} s, {values[store][-1]:,.0f} rows/s",
            )
    samples = {store: Samples.of(runs, "rows/s") for store, runs in values.items()}
    on_sqlite, on_memory = samples[SQLITE], samples[MEMORY]
    how = (
        f"{ROWS:,} instant echo rows through HTTP: `execute_batch`, then the list route "
        f"every {POLL_S * 1000:g} ms until it shows the batch completed"
    )
    figures = [
        Figure(
            key="store_rows",
            title="instant rows/s, SQLite vs memory://",
            how=f"{how}; a SQLite server and a memory:// server side by side (and the "
            "PostgreSQL one of the next row), runs interleaved",
            measured=f"SQLite {on_sqlite.text(thousands=True)}; {_per_row_us(on_sqlite)}",
            reference=f"memory:// {on_memory.text(thousands=True)}; {_per_row_us(on_memory)}",
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
    ]
    postgres_how = (
        f"{how}; a server with `DATABASE_URL=postgresql://...` on a fresh schema of "
        f"{postgres_where()}, runs interleaved with the SQLite and memory:// servers above"
    )
    if POSTGRES not in samples:
        figures.append(skipped(*ROWS_POSTGRES, postgres_how, stores.postgres_skipped))
        return figures
    on_postgres = samples[POSTGRES]
    figures.append(
        Figure(
            key=ROWS_POSTGRES[0],
            title=ROWS_POSTGRES[1],
            how=postgres_how,
            measured=f"PostgreSQL {on_postgres.text(thousands=True)}; {_per_row_us(on_postgres)}",
            reference=f"memory:// {on_memory.median:,.0f} rows/s, {_per_row_us(on_memory)}; "
            f"SQLite {on_sqlite.median:,.0f} rows/s, {_per_row_us(on_sqlite)} (same runs)",
            ratio=on_postgres.median / on_memory.median,
            target=NO_TARGET,
            data={
                "samples": on_postgres.as_json(),
                "memory_samples": on_memory.as_json(),
                "sqlite_samples": on_sqlite.as_json(),
                "rows": ROWS,
                "poll_s": POLL_S,
            },
        )
    )
    return figures


async def makespan(stores: Stores) -> list[Figure]:
    """Scenario 10: scenario 1 on every store's server, runs interleaved."""
    rows = scenario_makespan.independent_rows()
    ideal = len(rows) / scenario_makespan.IN_FLIGHT * scenario_makespan.LATENCY_S
    values: dict[str, list[float]] = {store: [] for store in stores.clients}
    for run in range(1, RUNS + 1):
        for store, client in stores.in_turn(run):
            _, elapsed = await scenario_makespan.makespan_s(client, rows)
            values[store].append(elapsed)
            progress("store makespan", f"run {run}/{RUNS} {store}: {elapsed:.3f} s")
    samples = {store: Samples.of(runs, "s") for store, runs in values.items()}
    on_sqlite, on_memory = samples[SQLITE], samples[MEMORY]
    how = (
        f"scenario 1 ({len(rows):,} rows of a {scenario_makespan.LATENCY_S:g} s echo model, "
        f"{scenario_makespan.IN_FLIGHT} in flight, HTTP submit to the `done` event)"
    )
    figures = [
        Figure(
            key="store_makespan",
            title="makespan vs ideal, SQLite",
            how=f"{how} on the SQLite server; the memory:// server's runs interleaved",
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
    ]
    postgres_how = f"{how} on the PostgreSQL server, runs interleaved with the two above"
    if POSTGRES not in samples:
        figures.append(skipped(*MAKESPAN_POSTGRES, postgres_how, stores.postgres_skipped))
        return figures
    on_postgres = samples[POSTGRES]
    figures.append(
        Figure(
            key=MAKESPAN_POSTGRES[0],
            title=MAKESPAN_POSTGRES[1],
            how=postgres_how,
            measured=f"PostgreSQL {on_postgres.text(3)}",
            reference=f"ideal {ideal:.2f} s; memory:// {on_memory.median:.3f} s "
            f"({on_memory.median / ideal:.3f}), SQLite {on_sqlite.median:.3f} s "
            f"({on_sqlite.median / ideal:.3f}) (same runs)",
            ratio=on_postgres.median / ideal,
            target=NO_TARGET,
            data={
                "samples": on_postgres.as_json(),
                "memory_samples": on_memory.as_json(),
                "sqlite_samples": on_sqlite.as_json(),
                "ideal_s": ideal,
            },
        )
    )
    return figures


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
            await client.settle(batch_id)
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
