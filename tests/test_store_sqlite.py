"""The SQLite store on its own: opening and migrating, round trips, all-or-nothing, expiry."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from batchexec.records import Batch, BatchStatus, Execution, ExecutionStatus, Outcome
from batchexec.store import (
    BatchEnded,
    BatchStarted,
    ExecutionEnded,
    ExecutionStarted,
    FileEntry,
    StoreError,
)
from batchexec.store.migrations import latest, migrations
from batchexec.store.sqlite import SQLiteStore

OpenStore = Callable[..., Awaitable[SQLiteStore]]


@pytest.fixture
async def open_store(tmp_path: Path) -> AsyncIterator[OpenStore]:
    """Opens a store (``tmp_path / "batchexec.db"`` unless told); every one is closed after."""
    stores: list[SQLiteStore] = []

    async def open_(path: Path | None = None) -> SQLiteStore:
        store = SQLiteStore(path or tmp_path / "batchexec.db")
        stores.append(store)
        await store.open()
        return store

    yield open_
    for store in stores:
        await store.close()  # closing twice is harmless


def query(path: Path, sql: str) -> list[tuple[Any, ...]]:
    """``sql``'s rows, read through a connection of the test's own."""
    db = sqlite3.connect(path)
    try:
        return db.execute(sql).fetchall()
    finally:
        db.close()


def a_batch(
    batch_id: str,
    *,
    owner: str = "owner-a",
    created_at: float = 1.0,
    status: BatchStatus = BatchStatus.QUEUED,
    finished_at: float | None = None,
    rows: list[ExecutionStatus] | tuple[ExecutionStatus, ...] = (ExecutionStatus.PENDING,),
) -> Batch:
    executions = [
        Execution(index, "echo", {"prompt": f"row {index}"}, outcome=Outcome(row_status))
        for index, row_status in enumerate(rows, start=1)
    ]
    return Batch(
        id=batch_id,
        owner=owner,
        columns=("prompt",),
        executions=executions,
        created_at=created_at,
        status=status,
        finished_at=finished_at,
    )


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


async def test_reopening_keeps_the_data_and_the_secret(open_store, tmp_path):
    path = tmp_path / "batchexec.db"
    store = await open_store(path)
    batch = a_batch("b1")
    await store.create(batch)
    fingerprint = store.fingerprint("key-a")
    await store.close()

    again = await open_store(path)
    assert await again.load("b1") == batch
    assert again.fingerprint("key-a") == fingerprint
    assert again.fingerprint("key-b") != fingerprint
    assert "key-a" not in fingerprint

    elsewhere = await open_store(tmp_path / "other.db")
    assert elsewhere.fingerprint("key-a") != fingerprint


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


async def test_every_field_round_trips_through_create_apply_and_load(open_store, tmp_path):
    store = await open_store()
    columns = ("prompt", "model", "note")
    cells = [
        {"prompt": "Grüße, 世界 🌍", "model": "echo", "note": "a\ud800b"},  # lone surrogate
        {"prompt": "uses ${output.1}", "model": "", "note": "\udfff"},
        {"prompt": "fails", "model": "echo", "note": ""},
        {"prompt": "times out", "model": "echo", "note": ""},
        {"prompt": "skipped", "model": "echo", "note": ""},
        {"prompt": "cancelled", "model": "echo", "note": ""},
        {"prompt": "still running", "model": "echo", "note": ""},
        {"prompt": "never started", "model": "echo", "note": ""},
    ]
    submitted = Batch(
        id="b1",
        owner="owner-a",
        columns=columns,
        executions=[Execution(n, "echo", row) for n, row in enumerate(cells, start=1)],
        created_at=1000.25,
        retry_of="b0",
    )
    await store.create(submitted)
    assert await store.load("b1") == submitted

    outcomes = {
        1: Outcome(ExecutionStatus.SUCCEEDED, "réponse ✓ \ud83d", None, 12, 1, 3, 5),
        2: Outcome(ExecutionStatus.SUCCEEDED, "", None, 0, 2, 0, 0),
        3: Outcome(ExecutionStatus.FAILED, None, "the model refused \udc80", 7, 3, None, None),
        4: Outcome(ExecutionStatus.TIMED_OUT, None, "Timed out after 1 s.", 1000, 4),
        5: Outcome(ExecutionStatus.SKIPPED, None, "Skipped: ${output.3} did not succeed."),
        6: Outcome(ExecutionStatus.CANCELLED, None, "Cancelled by request.", None, 1),
    }
    sent = {1: "Grüße, 世界 🌍 \udbff", 2: "uses réponse", 3: "fails", 4: "times out", 6: "c"}
    changes: list[BatchStarted | ExecutionStarted | ExecutionEnded | BatchEnded] = [
        BatchStarted("b1", 1001.5)
    ]
    for index, outcome in outcomes.items():
        if index in sent:
            changes.append(ExecutionStarted("b1", index, sent[index], outcome.attempts))
        changes.append(ExecutionEnded("b1", index, outcome, sent.get(index)))
    changes.append(ExecutionStarted("b1", 7, "still running", 2))
    changes.append(BatchEnded("b1", BatchStatus.CANCELLED, "Batch cancelled.", 1002.75, "b1.xlsx"))
    await store.apply(changes)

    loaded = await store.load("b1")
    assert loaded is not None
    assert (loaded.id, loaded.owner, loaded.columns, loaded.retry_of) == (
        "b1",
        "owner-a",
        columns,
        "b0",
    )
    assert (loaded.status, loaded.message, loaded.xlsx_name) == (
        BatchStatus.CANCELLED,
        "Batch cancelled.",
        "b1.xlsx",
    )
    assert (loaded.created_at, loaded.started_at, loaded.finished_at) == (1000.25, 1001.5, 1002.75)
    # Cells go through JSON, which escapes a lone surrogate: they come back as sent.
    assert [execution.cells for execution in loaded.executions] == cells
    assert [(e.status, e.prompt_sent, e.attempts) for e in loaded.executions] == [
        (ExecutionStatus.SUCCEEDED, "Grüße, 世界 🌍 \udbff", 1),
        (ExecutionStatus.SUCCEEDED, "uses réponse", 2),
        (ExecutionStatus.FAILED, "fails", 3),
        (ExecutionStatus.TIMED_OUT, "times out", 4),
        (ExecutionStatus.SKIPPED, None, 0),
        (ExecutionStatus.CANCELLED, "c", 1),
        (ExecutionStatus.RUNNING, "still running", 2),
        (ExecutionStatus.PENDING, None, 0),
    ]
    # Other text with a lone surrogate (no UTF-8 form) is kept as bytes: it comes back as sent.
    assert [
        (e.result, e.error, e.latency_ms, e.prompt_tokens, e.completion_tokens)
        for e in loaded.executions
    ] == [
        ("réponse ✓ \ud83d", None, 12, 3, 5),
        ("", None, 0, 0, 0),
        (None, "the model refused \udc80", 7, None, None),
        (None, "Timed out after 1 s.", 1000, None, None),
        (None, "Skipped: ${output.3} did not succeed.", None, None, None),
        (None, "Cancelled by request.", None, None, None),
        (None, None, None, None, None),
        (None, None, None, None, None),
    ]
    assert loaded.counts == {
        ExecutionStatus.SUCCEEDED: 2,
        ExecutionStatus.FAILED: 1,
        ExecutionStatus.TIMED_OUT: 1,
        ExecutionStatus.SKIPPED: 1,
        ExecutionStatus.CANCELLED: 1,
        ExecutionStatus.RUNNING: 1,
        ExecutionStatus.PENDING: 1,
    }
    assert await store.load("b2") is None


async def test_a_group_whose_last_change_fails_leaves_none_applied(open_store, tmp_path):
    path = tmp_path / "batchexec.db"
    store = await open_store(path)
    await store.create(a_batch("b1", rows=[ExecutionStatus.PENDING] * 2))
    # A full disk, as SQLite reports it, for the batch's last write only.
    db = sqlite3.connect(path)
    db.execute(
        "CREATE TRIGGER disk_full BEFORE UPDATE OF finished_at ON batches "
        "BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END"
    )
    db.close()
    group = [
        BatchStarted("b1", 2.0),
        ExecutionStarted("b1", 1, "row 1", 1),
        ExecutionEnded("b1", 1, Outcome(ExecutionStatus.SUCCEEDED, "answer", attempts=1), "row 1"),
        ExecutionEnded("b1", 2, Outcome(ExecutionStatus.FAILED, error="no", attempts=1), "row 2"),
        BatchEnded("b1", BatchStatus.COMPLETED, "Done.", 3.0, None),
    ]

    with pytest.raises(StoreError, match="database or disk is full"):
        await store.apply(group)

    assert await store.load("b1") == a_batch("b1", rows=[ExecutionStatus.PENDING] * 2)
    # The transaction was rolled back, not left open: the next group is written.
    await store.apply(group[:-1])
    loaded = await store.load("b1")
    assert loaded is not None
    assert loaded.status is BatchStatus.PROCESSING
    assert [e.status for e in loaded.executions] == [
        ExecutionStatus.SUCCEEDED,
        ExecutionStatus.FAILED,
    ]


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


async def test_a_count_too_large_for_sqlite_is_a_store_error(open_store):
    store = await open_store()
    await store.create(a_batch("b1"))
    outcome = Outcome(ExecutionStatus.SUCCEEDED, "answer", attempts=1, prompt_tokens=2**64)
    with pytest.raises(StoreError):
        await store.apply([ExecutionEnded("b1", 1, outcome, "row 1")])


# Listing


async def test_summaries_are_the_owners_newest_first_with_counts_per_status(open_store):
    store = await open_store()
    done = BatchStatus.COMPLETED
    await store.create(a_batch("old", created_at=1.0, status=done, finished_at=2.0))
    await store.create(
        a_batch(
            "middle",
            created_at=5.0,
            rows=[ExecutionStatus.SUCCEEDED, ExecutionStatus.FAILED, ExecutionStatus.FAILED],
            status=done,
            finished_at=6.0,
        )
    )
    await store.create(a_batch("new", created_at=9.0, status=BatchStatus.PROCESSING))
    # Created in the same instant as "new", but after it.
    await store.create(a_batch("newest", created_at=9.0))
    await store.create(a_batch("someone else's", owner="owner-b", created_at=10.0))

    found = await store.summaries("owner-a", status=None, limit=10)
    assert [summary.id for summary in found] == ["newest", "new", "middle", "old"]
    middle = found[2]
    assert (middle.status, middle.created_at, middle.finished_at) == (done, 5.0, 6.0)
    assert middle.counts == {ExecutionStatus.SUCCEEDED: 1, ExecutionStatus.FAILED: 2}
    # An unfinished batch's counts are not kept: the registry has them, or counts them.
    assert found[0].counts is None
    assert await store.counts("newest") == {ExecutionStatus.PENDING: 1}
    assert found[0].finished_at is None

    assert [s.id for s in await store.summaries("owner-a", status=None, limit=2)] == [
        "newest",
        "new",
    ]
    assert [s.id for s in await store.summaries("owner-a", status=done, limit=10)] == [
        "middle",
        "old",
    ]
    assert [s.id for s in await store.summaries("owner-a", status=done, limit=1)] == ["middle"]
    assert await store.summaries("owner-c", status=None, limit=10) == []


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


async def test_the_reading_connection_cannot_write(open_store):
    store = await open_store()
    with pytest.raises(StoreError, match="readonly"):
        await store._read(lambda db: db.execute("DELETE FROM batches"))


async def test_unfinished_is_the_queued_and_processing_batches_oldest_first(open_store):
    store = await open_store()
    await store.create(a_batch("queued later", created_at=3.0))
    await store.create(
        a_batch(
            "processing",
            created_at=1.0,
            status=BatchStatus.PROCESSING,
            rows=[ExecutionStatus.SUCCEEDED, ExecutionStatus.RUNNING, ExecutionStatus.PENDING],
        )
    )
    for status in (BatchStatus.COMPLETED, BatchStatus.FAILED, BatchStatus.CANCELLED):
        await store.create(a_batch(status.value, created_at=0.5, status=status, finished_at=2.0))
    await store.create(a_batch("queued", created_at=2.0, owner="owner-b"))

    found = await store.unfinished()
    assert [batch.id for batch in found] == ["processing", "queued", "queued later"]
    # Whole batches, rows included, as they were left.
    assert [e.status for e in found[0].executions] == [
        ExecutionStatus.SUCCEEDED,
        ExecutionStatus.RUNNING,
        ExecutionStatus.PENDING,
    ]
    assert found[1].owner == "owner-b"


# Files


async def test_files_are_recorded_replaced_forgotten_and_templates_counted(open_store):
    store = await open_store()
    workbook = FileEntry("batch_execution_b1.xlsx", "owner-a", 5.0, "b1", template=False)
    await store.add_file(workbook)
    assert await store.file(workbook.name) == workbook
    assert await store.file("batch_execution_b2.xlsx") is None

    rewritten = FileEntry(workbook.name, "owner-a", 7.0, "b1", template=False)
    await store.add_file(rewritten)
    assert await store.file(workbook.name) == rewritten

    for name, owner, written_at in (
        ("t3", "owner-a", 30.0),
        ("t1", "owner-a", 10.0),
        ("t2", "owner-b", 20.0),
        ("t4", "owner-a", 40.0),
    ):
        await store.add_file(FileEntry(name, owner, written_at, f"id-{name}", template=True))
    assert await store.templates_of("owner-a") == [10.0, 30.0, 40.0]
    assert await store.templates_of("owner-b") == [20.0]
    assert await store.templates_of("owner-c") == []
    assert await store.file("t1") == FileEntry("t1", "owner-a", 10.0, "id-t1", template=True)

    await store.forget_file("t3")
    await store.forget_file(workbook.name)
    await store.forget_file("never recorded")
    assert await store.file("t3") is None
    assert await store.file(workbook.name) is None
    assert await store.templates_of("owner-a") == [10.0, 40.0]


# Expiry


async def test_expire_forgets_old_finished_batches_and_names_exactly_the_files_to_delete(
    open_store, tmp_path
):
    path = tmp_path / "batchexec.db"
    store = await open_store(path)
    done = BatchStatus.COMPLETED
    rows = [ExecutionStatus.SUCCEEDED] * 3
    await store.create(a_batch("old", created_at=10.0, status=done, finished_at=90.0, rows=rows))
    await store.create(
        a_batch("old failed", created_at=10.0, status=BatchStatus.FAILED, finished_at=95.0)
    )
    await store.create(a_batch("recent", created_at=150.0, status=done, finished_at=250.0))
    # Unfinished batches stay however old they are, and so do their workbooks.
    await store.create(a_batch("old running", created_at=5.0, status=BatchStatus.PROCESSING))
    await store.create(a_batch("old queued", created_at=6.0))
    for entry in (
        FileEntry("old.xlsx", "owner-a", 89.0, "old", template=False),
        FileEntry("recent.xlsx", "owner-a", 249.0, "recent", template=False),
        # process_csv with execute records the workbook before the batch runs.
        FileEntry("old running.xlsx", "owner-a", 5.0, "old running", template=False),
        FileEntry("old template.xlsx", "owner-a", 50.0, "t-old", template=True),
        FileEntry("new template.xlsx", "owner-a", 150.0, "t-new", template=True),
    ):
        await store.add_file(entry)

    expired = await store.expire(older_than=100.0)

    assert sorted(expired) == ["old template.xlsx", "old.xlsx"]
    assert await store.load("old") is None
    assert await store.load("old failed") is None
    for kept in ("recent", "old running", "old queued"):
        assert await store.load(kept) is not None
    assert query(path, "SELECT DISTINCT batch_id FROM executions ORDER BY batch_id") == [
        ("old queued",),
        ("old running",),
        ("recent",),
    ]
    assert sorted(name for (name,) in query(path, "SELECT name FROM files")) == [
        "new template.xlsx",
        "old running.xlsx",
        "recent.xlsx",
    ]
    assert await store.templates_of("owner-a") == [150.0]
    assert await store.expire(older_than=100.0) == []


async def test_a_database_of_an_earlier_version_is_migrated_keeping_its_batches(
    open_store, tmp_path
):
    # A database as the first schema left it, with a finished batch in it.
    path = tmp_path / "batchexec.db"
    first = migrations("sqlite")[0]
    db = sqlite3.connect(path, isolation_level=None)
    db.executescript(first.sql)
    db.execute("INSERT INTO meta (key, value) VALUES ('secret', ?)", (b"s" * 32,))
    db.execute(
        "INSERT INTO batches (id, owner, columns, status, message, created_at, finished_at) "
        "VALUES ('old', 'owner-a', '[\"prompt\"]', 'completed', 'done', 1.0, 2.0)"
    )
    db.execute(
        "INSERT INTO executions (batch_id, idx, model, cells, status, result, attempts) "
        "VALUES ('old', 1, 'echo', '{\"prompt\": \"p\"}', 'succeeded', 'p', 1)"
    )
    db.execute("PRAGMA user_version = 1")
    db.close()

    store = await open_store(path)
    assert query(path, "PRAGMA user_version") == [(latest("sqlite"),)]
    loaded = await store.load("old")
    assert loaded is not None
    assert loaded.executions[0].result == "p"
    (summary,) = await store.summaries("owner-a", status=None, limit=10)
    # Finished before counts were kept: the store counts its rows when asked.
    assert summary.counts is None
    assert await store.counts("old") == {ExecutionStatus.SUCCEEDED: 1}
