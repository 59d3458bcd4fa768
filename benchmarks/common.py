"""What every scenario shares: knobs from the environment, progress lines, statistics, figures."""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

#: The repository root; the harness runs children with it on ``PYTHONPATH``.
ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "bench-results"

_STARTED = time.perf_counter()


def env_int(name: str, default: int, *, minimum: int = 1) -> int:
    """An integer knob from the environment; a bad value stops the run naming the variable."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SystemExit(f"benchmarks: {name} must be an integer (got {raw!r})") from None
    if value < minimum:
        raise SystemExit(f"benchmarks: {name} must be at least {minimum} (got {value})")
    return value


#: Timed runs per figure; each figure is the median of these.
RUNS = env_int("BENCH_RUNS", 3)
#: Run the sequential baseline over all 2,000 rows instead of extrapolating from 200.
FULL = os.environ.get("BENCH_FULL", "").strip() not in ("", "0")


def progress(scenario: str, message: str) -> None:
    """One progress line on stderr, with the time since the harness started."""
    elapsed = time.perf_counter() - _STARTED
    print(f"[{elapsed:6.1f}s] {scenario}: {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Samples:
    """Repeated measurements of one quantity; reported as median and spread."""

    values: tuple[float, ...]
    unit: str

    @classmethod
    def of(cls, values: Sequence[float], unit: str) -> Samples:
        if not values:
            raise ValueError("no samples")
        return cls(tuple(values), unit)

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def low(self) -> float:
        return min(self.values)

    @property
    def high(self) -> float:
        return max(self.values)

    def text(self, digits: int = 2, *, thousands: bool = False) -> str:
        """``2.07 s (2.05-2.11, n=3)``: the median, then the range of the runs."""

        def number(value: float) -> str:
            return f"{value:,.0f}" if thousands else f"{value:.{digits}f}"

        if len(self.values) == 1:
            return f"{number(self.median)} {self.unit} (n=1)"
        spread = f"{number(self.low)}-{number(self.high)}"
        return f"{number(self.median)} {self.unit} ({spread}, n={len(self.values)})"

    def as_json(self) -> dict[str, Any]:
        return {
            "unit": self.unit,
            "median": self.median,
            "min": self.low,
            "max": self.high,
            "runs": list(self.values),
        }


@dataclass(frozen=True)
class Target:
    """A bound on a figure's ratio: ``<= 1.05`` or ``>= 1.5``; None where only reported."""

    op: Literal["<=", ">=", "<"] | None
    value: float = 0.0
    label: str = ""

    @property
    def text(self) -> str:
        if self.op is None:
            return self.label or "report"
        return self.label or f"{self.op} {self.value:g}"

    def met(self, ratio: float | None) -> bool | None:
        if self.op is None or ratio is None:
            return None
        if self.op == "<=":
            return ratio <= self.value
        if self.op == "<":
            return ratio < self.value
        return ratio >= self.value

    def headroom(self, ratio: float | None) -> float | None:
        """How far the ratio is from the bound, oriented so that >= 1 means met."""
        if self.op is None or ratio is None or ratio <= 0:
            return None
        return ratio / self.value if self.op == ">=" else self.value / ratio


@dataclass
class Figure:
    """One row of the table, with its raw numbers for ``results.json``."""

    key: str
    title: str
    how: str
    measured: str
    reference: str
    ratio: float | None
    target: Target
    #: Extra condition besides the ratio (the XLSX memory check); None when there is none.
    also_met: bool | None = None
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def met(self) -> bool | None:
        met = self.target.met(self.ratio)
        if met is None or self.also_met is None:
            return met
        return met and self.also_met


def mb(kilobytes: float) -> float:
    """Kilobytes (as ``/proc`` reports them) in megabytes."""
    return kilobytes / 1024
