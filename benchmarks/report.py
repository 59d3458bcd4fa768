"""The outputs: one markdown table on stdout, ``results.json`` and ``bench.png``."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks.common import ROOT, RUNS, Figure, Target

HEADER = ("figure", "how", "measured (median of N, spread)", "reference", "ratio", "target", "met?")


def machine() -> dict[str, Any]:
    return {
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "system": f"{platform.system()} {platform.release()}",
    }


def _git(*args: str) -> str:
    try:
        done = subprocess.run(  # noqa: S603 - fixed git arguments
            ["git", *args],  # noqa: S607 - git from PATH
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return done.stdout.strip()


def revision() -> dict[str, Any]:
    """The commit, and the package files changed since it; taken when the run starts."""
    changed = _git("status", "--porcelain", "--", "batchexec")
    return {
        "commit": _git("rev-parse", "--short", "HEAD"),
        "changed": [line[3:] for line in changed.splitlines()] if changed != "unknown" else [],
    }


def _ratio(figure: Figure) -> str:
    if figure.ratio is None:
        return "-"
    if figure.key == "vs_sequential":
        return f"{figure.ratio:,.0f}x faster"
    return f"{figure.ratio:.3f}" if figure.ratio < 10 else f"{figure.ratio:,.1f}"


def skipped(key: str, title: str, how: str, reason: str) -> Figure:
    """The row of a figure that could not be measured here (no PostgreSQL server): why."""
    return Figure(
        key=key,
        title=title,
        how=how,
        measured=f"skipped: {reason}",
        reference="-",
        ratio=None,
        target=Target(None, label="-"),
        data={"skipped": reason},
    )


def _met(figure: Figure) -> str:
    if "error" in figure.data:
        return "**failed**"
    if "skipped" in figure.data:
        return "skipped"
    met = figure.met
    return "-" if met is None else ("yes" if met else "**no**")


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def table(figures: Sequence[Figure]) -> str:
    lines = [
        "| " + " | ".join(HEADER) + " |",
        "|" + "---|" * len(HEADER),
    ]
    for figure in figures:
        cells = (
            figure.title,
            figure.how,
            figure.measured,
            figure.reference,
            _ratio(figure),
            figure.target.text,
            _met(figure),
        )
        lines.append("| " + " | ".join(_cell(cell) for cell in cells) + " |")
    return "\n".join(lines)


def write_json(
    path: Path,
    figures: Sequence[Figure],
    extra: dict[str, Any],
    elapsed_s: float,
    measured_revision: dict[str, Any],
) -> None:
    document = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python", "-m", "benchmarks", *sys.argv[1:]]),
        "runs": RUNS,
        "elapsed_s": elapsed_s,
        "machine": machine(),
        "revision": measured_revision,
        "figures": [
            {
                "key": f.key,
                "figure": f.title,
                "how": f.how,
                "measured": f.measured,
                "reference": f.reference,
                "ratio": f.ratio,
                "target": f.target.text,
                "met": f.met,
                "data": f.data,
            }
            for f in figures
        ],
        **extra,
    }
    path.write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n")


def plot(path: Path, figures: Sequence[Figure]) -> bool:
    """One bar per figure: its ratio over its bound (>= 1 means met); True if it was written.

    Skipped, with a line on stderr, where matplotlib (the ``bench`` extra) is
    missing: the table and ``results.json`` matter more than the picture.
    """
    try:
        import matplotlib
    except ModuleNotFoundError:
        print("benchmarks: matplotlib is not installed; no bench.png", file=sys.stderr)
        return False

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown: list[tuple[Figure, float]] = []
    for figure in figures:
        headroom = figure.target.headroom(figure.ratio)
        if headroom is not None:
            shown.append((figure, headroom))
    if not shown:
        return False
    fig, axes = plt.subplots(figsize=(9, 0.6 * len(shown) + 1.6))
    names = [f.title for f, _ in shown]
    values = [h for _, h in shown]
    colours = ["#2e7d32" if f.met else "#c62828" for f, _ in shown]
    bars = axes.barh(names, values, color=colours)
    axes.axvline(1.0, color="black", linewidth=1, linestyle="--")
    for bar, (figure, _) in zip(bars, shown, strict=True):
        axes.text(
            bar.get_width(),
            bar.get_y() + bar.get_height() / 2,
            f"  ratio {_ratio(figure)} (target {figure.target.text})",
            va="center",
            fontsize=8,
        )
    axes.invert_yaxis()
    axes.set_xlabel("headroom: ratio over target, oriented so that >= 1 is met (log scale)")
    axes.set_xscale("log")
    axes.set_xlim(min(min(values) * 0.7, 0.5), max(max(values) * 10, 3.0))
    info = machine()
    axes.set_title(
        f"batchexec benchmarks: {info['cores']} cores, Python {info['python']}, "
        f"median of {RUNS} runs",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
