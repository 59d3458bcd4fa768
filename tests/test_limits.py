"""Per-model limits: calls in flight across batches, and requests per minute."""

from __future__ import annotations

import asyncio

from batchexec.catalog import ModelSpec
from batchexec.limits import ModelLimits
from tests.conftest import finished, gated, submit


async def test_max_concurrency_holds_across_batches(make_client):
    client = await make_client(max_threads=4)
    first = await submit(client, [{"prompt": f"x-{n}", "model": "gated-b"} for n in range(3)])
    second = await submit(client, [{"prompt": f"y-{n}", "model": "gated-b"} for n in range(3)])
    provider = gated(client)
    await provider.wait_started(2)
    for _ in range(100):
        await asyncio.sleep(0)
    assert len(provider.started) == 2
    provider.open()
    await finished(client, first)
    await finished(client, second)
    assert provider.max_in_flight == 2
    assert len(provider.finished) == 6


async def test_rpm_spaces_requests_evenly(monkeypatch):
    waits: list[float] = []

    async def fake_sleep(delay: float) -> None:
        waits.append(round(delay, 6))

    monkeypatch.setattr("batchexec.limits.asyncio.sleep", fake_sleep)
    limits = ModelLimits()
    model = ModelSpec(name="paced", provider="echo", rpm=120)
    for _ in range(4):
        async with limits.call(model):
            pass
    # 120 per minute is one every 0.5 s; the loop clock stands still here.
    assert len(waits) == 3
    assert waits[0] > 0.49 and waits[1] > 0.99 and waits[2] > 1.49


async def test_models_without_limits_pass_straight_through():
    limits = ModelLimits()
    model = ModelSpec(name="free", provider="echo")
    entered = 0
    async with limits.call(model), limits.call(model), limits.call(model):
        entered = 3
    assert entered == 3
