"""The progress display of the command line."""

from __future__ import annotations

import io

from batchexec.cli.progress import ProgressDisplay, showing


class _ClosedStream(io.StringIO):
    def write(self, text: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")

    def isatty(self) -> bool:
        return True


async def test_a_closed_stderr_stops_the_progress_not_the_batch():
    display = ProgressDisplay(_ClosedStream(), total=3, live=True)
    async with showing(display):
        display.update({"total": 3, "succeeded": 3})
    # Reaching here is the point: the block ran to its end and nothing raised.
    assert display.live
