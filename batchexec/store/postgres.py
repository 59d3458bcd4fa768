"""``postgresql://...``: batches in a PostgreSQL database that several processes share.

Each process (a *replica*) keeps an ``asyncpg`` pool of ``pool_size``
connections and one more connection of its own that listens for notices.
Every method is one transaction, so a method that loses its connection (a
server restart, a failover, a killed backend) is simply run again, with
backoff, for up to ``retry_for_s`` before it fails with ``StoreError``;
any other database error (a constraint, a value out of range) fails at once.
``open`` is tried once: a ``DATABASE_URL`` that names no server says so at
start-up rather than after ``retry_for_s``.

**Leases.** An unfinished batch is run by the replica named in its
``lease_owner`` until ``lease_until`` (epoch seconds on the database's
clock, never a replica's). ``claim`` takes free leases with ``FOR UPDATE
SKIP LOCKED``, so replicas claiming at once never wait on each other nor
get the same batch; ``renew`` extends them. ``apply`` is *fenced*: in its
transaction it locks the group's batches whose owner is this replica and
writes only their changes, so a replica that lost a lease (a long pause,
a partition) can no longer change that batch. ``release`` clears the owner
as well as the time: once a replica has let a batch go, another may run it
at once, so the releaser's late writes must be refused too (flush before
releasing). A batch's end clears ``lease_until`` but keeps the owner: no
other replica ever writes a finished batch, and a retried group of its
owner still lands.

**Retried writes.** A commit whose answer was lost is retried like any
other: a row's end is final and a batch's start never reopens an ended
batch, so writing a group twice leaves what writing it once does; a retried
``create`` finds its batch already there.

**Notices.** ``create``, ``apply`` and ``request_cancel`` send ``NOTIFY
"batchexec:<schema>", 'kind:batch_id'`` inside their transaction
(delivered on commit); ``listen`` hears them on its own connection and
makes it again (with backoff) whenever it drops, until ``close``. The
channel names the schema because channels are the whole database's.

The schema is versioned by the table ``schema_migrations`` and the files in
``sql/postgresql``, applied under an advisory lock so replicas starting at
once migrate once; a database written by a newer batchexec is refused. The
statements, and how PostgreSQL keeps text, are in ``postgres_rows.py``; the
conversions between records and rows, the same for every SQL store, in
``rows.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import secrets
import socket
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Collection, Sequence
from typing import TYPE_CHECKING, Any, TypeVar, cast, get_args
from urllib.parse import parse_qs, quote, unquote

import asyncpg

from batchexec.records import Batch, BatchStatus, ExecutionStatus, Summary
from batchexec.shared_limits import SharedModelLimits, slots_channel
from batchexec.shared_tokens import SharedTokenLimits
from batchexec.store.base import (
    BatchEnded,
    BatchStarted,
    CachedAnswer,
    CallbackDue,
    CallbackState,
    Change,
    FileEntry,
    Notice,
    NoticeKind,
    OpenAIBatch,
    Renewal,
    SharedStore,
    StoredFile,
    StoreError,
)
from batchexec.store.migrations import migrations
from batchexec.store.postgres_rows import (
    ADD_FILE,
    CLAIM,
    CLAIM_CALLBACKS,
    CLAIM_FINALIZATIONS,
    COMPLETE_FILE,
    EXECUTION_COLUMNS,
    EXPIRE_BATCHES,
    EXPIRE_FILES,
    INSERT_BATCH,
    INSERT_CHUNK,
    INSERT_OPENAI_BATCH,
    INSERT_STORED_FILE,
    MARK_OVERDUE,
    NEXT_CALLBACK,
    NOTIFY,
    NOTIFY_CHANGED,
    OPENAI_CANCELLING,
    OPENAI_FINALIZED,
    RELEASE,
    RENEW,
    REQUEST_CANCEL,
    SCHEMA_MIGRATIONS,
    SELECT_BATCH,
    SELECT_BATCHES,
    SELECT_CHUNK,
    SELECT_EXECUTIONS,
    SELECT_HELD,
    SELECT_OPENAI_BATCH,
    SELECT_OPENAI_BATCHES,
    SELECT_OPENAI_BATCHES_BY_ID,
    SELECT_STORED_FILE,
    SELECT_STORED_FILES_ASC,
    SELECT_STORED_FILES_DESC,
    SELECT_SUMMARIES,
    SELECT_UNFINISHED,
    UPDATE_BATCH_ENDED,
    UPDATE_BATCH_STARTED,
    UPDATE_CALLBACK,
    UPDATE_ENDED,
    UPDATE_STARTED,
    WAITING,
    channel_of,
    columns_of,
    read_text,
    text,
)
from batchexec.store.rows import (
    batch_row,
    batches_of,
    callbacks_of,
    coalesced,
    counted,
    execution_rows,
    openai_batch_row,
    openai_batches_of,
    summaries_of,
)

log = logging.getLogger(__name__)

_T = TypeVar("_T")
if TYPE_CHECKING:  # generic only in the stubs
    from asyncpg.pool import PoolConnectionProxy

    Connection = PoolConnectionProxy[asyncpg.Record]

_DIALECT = "postgresql"
#: The first key of the advisory lock migrations take (the second is the schema's).
_MIGRATION_LOCK = 0x62617463  # "batc"
#: How long making a connection may take before it counts as failed.
_CONNECT_TIMEOUT_S = 10.0
#: How long ``close`` waits for queries in flight before cutting them off.
_CLOSE_TIMEOUT_S = 10.0
#: Backoff of a method retried after a lost connection: first wait, longest wait.
_RETRY_FIRST_S = 0.05
_RETRY_MAX_S = 2.0
#: Backoff of the listener's reconnection: first wait, longest wait.
_LISTEN_FIRST_S = 0.1
_LISTEN_MAX_S = 5.0
#: Rows past which records are converted on a thread, off the event loop.
_ROWS_INLINE = 2000
_KINDS: frozenset[str] = frozenset(get_args(NoticeKind))

#: Errors that say the connection or the server went away (or the transaction
#: lost a deadlock), not that the statement was wrong: the method is run again.
_LOST = (
    OSError,  # refused, reset, timed out (TimeoutError is one)
    asyncpg.PostgresConnectionError,  # SQLSTATE class 08, a closed connection among them
    asyncpg.exceptions.CannotConnectNowError,  # starting up or shutting down
    asyncpg.exceptions.AdminShutdownError,  # pg_terminate_backend, a fast shutdown
    asyncpg.exceptions.CrashShutdownError,
    asyncpg.exceptions.TooManyConnectionsError,
    asyncpg.exceptions.TransactionRollbackError,  # deadlock, serialization failure
    # What a query gets on a connection whose server has just ended it, before the
    # driver has read the end ("cannot switch to state 15; another operation (2) is in
    # progress"): seen during a fast shutdown, when the connection is not closed yet.
    asyncpg.exceptions.InternalClientError,
)
#: Every other error the database or the driver reports: a ``StoreError`` at once.
_DATABASE_ERRORS = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.InternalClientError,
)


class _Lost(Exception):
    """A try lost its connection (the error is its cause): try again."""


class PostgresStore(SharedStore):
    """Batches in the PostgreSQL database ``url`` names, shared with other replicas."""

    durable = True
    shared = True

    def __init__(
        self,
        url: str,
        *,
        replica: str,
        pool_size: int = 10,
        setting: str = "DATABASE_URL",
        retry_for_s: float = 30.0,
    ) -> None:
        """``setting`` is what errors name as the source of ``url``; ``replica`` names
        this process in leases (one of its own if empty: two processes of one name
        would write each other's batches); a lost connection is retried for
        ``retry_for_s``."""
        super().__init__(replica or f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}")
        replica = self.replica
        self._url = url
        self._pool_size = pool_size
        self._setting = setting
        self._retry_for_s = retry_for_s
        self._address = _address(url)
        self._password = _password(url)
        self._server_settings: dict[str, str] = {}
        if "application_name" not in _query(url):
            # So that pg_stat_activity tells the replicas apart.
            self._server_settings["application_name"] = f"batchexec {replica}".strip()[:63]
        #: The NOTIFY channel of this schema's notices (see ``channel_of``), once open.
        self.channel = ""
        self._pool: asyncpg.Pool[asyncpg.Record] | None = None
        self._closed = False
        self._listener: asyncpg.Connection[asyncpg.Record] | None = None
        self._on_notice: Callable[[Notice], None] | None = None
        self._reconnecting: asyncio.Task[None] | None = None

    # Opening and closing

    async def open(self) -> None:
        self._closed = False
        try:
            self._pool = await asyncpg.create_pool(
                self._url,
                min_size=1,
                max_size=self._pool_size,
                timeout=_CONNECT_TIMEOUT_S,
                server_settings=self._server_settings,
            )
        except (*_DATABASE_ERRORS, OSError, ValueError) as exc:
            raise StoreError(
                f"{self._setting}: cannot connect to PostgreSQL at {self._address}: "
                f"{self._reason(exc)}"
            ) from (None if isinstance(exc, ValueError) else exc)
        try:
            async with self._pool.acquire() as conn:
                self._secret = await self._migrate(conn)
        except StoreError:
            await self.close()
            raise
        except (*_DATABASE_ERRORS, OSError) as exc:
            await self.close()
            raise StoreError(
                f"{self._setting}: cannot prepare the PostgreSQL database at {self._address}: "
                f"{self._reason(exc)}"
            ) from exc

    async def _migrate(self, conn: Connection) -> bytes:
        """Bring the schema to the latest version, all at once or not at all; the secret."""
        known = migrations(_DIALECT)
        async with conn.transaction():
            # Replicas starting at once take turns; the lock goes with the transaction.
            await conn.execute(
                "SELECT pg_advisory_xact_lock($1, hashtext(coalesce(current_schema(), '')))",
                _MIGRATION_LOCK,
            )
            await conn.execute(SCHEMA_MIGRATIONS)
            version = await conn.fetchval("SELECT coalesce(max(version), 0) FROM schema_migrations")
            if version > len(known):
                raise StoreError(
                    f"{self._setting}: the PostgreSQL database at {self._address} was written "
                    f"by a newer batchexec (schema {version}; this one knows up to "
                    f"{len(known)}); upgrade batchexec"
                )
            for migration in known[version:]:
                await conn.execute(migration.sql)
                if migration.version == 1:
                    await conn.execute(
                        "INSERT INTO meta (key, value) VALUES ('secret', $1)",
                        secrets.token_bytes(32),
                    )
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                    migration.version,
                    migration.name,
                )
            secret = await conn.fetchval("SELECT value FROM meta WHERE key = 'secret'")
            self.channel = channel_of(await conn.fetchval("SELECT current_schema()"))
        if secret is None:
            raise StoreError(
                f"{self._setting}: the PostgreSQL database at {self._address} has no secret; "
                "is it batchexec's?"
            )
        return bytes(secret)

    def token_limits(self, *, window_s: float, hold_s: float) -> SharedTokenLimits:
        if self._pool is None:
            raise StoreError("The PostgreSQL store is not open.")
        return SharedTokenLimits(
            self._pool, window_s=window_s, hold_s=hold_s, namespace=self.channel
        )

    def call_limits(self, *, hold_s: float) -> SharedModelLimits:
        if self._pool is None:
            raise StoreError("The PostgreSQL store is not open.")
        return SharedModelLimits(
            self._pool, holder=self.replica, hold_s=hold_s, channel=slots_channel(self.channel)
        )

    async def close(self) -> None:
        self._closed = True
        if self._reconnecting is not None:
            self._reconnecting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reconnecting
            self._reconnecting = None
        if self._listener is not None:
            listener, self._listener = self._listener, None
            await _close_connection(listener)
        if self._pool is not None:
            pool, self._pool = self._pool, None
            try:
                await asyncio.wait_for(pool.close(), _CLOSE_TIMEOUT_S)
            except (TimeoutError, *_DATABASE_ERRORS, OSError):
                pool.terminate()

    # Running a method's transaction

    async def _run(self, work: Callable[[Connection], Awaitable[_T]]) -> _T:
        """``work`` on a connection of the pool, run again while connections are lost."""
        return await self._retrying(lambda: self._try(work))

    async def _try(self, work: Callable[[Connection], Awaitable[_T]]) -> _T:
        if self._pool is None or self._closed:
            raise StoreError("The PostgreSQL store is not open.")
        async with self._pool.acquire() as conn:
            try:
                return await work(conn)
            except _LOST:
                raise
            except _DATABASE_ERRORS as exc:
                # Whatever the driver calls it, an error that closed the connection lost it.
                if _is_closed(conn):
                    raise _Lost() from exc
                raise

    async def _retrying(self, attempt: Callable[[], Awaitable[_T]]) -> _T:
        """``attempt()``, again with backoff while it loses its connection, for ``retry_for_s``."""
        loop = asyncio.get_running_loop()
        deadline: float | None = None
        wait_s = _RETRY_FIRST_S
        while True:
            try:
                return await attempt()
            except (_Lost, *_LOST) as exc:
                error: BaseException = (exc.__cause__ or exc) if isinstance(exc, _Lost) else exc
            except _DATABASE_ERRORS as exc:
                raise StoreError(
                    f"The PostgreSQL store cannot be used: {self._reason(exc)}"
                ) from exc
            now = loop.time()
            if deadline is None:
                deadline = now + self._retry_for_s
                log.warning(
                    "a PostgreSQL transaction did not complete (%s); trying again for up to %g s",
                    self._reason(error),
                    self._retry_for_s,
                )
            if now >= deadline or self._closed:
                raise StoreError(
                    f"The PostgreSQL store cannot be reached at {self._address} "
                    f"(tried for {self._retry_for_s:g} s): {self._reason(error)}"
                ) from error
            await asyncio.sleep(min(wait_s, deadline - now))
            wait_s = min(wait_s * 2, _RETRY_MAX_S)

    def _reason(self, error: BaseException) -> str:
        """``error`` in a line of reasonable length, with no password in it."""
        reason = str(error) or type(error).__name__
        if self._password:
            reason = reason.replace(self._password, "***")
            reason = reason.replace(quote(self._password, safe=""), "***")
        reason = " ".join(reason.split())
        # A value the driver refuses is quoted whole: the arrays of a group can be long.
        return reason if len(reason) <= 500 else f"{reason[:300]} … {reason[-150:]}"

    # Writing

    async def create(self, batch: Batch) -> None:
        row = batch_row(batch, text)
        # The generator runs where the list is made: off the loop for a large batch.
        records: list[tuple[Any, ...]] = await _off_loop(
            len(batch.executions), list, execution_rows(batch, text)
        )
        tried = False

        async def write(conn: Connection) -> None:
            nonlocal tried
            retried, tried = tried, True
            async with conn.transaction():
                if retried and await conn.fetchval(
                    "SELECT true FROM batches WHERE id = $1", batch.id
                ):
                    return  # the try whose answer was lost wrote it
                await conn.execute(INSERT_BATCH, *row)
                if records:
                    await conn.copy_records_to_table(
                        "executions", records=records, columns=EXECUTION_COLUMNS
                    )
                if not batch.status.finished:
                    await conn.execute(NOTIFY, self.channel, f"queued:{batch.id}")

        await self._run(write)

    async def apply(self, changes: Sequence[Change]) -> frozenset[str]:
        if not changes:
            return frozenset()
        started, ended, batch_changes = await _off_loop(len(changes), coalesced, changes, text)
        touched = list(dict.fromkeys(change.batch_id for change in changes))
        started_columns, ended_columns = columns_of(started), columns_of(ended)

        async def write(conn: Connection) -> frozenset[str]:
            async with conn.transaction():
                held = {row[0] for row in await conn.fetch(SELECT_HELD, touched, self.replica)}
                lost = frozenset(touched) - held
                starts, ends = started_columns, ended_columns
                if lost:
                    starts = columns_of(row for row in started if row[-2] in held)
                    ends = columns_of(row for row in ended if row[-2] in held)
                if starts:
                    await conn.execute(UPDATE_STARTED, *starts)
                if ends:
                    await conn.execute(UPDATE_ENDED, *ends)
                for change in batch_changes:
                    if change.batch_id in held:
                        await _apply_batch_change(conn, change)
                if held:
                    await conn.execute(NOTIFY_CHANGED, sorted(held), self.channel)
            return lost

        return await self._run(write)

    async def delete(self, batch_id: str) -> None:
        await self._run(lambda conn: conn.execute("DELETE FROM batches WHERE id = $1", batch_id))

    # Reading

    async def load(self, batch_id: str) -> Batch | None:
        found = await self._batches(SELECT_BATCH, batch_id)
        return found[0] if found else None

    async def unfinished(self) -> list[Batch]:
        return await self._batches(SELECT_UNFINISHED)

    async def _batches(self, query: str, *args: Any) -> list[Batch]:
        async def read(conn: Connection) -> tuple[list[asyncpg.Record], list[asyncpg.Record]]:
            # One snapshot for the batches and their rows.
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                return await _fetch_batches(conn, query, *args)

        return await _batches_of(*await self._run(read))

    async def summaries(
        self, owner: str, *, status: BatchStatus | None, limit: int
    ) -> list[Summary]:
        value = None if status is None else status.value
        rows = await self._run(lambda conn: conn.fetch(SELECT_SUMMARIES, owner, value, limit))
        return summaries_of(rows, read_text)

    async def counts(self, batch_id: str) -> Counter[ExecutionStatus]:
        rows = await self._run(
            lambda conn: conn.fetch(
                "SELECT status, count(*) FROM executions WHERE batch_id = $1 GROUP BY status",
                batch_id,
            )
        )
        return counted(rows)

    # Files

    async def add_file(self, entry: FileEntry) -> None:
        await self._run(
            lambda conn: conn.execute(
                ADD_FILE, entry.name, entry.owner, entry.written_at, entry.batch_id, entry.template
            )
        )

    async def file(self, name: str) -> FileEntry | None:
        row = await self._run(
            lambda conn: conn.fetchrow(
                "SELECT name, owner, written_at, batch_id, template FROM files WHERE name = $1",
                name,
            )
        )
        if row is None:
            return None
        return FileEntry(row[0], row[1], row[2], row[3], row[4])

    async def forget_file(self, name: str) -> None:
        await self._run(lambda conn: conn.execute("DELETE FROM files WHERE name = $1", name))

    async def templates_of(self, owner: str) -> list[float]:
        rows = await self._run(
            lambda conn: conn.fetch(
                "SELECT written_at FROM files WHERE owner = $1 AND template ORDER BY written_at",
                owner,
            )
        )
        return [row[0] for row in rows]

    async def expire(self, older_than: float) -> list[str]:
        async def write(conn: Connection) -> list[str]:
            async with conn.transaction():
                await conn.execute(EXPIRE_BATCHES, older_than)
                await conn.execute("DELETE FROM openai_files WHERE created_at < $1", older_than)
                await conn.execute("DELETE FROM answer_cache WHERE expires_at <= $1", time.time())
                await conn.execute(
                    "DELETE FROM openai_batches WHERE created_at < $1 AND NOT EXISTS "
                    "(SELECT 1 FROM batches WHERE batches.id = openai_batches.id)",
                    older_than,
                )
                # Each name once, even with every replica's sweeper at it: a row is
                # deleted by one transaction only.
                return [row[0] for row in await conn.fetch(EXPIRE_FILES, older_than)]

        return await self._run(write)

    # The answer cache

    async def cached_answer(self, owner: str, key: str, now: float) -> CachedAnswer | None:
        row = await self._run(
            lambda conn: conn.fetchrow(
                "SELECT result, prompt_tokens, completion_tokens FROM answer_cache "
                "WHERE owner = $1 AND key = $2 AND expires_at > $3",
                owner,
                key,
                now,
            )
        )
        return None if row is None else CachedAnswer(read_text(row[0]) or "", row[1], row[2])

    async def cache_answer(
        self, owner: str, key: str, answer: CachedAnswer, expires_at: float
    ) -> None:
        args = (owner, key, text(answer.result), answer.prompt_tokens, answer.completion_tokens)
        await self._run(
            lambda conn: conn.execute(
                "INSERT INTO answer_cache (owner, key, result, prompt_tokens, completion_tokens, "
                "expires_at) VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (owner, key) DO UPDATE "
                "SET result = $3, prompt_tokens = $4, completion_tokens = $5, expires_at = $6",
                *args,
                expires_at,
            )
        )

    # Files of the OpenAI Batch API

    async def create_stored_file(self, file: StoredFile) -> None:
        args = (file.id, file.owner, file.purpose, file.filename, file.created_at)
        await self._run(lambda conn: conn.execute(INSERT_STORED_FILE, *args))

    async def write_chunk(self, file_id: str, seq: int, data: bytes) -> None:
        await self._run(lambda conn: conn.execute(INSERT_CHUNK, file_id, seq, data))

    async def complete_file(self, file_id: str, size: int) -> None:
        await self._run(lambda conn: conn.execute(COMPLETE_FILE, file_id, size))

    async def stored_file(self, file_id: str, owner: str) -> StoredFile | None:
        row = await self._run(lambda conn: conn.fetchrow(SELECT_STORED_FILE, file_id, owner))
        return None if row is None else StoredFile(*row)

    async def stored_files(
        self, owner: str, *, purpose: str | None, after: str | None, limit: int, newest_first: bool
    ) -> list[StoredFile]:
        query = SELECT_STORED_FILES_DESC if newest_first else SELECT_STORED_FILES_ASC
        rows = await self._run(lambda conn: conn.fetch(query, owner, purpose, after, limit))
        return [StoredFile(*row) for row in rows]

    async def chunk(self, file_id: str, seq: int) -> bytes | None:
        data = await self._run(lambda conn: conn.fetchval(SELECT_CHUNK, file_id, seq))
        return None if data is None else bytes(data)

    async def delete_stored_file(self, file_id: str) -> None:
        await self._run(
            lambda conn: conn.execute("DELETE FROM openai_files WHERE id = $1", file_id)
        )

    async def count_stored_files(self, owner: str) -> int:
        count = await self._run(
            lambda conn: conn.fetchval("SELECT count(*) FROM openai_files WHERE owner = $1", owner)
        )
        return int(count)

    # Batches of the OpenAI Batch API

    async def create_openai_batch(self, batch: OpenAIBatch) -> None:
        row = openai_batch_row(batch)
        await self._run(lambda conn: conn.execute(INSERT_OPENAI_BATCH, *row))

    async def openai_batch(self, batch_id: str, owner: str) -> OpenAIBatch | None:
        rows = await self._run(lambda conn: conn.fetch(SELECT_OPENAI_BATCH, batch_id, owner))
        found = openai_batches_of(rows)
        return found[0] if found else None

    async def openai_batches(
        self, owner: str, *, after: str | None, limit: int
    ) -> list[OpenAIBatch]:
        rows = await self._run(lambda conn: conn.fetch(SELECT_OPENAI_BATCHES, owner, after, limit))
        return openai_batches_of(rows)

    async def openai_cancelling(self, batch_id: str, at: float) -> None:
        await self._run(lambda conn: conn.execute(OPENAI_CANCELLING, batch_id, at))

    async def overdue_openai_batches(self) -> list[str]:
        rows = await self._run(lambda conn: conn.fetch(MARK_OVERDUE))
        return [row[0] for row in rows]

    async def due_finalizations(self, limit: int, hold_s: float) -> list[OpenAIBatch]:
        async def write(conn: Connection) -> list[asyncpg.Record]:
            async with conn.transaction():
                ids = [row[0] for row in await conn.fetch(CLAIM_FINALIZATIONS, limit, hold_s)]
            if not ids:
                return []
            return await conn.fetch(SELECT_OPENAI_BATCHES_BY_ID, ids)

        return openai_batches_of(await self._run(write))

    async def openai_finalized(
        self, batch_id: str, output_file_id: str | None, error_file_id: str | None, at: float
    ) -> bool:
        found = await self._run(
            lambda conn: conn.fetchval(
                OPENAI_FINALIZED, batch_id, output_file_id, error_file_id, at
            )
        )
        return found is not None

    async def delete_openai_batch(self, batch_id: str) -> None:
        await self._run(
            lambda conn: conn.execute("DELETE FROM openai_batches WHERE id = $1", batch_id)
        )

    # Completion webhooks

    async def due_callbacks(self, limit: int, hold_s: float) -> list[CallbackDue]:
        rows = await self._run(lambda conn: conn.fetch(CLAIM_CALLBACKS, limit, hold_s))
        return callbacks_of(rows, read_text)

    async def callback_tried(
        self, batch_id: str, attempts: int, state: CallbackState, retry_in_s: float = 0.0
    ) -> None:
        await self._run(
            lambda conn: conn.execute(UPDATE_CALLBACK, batch_id, attempts, state, retry_in_s)
        )

    async def next_callback_in(self) -> float | None:
        value = await self._run(lambda conn: conn.fetchval(NEXT_CALLBACK))
        return None if value is None else float(value)

    # Leases

    async def claim(self, limit: int, lease_s: float) -> list[Batch]:
        async def write(conn: Connection) -> tuple[list[asyncpg.Record], list[asyncpg.Record]]:
            async with conn.transaction():
                rows = await conn.fetch(CLAIM, self.replica, max(limit, 0), lease_s)
                if not rows:
                    return [], []
                return await _fetch_batches(conn, SELECT_BATCHES, [row[0] for row in rows])

        return await _batches_of(*await self._run(write))

    async def renew(self, batch_ids: Collection[str], lease_s: float) -> Renewal:
        if not batch_ids:
            return Renewal(frozenset())
        rows = await self._run(
            lambda conn: conn.fetch(RENEW, list(batch_ids), self.replica, lease_s)
        )
        return Renewal(
            held=frozenset(row[0] for row in rows),
            cancels={row[0]: read_text(row[1]) or "" for row in rows if row[1] is not None},
        )

    async def release(self, batch_ids: Collection[str]) -> None:
        """Give up this replica's leases of ``batch_ids``, and its right to write them.

        The owner is cleared with the time, so ``apply`` refuses this
        replica's changes to them from now on: another replica may be running
        them already. Flush what should be written first.
        """
        if batch_ids:
            await self._run(lambda conn: conn.execute(RELEASE, list(batch_ids), self.replica))

    async def request_cancel(self, batch_id: str, reason: str) -> bool:
        async def write(conn: Connection) -> bool:
            async with conn.transaction():
                if await conn.fetchval(REQUEST_CANCEL, batch_id, text(reason)) is None:
                    return False
                await conn.execute(NOTIFY, self.channel, f"cancel:{batch_id}")
                return True

        return await self._run(write)

    async def waiting(self) -> int:
        count = await self._run(lambda conn: conn.fetchval(WAITING))
        return int(count)

    # Notices

    async def listen(self, on_notice: Callable[[Notice], None]) -> None:
        if self._pool is None or self._closed:
            raise StoreError("The PostgreSQL store is not open.")
        self._on_notice = on_notice
        if self._listener is None and self._reconnecting is None:
            self._listener = await self._retrying(self._connect_listener)

    async def _connect_listener(self) -> asyncpg.Connection[asyncpg.Record]:
        listener: asyncpg.Connection[asyncpg.Record] = await asyncpg.connect(
            self._url, timeout=_CONNECT_TIMEOUT_S, server_settings=self._server_settings
        )
        try:
            await listener.add_listener(self.channel, self._notified)
        except BaseException:
            listener.terminate()
            raise
        listener.add_termination_listener(self._listener_lost)
        return listener

    def _notified(self, _: object, pid: int, channel: str, payload: object) -> None:
        kind, _colon, batch_id = str(payload).partition(":")
        if kind not in _KINDS or not batch_id or self._on_notice is None:
            log.warning("ignored a notice on %s: %r", channel, payload)
            return
        try:
            self._on_notice(Notice(cast(NoticeKind, kind), batch_id))
        except Exception:
            log.exception("batch %s: could not act on a %s notice", batch_id, kind)

    def _listener_lost(self, listener: object) -> None:
        if self._closed or listener is not self._listener:
            return  # closed on purpose
        log.warning("lost the PostgreSQL connection that listens for notices; reconnecting")
        self._listener = None
        self._reconnecting = asyncio.get_running_loop().create_task(
            self._reconnect(), name="postgres-listener"
        )

    async def _reconnect(self) -> None:
        """Make the listening connection again, with backoff, until it is made or closed."""
        wait_s = _LISTEN_FIRST_S
        while not self._closed:
            try:
                listener = await self._connect_listener()
            except Exception as exc:
                log.warning(
                    "cannot listen for notices yet (%s); trying again in %g s",
                    self._reason(exc),
                    wait_s,
                )
                await asyncio.sleep(wait_s)
                wait_s = min(wait_s * 2, _LISTEN_MAX_S)
                continue
            if self._closed:
                await _close_connection(listener)
                return
            self._listener = listener
            self._reconnecting = None
            log.info("listening for notices again")
            return


async def _apply_batch_change(conn: Connection, change: Change) -> None:
    match change:
        case BatchStarted(batch_id, started_at):
            await conn.execute(
                UPDATE_BATCH_STARTED, batch_id, "Batch execution in progress.", started_at
            )
        case BatchEnded(batch_id, status, message, finished_at, xlsx_name):
            await conn.execute(
                UPDATE_BATCH_ENDED, batch_id, status.value, text(message), finished_at, xlsx_name
            )


async def _fetch_batches(
    conn: Connection, query: str, *args: Any
) -> tuple[list[asyncpg.Record], list[asyncpg.Record]]:
    """The rows of the batches ``query`` selects, and of their executions."""
    batch_rows = await conn.fetch(query, *args)
    if not batch_rows:
        return [], []
    return batch_rows, await conn.fetch(SELECT_EXECUTIONS, [row[0] for row in batch_rows])


async def _batches_of(
    batch_rows: list[asyncpg.Record], executions: list[asyncpg.Record]
) -> list[Batch]:
    return await _off_loop(len(executions), batches_of, batch_rows, executions, read_text)


async def _off_loop(size: int, work: Callable[..., _T], *args: Any) -> _T:
    """``work(*args)``, on a thread when ``size`` (its rows) would hold up the event loop."""
    if size <= _ROWS_INLINE:
        return work(*args)
    return await asyncio.to_thread(work, *args)


def _is_closed(conn: Connection) -> bool:
    try:
        return conn.is_closed()
    except asyncpg.InterfaceError:
        return True  # the pool took it back: its connection went away


async def _close_connection(connection: asyncpg.Connection[asyncpg.Record]) -> None:
    try:
        await connection.close(timeout=_CLOSE_TIMEOUT_S)
    except (*_DATABASE_ERRORS, OSError):
        connection.terminate()


def _address(url: str) -> str:
    """Where ``url`` points, as ``host:port``: never its user or password."""
    hosts = url.partition("://")[2].partition("/")[0].partition("?")[0].rpartition("@")[2]
    if not hosts:
        hosts = (_query(url).get("host") or ["localhost"])[0]
    if not re.search(r":\d+$", hosts) and not hosts.startswith("/"):
        hosts += ":5432"
    return hosts


def _password(url: str) -> str | None:
    """The password in ``url``, if any, to keep it out of messages."""
    userinfo, at, _ = url.partition("://")[2].partition("/")[0].rpartition("@")
    password = userinfo.partition(":")[2] if at else ""
    return unquote(password) if password else None


def _query(url: str) -> dict[str, list[str]]:
    return parse_qs(url.partition("?")[2])
