"""Backoff with full jitter, Retry-After, and the deadline that bounds every retry."""

from __future__ import annotations

import asyncio
import random

import pytest

from batchexec.errors import FatalProviderError, RetryableProviderError
from batchexec.retry import Attempts, RetryPolicy, call_with_retries


class Script:
    """A call that raises the given errors in turn, then answers."""

    def __init__(self, *errors: Exception) -> None:
        self.errors = list(errors)
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "ok"


def far_deadline() -> float:
    return asyncio.get_running_loop().time() + 3600


async def test_retryable_errors_are_retried_until_success():
    script = Script(
        RetryableProviderError("busy", status=429, retry_after_s=0),
        RetryableProviderError("down", status=503, retry_after_s=0),
    )
    attempts = Attempts()
    result = await call_with_retries(
        script,
        RetryPolicy(max_retries=3),
        attempts=attempts,
        deadline=far_deadline(),
        rng=random.Random(1),
    )
    assert result == "ok"
    assert attempts.count == 3


async def test_fatal_errors_are_not_retried():
    script = Script(FatalProviderError("bad key", status=401))
    attempts = Attempts()
    with pytest.raises(FatalProviderError):
        await call_with_retries(
            script, RetryPolicy(), attempts=attempts, deadline=far_deadline(), rng=random.Random(1)
        )
    assert attempts.count == 1


async def test_gives_up_after_max_retries_with_the_last_error():
    errors = [RetryableProviderError(f"busy {n}", retry_after_s=0) for n in range(5)]
    attempts = Attempts()
    with pytest.raises(RetryableProviderError, match="busy 2"):
        await call_with_retries(
            Script(*errors),
            RetryPolicy(max_retries=2),
            attempts=attempts,
            deadline=far_deadline(),
            rng=random.Random(1),
        )
    assert attempts.count == 3


async def test_a_wait_past_the_deadline_is_not_started():
    script = Script(RetryableProviderError("slow down", status=429, retry_after_s=60))
    attempts = Attempts()
    deadline = asyncio.get_running_loop().time() + 5
    with pytest.raises(RetryableProviderError, match="slow down"):
        await call_with_retries(
            script, RetryPolicy(), attempts=attempts, deadline=deadline, rng=random.Random(1)
        )
    assert attempts.count == 1


def test_retry_after_wins_over_backoff():
    error = RetryableProviderError("busy", retry_after_s=7.5)
    assert RetryPolicy().delay_s(1, error, random.Random(0)) == 7.5


def test_full_jitter_stays_within_the_exponential_ceiling():
    policy = RetryPolicy(base_delay_s=0.5, max_delay_s=4)
    error = RetryableProviderError("busy")
    rng = random.Random(42)
    for retry, ceiling in [(1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (9, 4.0)]:
        delays = [policy.delay_s(retry, error, rng) for _ in range(200)]
        assert all(0 <= delay <= ceiling for delay in delays)
        assert max(delays) > ceiling * 0.8  # jitter really spreads over the range
