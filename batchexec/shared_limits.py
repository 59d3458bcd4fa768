"""Per-model limits that hold across every process sharing one PostgreSQL database.

``SharedModelLimits`` does what ``ModelLimits`` does for one process, for all
the replicas together: each model's ``max_concurrency`` (calls in flight) and
``rpm`` (requests per minute, spaced evenly). Times are the database's clock
(``clock_timestamp()``, in epoch seconds); a process only ever sleeps the
difference of two database times, so replicas need no synchronised clocks.

Calls in flight. A model limited to N calls has N rows in ``model_slots``,
slots 0 .. N-1, added on first use. A slot is free once its ``held_until`` has
passed: a call claims the lowest free slot, setting ``held_until`` to now plus
``hold_s``, and frees it afterwards by setting it to 0 (and telling every
process, ``NOTIFY batchexec_slots``). The slot of a holder that died frees
itself ``hold_s`` after it was taken; a live holder never gets that far, as
its whole call (waiting, pacing, the request) runs within the execution
timeout and ``hold_s`` is longer. The claim is one autocommitted statement,
``UPDATE ... WHERE slot = (SELECT ... FOR UPDATE SKIP LOCKED)``, which two
processes can never both win. This replaces a row per call counted under an
advisory lock: there the lock has to be taken in one statement and the count
made in the next (a statement sees only what was committed before it began),
so a claim is a transaction of four round trips and every claimer of the
model queues on the lock across them; here it is one round trip and claimers
never wait for each other. Models are keyed by folded name. Slot rows are
never deleted; a process uses only the slots below its own limit, so while
replicas disagree on a limit (a rolling change) the larger one holds.

Waiting. A call first takes a local semaphore of N, so a process never asks
for more slots than the limit, then its model's turn: one waiter per process
and model asks the database at a time while the others queue locally. When no
slot is free, it waits for a release notice or a poll, 10 ms doubling to 200 ms
with jitter, whichever comes first, so a lost notice (or a lost listening
connection) costs a waiter 200 ms at most. Replicas are not served in turn: the
first to ask after a release wins. Notices go to the whole database, not one
schema: deployments in other schemas of it only wake each other for nothing.

Requests per minute. ``model_pacing`` holds each model's next start. One
upsert, serialised on the model's row, reserves ``greatest(next_at, now)`` and
moves ``next_at`` to that plus ``60 / rpm``, returning the reserved start and
the database's now; the caller sleeps the difference. The reservations of a
model are therefore never closer than ``60 / rpm`` (actual starts differ from
them by the jitter of the round trip's latency). As in ``ModelLimits``, the
slot is taken first, then the pace, and each process reserves one start per
model at a time, the others queued locally, so a waiter cancelled in the queue
wastes nothing. One cancelled while it sleeps to its start wastes that start:
the model is then under-used, never over-admitted.

Failures. A claim is never cancelled midway: it runs in a task of its own,
shielded, and if its caller was cancelled meanwhile the task frees the slot it
got. The release is shielded likewise, so a cancelled call never keeps a slot.
Connection errors while acquiring (a slot or a start) are retried with backoff,
0.05 s doubling to 2 s, for as long as the caller waits, which its execution
timeout bounds. A release is tried three times, then logged: the slot frees
itself at ``held_until``. A lost listening connection is made again with the
same backoff; waiters poll meanwhile. The tables are logged, so holds and
starts outlive a crash or failover of the database; the price is a commit
flushed to disk for each claim, release and reservation.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import AbstractAsyncContextManager, asynccontextmanager, nullcontext, suppress
from dataclasses import dataclass
from typing import Any, TypeVar

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from batchexec.catalog import ModelSpec, fold

log = logging.getLogger(__name__)

_T = TypeVar("_T")

#: Where releases are told; the payload is the model's folded name.
CHANNEL = "batchexec_slots"


def slots_channel(store_channel: str) -> str:
    """The channel of released slots beside a store's notice channel ``store_channel``."""
    return f"batchexec_slots:{hashlib.sha256(store_channel.encode()).hexdigest()[:32]}"


#: Models with neither limit skip the bookkeeping, and the database, entirely.
_UNLIMITED: AbstractAsyncContextManager[object] = nullcontext()

#: Errors in reaching the database (not in what was asked of it): worth trying again.
_CONNECTION_ERRORS: tuple[type[Exception], ...] = (
    OSError,  # refused, reset, timed out
    asyncpg.PostgresConnectionError,  # class 08, and a connection closed mid-operation
    asyncpg.OperatorInterventionError,  # class 57: the server shutting down or starting
    asyncpg.TooManyConnectionsError,
    # What a query gets on a connection whose server just ended it, before asyncpg has
    # read the end ("cannot switch to state 12; another operation (2) is in progress").
    asyncpg.InternalClientError,
)

_POLL_FIRST_S = 0.01
_POLL_MOST_S = 0.2
_RETRY_FIRST_S = 0.05
_RETRY_MOST_S = 2.0
_RELEASE_ATTEMPTS = 3

_ADD_SLOTS = """
INSERT INTO model_slots (model, slot, held_until)
SELECT $1, slot, 0 FROM generate_series(0, $2 - 1) AS slot
ON CONFLICT DO NOTHING
"""

_CLAIM = """
UPDATE model_slots
SET holder = $3, claim = $4,
    held_until = extract(epoch FROM clock_timestamp())::double precision + $5
WHERE model = $1 AND slot = (
    SELECT slot FROM model_slots
    WHERE model = $1 AND slot < $2
        AND held_until < extract(epoch FROM clock_timestamp())::double precision
    ORDER BY slot
    LIMIT 1
    FOR UPDATE SKIP LOCKED
)
RETURNING slot
"""

# Frees only the hold it names: a slot taken over after it expired stays its new holder's.
_RELEASE = """
WITH freed AS (
    UPDATE model_slots SET holder = NULL, claim = NULL, held_until = 0
    WHERE model = $1 AND slot = $2 AND claim = $3
    RETURNING model
)
SELECT model, pg_notify($4, model) FROM freed
"""

_RESERVE = """
INSERT INTO model_pacing AS pacing (model, next_at)
VALUES ($1, extract(epoch FROM clock_timestamp())::double precision + $2)
ON CONFLICT (model) DO UPDATE
SET next_at = greatest(
    pacing.next_at, extract(epoch FROM clock_timestamp())::double precision
) + $2
RETURNING pacing.next_at - $2 AS start_at,
    extract(epoch FROM clock_timestamp())::double precision AS now_s
"""


@dataclass(frozen=True)
class _Claim:
    """One hold of a slot: whose model, which slot, and the hold's own id."""

    model: str
    slot: int
    claim: uuid.UUID


class _Backoff:
    """Delays doubling from ``first_s`` up to ``most_s``, each drawn from its upper half."""

    def __init__(self, first_s: float, most_s: float, rng: random.Random) -> None:
        self._next_s = first_s
        self._most_s = most_s
        self._rng = rng

    def next_s(self) -> float:
        delay_s = self._next_s
        self._next_s = min(delay_s * 2, self._most_s)
        return self._rng.uniform(delay_s / 2, delay_s)


class SharedModelLimits:
    """``ModelLimits`` for replicas: each model's limits hold across every process of the database.

    Needs the tables of schema version 5 (``model_slots``, ``model_pacing``);
    ``start()`` before the first limited call, ``close()`` after the last and
    before the pool is closed.
    """

    def __init__(
        self, pool: asyncpg.Pool[Any], *, holder: str, hold_s: float, channel: str = CHANNEL
    ) -> None:
        """``holder`` names this process in the slots it holds; a slot whose holder died
        without freeing it frees itself ``hold_s`` seconds after it was taken. ``channel``
        is where releases are told: one a schema (``slots_channel``), as channels are the
        whole database's."""
        if hold_s <= 0:
            raise ValueError(f"hold_s must be positive, not {hold_s!r}")
        self._pool = pool
        self._channel = channel
        self._holder = holder
        self._hold_s = hold_s
        self._rng = random.Random()  # the backoffs' jitter (not security)
        self._local_slots: dict[str, asyncio.Semaphore] = {}
        self._claim_turns: dict[str, asyncio.Lock] = {}
        self._pacing_turns: dict[str, asyncio.Lock] = {}
        self._slots_added: set[tuple[str, int]] = set()
        #: Set, and dropped, when a slot of the model is released; waited on by its turn.
        self._released: dict[str, asyncio.Event] = {}
        #: Releases, and claims whose caller was cancelled: they finish on their own, and
        #: close() waits for them. (A claim whose caller waits is the caller's to hold.)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._listener: PoolConnectionProxy[Any] | None = None
        self._relistening: asyncio.Task[None] | None = None
        self._started = False
        self._closed = False

    async def start(self) -> None:
        """Listens for released slots; raises if the database cannot be reached."""
        if self._closed:
            raise RuntimeError("SharedModelLimits is closed")
        if not self._started:
            self._listener = await self._listen()
            self._started = True

    async def close(self) -> None:
        """Stops listening and lets releases under way finish; harmless twice.

        Frees no slot a call still holds: that is the call's to release.
        """
        if self._closed:
            return
        self._closed = True
        if self._relistening is not None:
            self._relistening.cancel()
            await asyncio.wait([self._relistening])
        listener, self._listener = self._listener, None
        if listener is not None:
            try:
                # InterfaceError: lost just now, and so already back in the pool.
                with suppress(asyncpg.InterfaceError, *_CONNECTION_ERRORS):
                    listener.remove_termination_listener(self._on_listener_lost)
                    await listener.remove_listener(self._channel, self._on_notice)
            finally:
                await self._pool.release(listener)
        while self._tasks:
            await asyncio.wait(set(self._tasks))

    def call(self, model: ModelSpec) -> AbstractAsyncContextManager[object]:
        """Held around each request to ``model``; waits for a slot, then for the pacer.

        A model with neither limit costs nothing: no database round trip.
        """
        if model.max_concurrency is None and model.rpm is None:
            return _UNLIMITED
        if self._closed:
            raise RuntimeError("SharedModelLimits is closed")
        if not self._started:
            raise RuntimeError("SharedModelLimits.start() was not awaited")
        return self._limited(model)

    @asynccontextmanager
    async def _limited(self, model: ModelSpec) -> AsyncIterator[None]:
        key = fold(model.name)
        limit = model.max_concurrency
        if limit is None:
            if model.rpm is not None:
                await self._pace(key, model.rpm)
            yield
            return
        local = self._local_slots.get(key)
        if local is None:
            local = self._local_slots[key] = asyncio.Semaphore(limit)
        async with local:
            async with _lock(self._claim_turns, key):
                claim = await self._claim(key, limit)
            try:
                if model.rpm is not None:
                    await self._pace(key, model.rpm)
                yield
            finally:
                await asyncio.shield(self._spawn(self._release(claim)))

    async def _claim(self, key: str, limit: int) -> _Claim:
        """Waits until a slot of ``key`` is free, and takes it."""
        if (key, limit) not in self._slots_added:
            await self._retrying(key, lambda: self._pool.execute(_ADD_SLOTS, key, limit))
            self._slots_added.add((key, limit))
        poll = _Backoff(_POLL_FIRST_S, _POLL_MOST_S, self._rng)
        while True:
            # Taken before asking, so a release told while the answer travels still wakes us.
            released = self._released.get(key)
            if released is None:
                released = self._released[key] = asyncio.Event()
            claim = await self._retrying(key, lambda: self._claim_once(key, limit))
            if claim is not None:
                return claim
            with suppress(TimeoutError):
                async with asyncio.timeout(poll.next_s()):
                    await released.wait()

    async def _claim_once(self, key: str, limit: int) -> _Claim | None:
        """One try at a slot, never cancelled midway: a slot it takes is returned or freed."""
        attempt = asyncio.create_task(self._take(key, limit))
        try:
            return await asyncio.shield(attempt)
        except asyncio.CancelledError:
            self._keep(attempt)
            attempt.add_done_callback(self._free_if_taken)
            raise

    async def _take(self, key: str, limit: int) -> _Claim | None:
        claim = uuid.uuid4()
        slot: int | None = await self._pool.fetchval(
            _CLAIM, key, limit, self._holder, claim, self._hold_s
        )
        return None if slot is None else _Claim(key, slot, claim)

    def _free_if_taken(self, attempt: asyncio.Task[_Claim | None]) -> None:
        if attempt.cancelled() or attempt.exception() is not None:
            return
        claim = attempt.result()
        if claim is not None:
            self._spawn(self._release(claim))

    async def _release(self, claim: _Claim) -> None:
        """Frees ``claim``'s slot and tells every process; logs, never raises."""
        backoff = _Backoff(_RETRY_FIRST_S, _RETRY_MOST_S, self._rng)
        for attempt in range(1, _RELEASE_ATTEMPTS + 1):
            try:
                freed = await self._pool.fetchrow(
                    _RELEASE, claim.model, claim.slot, claim.claim, self._channel
                )
            except _CONNECTION_ERRORS as exc:
                if attempt < _RELEASE_ATTEMPTS:
                    await asyncio.sleep(backoff.next_s())
                    continue
                log.warning(
                    "model %r: cannot free slot %d (%s); it frees itself within %g s",
                    claim.model,
                    claim.slot,
                    _describe(exc),
                    self._hold_s,
                )
            except Exception:
                log.exception(
                    "model %r: cannot free slot %d; it frees itself within %g s",
                    claim.model,
                    claim.slot,
                    self._hold_s,
                )
            else:
                if freed is None:
                    log.warning(
                        "model %r: slot %d expired before its call ended (hold_s %g is too "
                        "short) and may have been taken by another call",
                        claim.model,
                        claim.slot,
                        self._hold_s,
                    )
                else:
                    self._wake(claim.model)
            return

    async def _pace(self, key: str, rpm: float) -> None:
        """Waits for this call's start, ``60 / rpm`` seconds after the model's previous one."""
        interval_s = 60.0 / rpm
        async with _lock(self._pacing_turns, key):
            start_at, now_s = await self._retrying(key, lambda: self._reserve(key, interval_s))
            if start_at > now_s:
                await asyncio.sleep(start_at - now_s)

    async def _reserve(self, key: str, interval_s: float) -> tuple[float, float]:
        """The next start of ``key`` given out, and the database's time when it was."""
        row = await self._pool.fetchrow(_RESERVE, key, interval_s)
        assert row is not None  # an upsert with RETURNING always returns its row
        start_at: float = row["start_at"]
        now_s: float = row["now_s"]
        return start_at, now_s

    async def _retrying(self, key: str, attempt: Callable[[], Awaitable[_T]]) -> _T:
        """``attempt()`` until it gets through, connection errors tried again with backoff."""
        backoff = _Backoff(_RETRY_FIRST_S, _RETRY_MOST_S, self._rng)
        while True:
            try:
                return await attempt()
            except _CONNECTION_ERRORS as exc:
                delay_s = backoff.next_s()
                log.warning(
                    "model %r: cannot reach the database (%s); trying again in %.2f s",
                    key,
                    _describe(exc),
                    delay_s,
                )
                await asyncio.sleep(delay_s)

    async def _listen(self) -> PoolConnectionProxy[Any]:
        connection = await self._pool.acquire()
        try:
            await connection.add_listener(self._channel, self._on_notice)
        except BaseException:
            await self._pool.release(connection)
            raise
        connection.add_termination_listener(self._on_listener_lost)
        return connection

    def _on_notice(self, connection: object, pid: int, channel: str, payload: object) -> None:
        if isinstance(payload, str):
            self._wake(payload)

    def _on_listener_lost(self, connection: object) -> None:
        self._listener = None
        if self._closed:
            return
        log.warning("lost the connection listening for released slots; waiters poll meanwhile")
        self._relistening = asyncio.create_task(self._listen_again())

    async def _listen_again(self) -> None:
        backoff = _Backoff(_RETRY_FIRST_S, _RETRY_MOST_S, self._rng)
        while True:
            await asyncio.sleep(backoff.next_s())
            try:
                self._listener = await self._listen()
            except Exception as exc:
                # Whatever the cause, waiters still poll; keep trying until close().
                log.warning("cannot listen for released slots yet (%s)", _describe(exc))
                continue
            break
        self._relistening = None
        # Releases told while nobody listened were missed: every waiter looks again.
        for released in self._released.values():
            released.set()
        self._released.clear()

    def _wake(self, key: str) -> None:
        released = self._released.pop(key, None)
        if released is not None:
            released.set()

    def _spawn(self, work: Coroutine[Any, Any, _T]) -> asyncio.Task[_T]:
        task = asyncio.create_task(work)
        self._keep(task)
        return task

    def _keep(self, task: asyncio.Task[Any]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _lock(locks: dict[str, asyncio.Lock], key: str) -> asyncio.Lock:
    lock = locks.get(key)
    if lock is None:
        lock = locks[key] = asyncio.Lock()
    return lock


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
