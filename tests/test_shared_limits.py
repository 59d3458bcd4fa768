"""Per-model limits across replicas: slots in flight and paced starts, kept in PostgreSQL.

Each test gets a fresh schema holding only this module's two tables (schema
version 5), made from the migration's own SQL and dropped after. Without a
PostgreSQL server at ``BATCHEXEC_TEST_POSTGRES_URL`` the tests are skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import random
import secrets
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg
import pytest

from batchexec import shared_limits
from batchexec.catalog import ModelSpec
from batchexec.shared_limits import SharedModelLimits
from batchexec.store.migrations import migrations

URL_ENV = "BATCHEXEC_TEST_POSTGRES_URL"
DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/test"

MakeLimits = Callable[..., Awaitable[SharedModelLimits]]


@dataclass(frozen=True)
class Database:
    """A fresh schema: its URL (``search_path`` set), its name, and a connection of the test's."""

    url: str
    schema: str
    admin: asyncpg.Connection[asyncpg.Record]

    def application_name(self, holder: str) -> str:
        """What the pools of ``holder`` call themselves, so a test can find their connections."""
        return f"{self.schema}:{holder}"


def schema_sql() -> str:
    """The SQL of schema version 5, which made the limits' tables (the others are the store's)."""
    [made] = [migration for migration in migrations("postgresql") if migration.version == 5]
    return made.sql


def with_search_path(url: str, schema: str) -> str:
    parts = urlsplit(url)
    query = [*parse_qsl(parts.query), ("search_path", schema)]
    return urlunsplit(parts._replace(query=urlencode(query)))


@pytest.fixture(scope="session")
def base_url() -> str:
    """The test server's URL; if nothing answers there within 2 s, every test here is skipped
    (pytest keeps the skip, so the wait is paid once)."""
    url = os.environ.get(URL_ENV, DEFAULT_URL)
    parts = urlsplit(url)
    try:
        socket.create_connection((parts.hostname or "localhost", parts.port or 5432), 2).close()
    except OSError as exc:  # refused, unreachable, timed out
        pytest.skip(f"no PostgreSQL server answers at {url} ({type(exc).__name__})")
    return url


@pytest.fixture
async def database(base_url: str) -> AsyncIterator[Database]:
    """A schema ``batchexec_limits_<hex>`` with the limits' tables; dropped after the test."""
    admin = await asyncpg.connect(base_url, timeout=2)
    schema = f"batchexec_limits_{secrets.token_hex(4)}"
    try:
        await admin.execute(f"CREATE SCHEMA {schema}")
        await admin.execute(f"SET search_path TO {schema}")
        await admin.execute(schema_sql())
        yield Database(with_search_path(base_url, schema), schema, admin)
    finally:
        await admin.execute(f"DROP SCHEMA {schema} CASCADE")
        await admin.close()


@pytest.fixture
async def make_limits(database: Database) -> AsyncIterator[MakeLimits]:
    """Starts a ``SharedModelLimits`` on a pool of its own, one "replica"; all closed after."""
    async with contextlib.AsyncExitStack() as made:

        async def make(holder: str, *, hold_s: float = 30.0) -> SharedModelLimits:
            pool = await asyncpg.create_pool(
                database.url,
                min_size=1,
                max_size=6,
                server_settings={"application_name": database.application_name(holder)},
            )
            made.push_async_callback(pool.close)
            limits = SharedModelLimits(pool, holder=holder, hold_s=hold_s)
            made.push_async_callback(limits.close)  # before its pool; harmless twice
            await limits.start()
            return limits

        yield make


async def slots_held(database: Database) -> list[asyncpg.Record]:
    """The slots held now, on the database's clock."""
    return await database.admin.fetch(
        "SELECT model, slot, holder, held_until FROM model_slots "
        "WHERE held_until >= extract(epoch FROM clock_timestamp()) ORDER BY model, slot"
    )


async def test_max_concurrency_holds_across_replicas(make_limits, database):
    replicas = [await make_limits(f"replica-{n}") for n in range(3)]
    model = ModelSpec(name="Shared Model", provider="echo", max_concurrency=10)
    rng = random.Random(7)
    in_flight: dict[int, int] = {n: 0 for n in range(3)}
    most = 0
    mixed = False  # calls of two replicas or more in flight at once
    finished = 0

    async def one(replica: int, hold_s: float) -> None:
        nonlocal most, mixed, finished
        async with replicas[replica].call(model):
            in_flight[replica] += 1
            most = max(most, sum(in_flight.values()))
            mixed = mixed or sum(1 for count in in_flight.values() if count) > 1
            await asyncio.sleep(hold_s)
            in_flight[replica] -= 1
        finished += 1

    await asyncio.gather(*(one(n % 3, rng.uniform(0.01, 0.03)) for n in range(90)))

    assert finished == 90
    assert 5 <= most <= 10
    assert mixed
    assert await slots_held(database) == []
    # The model's rows are its ten slots, under its folded name, all free.
    rows = await database.admin.fetch("SELECT model, slot FROM model_slots ORDER BY slot")
    assert [(row["model"], row["slot"]) for row in rows] == [("shared model", n) for n in range(10)]


async def test_a_dead_holders_slot_is_taken_over_once_it_expires(make_limits, database, caplog):
    model = ModelSpec(name="solo", provider="echo", max_concurrency=1)
    dead = await make_limits("dead", hold_s=0.3)
    alive = await make_limits("alive")
    held = dead.call(model)
    await held.__aenter__()  # and never left: its process "died" holding the slot
    [slot] = await slots_held(database)
    assert slot["holder"] == "dead"

    async with alive.call(model):
        [taken] = await slots_held(database)
        assert taken["holder"] == "alive"
        # Taken no earlier than the dead holder's slot expired, on the database's clock.
        assert taken["held_until"] - 30.0 >= slot["held_until"] - 1e-6
        # The "dead" holder coming back late frees nothing of the new holder's.
        with caplog.at_level(logging.WARNING, logger=shared_limits.__name__):
            await held.__aexit__(None, None, None)
        assert "expired before its call ended" in caplog.text
        assert [row["holder"] for row in await slots_held(database)] == ["alive"]
    assert await slots_held(database) == []


async def test_an_expired_slot_left_in_the_table_is_free(make_limits, database):
    model = ModelSpec(name="solo", provider="echo", max_concurrency=1)
    await database.admin.execute(
        "INSERT INTO model_slots (model, slot, holder, claim, held_until) "
        "VALUES ('solo', 0, 'gone', gen_random_uuid(), "
        "extract(epoch FROM clock_timestamp()) - 1)"
    )
    limits = await make_limits("replica")
    async with limits.call(model):
        assert [row["holder"] for row in await slots_held(database)] == ["replica"]


async def test_cancelled_waiters_and_holders_leave_no_slot_held(make_limits, database, monkeypatch):
    model = ModelSpec(name="solo", provider="echo", max_concurrency=1, rpm=6000)
    first = await make_limits("first")
    second = await make_limits("second")
    asked = asyncio.Semaphore(0)  # released at every claim ``second`` sends
    take = second._take

    async def counted_take(key: str, limit: int) -> Any:
        asked.release()
        return await take(key, limit)

    monkeypatch.setattr(second, "_take", counted_take)
    entered = asyncio.Event()

    async def hold(limits: SharedModelLimits) -> None:
        async with limits.call(model):
            entered.set()
            await asyncio.Event().wait()

    holder = asyncio.create_task(hold(first))
    await entered.wait()
    # One waiter asking the database, found the slot taken and waiting for it; one queued
    # behind it in the same process; one in the holder's own process.
    waiters = [asyncio.create_task(hold(limits)) for limits in (second, second, first)]
    for _ in range(2):
        await asyncio.wait_for(asked.acquire(), 5)
    assert not any(waiter.done() for waiter in waiters)
    for task in [*waiters, holder]:
        task.cancel()
    results = await asyncio.gather(*waiters, holder, return_exceptions=True)
    assert all(isinstance(result, asyncio.CancelledError) for result in results)
    # A claim under way when its caller was cancelled ends, and frees what it took, first.
    await first.close()
    await second.close()
    assert await slots_held(database) == []


async def test_a_caller_cancelled_while_its_claim_is_sent_leaves_no_slot_held(
    make_limits, database, monkeypatch
):
    model = ModelSpec(name="solo", provider="echo", max_concurrency=1)
    limits = await make_limits("replica")
    sent = asyncio.Event()
    claims: list[Any] = []
    take = limits._take

    async def watched_take(key: str, limit: int) -> Any:
        sent.set()
        claims.append(await take(key, limit))
        return claims[-1]

    monkeypatch.setattr(limits, "_take", watched_take)

    async def enter() -> None:
        async with limits.call(model):
            raise AssertionError("the call was cancelled before it had its slot")

    call = asyncio.create_task(enter())
    await sent.wait()
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    await limits.close()  # waits for the claim, and the release it makes
    assert claims != [None]  # the claim did get the slot...
    assert await slots_held(database) == []  # ...and gave it back


@pytest.mark.parametrize("max_concurrency", [None, 2])
async def test_rpm_spaces_starts_across_replicas(make_limits, monkeypatch, max_concurrency):
    model = ModelSpec(name="paced", provider="echo", rpm=600, max_concurrency=max_concurrency)
    interval_s = 0.1
    replicas = [await make_limits(f"replica-{n}") for n in range(2)]
    reserved: list[float] = []
    for limits in replicas:

        async def recorded(key: str, every_s: float, reserve: Any = limits._reserve) -> Any:
            start_at, now_s = await reserve(key, every_s)
            reserved.append(start_at)
            return start_at, now_s

        monkeypatch.setattr(limits, "_reserve", recorded)
    loop = asyncio.get_running_loop()

    async def one(limits: SharedModelLimits) -> None:
        async with limits.call(model):
            pass

    began = loop.time()
    await asyncio.gather(*(one(replicas[n % 2]) for n in range(8)))
    took_s = loop.time() - began

    # The starts the database handed out: never two closer than the interval.
    starts = sorted(reserved)
    assert len(starts) == 8
    gaps = [later - earlier for earlier, later in itertools.pairwise(starts)]
    assert min(gaps) >= interval_s - 1e-6
    # Back to back, not spread out further (loose: a busy machine may lag).
    assert sum(gaps) / len(gaps) < 2 * interval_s
    # And the calls did wait for them. (Not compared call by call: the loop may run a
    # call late, never early, which could bring it closer to the next.)
    assert took_s >= 7 * interval_s - 0.005


async def test_a_model_without_limits_never_touches_the_database():
    # Never initialised: any use of this pool raises.
    pool: asyncpg.Pool[asyncpg.Record] = asyncpg.create_pool("postgresql://nobody@127.0.0.1:1/x")
    limits = SharedModelLimits(pool, holder="replica", hold_s=1.0)
    free = ModelSpec(name="free", provider="echo")
    async with limits.call(free), limits.call(free), limits.call(free):
        pass
    with pytest.raises(asyncpg.InterfaceError, match="not initialized"):
        await limits.start()
    limited = ModelSpec(name="limited", provider="echo", max_concurrency=1)
    with pytest.raises(RuntimeError, match="start"):
        limits.call(limited)
    await limits.close()
    await limits.close()
    with pytest.raises(RuntimeError, match="closed"):
        limits.call(limited)


async def test_calls_go_on_after_the_pools_connections_are_terminated(make_limits, database):
    model = ModelSpec(name="solo", provider="echo", max_concurrency=1, rpm=6000)
    limits = await make_limits("replica")
    async with limits.call(model):
        pass
    terminated = await database.admin.fetchval(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = $1",
        database.application_name("replica"),
    )
    assert terminated >= 2  # the listening connection and the one that ran the call
    for _ in range(3):
        async with limits.call(model):
            assert [row["holder"] for row in await slots_held(database)] == ["replica"]
    assert await slots_held(database) == []


async def test_connection_errors_while_claiming_are_tried_again(make_limits, monkeypatch):
    model = ModelSpec(name="solo", provider="echo", max_concurrency=1)
    limits = await make_limits("replica")
    failures = 2
    take = limits._take

    async def flaky_take(key: str, limit: int) -> Any:
        nonlocal failures
        if failures:
            failures -= 1
            raise asyncpg.ConnectionDoesNotExistError("connection was closed")
        return await take(key, limit)

    monkeypatch.setattr(limits, "_take", flaky_take)
    async with limits.call(model):
        assert failures == 0


class _ReleasesFail:
    """A pool whose releases of slots never reach the database."""

    def __init__(self, pool: asyncpg.Pool[asyncpg.Record]) -> None:
        self._pool = pool

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pool, name)

    async def fetchrow(self, query: str, *args: Any) -> Any:
        if query == shared_limits._RELEASE:
            raise ConnectionResetError("the database went away")
        return await self._pool.fetchrow(query, *args)


async def test_a_slot_that_cannot_be_freed_frees_itself_once_it_expires(
    make_limits, database, caplog
):
    model = ModelSpec(name="solo", provider="echo", max_concurrency=1)
    stuck = await make_limits("stuck", hold_s=0.3)
    other = await make_limits("other")
    stuck._pool = _ReleasesFail(stuck._pool)
    with caplog.at_level(logging.WARNING, logger=shared_limits.__name__):
        async with stuck.call(model):
            pass
    assert "cannot free slot 0" in caplog.text
    [slot] = await slots_held(database)
    assert slot["holder"] == "stuck"
    async with other.call(model):
        [taken] = await slots_held(database)
        assert taken["holder"] == "other"
        assert taken["held_until"] - 30.0 >= slot["held_until"] - 1e-6


async def test_a_release_wakes_a_waiter_of_another_replica_at_once(
    make_limits, database, monkeypatch
):
    # Polls so slow that only the release's notice can wake the waiter in time.
    monkeypatch.setattr(shared_limits, "_POLL_FIRST_S", 60.0)
    monkeypatch.setattr(shared_limits, "_POLL_MOST_S", 60.0)
    model = ModelSpec(name="solo", provider="echo", max_concurrency=1)
    first = await make_limits("first")
    second = await make_limits("second")

    async def handed_over() -> None:
        asked = asyncio.Event()
        take = second._take

        async def watched_take(key: str, limit: int) -> Any:
            claim = await take(key, limit)
            asked.set()
            return claim

        monkeypatch.setattr(second, "_take", watched_take)
        async with first.call(model):
            waiter = asyncio.create_task(enter(second))
            await asyncio.wait_for(asked.wait(), 5)  # found the slot taken
            assert not waiter.done()
        await asyncio.wait_for(waiter, 5)

    async def enter(limits: SharedModelLimits) -> None:
        async with limits.call(model):
            pass

    await handed_over()
    # Once its listening connection is lost, the waiter's replica listens again.
    lost = second._listener
    await database.admin.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
        database.application_name("second"),
    )
    async with asyncio.timeout(5):
        while second._listener is None or second._listener is lost:
            await asyncio.sleep(0.01)
    await handed_over()
    assert await slots_held(database) == []
