"""Per-model limits shared by all batches: calls in flight and requests per minute."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager, nullcontext
from typing import Protocol

from batchexec.catalog import ModelSpec, fold

#: Most models have no limits; their calls skip the bookkeeping entirely.
_UNLIMITED: AbstractAsyncContextManager[object] = nullcontext()


class CallLimits(Protocol):
    """Per-model limits held around each call: this process's (``ModelLimits``), or a
    cluster's (``shared_limits.SharedModelLimits``)."""

    def call(self, model: ModelSpec) -> AbstractAsyncContextManager[object]:
        """Held around each request to ``model``; waits for a slot, then for the pacer."""
        ...


class _Pacer:
    """Spaces requests evenly, ``60 / rpm`` seconds apart, instead of letting bursts through.

    Waiters queue on a lock and each sleeps only once it is first, so one that
    is cancelled while queued (its batch cancelled, its row timed out) holds
    back nobody after it.
    """

    def __init__(self, rpm: float) -> None:
        self._interval_s = 60.0 / rpm
        self._last_s = -math.inf
        self._turn = asyncio.Lock()

    async def wait(self) -> None:
        loop = asyncio.get_running_loop()
        async with self._turn:
            delay_s = self._last_s + self._interval_s - loop.time()
            if delay_s > 0:
                await asyncio.sleep(delay_s)
            self._last_s = loop.time()


class ModelLimits:
    """Holds one semaphore and one pacer per model that asks for them in the catalog."""

    def __init__(self) -> None:
        self._slots: dict[str, asyncio.Semaphore] = {}
        self._pacers: dict[str, _Pacer] = {}

    def call(self, model: ModelSpec) -> AbstractAsyncContextManager[object]:
        """Held around each request to ``model``; waits for a slot, then for the pacer."""
        if model.max_concurrency is None and model.rpm is None:
            return _UNLIMITED
        return self._limited(model)

    @asynccontextmanager
    async def _limited(self, model: ModelSpec) -> AsyncIterator[None]:
        key = fold(model.name)
        if model.max_concurrency is None:
            if model.rpm is not None:
                await self._pacer(key, model.rpm).wait()
            yield
            return
        slot = self._slots.get(key)
        if slot is None:
            slot = self._slots[key] = asyncio.Semaphore(model.max_concurrency)
        async with slot:
            if model.rpm is not None:
                await self._pacer(key, model.rpm).wait()
            yield

    def _pacer(self, key: str, rpm: float) -> _Pacer:
        pacer = self._pacers.get(key)
        if pacer is None:
            pacer = self._pacers[key] = _Pacer(rpm)
        return pacer
