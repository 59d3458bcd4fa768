"""``sqlite:///PATH``: one process's batches in a SQLite file, durable across restarts.

The standard library's ``sqlite3`` on two threads of its own, each with its
connection: every write runs on the writer's, so there is a single writer
and no lock is ever contended inside the process; reads run on the reader's,
so a client listing its batches never delays a commit (WAL lets a reader and
the writer work at once, the reader seeing the last commit). The registry
hands ``apply`` whole groups of changes, each written in one transaction,
which is what keeps the hot path fast (a commit per group, not per row).

The database runs in WAL mode with ``synchronous=NORMAL``: a commit survives
the process being killed at any moment (``kill -9``, the OOM killer); after a
power cut the last commits before it may be lost. The schema is versioned by
``PRAGMA user_version`` and the files in ``sql/sqlite``; a database written
by a newer batchexec is refused.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import secrets
import sqlite3
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from batchexec.records import Batch, BatchStatus, Execution, ExecutionStatus, Summary
from batchexec.store.base import (
    BatchEnded,
    BatchStarted,
    BatchStore,
    Change,
    ExecutionEnded,
    ExecutionStarted,
    FileEntry,
    StoreError,
)
from batchexec.store.migrations import latest, migrations

_T = TypeVar("_T")
_DIALECT = "sqlite"
#: How long a query waits for another process's lock before it fails.
_BUSY_TIMEOUT_MS = 5000
_INSERT_EXECUTION = (
    "INSERT INTO executions (batch_id, idx, model, cells, status, prompt_sent, result, error, "
    "latency_ms, attempts, prompt_tokens, completion_tokens) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_SELECT_EXECUTIONS = (
    "SELECT idx, model, cells, status, prompt_sent, result, error, latency_ms, attempts, "
    "prompt_tokens, completion_tokens FROM executions WHERE batch_id = ? ORDER BY idx"
)
#: A row's end is final: neither a start nor a second end (a cancel racing the
#: row's own answer) changes a row that has ended.
_UPDATE_STARTED = (
    "UPDATE executions SET status = 'running', prompt_sent = ?, attempts = ? "
    "WHERE batch_id = ? AND idx = ? AND status IN ('pending', 'running')"
)
#: An end with no prompt (a row never sent, or cancelled) keeps the prompt as sent.
_UPDATE_ENDED = (
    "UPDATE executions SET status = ?, prompt_sent = coalesce(?, prompt_sent), result = ?, "
    "error = ?, latency_ms = ?, attempts = ?, prompt_tokens = ?, completion_tokens = ? "
    "WHERE batch_id = ? AND idx = ? AND status IN ('pending', 'running')"
)
_SELECT_SUMMARIES = (
    "SELECT id, status, message, created_at, finished_at, retry_of, counts FROM batches "
    "WHERE owner = ? AND (? IS NULL OR status = ?) "
    "ORDER BY created_at DESC, rowid DESC LIMIT ?"
)


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
        self._db: sqlite3.Connection | None = None
        self._read_db: sqlite3.Connection | None = None
        self._lock: BinaryIO | None = None

    async def _run(self, work: Callable[[sqlite3.Connection], _T]) -> _T:
        """Run ``work`` on the writer's thread; every SQLite error is a ``StoreError``."""
        return await self._on(self._thread, lambda: self._db, work)

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
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=True)
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
        if self._read_db is not None:
            await self._read(lambda db: db.close())
            self._read_db = None
        if self._db is not None:
            await self._run(lambda db: db.close())
            self._db = None
        self._reader.shutdown(wait=True)
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
                counts = {str(state): n for state, n in batch.counts.items() if n}
                db.execute(
                    "INSERT INTO batches (id, owner, columns, status, message, created_at, "
                    "started_at, finished_at, xlsx_name, retry_of, counts) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        batch.id,
                        batch.owner,
                        json.dumps(batch.columns),
                        batch.status.value,
                        _text(batch.message),
                        batch.created_at,
                        batch.started_at,
                        batch.finished_at,
                        batch.xlsx_name,
                        batch.retry_of,
                        json.dumps(counts) if batch.status.finished else None,
                    ),
                )
                db.executemany(
                    _INSERT_EXECUTION,
                    (
                        (
                            batch.id,
                            e.index,
                            _text(e.model),
                            json.dumps(e.cells),
                            e.status.value,
                            _text(e.prompt_sent),
                            _text(e.result),
                            _text(e.error),
                            e.latency_ms,
                            e.attempts,
                            e.prompt_tokens,
                            e.completion_tokens,
                        )
                        for e in batch.executions
                    ),
                )

        await self._run(write)

    async def apply(self, changes: Sequence[Change]) -> None:
        def write(db: sqlite3.Connection) -> None:
            # Here, not on the event loop: a group can hold thousands of changes.
            started, ended, batches = _coalesced(changes)
            with _transaction(db):
                db.executemany(_UPDATE_STARTED, started)
                db.executemany(_UPDATE_ENDED, ended)
                for change in batches:
                    _apply(db, change)

        await self._run(write)

    async def delete(self, batch_id: str) -> None:
        def write(db: sqlite3.Connection) -> None:
            with _transaction(db):
                db.execute("DELETE FROM batches WHERE id = ?", (batch_id,))

        await self._run(write)

    async def load(self, batch_id: str) -> Batch | None:
        def read(db: sqlite3.Connection) -> Batch | None:
            row = db.execute(
                "SELECT id, owner, columns, status, message, created_at, started_at, "
                "finished_at, xlsx_name, retry_of FROM batches WHERE id = ?",
                (batch_id,),
            ).fetchone()
            return None if row is None else _batch(db, row)

        return await self._read(read)

    async def summaries(
        self, owner: str, *, status: BatchStatus | None, limit: int
    ) -> list[Summary]:
        def read(db: sqlite3.Connection) -> list[Summary]:
            value = None if status is None else status.value
            rows = db.execute(_SELECT_SUMMARIES, (owner, value, value, limit)).fetchall()
            return [
                Summary(
                    row[0],
                    BatchStatus(row[1]),
                    _read_text(row[2]) or "",
                    row[3],
                    row[4],
                    row[5],
                    _counts(row[6]),
                )
                for row in rows
            ]

        return await self._read(read)

    async def counts(self, batch_id: str) -> Counter[ExecutionStatus]:
        def read(db: sqlite3.Connection) -> Counter[ExecutionStatus]:
            rows = db.execute(
                "SELECT status, count(*) FROM executions WHERE batch_id = ? GROUP BY status",
                (batch_id,),
            )
            return Counter({ExecutionStatus(status): count for status, count in rows})

        return await self._read(read)

    async def unfinished(self) -> list[Batch]:
        def read(db: sqlite3.Connection) -> list[Batch]:
            rows = db.execute(
                "SELECT id, owner, columns, status, message, created_at, started_at, "
                "finished_at, xlsx_name, retry_of FROM batches "
                "WHERE status IN ('queued', 'processing') ORDER BY created_at, rowid"
            ).fetchall()
            return [_batch(db, row) for row in rows]

        return await self._read(read)

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
                return names

        return await self._run(write)


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


def _coalesced(
    changes: Sequence[Change],
) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]], list[Change]]:
    """A group's changes as rows' starts and ends to write in bulk, and the batches' changes.

    A row's end overwrites everything its start wrote, so a start whose end
    is in the same group is not written at all: a fast row costs one update,
    not two. Rows are independent of each other and of their batch's record,
    so writing each kind in bulk leaves the same state as writing in order.
    """
    started: dict[tuple[str, int], tuple[Any, ...]] = {}
    ended: dict[tuple[str, int], tuple[Any, ...]] = {}
    batches: list[Change] = []
    text = _text
    for change in changes:
        if isinstance(change, ExecutionEnded):
            key = (change.batch_id, change.index)
            if key in ended:
                continue  # the first end wins, as in the store
            started.pop(key, None)
            outcome = change.outcome
            ended[key] = (
                outcome.status.value,
                text(change.prompt_sent),
                text(outcome.result),
                text(outcome.error),
                outcome.latency_ms,
                outcome.attempts,
                outcome.prompt_tokens,
                outcome.completion_tokens,
                *key,
            )
        elif isinstance(change, ExecutionStarted):
            key = (change.batch_id, change.index)
            started[key] = (text(change.prompt_sent), change.attempts, *key)
        else:
            batches.append(change)
    return list(started.values()), list(ended.values()), batches


def _apply(db: sqlite3.Connection, change: Change) -> None:
    match change:
        case BatchStarted(batch_id, started_at):
            db.execute(
                "UPDATE batches SET status = 'processing', message = ?, started_at = ? "
                "WHERE id = ?",
                ("Batch execution in progress.", started_at, batch_id),
            )
        case BatchEnded(batch_id, status, message, finished_at, xlsx_name):
            # Counted here, in the transaction, after the group's rows: exact, and
            # listing a finished batch then counts nothing.
            counts = dict(
                db.execute(
                    "SELECT status, count(*) FROM executions WHERE batch_id = ? GROUP BY status",
                    (batch_id,),
                ).fetchall()
            )
            db.execute(
                "UPDATE batches SET status = ?, message = ?, finished_at = ?, xlsx_name = ?, "
                "counts = ? WHERE id = ?",
                (
                    status.value,
                    _text(message),
                    finished_at,
                    xlsx_name,
                    json.dumps(counts),
                    batch_id,
                ),
            )


def _batch(db: sqlite3.Connection, row: tuple[Any, ...]) -> Batch:
    batch_id, owner, columns, status, message, created_at, started_at, finished_at = row[:8]
    executions = [
        Execution(
            index=idx,
            model=_read_text(model) or "",
            cells=json.loads(cells),
            status=ExecutionStatus(execution_status),
            prompt_sent=_read_text(prompt_sent),
            result=_read_text(result),
            error=_read_text(error),
            latency_ms=latency_ms,
            attempts=attempts,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
        )
        for (
            idx,
            model,
            cells,
            execution_status,
            prompt_sent,
            result,
            error,
            latency_ms,
            attempts,
            prompt_tokens,
            completion_tokens,
        ) in db.execute(_SELECT_EXECUTIONS, (batch_id,))
    ]
    return Batch(
        id=batch_id,
        owner=owner,
        columns=tuple(json.loads(columns)),
        executions=executions,
        created_at=created_at,
        status=BatchStatus(status),
        message=_read_text(message) or "",
        started_at=started_at,
        finished_at=finished_at,
        xlsx_name=row[8],
        retry_of=row[9],
    )


def _counts(stored: str | None) -> Counter[ExecutionStatus] | None:
    """Counts written with a batch's end, if it has ended."""
    if stored is None:
        return None
    return Counter({ExecutionStatus(state): count for state, count in json.loads(stored).items()})


def _text(value: str | None) -> str | bytes | None:
    """``value`` as SQLite can hold it; ``_read_text`` gives it back exactly.

    Text with a lone surrogate (JSON can carry one) has no UTF-8 form, so it
    is kept as the bytes Python's ``surrogatepass`` makes of it instead.
    """
    if value is None or value.isascii():
        return value
    try:
        value.encode()
    except UnicodeEncodeError:
        return value.encode("utf-8", "surrogatepass")
    return value


def _read_text(value: str | bytes | None) -> str | None:
    """Text written by ``_text``, exactly as it was."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "surrogatepass")
    return value


def _statements(script: str) -> list[str]:
    """The statements of a migration file, comments dropped (none holds a ``;`` in a string)."""
    lines = [line.split("--", 1)[0] for line in script.splitlines()]
    return [statement.strip() for statement in "\n".join(lines).split(";") if statement.strip()]
