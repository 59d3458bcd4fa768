"""Retrying retryable provider errors: exponential backoff with full jitter, within a deadline."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from batchexec.errors import ProviderError

_T = TypeVar("_T")


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently to try again."""

    max_retries: int = 3
    base_delay_s: float = 0.5
    max_delay_s: float = 30.0

    def delay_s(self, retry: int, error: ProviderError, rng: random.Random) -> float:
        """Wait before retry number ``retry`` (1-based).

        The provider's ``Retry-After`` wins when it gave one; otherwise a full
        jitter draw from ``[0, base * 2**(retry-1)]`` capped at ``max_delay_s``.
        """
        if error.retry_after_s is not None:
            return max(0.0, error.retry_after_s)
        ceiling = min(self.max_delay_s, self.base_delay_s * 2 ** (retry - 1))
        return rng.uniform(0, ceiling)


@dataclass
class Attempts:
    """How many calls an execution has made; read even when the execution times out."""

    count: int = 0


async def call_with_retries(
    call: Callable[[], Awaitable[_T]],
    policy: RetryPolicy,
    *,
    attempts: Attempts,
    deadline: float,
    rng: random.Random,
) -> _T:
    """Await ``call()``, retrying retryable errors while the policy and deadline allow.

    ``deadline`` is on the event loop's clock. A wait that would end after it
    is not started: the last error is raised at once instead, since the
    execution would time out anyway and its real cause is more useful.
    """
    loop = asyncio.get_running_loop()
    while True:
        attempts.count += 1
        try:
            return await call()
        except ProviderError as exc:
            if not exc.retryable or attempts.count > policy.max_retries:
                raise
            delay_s = policy.delay_s(attempts.count, exc, rng)
            if loop.time() + delay_s >= deadline:
                raise
            await asyncio.sleep(delay_s)
