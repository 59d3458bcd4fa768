"""A semaphore whose waiters are served by priority rather than by arrival."""

from __future__ import annotations

import asyncio
import heapq
import itertools


class PrioritySlots:
    """``value`` slots; when they are all taken, the waiter with the lowest key goes next.

    Keys are compared as tuples; equal keys are served in arrival order. A
    freed slot is handed over on the next turn of the event loop, so that
    tasks woken by the holder's last step (say, rows waiting for its result)
    can queue first and compete for it by key.
    """

    def __init__(self, value: int) -> None:
        self._free = value
        self._waiters: list[tuple[tuple[int, ...], int, asyncio.Future[None]]] = []
        self._arrivals = itertools.count()

    def hold(self, key: tuple[int, ...]) -> _Hold:
        """``async with slots.hold(key):`` waits for a slot, then holds it for the block."""
        return _Hold(self, key)

    async def _acquire(self, key: tuple[int, ...]) -> None:
        if self._free > 0:
            self._free -= 1
            return
        granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (key, next(self._arrivals), granted))
        try:
            await granted
        except asyncio.CancelledError:
            if granted.done() and not granted.cancelled():
                # The slot was handed over just as the waiter was cancelled: pass it on.
                self._release()
            raise

    def _release(self) -> None:
        asyncio.get_running_loop().call_soon(self._hand_over)

    def _hand_over(self) -> None:
        while self._waiters:
            _, _, granted = heapq.heappop(self._waiters)
            if not granted.done():
                granted.set_result(None)
                return
        self._free += 1


class _Hold:
    """One use of a slot; a plain class, since this sits on every execution's path."""

    __slots__ = ("_key", "_slots")

    def __init__(self, slots: PrioritySlots, key: tuple[int, ...]) -> None:
        self._slots = slots
        self._key = key

    async def __aenter__(self) -> None:
        await self._slots._acquire(self._key)

    async def __aexit__(self, *exc_info: object) -> None:
        self._slots._release()
