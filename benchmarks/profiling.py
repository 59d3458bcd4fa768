"""The profile of one 5,000-row overhead run, taken in the server process.

Writes ``bench-results/overhead.prof`` (pstats; open it with snakeviz or
``python -m pstats``) and ``bench-results/overhead-profile.txt``: where the
time goes per row, then the top 25 functions by cumulative time and by own
time.
"""

from __future__ import annotations

import asyncio
import io
import os
import pstats
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks import client as http
from benchmarks.common import RESULTS_DIR, progress
from benchmarks.overhead import end_to_end_s, instant_rows
from benchmarks.server import Server

TOP = 25
#: Seconds for a signal to reach the server before the harness goes on.
_SIGNAL_SETTLE_S = 0.3

#: Where the main thread or a worker thread waits rather than works.
_IDLE = {
    ("~", "<method 'poll' of 'select.epoll' objects>"),
    ("~", "<method 'acquire' of '_thread.lock' objects>"),
    ("~", "<method 'get' of '_queue.SimpleQueue' objects>"),
}

FunctionKey = tuple[str, int, str]


@dataclass(frozen=True)
class Part:
    """A part of the per-row work: the cumulative time of these functions (file suffix, name)."""

    name: str
    functions: tuple[tuple[str, str], ...]
    #: Parts whose time is included in these functions' and is taken out.
    minus: tuple[str, ...] = ()


PARTS = (
    Part("request parsing and validation", (("web/handlers.py", "execute_batch"),)),
    Part("provider call (echo)", (("providers/echo.py", "complete"),)),
    Part(
        "registry updates",
        (("registry.py", "start_execution"), ("registry.py", "finish_execution")),
    ),
    Part(
        "engine scheduling",
        (("engine.py", "_run_batch"), ("engine.py", "_run_row")),
        minus=("provider call (echo)", "registry updates"),
    ),
    Part("event stream (SSE) writing", (("web/handlers.py", "events"),)),
    Part("results route (JSON of 5,000 executions)", (("web/handlers.py", "results"),)),
    Part("CSV rendering", (("exports.py", "csv_sheet"), ("exports.py", "render_csv"))),
    Part("XLSX writing", (("exports.py", "results_sheet"), ("exports.py", "write_xlsx"))),
)


def _matches(key: FunctionKey, suffix: str, name: str) -> bool:
    filename, _, function = key
    return function == name and filename.replace(os.sep, "/").endswith(f"batchexec/{suffix}")


def breakdown(stats: pstats.Stats, rows: int) -> dict[str, Any]:
    """Seconds and µs per row of each part, of busy time, and of the rest."""
    table: dict[FunctionKey, Any] = stats.stats  # type: ignore[attr-defined]
    busy = sum(entry[2] for key, entry in table.items() if (key[0], key[2]) not in _IDLE)
    seconds: dict[str, float | None] = {}
    missing: dict[str, list[str]] = {}
    for part in PARTS:
        total = 0.0
        found = False
        for suffix, name in part.functions:
            hits = [entry[3] for key, entry in table.items() if _matches(key, suffix, name)]
            found = found or bool(hits)
            total += sum(hits)
            if not hits:
                missing.setdefault(part.name, []).append(f"{suffix}:{name}")
        if not found:
            seconds[part.name] = None
            continue
        for other in part.minus:
            total -= seconds.get(other) or 0.0
        seconds[part.name] = total
    known = sum(value for value in seconds.values() if value is not None)
    seconds["event loop, aiohttp and the rest"] = busy - known
    return {
        "rows": rows,
        "busy_s": busy,
        "parts_s": seconds,
        "us_per_row": {
            name: None if value is None else value / rows * 1e6 for name, value in seconds.items()
        },
        "missing": missing,
    }


def _top(stats: pstats.Stats, sort: str) -> str:
    buffer = io.StringIO()
    stats.stream = buffer  # type: ignore[attr-defined]
    stats.sort_stats(sort).print_stats(TOP)
    return buffer.getvalue()


def render(
    summary: dict[str, Any],
    stats: pstats.Stats,
    wall_s: float,
    command: str,
    unprofiled_us: float | None,
) -> str:
    """The text report; ``unprofiled_us`` (µs per row measured without the profiler) scales
    each part's share into an estimate of its cost without the profiler."""
    rows = summary["rows"]
    lines = [
        f"Profile of one {rows:,}-row overhead run in the server process (cProfile, main "
        "thread and worker threads).",
        f"Command: {command}",
        f"Wall time of the profiled run: {wall_s:.3f} s ({wall_s / rows * 1e6:,.0f} µs per row, "
        "slowed by the profiler)",
        f"Busy time in the server (waiting excluded): {summary['busy_s']:.3f} s "
        f"({summary['busy_s'] / rows * 1e6:,.0f} µs per row)",
        "",
        "Where the time goes per row (cumulative time of the parts' functions; the last column",
        "scales each share of the busy time to the µs per row measured without the profiler,",
        f"{'n/a' if unprofiled_us is None else f'{unprofiled_us:,.0f} µs'}):",
        "",
        f"  {'part':<45} {'profiled':>11} {'share':>7} {'unprofiled':>12}",
    ]
    for name, micros in summary["us_per_row"].items():
        share = (summary["parts_s"][name] or 0.0) / summary["busy_s"]
        if micros is None:
            lines.append(f"  {name:<45} {'n/a':>11}")
            continue
        estimate = "" if unprofiled_us is None else f"≈{share * unprofiled_us:8.1f} µs"
        lines.append(f"  {name:<45} {micros:8.1f} µs {share * 100:6.1f}% {estimate:>12}")
    for name, functions in summary["missing"].items():
        lines.append(f"  (not found for {name}: {', '.join(functions)})")
    lines += ["", f"Top {TOP} by cumulative time:", _top(stats, "cumulative")]
    lines += [f"Top {TOP} by own time:", _top(stats, "tottime")]
    return "\n".join(lines)


def _signal(pid: int, signum: int) -> None:
    os.kill(pid, signum)
    time.sleep(_SIGNAL_SETTLE_S)


async def _one_run(url: str) -> float:
    async with http.session() as session:
        return await end_to_end_s(http.BatchClient(session, url), instant_rows())


def profile_overhead(
    workdir: Path, *, unprofiled_us: float | None = None, results_dir: Path = RESULTS_DIR
) -> dict[str, Any]:
    """Run one overhead batch against a profiled server; returns the summary.

    ``unprofiled_us`` is scenario 4's µs per row, when it ran, for the estimates.
    """
    results_dir.mkdir(parents=True, exist_ok=True)
    prof = results_dir / "overhead.prof"
    prof.unlink(missing_ok=True)
    command = ("-m", "benchmarks.profiled_server", str(prof))
    server = Server(workdir / "profiled", command=command, name="profiled-server")
    with server:
        _signal(server.pid, signal.SIGUSR1)
        wall_s = asyncio.run(_one_run(server.url))
        _signal(server.pid, signal.SIGUSR2)
        progress("profile", f"profiled run: {wall_s:.3f} s; stopping the server")
    if not prof.exists():
        raise RuntimeError(f"the profiled server wrote no {prof}; see {server.log_path}")
    stats = pstats.Stats(str(prof))
    rows = len(instant_rows())
    summary = breakdown(stats, rows)
    shown = " ".join(["python", *command, "serve", "--port", str(server.port)])
    text = render(summary, stats, wall_s, shown, unprofiled_us)
    (results_dir / "overhead-profile.txt").write_text(text)
    progress("profile", f"wrote {prof.name} and overhead-profile.txt")
    return {**summary, "wall_s": wall_s, "prof": str(prof)}
