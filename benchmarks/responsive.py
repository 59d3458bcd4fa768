"""Scenarios 12 and 13 (issue 11): a 100,000-row batch while the server stays responsive.

Both run on a server of their own that takes batches of up to 100,000 rows
(``MAX_EXECUTIONS_PER_BATCH``; the harness's ``MAX_BODY_BYTES`` of 64 MiB
already holds such a body, about 6 MB). Every request body is encoded before
its clock starts: the figures are the server's, not ``json.dumps``'s.

12. ``responsive-health``: 100,000 instant echo rows through HTTP: submit
    (``execute_batch``), follow the events route to ``done``, the results
    route once (the whole answer), the workbook (``xlsx_url``). Meanwhile a
    second process (``benchmarks.health_probe``) asks ``GET /health`` every
    20 ms on a new connection; each probe belongs to the phase it started in.
    Target, in every phase: max <= 100 ms and p99 <= 25 ms.
13. ``responsive-linear``: submit to the ``done`` event for 10,000 and for
    100,000 rows, of the instant echo model and of a 1 ms one. Target, for
    each model: the 100,000 rows in at most 1.1 x 10 x the 10,000 rows' time.
"""

from __future__ import annotations

import asyncio
import json
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks import health_probe
from benchmarks.client import EXECUTE, RESULTS, BatchClient
from benchmarks.common import RESULTS_DIR, RUNS, Figure, Samples, Target, progress
from benchmarks.server import Server, child_env

ROWS = 100_000
SMALL_ROWS = 10_000
INSTANT = "bench-echo-0"
ONE_MS = "bench-echo-1ms"
#: The settings the scenarios need over the harness's.
SETTINGS = {"MAX_EXECUTIONS_PER_BATCH": str(ROWS)}
#: The phases of a health run, in order; ``idle`` (before the submission) is only reported.
PHASES = ("submit", "run", "results", "download")
IDLE_S = 1.0
MAX_HEALTH_MS = 100.0
P99_HEALTH_MS = 25.0
LINEAR_MAX = 1.1
#: 10,000-row batches a run of scenario 13: a second or two each, so the noisiest term gets most.
SMALL_REPEATS = 3
#: The slowest probes kept per run, with their phase and time.
WORST_KEPT = 8
PROBES_PATH = RESULTS_DIR / "responsive-health-probes.json"
_PROBE_START_TIMEOUT_S = 30.0


@contextmanager
def server(workdir: Path) -> Iterator[Server]:
    """The harness's server, with ``SETTINGS`` set over its limits."""
    command = ("-m", "benchmarks.with_settings", *(f"{k}={v}" for k, v in SETTINGS.items()), "--")
    with Server(workdir / "responsive", command=command, name="responsive-server") as responsive:
        yield responsive


def rows(count: int, model: str) -> list[dict[str, str]]:
    return [{"prompt": f"Row {n}: say hello.", "model": model} for n in range(1, count + 1)]


def body_of(executions: Sequence[Mapping[str, str]]) -> bytes:
    return json.dumps({"executions": list(executions)}).encode()


async def submit(client: BatchClient, body: bytes) -> str:
    """``BatchClient.submit`` of a body encoded beforehand; the invocation id."""
    async with client.session.post(
        client.base_url + EXECUTE,
        data=body,
        headers={**client.headers, "Content-Type": "application/json"},
    ) as answer:
        payload = await answer.json()
        if answer.status != 200:
            raise RuntimeError(f"submit: HTTP {answer.status}: {str(payload)[:500]}")
    invocation_id: str = payload["invocationId"]
    return invocation_id


async def to_done(client: BatchClient, body: bytes) -> tuple[str, float]:
    """Submit ``body``, wait for ``done``: the invocation id and the seconds in between."""
    started = time.monotonic()
    batch_id = await submit(client, body)
    status = await client.wait_done(batch_id)
    elapsed = time.monotonic() - started
    if status != "completed":
        raise RuntimeError(f"batch {batch_id} ended {status}")
    return batch_id, elapsed


async def whole_results(client: BatchClient, batch_id: str, total: int) -> tuple[str, int]:
    """The results route's whole answer, checked: every row succeeded and listed, CSV in it.

    Returns the workbook's URL and the answer's size in bytes.
    """
    async with client.session.post(
        client.base_url + RESULTS, json={"invocation_id": batch_id}, headers=client.headers
    ) as answer:
        raw = await answer.read()
        if answer.status != 200:
            raise RuntimeError(f"results: HTTP {answer.status}: {raw[:500]!r}")
    payload = json.loads(raw)
    succeeded = payload.get("progress", {}).get("succeeded")
    listed = len(payload.get("executions") or [])
    if payload["status"] != "completed" or succeeded != total or listed != total:
        raise RuntimeError(
            f"batch {batch_id}: {payload['status']}, {succeeded} of {total} succeeded, "
            f"{listed} listed: {payload.get('message')}"
        )
    if not payload.get("csv_content") or not payload.get("xlsx_url"):
        raise RuntimeError(f"batch {batch_id}: no csv_content or no xlsx_url in the results")
    xlsx_url: str = payload["xlsx_url"]
    return xlsx_url, len(raw)


async def succeeded(client: BatchClient, batch_id: str) -> tuple[int, str]:
    """How many rows of the batch succeeded, and its workbook's URL: the results' head alone."""
    payload = await client.results(batch_id, progress_only=True)
    count: int = payload["progress"]["succeeded"]
    xlsx_url: str = payload["xlsx_url"]
    return count, xlsx_url


async def download(client: BatchClient, xlsx_url: str) -> int:
    """The workbook ``xlsx_url`` names, fetched from this server; its size in bytes."""
    return len(await client.download(xlsx_url))


# Scenario 12: /health while a 100,000-row batch goes through


class ProbeProcess:
    """``python -m benchmarks.health_probe URL OUT`` from ``start`` until ``stop``."""

    def __init__(self, base_url: str, out: Path) -> None:
        self.base_url = base_url
        self.out = out
        self._process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        """Start it; return once its first probe has been answered."""
        self._process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "benchmarks.health_probe",
            self.base_url,
            str(self.out),
            stdout=asyncio.subprocess.PIPE,
            env=child_env(),
        )
        assert self._process.stdout is not None
        try:
            line = await asyncio.wait_for(self._process.stdout.readline(), _PROBE_START_TIMEOUT_S)
        except TimeoutError:
            self._process.kill()
            await self._process.wait()
            raise RuntimeError("the health probe did not answer its first probe") from None
        if not line:
            code = await self._process.wait()
            raise RuntimeError(f"the health probe exited with {code} before its first probe")

    async def stop(self) -> list[dict[str, Any]]:
        """SIGINT; its probes once it has written them."""
        if self._process is None:
            raise RuntimeError("the health probe was not started")
        process, self._process = self._process, None
        if process.returncode is None:
            process.send_signal(signal.SIGINT)
        try:
            code = await asyncio.wait_for(process.wait(), health_probe.TIMEOUT_S + 10)
        except TimeoutError:
            process.kill()
            await process.wait()
            raise RuntimeError("the health probe did not stop on SIGINT") from None
        if code != 0:
            raise RuntimeError(f"the health probe exited with {code}")
        probes: list[dict[str, Any]] = json.loads(self.out.read_bytes())["probes"]
        return probes


@dataclass(frozen=True)
class PhaseStats:
    """The probes that started in one phase."""

    seconds: float
    probes: int
    failed: int
    max_ms: float
    p99_ms: float
    median_ms: float

    @property
    def budget(self) -> float:
        """The larger of max / 100 ms and p99 / 25 ms: <= 1 when the phase meets the target."""
        return max(self.max_ms / MAX_HEALTH_MS, self.p99_ms / P99_HEALTH_MS)

    def text(self) -> str:
        failed = f", {self.failed} failed" if self.failed else ""
        return (
            f"{self.seconds:.2f} s, {self.probes} probes{failed}: "
            f"max {self.max_ms:.1f}, p99 {self.p99_ms:.1f}, p50 {self.median_ms:.1f} ms"
        )


def p99(values: Sequence[float]) -> float:
    if len(values) < 2:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[98]


def phase_of(start_s: float, marks: Mapping[str, float]) -> str | None:
    """The phase a probe started in: the last of ``marks`` (in order, ``end`` last) before it."""
    found = None
    for name, mark in marks.items():
        if start_s < mark:
            break
        found = name
    return None if found == "end" else found


def answered(probe: Mapping[str, Any]) -> bool:
    return probe["error"] is None and probe["status"] == 200


def latency_ms(probe: Mapping[str, Any]) -> float:
    """A probe's latency; a failed one counts as the time it took to fail, at least 100 ms."""
    measured: float = probe["latency_ms"]
    return measured if answered(probe) else max(measured, MAX_HEALTH_MS)


@dataclass(frozen=True)
class HealthRun:
    """One run of scenario 12: per phase, what the probes saw."""

    phases: dict[str, PhaseStats]
    worst: list[dict[str, Any]]
    results_bytes: int
    workbook_bytes: int

    @property
    def judged(self) -> list[PhaseStats]:
        return [self.phases[name] for name in PHASES]

    @property
    def budget(self) -> float:
        return max(stats.budget for stats in self.judged)


def judge(
    probes: Sequence[Mapping[str, Any]], marks: Mapping[str, float]
) -> tuple[dict[str, PhaseStats], list[dict[str, Any]]]:
    """Each probe into its phase: per phase its figures; the slowest probes of the judged ones."""
    tagged: dict[str, list[Mapping[str, Any]]] = {name: [] for name in ("idle", *PHASES)}
    for probe in probes:
        phase = phase_of(probe["start_s"], marks)
        if phase is not None:
            tagged[phase].append(probe)
    names = list(marks)
    phases: dict[str, PhaseStats] = {}
    for name, members in tagged.items():
        seconds = marks[names[names.index(name) + 1]] - marks[name]
        if not members and seconds * 1000 < 2 * health_probe.EVERY_MS:
            # Over before a probe was due (a download of a workbook already on disk):
            # nothing held the loop for longer than the phase itself.
            phases[name] = PhaseStats(seconds, 0, 0, seconds * 1000, seconds * 1000, 0.0)
            continue
        if not members:
            raise RuntimeError(f"no /health probe started in the {name} phase ({seconds:.3f} s)")
        latencies = [latency_ms(probe) for probe in members]
        phases[name] = PhaseStats(
            seconds=seconds,
            probes=len(members),
            failed=sum(1 for probe in members if not answered(probe)),
            max_ms=max(latencies),
            p99_ms=p99(latencies),
            median_ms=statistics.median(latencies),
        )
    judged = [(name, probe) for name in PHASES for probe in tagged[name]]
    judged.sort(key=lambda pair: latency_ms(pair[1]), reverse=True)
    worst = [
        {
            "phase": name,
            "latency_ms": round(probe["latency_ms"], 2),
            "into_phase_s": round(probe["start_s"] - marks[name], 3),
            "since_submit_s": round(probe["start_s"] - marks["submit"], 3),
            "status": probe["status"],
            "error": probe["error"],
        }
        for name, probe in judged[:WORST_KEPT]
    ]
    return phases, worst


async def health_run(
    client: BatchClient, body: bytes, out: Path
) -> tuple[HealthRun, dict[str, float], list[dict[str, Any]]]:
    """One run: the batch's four phases with the probe running; the judged run, marks, probes."""
    probe = ProbeProcess(client.base_url, out)
    await probe.start()
    marks: dict[str, float] = {"idle": time.monotonic()}
    try:
        await asyncio.sleep(IDLE_S)
        marks["submit"] = time.monotonic()
        batch_id = await submit(client, body)
        marks["run"] = time.monotonic()
        status = await client.wait_done(batch_id)
        if status != "completed":
            raise RuntimeError(f"batch {batch_id} ended {status}")
        marks["results"] = time.monotonic()
        xlsx_url, results_bytes = await whole_results(client, batch_id, ROWS)
        marks["download"] = time.monotonic()
        workbook_bytes = await download(client, xlsx_url)
        marks["end"] = time.monotonic()
    finally:
        probes = await probe.stop()
    phases, worst = judge(probes, marks)
    return HealthRun(phases, worst, results_bytes, workbook_bytes), marks, probes


def _median_phase(runs: Sequence[HealthRun], name: str) -> str:
    """One phase's figures, each the median over the runs."""

    def median(field: str) -> float:
        return statistics.median(float(getattr(run.phases[name], field)) for run in runs)

    return (
        f"{name} ({median('seconds'):.2f} s): max {median('max_ms'):.1f}, "
        f"p99 {median('p99_ms'):.1f} ms"
    )


def _worst_phases(runs: Sequence[HealthRun], field: str) -> str:
    """The phase with the largest ``field``, of each run (once each, in the runs' order)."""
    worst = (max(PHASES, key=lambda name: float(getattr(run.phases[name], field))) for run in runs)
    return ", ".join(dict.fromkeys(worst))


async def health(client: BatchClient) -> Figure:
    """Scenario 12."""
    body = body_of(rows(ROWS, INSTANT))
    runs: list[HealthRun] = []
    timelines: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="batchexec-probe-") as folder:
        for run_number in range(1, RUNS + 1):
            run, marks, probes = await health_run(client, body, Path(folder) / "probes.json")
            runs.append(run)
            timelines.append({"marks": marks, "probes": probes})
            for name in ("idle", *PHASES):
                progress(
                    "responsive health",
                    f"run {run_number}/{RUNS} {name}: {run.phases[name].text()}",
                )
            for worst in run.worst[:5]:
                progress(
                    "responsive health",
                    f"run {run_number}/{RUNS} slow probe: {worst['latency_ms']:.1f} ms in "
                    f"{worst['phase']} at +{worst['into_phase_s']:.3f} s "
                    f"({worst['since_submit_s']:.3f} s after submitting)",
                )
    PROBES_PATH.write_text(json.dumps({"runs": timelines}) + "\n")
    progress("responsive health", f"every probe of every run: {PROBES_PATH}")
    budget = Samples.of([run.budget for run in runs], "")
    worst_max = Samples.of([max(stats.max_ms for stats in run.judged) for run in runs], "ms")
    worst_p99 = Samples.of([max(stats.p99_ms for stats in run.judged) for run in runs], "ms")
    return Figure(
        key="responsive_health",
        title="/health during a 100,000-row batch",
        how=f"{ROWS:,} instant echo rows through HTTP: submit, events to `done`, the whole "
        "results answer, the workbook; a second process asks `GET /health` every "
        f"{health_probe.EVERY_MS:g} ms on a new connection, each probe judged in the phase "
        "it started in",
        measured=f"worst max {worst_max.text(1)}, in {_worst_phases(runs, 'max_ms')}; "
        f"worst p99 {worst_p99.text(1)}, in {_worst_phases(runs, 'p99_ms')}",
        reference="; ".join(_median_phase(runs, name) for name in PHASES)
        + f"; idle before: max {statistics.median(r.phases['idle'].max_ms for r in runs):.1f} ms",
        ratio=budget.median,
        target=Target(
            "<=",
            1.0,
            f"max <= {MAX_HEALTH_MS:g} ms and p99 <= {P99_HEALTH_MS:g} ms in every phase "
            "(ratio: the worse of max/100 and p99/25)",
        ),
        data={
            "samples": budget.as_json(),
            "worst_max_ms": worst_max.as_json(),
            "worst_p99_ms": worst_p99.as_json(),
            "runs": [
                {
                    "phases": {
                        name: {**vars(stats), "budget": stats.budget}
                        for name, stats in run.phases.items()
                    },
                    "worst_probes": run.worst,
                    "results_bytes": run.results_bytes,
                    "workbook_bytes": run.workbook_bytes,
                }
                for run in runs
            ],
            "rows": ROWS,
            "probe_every_ms": health_probe.EVERY_MS,
            "probes_file": str(PROBES_PATH),
        },
    )


# Scenario 13: 100,000 rows in ten times the time of 10,000


async def _settled_run_s(client: BatchClient, body: bytes, total: int) -> float:
    """Seconds from sending ``body`` to ``done``; then the workbook, so none is written later."""
    batch_id, elapsed = await to_done(client, body)
    count, xlsx_url = await succeeded(client, batch_id)
    if count != total:
        raise RuntimeError(f"batch {batch_id}: {count} of {total} succeeded")
    # The workbook is written after `done`; fetching it waits for that write, which
    # would otherwise overlap the next timed batch.
    await download(client, xlsx_url)
    return elapsed


async def linear(client: BatchClient) -> Figure:
    """Scenario 13."""
    models = {"instant": INSTANT, "1 ms": ONE_MS}
    sizes = (SMALL_ROWS, ROWS)
    repeats = {SMALL_ROWS: SMALL_REPEATS, ROWS: 1}
    bodies = {
        (label, size): body_of(rows(size, model))
        for label, model in models.items()
        for size in sizes
    }
    seconds: dict[tuple[str, int], list[float]] = {key: [] for key in bodies}
    for run in range(1, RUNS + 1):
        for label in models:
            for size in sizes:
                for _ in range(repeats[size]):
                    elapsed = await _settled_run_s(client, bodies[label, size], size)
                    seconds[label, size].append(elapsed)
                    progress(
                        "responsive linear",
                        f"run {run}/{RUNS} {label} {size:,} rows: {elapsed:.3f} s, "
                        f"{size / elapsed:,.0f} rows/s",
                    )
    times = {key: Samples.of(values, "s") for key, values in seconds.items()}
    rates = {
        key: Samples.of([key[1] / value for value in values], "rows/s")
        for key, values in seconds.items()
    }
    scale = ROWS / SMALL_ROWS
    ratios = {
        label: times[label, ROWS].median / (scale * times[label, SMALL_ROWS].median)
        for label in models
    }
    progress(
        "responsive linear",
        ", ".join(f"{label}: {ratio:.3f} x linear" for label, ratio in ratios.items()),
    )

    def described(size: int) -> str:
        return "; ".join(
            f"{label} {times[label, size].text(2)}, {rates[label, size].median:,.0f} rows/s"
            for label in models
        )

    return Figure(
        key="responsive_linear",
        title="100,000 rows vs 10 x 10,000, wall time",
        how=f"{ROWS:,} and {SMALL_ROWS:,} rows of the instant echo model and of a 1 ms one "
        "(100 in flight), HTTP submit to the `done` event, body encoded beforehand; "
        f"{SMALL_REPEATS} batches of {SMALL_ROWS:,} rows to 1 of {ROWS:,} a run; each batch's "
        "workbook fetched before the next starts",
        measured=f"{ROWS:,} rows: {described(ROWS)}",
        reference=f"{SMALL_ROWS:,} rows: {described(SMALL_ROWS)}; x {scale:g}: "
        + ", ".join(f"{label} {ratio:.3f}" for label, ratio in ratios.items()),
        ratio=max(ratios.values()),
        target=Target("<=", LINEAR_MAX, f"<= {LINEAR_MAX:g} for each model (the worse shown)"),
        data={
            "samples": times["instant", ROWS].as_json(),
            "ratios": ratios,
            "seconds": {f"{label} {size}": times[label, size].as_json() for label, size in times},
            "rows_per_s": {
                f"{label} {size}": rates[label, size].as_json() for label, size in rates
            },
        },
    )
