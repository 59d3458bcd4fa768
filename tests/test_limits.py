"""Per-model limits: calls in flight across batches, and requests per minute."""

from __future__ import annotations

import asyncio
import itertools

from batchexec.catalog import ModelSpec
from batchexec.limits import ModelLimits
from tests.helpers import finished, gated, submit


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


async def test_rpm_spaces_requests_evenly():
    limits = ModelLimits()
    model = ModelSpec(name="paced", provider="echo", rpm=1200)  # one every 50 ms
    loop = asyncio.get_running_loop()
    started = loop.time()
    entered: list[float] = []
    for _ in range(4):
        async with limits.call(model):
            entered.append(loop.time() - started)
    # Sleeps never end early, so these lower bounds hold on any machine.
    gaps = [later - earlier for earlier, later in itertools.pairwise(entered)]
    assert all(gap >= 0.049 for gap in gaps)


async def test_models_without_limits_pass_straight_through():
    limits = ModelLimits()
    model = ModelSpec(name="free", provider="echo")
    entered = 0
    async with limits.call(model), limits.call(model), limits.call(model):
        entered = 3
    assert entered == 3
