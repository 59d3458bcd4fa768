"""Scenario 8: the server's peak resident memory over every HTTP scenario run against it."""

from __future__ import annotations

from collections.abc import Sequence

from benchmarks.common import Figure, Target

TARGET_MB = 300.0


def memory(peak_mb: float, scenarios: Sequence[str]) -> Figure:
    return Figure(
        key="memory",
        title="memory",
        how="the server process's peak RSS (`VmHWM` in /proc/<pid>/status) after "
        f"{', '.join(scenarios)}, all runs on the one server (batches are kept, as in production)",
        measured=f"{peak_mb:,.0f} MB",
        reference=f"the target itself, {TARGET_MB:,.0f} MB",
        ratio=peak_mb / TARGET_MB,
        target=Target("<", 1.0),
        data={"peak_mb": peak_mb, "scenarios": list(scenarios)},
    )
