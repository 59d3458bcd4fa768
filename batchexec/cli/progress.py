"""Progress while a batch runs, on a terminal or in a log, and the summary once it ends.

Both ``run`` and ``submit`` feed it the same counts: the ``progress`` event's
(``total``, ``succeeded``, ``failed``, ``skipped``, ``cancelled``, ``running``,
``pending``), of executions: with models side by side, each row x model is one.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TextIO

from batchexec.cli.options import positive_float
from batchexec.wording import counted

#: A live bar is redrawn this often, so a terminal never sees more than ~10 frames a second.
LIVE_PERIOD_S = 0.1
#: Seconds between progress lines when the output is not a terminal.
DEFAULT_EVERY_S = 5.0
_BAR_WIDTH = 24
_ENDED = ("succeeded", "failed", "skipped", "cancelled")


class ProgressDisplay:
    """A bar redrawn in place on a terminal; elsewhere, one line every ``every_s`` seconds."""

    def __init__(
        self,
        stream: TextIO,
        *,
        total: int,
        live: bool | None = None,
        every_s: float = DEFAULT_EVERY_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._stream = stream
        self.live = stream.isatty() if live is None else live
        self.period_s = LIVE_PERIOD_S if self.live else every_s
        self._clock = clock
        self._started = clock()
        self._counts: dict[str, int] = {"total": total, "pending": total}
        self._drawn = 0

    def update(self, counts: Mapping[str, int]) -> None:
        """Take the latest counts; they show at the next ``draw``."""
        self._counts = {name: int(value) for name, value in counts.items()}

    def draw(self) -> None:
        """Show the current counts: redraw the bar, or write one line."""
        if self.live:
            line = self.bar_line()
            # Spaces cover what a longer previous frame left behind.
            self._stream.write("\r" + line.ljust(self._drawn))
            self._drawn = len(line)
        else:
            self._stream.write(self.log_line() + "\n")
        self._stream.flush()

    def close(self) -> None:
        """Leave the final bar on its own line, ready for the summary."""
        if self.live:
            self.draw()
            self._stream.write("\n")
            self._stream.flush()

    @property
    def done(self) -> int:
        """Rows that have ended, whatever their outcome."""
        return sum(self._counts.get(name, 0) for name in _ENDED)

    def bar_line(self) -> str:
        """The live bar: ``[#####-----] 12/20  60%  failed 1  3.2/s  ETA 0:03``."""
        total = self._counts.get("total", 0)
        filled = _BAR_WIDTH * self.done // total if total else _BAR_WIDTH
        parts = [
            f"[{'#' * filled}{'-' * (_BAR_WIDTH - filled)}]",
            f"{self.done:>{len(str(total))}}/{total}",
            f"{100 * self.done // total if total else 100:3d}%",
            *(f"{name} {count}" for name, count in self._problems()),
            f"{self._rate():.1f}/s",
            f"ETA {self._eta()}",
        ]
        line = "  ".join(parts)
        width = shutil.get_terminal_size((80, 24)).columns
        return line[: max(width - 1, 20)]

    def log_line(self) -> str:
        """One line for a log: ``progress: 12/20 done, 1 failed, 3.2 rows/s, ETA 0:03``."""
        problems = ", ".join(f"{count} {name}" for name, count in self._problems())
        return (
            f"progress: {self.done}/{self._counts.get('total', 0)} done, {problems}, "
            f"{self._rate():.1f} rows/s, ETA {self._eta()}"
        )

    def _problems(self) -> list[tuple[str, int]]:
        """Rows that ended without succeeding: failed always, the others once there are any."""
        return [
            (name, self._counts.get(name, 0))
            for name in ("failed", "skipped", "cancelled")
            if name == "failed" or self._counts.get(name)
        ]

    def _rate(self) -> float:
        elapsed_s = self._clock() - self._started
        return self.done / elapsed_s if elapsed_s > 0 else 0.0

    def _eta(self) -> str:
        remaining = self._counts.get("total", 0) - self.done
        rate = self._rate()
        if remaining <= 0:
            return "0:00"
        if rate <= 0:
            return "--:--"
        return clock_text(remaining / rate)


@asynccontextmanager
async def showing(display: ProgressDisplay) -> AsyncIterator[ProgressDisplay]:
    """Draw ``display`` every ``period_s`` while the block runs, then close it."""

    async def draw_forever() -> None:
        while True:
            try:
                display.draw()
            except OSError:
                # Standard error went away (a closed pipe): the batch and its
                # outputs matter more than the progress, so stop drawing only.
                return
            await asyncio.sleep(display.period_s)

    task = asyncio.create_task(draw_forever(), name="progress")
    try:
        yield display
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        with contextlib.suppress(OSError):
            display.close()


def clock_text(seconds: float) -> str:
    """``seconds`` as ``m:ss``, or ``h:mm:ss`` from an hour up."""
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def seconds_text(seconds: float) -> str:
    """``0.42 s``, ``12.3 s``, or ``m:ss`` from a minute up."""
    if seconds >= 60:
        return clock_text(seconds)
    return f"{seconds:.2f} s" if seconds < 10 else f"{seconds:.1f} s"


@dataclass(frozen=True)
class Summary:
    """What a finished batch comes to: how each row ended, time, tokens, where the outputs are."""

    status: str
    message: str
    counts: Mapping[str, int]
    elapsed_s: float
    prompt_tokens: int = 0
    completion_tokens: int = 0
    #: ``(what, path)`` of each output written.
    outputs: Sequence[tuple[str, str]] = ()
    #: The first rows that did not succeed, one line each.
    problems: Sequence[str] = field(default_factory=list)
    #: The models each row ran on side by side; the counts are of rows x models then.
    models: Sequence[str] = ()
    #: What the rows cost, in ``currency``; None when no row has a cost (no model priced).
    cost: float | None = None
    currency: str = "USD"
    #: Executions sent that have no cost (unpriced, or no usage reported).
    uncosted: int = 0
    #: Each model's cost (None: nothing known), when the batch ran on several.
    model_costs: Sequence[tuple[str, float | None]] = ()

    @property
    def all_succeeded(self) -> bool:
        """Whether every row succeeded."""
        return self.counts.get("succeeded", 0) == self.counts.get("total", -1)

    def render(self) -> str:
        """The summary as lines of text."""
        total = self.counts.get("total", 0)
        ended = ", ".join(f"{self.counts.get(name, 0)} {name}" for name in _ENDED)
        rows = f"{total}"
        if self.models:
            rows = (
                f"{total // len(self.models)} on {counted(len(self.models), 'model')}, "
                f"{counted(total, 'execution')}"
            )
        lines = [
            f"batch {self.status} in {seconds_text(self.elapsed_s)}: {self.message}",
            f"  rows: {rows} ({ended})",
            f"  tokens: {self.prompt_tokens} prompt + {self.completion_tokens} completion",
        ]
        if self.cost is not None:
            missing = (
                f" ({counted(self.uncosted, 'execution')} without a cost: no price or no "
                "usage reported)"
                if self.uncosted
                else ""
            )
            lines.append(f"  cost: {self.cost:.6g} {self.currency}{missing}")
            if len(self.model_costs) > 1:
                lines += [
                    f"    {name}: "
                    + (f"{cost:.6g} {self.currency}" if cost is not None else "no cost known")
                    for name, cost in self.model_costs
                ]
        if self.problems:
            several = len(self.problems) > 1
            lines.append(f"  {'first rows' if several else 'the row'} that did not succeed:")
            lines += [f"    {problem}" for problem in self.problems]
        lines += [f"  {what}: {path}" for what, path in self.outputs]
        return "\n".join(lines)


def add_progress_option(parser: argparse.ArgumentParser) -> None:
    """``--progress-every S``: how often a non-terminal gets a progress line."""
    parser.add_argument(
        "--progress-every",
        metavar="S",
        type=positive_float,
        default=DEFAULT_EVERY_S,
        help="seconds between progress lines when standard error is not a terminal "
        f"(default {DEFAULT_EVERY_S:g})",
    )
