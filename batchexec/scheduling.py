"""The order a batch's rows run in: dependency order, the longest remaining chain first.

A row is ready once every row it names has ended. Ready rows wait in a
priority queue: the head of the longest remaining chain first (then row
order), so a long ``${output.n}`` chain never waits behind rows that could run
at any time. The workers that take them, and what running a row means, are
the engine's.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Mapping

#: Queued once per worker when every row has ended; row numbers start at 1.
_NO_MORE_ROWS = 0


class ReadyRows:
    """The rows of one batch run that may start next, for ``workers`` workers to take.

    It may be made in another thread than the loop's: an asyncio queue binds
    to its loop only when first waited on.
    """

    def __init__(
        self,
        depends_on: Mapping[int, Collection[int]],
        chain_lengths: Mapping[int, int],
        *,
        workers: int,
    ) -> None:
        """``depends_on`` maps each row to run to the rows it names; named rows
        that are not among its keys have ended already."""
        self._chain_lengths = chain_lengths
        self._workers = workers
        self._left = len(depends_on)
        self._unmet: dict[int, int] = {}
        self._dependents: dict[int, list[int]] = {}
        self._ready: asyncio.PriorityQueue[tuple[int, int]] = asyncio.PriorityQueue()
        for index in sorted(depends_on):
            waits_for = [name for name in depends_on[index] if name in depends_on]
            self._unmet[index] = len(waits_for)
            for name in waits_for:
                self._dependents.setdefault(name, []).append(index)
            if not waits_for:
                self._put(index)

    async def take(self) -> int | None:
        """Wait for the next ready row; ``None`` once every row has ended."""
        _, index = await self._ready.get()
        return None if index == _NO_MORE_ROWS else index

    def ended(self, index: int) -> None:
        """Row ``index`` has ended: queue the rows it made ready before anything else is taken."""
        for dependent in self._dependents.get(index, ()):
            self._unmet[dependent] -= 1
            if self._unmet[dependent] == 0:
                self._put(dependent)
        self._left -= 1
        if self._left == 0:
            for _ in range(self._workers):
                self._ready.put_nowait((0, _NO_MORE_ROWS))

    def _put(self, index: int) -> None:
        self._ready.put_nowait((-self._chain_lengths[index], index))
