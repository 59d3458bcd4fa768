"""The PostgreSQL store: the store contract (``store_contract.py``) run on it, and what is its own.

Its own: its schema's bookkeeping and errors of reaching the server, leases and
fencing, retried writes, text escaped, notices, and lost connections. Each
test gets a fresh schema (``tests/postgres.py``) and is skipped when no
server answers. Stores are named replicas with a tag of the test's own, so a
test can find its stores' connections in ``pg_stat_activity`` and kill them.
"""

from __future__ import annotations

import asyncio
import secrets
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import pytest
from hypothesis import given
from hypothesis import strategies as st

from batchexec.records import Batch, BatchStatus, ExecutionStatus
from batchexec.store import (
    BatchEnded,
    BatchStarted,
    Change,
    ExecutionStarted,
    Notice,
    StoreError,
)
from batchexec.store.migrations import latest, migrations
from batchexec.store.postgres import PostgresStore
from batchexec.store.postgres_rows import read_text, text
from tests.postgres import MakePostgresUrl
from tests.store_contract import StoreContract, StoreKit, a_batch, created_and_held, ended

OpenStore = Callable[..., Awaitable[PostgresStore]]
#: The longest a test waits for something that must happen over real connections.
_WAIT_S = 10.0


class PostgresKit(StoreKit[PostgresStore]):
    """PostgreSQL stores on the test's schema unless told another URL, named ``replica``."""

    dialect = "postgresql"
    too_large = "int64"
    batches_with_rows = "SELECT DISTINCT batch_id FROM executions ORDER BY batch_id"
    sixth_result = "SELECT result FROM executions WHERE idx = 6"

    def __init__(self, url: str, make_url: MakePostgresUrl) -> None:
        super().__init__()
        self.url = url
        self._make_url = make_url
        self._tag = secrets.token_hex(4)

    def make(self, where: str | None, *, replica: str = "a", **options: Any) -> PostgresStore:
        return PostgresStore(where or self.url, replica=f"{replica}-{self._tag}", **options)

    async def elsewhere(self) -> str:
        return await self._make_url()

    async def another_process(self, store: PostgresStore) -> PostgresStore:
        return await self.open(store._url, replica="b")

    async def query(self, sql: str) -> list[tuple[Any, ...]]:
        return await query(self.url, sql)

    async def schema_version(self) -> int:
        [(version,)] = await query(self.url, "SELECT max(version) FROM schema_migrations")
        return int(version)

    async def write_first_schema(self, secret: bytes, *statements: str) -> None:
        conn = await asyncpg.connect(self.url)
        try:
            await conn.execute(migrations("postgresql")[0].sql)
            await conn.execute(
                "CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL, "
                "applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
            )
            await conn.execute("INSERT INTO schema_migrations VALUES (1, '0001_initial.sql')")
            await conn.execute("INSERT INTO meta (key, value) VALUES ('secret', $1)", secret)
            for statement in statements:
                await conn.execute(statement)
        finally:
            await conn.close()

    async def fail_batch_ends(self) -> str:
        conn = await asyncpg.connect(self.url)
        try:
            await conn.execute(
                "CREATE FUNCTION disk_full() RETURNS trigger LANGUAGE plpgsql AS "
                "$$ BEGIN RAISE EXCEPTION 'could not extend file: No space left on device'; END $$"
            )
            await conn.execute(
                "CREATE TRIGGER disk_full BEFORE UPDATE OF finished_at ON batches "
                "FOR EACH ROW EXECUTE FUNCTION disk_full()"
            )
        finally:
            await conn.close()
        return "No space left on device"


@pytest.fixture
async def kit(postgres_url: str, make_postgres_url: MakePostgresUrl) -> AsyncIterator[PostgresKit]:
    """PostgreSQL stores on the test's schema; every one is closed after."""
    stores = PostgresKit(postgres_url, make_postgres_url)
    yield stores
    await stores.close()


@pytest.fixture
def open_store(kit: PostgresKit) -> OpenStore:
    """Opens a store on the test's schema (unless told another URL); every one is closed after."""
    return kit.open


class TestStoreContract(StoreContract):
    """Every SQL store's tests, on PostgreSQL."""


async def query(url: str, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    """``sql``'s rows, read through a connection of the test's own."""
    conn = await asyncpg.connect(url)
    try:
        return [tuple(row) for row in await conn.fetch(sql, *args)]
    finally:
        await conn.close()


async def eventually(check: Callable[[], Awaitable[bool] | bool], what: str) -> None:
    """Wait until ``check()`` holds; fail after ``_WAIT_S``."""
    deadline = time.monotonic() + _WAIT_S
    while True:
        result = check()
        if result if isinstance(result, bool) else await result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened: {what}")
        await asyncio.sleep(0.01)


async def terminate(url: str, where: str, *args: Any) -> int:
    """Kill the backends of ``pg_stat_activity`` that ``where`` picks; how many there were."""
    rows = await query(
        url, f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE {where}", *args
    )
    return len(rows)


# Opening


async def test_a_new_schema_is_migrated_to_the_latest_version_and_gets_a_secret(
    open_store, postgres_url
):
    store = await open_store()
    await store.close()

    newest = latest("postgresql")
    assert await query(postgres_url, "SELECT version, name FROM schema_migrations") == [
        (migration.version, migration.name) for migration in migrations("postgresql")
    ]
    assert newest >= 4
    [(secret,)] = await query(postgres_url, "SELECT value FROM meta WHERE key = 'secret'")
    assert isinstance(secret, bytes)
    assert len(secret) == 32


async def test_replicas_starting_at_once_migrate_once_and_share_the_secret_and_data(
    open_store, postgres_url
):
    stores = await asyncio.gather(*(open_store(replica=name) for name in "abc"))

    assert len({store.fingerprint("key-a") for store in stores}) == 1
    versions = await query(postgres_url, "SELECT version FROM schema_migrations ORDER BY 1")
    assert versions == [(version,) for version in range(1, latest("postgresql") + 1)]
    assert await query(postgres_url, "SELECT count(*) FROM meta") == [(1,)]
    batch = a_batch("b1", rows=[ExecutionStatus.PENDING] * 3)
    await stores[0].create(batch)
    assert await stores[1].load("b1") == batch


async def test_a_database_of_a_newer_schema_is_refused_and_left_alone(open_store, postgres_url):
    newer = latest("postgresql") + 1
    conn = await asyncpg.connect(postgres_url)
    await conn.execute("CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, name TEXT)")
    await conn.execute("INSERT INTO schema_migrations VALUES ($1, 'from the future')", newer)
    await conn.close()

    with pytest.raises(StoreError, match=r"^DATABASE_URL: .*newer batchexec.*upgrade"):
        await open_store()
    assert await query(postgres_url, "SELECT version FROM schema_migrations") == [(newer,)]
    assert await query(
        postgres_url,
        "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema()",
    ) == [("schema_migrations",)]


async def test_a_port_where_nothing_listens_is_a_store_error_naming_the_setting(open_store):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # Nothing listens there now; the password must not be told.
    url = f"postgresql://postgres:s3cret-pw@127.0.0.1:{port}/test"
    started = time.monotonic()

    with pytest.raises(StoreError) as raised:
        await open_store(url)

    assert time.monotonic() - started < 5
    message = str(raised.value)
    assert message.startswith(f"DATABASE_URL: cannot connect to PostgreSQL at 127.0.0.1:{port}: ")
    assert "s3cret-pw" not in message


async def test_a_database_that_does_not_exist_is_a_store_error(open_store, postgres_url):
    parts = urlsplit(postgres_url)
    url = parts._replace(path=f"/batchexec_missing_{secrets.token_hex(4)}").geturl()
    with pytest.raises(StoreError, match=r"^DATABASE_URL: cannot connect.*does not exist"):
        await open_store(url)


def test_unnamed_stores_get_names_of_their_own():
    # Two processes must never share one: they would write each other's batches.
    unnamed = [PostgresStore("postgresql://unused", replica="") for _ in range(2)]
    assert unnamed[0].replica
    assert unnamed[0].replica != unnamed[1].replica


# Writing and reading back


@given(
    st.text(
        alphabet=st.one_of(
            st.characters(),
            st.characters(categories=["Cs"]),
            st.sampled_from(["\x00", "\\", "\ufdd0", "u", "0"]),
        )
    )
)
def test_any_text_is_stored_as_postgresql_text_and_read_back_exactly(value):
    stored = text(value)
    assert stored is not None
    assert "\x00" not in stored
    stored.encode()  # UTF-8, so no surrogate is left
    assert read_text(stored) == value
    if not stored.startswith("\ufdd0"):
        assert stored == value  # text PostgreSQL can hold is stored as it is


async def test_a_cancel_reason_with_nul_and_lone_surrogates_reaches_the_holder_exactly(
    open_store,
):
    store = await open_store()
    await store.request_cancel("b2-missing", "\x00")  # nothing to cancel, and no error
    await store.create(a_batch("b2"))
    await store.request_cancel("b2", "why\x00\ud800")
    renewal = await store.renew(["b2"], 60.0)
    assert renewal.held == frozenset()  # not claimed yet
    (claimed,) = await store.claim(0, 60.0)
    assert (await store.renew([claimed.id], 60.0)).cancels == {"b2": "why\x00\ud800"}


async def test_a_group_written_twice_leaves_what_writing_it_once_does(open_store):
    """A commit whose answer was lost is retried: the second write must change nothing."""
    store = await open_store()
    await created_and_held(store, a_batch("b1", rows=[ExecutionStatus.PENDING] * 3))
    group: list[Change] = [
        BatchStarted("b1", 2.0),
        ExecutionStarted("b1", 1, "row 1", 1),
        ExecutionStarted("b1", 2, "row 2", 1),
        ended("b1", 1, ExecutionStatus.SUCCEEDED, 1, result="first"),
        ended("b1", 3, ExecutionStatus.SKIPPED, 2),
        BatchEnded("b1", BatchStatus.CANCELLED, "Stopped.", 3.0, None),
    ]
    await store.apply(group)
    once = await store.load("b1")

    await store.apply(group)
    assert await store.load("b1") == once
    # Neither a late start nor a late end of a row changes a batch that has ended.
    await store.apply([BatchStarted("b1", 9.0), ended("b1", 1, ExecutionStatus.FAILED, 9)])
    again = await store.load("b1")
    assert again == once
    assert again is not None
    assert (again.status, again.started_at) == (BatchStatus.CANCELLED, 2.0)
    assert again.executions[0].result == "first"
    assert again.executions[1].status is ExecutionStatus.RUNNING


# Leases and fencing


async def test_a_replica_cannot_write_a_batch_whose_lease_another_holds(open_store):
    a = await open_store(replica="a")
    b = await open_store(replica="b")
    await created_and_held(a, a_batch("a's", rows=[ExecutionStatus.PENDING] * 2))
    await created_and_held(b, a_batch("b's", rows=[ExecutionStatus.PENDING] * 2))
    await b.create(a_batch("nobody's"))
    before = await a.load("a's")

    lost = await b.apply(
        [
            BatchStarted("a's", 2.0),
            ended("a's", 1, ExecutionStatus.SUCCEEDED, 1, result="by b"),
            ended("b's", 1, ExecutionStatus.SUCCEEDED, 1, result="by b"),
            ended("nobody's", 1, ExecutionStatus.SUCCEEDED, 1),
            BatchEnded("a's", BatchStatus.COMPLETED, "Done by b.", 3.0, None),
        ]
    )

    assert lost == frozenset({"a's", "nobody's"})
    assert await a.load("a's") == before
    loaded_b = await b.load("b's")
    assert loaded_b is not None
    assert loaded_b.executions[0].result == "by b"
    nobodys = await b.load("nobody's")
    assert nobodys is not None
    assert nobodys.executions[0].status is ExecutionStatus.PENDING
    # Its holder writes it.
    assert await a.apply([ended("a's", 1, ExecutionStatus.SUCCEEDED, 1, result="by a")]) == set()
    loaded_a = await a.load("a's")
    assert loaded_a is not None
    assert loaded_a.executions[0].result == "by a"


async def test_claim_takes_the_oldest_free_batches_whole_up_to_the_limit(open_store, postgres_url):
    a = await open_store(replica="a")
    b = await open_store(replica="b")
    for n, created_at in enumerate((3.0, 1.0, 2.0, 2.0)):
        await a.create(a_batch(f"q{n}", created_at=created_at, rows=[ExecutionStatus.PENDING] * 2))
    await a.create(a_batch("done", created_at=0.5, status=BatchStatus.COMPLETED, finished_at=1.0))

    claimed = await a.claim(2, 60.0)

    assert [batch.id for batch in claimed] == ["q1", "q2"]
    assert claimed == [await a.load("q1"), await a.load("q2")]
    assert [batch.id for batch in await b.claim(10, 60.0)] == ["q3", "q0"]
    assert await a.claim(10, 60.0) == []
    assert await query(postgres_url, "SELECT id, lease_owner FROM batches ORDER BY id") == [
        ("done", None),
        ("q0", b.replica),
        ("q1", a.replica),
        ("q2", a.replica),
        ("q3", b.replica),
    ]


async def test_two_replicas_claiming_at_once_never_get_the_same_batch(open_store):
    a = await open_store(replica="a")
    b = await open_store(replica="b")
    ids = [f"b{n:02}" for n in range(20)]
    for n, batch_id in enumerate(ids):
        await a.create(a_batch(batch_id, created_at=float(n)))

    async def claim_all(store: PostgresStore) -> list[str]:
        got: list[str] = []
        while batches := await store.claim(2, 60.0):
            got += [batch.id for batch in batches]
        return got

    by_a, by_b = await asyncio.gather(claim_all(a), claim_all(b))

    assert not set(by_a) & set(by_b)
    assert sorted(by_a + by_b) == ids
    assert by_a == sorted(by_a)
    assert by_b == sorted(by_b)  # each took them oldest first
    assert await a.waiting() == 0


async def test_a_lapsed_lease_is_taken_over_with_the_rows_as_stored(open_store):
    a = await open_store(replica="a")
    b = await open_store(replica="b")
    await a.create(a_batch("b1", rows=[ExecutionStatus.PENDING] * 3))
    assert [batch.id for batch in await a.claim(1, 60.0)] == ["b1"]
    assert await b.claim(1, 60.0) == []  # a's
    written = [
        BatchStarted("b1", 2.0),
        ended("b1", 1, ExecutionStatus.SUCCEEDED, 1, result="kept"),
        ExecutionStarted("b1", 2, "row 2", 1),
    ]
    assert await a.apply(written) == frozenset()
    # a's last heartbeat: then it stops renewing (a long pause, a partition).
    assert (await a.renew(["b1"], 0.2)).held == {"b1"}
    taken: list[Batch] = []

    async def b_takes_it() -> bool:
        taken.extend(await b.claim(1, 60.0))
        return bool(taken)

    await eventually(b_takes_it, "b claimed the lapsed lease")

    (batch,) = taken
    assert batch == await b.load("b1")
    assert batch.status is BatchStatus.PROCESSING
    assert [(e.status, e.result) for e in batch.executions] == [
        (ExecutionStatus.SUCCEEDED, "kept"),
        (ExecutionStatus.RUNNING, None),
        (ExecutionStatus.PENDING, None),
    ]
    # a lost it: its renewal and its late writes are refused.
    assert (await a.renew(["b1"], 60.0)).held == frozenset()
    late = [ended("b1", 3, ExecutionStatus.SUCCEEDED, 2, result="late")]
    assert await a.apply(late) == frozenset({"b1"})
    assert await b.load("b1") == batch


async def test_renew_extends_the_leases_still_held_and_drops_the_rest(open_store, postgres_url):
    a = await open_store(replica="a")
    b = await open_store(replica="b")
    await created_and_held(a, a_batch("held"), a_batch("ends"))
    await b.create(a_batch("b's"))
    await b.claim(1, 60.0)
    await a.apply([BatchEnded("ends", BatchStatus.COMPLETED, "Done.", 3.0, None)])
    [(before,)] = await query(postgres_url, "SELECT lease_until FROM batches WHERE id = 'held'")

    renewal = await a.renew(["held", "ends", "b's", "missing"], 600.0)

    assert renewal.held == frozenset({"held"})
    assert renewal.cancels == {}
    [(after,)] = await query(postgres_url, "SELECT lease_until FROM batches WHERE id = 'held'")
    assert after > before + 500
    # An end lets the lease lapse and keeps its owner: only that replica ever wrote it.
    assert await query(
        postgres_url, "SELECT lease_owner, lease_until FROM batches WHERE id = 'ends'"
    ) == [(a.replica, None)]
    assert await a.renew([], 60.0) == type(renewal)(frozenset())


async def test_a_released_lease_is_claimable_at_once_and_no_longer_the_releasers(open_store):
    a = await open_store(replica="a")
    b = await open_store(replica="b")
    await created_and_held(a, a_batch("b1", rows=[ExecutionStatus.PENDING] * 2))
    await b.release(["b1"])  # not b's to give up
    assert await b.claim(1, 60.0) == []

    await a.release(["b1"])

    assert await a.waiting() == 1
    assert [batch.id for batch in await b.claim(1, 60.0)] == ["b1"]
    # a gave it up: what it writes now is refused, since b may be running it.
    assert await a.apply([ended("b1", 1, ExecutionStatus.SUCCEEDED, 1)]) == frozenset({"b1"})
    assert await b.apply([ended("b1", 1, ExecutionStatus.FAILED, 1)]) == frozenset()
    loaded = await b.load("b1")
    assert loaded is not None
    assert loaded.executions[0].status is ExecutionStatus.FAILED


async def test_a_cancel_request_reaches_the_holder_and_makes_a_free_batch_claimable(open_store):
    a = await open_store(replica="a")
    b = await open_store(replica="b")
    await created_and_held(a, a_batch("running"))
    await a.create(a_batch("queued", created_at=2.0))
    await a.create(a_batch("queued later", created_at=3.0))
    await a.create(a_batch("done", status=BatchStatus.COMPLETED, finished_at=2.0))

    assert await b.request_cancel("running", "Cancelled by request.")
    assert await b.request_cancel("running", "A second reason.")
    assert await b.request_cancel("queued later", "Stop it.")
    assert not await b.request_cancel("done", "Too late.")
    assert not await b.request_cancel("missing", "Never was.")

    renewal = await a.renew(["running"], 60.0)
    assert renewal.held == frozenset({"running"})
    assert renewal.cancels == {"running": "Cancelled by request."}  # the first reason
    # With no room for work, a replica still claims what it is asked to cancel.
    assert [batch.id for batch in await b.claim(0, 60.0)] == ["queued later"]
    assert await b.claim(0, 60.0) == []
    assert [batch.id for batch in await b.claim(5, 60.0)] == ["queued"]


async def test_waiting_counts_the_unfinished_batches_no_replica_holds(open_store):
    a = await open_store(replica="a")
    b = await open_store(replica="b")
    assert await a.waiting() == 0
    for n in range(4):
        await a.create(a_batch(f"q{n}", created_at=float(n)))
    await a.create(a_batch("done", status=BatchStatus.COMPLETED, finished_at=2.0))
    assert await b.waiting() == 4

    await a.claim(1, 60.0)
    (b_batch,) = await b.claim(1, 60.0)
    assert await b.waiting() == 2
    # b's last heartbeat: its lease then lapses by itself.
    await b.renew([b_batch.id], 0.2)
    await eventually(lambda: _equals(b.waiting(), 3), "b's lease lapsed")
    await a.apply([BatchEnded("q0", BatchStatus.COMPLETED, "Done.", 3.0, None)])
    assert await a.waiting() == 3  # a finished batch waits for nobody


async def _equals(value: Awaitable[int], expected: int) -> bool:
    return await value == expected


# Notices


class Heard:
    """What a store's listener was told, to wait on."""

    def __init__(self) -> None:
        self.notices: list[Notice] = []
        self._changed = asyncio.Event()

    def __call__(self, notice: Notice) -> None:
        self.notices.append(notice)
        self._changed.set()

    async def until(self, count: int) -> list[Notice]:
        """The notices once there are ``count`` of them; fail after ``_WAIT_S``."""
        async with asyncio.timeout(_WAIT_S):
            while True:
                self._changed.clear()
                if len(self.notices) >= count:
                    return self.notices
                await self._changed.wait()


async def test_a_listener_hears_queued_changed_and_cancel_from_another_replica(
    open_store, postgres_url
):
    a = await open_store(replica="a")
    b = await open_store(replica="b")
    heard = Heard()
    await a.listen(heard)

    assert a.channel == f"batchexec:{urlsplit(postgres_url).query.partition('=')[2]}"
    conn = await asyncpg.connect(postgres_url)
    await conn.execute("SELECT pg_notify($1, 'nonsense')", a.channel)  # ignored
    await conn.execute("SELECT pg_notify($1, 'unknown:b1')", a.channel)
    await conn.close()
    await b.create(a_batch("b1"))
    await b.claim(1, 60.0)
    await b.apply([BatchStarted("b1", 2.0)])
    await b.apply([BatchStarted("b1", 2.0), BatchStarted("b1", 2.0)])  # once a group
    assert await b.apply([BatchStarted("other", 2.0)]) == frozenset({"other"})  # not written
    await b.request_cancel("b1", "Cancelled by request.")

    assert await heard.until(4) == [
        Notice("queued", "b1"),
        Notice("changed", "b1"),
        Notice("changed", "b1"),
        Notice("cancel", "b1"),
    ]


async def test_a_listener_hears_only_its_own_schemas_notices(open_store, make_postgres_url):
    mine = await open_store(await make_postgres_url(), replica="a")
    elsewhere = await open_store(await make_postgres_url(), replica="b")
    heard = Heard()
    await mine.listen(heard)

    await elsewhere.create(a_batch("theirs"))
    await mine.create(a_batch("mine"))

    # Notices come in the order they were committed: theirs would have come first.
    assert await heard.until(1) == [Notice("queued", "mine")]
    assert mine.channel != elsewhere.channel


async def test_a_listener_that_fails_is_logged_and_hears_on(open_store, caplog):
    a = await open_store(replica="a")
    heard = Heard()

    def fragile(notice: Notice) -> None:
        heard(notice)
        if notice.batch_id == "first":
            raise RuntimeError("the engine tripped")

    await a.listen(fragile)
    await a.create(a_batch("first"))
    await a.create(a_batch("second"))

    assert [notice.batch_id for notice in await heard.until(2)] == ["first", "second"]
    assert "could not act on a queued notice" in caplog.text


# Lost connections


async def test_the_pool_makes_killed_connections_again(open_store, postgres_url):
    store = await open_store()
    await created_and_held(store, a_batch("b1", rows=[ExecutionStatus.PENDING] * 2))
    name = f"batchexec {store.replica}"

    assert await terminate(postgres_url, "application_name = $1", name) >= 1

    assert await store.apply([ended("b1", 1, ExecutionStatus.SUCCEEDED, 1)]) == frozenset()
    assert await terminate(postgres_url, "application_name = $1", name) >= 1
    loaded = await store.load("b1")
    assert loaded is not None
    assert loaded.executions[0].status is ExecutionStatus.SUCCEEDED


async def test_a_statement_cut_off_by_a_killed_backend_is_run_again(open_store, postgres_url):
    store = await open_store()
    pids: list[int] = []

    async def work(conn: Any) -> int:
        pids.append(conn.get_server_pid())
        if len(pids) == 1:
            await conn.execute("SELECT pg_sleep(60)")
        return int(await conn.fetchval("SELECT 41 + 1"))

    running = asyncio.create_task(store._run(work))

    async def sleeping() -> bool:
        return bool(pids) and bool(
            await query(
                postgres_url,
                "SELECT 1 FROM pg_stat_activity WHERE pid = $1 AND query LIKE '%pg_sleep%'",
                pids[0],
            )
        )

    await eventually(sleeping, "the statement runs")
    assert await terminate(postgres_url, "pid = $1", pids[0]) == 1

    assert await asyncio.wait_for(running, _WAIT_S) == 42
    assert len(pids) == 2
    assert pids[1] != pids[0]


async def test_a_killed_listener_connects_again_and_hears_later_notices(open_store, postgres_url):
    a = await open_store(replica="a")
    b = await open_store(replica="b")
    heard = Heard()
    await a.listen(heard)
    assert a._listener is not None
    first = a._listener.get_server_pid()

    assert await terminate(postgres_url, "pid = $1", first) == 1

    def listening_again() -> bool:
        return a._listener is not None and a._listener.get_server_pid() != first

    await eventually(listening_again, "the listener connected again")
    await b.create(a_batch("b1"))
    assert await heard.until(1) == [Notice("queued", "b1")]


class Proxy:
    """A TCP proxy to the test server that can be cut off: an outage, on demand."""

    def __init__(self, host: str, port: int) -> None:
        self._target = (host, port)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.up = True
        #: Connections refused while down.
        self.refused = 0

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    def cut(self) -> None:
        """Drop every connection, and refuse new ones until ``restore``."""
        self.up = False
        for writer in self._writers:
            writer.transport.abort()

    def restore(self) -> None:
        self.up = True

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.up:
            self.refused += 1
            writer.transport.abort()
            return
        upstream_reader, upstream_writer = await asyncio.open_connection(*self._target)
        self._writers |= {writer, upstream_writer}
        try:
            await asyncio.gather(_pipe(reader, upstream_writer), _pipe(upstream_reader, writer))
        finally:
            self._writers -= {writer, upstream_writer}
            writer.transport.abort()
            upstream_writer.transport.abort()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.transport.abort()


@pytest.fixture
async def proxy(postgres_url: str) -> AsyncIterator[tuple[Proxy, str]]:
    """A proxy to the test server, and the test's schema URL through it."""
    parts = urlsplit(postgres_url)
    server = Proxy(parts.hostname or "127.0.0.1", parts.port or 5432)
    port = await server.start()
    userinfo = parts.netloc.rpartition("@")[0]
    netloc = f"{userinfo}@127.0.0.1:{port}" if userinfo else f"127.0.0.1:{port}"
    yield server, parts._replace(netloc=netloc).geturl()
    await server.close()


async def test_an_outage_shorter_than_the_retry_time_is_ridden_out(open_store, proxy):
    server, url = proxy
    store = await open_store(url, retry_for_s=_WAIT_S)
    heard = Heard()
    await store.listen(heard)
    other = await open_store()  # straight to the server
    await store.create(a_batch("b1"))
    assert await heard.until(1) == [Notice("queued", "b1")]

    server.cut()
    loading = asyncio.create_task(store.load("b1"))
    await eventually(lambda: server.refused >= 2, "the store and its listener tried again")
    assert not loading.done()
    server.restore()

    assert await asyncio.wait_for(loading, _WAIT_S) == a_batch("b1")
    await eventually(lambda: store._listener is not None, "the listener connected again")
    await other.create(a_batch("b2"))
    assert (await heard.until(2))[1] == Notice("queued", "b2")


async def test_an_outage_longer_than_the_retry_time_is_a_store_error(open_store, proxy):
    server, url = proxy
    store = await open_store(url, retry_for_s=0.3)
    await store.create(a_batch("b1"))

    server.cut()
    started = time.monotonic()
    with pytest.raises(
        StoreError, match=r"cannot be reached at 127\.0\.0\.1:\d+ \(tried for 0.3 s\)"
    ):
        await store.load("b1")
    assert 0.3 <= time.monotonic() - started < 5
    assert server.refused >= 2  # tried again, with backoff, before giving up

    server.restore()
    assert await store.load("b1") == a_batch("b1")
