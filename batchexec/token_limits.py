"""Tokens per minute: a model's ``tpm`` in the catalog, held across every batch of this process.

A call first reserves what it will use: the estimate of its prompt
(``estimates.request_tokens``, scaled by the executor once the provider has
counted more than estimated) plus the most its answer may hold (the row's
``max_tokens``, else the catalog's, ``estimates.output_limit``). It waits
until the model's reservations of the last minute leave room for it; when
the answer comes the reservation becomes the tokens the provider reported.
A reservation counts from when it is made until a minute after its call
ended, so whenever a provider receives its requests, no minute of them holds
more than ``tpm`` reserved tokens. A call whose reservation alone is over
``tpm`` waits for an empty minute and goes alone.

Where an answer has no bound, the reservation is the prompt's alone and is
corrected afterwards: a minute may then hold more than ``tpm`` by the
answers' tokens. Each process keeps its own account here; replicas sharing a
PostgreSQL database share one (``shared_tokens``).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections import deque
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager, nullcontext
from dataclasses import dataclass
from typing import Protocol

from batchexec.catalog import ModelSpec, fold

#: The window a model's ``tpm`` counts over: a minute.
MINUTE_S = 60.0


@dataclass
class Reservation:
    """Tokens held for one call; ``used`` sets what the call really took."""

    tokens: int
    #: When the window stops counting it: None while its call is in flight.
    expires_s: float | None = None

    def used(self, tokens: int | None) -> None:
        """The tokens the provider reported for the call; None keeps the reservation."""
        if tokens is not None:
            self.tokens = tokens


def unreserved(tokens: int) -> AbstractAsyncContextManager[Reservation]:
    """What a call to a model without ``tpm`` holds: nothing to wait for, nothing to
    release. Most models set none, and every call of theirs passes here."""
    return nullcontext(Reservation(tokens))


class _Account:
    """One model's reservations of the last window, oldest first, and a queue to wait in."""

    def __init__(self, tpm: int, window_s: float) -> None:
        self.tpm = tpm
        self.window_s = window_s
        self.held: deque[Reservation] = deque()
        self.turn = asyncio.Lock()
        #: Set when a call ends: the one waiting (first in turn) looks again.
        self.ended = asyncio.Event()

    def _in_window(self, now_s: float) -> int:
        while self.held and self.held[0].expires_s is not None and self.held[0].expires_s <= now_s:
            self.held.popleft()
        return sum(reservation.tokens for reservation in self.held)

    async def reserve(self, tokens: int) -> Reservation:
        loop = asyncio.get_running_loop()
        async with self.turn:  # first come, first served: a big call is not starved
            while True:
                held = self._in_window(loop.time())
                if held + tokens <= self.tpm or not self.held:
                    reservation = Reservation(tokens)
                    self.held.append(reservation)
                    return reservation
                await self._changed(loop.time())

    async def _changed(self, now_s: float) -> None:
        """Wait until the oldest reservation leaves the window, or any call ends."""
        ends = [r.expires_s for r in self.held if r.expires_s is not None]
        wait_s = max(min(ends) - now_s, 0.0) if ends else self.window_s
        self.ended.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait_s):
                await self.ended.wait()

    def release(self, reservation: Reservation) -> None:
        reservation.expires_s = asyncio.get_running_loop().time() + self.window_s
        # Expiry times are no longer in order of the queue: keep the oldest first.
        self.held = deque(
            sorted(self.held, key=lambda r: math.inf if r.expires_s is None else r.expires_s)
        )
        self.ended.set()


class TokenAccounts(Protocol):
    """Where calls reserve their models' tokens per minute: this process's
    (``TokenLimits``), or a cluster's (``shared_tokens.SharedTokenLimits``)."""

    def reserve(self, model: ModelSpec, tokens: int) -> AbstractAsyncContextManager[Reservation]:
        """Held around a call to ``model`` that may use ``tokens``."""
        ...


class TokenLimits:
    """The ``tpm`` accounts of this process's models, one a model that sets ``tpm``."""

    def __init__(self, window_s: float = MINUTE_S) -> None:
        """``window_s``: the window ``tpm`` counts over; shorter only in tests."""
        self._window_s = window_s
        self._accounts: dict[str, _Account] = {}

    def reserve(self, model: ModelSpec, tokens: int) -> AbstractAsyncContextManager[Reservation]:
        """Hold ``tokens`` of ``model``'s minute around a call; its ``used`` corrects them."""
        if model.tpm is None:
            return unreserved(tokens)
        return self._reserved(model, model.tpm, tokens)

    @asynccontextmanager
    async def _reserved(
        self, model: ModelSpec, tpm: int, tokens: int
    ) -> AsyncIterator[Reservation]:
        key = fold(model.name)
        account = self._accounts.get(key)
        if account is None or account.tpm != tpm:
            account = self._accounts[key] = _Account(tpm, self._window_s)
        reservation = await account.reserve(tokens)
        try:
            yield reservation
        finally:
            account.release(reservation)
