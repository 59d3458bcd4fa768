"""Tokens per minute across every replica sharing one PostgreSQL database.

``SharedTokenLimits`` does what ``token_limits.TokenLimits`` does for one
process, for all the replicas together. ``model_tokens`` holds a row a
reservation: its tokens, and when it stops counting (``expires_at``, a
window after its call ended; while in flight, never, unless its holder died:
``held_until``, ``hold_s`` after it was made). A reservation is one
transaction under the model's advisory lock (a transaction lock, so a dead
connection lets go of it): forget what stopped counting, sum what is left,
and add the reservation if the sum leaves room for it (or nothing is held:
one call bigger than ``tpm`` goes alone). Otherwise the caller sleeps until
the oldest reservation leaves the window, or for a poll of at most
``POLL_S``, and asks again; one waiter a process and model asks at a time.
When the call ends its row takes the tokens the provider reported and counts
a window from then. Times are the database's clock, as in ``shared_limits``.
A lost connection while reserving is retried for as long as the call may
wait; one while releasing is logged (the row stops counting at
``held_until``).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import asyncpg

from batchexec.catalog import ModelSpec, fold
from batchexec.token_limits import Reservation, unreserved

log = logging.getLogger(__name__)

#: The longest a waiter sleeps before it asks again (a call elsewhere may have ended).
POLL_S = 0.2
_CLAIM = (
    "WITH now AS (SELECT extract(epoch FROM clock_timestamp())::double precision AS t), "
    "gone AS (DELETE FROM model_tokens WHERE model = $1 "
    "AND coalesce(expires_at, held_until) <= (SELECT t FROM now)) "
    "SELECT (SELECT t FROM now), coalesce(sum(tokens), 0), count(*), "
    "min(coalesce(expires_at, held_until)) FROM model_tokens "
    "WHERE model = $1 AND coalesce(expires_at, held_until) > (SELECT t FROM now)"
)
_INSERT = (
    "INSERT INTO model_tokens (model, tokens, held_until) "
    "VALUES ($1, $2, extract(epoch FROM clock_timestamp())::double precision + $3) "
    "RETURNING id"
)
_RELEASE = (
    "UPDATE model_tokens SET tokens = $2, "
    "expires_at = extract(epoch FROM clock_timestamp())::double precision + $3 WHERE id = $1"
)


class SharedTokenLimits:
    """``TokenLimits`` for replicas: each model's ``tpm`` held across the database."""

    def __init__(
        self, pool: asyncpg.Pool[Any], *, window_s: float, hold_s: float, namespace: str
    ) -> None:
        """``namespace`` keeps the advisory locks of one schema's deployment apart from
        another's in the same database."""
        self._pool = pool
        self._window_s = window_s
        self._hold_s = hold_s
        self._namespace = namespace
        self._turns: dict[str, asyncio.Lock] = {}
        self._rng = random.Random()  # the polls' jitter (not security)

    def reserve(self, model: ModelSpec, tokens: int) -> AbstractAsyncContextManager[Reservation]:
        """Hold ``tokens`` of ``model``'s minute, for every replica, around a call."""
        if model.tpm is None:
            return unreserved(tokens)
        return self._reserved(model, model.tpm, tokens)

    @asynccontextmanager
    async def _reserved(
        self, model: ModelSpec, tpm: int, tokens: int
    ) -> AsyncIterator[Reservation]:
        reservation = Reservation(tokens)
        key = fold(model.name)
        turn = self._turns.setdefault(key, asyncio.Lock())
        async with turn:
            row_id = await asyncio.shield(self._claim(key, tpm, tokens))
        try:
            yield reservation
        finally:
            await asyncio.shield(self._release(row_id, reservation.tokens))

    async def _claim(self, key: str, tpm: int, tokens: int) -> int:
        while True:
            try:
                async with self._pool.acquire() as conn, conn.transaction():
                    await conn.execute(
                        "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))",
                        f"{self._namespace}:tpm:{key}",
                    )
                    row = await conn.fetchrow(_CLAIM, key)
                    assert row is not None  # an aggregate always has its row
                    now_s, held, count, next_s = row
                    if held + tokens <= tpm or count == 0:
                        row_id: int = await conn.fetchval(_INSERT, key, tokens, self._hold_s)
                        return row_id
                wait_s = POLL_S if next_s is None else min(max(next_s - now_s, 0.0), POLL_S)
            except (OSError, asyncpg.PostgresConnectionError) as exc:
                log.warning("tpm of %s: the database could not be asked: %s", key, exc)
                wait_s = POLL_S
            await asyncio.sleep(wait_s * (1 + self._rng.random() / 10))

    async def _release(self, row_id: int, tokens: int) -> None:
        try:
            await self._pool.execute(_RELEASE, row_id, tokens, self._window_s)
        except (OSError, asyncpg.PostgresError) as exc:
            log.warning("tpm: a reservation was not released (it lapses by itself): %s", exc)
