"""Scenario 6: batchexec's XLSX writer (xlsxwriter) vs ``pandas.DataFrame.to_excel``: time, memory.

Every write runs in a fresh process (``benchmarks.xlsx_child``), so one
writer's memory does not hide the other's and the peak is the write's own.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from benchmarks.common import RUNS, Figure, Samples, Target, env_int, progress
from benchmarks.server import child_env

ROWS = env_int("BENCH_XLSX_ROWS", 100_000)
SMALL_ROWS = ROWS // 10
#: "Memory flat": growth at ROWS rows within this factor of the growth at SMALL_ROWS rows,
#: plus a few MB for noise; a writer that keeps every row would grow ~10x instead.
FLAT_FACTOR = 1.5
FLAT_SLACK_MB = 8.0


def write_once(writer: str, rows: int, workdir: Path) -> dict[str, Any]:
    path = workdir / f"{writer}-{rows}.xlsx"
    done = subprocess.run(  # noqa: S603 - our own interpreter and module
        [sys.executable, "-m", "benchmarks.xlsx_child", writer, str(rows), str(path)],
        env=child_env(),
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"xlsx child {writer} {rows}: exit {done.returncode}\n{done.stderr}")
    path.unlink(missing_ok=True)
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def xlsx(workdir: Path) -> Figure:
    ours: list[dict[str, Any]] = []
    theirs: list[dict[str, Any]] = []
    for run in range(1, RUNS + 1):
        ours.append(write_once("batchexec", ROWS, workdir))
        theirs.append(write_once("pandas", ROWS, workdir))
        progress(
            "xlsx",
            f"run {run}/{RUNS}: batchexec {ours[-1]['seconds']:.2f} s "
            f"(+{ours[-1]['growth_mb']:.0f} MB), pandas {theirs[-1]['seconds']:.2f} s "
            f"(+{theirs[-1]['growth_mb']:.0f} MB)",
        )
    small = write_once("batchexec", SMALL_ROWS, workdir)
    progress("xlsx", f"batchexec at {SMALL_ROWS:,} rows: +{small['growth_mb']:.1f} MB")
    mine = Samples.of([r["seconds"] for r in ours], "s")
    pandas = Samples.of([r["seconds"] for r in theirs], "s")
    my_growth = Samples.of([r["growth_mb"] for r in ours], "MB")
    pandas_growth = Samples.of([r["growth_mb"] for r in theirs], "MB")
    flat = my_growth.median <= FLAT_FACTOR * small["growth_mb"] + FLAT_SLACK_MB
    return Figure(
        key="xlsx",
        title="XLSX writing",
        how=f"{ROWS:,} rows x 6 columns of 200-character text (seeded random words), each write "
        "in a fresh process: `batchexec.exports.write_xlsx` (xlsxwriter, constant memory) vs "
        f"`pandas.DataFrame.to_excel` (default engine, {theirs[0]['engine']}); memory is peak "
        "RSS above the RSS with the data built",
        measured=f"batchexec {mine.text()}, +{my_growth.median:.0f} MB "
        f"(+{small['growth_mb']:.0f} MB at {SMALL_ROWS:,} rows)",
        reference=f"pandas {pandas.text()}, +{pandas_growth.median:.0f} MB",
        ratio=pandas.median / mine.median,
        # Workbooks are written with xlsxwriter (the product's choice), off the path to a
        # batch's done event; the goal is that no one waits on it and nothing stalls, so
        # against pandas it must not lose, rather than win by a margin.
        target=Target(">=", 1, label=">= 1, memory flat"),
        also_met=flat,
        data={
            "rows": ROWS,
            "batchexec_s": mine.as_json(),
            "pandas_s": pandas.as_json(),
            "batchexec_growth_mb": my_growth.as_json(),
            "pandas_growth_mb": pandas_growth.as_json(),
            "batchexec_small": small,
            "memory_flat": flat,
            "runs": {"batchexec": ours, "pandas": theirs},
        },
    )
