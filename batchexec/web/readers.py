"""Workbooks read in worker processes, so that parsing one never holds up the event loop.

openpyxl parses in Python: on a thread it competes with the event loop for
the interpreter lock, and a few large uploads at once stall every other
request. Two worker processes read workbooks instead; the server's own
threads and loop stay free, and the workers run at a lower priority, so
that on a small machine the server is scheduled first. Each read is bounded
by ``PARSE_TIMEOUT_S`` inside the worker, so the queue drains.
"""

from __future__ import annotations

import asyncio
import functools
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from batchexec.config import Settings
from batchexec.errors import InputError
from batchexec.inputs import Rows, parse_xlsx

#: Worker processes; each reads one workbook at a time.
READER_PROCESSES = 2
#: How much lower than the server's the workers' scheduling priority is.
_READER_NICENESS = 10
#: An uploaded workbook may unpack to this many times the body limit. Ordinary
#: sheets pack about 10:1; the bound keeps a crafted one (millions of tiny
#: shared strings, all held in memory by the reader) from taking the server down.
UNZIP_FACTOR = 10


class WorkbookReader:
    """Reads uploaded workbooks in ``READER_PROCESSES`` worker processes."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._pool: ProcessPoolExecutor | None = None

    async def read(self, data: bytes) -> Rows:
        """The rows of workbook ``data``; ``InputError`` naming the problem.

        A worker that dies (killed for its memory, say) fails that upload
        with a 422 and is replaced for the next.
        """
        settings = self._settings
        parse = functools.partial(
            parse_xlsx,
            data,
            max_rows=settings.max_executions_per_batch,
            max_unzipped_bytes=UNZIP_FACTOR * settings.max_body_bytes,
            max_columns=settings.max_columns,
            max_cells=settings.max_input_cells,
            timeout_s=settings.parse_timeout_s,
        )
        loop = asyncio.get_running_loop()
        if self._pool is None:
            # Off the loop: starting the workers imports the reader in each (~0.2 s).
            self._pool = await asyncio.to_thread(_started_workers)
        try:
            return await loop.run_in_executor(self._pool, parse)
        except BrokenProcessPool:
            self.close()
            raise InputError(
                "The XLSX file cannot be read: its reader stopped before the end."
            ) from None

    def close(self) -> None:
        """Stop the workers; the next read starts new ones."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


def _started_workers() -> ProcessPoolExecutor:
    """A pool of ``READER_PROCESSES`` workers, each already started and ready."""
    # forkserver: the server has threads, which fork must not copy; preloading the
    # reader makes each worker quick to start.
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["batchexec.inputs"])
    pool = ProcessPoolExecutor(READER_PROCESSES, mp_context=context, initializer=_lower_priority)
    # Workers start on demand, in whatever thread submits: start them here.
    for started in [pool.submit(os.getpid) for _ in range(READER_PROCESSES)]:
        started.result()
    return pool


def _lower_priority() -> None:
    """Run a worker below the server: on a small machine, the server answers first."""
    os.nice(_READER_NICENESS)
