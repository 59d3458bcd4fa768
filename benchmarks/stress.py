"""Kill the server mid-batch and see what survives: ``python -m benchmarks.stress``.

It starts ``python -m batchexec serve`` (every batchexec variable removed
from its environment, then only the scenario's settings set, a SQLite
``DATABASE_URL`` in a temporary working directory) against a counting
OpenAI-compatible echo (``benchmarks/counting_provider.py``, its own process,
which appends every call it receives to a log as the call arrives). It then
kills the server with SIGKILL and starts it again, with the same settings,
port and working directory, in three scenarios:

1. **kill -9 during a 300-row batch** (0.2 s a call, 10 threads): killed once
   about half the rows have finished. The rows finished before the kill
   (read from the results route just before it) must keep their results and
   be called only once; all calls at most 300 + 10; once the batch completes
   under the same id, its results and its workbook hold every row,
   succeeded, with its own echo.
2. **a finished batch survives**: a batch finished before that kill answers
   the results route with the same ``csv_content`` afterwards, is listed,
   its workbook downloads, and retry answers (409: nothing to retry).
3. **random kills across a 2,000-row batch** (``--latency-s`` a call,
   ``--threads``): SIGKILL at ``--kills`` moments drawn from a seeded RNG
   (the seed is printed; ``--seed`` replays the kill marks), restarting each
   time. No row may be lost (not succeeded, or not its own echo), and the
   calls beyond one per prompt may be at most the rows in flight at the
   kills: at most kills x threads in all, and at most threads at any one
   kill (each call is owed to the process that made it, by the provider's
   arrival times and the server's start times).

Then two scenarios that stop the process in other ways:

4. **SIGTERM mid-batch with SQLite** (60 rows, 1 s a call, 10 threads), in
   two variants: ``SHUTDOWN_GRACE_S`` shorter than what the rows in flight
   have left of their call (0.3 s), and longer (3 s). SIGTERM is sent a
   little after 20 rows have succeeded. The server must exit 0 within its
   grace and a few seconds; leave the batch in the store, not cancelled
   (read from ``batchexec.db`` once it has exited); with the long grace,
   answer a new batch with 503 meanwhile. The rows it left unfinished must
   be exactly those whose call would end past the grace (by the provider's
   arrival times), at most the threads, none with the long grace. Started
   again with the same settings, the batch completes under the same id, every
   row succeeded with its own echo, and the calls beyond one per prompt are
   exactly one for each row cut off.
5. **``python -m batchexec run`` SIGKILLed midway and started again**: a
   100-row CSV for a catalog model pointing at the counting provider
   (0.2 s a call, ``--threads 5``), killed once its progress line shows 30
   rows done, then the same command run again. It must exit 0, say it
   continues the journal with as many finished rows as the journal held (read
   before the second run), send none of those again, make at most 100 + 5
   calls, write a workbook holding every row, succeeded, with its own echo,
   and remove its journal.

It prints a table of figures, a PASS or FAIL line per check, and exits 1
if any check fails. Every wait is bounded; a run takes about 40 s.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import csv
import io
import random
import re
import secrets
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import openpyxl

from batchexec import api
from batchexec.store import sqlite_documents
from benchmarks.common import progress
from benchmarks.counting_provider import read_calls
from benchmarks.server import (
    ModuleProcess,
    batchexec_env,
    free_port,
    spawn_serve,
    stop_process,
    wait_for_http,
)

API_KEY = "stress-token"
MODEL = "counted"

EXECUTE = api.EXECUTE_BATCH
RESULTS = api.RESULTS
BATCHES = api.BATCHES
RETRY = api.RETRY
FINISHED = frozenset({"completed", "failed", "cancelled"})

#: Scenario 1: the batch, the provider's latency, the threads, and when to kill.
KILL9_ROWS = 300
KILL9_LATENCY_S = 0.2
KILL9_THREADS = 10
KILL9_AT_FRACTION = 0.5
#: Scenario 2: the batch finished before the kill.
SURVIVOR_ROWS = 5

#: Scenario 3's defaults (each has a command-line option).
RANDOM_ROWS = 2000
RANDOM_LATENCY_S = 0.03
RANDOM_THREADS = 20
RANDOM_KILLS = 20
#: Scenario 3: kills come once the batch has passed a random count of rows,
#: drawn from this far into it up to as far from its end, then after a
#: random extra wait of up to ``KILL_JITTER_S``.
KILL_MARGIN_FRACTION = 0.02
KILL_JITTER_S = 0.05

#: Scenario 4: the batch, the provider's latency and the threads.
SIGTERM_ROWS = 60
SIGTERM_LATENCY_S = 1.0
SIGTERM_THREADS = 10
#: SIGTERM comes this long after this many rows have succeeded: mid-call, so
#: the rows in flight have most of their call (0.7 s) still to go.
SIGTERM_AFTER_ROWS = 20
SIGTERM_DELAY_S = 0.3
#: ``SHUTDOWN_GRACE_S`` of each variant: shorter than that, then far longer.
SIGTERM_GRACES_S = (0.3, 3.0)
#: How long past its grace the server may take to exit.
SIGTERM_EXIT_SLACK_S = 5.0
#: A row whose call ends this close to the end of the grace may go either way.
GRACE_TOLERANCE_S = 0.15
#: With the long grace, a new batch is submitted this long after the signal.
DRAINING_SUBMIT_AFTER_S = 0.2

#: Scenario 5: the CSV's rows, the provider's latency, ``--threads``, when to kill.
CLI_ROWS = 100
CLI_LATENCY_S = 0.2
CLI_THREADS = 5
CLI_KILL_AT_ROWS = 30
CLI_PROGRESS_EVERY_S = 0.1
#: The lines ``run`` writes to stderr that the scenario reads.
PROGRESS_LINE = re.compile(r"progress: (\d+)/(\d+) done")
ENDED_STATUSES = frozenset({"succeeded", "failed", "skipped", "cancelled"})

#: Hard bounds, so that a server that hangs makes a FAIL rather than a stuck run.
RUN_TIMEOUT_S = 300.0
START_TIMEOUT_S = 60.0
REQUEST_TIMEOUT_S = 30.0
#: How long a batch may take to pass a mark, or to end, once the server is up.
BATCH_TIMEOUT_S = 90.0
PROVIDER_TIMEOUT_S = 30.0
POLL_S = 0.02
EXECUTION_TIMEOUT_S = 30.0
SHUTDOWN_GRACE_S = 2.0


# The processes


def catalog_toml(provider_url: str) -> str:
    """A catalog with one model, ``MODEL``, answered by the counting provider."""
    return (
        f'[models."{MODEL}"]\nprovider = "openai"\nbase_url = "{provider_url}/v1"\nmodel_id = "m"\n'
    )


class Provider(ModuleProcess):
    """``python -m benchmarks.counting_provider`` in its own process, its calls in a log."""

    def __init__(self, workdir: Path, latency_s: float) -> None:
        self.log_path = workdir / "calls.log"
        super().__init__(
            "benchmarks.counting_provider",
            workdir / "provider.log",
            ["--latency-s", str(latency_s), "--log", str(self.log_path)],
            name="counting provider",
            start_timeout_s=PROVIDER_TIMEOUT_S,
        )

    def calls(self) -> Counter[str]:
        """How many times each prompt has been sent so far."""
        return Counter(prompt for _, prompt in read_calls(self.log_path))

    def timed_calls(self) -> list[tuple[float, str]]:
        """Every call so far as (epoch seconds of its arrival, prompt)."""
        return read_calls(self.log_path)


class Service:
    """``python -m batchexec serve`` that can be killed and started again, exactly as before."""

    def __init__(self, workdir: Path, provider_url: str, settings: Mapping[str, str]) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.starts = 0
        self.kills = 0
        #: When each SIGKILL was sent, in epoch seconds (the provider's log's clock).
        self.killed_at: list[float] = []
        #: When each process was started, in epoch seconds.
        self.started_at: list[float] = []
        #: Seconds from each start to the first 200 of ``/health``.
        self.start_s: list[float] = []
        #: When each SIGTERM was sent, in epoch seconds.
        self.terminated_at: list[float] = []
        catalog = workdir / "models.toml"
        catalog.write_text(catalog_toml(provider_url))
        self._settings = {
            "INTEGRATIONS_API_KEYS": API_KEY,
            "BATCHEXEC_MODELS": str(catalog),
            "PUBLIC_DIR": str(workdir / "public"),
            # Relative: the same working directory finds the same file.
            "DATABASE_URL": "sqlite:///batchexec.db",
            "EXECUTION_TIMEOUT": str(EXECUTION_TIMEOUT_S),
            "SHUTDOWN_GRACE_S": str(SHUTDOWN_GRACE_S),
            **settings,
        }
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start it and wait for ``/health``; each start logs to a file of its own."""
        self.starts += 1
        log_path = self.workdir / f"server-{self.starts}.log"
        started = time.monotonic()
        self.started_at.append(time.time())
        self._process = spawn_serve(self.workdir, self.port, self._settings, log_path)
        wait_for_http(f"{self.url}/health", self._process, START_TIMEOUT_S)
        self.start_s.append(time.monotonic() - started)

    def kill(self) -> None:
        """SIGKILL, and reap it."""
        if self._process is None:
            raise RuntimeError("the server is not running")
        self.killed_at.append(time.time())
        self._process.kill()
        self._process.wait()
        self._process = None
        self.kills += 1

    def terminate(self) -> None:
        """SIGTERM: the server drains, then exits by itself (``wait_exit``)."""
        if self._process is None:
            raise RuntimeError("the server is not running")
        self.terminated_at.append(time.time())
        self._process.terminate()

    def wait_exit(self, timeout_s: float) -> int | None:
        """The exit code, once it has exited; None if it still runs after ``timeout_s``."""
        if self._process is None:
            raise RuntimeError("the server is not running")
        try:
            code = self._process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            return None  # left running: ``stop`` ends it
        self._process = None
        return code

    def stop(self) -> None:
        if self._process is not None:
            stop_process(self._process, "batchexec serve")
            self._process = None

    def errors_logged(self) -> list[str]:
        """The lines of every start's log that say ERROR or Traceback."""
        lines: list[str] = []
        for start in range(1, self.starts + 1):
            text = (self.workdir / f"server-{start}.log").read_text(errors="replace")
            lines += [
                f"start {start}: {line}"
                for line in text.splitlines()
                if " ERROR " in line or line.startswith("Traceback")
            ]
        return lines


class CliRun:
    """``python -m batchexec run`` of one CSV in its own working directory, run again as asked."""

    def __init__(self, workdir: Path, provider_url: str, prompts: Sequence[str]) -> None:
        self.workdir = workdir
        self.runs = 0
        with (workdir / "prompts.csv").open("w", newline="", encoding="utf-8") as sheet:
            writer = csv.writer(sheet)
            writer.writerow(["prompt", "model"])
            writer.writerows([prompt, MODEL] for prompt in prompts)
        (workdir / "m.toml").write_text(catalog_toml(provider_url))
        self.output = workdir / "out.xlsx"
        self.journal = workdir / "out.xlsx.journal"
        self._env = batchexec_env({})
        # Relative paths, as a person at the terminal would type them.
        self._command = [
            sys.executable,
            "-m",
            "batchexec",
            "run",
            "prompts.csv",
            "-o",
            "out.xlsx",
            "--models",
            "m.toml",
            "--threads",
            str(CLI_THREADS),
            "--progress-every",
            str(CLI_PROGRESS_EVERY_S),
        ]
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start the command; each run's stdout and stderr go to a file of its own."""
        self.runs += 1
        with self._log_path(self.runs).open("wb") as log:
            self._process = subprocess.Popen(  # noqa: S603 - our own interpreter and arguments
                self._command,
                cwd=self.workdir,
                env=self._env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def output_text(self) -> str:
        """What the current run has written so far."""
        return self._log_path(self.runs).read_text(errors="replace")

    def done(self) -> int:
        """Rows done, as the current run's last progress line says (0 before the first)."""
        lines = PROGRESS_LINE.findall(self.output_text())
        return int(lines[-1][0]) if lines else 0

    def exit_code(self) -> int | None:
        """The current run's exit code, or None while it runs."""
        return None if self._process is None else self._process.poll()

    def kill(self) -> None:
        """SIGKILL, and reap it."""
        if self._process is None:
            raise RuntimeError("the command is not running")
        self._process.kill()
        self._process.wait()

    def wait(self, timeout_s: float) -> int | None:
        """The exit code, once it has exited; None if it still runs after ``timeout_s``."""
        if self._process is None:
            raise RuntimeError("the command was not started")
        try:
            return self._process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            return None

    def stop(self) -> None:
        # Only a run that hangs is still here: no outputs are wanted from it.
        if self._process is not None and self._process.poll() is None:
            self.kill()

    def journal_files(self) -> list[str]:
        """The journal and its side files (``-wal``, ``-shm``, ``.lock``) that exist now."""
        return sorted(
            path.name for path in self.workdir.iterdir() if path.name.startswith(self.journal.name)
        )

    def _log_path(self, run: int) -> Path:
        return self.workdir / f"run-{run}.log"


# The HTTP client


class Api:
    """The routes the scenarios use, with the API key; no connection outlives a request."""

    def __init__(self, session: aiohttp.ClientSession, service: Service) -> None:
        self.session = session
        self.service = service

    async def call(self, method: str, path: str, payload: Any = None) -> tuple[int, Any, bytes]:
        """The status, the JSON body (None if it is not JSON) and the raw body of one request."""
        async with self.session.request(
            method,
            self.service.url + path,
            json=payload,
            headers={"Integrations-API-Key": API_KEY},
        ) as answer:
            raw = await answer.read()
            body: Any = None
            if answer.content_type == "application/json":
                body = await answer.json()
            return answer.status, body, raw

    async def submit(self, prompts: Sequence[str]) -> str:
        executions = [{"prompt": prompt, "model": MODEL} for prompt in prompts]
        status, body, raw = await self.call("POST", EXECUTE, {"executions": executions})
        if status != 200:
            raise RuntimeError(f"submit: HTTP {status}: {raw[:300]!r}")
        invocation_id: str = body["invocationId"]
        return invocation_id

    async def results(self, invocation_id: str) -> dict[str, Any]:
        status, body, raw = await self.call("POST", RESULTS, {"invocation_id": invocation_id})
        if status != 200:
            raise RuntimeError(f"results: HTTP {status}: {raw[:300]!r}")
        answer: dict[str, Any] = body
        return answer

    async def listed(self, invocation_id: str) -> dict[str, Any] | None:
        """The batch's entry in the list route (small, whatever the batch holds), if listed."""
        status, body, raw = await self.call("GET", f"{BATCHES}?limit=20")
        if status != 200:
            raise RuntimeError(f"batches: HTTP {status}: {raw[:300]!r}")
        for batch in body["batches"]:
            if batch["invocationId"] == invocation_id:
                entry: dict[str, Any] = batch
                return entry
        return None

    async def wait_for(
        self, invocation_id: str, succeeded: int | None = None, timeout_s: float = BATCH_TIMEOUT_S
    ) -> dict[str, Any]:
        """Poll the list route until ``succeeded`` rows have (if given), or the batch has ended."""
        entry: dict[str, Any] | None = None
        deadline = time.monotonic() + timeout_s
        for _ in range(int(timeout_s / POLL_S) + 1):
            entry = await self.listed(invocation_id)
            if entry is not None and (
                entry["status"] in FINISHED
                or (succeeded is not None and entry["progress"]["succeeded"] >= succeeded)
            ):
                return entry
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(POLL_S)
        what = "an end" if succeeded is None else f"{succeeded} rows succeeded"
        seen = "not listed" if entry is None else f"{entry['status']}, {entry['progress']}"
        raise TimeoutError(f"batch {invocation_id} did not reach {what} in {timeout_s:g} s: {seen}")

    async def wait_ended(self, invocation_id: str) -> dict[str, Any]:
        return await self.wait_for(invocation_id)

    async def workbook(self, xlsx_url: str | None) -> tuple[int, bytes]:
        """The workbook behind ``xlsx_url``, by its path on this server."""
        if not xlsx_url:
            return 0, b""
        status, _, raw = await self.call("GET", urlsplit(xlsx_url).path)
        return status, raw


# Reading what the server answered


def read_workbook(data: bytes) -> dict[str, tuple[str, str]]:
    """The ``Results`` sheet's rows: prompt -> (status, result)."""
    book = openpyxl.load_workbook(io.BytesIO(data), read_only=True)
    try:
        rows = list(book["Results"].iter_rows(values_only=True))
    finally:
        book.close()
    header = [str(cell) for cell in rows[0]]
    prompt, status, result = (header.index(name) for name in ("prompt", "status", "result"))
    return {str(row[prompt]): (str(row[status]), str(row[result] or "")) for row in rows[1:] if row}


@dataclass
class Stored:
    """What a batchexec SQLite file holds: each batch's status, each row's status."""

    #: Batch id -> status.
    batches: dict[str, str]
    #: Prompt -> status, over every batch.
    rows: dict[str, str]

    def with_status(self, *statuses: str) -> list[str]:
        return [prompt for prompt, status in self.rows.items() if status in statuses]


def read_store(path: Path) -> Stored:
    """The batches and rows of the SQLite file at ``path``, opened read-only (nothing written)."""
    connection = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        batches = dict(connection.execute("SELECT id, status FROM batches").fetchall())
        # Read as the store reads its rows: documents, their changes applied.
        rows = {
            str(execution.cells["prompt"]): execution.status.value
            for batch_id in batches
            for execution in sqlite_documents.executions(connection, batch_id)
        }
    finally:
        connection.close()
    return Stored(batches, rows)


@dataclass
class InFlight:
    """The rows in flight at a SIGTERM, by when their call would end: within the grace or past it.

    A call ends ``latency_s`` after it arrived at the provider; one that ends
    within ``GRACE_TOLERANCE_S`` of the grace's end may go either way.
    """

    within: set[str]
    past: set[str]
    either: set[str]


def in_flight(
    called: Mapping[str, float], term_at: float, grace_s: float, latency_s: float
) -> InFlight:
    """Which of the calls ``called`` (prompt -> arrival) were in flight at ``term_at``, and how."""
    flight = InFlight(set(), set(), set())
    grace_ends = term_at + grace_s
    for prompt, at in called.items():
        ends = at + latency_s
        if ends <= term_at:
            continue
        if ends < grace_ends - GRACE_TOLERANCE_S:
            flight.within.add(prompt)
        elif ends > grace_ends + GRACE_TOLERANCE_S:
            flight.past.add(prompt)
        else:
            flight.either.add(prompt)
    return flight


def lost_rows(executions: Sequence[Mapping[str, Any]], prompts: Sequence[str]) -> list[int]:
    """The 1-based rows missing, not succeeded, or whose result is not their own echo."""
    by_index = {execution["index"]: execution for execution in executions}
    lost = []
    for index, prompt in enumerate(prompts, start=1):
        execution = by_index.get(index)
        if execution is None or execution["status"] != "succeeded" or execution["result"] != prompt:
            lost.append(index)
    return lost


def workbook_lost(rows: Mapping[str, tuple[str, str]], prompts: Sequence[str]) -> list[str]:
    """The prompts the workbook lacks, or holds not succeeded or not with their own echo."""
    return [prompt for prompt in prompts if rows.get(prompt) != ("succeeded", prompt)]


def duplicates(calls: Counter[str], prompts: Sequence[str]) -> int:
    """Calls beyond one per prompt, over the batch's prompts."""
    return sum(max(0, calls[prompt] - 1) for prompt in prompts)


@dataclass
class Losses:
    """The calls each kill cost: made before it, for a row that had to be sent again."""

    #: Per kill: the calls lost.
    lost: list[int]
    #: Per kill: how long before it the oldest lost call arrived, in seconds.
    oldest_s: list[float]
    #: Calls made again by the same process (retries), not owed to a kill.
    retried: int


def losses(
    calls: Sequence[tuple[float, str]],
    prompts: Sequence[str],
    started_at: Sequence[float],
    killed_at: Sequence[float],
) -> Losses:
    """Which kill each call beyond one per prompt is owed to.

    A call belongs to the server process started last before it arrived (one
    that arrives just after a kill was sent by the process killed, since the
    next is not started yet). A prompt's last call is the one whose result was
    kept; every earlier one was lost: to its process's kill or, when the same
    process made a later one, to a retry.
    """
    wanted = set(prompts)
    last = {prompt: at for at, prompt in calls if prompt in wanted}
    lost = [0] * len(killed_at)
    oldest_s = [0.0] * len(killed_at)
    retried = 0
    for at, prompt in calls:
        if prompt not in wanted or at >= last[prompt]:
            continue
        process = bisect.bisect_right(started_at, at) - 1
        if (
            process >= len(killed_at)
            or bisect.bisect_right(started_at, last[prompt]) - 1 == process
        ):
            retried += 1
            continue
        lost[process] += 1
        oldest_s[process] = max(oldest_s[process], killed_at[process] - at)
    return Losses(lost, oldest_s, retried)


def sample(items: Sequence[Any], most: int = 5) -> str:
    shown = ", ".join(str(item) for item in items[:most])
    return shown + (f", ... ({len(items)} in all)" if len(items) > most else "")


# The report


@dataclass
class Report:
    """Figures to print as a table, and the checks, each PASS or FAIL."""

    figures: list[tuple[str, str, str]] = field(default_factory=list)
    checks: list[tuple[str, bool, str]] = field(default_factory=list)

    def figure(self, scenario: str, name: str, value: object) -> None:
        self.figures.append((scenario, name, str(value)))

    def check(self, scenario: str, passed: bool, detail: str) -> None:
        self.checks.append((scenario, passed, detail))
        verdict = "PASS" if passed else "FAIL"
        progress("stress", f"{verdict} {scenario}: {detail}")

    @property
    def failed(self) -> int:
        return sum(1 for _, passed, _ in self.checks if not passed)

    def print(self) -> None:
        header = ("scenario", "figure", "value")
        table = [header, *self.figures]
        widths = [max(len(line[n]) for line in table) for n in range(2)]
        for scenario, name, value in table:
            print(f"{scenario.ljust(widths[0])}  {name.ljust(widths[1])}  {value}")
        print()
        for scenario, passed, detail in self.checks:
            print(f"{'PASS' if passed else 'FAIL'} {scenario}: {detail}")


# The scenarios


class StopScenario(Exception):
    """Ends a scenario whose failure is already checked: the figures that close it are left out."""


@asynccontextmanager
async def scenario_frame(
    report: Report,
    scenario: str,
    service: Service | CliRun,
    provider: Provider,
    *,
    timed: bool = True,
) -> AsyncIterator[float]:
    """What every scenario does around its own steps; yields when it started.

    Once the block ends, a ``Service``'s logged ERROR lines become a figure. An
    exception becomes a FAIL line rather than the end of the run (``StopScenario``
    ends it quietly). Then ``service`` and ``provider`` are stopped and, if
    ``timed``, the scenario's time is a figure.
    """
    started = time.monotonic()
    closing_figures = True
    try:
        yield started
        if isinstance(service, Service):
            errors = service.errors_logged()
            report.figure(
                scenario,
                "ERROR lines logged",
                f"{len(errors)}" + (f": {errors[0][:160]}" if errors else ""),
            )
    except StopScenario:
        closing_figures = False
    except Exception as exc:  # a scenario that breaks is its FAIL line, not the end of the run
        report.check(scenario, False, f"the scenario stopped: {type(exc).__name__}: {exc}")
    finally:
        await asyncio.to_thread(service.stop)
        await asyncio.to_thread(provider.stop)
    if timed and closing_figures:
        report.figure(scenario, "time", f"{time.monotonic() - started:.1f} s")


@asynccontextmanager
async def serving(service: Service, provider: Provider) -> AsyncIterator[Api]:
    """Start the provider, then the server; a client of the server for the block.

    Stopping them is ``scenario_frame``'s, so that a start that fails is stopped too.
    """
    await asyncio.to_thread(provider.start)
    await asyncio.to_thread(service.start)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        yield Api(session, service)


async def kill_during_batch(report: Report, workdir: Path) -> None:
    """Scenarios 1 and 2: one SIGKILL halfway through a 300-row batch, after another ended."""
    scenario, survivor_scenario = "kill-9", "survivor"
    provider = Provider(workdir, KILL9_LATENCY_S)
    service = Service(
        workdir,
        provider.url,
        {
            "DEFAULT_MAX_THREADS": str(KILL9_THREADS),
            "MAX_EXECUTIONS_PER_BATCH": str(KILL9_ROWS),
            "MAX_PROMPT_LENGTH": "1000",
        },
    )
    prompts = [f"kill-9 row {n:03d}: answer {n * 7919 % 1000:03d}" for n in range(KILL9_ROWS)]
    survivor_prompts = [f"survivor row {n}" for n in range(SURVIVOR_ROWS)]
    async with (
        scenario_frame(report, scenario, service, provider) as started,
        serving(service, provider) as api,
    ):
        progress(scenario, "a small batch first, to end before the kill")
        survivor_id = await api.submit(survivor_prompts)
        await api.wait_ended(survivor_id)
        survivor_before = await api.results(survivor_id)
        survivor_xlsx = await api.workbook(survivor_before.get("xlsx_url"))

        invocation_id = await api.submit(prompts)
        mark = int(KILL9_ROWS * KILL9_AT_FRACTION)
        progress(scenario, f"{invocation_id}: waiting for {mark} of {KILL9_ROWS} rows")
        entry = await api.wait_for(invocation_id, succeeded=mark)
        before = await api.results(invocation_id)
        service.kill()
        killed_at = time.monotonic() - started
        seen = provider.calls()
        calls_at_kill = sum(seen[prompt] for prompt in prompts)
        finished = {
            execution["index"]: (execution["status"], execution["result"])
            for execution in before["executions"]
        }
        report.figure(
            scenario,
            "rows, threads, latency",
            f"{KILL9_ROWS}, {KILL9_THREADS}, {KILL9_LATENCY_S:g} s",
        )
        report.figure(
            scenario,
            "at the kill",
            f"{len(finished)} rows finished (list said {entry['progress']['succeeded']} "
            f"succeeded, {entry['progress']['running']} running), {calls_at_kill} calls, "
            f"{killed_at:.1f} s in",
        )
        progress(scenario, f"killed with {len(finished)} rows finished; starting again")
        await asyncio.to_thread(service.start)
        ended = await api.wait_ended(invocation_id)
        resumed_s = time.monotonic() - started - killed_at
        after = await api.results(invocation_id)
        xlsx_status, xlsx = await api.workbook(after.get("xlsx_url"))
        calls = provider.calls()
        total_calls = sum(calls[prompt] for prompt in prompts)
        report.figure(
            scenario,
            "after the restart",
            f"{ended['status']} under the same id in {resumed_s:.1f} s "
            f"(start took {service.start_s[-1]:.1f} s)",
        )
        owed = losses(provider.timed_calls(), prompts, service.started_at, service.killed_at)
        report.figure(
            scenario,
            "calls",
            f"{total_calls} ({duplicates(calls, prompts)} duplicates: {sum(owed.lost)} lost "
            f"at the kill, the oldest sent {max(owed.oldest_s, default=0) * 1000:.0f} ms "
            f"before it; {owed.retried} retries)",
        )

        after_rows = {execution["index"]: execution for execution in after["executions"]}
        changed = [
            index
            for index, (status, result) in finished.items()
            if (
                after_rows.get(index, {}).get("status"),
                after_rows.get(index, {}).get("result"),
            )
            != (status, result)
        ]
        resent = [index for index in finished if calls[prompts[index - 1]] != 1]
        not_succeeded = [index for index, (status, _) in finished.items() if status != "succeeded"]
        report.check(
            scenario,
            not changed and not resent and not not_succeeded,
            f"{len(finished)} rows finished before the kill: {len(changed)} changed result"
            f"{' (' + sample(changed) + ')' if changed else ''}, {len(resent)} sent again"
            f"{' (' + sample(resent) + ')' if resent else ''}"
            + (f", {len(not_succeeded)} had not succeeded" if not_succeeded else ""),
        )
        bound = KILL9_ROWS + KILL9_THREADS
        report.check(
            scenario,
            total_calls <= bound,
            f"{total_calls} calls for {KILL9_ROWS} rows (at most {bound})",
        )
        lost = lost_rows(after["executions"], prompts)
        report.check(
            scenario,
            after["status"] == "completed" and not lost and len(after["executions"]) == KILL9_ROWS,
            f"results: {after['status']}, {len(after['executions'])} rows, {len(lost)} lost"
            + (f" ({sample(lost)})" if lost else ""),
        )
        if xlsx_status == 200:
            book_lost = workbook_lost(read_workbook(xlsx), prompts)
            rows_in_book = len(read_workbook(xlsx))
            report.check(
                scenario,
                not book_lost and rows_in_book == KILL9_ROWS,
                f"workbook: {rows_in_book} rows, {len(book_lost)} lost"
                + (f" ({sample(book_lost)})" if book_lost else ""),
            )
        else:
            report.check(
                scenario, False, f"workbook: HTTP {xlsx_status} for {after.get('xlsx_url')}"
            )

        await survivor_checks(
            report,
            survivor_scenario,
            api,
            survivor_id,
            survivor_before,
            survivor_xlsx,
            survivor_prompts,
        )


async def survivor_checks(
    report: Report,
    scenario: str,
    api: Api,
    invocation_id: str,
    before: Mapping[str, Any],
    xlsx_before: tuple[int, bytes],
    prompts: Sequence[str],
) -> None:
    """Scenario 2: the batch that ended before the kill, asked again after the restart."""
    after = await api.results(invocation_id)
    same_csv = after.get("csv_content") == before.get("csv_content") is not None
    report.check(
        scenario,
        same_csv and after["status"] == "completed",
        f"results: {after['status']}, csv_content "
        f"{'the same' if same_csv else 'changed'} ({len(after.get('csv_content') or '')} chars)",
    )
    entry = await api.listed(invocation_id)
    report.check(
        scenario,
        entry is not None
        and entry["status"] == "completed"
        and entry["progress"]["succeeded"] == len(prompts),
        "list: " + ("not listed" if entry is None else f"{entry['status']}, {entry['progress']}"),
    )
    status, xlsx = await api.workbook(after.get("xlsx_url"))
    book_lost = workbook_lost(read_workbook(xlsx), prompts) if status == 200 else list(prompts)
    report.check(
        scenario,
        status == 200 and xlsx_before[0] == 200 and not book_lost,
        f"download: HTTP {status} (before the kill {xlsx_before[0]}), {len(book_lost)} rows lost, "
        f"bytes {'identical' if xlsx == xlsx_before[1] else 'different'}",
    )
    retry_status, body, raw = await api.call("POST", RETRY, {"invocation_id": invocation_id})
    detail = (
        body.get("detail", "") if isinstance(body, dict) else raw[:100].decode(errors="replace")
    )
    report.check(
        scenario,
        retry_status == 409,
        f"retry: HTTP {retry_status} {detail!r}",
    )


async def random_kills(
    report: Report,
    workdir: Path,
    *,
    seed: int,
    rows: int,
    kills: int,
    threads: int,
    latency_s: float,
) -> None:
    """Scenario 3: SIGKILL at ``kills`` random moments across one batch, restarting each time."""
    scenario = "random-kills"
    rng = random.Random(seed)
    provider = Provider(workdir, latency_s)
    service = Service(
        workdir,
        provider.url,
        {
            "DEFAULT_MAX_THREADS": str(threads),
            "MAX_EXECUTIONS_PER_BATCH": str(rows),
            "MAX_PROMPT_LENGTH": "1000",
        },
    )
    prompts = [f"random-kills row {n:04d} of {rows}" for n in range(rows)]
    margin = max(1, int(rows * KILL_MARGIN_FRACTION))
    marks = sorted(rng.sample(range(margin, rows - margin), kills))
    report.figure(scenario, "seed", seed)
    report.figure(scenario, "rows, threads, latency", f"{rows}, {threads}, {latency_s:g} s")
    at_kills: list[int] = []
    in_flight: list[int] = []
    async with scenario_frame(report, scenario, service, provider, timed=False) as started:
        try:
            async with serving(service, provider) as api:
                invocation_id = await api.submit(prompts)
                progress(scenario, f"{invocation_id}: {kills} kills at rows {marks}")
                for mark in marks:
                    entry = await api.wait_for(invocation_id, succeeded=mark)
                    if entry["status"] in FINISHED:
                        break
                    await asyncio.sleep(rng.uniform(0, KILL_JITTER_S))
                    service.kill()
                    at_kills.append(entry["progress"]["succeeded"])
                    in_flight.append(entry["progress"]["running"])
                    await asyncio.to_thread(service.start)
                ended = await api.wait_ended(invocation_id)
                after = await api.results(invocation_id)
                calls = provider.calls()
                lost = lost_rows(after["executions"], prompts)
                extra = duplicates(calls, prompts)
                never = [n for n, prompt in enumerate(prompts, start=1) if calls[prompt] == 0]
                bound = service.kills * threads
                elapsed = time.monotonic() - started
                report.figure(scenario, "kills done", f"{service.kills} of {kills}")
                report.figure(
                    scenario,
                    "succeeded rows at each kill (as last listed)",
                    " ".join(map(str, at_kills)),
                )
                report.figure(
                    scenario,
                    "running at each kill (as last listed)",
                    f"{' '.join(map(str, in_flight))} (sum {sum(in_flight)})",
                )
                starts = service.start_s
                report.figure(
                    scenario,
                    "restart to /health",
                    f"mean {sum(starts) / len(starts):.2f} s, max {max(starts):.2f} s",
                )
                report.figure(
                    scenario, "final", f"{ended['status']}, {len(after['executions'])} rows"
                )
                report.figure(scenario, "rows lost", len(lost))
                report.figure(
                    scenario, "calls", f"{sum(calls[prompt] for prompt in prompts)} for {rows} rows"
                )
                report.figure(
                    scenario,
                    "duplicate calls",
                    f"{extra} (bound {service.kills} kills x {threads} threads = {bound})",
                )
                owed = losses(
                    provider.timed_calls(), prompts, service.started_at, service.killed_at
                )
                report.figure(
                    scenario,
                    "calls lost at each kill",
                    f"{' '.join(map(str, owed.lost))} (most {max(owed.lost, default=0)}; "
                    f"{owed.retried} retries besides)",
                )
                report.figure(
                    scenario,
                    "oldest lost call",
                    f"{max(owed.oldest_s, default=0) * 1000:.0f} ms before its kill "
                    f"(a call takes {latency_s * 1000:.0f} ms)",
                )
                most = max((calls[prompt] for prompt in prompts), default=0)
                report.figure(scenario, "most calls of one prompt", most)
                report.figure(scenario, "total time", f"{elapsed:.1f} s")
                report.check(
                    scenario,
                    service.kills == kills,
                    f"{service.kills} of {kills} kills done"
                    + (
                        ""
                        if service.kills == kills
                        else " (the batch ended first: it ran past the marks left while restarting)"
                    ),
                )
                report.check(
                    scenario,
                    ended["status"] == "completed"
                    and not lost
                    and len(after["executions"]) == rows,
                    f"{ended['status']}: {len(lost)} rows lost of {rows}"
                    + (f" ({sample(lost)})" if lost else ""),
                )
                report.check(
                    scenario,
                    extra <= bound and not never,
                    f"{extra} duplicate calls (at most {bound})"
                    + (f", {len(never)} rows never sent ({sample(never)})" if never else ""),
                )
                # A worker has one call out at a time: a kill that costs more calls than
                # there are threads sent again rows whose answers the server already had.
                over = [
                    (kill, lost) for kill, lost in enumerate(owed.lost, start=1) if lost > threads
                ]
                report.check(
                    scenario,
                    not over,
                    f"at most {threads} calls (one a thread) lost at any one kill: "
                    + (
                        "none over"
                        if not over
                        else ", ".join(f"kill {kill} lost {lost}" for kill, lost in over)
                        + " (rows already answered, not yet durable, sent again)"
                    ),
                )
        except Exception:
            # How far it got, ahead of the FAIL line that scenario_frame writes.
            report.figure(scenario, "kills done", f"{service.kills} of {kills}, at rows {at_kills}")
            raise


async def sigterm_during_batch(report: Report, workdir: Path, grace_s: float) -> None:
    """Scenario 4: SIGTERM mid-batch with ``SHUTDOWN_GRACE_S=grace_s``, then a restart."""
    scenario = f"sigterm-grace-{grace_s:g}s"
    threads, latency_s = SIGTERM_THREADS, SIGTERM_LATENCY_S
    provider = Provider(workdir, latency_s)
    service = Service(
        workdir,
        provider.url,
        {
            "DEFAULT_MAX_THREADS": str(threads),
            "MAX_EXECUTIONS_PER_BATCH": str(SIGTERM_ROWS),
            "MAX_PROMPT_LENGTH": "1000",
            "SHUTDOWN_GRACE_S": str(grace_s),
        },
    )
    prompts = [f"{scenario} row {n:02d} of {SIGTERM_ROWS}" for n in range(SIGTERM_ROWS)]
    report.figure(
        scenario,
        "rows, threads, latency, grace",
        f"{SIGTERM_ROWS}, {threads}, {latency_s:g} s, {grace_s:g} s",
    )
    async with (
        scenario_frame(report, scenario, service, provider),
        serving(service, provider) as api,
    ):
        invocation_id = await api.submit(prompts)
        progress(scenario, f"{invocation_id}: waiting for {SIGTERM_AFTER_ROWS} rows")
        entry = await api.wait_for(invocation_id, succeeded=SIGTERM_AFTER_ROWS)
        await asyncio.sleep(SIGTERM_DELAY_S)
        service.terminate()
        term_at = service.terminated_at[-1]
        draining_status: int | None = None
        if grace_s > DRAINING_SUBMIT_AFTER_S + latency_s:
            # Well inside the grace: the server still listens, and must refuse.
            await asyncio.sleep(DRAINING_SUBMIT_AFTER_S)
            draining_status, _, _ = await api.call(
                "POST", EXECUTE, {"executions": [{"prompt": "too late", "model": MODEL}]}
            )
        bound_s = grace_s + SIGTERM_EXIT_SLACK_S
        code = await asyncio.to_thread(service.wait_exit, bound_s)
        exit_s = time.time() - term_at
        report.figure(
            scenario,
            "at SIGTERM",
            f"list said {entry['progress']['succeeded']} succeeded, "
            f"{entry['progress']['running']} running, {SIGTERM_DELAY_S:g} s before it",
        )
        report.figure(
            scenario,
            "exit code, time",
            f"{'none (still running)' if code is None else code}, {exit_s:.2f} s after SIGTERM",
        )
        report.check(
            scenario,
            code == 0 and exit_s <= bound_s,
            f"SIGTERM: exit {'none (still running)' if code is None else code} "
            f"in {exit_s:.1f} s (grace {grace_s:g} s; at most {bound_s:g} s)",
        )
        if code is None:
            raise StopScenario
        if draining_status is not None:
            report.check(
                scenario,
                draining_status == 503,
                f"a batch submitted {DRAINING_SUBMIT_AFTER_S:g} s after SIGTERM: "
                f"HTTP {draining_status} (503 while draining)",
            )

        # What the stopped process made and left, before anything else runs.
        first_calls = provider.timed_calls()
        stored = read_store(workdir / "batchexec.db")
        batch_status = stored.batches.get(invocation_id, "missing")
        succeeded = set(stored.with_status("succeeded"))
        cancelled = stored.with_status("cancelled")
        left = Counter(status for status in stored.rows.values() if status != "succeeded")
        # A prompt's last call is the one in flight when the process stopped.
        called = {prompt: at for at, prompt in first_calls}
        cut_off = sorted(set(called) - succeeded)
        flight = in_flight(called, term_at, grace_s, latency_s)
        after_term = sum(1 for at, _ in first_calls if at > term_at)
        report.figure(
            scenario,
            "left in the store",
            f"batch {batch_status}; {len(succeeded)} rows succeeded, "
            + ", ".join(f"{count} {status}" for status, count in sorted(left.items())),
        )
        report.figure(
            scenario,
            "in flight at SIGTERM",
            f"{len(flight.past) + len(flight.within) + len(flight.either)} rows: calls "
            f"ending {len(flight.past)} past the grace, {len(flight.within)} within it, "
            f"{len(flight.either)} about at its end; {after_term} calls sent after SIGTERM",
        )
        report.check(
            scenario,
            batch_status not in FINISHED and batch_status != "missing" and not cancelled,
            f"left in the store: batch {batch_status}, {len(cancelled)} rows cancelled",
        )
        wrong_cut = sorted(set(cut_off) - flight.past - flight.either)
        not_cut = sorted(flight.past - set(cut_off))
        report.check(
            scenario,
            not wrong_cut and not not_cut and len(cut_off) <= threads,
            f"{len(cut_off)} rows cut off (at most {threads}): the rows still running "
            f"past the grace were {len(flight.past)}"
            + (
                f"; cut off though done in time or not running: {sample(wrong_cut)}"
                if wrong_cut
                else ""
            )
            + (
                f"; still running past the grace yet finished: {sample(not_cut)}" if not_cut else ""
            ),
        )

        progress(scenario, f"exited with {len(cut_off)} rows cut off; starting again")
        await asyncio.to_thread(service.start)
        ended = await api.wait_ended(invocation_id)
        after = await api.results(invocation_id)
        xlsx_status, xlsx = await api.workbook(after.get("xlsx_url"))
        calls = provider.calls()
        total_calls = sum(calls[prompt] for prompt in prompts)
        extra = duplicates(calls, prompts)
        twice = sorted(prompt for prompt in prompts if calls[prompt] > 1)
        never = [prompt for prompt in prompts if calls[prompt] == 0]
        report.figure(
            scenario,
            "after the restart",
            f"{ended['status']} under the same id (start took {service.start_s[-1]:.1f} s)",
        )
        report.figure(
            scenario, "calls", f"{total_calls} for {SIGTERM_ROWS} rows, {extra} duplicates"
        )
        lost = lost_rows(after["executions"], prompts)
        report.check(
            scenario,
            after["status"] == "completed"
            and not lost
            and len(after["executions"]) == SIGTERM_ROWS,
            f"results: {after['status']}, {len(after['executions'])} rows, {len(lost)} lost"
            + (f" ({sample(lost)})" if lost else ""),
        )
        rows_in_book = read_workbook(xlsx) if xlsx_status == 200 else {}
        book_lost = workbook_lost(rows_in_book, prompts)
        report.check(
            scenario,
            xlsx_status == 200 and not book_lost and len(rows_in_book) == SIGTERM_ROWS,
            f"workbook: HTTP {xlsx_status}, {len(rows_in_book)} rows, {len(book_lost)} lost"
            + (f" ({sample(book_lost)})" if book_lost else ""),
        )
        most = threads if grace_s < latency_s else 0
        report.check(
            scenario,
            twice == cut_off and extra == len(cut_off) <= most and not never,
            f"{extra} duplicate calls for {len(cut_off)} rows cut off (at most {most})"
            + (f"; sent twice: {sample(twice)}" if twice != cut_off else "")
            + (f"; {len(never)} rows never sent" if never else ""),
        )


async def cli_run_killed(report: Report, workdir: Path) -> None:
    """Scenario 5: ``python -m batchexec run`` SIGKILLed midway, then the same command again."""
    scenario = "run-kill-9"
    provider = Provider(workdir, CLI_LATENCY_S)
    prompts = [f"run row {n:03d}: answer {n * 7919 % 1000:03d}" for n in range(CLI_ROWS)]
    command = CliRun(workdir, provider.url, prompts)
    report.figure(
        scenario, "rows, threads, latency", f"{CLI_ROWS}, {CLI_THREADS}, {CLI_LATENCY_S:g} s"
    )
    async with scenario_frame(report, scenario, command, provider) as started:
        await asyncio.to_thread(provider.start)
        command.start()
        progress(scenario, f"waiting for {CLI_KILL_AT_ROWS} of {CLI_ROWS} rows done")
        shown = 0
        for _ in range(int(BATCH_TIMEOUT_S / POLL_S) + 1):
            shown = command.done()
            if shown >= CLI_KILL_AT_ROWS or command.exit_code() is not None:
                break
            await asyncio.sleep(POLL_S)
        code = command.exit_code()
        if code is not None or shown < CLI_KILL_AT_ROWS:
            tail = command.output_text()[-300:]
            raise RuntimeError(
                f"the first run showed {shown} rows done and "
                f"{'exited with ' + str(code) if code is not None else 'was still running'}: "
                f"{tail!r}"
            )
        command.kill()
        killed_s = time.monotonic() - started
        calls_at_kill = sum(provider.calls().values())
        journal_kept = command.journal.exists()
        stored = read_store(command.journal)
        finished = [prompt for prompt, status in stored.rows.items() if status in ENDED_STATUSES]
        report.figure(
            scenario,
            "at the kill",
            f"progress said {shown} done; the journal held {len(finished)} finished, "
            f"{len(stored.with_status('running'))} running; {calls_at_kill} calls, "
            f"{killed_s:.1f} s in",
        )

        progress(scenario, f"killed with {len(finished)} rows finished; running it again")
        rerun_started = time.monotonic()
        command.start()
        code = await asyncio.to_thread(command.wait, BATCH_TIMEOUT_S)
        rerun_s = time.monotonic() - rerun_started
        output = command.output_text()
        calls = provider.calls()
        total_calls = sum(calls[prompt] for prompt in prompts)
        report.figure(
            scenario,
            "second run",
            f"exit {'none (still running)' if code is None else code} in {rerun_s:.1f} s",
        )
        report.figure(scenario, "calls", f"{total_calls} for {CLI_ROWS} rows")
        said = (
            f"continuing the run in out.xlsx.journal: {len(finished)} of {CLI_ROWS} "
            "rows had finished"
        )
        report.check(
            scenario,
            code == 0 and journal_kept and said in output,
            f"second run: exit {code}, "
            + (f"said {said!r}" if said in output else f"did not say {said!r}"),
        )
        if code is None:
            raise StopScenario
        resent = [prompt for prompt in finished if calls[prompt] != 1]
        not_succeeded = [prompt for prompt in finished if stored.rows[prompt] != "succeeded"]
        report.check(
            scenario,
            not resent and not not_succeeded,
            f"{len(finished)} rows finished before the kill: {len(resent)} sent again"
            + (f" ({sample(resent)})" if resent else "")
            + (f", {len(not_succeeded)} had not succeeded" if not_succeeded else ""),
        )
        bound = CLI_ROWS + CLI_THREADS
        never = [prompt for prompt in prompts if calls[prompt] == 0]
        report.check(
            scenario,
            total_calls <= bound and not never,
            f"{total_calls} calls for {CLI_ROWS} rows (at most {bound})"
            + (f", {len(never)} rows never sent" if never else ""),
        )
        rows_in_book = read_workbook(command.output.read_bytes()) if command.output.exists() else {}
        book_lost = workbook_lost(rows_in_book, prompts)
        report.check(
            scenario,
            len(rows_in_book) == CLI_ROWS and not book_lost,
            f"workbook: {len(rows_in_book)} rows, {len(book_lost)} lost"
            + (f" ({sample(book_lost)})" if book_lost else ""),
        )
        leftovers = command.journal_files()
        report.check(
            scenario,
            not leftovers,
            "journal removed" + (f": left {', '.join(leftovers)}" if leftovers else ""),
        )


async def run(args: argparse.Namespace, root: Path) -> Report:
    report = Report()
    try:
        async with asyncio.timeout(RUN_TIMEOUT_S):
            (root / "kill-9").mkdir()
            await kill_during_batch(report, root / "kill-9")
            (root / "random-kills").mkdir()
            await random_kills(
                report,
                root / "random-kills",
                seed=args.seed,
                rows=args.rows,
                kills=args.kills,
                threads=args.threads,
                latency_s=args.latency_s,
            )
            for grace_s in SIGTERM_GRACES_S:
                workdir = root / f"sigterm-{grace_s:g}"
                workdir.mkdir()
                await sigterm_during_batch(report, workdir, grace_s)
            (root / "run-kill-9").mkdir()
            await cli_run_killed(report, root / "run-kill-9")
    except TimeoutError:
        report.check("run", False, f"the run took more than {RUN_TIMEOUT_S:g} s")
    return report


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--seed", type=int, default=None, help="scenario 3's RNG seed (default: random)"
    )
    parser.add_argument("--rows", type=int, default=RANDOM_ROWS, help="scenario 3's rows")
    parser.add_argument("--kills", type=int, default=RANDOM_KILLS, help="scenario 3's kills")
    parser.add_argument(
        "--threads", type=int, default=RANDOM_THREADS, help="scenario 3's DEFAULT_MAX_THREADS"
    )
    parser.add_argument(
        "--latency-s", type=float, default=RANDOM_LATENCY_S, help="scenario 3's call latency"
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the working directories (logs, databases)"
    )
    args = parser.parse_args()
    if args.seed is None:
        args.seed = secrets.randbelow(2**32)
    if args.kills >= args.rows // 2:
        parser.error("--kills must be well under --rows")
    started = time.monotonic()
    if args.keep:
        folder = tempfile.mkdtemp(prefix="batchexec-stress-")
        report = asyncio.run(run(args, Path(folder)))
        print(f"working directories kept in {folder}")
    else:
        with tempfile.TemporaryDirectory(prefix="batchexec-stress-") as folder:
            report = asyncio.run(run(args, Path(folder)))
    report.print()
    seconds = time.monotonic() - started
    passed = len(report.checks) - report.failed
    print(f"{passed} passed, {report.failed} failed in {seconds:.0f} s (seed {args.seed})")
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
