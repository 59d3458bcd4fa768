"""Work proportional to a batch's size, done on the event loop a short slice at a time.

Building a large answer or a workbook's rows is Python that holds the
interpreter lock however it is run: in a worker thread it competes with the
event loop for the lock, and the loop, which gives it up at every ``select``,
waits behind it again and again (``make bench``'s responsive-health saw
/health answers 70-100 ms late while two such threads ran). Done on the loop
itself, a slice of ``SLICE_S`` in each turn of the loop shared by all such
work, the same work delays any other request by about one slice a turn.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Iterable
from contextvars import ContextVar
from typing import TypeVar

T = TypeVar("T")

#: Seconds of such work the loop does in one of its turns, all tasks together.
SLICE_S = 0.001
#: Items taken at a time at most; the clock is read once a list.
_SIZE = 64


class _Turn:
    """The slice of one event loop's current turn: when it started, whether the next
    turn's is due, and the tasks waiting for a slice, first come first (while any
    wait, the next turn's is due)."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.renewing = False
        self.waiting: deque[asyncio.Future[None]] = deque()

    def spent(self) -> bool:
        return time.perf_counter() - self.started >= SLICE_S

    def renew_soon(self, loop: asyncio.AbstractEventLoop) -> None:
        """Renew the slice at the start of the next turn, after the I/O the loop has
        just seen, unless that is already due."""
        if not self.renewing:
            self.renewing = True
            loop.call_soon(self.renew)

    def renew(self) -> None:
        self.renewing = False
        self.started = time.perf_counter()
        # Every one: woken one a turn, a hundred workers whose calls all ended
        # at once would take a hundred turns to all be running again. Those
        # that find the slice spent by the first wait again.
        waiting, self.waiting = self.waiting, deque()
        for waiter in waiting:
            if not waiter.done():  # a cancelled task's is
                waiter.set_result(None)


#: The last loop asked about, and its turn: one loop runs the server (tests run many).
_last: tuple[asyncio.AbstractEventLoop, _Turn] | None = None


def _turn() -> tuple[asyncio.AbstractEventLoop, _Turn]:
    global _last
    loop = asyncio.get_running_loop()
    if _last is None or _last[0] is not loop:
        _last = (loop, _Turn())
    return _last


async def pause() -> None:
    """Let the loop's other work run if this turn's slice has been spent, by any task.

    The slice is shared: several tasks doing such work (a batch's workers, an
    answer being rendered, a workbook's rows) take ``SLICE_S`` of a turn
    between them, not ``SLICE_S`` each, so a request waits about one slice
    for each turn of the loop it needs. A task that finds the slice spent
    waits for the next turn's, with every other task that found it spent, in
    the order they came; those that find it spent again by the ones before
    them wait again.
    """
    loop, turn = _turn()
    while turn.spent():  # again if another task spent the slice it was woken to
        waiter = loop.create_future()
        turn.waiting.append(waiter)
        turn.renew_soon(loop)
        await waiter


def resumed() -> None:
    """Say that the caller has just waited, the loop running other work meanwhile: a
    slice that was spent and is not being renewed starts afresh."""
    _, turn = _turn()
    if not turn.renewing and turn.spent():
        turn.started = time.perf_counter()


async def in_slices(items: Iterable[T], size: int = _SIZE) -> AsyncIterator[list[T]]:
    """``items`` as lists of up to ``size``, with a ``pause`` between two.

    What is counted is the whole stretch: taking the items (a generator's
    work) and what the caller does with each list before asking for the next.
    The lists start at one item and grow or shrink with what a list took: a
    list of items that are each a few microseconds of work grows to
    ``size``, and one whose items are long (rows of 30,000-character cells,
    a millisecond each) stays at one or two, so that no stretch holds the
    loop for much more than a slice whatever the items are.
    None after the last: what the caller does next (wake those waiting for a
    group commit, write an answer) is not put off by a turn; its own next
    pause counts it. A wait of the caller's through ``excused`` (a pipe's
    drain) is not counted as work.
    """
    iterator = iter(items)
    take = 1
    first = True
    waited = [0.0]
    outer = _waits.get()
    _waits.set(waited)
    try:
        while True:
            started = time.perf_counter()
            chunk = list(itertools.islice(iterator, take))
            if not chunk:
                return
            taking = time.perf_counter() - started
            if not first:
                await pause()
            first = False
            waited[0] = 0.0
            resumed = time.perf_counter()
            yield chunk
            took = taking + time.perf_counter() - resumed - waited[0]
            if took > SLICE_S / 2:
                take = max(1, take // 2)
            elif took < SLICE_S / 8:
                take = min(size, take * 2)
    finally:
        # Set, not reset: a generator closed by the collector runs this elsewhere.
        _waits.set(outer)


async def excused(waiting: Awaitable[T]) -> T:
    """``await waiting``, its time not counted as the work of the ``in_slices`` list the
    caller is on: the loop runs other work meanwhile."""
    started = time.perf_counter()
    try:
        return await waiting
    finally:
        waited = _waits.get()
        if waited is not None:
            waited[0] += time.perf_counter() - started


#: The waits of the ``in_slices`` list the current task is on, if any.
_waits: ContextVar[list[float] | None] = ContextVar("waits", default=None)
