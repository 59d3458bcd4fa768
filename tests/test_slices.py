"""The loop's slice for bulk work (``batchexec/slices.py``): shared by every task doing
it, and no task left waiting once the others stop.

The clock is the test's own: work advances it, so what a turn holds is
counted exactly, whatever the machine's speed.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter

import pytest

from batchexec import slices

#: What one unit of work costs on the test's clock.
UNIT_S = slices.SLICE_S / 4


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(time, "perf_counter", clock)
    # A turn of a fresh clock: one timed by an earlier test's clock may lie in its future.
    monkeypatch.setattr(slices, "_last", None)
    return clock


@pytest.fixture
def renewals(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many times a slice has been renewed, as a one-item list."""
    count = [0]
    renew = slices._Turn.renew

    def counted(turn: slices._Turn) -> None:
        count[0] += 1
        renew(turn)

    monkeypatch.setattr(slices._Turn, "renew", counted)
    return count


async def test_tasks_share_one_slice_a_turn(clock, renewals):
    done: Counter[int] = Counter()  # units of work done in each slice, all tasks together

    async def worker() -> None:
        for _ in range(40):
            await slices.pause()
            clock.now += UNIT_S
            done[renewals[0]] += 1

    await asyncio.gather(*(worker() for _ in range(5)))

    assert sum(done.values()) == 200
    # A slice holds what fits in SLICE_S, and at most one unit more (the one that
    # spent it), however many tasks share it.
    most = math.ceil(slices.SLICE_S / UNIT_S) + 1
    assert max(done.values()) <= most
    assert renewals[0] >= 200 // most


async def test_a_task_waiting_its_turn_runs_again_when_the_others_wait_for_io(clock):
    io = asyncio.Event()
    waiting_for_io = 0

    async def worker() -> None:
        nonlocal waiting_for_io
        clock.now += slices.SLICE_S  # each spends a whole slice
        await slices.pause()
        waiting_for_io += 1
        await io.wait()

    workers = [asyncio.create_task(worker()) for _ in range(6)]
    for _ in range(100):
        await asyncio.sleep(0)
    # Every one got past its pause, though none paused again to wake the next.
    assert waiting_for_io == 6
    io.set()
    await asyncio.gather(*workers)


async def test_a_task_cancelled_while_waiting_leaves_none_behind(clock):
    passed = 0

    async def worker() -> None:
        nonlocal passed
        clock.now += slices.SLICE_S
        await slices.pause()
        passed += 1

    first, second, third = (asyncio.create_task(worker()) for _ in range(3))
    await asyncio.sleep(0)  # each has spent a slice and waits its turn
    second.cancel()
    await asyncio.gather(first, third)
    assert passed == 2
    assert second.cancelled()


async def test_in_slices_gives_every_item_once_in_order(clock):
    items = list(range(1000))
    seen = []
    async for some in slices.in_slices(items, size=7):
        assert 0 < len(some) <= 7
        seen += some
        clock.now += UNIT_S
    assert seen == items


async def test_in_slices_pauses_between_lists_not_after_the_last(clock, renewals):
    """The slice spent at every list: the caller waits a turn between two, never after
    the last, so what it does next (wake a group's waiters) is not put off a turn."""
    lists = 0
    await slices.pause()  # the turn's slice starts now, unspent
    async for _ in slices.in_slices(range(5)):
        lists += 1
        clock.now += 2 * slices.SLICE_S
    assert lists == 5
    assert renewals[0] == 4
    async for _ in slices.in_slices(range(1)):
        clock.now += 2 * slices.SLICE_S
    assert renewals[0] == 4


async def test_in_slices_sizes_its_lists_by_what_they_took(clock):
    """Items of microseconds come 64 at a time once the lists have grown; items of a
    slice each come one at a time, and a list that took long halves the next."""
    sizes = []
    async for some in slices.in_slices(range(300)):
        sizes.append(len(some))
        clock.now += len(some) * slices.SLICE_S / 1000
    assert sizes[:8] == [1, 2, 4, 8, 16, 32, 64, 64]
    assert max(sizes) == 64 and sum(sizes) == 300

    sizes = []
    async for some in slices.in_slices(range(20)):
        sizes.append(len(some))
        clock.now += len(some) * slices.SLICE_S
    assert sizes == [1] * 20

    sizes = []
    async for some in slices.in_slices(range(1000)):
        sizes.append(len(some))
        # Cheap items, but the 8th list holds one that costs a whole slice.
        clock.now += slices.SLICE_S if len(sizes) == 8 else len(some) * slices.SLICE_S / 1000
    assert sizes[6:10] == [64, 64, 32, 64]


async def test_a_wait_excused_inside_a_list_does_not_shrink_the_next(clock):
    """A caller that waits on its pipe between two lists (the workbook's writer) is
    not working meanwhile: its lists grow as if it had not waited."""

    async def drained() -> None:
        clock.now += 10 * slices.SLICE_S  # the pipe was full for ten slices

    sizes = []
    async for some in slices.in_slices(range(200)):
        sizes.append(len(some))
        await slices.excused(drained())
    assert sizes[:7] == [1, 2, 4, 8, 16, 32, 64]

    sizes = []
    async for some in slices.in_slices(range(10)):
        sizes.append(len(some))
        await drained()  # not excused: counted as the list's work
    assert sizes == [1] * 10
