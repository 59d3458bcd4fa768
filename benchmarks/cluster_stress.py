"""Replicas on one PostgreSQL database, under stress: ``python -m benchmarks.cluster_stress``.

Each scenario starts real ``python -m batchexec serve`` replicas (every
batchexec variable removed from their environment, then only the scenario's
settings set, as ``benchmarks/stress.py`` does), each on its own port and
with its own ``PUBLIC_DIR``, all with the same ``DATABASE_URL``: a fresh
schema of ``BENCH_POSTGRES_URL``'s server (the local ``test`` database by
default), made for the scenario and dropped after it. ``LEASE_S`` is 2 s.
Their catalog (``BATCHEXEC_MODELS``) has one model, ``counted``, of the
``openai`` provider with no ``base_url``: it follows ``OPENAI_BASE_URL`` to
the counting echo (``benchmarks/counting_provider.py``, its own process,
which logs every call as it arrives and again as it ends). Which replica
runs a batch is read from the database: ``batches.lease_owner`` is
``host:pid:random``.

1. **kill -9 of the replica running a 500-row batch** (two replicas, 0.2 s a
   call, ``DEFAULT_MAX_THREADS=10``): once about half the rows have
   finished (read from the results route of the replica holding the lease,
   just before the kill), that replica gets SIGKILL. The other must take
   the batch over once the lease has lapsed, and not before: its first call
   comes no earlier than the ``lease_until`` read at the kill, and within a
   few seconds of it. Every row finished before the kill keeps its result
   and is called only once; all calls at most 500 + 10; the results and the
   workbook, both through the survivor, hold every row, succeeded, each its
   own echo; the database names the survivor as the batch's last owner.
2. **30 batches round-robin over three replicas** (10 rows each, 0.05 s a
   call, all submitted at once, batch n to replica n mod 3): every batch
   completes, every row its own echo (read through another replica than the
   one it was submitted to), the provider sees each of the 300 prompts
   exactly once (and nothing else), and every replica ran at least one
   batch (its last owner in the database).
3. **max_concurrency = 10 across three replicas** (the model's catalog entry
   says so; 0.2 s a call; six 40-row batches, two a replica, with
   ``DEFAULT_MAX_THREADS=10`` and ``MAX_CONCURRENT_BATCHES=2``, so that the
   replicas together want up to 60 calls at once, 30 if the limit held per
   process only): the provider must never hold more than 10 calls at once
   (arrivals less ends, in its log's order). The replicas must have run
   batches at the same time (from ``started_at``/``finished_at``), or the
   check proves nothing; the throughput is printed beside its bound, 10
   calls / 0.2 s = 50 calls/s. Every row succeeded with its own echo, each
   prompt called once.
4. **PostgreSQL restarted during a batch** (two replicas, 300 rows, 0.1 s a
   call, 10 threads): once about a third has finished, the local cluster
   serving ``BENCH_POSTGRES_URL`` is stopped (``pg_ctlcluster stop``, found
   by its port with ``pg_lsclusters``) and started again ``--pg-down-s``
   later (3 s by default: longer than the lease, so the holder lets the
   batch go and it is claimed again once the database is back). Each
   replica must then tell the batch completed, every row succeeded with its
   own echo, and serve its workbook; a row may be called more than once
   only if one of its calls was in flight while the database was away
   (arrived before it accepted connections again, ended after the stop was
   sent, less 0.1 s for a commit under way). Printed: the calls and
   duplicates, how long PostgreSQL took to go and come back, the pause (the
   longest gap between two calls), the longest gap once it was back, and
   each replica's claims and let-gos of the batch (from its log).
   PostgreSQL is started again if it is down at the end, whatever happened.

Each scenario prints its figures and a PASS or FAIL line per check; the run
exits 1 if any check fails. Every wait is bounded. ``--only N`` runs
scenario N alone; a full run takes about a minute.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import asyncpg

from benchmarks import stress
from benchmarks.common import progress
from benchmarks.counting_provider import most_in_flight, read_log
from benchmarks.server import POSTGRES_URL, postgres_schema, postgres_unreachable, postgres_where
from benchmarks.stress import (
    FINISHED,
    MODEL,
    RESULTS,
    Api,
    Provider,
    Service,
    StopScenario,
    duplicates,
    lost_rows,
    read_workbook,
    sample,
    workbook_lost,
)

LEASE_S = 2.0
#: What a poll of the cluster waits between two looks.
POLL_S = 0.05
#: Hard bounds, so that a cluster that hangs makes a FAIL rather than a stuck run.
SCENARIO_TIMEOUT_S = 300.0
BATCH_TIMEOUT_S = 120.0
LEASE_TIMEOUT_S = 20.0
REQUEST_TIMEOUT_S = 30.0
CONNECT_TIMEOUT_S = 5.0
PG_CTL_TIMEOUT_S = 60.0
PG_READY_TIMEOUT_S = 60.0

#: Scenario 1: the batch, the provider's latency, the threads, when to kill.
KILL_ROWS = 500
KILL_LATENCY_S = 0.2
KILL_THREADS = 10
KILL_AT_FRACTION = 0.5
#: A call logged this soon after the kill was sent by the killed replica before it died.
STRAGGLER_S = 0.1
#: The survivor's first call comes at most this long after the lease lapsed: a claim
#: poll (1 s at most) and the batch read back and planned again.
TAKEOVER_SLACK_S = 5.0
#: Python's clock and PostgreSQL's are the same machine's: a little rounding at most.
CLOCK_TOLERANCE_S = 0.05

#: Scenario 2.
ROUND_ROBIN_BATCHES = 30
ROUND_ROBIN_ROWS = 10
ROUND_ROBIN_LATENCY_S = 0.05

#: Scenario 3.
LIMIT = 10
LIMITED_BATCHES = 6
LIMITED_ROWS = 40
LIMITED_LATENCY_S = 0.2
LIMITED_THREADS = 10
LIMITED_BATCHES_A_REPLICA = 2

#: Scenario 4.
RESTART_ROWS = 300
RESTART_LATENCY_S = 0.1
RESTART_THREADS = 10
RESTART_AT_FRACTION = 1 / 3
PG_DOWN_S = 3.0
#: A row whose call ended this long before the stop was sent may still have been on
#: its way to a commit that the stop cut off.
COMMIT_SLACK_S = 0.1

ENDED_COUNTS = ("succeeded", "failed", "skipped", "cancelled")


class Report(stress.Report):
    """``stress.Report``, its progress lines under this script's name."""

    def check(self, scenario: str, passed: bool, detail: str) -> None:
        self.checks.append((scenario, passed, detail))
        progress("cluster-stress", f"{'PASS' if passed else 'FAIL'} {scenario}: {detail}")


# The database


@dataclass(frozen=True)
class Lease:
    """What the ``batches`` table says of one batch: its status and who runs (or ran) it."""

    status: str
    owner: str | None
    #: Epoch seconds on the database's clock; None once released or ended.
    until: float | None
    started_at: float | None
    finished_at: float | None

    @property
    def pid(self) -> int | None:
        """The process id in the owner's name, ``host:pid:random``."""
        parts = (self.owner or "").rsplit(":", 2)
        return int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else None


async def read_leases(database_url: str, batch_ids: Sequence[str]) -> dict[str, Lease]:
    """The batches ``batch_ids`` as the database holds them now (one connection of its own)."""
    conn = await asyncio.wait_for(
        asyncpg.connect(database_url, timeout=CONNECT_TIMEOUT_S), CONNECT_TIMEOUT_S
    )
    try:
        rows = await conn.fetch(
            "SELECT id, status, lease_owner, lease_until, started_at, finished_at "
            "FROM batches WHERE id = ANY($1::text[])",
            list(batch_ids),
        )
    finally:
        await conn.close()
    return {row[0]: Lease(row[1], row[2], row[3], row[4], row[5]) for row in rows}


@dataclass(frozen=True)
class PostgresCluster:
    """The local PostgreSQL cluster (Debian's ``pg_ctlcluster``) behind a URL, to stop and start."""

    version: str
    name: str
    host: str
    port: int

    @classmethod
    def serving(cls, url: str) -> PostgresCluster:
        """The ``pg_lsclusters`` cluster on ``url``'s port; ``RuntimeError`` if there is none."""
        parts = urlsplit(url)
        host, port = parts.hostname or "127.0.0.1", parts.port or 5432
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise RuntimeError(f"cannot restart PostgreSQL at {host}: not this machine's")
        listed = subprocess.run(
            ["pg_lsclusters", "--no-header"],  # noqa: S607 - the PATH's, as a person would
            capture_output=True,
            text=True,
            check=True,
            timeout=PG_CTL_TIMEOUT_S,
        )
        for line in listed.stdout.splitlines():
            fields = line.split()
            if len(fields) >= 3 and fields[2] == str(port):
                return cls(fields[0], fields[1], host, port)
        raise RuntimeError(f"no local PostgreSQL cluster listens on port {port} (pg_lsclusters)")

    def control(self, action: str) -> None:
        """``pg_ctlcluster VERSION NAME ACTION``; ``RuntimeError`` with its output if it fails."""
        command = ["pg_ctlcluster", "--skip-systemctl-redirect", self.version, self.name, action]
        done = subprocess.run(  # noqa: S603 - our own arguments
            command,
            capture_output=True,
            text=True,
            timeout=PG_CTL_TIMEOUT_S,
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"pg_ctlcluster {self.version} {self.name} {action}: exit {done.returncode}: "
                f"{(done.stderr or done.stdout).strip()[:300]}"
            )

    def ready(self) -> bool:
        """Whether the server accepts connections (``pg_isready``)."""
        done = subprocess.run(  # noqa: S603 - fixed arguments
            ["pg_isready", "-q", "-h", self.host, "-p", str(self.port)],  # noqa: S607
            timeout=PG_CTL_TIMEOUT_S,
            check=False,
        )
        return done.returncode == 0

    def wait_ready(self) -> None:
        deadline = time.monotonic() + PG_READY_TIMEOUT_S
        while not self.ready():
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"PostgreSQL did not accept connections in {PG_READY_TIMEOUT_S:g} s"
                )
            time.sleep(0.05)

    def ensure_running(self) -> None:
        """Start the cluster if it does not answer, and wait until it does."""
        if not self.ready():
            progress(
                "cluster-stress", f"PostgreSQL {self.version}/{self.name} is down: starting it"
            )
            self.control("start")
        self.wait_ready()


# The cluster


class Replica(Service):
    """``stress.Service`` as one replica of several: its pid, as leases name it."""

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def log_text(self) -> str:
        """Every start's log, one after the other."""
        return "".join(
            (self.workdir / f"server-{start}.log").read_text(errors="replace")
            for start in range(1, self.starts + 1)
        )


@dataclass
class Cluster:
    """The counting provider, the replicas on one schema, and a client of each replica."""

    provider: Provider
    replicas: list[Replica]
    apis: list[Api]

    def index_of(self, lease: Lease | None) -> int | None:
        """Which replica (0-based) holds or held ``lease``; None if none of them does."""
        pid = None if lease is None else lease.pid
        for index, replica in enumerate(self.replicas):
            if pid is not None and replica.pid == pid:
                return index
        return None

    def name_of(self, lease: Lease) -> str:
        """``replica N`` for the replica holding ``lease``, or the owner it names."""
        index = self.index_of(lease)
        return f"replica {index + 1}" if index is not None else f"{lease.owner} (none of these)"

    def pids(self) -> list[int | None]:
        return [replica.pid for replica in self.replicas]


def catalog_toml(max_concurrency: int | None) -> str:
    """The one model, with no ``base_url``: calls go to ``OPENAI_BASE_URL``."""
    limit = "" if max_concurrency is None else f"max_concurrency = {max_concurrency}\n"
    return f'[models."{MODEL}"]\nprovider = "openai"\nmodel_id = "m"\n{limit}'


@asynccontextmanager
async def cluster(
    report: Report,
    scenario: str,
    workdir: Path,
    database_url: str,
    *,
    replicas: int,
    latency_s: float,
    settings: Mapping[str, str],
    max_concurrency: int | None = None,
) -> AsyncIterator[Cluster]:
    """The provider and ``replicas`` replicas started, for the block; then all stopped.

    Like ``stress.scenario_frame``: an exception in the block becomes a FAIL
    line (``StopScenario`` ends it quietly), the replicas' ERROR lines and
    the scenario's time become figures.
    """
    started = time.monotonic()
    provider = Provider(workdir, latency_s)
    catalog = workdir / "catalog.toml"
    catalog.write_text(catalog_toml(max_concurrency))
    shared = {
        "DATABASE_URL": database_url,
        "LEASE_S": f"{LEASE_S:g}",
        # Over the catalog Service writes in each replica's folder, which names a base_url.
        "BATCHEXEC_MODELS": str(catalog),
        "OPENAI_BASE_URL": f"{provider.url}/v1",
        "MAX_PROMPT_LENGTH": "1000",
        **settings,
    }
    members: list[Replica] = []
    for number in range(1, replicas + 1):
        folder = workdir / f"replica-{number}"
        folder.mkdir()
        members.append(Replica(folder, provider.url, shared))
    closing_figures = True
    yielded = False
    try:
        await asyncio.to_thread(provider.start)
        # All at once; each start is waited for, so that a failed one is stopped too.
        starts = await asyncio.gather(
            *(asyncio.to_thread(member.start) for member in members), return_exceptions=True
        )
        for member, outcome in zip(members, starts, strict=True):
            if isinstance(outcome, Exception):
                lines = member.log_text().strip().splitlines() or ["(nothing)"]
                raise RuntimeError(f"{outcome}; its log ends: {lines[-1][:300]}") from outcome
        progress(
            scenario,
            f"{replicas} replicas up (pids {', '.join(str(m.pid) for m in members)}), "
            f"{max(m.start_s[-1] for m in members):.1f} s to /health",
        )
        timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            yielded = True
            yield Cluster(provider, members, [Api(session, member) for member in members])
        report.figure(scenario, "ERROR lines logged", logged_problems(members))
    except StopScenario:
        closing_figures = False
    except Exception as exc:
        if not yielded:
            raise  # a cluster that did not start: the caller's FAIL line, once stopped
        # A scenario that breaks is its FAIL line, not the end of the run.
        report.check(scenario, False, f"the scenario stopped: {type(exc).__name__}: {exc}")
    finally:
        await asyncio.gather(*(asyncio.to_thread(member.stop) for member in members))
        await asyncio.to_thread(provider.stop)
    if closing_figures:
        report.figure(scenario, "time", f"{time.monotonic() - started:.1f} s")


# Reading the cluster


async def progress_of(api: Api, invocation_id: str) -> dict[str, Any] | None:
    """The batch's status and progress through ``api``'s replica; None if it does not answer."""
    try:
        status, body, _ = await api.call(
            "POST", RESULTS, {"invocation_id": invocation_id, "progress_only": True}
        )
    except (aiohttp.ClientError, TimeoutError):
        return None
    return body if status == 200 and isinstance(body, dict) else None


def ended_rows(answer: Mapping[str, Any]) -> int:
    """Rows finished one way or another, by a results answer's ``progress``."""
    counts = answer["progress"]
    return sum(int(counts.get(name, 0)) for name in ENDED_COUNTS)


def seen(answer: Mapping[str, Any] | None) -> str:
    return "no answer" if answer is None else f"{answer['status']}, {answer['progress']}"


async def wait_until(
    api: Api,
    invocation_id: str,
    done: Callable[[Mapping[str, Any]], bool],
    what: str,
    timeout_s: float = BATCH_TIMEOUT_S,
) -> dict[str, Any]:
    """Poll ``api``'s results route (progress only) until ``done``; a replica that does not
    answer is asked again. ``TimeoutError`` saying what was last seen."""
    deadline = time.monotonic() + timeout_s
    last: dict[str, Any] | None = None
    while True:
        answer = await progress_of(api, invocation_id)
        if answer is not None:
            last = answer
            if done(answer):
                return answer
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"batch {invocation_id} did not reach {what} in {timeout_s:g} s "
                f"(through {api.service.url}): {seen(last)}"
            )
        await asyncio.sleep(POLL_S)


async def wait_ended(api: Api, invocation_id: str) -> dict[str, Any]:
    return await wait_until(
        api, invocation_id, lambda answer: answer["status"] in FINISHED, "an end"
    )


async def wait_lease(database_url: str, invocation_id: str) -> Lease:
    """The batch's lease once a replica has claimed it."""
    deadline = time.monotonic() + LEASE_TIMEOUT_S
    while True:
        lease = (await read_leases(database_url, [invocation_id])).get(invocation_id)
        if lease is not None and lease.owner is not None:
            return lease
        if time.monotonic() > deadline:
            raise TimeoutError(f"no replica claimed batch {invocation_id} in {LEASE_TIMEOUT_S:g} s")
        await asyncio.sleep(POLL_S)


async def submit_to_first(
    group: Cluster, database_url: str, prompts: Sequence[str]
) -> tuple[str, Lease, int]:
    """Submit ``prompts`` to the first replica; the batch's id, its lease, and its holder."""
    invocation_id = await group.apis[0].submit(prompts)
    lease = await wait_lease(database_url, invocation_id)
    holder = group.index_of(lease)
    if holder is None:
        raise RuntimeError(f"batch claimed by {lease.owner}, none of pids {group.pids()}")
    return invocation_id, lease, holder


async def submit_round_robin(cluster: Cluster, batches: Sequence[Sequence[str]]) -> list[str]:
    """Batch n to replica n mod replicas, all at once; their ids in order."""
    apis = cluster.apis
    return list(
        await asyncio.gather(
            *(apis[n % len(apis)].submit(prompts) for n, prompts in enumerate(batches))
        )
    )


async def wait_all_ended(cluster: Cluster, ids: Sequence[str]) -> None:
    """Each batch polled through the replica it was submitted to, until every one has ended."""
    apis = cluster.apis
    await asyncio.gather(*(wait_ended(apis[n % len(apis)], id_) for n, id_ in enumerate(ids)))


def batches_per_replica(cluster: Cluster, leases: Mapping[str, Lease]) -> list[int]:
    """How many of the batches each replica ran (their owner at the end); unknown ones left out."""
    counts = Counter(cluster.index_of(lease) for lease in leases.values())
    return [counts[index] for index in range(len(cluster.replicas))]


def most_at_once(leases: Sequence[Lease]) -> int:
    """The most batches running at the same moment, by their ``started_at`` and ``finished_at``."""
    moments = sorted(
        [(lease.started_at, 1) for lease in leases if lease.started_at is not None]
        + [(lease.finished_at, -1) for lease in leases if lease.finished_at is not None],
        key=lambda moment: (moment[0], moment[1]),  # an end before a start at the same time
    )
    running = most = 0
    for _, step in moments:
        running += step
        most = max(most, running)
    return most


def calls_of(provider: Provider) -> list[tuple[float, float, str]]:
    """Every call as (arrival, end, prompt), ends matched to arrivals of the same prompt in
    order; a call with no end logged (yet) ends at infinity."""
    calls: list[tuple[float, float, str]] = []
    open_calls: dict[str, list[int]] = {}
    for at, prompt, end in read_log(provider.log_path):
        if end:
            waiting = open_calls.get(prompt)
            if waiting:
                arrival, _, _ = calls[waiting[0]]
                calls[waiting.pop(0)] = (arrival, at, prompt)
        else:
            open_calls.setdefault(prompt, []).append(len(calls))
            calls.append((at, float("inf"), prompt))
    return calls


async def check_batch(
    report: Report,
    scenario: str,
    api: Api,
    invocation_id: str,
    prompts: Sequence[str],
    label: str = "results",
) -> dict[str, Any]:
    """Check that the batch completed with every row its own echo, through ``api``; the results."""
    after = await api.results(invocation_id)
    lost = lost_rows(after["executions"], prompts)
    report.check(
        scenario,
        after["status"] == "completed" and not lost and len(after["executions"]) == len(prompts),
        f"{label}: {after['status']}, {len(after['executions'])} rows, {len(lost)} lost"
        + (f" ({sample(lost)})" if lost else ""),
    )
    return after


async def check_batches(
    report: Report,
    scenario: str,
    cluster: Cluster,
    ids: Sequence[str],
    batches: Sequence[Sequence[str]],
) -> None:
    """One check that every batch completed with every row its own echo, each read through
    another replica than the one it was submitted to."""
    apis = cluster.apis
    wrong = []
    for n, (invocation_id, prompts) in enumerate(zip(ids, batches, strict=True)):
        answer = await apis[(n + 1) % len(apis)].results(invocation_id)
        lost = lost_rows(answer["executions"], prompts)
        if answer["status"] != "completed" or lost or len(answer["executions"]) != len(prompts):
            wrong.append(f"batch {n + 1}: {answer['status']}, {len(lost)} rows lost")
    report.check(
        scenario,
        not wrong,
        f"{len(ids) - len(wrong)} of {len(ids)} batches completed, every row its own echo "
        "(read through another replica than the one submitted to)"
        + (f"; not: {sample(wrong)}" if wrong else ""),
    )


async def check_workbook(
    report: Report,
    scenario: str,
    api: Api,
    xlsx_url: str | None,
    prompts: Sequence[str],
    label: str,
) -> None:
    if not xlsx_url:
        report.check(scenario, False, f"{label}: the results name no workbook")
        return
    status, data = await api.workbook(xlsx_url)
    rows = read_workbook(data) if status == 200 else {}
    lost = workbook_lost(rows, prompts)
    report.check(
        scenario,
        status == 200 and not lost and len(rows) == len(prompts),
        f"{label}: HTTP {status}, {len(rows)} rows, {len(lost)} lost"
        + (f" ({sample(lost)})" if lost else ""),
    )


# The scenarios


async def kill_replica(report: Report, workdir: Path, database_url: str) -> None:
    """Scenario 1: SIGKILL of the replica running a 500-row batch; the other must finish it."""
    scenario = "kill-9-replica"
    prompts = [f"kill-9 row {n:03d}: answer {n * 7919 % 1000:03d}" for n in range(KILL_ROWS)]
    report.figure(
        scenario,
        "replicas, rows, threads, latency, lease",
        f"2, {KILL_ROWS}, {KILL_THREADS}, {KILL_LATENCY_S:g} s, {LEASE_S:g} s",
    )
    settings = {
        "DEFAULT_MAX_THREADS": str(KILL_THREADS),
        "MAX_EXECUTIONS_PER_BATCH": str(KILL_ROWS),
    }
    async with cluster(
        report,
        scenario,
        workdir,
        database_url,
        replicas=2,
        latency_s=KILL_LATENCY_S,
        settings=settings,
    ) as group:
        invocation_id, lease, holder = await submit_to_first(group, database_url, prompts)
        mark = int(KILL_ROWS * KILL_AT_FRACTION)
        progress(scenario, f"{invocation_id} runs on replica {holder + 1}; waiting for {mark} rows")
        await wait_until(
            group.apis[holder], invocation_id, lambda a: ended_rows(a) >= mark, f"{mark} rows"
        )
        before = await group.apis[holder].results(invocation_id)
        lease = (await read_leases(database_url, [invocation_id]))[invocation_id]
        if group.index_of(lease) != holder or lease.until is None:
            raise RuntimeError(f"the lease moved before the kill: {lease}")
        group.replicas[holder].kill()
        dead_at = time.time()
        survivor = 1 - holder
        finished = {
            execution["index"]: (execution["status"], execution["result"])
            for execution in before["executions"]
        }
        calls_at_kill = len(calls_of(group.provider))
        lapse_s = lease.until - dead_at
        report.figure(
            scenario,
            "at the kill",
            f"replica {holder + 1} (pid {lease.pid}) killed with {len(finished)} rows finished, "
            f"{calls_at_kill} calls made; its lease lapsed {lapse_s:.2f} s later",
        )
        progress(scenario, f"killed replica {holder + 1}; replica {survivor + 1} must take over")
        api = group.apis[survivor]
        await wait_ended(api, invocation_id)
        ended_s = time.time() - dead_at
        after = await check_batch(report, scenario, api, invocation_id, prompts)
        await check_workbook(
            report, scenario, api, after.get("xlsx_url"), prompts, "workbook (survivor)"
        )

        calls = calls_of(group.provider)
        counted = Counter(prompt for _, _, prompt in calls)
        total = sum(counted[prompt] for prompt in prompts)
        after_rows = {execution["index"]: execution for execution in after["executions"]}
        changed = [
            index
            for index, (status, result) in finished.items()
            if (after_rows.get(index, {}).get("status"), after_rows.get(index, {}).get("result"))
            != (status, result)
        ]
        resent = [index for index in finished if counted[prompts[index - 1]] != 1]
        not_succeeded = [index for index, (status, _) in finished.items() if status != "succeeded"]
        kept = len(finished) - len(set(changed) | set(resent) | set(not_succeeded))
        report.figure(scenario, "rows kept", f"{kept} of {len(finished)} finished before the kill")
        report.check(
            scenario,
            not changed and not resent and not not_succeeded,
            f"{len(finished)} rows finished before the kill: {len(changed)} changed result"
            + (f" ({sample(changed)})" if changed else "")
            + f", {len(resent)} sent again"
            + (f" ({sample(resent)})" if resent else "")
            + (f", {len(not_succeeded)} had not succeeded" if not_succeeded else ""),
        )
        bound = KILL_ROWS + KILL_THREADS
        never = [prompt for prompt in prompts if counted[prompt] == 0]
        report.figure(
            scenario,
            "calls",
            f"{total} for {KILL_ROWS} rows, {duplicates(counted, prompts)} sent again",
        )
        report.check(
            scenario,
            total <= bound and not never,
            f"{total} calls for {KILL_ROWS} rows (at most {bound})"
            + (f", {len(never)} rows never sent" if never else ""),
        )

        stragglers = [at for at, _, _ in calls if dead_at < at <= dead_at + STRAGGLER_S]
        later = [at for at, _, _ in calls if at > dead_at + STRAGGLER_S]
        final = (await read_leases(database_url, [invocation_id]))[invocation_id]
        if later:
            takeover_s = later[0] - dead_at
            report.figure(
                scenario,
                "kill to takeover",
                f"{takeover_s:.2f} s to the survivor's first call (the lease lapsed at "
                f"{lapse_s:.2f} s; {len(stragglers)} calls of the killed replica logged just "
                f"after the kill); batch ended {ended_s:.1f} s after the kill",
            )
            report.check(
                scenario,
                lapse_s - CLOCK_TOLERANCE_S <= takeover_s <= lapse_s + TAKEOVER_SLACK_S
                and group.index_of(final) == survivor,
                f"taken over by {group.name_of(final)} "
                f"{takeover_s:.2f} s after the kill, once the lease had lapsed ({lapse_s:.2f} s; "
                f"at most {TAKEOVER_SLACK_S:g} s after)",
            )
        else:
            report.check(scenario, False, "no call came after the kill: nobody took the batch over")


async def round_robin(report: Report, workdir: Path, database_url: str) -> None:
    """Scenario 2: 30 batches over three replicas; each runs once, each prompt called once."""
    scenario = "round-robin"
    batches = [
        [f"round-robin batch {b:02d} row {r:02d}" for r in range(ROUND_ROBIN_ROWS)]
        for b in range(ROUND_ROBIN_BATCHES)
    ]
    report.figure(
        scenario,
        "replicas, batches, rows, latency",
        f"3, {ROUND_ROBIN_BATCHES}, {ROUND_ROBIN_ROWS}, {ROUND_ROBIN_LATENCY_S:g} s",
    )
    async with cluster(
        report,
        scenario,
        workdir,
        database_url,
        replicas=3,
        latency_s=ROUND_ROBIN_LATENCY_S,
        settings={},
    ) as group:
        started = time.monotonic()
        ids = await submit_round_robin(group, batches)
        progress(scenario, f"{len(ids)} batches submitted; waiting for them to end")
        await wait_all_ended(group, ids)
        elapsed_s = time.monotonic() - started
        await check_batches(report, scenario, group, ids, batches)
        wanted = [prompt for prompts in batches for prompt in prompts]
        counted = Counter(prompt for _, _, prompt in calls_of(group.provider))
        twice = [prompt for prompt in wanted if counted[prompt] > 1]
        never = [prompt for prompt in wanted if counted[prompt] == 0]
        strays = sorted(set(counted) - set(wanted))
        report.figure(scenario, "calls", f"{sum(counted.values())} for {len(wanted)} rows")
        report.check(
            scenario,
            not twice and not never and not strays,
            f"each of {len(wanted)} prompts called once: {len(twice)} more than once, "
            f"{len(never)} never, {len(strays)} unknown"
            + (f" (twice: {sample(twice)})" if twice else "")
            + (f" (never: {sample(never)})" if never else ""),
        )
        leases = await read_leases(database_url, ids)
        per_replica = batches_per_replica(group, leases)
        statuses = Counter(lease.status for lease in leases.values())
        report.figure(
            scenario,
            "batches per replica",
            " ".join(f"r{n}={count}" for n, count in enumerate(per_replica, 1))
            + f" (the database: {dict(statuses)}); all ended in {elapsed_s:.1f} s",
        )
        report.check(
            scenario,
            all(count >= 1 for count in per_replica) and sum(per_replica) == len(ids),
            f"every replica ran a batch: {per_replica} of {len(ids)}",
        )


async def shared_concurrency(report: Report, workdir: Path, database_url: str) -> None:
    """Scenario 3: ``max_concurrency = 10`` holds across three replicas, by the provider's count."""
    scenario = "max-concurrency"
    batches = [
        [f"limited batch {b} row {r:02d}" for r in range(LIMITED_ROWS)]
        for b in range(LIMITED_BATCHES)
    ]
    wanted_at_once = LIMITED_BATCHES * LIMITED_THREADS
    report.figure(
        scenario,
        "replicas, batches, rows, threads, latency",
        f"3, {LIMITED_BATCHES}, {LIMITED_ROWS}, {LIMITED_THREADS}, {LIMITED_LATENCY_S:g} s "
        f"(max_concurrency {LIMIT}; up to {wanted_at_once} calls wanted at once)",
    )
    settings = {
        "DEFAULT_MAX_THREADS": str(LIMITED_THREADS),
        "MAX_CONCURRENT_BATCHES": str(LIMITED_BATCHES_A_REPLICA),
    }
    async with cluster(
        report,
        scenario,
        workdir,
        database_url,
        replicas=3,
        latency_s=LIMITED_LATENCY_S,
        settings=settings,
        max_concurrency=LIMIT,
    ) as group:
        ids = await submit_round_robin(group, batches)
        progress(scenario, f"{len(ids)} batches submitted; waiting for them to end")
        await wait_all_ended(group, ids)
        await check_batches(report, scenario, group, ids, batches)
        calls = calls_of(group.provider)
        most = most_in_flight(group.provider.log_path)
        counted = Counter(prompt for _, _, prompt in calls)
        rows = LIMITED_BATCHES * LIMITED_ROWS
        span_s = max(end for _, end, _ in calls) - min(at for at, _, _ in calls)
        throughput = len(calls) / span_s
        bound = LIMIT / LIMITED_LATENCY_S
        report.figure(scenario, "most calls in flight", f"{most} (limit {LIMIT})")
        report.figure(
            scenario,
            "throughput",
            f"{throughput:.1f} calls/s ({len(calls)} calls in {span_s:.2f} s; at most "
            f"{bound:g} calls/s with {LIMIT} in flight, {100 * throughput / bound:.0f}% of it)",
        )
        report.check(
            scenario,
            most <= LIMIT,
            f"at most {LIMIT} calls in flight at the provider across the replicas: {most}",
        )
        leases = await read_leases(database_url, ids)
        per_replica = batches_per_replica(group, leases)
        at_once = most_at_once(list(leases.values()))
        report.figure(
            scenario,
            "batches per replica",
            " ".join(f"r{n}={count}" for n, count in enumerate(per_replica, 1))
            + f"; at most {at_once} batches running at once",
        )
        report.check(
            scenario,
            sum(1 for count in per_replica if count) >= 2 and at_once > LIMITED_BATCHES_A_REPLICA,
            f"replicas ran batches side by side ({at_once} at once, more than one replica's "
            f"{LIMITED_BATCHES_A_REPLICA}; per replica {per_replica}): up to "
            f"{at_once * LIMITED_THREADS} calls wanted, {LIMIT} allowed",
        )
        twice = [p for prompts in batches for p in prompts if counted[p] != 1]
        report.check(
            scenario,
            not twice and len(calls) == rows,
            f"{len(calls)} calls for {rows} rows, {len(twice)} prompts not called exactly once",
        )


@dataclass(frozen=True)
class Outage:
    """When PostgreSQL was stopped and started again, in epoch seconds."""

    #: ``pg_ctlcluster stop`` sent: from now on the server refuses new work.
    stop_sent_at: float
    #: The stop returned: the server has shut down.
    down_at: float
    start_sent_at: float
    #: The first ``pg_isready`` that said yes after the start.
    up_at: float


async def take_down(postgres: PostgresCluster, down_s: float) -> Outage:
    """Stop PostgreSQL, wait ``down_s``, start it; return once it accepts connections."""
    stop_sent_at = time.time()
    await asyncio.to_thread(postgres.control, "stop")
    down_at = time.time()
    await asyncio.sleep(down_s)
    start_sent_at = time.time()
    # pg_ctlcluster returns a while after the server accepts connections: poll beside it.
    starting = asyncio.create_task(asyncio.to_thread(postgres.control, "start"))
    deadline = time.monotonic() + PG_READY_TIMEOUT_S
    while not await asyncio.to_thread(postgres.ready):
        if starting.done() and starting.exception() is not None:
            await starting  # raises its error
        if time.monotonic() > deadline:
            raise RuntimeError(f"PostgreSQL did not come back in {PG_READY_TIMEOUT_S:g} s")
        await asyncio.sleep(0.02)
    up_at = time.time()
    await starting
    return Outage(stop_sent_at, down_at, start_sent_at, up_at)


def logged_problems(replicas: Sequence[Replica]) -> str:
    """The replicas' ERROR lines, and their tracebacks by the level and logger that logged them."""
    errors: list[str] = []
    tracebacks: Counter[str] = Counter()
    for number, replica in enumerate(replicas, 1):
        logged_by = "?"
        for line in replica.log_text().splitlines():
            words = line.split(maxsplit=4)
            if len(words) >= 4 and words[0][:1].isdigit() and words[2].isupper():
                logged_by = f"{words[2]} {words[3].rstrip(':')}"
                if words[2] in ("ERROR", "CRITICAL"):
                    errors.append(f"replica {number}: {line}")
            elif line.startswith("Traceback"):
                tracebacks[logged_by] += 1
    text = f"{len(errors)}" + (f" ({errors[0][:200]})" if errors else "")
    if tracebacks:
        text += "; tracebacks logged: " + ", ".join(
            f"{count} with {logged_by}" for logged_by, count in tracebacks.most_common()
        )
    return text


async def postgres_restart(
    report: Report, workdir: Path, database_url: str, *, down_s: float
) -> None:
    """Scenario 4: PostgreSQL stopped and started again during a 300-row batch."""
    scenario = "postgres-restart"
    prompts = [f"restart row {n:03d} of {RESTART_ROWS}" for n in range(RESTART_ROWS)]
    report.figure(
        scenario,
        "replicas, rows, threads, latency, down for",
        f"2, {RESTART_ROWS}, {RESTART_THREADS}, {RESTART_LATENCY_S:g} s, {down_s:g} s "
        "between stop and start",
    )
    settings = {
        "DEFAULT_MAX_THREADS": str(RESTART_THREADS),
        "MAX_EXECUTIONS_PER_BATCH": str(RESTART_ROWS),
    }
    postgres = PostgresCluster.serving(database_url)
    async with cluster(
        report,
        scenario,
        workdir,
        database_url,
        replicas=2,
        latency_s=RESTART_LATENCY_S,
        settings=settings,
    ) as group:
        invocation_id, _, holder = await submit_to_first(group, database_url, prompts)
        mark = int(RESTART_ROWS * RESTART_AT_FRACTION)
        progress(scenario, f"{invocation_id} runs on replica {holder + 1}; waiting for {mark} rows")
        at_stop = await wait_until(
            group.apis[holder], invocation_id, lambda a: ended_rows(a) >= mark, f"{mark} rows"
        )
        progress(scenario, f"stopping PostgreSQL {postgres.version}/{postgres.name}")
        try:
            outage = await take_down(postgres, down_s)
        finally:
            await asyncio.to_thread(postgres.ensure_running)
        progress(scenario, f"PostgreSQL back {outage.up_at - outage.stop_sent_at:.1f} s after")
        # Any replica may be asked: each must see the batch end, and end the same way.
        await asyncio.gather(*(wait_ended(api, invocation_id) for api in group.apis))
        ended_s = time.time() - outage.up_at
        for n, api in enumerate(group.apis, 1):
            after = await check_batch(
                report, scenario, api, invocation_id, prompts, f"results (replica {n})"
            )
            await check_workbook(
                report, scenario, api, after.get("xlsx_url"), prompts, f"workbook (replica {n})"
            )
        calls = calls_of(group.provider)
        counted = Counter(prompt for _, _, prompt in calls)
        total = sum(counted[prompt] for prompt in prompts)
        went_at = outage.stop_sent_at - COMMIT_SLACK_S
        in_flight = {prompt for at, end, prompt in calls if at < outage.up_at and end > went_at}
        twice = sorted(prompt for prompt in prompts if counted[prompt] > 1)
        unexplained = [prompt for prompt in twice if prompt not in in_flight]
        never = [prompt for prompt in prompts if counted[prompt] == 0]
        report.figure(
            scenario,
            "at the stop",
            f"{ended_rows(at_stop)} rows finished on replica {holder + 1}; {len(in_flight)} "
            "calls in flight when the stop was sent or after",
        )
        report.figure(
            scenario,
            "PostgreSQL",
            f"shut down {outage.down_at - outage.stop_sent_at:.2f} s after the stop was sent; "
            f"accepting {outage.up_at - outage.start_sent_at:.2f} s after the start: away "
            f"{outage.up_at - outage.stop_sent_at:.2f} s in all",
        )
        arrivals = sorted(at for at, _, _ in calls)
        gaps = [(later - earlier, earlier, later) for earlier, later in pairwise(arrivals)]
        pause_s, paused_at, resumed_at = max(gaps, default=(0.0, 0.0, 0.0))
        back = [at for at in arrivals if at > outage.up_at]
        stall_s = max((later - earlier for earlier, later in pairwise(back)), default=0.0)
        report.figure(
            scenario,
            "pause",
            f"no call for {pause_s:.2f} s (from {paused_at - outage.stop_sent_at:+.2f} s to "
            f"{resumed_at - outage.stop_sent_at:+.2f} s of the stop); once PostgreSQL was back, "
            + (
                f"the first call {back[0] - outage.up_at:.2f} s later, the longest gap "
                f"between calls {stall_s:.2f} s"
                if back
                else "no call"
            )
            + f"; the batch ended {ended_s:.1f} s after it was back",
        )
        final = (await read_leases(database_url, [invocation_id]))[invocation_id]
        report.figure(
            scenario, "the database", f"batch {final.status}, last owner {group.name_of(final)}"
        )
        claims = [
            replica.log_text().count(f"resuming batch {invocation_id}")
            for replica in group.replicas
        ]
        let_go = [
            replica.log_text().count(f"batch {invocation_id}: lease not renewed in time")
            for replica in group.replicas
        ]
        report.figure(
            scenario,
            "leases",
            ", ".join(
                f"replica {n} claimed it {claimed}x and let it go {dropped}x"
                for n, (claimed, dropped) in enumerate(zip(claims, let_go, strict=True), 1)
            )
            + f"; finished by {group.name_of(final)}",
        )
        report.figure(
            scenario,
            "calls",
            f"{total} for {RESTART_ROWS} rows: {len(twice)} rows called more than once "
            f"({duplicates(counted, prompts)} extra calls)",
        )
        report.check(
            scenario,
            not unexplained and not never,
            f"{len(twice)} rows called again, all in flight while the database was away "
            f"({len(in_flight)} were)"
            if not unexplained and not never
            else f"{len(unexplained)} rows called again though not in flight while the "
            f"database was away ({sample(unexplained)}); {len(never)} never called",
        )


# The run


Scenario = Callable[[Report, Path, str], Awaitable[None]]


async def run_scenario(
    report: Report, name: str, scenario: Scenario, workdir: Path, database_url: str
) -> None:
    try:
        async with asyncio.timeout(SCENARIO_TIMEOUT_S):
            await scenario(report, workdir, database_url)
    except TimeoutError:
        report.check(name, False, f"the scenario took more than {SCENARIO_TIMEOUT_S:g} s")
    except Exception as exc:  # one whose cluster did not start
        report.check(name, False, f"the scenario could not start: {type(exc).__name__}: {exc}")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--only", type=int, choices=range(1, 5), metavar="N", help="run scenario N (1-4) alone"
    )
    parser.add_argument(
        "--pg-down-s", type=float, default=PG_DOWN_S, help="scenario 4: seconds PostgreSQL is down"
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the working directories (logs, call logs)"
    )
    args = parser.parse_args()
    if args.pg_down_s < 0:
        parser.error("--pg-down-s must be 0 or more")

    async def restart(report: Report, workdir: Path, database_url: str) -> None:
        await postgres_restart(report, workdir, database_url, down_s=args.pg_down_s)

    scenarios: list[tuple[int, str, Scenario]] = [
        (1, "kill-9-replica", kill_replica),
        (2, "round-robin", round_robin),
        (3, "max-concurrency", shared_concurrency),
        (4, "postgres-restart", restart),
    ]
    chosen = [entry for entry in scenarios if args.only in (None, entry[0])]
    unreachable = postgres_unreachable()
    if unreachable:
        print(f"cluster-stress: {unreachable}", file=sys.stderr)
        return 1
    progress("cluster-stress", f"PostgreSQL at {postgres_where()}")
    report = Report()
    started = time.monotonic()
    folder = tempfile.mkdtemp(prefix="batchexec-cluster-stress-")
    try:
        for number, name, scenario in chosen:
            workdir = Path(folder) / name
            workdir.mkdir()
            try:
                with postgres_schema(f"cluster_stress_{number}") as database_url:
                    asyncio.run(run_scenario(report, name, scenario, workdir, database_url))
            except Exception as exc:  # the schema could not be made or dropped
                report.check(name, False, f"its schema: {type(exc).__name__}: {exc}")
    finally:
        if any(number == 4 for number, _, _ in chosen):
            # Whatever happened, the database is left running.
            try:
                PostgresCluster.serving(POSTGRES_URL).ensure_running()
            except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
                print(f"cluster-stress: PostgreSQL may be down: {exc}", file=sys.stderr)
        if args.keep:
            print(f"working directories kept in {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)
    report.print()
    seconds = time.monotonic() - started
    passed = len(report.checks) - report.failed
    print(f"{passed} passed, {report.failed} failed in {seconds:.0f} s")
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
