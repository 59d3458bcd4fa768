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

It prints a table of figures, a PASS or FAIL line per check, and exits 1
if any check fails. Every wait is bounded; a run takes about 20 s.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import io
import random
import secrets
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import openpyxl
from pydantic import AliasChoices

from batchexec.config import Settings
from benchmarks.common import progress
from benchmarks.counting_provider import read_calls
from benchmarks.server import child_env, free_port, stop_process, wait_for_http

API_KEY = "stress-token"
MODEL = "counted"

EXECUTE = "/experience/batch_execution/execute_batch/invoke"
RESULTS = "/system/batch_execution/results"
BATCHES = "/system/batch_execution/batches"
RETRY = "/system/batch_execution/retry"
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


def _setting_names() -> frozenset[str]:
    """Every environment variable batchexec reads a setting from, upper-cased."""
    names: set[str] = set()
    for spec in Settings.model_fields.values():
        if isinstance(spec.validation_alias, AliasChoices):
            names.update(str(choice).upper() for choice in spec.validation_alias.choices)
    return frozenset(names)


class Provider:
    """``python -m benchmarks.counting_provider`` in its own process, its calls in a log."""

    def __init__(self, workdir: Path, latency_s: float) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / "calls.log"
        self._stderr_path = workdir / "provider.log"
        self._latency_s = latency_s
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        command = [
            sys.executable,
            "-m",
            "benchmarks.counting_provider",
            "--port",
            str(self.port),
            "--latency-s",
            str(self._latency_s),
            "--log",
            str(self.log_path),
        ]
        with self._stderr_path.open("wb") as log:
            self._process = subprocess.Popen(  # noqa: S603 - our own interpreter and arguments
                command, env=child_env(), stdout=log, stderr=subprocess.STDOUT
            )
        wait_for_http(f"{self.url}/health", self._process, PROVIDER_TIMEOUT_S)

    def calls(self) -> Counter[str]:
        """How many times each prompt has been sent so far."""
        return Counter(prompt for _, prompt in read_calls(self.log_path))

    def timed_calls(self) -> list[tuple[float, str]]:
        """Every call so far as (epoch seconds of its arrival, prompt)."""
        return read_calls(self.log_path)

    def stop(self) -> None:
        if self._process is not None:
            stop_process(self._process, "counting provider")
            self._process = None


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
        catalog = workdir / "models.toml"
        catalog.write_text(
            f'[models."{MODEL}"]\nprovider = "openai"\n'
            f'base_url = "{provider_url}/v1"\nmodel_id = "m"\n'
        )
        cleared = _setting_names()
        self._env = {
            name: value for name, value in child_env().items() if name.upper() not in cleared
        }
        self._env.update(
            {
                "INTEGRATIONS_API_KEYS": API_KEY,
                "BATCHEXEC_MODELS": str(catalog),
                "PUBLIC_DIR": str(workdir / "public"),
                # Relative: the same working directory finds the same file.
                "DATABASE_URL": "sqlite:///batchexec.db",
                "EXECUTION_TIMEOUT": str(EXECUTION_TIMEOUT_S),
                "SHUTDOWN_GRACE_S": str(SHUTDOWN_GRACE_S),
                **settings,
            }
        )
        self._command = [sys.executable, "-m", "batchexec", "serve", "--port", str(self.port)]
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start it and wait for ``/health``; each start logs to a file of its own."""
        self.starts += 1
        log_path = self.workdir / f"server-{self.starts}.log"
        started = time.monotonic()
        self.started_at.append(time.time())
        with log_path.open("wb") as log:
            self._process = subprocess.Popen(  # noqa: S603 - our own interpreter and arguments
                self._command, cwd=self.workdir, env=self._env, stdout=log, stderr=subprocess.STDOUT
            )
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
    started = time.monotonic()
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    try:
        await asyncio.to_thread(provider.start)
        await asyncio.to_thread(service.start)
        async with aiohttp.ClientSession(
            timeout=timeout, connector=aiohttp.TCPConnector(force_close=True)
        ) as session:
            api = Api(session, service)
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
            not_succeeded = [
                index for index, (status, _) in finished.items() if status != "succeeded"
            ]
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
                after["status"] == "completed"
                and not lost
                and len(after["executions"]) == KILL9_ROWS,
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
            errors = service.errors_logged()
            report.figure(
                scenario,
                "ERROR lines logged",
                f"{len(errors)}" + (f": {errors[0][:160]}" if errors else ""),
            )
    except Exception as exc:  # a scenario that breaks is its FAIL line, not the end of the run
        report.check(scenario, False, f"the scenario stopped: {type(exc).__name__}: {exc}")
    finally:
        await asyncio.to_thread(service.stop)
        await asyncio.to_thread(provider.stop)
    report.figure(scenario, "time", f"{time.monotonic() - started:.1f} s")


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
    started = time.monotonic()
    at_kills: list[int] = []
    in_flight: list[int] = []
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    try:
        await asyncio.to_thread(provider.start)
        await asyncio.to_thread(service.start)
        async with aiohttp.ClientSession(
            timeout=timeout, connector=aiohttp.TCPConnector(force_close=True)
        ) as session:
            api = Api(session, service)
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
            report.figure(scenario, "final", f"{ended['status']}, {len(after['executions'])} rows")
            report.figure(scenario, "rows lost", len(lost))
            report.figure(
                scenario, "calls", f"{sum(calls[prompt] for prompt in prompts)} for {rows} rows"
            )
            report.figure(
                scenario,
                "duplicate calls",
                f"{extra} (bound {service.kills} kills x {threads} threads = {bound})",
            )
            owed = losses(provider.timed_calls(), prompts, service.started_at, service.killed_at)
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
                ended["status"] == "completed" and not lost and len(after["executions"]) == rows,
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
            over = [(kill, lost) for kill, lost in enumerate(owed.lost, start=1) if lost > threads]
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
            errors = service.errors_logged()
            report.figure(
                scenario,
                "ERROR lines logged",
                f"{len(errors)}" + (f": {errors[0][:160]}" if errors else ""),
            )
    except Exception as exc:  # a scenario that breaks is its FAIL line, not the end of the run
        report.figure(scenario, "kills done", f"{service.kills} of {kills}, at rows {at_kills}")
        report.check(scenario, False, f"the scenario stopped: {type(exc).__name__}: {exc}")
    finally:
        await asyncio.to_thread(service.stop)
        await asyncio.to_thread(provider.stop)


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
