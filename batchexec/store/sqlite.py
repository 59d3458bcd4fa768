"""``sqlite:///PATH``: one process's batches in a SQLite file, durable across restarts.

The standard library's ``sqlite3`` on two threads of its own, each with its
connection: every write runs on the writer's, so there is a single writer
and no lock is ever contended inside the process; reads run on the reader's,
so a client listing its batches never delays a commit (WAL lets a reader and
the writer work at once, the reader seeing the last commit). The registry
hands ``apply`` whole groups of changes, each written in one transaction,
which is what keeps the hot path fast (a commit per group, not per row). A
batch's rows are JSON documents, its input in parts and its rows' changes
appended (``sqlite_documents.py``). The statements, and how SQLite keeps
text, are in ``sqlite_rows.py``; the conversions between records and rows,
the same for every SQL store, in ``rows.py``.

The database runs in WAL mode with ``synchronous=NORMAL``: a commit survives
the process being killed at any moment (``kill -9``, the OOM killer); after a
power cut the last commits before it may be lost. The schema is versioned by
``PRAGMA user_version`` and the files in ``sql/sqlite``; a database written
by a newer batchexec is refused.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import secrets
import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from batchexec.records import Batch, BatchStatus, ExecutionStatus, Summary
from batchexec.store.base import (
    BatchEnded,
    BatchStore,
    CachedAnswer,
    CallbackDue,
    CallbackState,
    Change,
    FileEntry,
    OpenAIBatch,
    StoredFile,
    StoreError,
)
from batchexec.store.migrations import latest, migrations
from batchexec.store.rows import (
    batch_row,
    batches_with,
    callbacks_of,
    counted,
    openai_batch_row,
    openai_batches_of,
    summaries_of,
)
from batchexec.store.sqlite_documents import (
    INSERT_CHANGES,
    INSERT_INPUTS,
    Tally,
    counts_and_cost,
    entries,
    input_parts,
    row_changes_of,
)
from batchexec.store.sqlite_documents import executions as documented_executions
from batchexec.store.sqlite_rows import (
    CLAIM_CALLBACKS,
    CLAIM_FINALIZATIONS,
    COMPLETE_FILE,
    INSERT_BATCH,
    INSERT_CHUNK,
    INSERT_OPENAI_BATCH,
    INSERT_STORED_FILE,
    MARK_OVERDUE,
    NEXT_CALLBACK,
    OPENAI_CANCELLING,
    OPENAI_FINALIZED,
    SELECT_BATCH,
    SELECT_CHUNK,
    SELECT_FILE_CURSOR,
    SELECT_OPENAI_BATCH,
    SELECT_OPENAI_BATCHES,
    SELECT_OPENAI_BATCHES_BY_ID,
    SELECT_STORED_FILE,
    SELECT_STORED_FILES_ASC,
    SELECT_STORED_FILES_DESC,
    SELECT_SUMMARIES,
    SELECT_UNFINISHED,
    UPDATE_CALLBACK,
    apply_batch_change,
    read_text,
    text,
)

log = logging.getLogger(__name__)

_T = TypeVar("_T")
_DIALECT = "sqlite"
#: How long a query waits for another process's lock before it fails.
_BUSY_TIMEOUT_MS = 5000
#: Groups of at most this many rows' changes are committed on the loop's thread (``apply``).
_INLINE_CHANGES = 500
#: A checkpoint of the WAL, on a thread of its own, every this many groups committed.
_CHECKPOINT_EVERY = 100


class SQLiteStore(BatchStore):
    """Batches in the SQLite database at ``path``."""

    durable = True

    def __init__(self, path: Path, *, setting: str = "DATABASE_URL") -> None:
        """``setting`` is what errors name as the source of ``path``."""
        super().__init__()
        self.path = path
        self._setting = setting
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="sqlite")
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="sqlite-read")
        #: Checkpoints have a connection and a thread of their own: a read never waits for
        #: one to sync the file.
        self._checkpointer = ThreadPoolExecutor(1, thread_name_prefix="sqlite-checkpoint")
        self._checkpoint_db: sqlite3.Connection | None = None
        self._db: sqlite3.Connection | None = None
        self._read_db: sqlite3.Connection | None = None
        self._lock: BinaryIO | None = None
        #: Writes on the writer's thread not yet done (changed on the loop's thread only).
        self._in_thread = 0
        #: Groups committed, on either thread: every ``_CHECKPOINT_EVERY``, a checkpoint.
        self._commits = 0
        self._checkpointing: asyncio.Future[None] | None = None
        #: The rows of the batches this process made and has not ended, by status, kept
        #: as their changes are written (used on whichever thread writes, one at a time).
        self._tallies: dict[str, Tally] = {}

    async def _run(self, work: Callable[[sqlite3.Connection], _T]) -> _T:
        """Run ``work`` on the writer's thread; every SQLite error is a ``StoreError``."""
        self._in_thread += 1
        try:
            return await self._on(self._thread, lambda: self._db, work)
        finally:
            self._in_thread -= 1

    async def _read(self, work: Callable[[sqlite3.Connection], _T]) -> _T:
        """Run ``work``, which only reads, on the reader's thread."""
        return await self._on(self._reader, lambda: self._read_db, work)

    async def _on(
        self,
        thread: ThreadPoolExecutor,
        connection: Callable[[], sqlite3.Connection | None],
        work: Callable[[sqlite3.Connection], _T],
    ) -> _T:
        def in_thread() -> _T:
            db = connection()
            if db is None:
                raise StoreError("The SQLite store is not open.")
            try:
                return work(db)
            except (sqlite3.Error, OverflowError) as exc:
                # OverflowError: an integer past SQLite's 64 bits (a provider's usage count).
                raise StoreError(f"The SQLite store cannot be used: {exc}") from exc

        if connection() is None:
            raise StoreError("The SQLite store is not open.")
        return await asyncio.get_running_loop().run_in_executor(thread, in_thread)

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            self._db, self._secret = await loop.run_in_executor(self._thread, self._open)
            self._read_db = await loop.run_in_executor(self._reader, self._open_reader)
            self._checkpoint_db = await loop.run_in_executor(self._checkpointer, self._open_reader)
        except sqlite3.Error as exc:
            await self.close()
            raise StoreError(
                f"{self._setting}: cannot use the SQLite file {self.path}: {exc}"
            ) from exc

    def _open_reader(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=True)
        try:
            db.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
            db.execute("PRAGMA query_only = ON")
        except BaseException:
            db.close()
            raise
        return db

    def _open(self) -> tuple[sqlite3.Connection, bytes]:
        if self.path.parent != Path() and not self.path.parent.is_dir():
            raise StoreError(f"{self._setting}: the folder {self.path.parent} does not exist")
        self._lock = self._claim()
        try:
            # Used from the loop's thread too, only while the writer's thread is idle
            # (``apply``): never by two threads at once.
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        except BaseException:
            self._lock.close()
            self._lock = None
            raise
        try:
            db.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
            version = db.execute("PRAGMA user_version").fetchone()[0]
            newest = latest(_DIALECT)
            if version > newest:
                raise StoreError(
                    f"{self._setting}: {self.path} was written by a newer batchexec (schema "
                    f"{version}; this one knows up to {newest}); upgrade batchexec"
                )
            if db.execute("PRAGMA journal_mode = WAL").fetchone()[0].lower() != "wal":
                raise StoreError(f"{self._setting}: {self.path} cannot use WAL mode")
            db.execute("PRAGMA synchronous = NORMAL")
            db.execute("PRAGMA foreign_keys = ON")
            # Checkpoints, which sync the file, run on a thread of their own (``apply``),
            # never in a commit made on the loop's.
            db.execute("PRAGMA wal_autocheckpoint = 0")
            for migration in migrations(_DIALECT)[version:]:
                # One transaction a version: a failed migration leaves the previous one.
                db.execute("BEGIN IMMEDIATE")
                try:
                    for statement in _statements(migration.sql):
                        db.execute(statement)
                    if migration.version == 1:
                        db.execute(
                            "INSERT INTO meta (key, value) VALUES ('secret', ?)",
                            (secrets.token_bytes(32),),
                        )
                    db.execute(f"PRAGMA user_version = {migration.version}")
                    db.execute("COMMIT")
                except BaseException:
                    db.execute("ROLLBACK")
                    raise
            row = db.execute("SELECT value FROM meta WHERE key = 'secret'").fetchone()
            if row is None:
                raise StoreError(f"{self._setting}: {self.path} has no secret; is it batchexec's?")
            return db, bytes(row[0])
        except BaseException:
            db.close()
            if self._lock is not None:
                self._lock.close()
                self._lock = None
            raise

    async def close(self) -> None:
        if self._checkpointing is not None:
            await asyncio.gather(self._checkpointing, return_exceptions=True)
        if self._checkpoint_db is not None:
            await self._on(self._checkpointer, lambda: self._checkpoint_db, lambda db: db.close())
            self._checkpoint_db = None
        if self._read_db is not None:
            await self._read(lambda db: db.close())
            self._read_db = None
        if self._db is not None:
            await self._run(lambda db: db.close())
            self._db = None
        self._reader.shutdown(wait=True)
        self._checkpointer.shutdown(wait=True)
        self._thread.shutdown(wait=True)
        if self._lock is not None:
            self._lock.close()  # and with it the claim
            self._lock = None

    def _claim(self) -> BinaryIO:
        """Hold ``PATH.lock`` for as long as the store is open: one process a file.

        Two processes on one file would both resume its unfinished batches and
        send their rows twice; the second is refused at once instead. The
        claim is an advisory lock the kernel drops when the process dies.
        """
        lock_path = self.path.with_name(self.path.name + ".lock")
        try:
            lock = lock_path.open("ab")
        except OSError as exc:
            raise StoreError(f"{self._setting}: cannot create {lock_path}: {exc.strerror}") from exc
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.close()
            raise StoreError(
                f"{self._setting}: {self.path} is in use by another batchexec process; "
                "a SQLite store serves one process"
            ) from None
        return lock

    async def create(self, batch: Batch) -> None:
        def write(db: sqlite3.Connection) -> None:
            with _transaction(db):
                db.execute(INSERT_BATCH, batch_row(batch, text))
                db.executemany(INSERT_INPUTS, input_parts(batch))
            if not batch.status.finished:
                self._tallies[batch.id] = Tally.of(batch)

        await self._run(write)

    async def apply(self, changes: Sequence[Change]) -> frozenset[str]:
        """Commit a group: a small one at once, on the loop's thread, a large one (or one
        while the writer's thread is busy) there.

        A group of a few hundred row changes costs SQLite a fraction of a
        millisecond, and every worker whose row it ends waits for it: handing
        it to a thread and back cost them 1-3 ms more each. Committed here,
        it never waits for a lock either (``busy_timeout`` 0): one that is
        held (another program writing the file) goes to the thread, which
        waits as long as every write does. A group that changes a batch's own
        record goes to the thread too: a batch's end counts all its rows. The
        WAL is checkpointed every ``_CHECKPOINT_EVERY`` groups, on a thread of
        its own and waited for by no group (``_checkpoint_soon``): a checkpoint
        syncs the file.
        """
        # A small group is read here, which tells whether it changes rows alone; a large
        # one (a cancel's, thousands of rows) on the writer's thread.
        small = _grouped(changes) if len(changes) <= _INLINE_CHANGES else None

        def write(db: sqlite3.Connection) -> None:
            items, batches = small if small is not None else row_changes_of(changes)
            try:
                for batch_id, batch_items in items.items():
                    if (tally := self._tallies.get(batch_id)) is not None:
                        tally.apply(batch_items)
                with _transaction(db):
                    db.executemany(INSERT_CHANGES, entries(items))
                    for change in batches:
                        apply_batch_change(db, change, self._tally)
            except BaseException:
                # Counted, not written: those batches are counted from the store again.
                for batch_id in {*items, *(change.batch_id for change in batches)}:
                    self._tallies.pop(batch_id, None)
                raise
            for change in batches:
                if isinstance(change, BatchEnded):
                    self._tallies.pop(change.batch_id, None)

        self._commits += 1
        checkpoint = self._commits % _CHECKPOINT_EVERY == 0
        db = self._db
        if not (
            db is not None
            and self._in_thread == 0
            and (self._checkpointing is None or self._checkpointing.done())
            and small is not None
            and not small[1]
            and self._write_inline(db, write)
        ):
            # Here, not on the event loop: a group can hold thousands of changes, and a
            # batch's end counts every one of its rows.
            await self._run(write)
        if checkpoint:
            self._checkpoint_soon()
        return frozenset()  # one process a file: no leases to lose

    def _checkpoint_soon(self) -> None:
        """Checkpoint the WAL on a connection and thread of its own; no group waits for it.

        A checkpoint syncs the file, and a passive one never blocks a writer,
        so groups commit meanwhile, but on the writer's thread: one committed
        on the loop's while the file syncs could hold the loop for as long as
        the disk takes. One at a time; a failure is logged (the commits
        themselves say when the disk refuses them).
        """
        if self._checkpointing is not None and not self._checkpointing.done():
            return
        self._checkpointing = asyncio.ensure_future(
            self._on(self._checkpointer, lambda: self._checkpoint_db, _checkpoint)
        )
        self._checkpointing.add_done_callback(_log_checkpoint)

    @staticmethod
    def _write_inline(db: sqlite3.Connection, write: Callable[[sqlite3.Connection], None]) -> bool:
        """``write`` on this thread, not waiting for a lock: whether it was done."""
        try:
            db.execute("PRAGMA busy_timeout = 0")
            try:
                write(db)
            finally:
                db.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
        except StoreError as exc:
            if isinstance(exc.__cause__, sqlite3.OperationalError) and "locked" in str(exc):
                return False  # the thread waits for it
            raise
        except (sqlite3.Error, OverflowError) as exc:
            raise StoreError(f"The SQLite store cannot be used: {exc}") from exc
        return True

    def _tally(self, db: sqlite3.Connection, batch_id: str) -> tuple[Counter[str], float | None]:
        """Batch ``batch_id``'s rows by status and their cost: from the changes written by
        this process since it made the batch, else read back from the store."""
        tally = self._tallies.get(batch_id)
        return tally.counts_and_cost() if tally is not None else counts_and_cost(db, batch_id)

    async def delete(self, batch_id: str) -> None:
        def write(db: sqlite3.Connection) -> None:
            self._tallies.pop(batch_id, None)
            with _transaction(db):
                db.execute("DELETE FROM batches WHERE id = ?", (batch_id,))

        await self._run(write)

    async def load(self, batch_id: str) -> Batch | None:
        def read(db: sqlite3.Connection) -> Batch | None:
            found = _batches(db, SELECT_BATCH, (batch_id,))
            return found[0] if found else None

        return await self._read(read)

    async def summaries(
        self, owner: str, *, status: BatchStatus | None, limit: int
    ) -> list[Summary]:
        def read(db: sqlite3.Connection) -> list[Summary]:
            value = None if status is None else status.value
            rows = db.execute(SELECT_SUMMARIES, (owner, value, value, limit))
            return summaries_of(rows, read_text)

        return await self._read(read)

    async def counts(self, batch_id: str) -> Counter[ExecutionStatus]:
        def read(db: sqlite3.Connection) -> Counter[ExecutionStatus]:
            return counted(counts_and_cost(db, batch_id)[0].items())

        return await self._read(read)

    async def unfinished(self) -> list[Batch]:
        return await self._read(lambda db: _batches(db, SELECT_UNFINISHED))

    async def add_file(self, entry: FileEntry) -> None:
        await self._run(
            lambda db: db.execute(
                "INSERT OR REPLACE INTO files (name, owner, written_at, batch_id, template) "
                "VALUES (?, ?, ?, ?, ?)",
                (entry.name, entry.owner, entry.written_at, entry.batch_id, int(entry.template)),
            )
        )

    async def file(self, name: str) -> FileEntry | None:
        row = await self._read(
            lambda db: db.execute(
                "SELECT name, owner, written_at, batch_id, template FROM files WHERE name = ?",
                (name,),
            ).fetchone()
        )
        if row is None:
            return None
        return FileEntry(row[0], row[1], row[2], row[3], bool(row[4]))

    async def forget_file(self, name: str) -> None:
        await self._run(lambda db: db.execute("DELETE FROM files WHERE name = ?", (name,)))

    async def templates_of(self, owner: str) -> list[float]:
        rows = await self._read(
            lambda db: db.execute(
                "SELECT written_at FROM files WHERE owner = ? AND template ORDER BY written_at",
                (owner,),
            ).fetchall()
        )
        return [row[0] for row in rows]

    async def expire(self, older_than: float) -> list[str]:
        def write(db: sqlite3.Connection) -> list[str]:
            with _transaction(db):
                db.execute(
                    "DELETE FROM batches WHERE finished_at IS NOT NULL AND finished_at < ?",
                    (older_than,),
                )
                # A workbook goes with its batch; a template once it is old enough.
                names = [
                    row[0]
                    for row in db.execute(
                        "SELECT name FROM files WHERE written_at < ? AND batch_id NOT IN "
                        "(SELECT id FROM batches)",
                        (older_than,),
                    )
                ]
                db.executemany("DELETE FROM files WHERE name = ?", ((name,) for name in names))
                db.execute("DELETE FROM openai_files WHERE created_at < ?", (older_than,))
                db.execute("DELETE FROM answer_cache WHERE expires_at <= ?", (time.time(),))
                db.execute(
                    "DELETE FROM openai_batches WHERE created_at < ? AND id NOT IN "
                    "(SELECT id FROM batches)",
                    (older_than,),
                )
                return names

        return await self._run(write)

    # The answer cache

    async def cached_answer(self, owner: str, key: str, now: float) -> CachedAnswer | None:
        def read(db: sqlite3.Connection) -> CachedAnswer | None:
            row = db.execute(
                "SELECT result, prompt_tokens, completion_tokens FROM answer_cache "
                "WHERE owner = ? AND key = ? AND expires_at > ?",
                (owner, key, now),
            ).fetchone()
            return None if row is None else CachedAnswer(read_text(row[0]) or "", row[1], row[2])

        return await self._read(read)

    async def cache_answer(
        self, owner: str, key: str, answer: CachedAnswer, expires_at: float
    ) -> None:
        row = (owner, key, text(answer.result), answer.prompt_tokens, answer.completion_tokens)

        def write(db: sqlite3.Connection) -> None:
            with _transaction(db):
                db.execute(
                    "INSERT OR REPLACE INTO answer_cache (owner, key, result, prompt_tokens, "
                    "completion_tokens, expires_at) VALUES (?, ?, ?, ?, ?, ?)",
                    (*row, expires_at),
                )

        await self._run(write)

    # Files of the OpenAI Batch API

    async def create_stored_file(self, file: StoredFile) -> None:
        row = (file.id, file.owner, file.purpose, file.filename, file.created_at)
        await self._write_one(INSERT_STORED_FILE, row)

    async def write_chunk(self, file_id: str, seq: int, data: bytes) -> None:
        await self._write_one(INSERT_CHUNK, (file_id, seq, data))

    async def complete_file(self, file_id: str, size: int) -> None:
        await self._write_one(COMPLETE_FILE, (size, file_id))

    async def stored_file(self, file_id: str, owner: str) -> StoredFile | None:
        def read(db: sqlite3.Connection) -> StoredFile | None:
            row = db.execute(SELECT_STORED_FILE, (file_id, owner)).fetchone()
            return None if row is None else StoredFile(*row)

        return await self._read(read)

    async def stored_files(
        self, owner: str, *, purpose: str | None, after: str | None, limit: int, newest_first: bool
    ) -> list[StoredFile]:
        def read(db: sqlite3.Connection) -> list[StoredFile]:
            cursor: tuple[float | None, str | None] = (None, None)
            if after is not None:
                found = db.execute(SELECT_FILE_CURSOR, (after, owner)).fetchone()
                if found is None:
                    return []
                cursor = (found[0], found[1])
            query = SELECT_STORED_FILES_DESC if newest_first else SELECT_STORED_FILES_ASC
            args = (owner, purpose, purpose, cursor[0], cursor[0], cursor[1], limit)
            return [StoredFile(*row) for row in db.execute(query, args)]

        return await self._read(read)

    async def chunk(self, file_id: str, seq: int) -> bytes | None:
        def read(db: sqlite3.Connection) -> bytes | None:
            row = db.execute(SELECT_CHUNK, (file_id, seq)).fetchone()
            return None if row is None else bytes(row[0])

        return await self._read(read)

    async def delete_stored_file(self, file_id: str) -> None:
        await self._write_one("DELETE FROM openai_files WHERE id = ?", (file_id,))

    async def count_stored_files(self, owner: str) -> int:
        def read(db: sqlite3.Connection) -> int:
            query = "SELECT count(*) FROM openai_files WHERE owner = ?"
            return int(db.execute(query, (owner,)).fetchone()[0])

        return await self._read(read)

    # Batches of the OpenAI Batch API

    async def create_openai_batch(self, batch: OpenAIBatch) -> None:
        await self._write_one(INSERT_OPENAI_BATCH, openai_batch_row(batch))

    async def openai_batch(self, batch_id: str, owner: str) -> OpenAIBatch | None:
        def read(db: sqlite3.Connection) -> OpenAIBatch | None:
            found = openai_batches_of(db.execute(SELECT_OPENAI_BATCH, (batch_id, owner)))
            return found[0] if found else None

        return await self._read(read)

    async def openai_batches(
        self, owner: str, *, after: str | None, limit: int
    ) -> list[OpenAIBatch]:
        def read(db: sqlite3.Connection) -> list[OpenAIBatch]:
            rows = db.execute(SELECT_OPENAI_BATCHES, (owner, after, after, owner, limit))
            return openai_batches_of(rows)

        return await self._read(read)

    async def openai_cancelling(self, batch_id: str, at: float) -> None:
        await self._write_one(OPENAI_CANCELLING, (at, batch_id))

    async def overdue_openai_batches(self) -> list[str]:
        def write(db: sqlite3.Connection) -> list[str]:
            now = time.time()
            with _transaction(db):
                return [row[0] for row in db.execute(MARK_OVERDUE, (now, now))]

        return await self._run(write)

    async def due_finalizations(self, limit: int, hold_s: float) -> list[OpenAIBatch]:
        def write(db: sqlite3.Connection) -> list[OpenAIBatch]:
            now = time.time()
            with _transaction(db):
                ids = [row[0] for row in db.execute(CLAIM_FINALIZATIONS, (now, hold_s, now, limit))]
            if not ids:
                return []
            marks = ", ".join("?" * len(ids))
            return openai_batches_of(db.execute(f"{SELECT_OPENAI_BATCHES_BY_ID}({marks})", ids))

        return await self._run(write)

    async def openai_finalized(
        self, batch_id: str, output_file_id: str | None, error_file_id: str | None, at: float
    ) -> bool:
        def write(db: sqlite3.Connection) -> bool:
            with _transaction(db):
                args = (output_file_id, error_file_id, at, batch_id)
                return db.execute(OPENAI_FINALIZED, args).rowcount == 1

        return await self._run(write)

    async def delete_openai_batch(self, batch_id: str) -> None:
        await self._write_one("DELETE FROM openai_batches WHERE id = ?", (batch_id,))

    async def _write_one(self, sql: str, args: tuple[Any, ...]) -> None:
        def write(db: sqlite3.Connection) -> None:
            with _transaction(db):
                db.execute(sql, args)

        await self._run(write)

    # Completion webhooks

    async def due_callbacks(self, limit: int, hold_s: float) -> list[CallbackDue]:
        def write(db: sqlite3.Connection) -> list[CallbackDue]:
            now = time.time()
            with _transaction(db):
                rows = db.execute(CLAIM_CALLBACKS, (now, hold_s, now, limit)).fetchall()
            return callbacks_of(rows, read_text)

        return await self._run(write)

    async def callback_tried(
        self, batch_id: str, attempts: int, state: CallbackState, retry_in_s: float = 0.0
    ) -> None:
        def write(db: sqlite3.Connection) -> None:
            with _transaction(db):
                db.execute(UPDATE_CALLBACK, (attempts, state, time.time() + retry_in_s, batch_id))

        await self._run(write)

    async def next_callback_in(self) -> float | None:
        def read(db: sqlite3.Connection) -> float | None:
            (next_at,) = db.execute(NEXT_CALLBACK).fetchone()
            return None if next_at is None else float(next_at) - time.time()

        return await self._read(read)


class _transaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``, or ``ROLLBACK`` on error, mapped to ``StoreError``."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            # Locked by another program past the busy timeout, or a broken file.
            raise StoreError(f"The SQLite store cannot be written: {exc}") from exc

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, _: Any
    ) -> None:
        if error is None:
            try:
                self._db.execute("COMMIT")
                return
            except sqlite3.Error as exc:
                error = exc
        if self._db.in_transaction:
            self._db.execute("ROLLBACK")
        if isinstance(error, sqlite3.Error):
            raise StoreError(f"The SQLite store cannot be written: {error}") from error


def _batches(db: sqlite3.Connection, query: str, args: tuple[Any, ...] = ()) -> list[Batch]:
    """The batches ``query`` selects, with their rows."""
    batch_rows = db.execute(query, args).fetchall()
    executions = {batch[0]: documented_executions(db, batch[0]) for batch in batch_rows}
    return batches_with(batch_rows, executions, read_text)


def _statements(script: str) -> list[str]:
    """The statements of a migration file, comments dropped (none holds a ``;`` in a string)."""
    lines = [line.split("--", 1)[0] for line in script.splitlines()]
    return [statement.strip() for statement in "\n".join(lines).split(";") if statement.strip()]


def _grouped(changes: Sequence[Change]) -> tuple[dict[str, list[list[Any]]], list[Change]]:
    """``row_changes_of``, its errors the store's."""
    try:
        return row_changes_of(changes)
    except OverflowError as exc:
        raise StoreError(f"The SQLite store cannot be used: {exc}") from exc


def _checkpoint(db: sqlite3.Connection) -> None:
    """Copy what the WAL holds into the database, as far as readers allow (it syncs)."""
    db.execute("PRAGMA wal_checkpoint(PASSIVE)")


def _log_checkpoint(done: asyncio.Future[None]) -> None:
    if not done.cancelled() and (error := done.exception()) is not None:
        log.warning("could not checkpoint the SQLite store: %s", error)
