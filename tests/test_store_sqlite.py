"""The SQLite store: the store contract (``store_contract.py``) run on it, and what is its own.

Its own: one process a file (the lock), WAL and ``PRAGMA user_version``,
files it refuses, text with no UTF-8 form kept as bytes, and a reader that
never waits for the writer.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import secrets
import sqlite3
import threading
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from batchexec.records import Batch, BatchStatus, Execution, ExecutionStatus, Outcome
from batchexec.store import BatchEnded, BatchStarted, ExecutionEnded, ExecutionStarted, StoreError
from batchexec.store.migrations import latest, migrations
from batchexec.store.rows import batch_row
from batchexec.store.sqlite import SQLiteStore
from batchexec.store.sqlite_documents import PART_ROWS, counts_and_cost
from batchexec.store.sqlite_rows import INSERT_BATCH, text
from tests.store_contract import StoreContract, StoreKit, a_batch

OpenStore = Callable[..., Awaitable[SQLiteStore]]


def query(path: Path, sql: str) -> list[tuple[Any, ...]]:
    """``sql``'s rows, read through a connection of the test's own."""
    db = sqlite3.connect(path)
    try:
        return db.execute(sql).fetchall()
    finally:
        db.close()


class SQLiteKit(StoreKit[SQLiteStore]):
    """SQLite stores on ``folder / "batchexec.db"`` unless told another path."""

    dialect = "sqlite"
    too_large = "too large"
    batches_with_rows = "SELECT DISTINCT batch_id FROM row_inputs ORDER BY batch_id"
    sixth_result = None

    def __init__(self, folder: Path) -> None:
        super().__init__()
        self.folder = folder
        self.path = folder / "batchexec.db"

    def make(self, where: Path | None, **options: Any) -> SQLiteStore:
        return SQLiteStore(where or self.path, **options)

    async def elsewhere(self) -> Path:
        return self.folder / f"other-{secrets.token_hex(4)}.db"

    async def another_process(self, store: SQLiteStore) -> SQLiteStore:
        return store  # a SQLite file serves one process: its own store is the only one

    async def query(self, sql: str) -> list[tuple[Any, ...]]:
        return query(self.path, sql)

    async def schema_version(self) -> int:
        [(version,)] = query(self.path, "PRAGMA user_version")
        return int(version)

    async def write_first_schema(self, secret: bytes, *statements: str) -> None:
        db = sqlite3.connect(self.path, isolation_level=None)
        try:
            db.executescript(migrations("sqlite")[0].sql)
            db.execute("INSERT INTO meta (key, value) VALUES ('secret', ?)", (secret,))
            for statement in statements:
                db.execute(statement)
            db.execute("PRAGMA user_version = 1")
        finally:
            db.close()

    async def fail_batch_ends(self) -> str:
        db = sqlite3.connect(self.path)
        try:
            db.execute(
                "CREATE TRIGGER disk_full BEFORE UPDATE OF finished_at ON batches "
                "BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END"
            )
        finally:
            db.close()
        return "database or disk is full"


@pytest.fixture
async def kit(tmp_path: Path) -> AsyncIterator[SQLiteKit]:
    """SQLite stores in ``tmp_path``; every one is closed after."""
    stores = SQLiteKit(tmp_path)
    yield stores
    await stores.close()


@pytest.fixture
def open_store(kit: SQLiteKit) -> OpenStore:
    """Opens a store (``tmp_path / "batchexec.db"`` unless told); every one is closed after."""
    return kit.open


class TestStoreContract(StoreContract):
    """Every SQL store's tests, on SQLite."""


# Opening


async def test_a_new_file_is_migrated_to_the_latest_schema_and_gets_a_secret(open_store, tmp_path):
    path = tmp_path / "batchexec.db"
    store = await open_store(path)
    await store.close()

    assert query(path, "PRAGMA user_version") == [(latest("sqlite"),)]
    assert query(path, "PRAGMA journal_mode") == [("wal",)]
    [(secret,)] = query(path, "SELECT value FROM meta WHERE key = 'secret'")
    assert isinstance(secret, bytes)
    assert len(secret) == 32


async def test_a_database_of_a_newer_schema_is_refused_and_left_alone(open_store, tmp_path):
    path = tmp_path / "batchexec.db"
    newer = latest("sqlite") + 1
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {newer}")
    db.close()

    with pytest.raises(StoreError, match=r"DATABASE_URL.*newer"):
        await open_store(path)
    assert query(path, "PRAGMA user_version") == [(newer,)]
    assert query(path, "SELECT name FROM sqlite_master") == []


async def test_a_file_that_is_not_a_database_is_refused_and_left_alone(open_store, tmp_path):
    path = tmp_path / "batchexec.db"
    junk = os.urandom(8192)
    path.write_bytes(junk)

    with pytest.raises(StoreError, match=r"DATABASE_URL.*batchexec\.db.*not a database"):
        await open_store(path)
    assert path.read_bytes() == junk


async def test_a_path_in_a_missing_folder_is_refused(open_store, tmp_path):
    with pytest.raises(StoreError, match=r"DATABASE_URL.*missing.*does not exist"):
        await open_store(tmp_path / "missing" / "batchexec.db")
    assert not (tmp_path / "missing").exists()


async def test_a_read_only_database_is_refused(open_store, tmp_path):
    if os.geteuid() == 0:
        pytest.skip("running as root, where chmod does not stop writes")
    folder = tmp_path / "read-only"
    folder.mkdir()
    path = folder / "batchexec.db"
    store = await open_store(path)
    await store.close()
    path.chmod(0o444)
    folder.chmod(0o555)
    try:
        with pytest.raises(StoreError, match=r"DATABASE_URL.*readonly"):
            await open_store(path)
    finally:
        folder.chmod(0o755)
        path.chmod(0o644)


# Writing and reading back


async def test_rows_are_json_text_and_bytes_only_where_a_text_has_no_utf_8_form(
    open_store, tmp_path
):
    store = await open_store()

    def batch_of(batch_id: str, models: list[str]) -> Batch:
        return Batch(
            id=batch_id,
            owner="owner-a",
            columns=("prompt",),
            executions=[
                Execution(n, model, {"prompt": "p"}) for n, model in enumerate(models, start=1)
            ],
            created_at=1.0,
        )

    plain = batch_of("plain", ["Grüße", "echo"])
    awkward = batch_of("awkward", ["a\ud800b", "echo"])
    for batch in (plain, awkward):
        await store.create(batch)

    path = tmp_path / "batchexec.db"
    # Readable with SQLite's own JSON functions, by anyone querying the table.
    assert query(
        path, "SELECT json_extract(inputs, '$[0][0]') FROM row_inputs WHERE batch_id = 'plain'"
    ) == [("Grüße",)]
    [(kind, stored)] = query(
        path, "SELECT typeof(inputs), inputs FROM row_inputs WHERE batch_id = 'awkward'"
    )
    assert kind == "blob"
    assert "a\ud800b".encode("utf-8", "surrogatepass") in stored
    assert await store.load("plain") == plain
    assert await store.load("awkward") == awkward


async def test_a_batch_of_many_parts_reads_back_with_its_changes_in_order(open_store):
    store = await open_store()
    rows = PART_ROWS * 2 + 5
    batch = Batch(
        id="b1",
        owner="owner-a",
        columns=("prompt",),
        executions=[Execution(n, "echo", {"prompt": f"p{n}"}) for n in range(1, rows + 1)],
        created_at=1.0,
    )
    await store.create(batch)
    last = rows
    await store.apply(
        [
            ExecutionStarted("b1", 1, "sent 1", 1),
            ExecutionStarted("b1", last, "sent last", 1),
            ExecutionEnded(
                "b1", PART_ROWS + 1, Outcome(ExecutionStatus.FAILED, error="no", seq=1), None
            ),
        ]
    )
    await store.apply(
        [
            # Retried: a start again, then the end; and a second end of a row is ignored.
            ExecutionStarted("b1", 1, "sent 1 again", 2),
            ExecutionEnded(
                "b1", 1, Outcome(ExecutionStatus.SUCCEEDED, "one", attempts=2, seq=2), None
            ),
            ExecutionEnded(
                "b1", PART_ROWS + 1, Outcome(ExecutionStatus.SUCCEEDED, "late", seq=3), "x"
            ),
        ]
    )

    loaded = await store.load("b1")
    assert loaded is not None
    first, middle, end = loaded.executions[0], loaded.executions[PART_ROWS], loaded.executions[-1]
    assert (first.status, first.result, first.attempts, first.prompt_sent) == (
        ExecutionStatus.SUCCEEDED,
        "one",
        2,
        # A start whose end is in the same group is not written; an end with no
        # prompt keeps the one sent before.
        "sent 1",
    )
    assert (middle.status, middle.error, middle.prompt_sent) == (ExecutionStatus.FAILED, "no", None)
    assert (end.status, end.prompt_sent) == (ExecutionStatus.RUNNING, "sent last")
    assert [e.cells["prompt"] for e in loaded.executions] == [f"p{n}" for n in range(1, rows + 1)]
    assert await store.counts("b1") == Counter(
        {
            ExecutionStatus.PENDING: rows - 3,
            ExecutionStatus.SUCCEEDED: 1,
            ExecutionStatus.FAILED: 1,
            ExecutionStatus.RUNNING: 1,
        }
    )


async def test_a_database_locked_by_another_process_is_a_store_error(open_store, tmp_path):
    path = tmp_path / "batchexec.db"
    store = await open_store(path)
    await store.create(a_batch("b1"))
    # Not the 5 s a real query waits: the lock is held for longer than that anyway.
    await store._run(lambda db: db.execute("PRAGMA busy_timeout = 0"))
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(StoreError, match="locked"):
            await store.apply([BatchStarted("b1", 2.0)])
    finally:
        other.execute("ROLLBACK")
        other.close()


# Reading beside the writer


async def test_reads_are_answered_while_the_writer_is_busy(open_store):
    """Reads have a connection and a thread of their own: a long write never delays them."""
    store = await open_store()
    await store.create(a_batch("listed", status=BatchStatus.COMPLETED, finished_at=2.0))
    release = threading.Event()
    # Holds the writer's thread (as a large batch's insert would) until released.
    writing = asyncio.ensure_future(store._run(lambda db: release.wait(30)))
    try:
        found = await asyncio.wait_for(store.summaries("owner-a", status=None, limit=10), 30)
        assert [summary.id for summary in found] == ["listed"]
        assert (await store.load("listed")) is not None
        assert not writing.done()
    finally:
        release.set()
        await writing


async def test_a_checkpoint_holds_up_no_commit_and_none_is_made_on_the_loop_meanwhile(
    open_store, monkeypatch
):
    """A checkpoint syncs the file: it runs on a connection of its own while groups commit
    on the writer's thread (never on the loop's, which the disk could hold) and reads are
    answered, and closing waits for it."""
    import batchexec.store.sqlite as sqlite_module

    checkpointing, release, done = threading.Event(), threading.Event(), threading.Event()
    checkpoint = sqlite_module._checkpoint

    def held_checkpoint(db: sqlite3.Connection) -> None:
        checkpointing.set()
        release.wait(30)
        checkpoint(db)
        done.set()

    monkeypatch.setattr(sqlite_module, "_checkpoint", held_checkpoint)
    monkeypatch.setattr(sqlite_module, "_CHECKPOINT_EVERY", 1)
    store = await open_store()
    await store.create(a_batch("b1"))
    # Every group is followed by a checkpoint here; this one's is held.
    await asyncio.wait_for(store.apply([BatchStarted("b1", 2.0)]), 30)
    await asyncio.to_thread(checkpointing.wait, 30)
    inline: list[bool] = []

    def write_inline(db: sqlite3.Connection, write: Callable[..., None]) -> bool:
        inline.append(True)
        return False

    monkeypatch.setattr(store, "_write_inline", write_inline)
    # A row's start meanwhile commits at once, on the writer's thread.
    await asyncio.wait_for(store.apply([ExecutionStarted("b1", 1, "p", 1)]), 30)
    assert not done.is_set()
    assert inline == []
    assert await asyncio.wait_for(store.load("b1"), 30) is not None
    [(changes,)] = query(store.path, "SELECT count(*) FROM row_changes WHERE batch_id = 'b1'")
    assert changes == 1
    closing = asyncio.ensure_future(store.close())
    await asyncio.sleep(0)
    assert not closing.done()
    release.set()
    await asyncio.wait_for(closing, 30)
    assert done.is_set()


async def test_the_reading_connection_cannot_write(open_store):
    store = await open_store()
    with pytest.raises(StoreError, match="readonly"):
        await store._read(lambda db: db.execute("DELETE FROM batches"))


async def test_rows_written_before_schema_14_read_back_with_the_changes_made_after(
    open_store, tmp_path
):
    # A database of version 13, its batch's rows in executions, as batchexec wrote them then.
    path = tmp_path / "batchexec.db"
    db = sqlite3.connect(path, isolation_level=None)
    try:
        for migration in migrations("sqlite")[:13]:
            db.executescript(migration.sql)
        db.execute("INSERT INTO meta (key, value) VALUES ('secret', ?)", (b"s" * 32,))
        old = a_batch("old", rows=[ExecutionStatus.SUCCEEDED, ExecutionStatus.PENDING])
        db.execute(INSERT_BATCH, batch_row(old, text))
        for e in old.executions:
            db.execute(
                "INSERT INTO executions (batch_id, idx, model, cells, status, prompt_sent, "
                "result, error, latency_ms, attempts, prompt_tokens, completion_tokens, cost, "
                "cached, ended_seq) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    "old",
                    e.index,
                    e.model,
                    json.dumps(e.cells),
                    e.status.value,
                    e.prompt_sent,
                    e.result,
                    e.error,
                    e.latency_ms,
                    e.attempts,
                    e.prompt_tokens,
                    e.completion_tokens,
                    0.5,
                    e.cached,
                    e.seq,
                ),
            )
        db.execute("PRAGMA user_version = 13")
    finally:
        db.close()

    store = await open_store()
    assert query(path, "PRAGMA user_version") == [(latest("sqlite"),)]
    outcome = Outcome(ExecutionStatus.FAILED, error="refused", attempts=1, cost=0.25, seq=9)
    await store.apply([ExecutionEnded("old", 2, outcome, "sent")])

    loaded = await store.load("old")
    assert loaded is not None
    assert loaded.executions[0].status is ExecutionStatus.SUCCEEDED
    assert loaded.executions[0].result == old.executions[0].result
    second = loaded.executions[1]
    assert (second.status, second.error, second.prompt_sent) == (
        ExecutionStatus.FAILED,
        "refused",
        "sent",
    )
    assert await store.counts("old") == Counter(
        {ExecutionStatus.SUCCEEDED: 1, ExecutionStatus.FAILED: 1}
    )
    # Its end counts and costs the rows of both layouts.
    await store.apply([BatchEnded("old", BatchStatus.FAILED, "Batch failed.", 3.0, None)])
    [summary] = await store.summaries(old.owner, status=None, limit=10)
    assert summary.cost == 0.75
    assert summary.counts == Counter({ExecutionStatus.SUCCEEDED: 1, ExecutionStatus.FAILED: 1})


@pytest.mark.parametrize("seed", range(8))
async def test_a_batch_end_counted_as_its_changes_were_written_matches_its_rows_read_back(
    open_store, seed
):
    """A batch's end is counted from the changes this process wrote since it made the
    batch, not read back; starts and ends in any order (repeated, late, after an end)
    give the counts and cost that its rows read back from the file give."""
    chance = random.Random(seed)
    store = await open_store()
    statuses = [ExecutionStatus.PENDING] * 12
    statuses[0] = ExecutionStatus.SUCCEEDED  # a retry's row that succeeded before
    batch = a_batch("b1", rows=statuses)
    batch.executions[0].outcome = Outcome(ExecutionStatus.SUCCEEDED, "kept", cost=0.5)
    await store.create(batch)
    ends = [ExecutionStatus.SUCCEEDED, ExecutionStatus.FAILED, ExecutionStatus.CANCELLED]
    for _ in range(6):
        group: list[Any] = []
        for _ in range(chance.randint(1, 8)):
            index = chance.randint(1, 12)
            if chance.random() < 0.4:
                group.append(ExecutionStarted("b1", index, f"sent {index}", 1))
            else:
                cost = chance.choice([None, 0.25, 1.0])
                status = chance.choice(ends)
                group.append(ExecutionEnded("b1", index, Outcome(status, cost=cost), None))
        await store.apply(group)
    assert "b1" in store._tallies  # counted as written, not read back
    await store.apply([BatchEnded("b1", BatchStatus.COMPLETED, "done", 3.0, None)])
    assert "b1" not in store._tallies
    [(counts, cost)] = query(store.path, "SELECT counts, cost FROM batches WHERE id = 'b1'")
    db = sqlite3.connect(store.path)
    try:
        read_counts, read_cost = counts_and_cost(db, "b1")
    finally:
        db.close()
    assert json.loads(counts) == dict(read_counts)
    assert cost == pytest.approx(read_cost)
    assert sum(json.loads(counts).values()) == 12
