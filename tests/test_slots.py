"""PrioritySlots: a semaphore that serves the lowest key first."""

from __future__ import annotations

import asyncio

import pytest

from batchexec.slots import PrioritySlots


async def test_waiters_are_served_by_key_then_arrival():
    slots = PrioritySlots(1)
    order: list[str] = []
    release = asyncio.Event()

    async def use(name: str, key: tuple[int, ...], hold: bool = False) -> None:
        async with slots.hold(key):
            order.append(name)
            if hold:
                await release.wait()

    holder = asyncio.create_task(use("holder", (0,), hold=True))
    await asyncio.sleep(0)
    waiters = [
        asyncio.create_task(use(name, key))
        for name, key in [("late-low", (5,)), ("urgent", (1,)), ("second-low", (5,))]
    ]
    await asyncio.sleep(0)
    release.set()
    await asyncio.gather(holder, *waiters)
    assert order == ["holder", "urgent", "late-low", "second-low"]


async def test_never_more_holders_than_slots():
    slots = PrioritySlots(3)
    inside = peak = 0

    async def use(n: int) -> None:
        nonlocal inside, peak
        async with slots.hold((n % 4,)):
            inside += 1
            peak = max(peak, inside)
            await asyncio.sleep(0)
            inside -= 1

    await asyncio.gather(*(use(n) for n in range(40)))
    assert peak == 3


async def test_a_cancelled_waiter_gives_up_its_place():
    slots = PrioritySlots(1)
    release = asyncio.Event()
    served: list[str] = []

    async def use(name: str, key: tuple[int, ...]) -> None:
        async with slots.hold(key):
            served.append(name)
            await release.wait()

    holder = asyncio.create_task(use("holder", (0,)))
    await asyncio.sleep(0)
    doomed = asyncio.create_task(use("doomed", (1,)))
    patient = asyncio.create_task(use("patient", (2,)))
    await asyncio.sleep(0)
    doomed.cancel()
    with pytest.raises(asyncio.CancelledError):
        await doomed
    release.set()
    await asyncio.gather(holder, patient)
    assert served == ["holder", "patient"]


async def test_a_slot_handed_to_a_cancelled_waiter_passes_on():
    slots = PrioritySlots(1)
    served: list[str] = []

    async def use(name: str, key: tuple[int, ...]) -> None:
        async with slots.hold(key):
            served.append(name)

    holding = slots.hold((0,))
    await holding.__aenter__()
    first = asyncio.create_task(use("first", (1,)))
    second = asyncio.create_task(use("second", (2,)))
    await asyncio.sleep(0)
    await holding.__aexit__(None, None, None)
    await asyncio.sleep(0)  # the slot is now granted to "first", which has not resumed
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    await second
    assert served == ["second"]
