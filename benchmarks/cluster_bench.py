"""Scenario 14, ``cluster-replicas``: 1, 2 and 3 replicas on one PostgreSQL schema, latency-bound.

30 batches of 40 rows of a 0.1 s model, an OpenAI-compatible echo in its own
process (``benchmarks.counting_provider``), so every call is real HTTP. Each
replica runs ``DEFAULT_MAX_THREADS=10`` rows of a batch at once and
``MAX_CONCURRENT_BATCHES=2`` batches: one replica is bound by its batch slots,
and each replica more adds two. The batches are submitted one after another,
round-robin to the replicas (batch k to replica k mod N); the makespan runs
from the first submit to the latest ``finished_at`` of the 30, read from the
list route once it shows them all completed (asked every 0.25 s, of each
replica in turn). Every run of every N has a fresh schema and fresh
replicas; for reference, each run also times one ``memory://`` server with the
same settings (what one process costs without the shared store), and the
four are interleaved.

Afterwards, outside the clock: every batch completed with each row's own
echo (the results route of the replica it was sent to), the provider's log
holds each prompt exactly once (no row ran twice, none was lost), and the
store says which replica ran each batch and for how long. The CPU time of the
replicas and of the machine's ``postgres`` processes within the makespan, and
the most calls the provider held at once, say what bound the run.

The ideal makespan is ``ceil(30 / (2 N))`` waves of ``ceil(40 / 10) x 0.1 s``:
6.0, 3.2 and 2.0 s. No target is set; the speed-ups over one replica are
reported.
"""

from __future__ import annotations

import asyncio
import math
import os
import statistics
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg

from batchexec import api
from benchmarks import client as http
from benchmarks.client import BatchClient
from benchmarks.common import RUNS, Figure, Samples, Target, progress
from benchmarks.counting_provider import read_calls, read_log
from benchmarks.report import skipped
from benchmarks.server import (
    MEMORY_URL,
    ModuleProcess,
    Server,
    postgres_schema,
    postgres_unreachable,
    postgres_where,
)

BATCHES = 30
ROWS = 40
LATENCY_S = 0.1
THREADS = 10
SLOTS = 2
REPLICAS = (1, 2, 3)
#: What a run measures, in turn: the replicas on PostgreSQL, and (None) one memory:// server
#: with the same settings, for reference.
CONFIGURATIONS: tuple[int | None, ...] = (*REPLICAS, None)
MODEL = "bench-openai-100ms"
#: How often the list route is asked whether every batch has finished. The makespan is
#: read from the batches' ``finished_at``, not from when a poll saw them: polls every
#: 50 ms cost the replicas about as much CPU as a third of their rows.
POLL_S = 0.25
#: A run that takes longer than this failed (a stall).
RUN_TIMEOUT_S = 120.0
WARM_UP_ROWS = 10
_PROVIDER_START_TIMEOUT_S = 30.0
#: Each figure's key and title; the first is also the skipped or failed row's.
KEYS = {
    1: ("cluster_1", "latency-bound batches, 1 replica on PostgreSQL"),
    2: ("cluster_2", "latency-bound batches, 2 replicas vs 1"),
    3: ("cluster_3", "latency-bound batches, 3 replicas vs 1"),
}
SKIPPED_TITLE = "latency-bound batches on 1, 2 and 3 replicas (PostgreSQL)"


def ideal_s(replicas: int) -> float:
    """Waves of batches the slots allow, times a batch's waves of rows the threads allow."""
    waves = math.ceil(BATCHES / (replicas * SLOTS))
    return waves * math.ceil(ROWS / THREADS) * LATENCY_S


def catalog(provider_url: str) -> str:
    """The model the replicas add to the harness's catalog: the provider, 0.1 s a call."""
    return f'[models."{MODEL}"]\nprovider = "openai"\nbase_url = "{provider_url}/v1"\n'


@dataclass(frozen=True)
class Run:
    """One run on N replicas (or the memory:// server): the makespan, and what the store
    and the provider saw."""

    replicas: int
    #: ``postgresql`` (the replicas) or ``memory`` (the one reference server).
    store: str
    makespan_s: float
    submit_s: float
    #: Batches each replica ran, by its position (0 for the first).
    ran_by: list[int]
    #: The share of the replicas' batch slots busy with a batch over the makespan (the
    #: store's times; None for memory://, as are the next two).
    slot_use: float | None
    #: Median seconds from a batch's start to its end, in the store.
    batch_s: float | None
    #: Median seconds from a batch's submission to its start, in the store.
    wait_s: float | None
    #: Calls beyond one per prompt, and prompts never sent.
    repeated_calls: int
    missing_calls: int
    #: CPU seconds the replicas spent within the makespan, all together.
    replicas_cpu_s: float
    #: CPU seconds of the PostgreSQL server's processes meanwhile (if it runs here).
    postgres_cpu_s: float
    #: The most calls the provider held at once (at most threads x slots x replicas).
    most_in_flight: int
    #: The share of the machine's CPU time (every core, every process) busy meanwhile.
    machine_busy: float


def _prompts(run: int, where: str, batch: int) -> list[str]:
    return [f"Run {run}, {where}, batch {batch}, row {row}" for row in range(ROWS)]


def _cpu_s(pid: int) -> float:
    """User and system CPU seconds of process ``pid`` so far (``/proc/PID/stat``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _postgres_cpu_s() -> float:
    """CPU seconds of every ``postgres`` process on this machine so far (0 where none is)."""
    total = 0.0
    for comm in Path("/proc").glob("[0-9]*/comm"):
        try:
            if comm.read_text().strip() == "postgres":
                total += _cpu_s(int(comm.parent.name))
        except (OSError, ValueError):
            pass  # gone meanwhile
    return total


def _machine_ticks() -> tuple[int, int]:
    """The machine's CPU ticks so far: busy, and in all (``/proc/stat``)."""
    ticks = [int(n) for n in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    idle = ticks[3] + ticks[4]  # idle and iowait
    return sum(ticks) - idle, sum(ticks)


class Provider(ModuleProcess):
    """The counting echo, ``LATENCY_S`` a call, every call appended to a log."""

    def __init__(self, workdir: Path) -> None:
        self.calls_path = workdir / "cluster-calls.log"
        super().__init__(
            "benchmarks.counting_provider",
            workdir / "cluster-provider.log",
            ["--latency-s", str(LATENCY_S), "--log", str(self.calls_path)],
            name="counting provider",
            start_timeout_s=_PROVIDER_START_TIMEOUT_S,
        )

    def calls(self) -> Counter[str]:
        return Counter(prompt for _, prompt in read_calls(self.calls_path))

    def lines(self) -> int:
        """How many arrivals and ends the log holds so far."""
        return len(read_log(self.calls_path))

    def most_in_flight(self, since: int) -> int:
        """The most calls held at once after the log's first ``since`` lines (none in flight)."""
        in_flight = most = 0
        for _, _, end in read_log(self.calls_path)[since:]:
            in_flight += -1 if end else 1
            most = max(most, in_flight)
        return most


def _server(workdir: Path, name: str, database_url: str, provider_url: str) -> Server:
    return Server(
        workdir / name,
        max_threads=THREADS,
        name=name,
        database_url=database_url,
        models=catalog(provider_url),
        settings={"MAX_CONCURRENT_BATCHES": str(SLOTS)},
    )


@contextmanager
def cluster(
    workdir: Path, replicas: int | None, provider_url: str
) -> Iterator[tuple[str | None, list[Server]]]:
    """``replicas`` servers on a fresh schema (its URL, and them), or with None one memory://
    server (no URL); all gone after the block."""
    with ExitStack() as stack:
        if replicas is None:
            server = _server(workdir, "memory-server", MEMORY_URL, provider_url)
            yield None, [stack.enter_context(server)]
            return
        url = stack.enter_context(postgres_schema(f"cluster{replicas}"))
        servers = [
            stack.enter_context(_server(workdir, f"replica-{n}", url, provider_url))
            for n in range(1, replicas + 1)
        ]
        yield url, servers


def replicas(workdir: Path) -> list[Figure]:
    """Scenario 14: a skipped row when PostgreSQL does not answer."""
    reason = postgres_unreachable()
    if reason is not None:
        progress("cluster", f"skipped: {reason}")
        return [skipped(KEYS[1][0], SKIPPED_TITLE, _how("1, 2 and 3 replicas"), reason)]
    runs: dict[int | None, list[Run]] = {n: [] for n in CONFIGURATIONS}
    logs: list[Path] = []
    (workdir / "cluster").mkdir(parents=True, exist_ok=True)
    provider = Provider(workdir / "cluster")
    provider.start()
    try:
        for run in range(1, RUNS + 1):
            shift = (run - 1) % len(CONFIGURATIONS)
            for n in CONFIGURATIONS[shift:] + CONFIGURATIONS[:shift]:
                where = "1 memory:// server" if n is None else f"{n} replicas"
                folder = workdir / "cluster" / f"run-{run}-{n or 'memory'}"
                with cluster(folder, n, provider.url) as (url, servers):
                    pids = ", ".join(str(server.pid) for server in servers)
                    progress("cluster", f"run {run}/{RUNS}: {where} (pids {pids})")
                    result = asyncio.run(_run(run, where, url, servers, provider))
                    logs += [server.log_path for server in servers]
                runs[n].append(result)
                progress("cluster", f"run {run}/{RUNS}, {where}: {_run_text(result)}")
    finally:
        provider.stop()
    complaints = _complaints(logs)
    for line in complaints[:10]:
        progress("cluster", f"replica log: {line}")
    return _figures(runs, complaints)


def _run_text(result: Run) -> str:
    """One run's figures, for its progress line."""
    rows = BATCHES * ROWS
    text = f"{result.makespan_s:.3f} s, {rows / result.makespan_s:,.0f} rows/s; "
    if result.store == "postgresql":
        text += (
            f"batches per replica {'/'.join(map(str, result.ran_by))}; slots busy "
            f"{result.slot_use:.0%}; a batch {result.batch_s:.2f} s, waited "
            f"{result.wait_s:.2f} s (medians); PostgreSQL's CPU "
            f"{result.postgres_cpu_s * 1e6 / rows:,.0f} µs a row; "
        )
    return (
        f"{text}server CPU {result.replicas_cpu_s * 1e6 / rows:,.0f} µs a row; machine "
        f"{result.machine_busy:.0%} busy; at most {result.most_in_flight} calls in flight"
    )


async def _run(
    run: int, where: str, url: str | None, servers: list[Server], provider: Provider
) -> Run:
    async with http.session() as session:
        clients = [BatchClient(session, server.url) for server in servers]
        for client in clients:
            await client.run([{"prompt": "Warm-up", "model": MODEL}] * WARM_UP_ROWS)
        batches = [_prompts(run, where, batch) for batch in range(BATCHES)]
        bodies = [[{"prompt": p, "model": MODEL} for p in prompts] for prompts in batches]
        sent_to: dict[str, tuple[BatchClient, list[str]]] = {}
        pids = [server.pid for server in servers]
        cpu_before = sum(_cpu_s(pid) for pid in pids)
        postgres_before = _postgres_cpu_s()
        busy_before, all_before = _machine_ticks()
        logged = provider.lines()
        started = time.perf_counter()
        started_at = time.time()  # the clock of the servers' ``finished_at``
        for number, body in enumerate(bodies):
            client = clients[number % len(clients)]
            sent_to[await client.submit(body)] = (client, batches[number])
        submit_s = time.perf_counter() - started
        async with asyncio.timeout(RUN_TIMEOUT_S):
            last_end = await _all_finished(clients, set(sent_to))
        makespan_s = last_end - started_at
        replicas_cpu_s = sum(_cpu_s(pid) for pid in pids) - cpu_before
        postgres_cpu_s = _postgres_cpu_s() - postgres_before
        busy_after, all_after = _machine_ticks()
        for batch_id, (client, prompts) in sent_to.items():
            await _check(client, batch_id, prompts)
    calls = provider.calls()
    sent = [prompt for prompts in batches for prompt in prompts]
    held = [] if url is None else await _held(url, list(sent_to), pids)
    busy_s = sum(end - start for _, start, end, _ in held)
    return Run(
        replicas=len(servers),
        store="memory" if url is None else "postgresql",
        makespan_s=makespan_s,
        submit_s=submit_s,
        ran_by=[sum(1 for owner, *_ in held if owner == n) for n in range(len(servers))]
        if held
        else [BATCHES],
        slot_use=busy_s / (len(servers) * SLOTS * makespan_s) if held else None,
        batch_s=statistics.median(end - start for _, start, end, _ in held) if held else None,
        wait_s=statistics.median(start - created for _, start, _, created in held)
        if held
        else None,
        repeated_calls=sum(max(calls[prompt] - 1, 0) for prompt in sent),
        missing_calls=sum(1 for prompt in sent if not calls[prompt]),
        replicas_cpu_s=replicas_cpu_s,
        postgres_cpu_s=postgres_cpu_s,
        most_in_flight=provider.most_in_flight(logged),
        machine_busy=(busy_after - busy_before) / max(all_after - all_before, 1),
    )


async def _all_finished(clients: list[BatchClient], batch_ids: set[str]) -> float:
    """Once the list route shows every batch of ``batch_ids`` finished (each replica asked in
    turn), the latest of their ``finished_at``, in epoch seconds."""
    turn = 0
    while True:
        client = clients[turn % len(clients)]
        turn += 1
        async with client.session.get(
            client.base_url + api.BATCHES, params={"limit": str(BATCHES)}, headers=client.headers
        ) as answer:
            payload = await answer.json()
            if answer.status != 200:
                raise RuntimeError(f"list: HTTP {answer.status}: {str(payload)[:500]}")
        listed = {entry["invocationId"]: entry for entry in payload["batches"]}
        if all(listed.get(b, {}).get("status") in http.FINISHED for b in batch_ids):
            return max(
                datetime.fromisoformat(listed[b]["finished_at"]).timestamp() for b in batch_ids
            )
        await asyncio.sleep(POLL_S)


async def _check(client: BatchClient, batch_id: str, prompts: list[str]) -> None:
    """The batch completed and every row's result is its own prompt (the echo)."""
    payload = await client.check_succeeded(batch_id, len(prompts))
    results = {e["index"]: e["result"] for e in payload["executions"]}
    wrong = [n for n, prompt in enumerate(prompts, start=1) if results.get(n) != prompt]
    if wrong:
        raise RuntimeError(f"batch {batch_id}: rows {wrong[:10]} lack their own echo")


async def _held(
    url: str, batch_ids: list[str], pids: list[int]
) -> list[tuple[int, float, float, float]]:
    """Each batch's replica (by position, -1 if none of these), start, end and submission."""
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(
            "SELECT lease_owner, started_at, finished_at, created_at FROM batches "
            "WHERE id = ANY($1::text[])",
            batch_ids,
        )
    finally:
        await conn.close()

    def position(owner: str | None) -> int:
        # A replica's lease name is host:pid:random.
        pid = (owner or "").split(":")[-2:-1]
        return pids.index(int(pid[0])) if pid and int(pid[0]) in pids else -1

    return [
        (
            position(row["lease_owner"]),
            row["started_at"],
            row["finished_at"],
            row["created_at"],
        )
        for row in rows
    ]


def _complaints(logs: list[Path]) -> list[str]:
    """The replicas' log lines that say WARNING, ERROR or Traceback."""
    lines: list[str] = []
    for path in logs:
        text = path.read_text(errors="replace") if path.exists() else ""
        lines += [
            f"{path.parent.name}/{path.name}: {line.strip()}"
            for line in text.splitlines()
            if any(word in line for word in ("WARNING", "ERROR", "Traceback"))
        ]
    return lines


def _how(replicas: str = "1 replica") -> str:
    return (
        f"{BATCHES} batches x {ROWS} rows of a {LATENCY_S:g} s OpenAI-compatible echo (its own "
        f"process); {replicas} (`DEFAULT_MAX_THREADS={THREADS}`, `MAX_CONCURRENT_BATCHES="
        f"{SLOTS}` each) on a fresh schema of {postgres_where()}; submitted round-robin; first "
        "submit to the last batch's `finished_at` (list route); 1, 2, 3 replicas and one "
        "memory:// server interleaved, fresh servers and schema each run"
    )


def _median_of(runs: list[Run], value: Callable[[Run], float | None]) -> float:
    return statistics.median(v for v in map(value, runs) if v is not None)


def _cpu_text(runs: list[Run], who: str = "server", *, postgres: bool = True) -> str:
    rows = BATCHES * ROWS
    replicas_us = _median_of(runs, lambda r: r.replicas_cpu_s) * 1e6 / rows
    postgres_us = _median_of(runs, lambda r: r.postgres_cpu_s) * 1e6 / rows
    busy = _median_of(runs, lambda r: r.machine_busy)
    on_postgres = f", PostgreSQL {postgres_us:,.0f} µs" if postgres else ""
    return f"CPU a row: {who} {replicas_us:,.0f} µs{on_postgres}; machine {busy:.0%} busy"


def _figures(runs: dict[int | None, list[Run]], complaints: list[str]) -> list[Figure]:
    makespans = {n: Samples.of([r.makespan_s for r in runs[n]], "s") for n in CONFIGURATIONS}
    rows = BATCHES * ROWS

    def summary(n: int) -> str:
        median = makespans[n].median
        split = "/".join(map(str, _median_split(runs[n])))
        return (
            f"{n} replica{'s' if n > 1 else ''} {makespans[n].text(3)}, {rows / median:,.0f} "
            f"rows/s; {f'batches per replica {split}, ' if n > 1 else ''}slots busy "
            f"{_median_of(runs[n], lambda r: r.slot_use):.0%}, at most "
            f"{max(r.most_in_flight for r in runs[n])} calls in flight; "
            + _cpu_text(runs[n], "replicas" if n > 1 else "replica")
        )

    repeated = sum(r.repeated_calls for n in CONFIGURATIONS for r in runs[n])
    missing = sum(r.missing_calls for n in CONFIGURATIONS for r in runs[n])
    checks = f"calls repeated {repeated}, missing {missing}; replica log warnings {len(complaints)}"

    def data(n: int) -> dict[str, Any]:
        return {
            "samples": makespans[n].as_json(),
            "ideal_s": ideal_s(n),
            "rows_per_s": rows / makespans[n].median,
            "runs": [r.__dict__ for r in runs[n]],
            "memory_samples": makespans[None].as_json(),
            "memory_runs": [r.__dict__ for r in runs[None]],
            "complaints": complaints[:50],
        }

    one, memory = makespans[1].median, makespans[None]
    figures = [
        Figure(
            key=KEYS[1][0],
            title=KEYS[1][1],
            how=_how(),
            measured=summary(1),
            reference=f"ideal {ideal_s(1):.1f} s ({math.ceil(BATCHES / SLOTS)} waves of "
            f"{SLOTS} batches x {math.ceil(ROWS / THREADS)} x {LATENCY_S:g} s); one memory:// "
            f"server {memory.text(3)} ({memory.median / ideal_s(1):.3f}), "
            f"{_cpu_text(runs[None], postgres=False)}; {checks}",
            ratio=one / ideal_s(1),
            target=Target(None, label="report (no target)"),
            data=data(1),
        )
    ]
    for n in REPLICAS[1:]:
        ideal_speed_up = ideal_s(1) / ideal_s(n)
        figures.append(
            Figure(
                key=KEYS[n][0],
                title=KEYS[n][1],
                how=f"the same on {n} replicas; speed-up of the makespan over 1 replica",
                measured=summary(n),
                reference=f"1 replica {one:.3f} s, {rows / one:,.0f} rows/s; ideal "
                f"{ideal_s(n):.1f} s (speed-up {ideal_speed_up:.2f})",
                ratio=one / makespans[n].median,
                target=Target(None, label="report the speed-up (no target)"),
                data=data(n),
            )
        )
    return figures


def _median_split(runs: list[Run]) -> list[int]:
    """The batches each replica ran, in the run of median makespan."""
    ordered = sorted(runs, key=lambda r: r.makespan_s)
    return ordered[len(ordered) // 2].ran_by
