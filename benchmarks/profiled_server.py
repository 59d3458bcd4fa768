"""``python -m benchmarks.profiled_server PROF serve ...``: the real server, profiled on demand.

Like ``python -m cProfile -o PROF -m batchexec serve ...``, with two
differences that make the profile about the work alone: profiling starts on
SIGUSR1 and stops on SIGUSR2 (so start-up and idle waiting stay out), and
threads started while it runs are profiled too (so the CSV and XLSX writing
that the engine sends through ``asyncio.to_thread`` shows up). Stop the
server with SIGINT: ``run_app`` then returns and the merged profile is
written to PROF.
"""

from __future__ import annotations

import cProfile
import pstats
import signal
import sys
import threading
from types import FrameType
from typing import Any


class _Profiles:
    """The main thread's profiler and one per thread started while profiling."""

    def __init__(self) -> None:
        self.main = cProfile.Profile()
        self.threads: list[cProfile.Profile] = []
        self._lock = threading.Lock()

    def start(self, signum: int, frame: FrameType | None) -> None:
        threading.setprofile(self._profile_new_thread)
        self.main.enable()

    def stop(self, signum: int, frame: FrameType | None) -> None:
        self.main.disable()
        threading.setprofile(None)

    def _profile_new_thread(self, frame: FrameType, event: str, arg: Any) -> None:
        # Called at the first event of each new thread: hand that thread over to cProfile.
        profiler = cProfile.Profile()
        with self._lock:
            self.threads.append(profiler)
        profiler.enable()

    def dump(self, path: str) -> None:
        self.stop(0, None)
        stats = pstats.Stats(self.main)
        with self._lock:
            for profiler in self.threads:
                stats.add(profiler)
        stats.dump_stats(path)


def main(argv: list[str]) -> int:
    out, command = argv[0], argv[1:]
    from batchexec.cli import main as batchexec_main

    profiles = _Profiles()
    signal.signal(signal.SIGUSR1, profiles.start)
    signal.signal(signal.SIGUSR2, profiles.stop)
    try:
        return batchexec_main(command)
    finally:
        profiles.dump(out)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
