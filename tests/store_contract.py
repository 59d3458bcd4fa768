"""The store contract: what every SQL store does alike, written once and run on each.

``StoreContract`` holds the tests; each dialect's test module subclasses it
as ``TestStoreContract`` and gives it a ``kit`` fixture, a ``StoreKit`` of
that dialect's stores, so every test here runs once a dialect (and the
PostgreSQL ones are skipped, as ``tests/postgres.py`` skips them, when no
server answers). The kit holds what differs: how a store is opened and
where another database is, how the test reads the database itself, and the
few set-ups only the dialect's own SQL can write.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from abc import ABC, abstractmethod
from collections import Counter
from dataclasses import replace
from typing import Any, ClassVar, Generic, TypeVar

import pytest

from batchexec.planning import NO_BATCH_OPTIONS, BatchOptions
from batchexec.records import Batch, BatchStatus, Execution, ExecutionStatus, Outcome
from batchexec.store import (
    BatchEnded,
    BatchStarted,
    BatchStore,
    Change,
    ExecutionEnded,
    ExecutionStarted,
    FileEntry,
    OpenAIBatch,
    SharedStore,
    StoredFile,
    StoreError,
)
from batchexec.store.base import CachedAnswer
from batchexec.store.memory import MemoryStore
from batchexec.store.migrations import latest

StoreT = TypeVar("StoreT", bound=BatchStore)


class StoreKit(ABC, Generic[StoreT]):
    """One dialect's stores for a test, and what the contract needs of its databases."""

    #: The dialect's name in ``sql/``, as ``migrations.latest`` takes it.
    dialect: ClassVar[str]
    #: What the store's error says of an integer past 64 bits (a provider's usage count).
    too_large: ClassVar[str]
    #: The batches that have rows in the database, as one column of ids, in order.
    batches_with_rows: ClassVar[str]
    #: Row 6's result of batch b1 as the database holds it, where plain SQL reads it as
    #: text; None where a batch's rows are kept together (SQLite's documents, which
    #: are kept as bytes whole when one of their texts has no UTF-8 form).
    sixth_result: ClassVar[str | None]

    def __init__(self) -> None:
        self._stores: list[StoreT] = []

    async def open(self, where: Any = None, **options: Any) -> StoreT:
        """A store open on ``where`` (the test's database unless told); closed after the test."""
        store = self.make(where, **options)
        self._stores.append(store)
        await store.open()
        return store

    async def close(self) -> None:
        """Close every store ``open`` opened."""
        for store in self._stores:
            await store.close()  # closing twice is harmless

    @abstractmethod
    def make(self, where: Any, **options: Any) -> StoreT:
        """A store, not yet open, on ``where`` (the test's database when None)."""

    @abstractmethod
    async def elsewhere(self) -> Any:
        """Where a new database of its own can be, for ``open``."""

    @abstractmethod
    async def another_process(self, store: StoreT) -> StoreT:
        """Another process's store on ``store``'s database, where the dialect allows one."""

    @abstractmethod
    async def query(self, sql: str) -> list[tuple[Any, ...]]:
        """``sql``'s rows in the test's database, read through a connection of the test's own."""

    @abstractmethod
    async def schema_version(self) -> int:
        """The version of the schema the test's database has now."""

    @abstractmethod
    async def write_first_schema(self, secret: bytes, *statements: str) -> None:
        """Make the test's database as the first migration left it: ``secret``, ``statements``."""

    @abstractmethod
    async def fail_batch_ends(self) -> str:
        """Make every write of a batch's end fail as a full disk does; what the error says."""


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


def ended(batch_id: str, index: int, status: ExecutionStatus, seq: int, **fields: Any) -> Change:
    outcome = Outcome(status, attempts=1, seq=seq, **fields)
    return ExecutionEnded(batch_id, index, outcome, f"row {index}")


async def created_and_held(store: BatchStore, *batches: Batch) -> None:
    """Store ``batches`` and make them ``store``'s to write: a shared store's takes their leases."""
    for batch in batches:
        await store.create(batch)
    if isinstance(store, SharedStore):
        claimed = await store.claim(len(batches), 60.0)
        assert {batch.id for batch in claimed} >= {batch.id for batch in batches}


def fingerprint_of(secret: bytes, api_key: str) -> str:
    """What a store whose secret is ``secret`` records as ``api_key``'s owner."""
    store = MemoryStore()
    store._secret = secret
    return store.fingerprint(api_key)


#: Text a database cannot hold as it is, or that looks like the way a dialect keeps such text.
_AWKWARD = [
    "\x00",
    "a\x00b\x00",
    "\ud800",
    "x\udfffy",
    "\ud83d\ude00",  # a surrogate pair as two code points, not the emoji
    "😀",
    "\ufdd0",
    "\ufdd0plain",
    "\\u0000",
    "\ufdd0\\u0000",
    "back\\slash\x00",
    "\\",
    "",
]


class StoreContract:
    """The tests every SQL store passes; a subclass named ``Test...`` gives the ``kit``."""

    # Opening

    async def test_reopening_keeps_the_data_and_the_secret(self, kit):
        store = await kit.open()
        batch = a_batch("b1")
        await store.create(batch)
        fingerprint = store.fingerprint("key-a")
        await store.close()

        again = await kit.open()
        assert await again.load("b1") == batch
        assert again.fingerprint("key-a") == fingerprint
        assert again.fingerprint("key-b") != fingerprint
        assert "key-a" not in fingerprint

        elsewhere = await kit.open(await kit.elsewhere())
        assert elsewhere.fingerprint("key-a") != fingerprint

    async def test_a_batchs_options_round_trip_and_none_is_stored_as_none(self, kit):
        store = await kit.open()
        options = BatchOptions(
            models=("m-a", "m \u00e9 [b]"),
            response_schema={"type": "object", "properties": {"score": {"type": "number"}}},
            fields=("score",),
            max_cost=0.125,
        )
        batch = a_batch("b1", rows=(ExecutionStatus.PENDING,) * 4)
        batch.options = options
        await store.create(batch)
        await store.create(a_batch("b2"))
        await store.close()

        again = await kit.open()
        loaded = await again.load("b1")
        assert loaded is not None and loaded.options == options
        plain = await again.load("b2")
        assert plain is not None and plain.options == NO_BATCH_OPTIONS
        [unfinished, _] = await again.unfinished()
        assert unfinished.options == options

    async def test_a_cached_answer_is_its_owners_until_it_expires(self, kit):
        store = await kit.open()
        answer = CachedAnswer("réponse \x00 ✓", 4, 2)
        await store.cache_answer("owner-a", "k1", answer, expires_at=100.0)
        assert await store.cached_answer("owner-a", "k1", now=99.0) == answer
        assert await store.cached_answer("owner-b", "k1", now=99.0) is None
        assert await store.cached_answer("owner-a", "k2", now=99.0) is None
        assert await store.cached_answer("owner-a", "k1", now=100.0) is None
        newer = CachedAnswer("again", None, None)
        await store.cache_answer("owner-a", "k1", newer, expires_at=time.time() + 3600)
        await store.cache_answer("owner-a", "old", answer, expires_at=1.0)
        await store.expire(older_than=0.0)
        await store.close()
        again = await kit.open()
        assert await again.cached_answer("owner-a", "k1", now=99.0) == newer
        assert await again.cached_answer("owner-a", "old", now=0.5) is None

    async def test_a_closed_store_refuses_to_work_and_closes_again_harmlessly(self, kit):
        store = await kit.open()
        await store.close()
        await store.close()
        with pytest.raises(StoreError, match="not open"):
            await store.load("b1")

    async def test_a_database_of_an_earlier_version_is_migrated_keeping_its_batches(self, kit):
        # A database as the first schema left it, with a finished batch in it.
        await kit.write_first_schema(
            b"s" * 32,
            "INSERT INTO batches (id, owner, columns, status, message, created_at, finished_at) "
            "VALUES ('old', 'owner-a', '[\"prompt\"]', 'completed', 'done', 1.0, 2.0)",
            "INSERT INTO executions (batch_id, idx, model, cells, status, result, attempts) "
            "VALUES ('old', 1, 'echo', '{\"prompt\": \"p\"}', 'succeeded', 'p', 1)",
        )

        store = await kit.open()
        assert await kit.schema_version() == latest(kit.dialect)
        assert store.fingerprint("key-a") == fingerprint_of(b"s" * 32, "key-a")
        loaded = await store.load("old")
        assert loaded is not None
        assert loaded.executions[0].result == "p"
        assert loaded.executions[0].seq == 1  # numbered by its row, as 0003 does
        (summary,) = await store.summaries("owner-a", status=None, limit=10)
        # Finished before counts were kept: the store counts its rows when asked.
        assert summary.counts is None
        assert await store.counts("old") == {ExecutionStatus.SUCCEEDED: 1}

    # Writing and reading back

    async def test_every_field_round_trips_through_create_apply_and_load(self, kit):
        store = await kit.open()
        columns = ("prompt", "model", "note")
        cells = [
            {"prompt": "Grüße, 世界 🌍", "model": "echo", "note": "a\ud800b"},  # lone surrogate
            {"prompt": "uses ${output.1}", "model": "", "note": "\udfff\x00"},
            {"prompt": "fails", "model": "echo", "note": ""},
            {"prompt": "times out", "model": "echo", "note": ""},
            {"prompt": "skipped", "model": "echo", "note": ""},
            {"prompt": "cancelled", "model": "echo", "note": ""},
            {"prompt": "running", "model": "echo", "note": ""},
            {"prompt": "pending", "model": "echo", "note": ""},
        ]
        submitted = Batch(
            id="b1",
            owner="owner-a",
            columns=columns,
            executions=[
                Execution(index, "echo" if index != 2 else "m\x00del", row)
                for index, row in enumerate(cells, start=1)
            ],
            created_at=1000.25,
            retry_of="b0",
            callback_url="https://hooks.example.com/batches?token=t",
        )
        await created_and_held(store, submitted)
        assert await store.load("b1") == submitted

        outcomes = {
            1: Outcome(
                ExecutionStatus.SUCCEEDED, "réponse ✓ \ud83d", None, 12, 1, 3, 5, 1.25e-05, seq=1
            ),
            2: Outcome(ExecutionStatus.SUCCEEDED, "", None, 0, 2, 0, 0, 0.0, seq=2),
            3: Outcome(ExecutionStatus.FAILED, None, "the model refused \udc80\x00", 7, 3, seq=3),
            4: Outcome(ExecutionStatus.TIMED_OUT, None, "Timed out after 1 s.", 1000, 4, seq=4),
            5: Outcome(
                ExecutionStatus.SKIPPED, None, "Skipped: ${output.3} did not succeed.", seq=5
            ),
            6: Outcome(ExecutionStatus.CANCELLED, None, "Cancelled by request.", None, 1, seq=6),
        }
        sent = {
            1: "Grüße, 世界 🌍 \udbff",
            2: "uses réponse",
            3: "fails\x00",
            4: "times out",
            6: "c",
        }
        changes: list[Change] = [BatchStarted("b1", 1001.5)]
        for index, outcome in outcomes.items():
            if index in sent:
                changes.append(ExecutionStarted("b1", index, sent[index], outcome.attempts))
            changes.append(ExecutionEnded("b1", index, outcome, sent.get(index)))
        changes.append(ExecutionStarted("b1", 7, "still running", 2))
        changes.append(
            BatchEnded("b1", BatchStatus.CANCELLED, "Batch cancelled.\x00", 1002.75, "b1.xlsx")
        )
        assert await store.apply(changes) == frozenset()

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
            "Batch cancelled.\x00",
            "b1.xlsx",
        )
        assert (loaded.created_at, loaded.started_at, loaded.finished_at) == (
            1000.25,
            1001.5,
            1002.75,
        )
        # Cells go through JSON, which escapes a lone surrogate: they come back as sent.
        assert [execution.cells for execution in loaded.executions] == cells
        assert [e.model for e in loaded.executions][:2] == ["echo", "m\x00del"]
        assert [(e.status, e.prompt_sent, e.attempts, e.seq) for e in loaded.executions] == [
            (ExecutionStatus.SUCCEEDED, "Grüße, 世界 🌍 \udbff", 1, 1),
            (ExecutionStatus.SUCCEEDED, "uses réponse", 2, 2),
            (ExecutionStatus.FAILED, "fails\x00", 3, 3),
            (ExecutionStatus.TIMED_OUT, "times out", 4, 4),
            (ExecutionStatus.SKIPPED, None, 0, 5),
            (ExecutionStatus.CANCELLED, "c", 1, 6),
            (ExecutionStatus.RUNNING, "still running", 2, 0),
            (ExecutionStatus.PENDING, None, 0, 0),
        ]
        # Other text with a NUL or a lone surrogate (no UTF-8 form) is kept the
        # dialect's way: it comes back as sent.
        assert [e.cost for e in loaded.executions] == [1.25e-05, 0.0] + [None] * 6
        assert [
            (e.result, e.error, e.latency_ms, e.prompt_tokens, e.completion_tokens)
            for e in loaded.executions
        ] == [
            ("réponse ✓ \ud83d", None, 12, 3, 5),
            ("", None, 0, 0, 0),
            (None, "the model refused \udc80\x00", 7, None, None),
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

    async def test_text_with_nul_and_lone_surrogates_round_trips_through_the_database(self, kit):
        store = await kit.open()
        rng = random.Random(20240601)
        alphabet = [
            "\x00",
            "\\",
            "\ufdd0",
            "u",
            "0",
            "a",
            "é",
            "世",
            "😀",
            "\ud800",
            "\udc00",
            "\n",
        ]
        values = _AWKWARD + [
            "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 12))) for _ in range(300)
        ]
        # Cells and columns are JSON: exact for any text JSON input can carry (not a
        # high and a low surrogate as two code points, which JSON reads as one).
        cell = [value if json.loads(json.dumps(value)) == value else "" for value in values]
        batch = Batch(
            id="b1",
            owner="owner-a",
            columns=("prompt", *cell[:3]),
            executions=[
                Execution(
                    index,
                    value,
                    {"prompt": cell[index - 1], cell[index - 1]: cell[index - 1]},
                    outcome=Outcome(ExecutionStatus.FAILED, value, value, seq=index),
                    prompt_sent=value,
                )
                for index, value in enumerate(values, start=1)
            ],
            created_at=1.0,
            status=BatchStatus.FAILED,
            message="\x00\ud800 the batch",
            finished_at=2.0,
        )
        await store.create(batch)

        loaded = await store.load("b1")
        assert loaded == batch
        assert loaded is not None
        assert [(e.model, e.prompt_sent, e.result, e.error) for e in loaded.executions] == [
            (value, value, value, value) for value in values
        ]
        # Text the database can hold is kept as it is, readable by anyone querying the table.
        if kit.sixth_result is not None:
            assert await kit.query(kit.sixth_result) == [("😀",)]

    async def test_a_count_beyond_64_bits_is_a_store_error_and_nothing_is_written(self, kit):
        store = await kit.open()
        await created_and_held(store, a_batch("b1", rows=[ExecutionStatus.PENDING] * 2))
        outcome = Outcome(ExecutionStatus.SUCCEEDED, "answer", attempts=1, prompt_tokens=2**64)
        group = [
            ended("b1", 1, ExecutionStatus.SUCCEEDED, 1),
            ExecutionEnded("b1", 2, outcome, "row 2"),
        ]
        started = time.monotonic()
        with pytest.raises(StoreError, match=kit.too_large):
            await store.apply(group)
        assert time.monotonic() - started < 5  # refused, not retried
        loaded = await store.load("b1")
        assert loaded is not None
        assert [e.status for e in loaded.executions] == [ExecutionStatus.PENDING] * 2

    async def test_a_group_whose_last_change_fails_leaves_none_applied(self, kit):
        store = await kit.open()
        await created_and_held(store, a_batch("b1", rows=[ExecutionStatus.PENDING] * 2))
        # A full disk, as the database would report it, for the batch's last write only.
        full = await kit.fail_batch_ends()
        group: list[Change] = [
            BatchStarted("b1", 2.0),
            ExecutionStarted("b1", 1, "row 1", 1),
            ended("b1", 1, ExecutionStatus.SUCCEEDED, 1, result="answer"),
            ended("b1", 2, ExecutionStatus.FAILED, 2, error="no"),
            BatchEnded("b1", BatchStatus.COMPLETED, "Done.", 3.0, None),
        ]

        with pytest.raises(StoreError, match=full):
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

    async def test_apply_writes_a_thousand_row_ends_in_one_group(self, kit):
        store = await kit.open()
        await created_and_held(store, a_batch("b1", rows=[ExecutionStatus.PENDING] * 1000))
        group = [
            ended("b1", n, ExecutionStatus.SUCCEEDED, n, result=f"r{n}") for n in range(1, 1001)
        ]
        group.append(BatchEnded("b1", BatchStatus.COMPLETED, "Done.", 3.0, None))

        assert await store.apply(group) == frozenset()

        (summary,) = await store.summaries("owner-a", status=None, limit=1)
        assert summary.counts == {ExecutionStatus.SUCCEEDED: 1000}
        loaded = await store.load("b1")
        assert loaded is not None
        assert [e.result for e in loaded.executions] == [f"r{n}" for n in range(1, 1001)]

    # Listing

    async def test_summaries_are_the_owners_newest_first_with_counts_per_status(self, kit):
        store = await kit.open()
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

    async def test_unfinished_is_the_queued_and_processing_batches_oldest_first(self, kit):
        store = await kit.open()
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
            await store.create(
                a_batch(status.value, created_at=0.5, status=status, finished_at=2.0)
            )
        await store.create(a_batch("queued", created_at=2.0, owner="owner-b"))
        # Created in the same instant as "queued", but after it.
        await store.create(a_batch("queued too", created_at=2.0))

        found = await store.unfinished()
        assert [batch.id for batch in found] == [
            "processing",
            "queued",
            "queued too",
            "queued later",
        ]
        # Whole batches, rows included, as they were left.
        assert [e.status for e in found[0].executions] == [
            ExecutionStatus.SUCCEEDED,
            ExecutionStatus.RUNNING,
            ExecutionStatus.PENDING,
        ]
        assert found[1].owner == "owner-b"

    # Files

    async def test_files_are_recorded_replaced_forgotten_and_templates_counted(self, kit):
        store = await kit.open()
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
        self, kit
    ):
        store = await kit.open()
        other = await kit.another_process(store)
        done = BatchStatus.COMPLETED
        rows = [ExecutionStatus.SUCCEEDED] * 3
        await store.create(
            a_batch("old", created_at=10.0, status=done, finished_at=90.0, rows=rows)
        )
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

        # Two sweepers at once (two replicas', where there can be two): each file is
        # named to exactly one of them.
        expired = await asyncio.gather(store.expire(100.0), other.expire(100.0))

        assert sorted(expired[0] + expired[1]) == ["old template.xlsx", "old.xlsx"]
        assert await store.load("old") is None
        assert await store.load("old failed") is None
        for kept in ("recent", "old running", "old queued"):
            assert await store.load(kept) is not None
        assert await kit.query(kit.batches_with_rows) == [
            ("old queued",),
            ("old running",),
            ("recent",),
        ]
        assert sorted(name for (name,) in await kit.query("SELECT name FROM files")) == [
            "new template.xlsx",
            "old running.xlsx",
            "recent.xlsx",
        ]
        assert await store.templates_of("owner-a") == [150.0]
        assert await store.expire(older_than=100.0) == []

    # Completion webhooks

    async def test_a_webhook_is_due_once_its_batch_ends_and_held_while_it_is_tried(self, kit):
        store = await kit.open()
        with_hook = a_batch("hooked", rows=[ExecutionStatus.PENDING] * 2)
        with_hook.callback_url = "https://hooks.example.com/in"
        await created_and_held(store, with_hook, a_batch("plain"))
        assert await store.due_callbacks(10, 60.0) == []  # not ended yet
        assert await store.next_callback_in() is None

        await store.apply(
            [
                ended("hooked", 1, ExecutionStatus.SUCCEEDED, 1, result="r"),
                ended("hooked", 2, ExecutionStatus.FAILED, 2, error="e"),
                BatchEnded("hooked", BatchStatus.COMPLETED, "done", 50.0, None),
                BatchEnded("plain", BatchStatus.COMPLETED, "done", 51.0, None),
            ]
        )
        next_in_s = await store.next_callback_in()
        assert next_in_s is not None and next_in_s <= 0
        [due] = await store.due_callbacks(10, 60.0)
        assert (due.batch.id, due.url, due.attempts) == ("hooked", with_hook.callback_url, 0)
        assert (due.batch.status, due.batch.message, due.batch.finished_at) == (
            BatchStatus.COMPLETED,
            "done",
            50.0,
        )
        assert due.batch.counts == {ExecutionStatus.SUCCEEDED: 1, ExecutionStatus.FAILED: 1}
        # Held: nobody gets it again until the hold ends.
        assert await store.due_callbacks(10, 60.0) == []
        next_in_s = await store.next_callback_in()
        assert next_in_s is not None and 50.0 < next_in_s <= 60.0

        await store.callback_tried("hooked", 1, "pending", 0.0)
        [again] = await store.due_callbacks(10, 60.0)
        assert again.attempts == 1
        await store.callback_tried("hooked", 2, "pending", 30.0)
        assert await store.due_callbacks(10, 60.0) == []
        next_in_s = await store.next_callback_in()
        assert next_in_s is not None and 20.0 < next_in_s <= 30.0

        await store.callback_tried("hooked", 3, "delivered")
        assert await store.next_callback_in() is None
        assert await store.due_callbacks(10, 0.0) == []

    async def test_a_webhook_due_is_given_to_one_caller_and_a_lapsed_hold_makes_it_due_again(
        self, kit
    ):
        store = await kit.open()
        other = await kit.another_process(store)
        batches = [a_batch(f"b{n}") for n in range(6)]
        for batch in batches:
            batch.callback_url = f"https://hooks.example.com/{batch.id}"
        await created_and_held(store, *batches)
        await store.apply(
            [
                BatchEnded(b.id, BatchStatus.CANCELLED, "stopped", 10.0 + n, None)
                for n, b in enumerate(batches)
            ]
        )

        first, second = await asyncio.gather(
            store.due_callbacks(4, 60.0), other.due_callbacks(4, 60.0)
        )
        given = [due.batch.id for due in first + second]
        assert sorted(given) == sorted(batch.id for batch in batches)  # each to one caller
        assert len(given) == len(set(given))
        assert [due.batch.finished_at for due in first] == sorted(
            due.batch.finished_at or 0 for due in first
        )

        # A caller that died holding one: it is due again once the hold ends.
        await store.callback_tried("b0", 1, "pending", -1.0)
        await store.callback_tried("b1", 1, "failed")
        [lapsed] = await other.due_callbacks(10, 60.0)
        assert (lapsed.batch.id, lapsed.attempts) == ("b0", 1)
        assert await store.due_callbacks(10, 60.0) == []

    async def test_the_webhook_of_a_deleted_or_expired_batch_is_never_due(self, kit):
        store = await kit.open()
        batches = [a_batch("gone"), a_batch("old")]
        for batch in batches:
            batch.callback_url = "https://hooks.example.com/in"
        await created_and_held(store, *batches)
        await store.apply(
            [BatchEnded(b.id, BatchStatus.FAILED, "failed", 10.0, None) for b in batches]
        )
        await store.delete("gone")
        assert await store.expire(older_than=100.0) == []
        assert await store.due_callbacks(10, 60.0) == []
        assert await store.next_callback_in() is None

    # Files of the OpenAI Batch API

    async def test_an_incomplete_file_is_counted_but_neither_found_nor_listed(self, kit):
        store = await kit.open()
        await store.create_stored_file(a_stored_file("file-a"))
        await store.write_chunk("file-a", 0, b"half of it")

        assert await store.count_stored_files("owner-a") == 1
        assert await store.stored_file("file-a", "owner-a") is None
        assert await _listed(store, "owner-a") == []

        await store.complete_file("file-a", 10)
        assert await store.stored_file("file-a", "owner-a") == a_stored_file("file-a", size=10)
        assert await _listed(store, "owner-a") == ["file-a"]
        assert await store.count_stored_files("owner-a") == 1

    async def test_a_files_chunks_read_back_in_order_as_written_and_complete_sets_its_size(
        self, kit
    ):
        store = await kit.open()
        chunks = [
            b"\x00\xff\xfe\x80 not UTF-8 \xc3\x28\x00",
            random.Random(20240601).randbytes(1024 * 1024),  # a whole chunk of a 1 MiB upload
            "Grüße 😀\n".encode(),
            b"\x00",
        ]
        await store.create_stored_file(a_stored_file("file-a"))
        for seq, data in enumerate(chunks):
            await store.write_chunk("file-a", seq, data)
        await store.complete_file("file-a", sum(map(len, chunks)))

        assert [await store.chunk("file-a", seq) for seq in range(len(chunks))] == chunks
        assert await store.chunk("file-a", len(chunks)) is None
        assert await store.chunk("file-missing", 0) is None
        found = await store.stored_file("file-a", "owner-a")
        assert found is not None
        assert found.bytes == sum(map(len, chunks))
        assert found == a_stored_file("file-a", size=found.bytes)

        # An empty file has no chunks at all.
        await store.create_stored_file(a_stored_file("file-empty"))
        await store.complete_file("file-empty", 0)
        assert await store.chunk("file-empty", 0) is None
        assert await store.stored_file("file-empty", "owner-a") == a_stored_file("file-empty")

    async def test_files_are_their_owners_alone(self, kit):
        store = await kit.open()
        for file in (a_stored_file("file-a"), a_stored_file("file-b", owner="owner-b")):
            await store.create_stored_file(file)
            await store.complete_file(file.id, 0)
        await store.create_stored_file(a_stored_file("file-b2", owner="owner-b"))

        assert await store.stored_file("file-a", "owner-b") is None
        assert await store.stored_file("file-b", "owner-a") is None
        assert await _listed(store, "owner-a") == ["file-a"]
        assert await _listed(store, "owner-b") == ["file-b"]
        assert await _listed(store, "owner-c") == []
        assert await store.count_stored_files("owner-a") == 1
        assert await store.count_stored_files("owner-b") == 2
        assert await store.count_stored_files("owner-c") == 0
        # Another owner's file is no place to start a page from.
        assert await _listed(store, "owner-a", after="file-b") == []

    async def test_files_are_paged_after_an_id_in_either_order_with_ties_broken_by_id(self, kit):
        store = await kit.open()
        # Created out of order, "file-c" and "file-b" in the same instant.
        for file_id, created_at in (
            ("file-c", 20.0),
            ("file-e", 40.5),
            ("file-a", 10.0),
            ("file-b", 20.0),
            ("file-d", 30.25),
        ):
            await store.create_stored_file(a_stored_file(file_id, created_at=created_at))
            await store.complete_file(file_id, 0)
        oldest_first = ["file-a", "file-b", "file-c", "file-d", "file-e"]
        newest_first = oldest_first[::-1]

        for order in (oldest_first, newest_first):
            desc = order is newest_first
            assert await _listed(store, "owner-a", newest_first=desc) == order
            pages, after = [], None
            while page := await _listed(store, "owner-a", after=after, limit=2, newest_first=desc):
                pages.append(page)
                after = page[-1]
            assert pages == [order[0:2], order[2:4], order[4:]]
            # From inside the tie, either way.
            past_b = order[order.index("file-b") + 1 :]
            assert await _listed(store, "owner-a", after="file-b", newest_first=desc) == past_b
            assert await _listed(store, "owner-a", after=order[-1], newest_first=desc) == []
            assert await _listed(store, "owner-a", after="file-x", newest_first=desc) == []
        found = await store.stored_files(
            "owner-a", purpose=None, after="file-a", limit=1, newest_first=False
        )
        assert found == [a_stored_file("file-b", created_at=20.0)]

    async def test_files_are_listed_by_purpose_when_asked(self, kit):
        store = await kit.open()
        for n, purpose in enumerate(("batch", "batch_output", "batch", "batch_output")):
            file = a_stored_file(f"file-{n}", purpose=purpose, created_at=float(n))
            await store.create_stored_file(file)
            await store.complete_file(file.id, 0)

        assert await _listed(store, "owner-a", newest_first=False) == [
            "file-0",
            "file-1",
            "file-2",
            "file-3",
        ]
        assert await _listed(store, "owner-a", purpose="batch", newest_first=False) == [
            "file-0",
            "file-2",
        ]
        assert await _listed(store, "owner-a", purpose="batch_output") == ["file-3", "file-1"]
        assert await _listed(store, "owner-a", purpose="batch_output", after="file-3") == ["file-1"]
        assert await _listed(store, "owner-a", purpose="fine-tune") == []

    async def test_deleting_a_file_removes_it_and_its_chunks(self, kit):
        store = await kit.open()
        for file_id in ("file-a", "file-kept", "file-incomplete"):
            await store.create_stored_file(a_stored_file(file_id))
            await store.write_chunk(file_id, 0, b"first")
            await store.write_chunk(file_id, 1, b"second")
            if file_id != "file-incomplete":
                await store.complete_file(file_id, 11)

        await store.delete_stored_file("file-a")
        await store.delete_stored_file("file-incomplete")
        await store.delete_stored_file("file-never-was")

        assert await store.stored_file("file-a", "owner-a") is None
        assert await store.chunk("file-a", 0) is None
        assert await _listed(store, "owner-a") == ["file-kept"]
        assert await store.count_stored_files("owner-a") == 1
        assert await kit.query("SELECT file_id, seq FROM openai_file_chunks ORDER BY seq") == [
            ("file-kept", 0),
            ("file-kept", 1),
        ]
        assert await store.chunk("file-kept", 1) == b"second"

    async def test_expire_removes_the_files_created_before_it_complete_or_not(self, kit):
        store = await kit.open()
        for file_id, created_at, complete in (
            ("file-old", 50.0, True),
            ("file-old-incomplete", 60.0, False),
            ("file-recent", 100.0, True),
            ("file-recent-incomplete", 150.0, False),
        ):
            await store.create_stored_file(a_stored_file(file_id, created_at=created_at))
            await store.write_chunk(file_id, 0, b"data")
            if complete:
                await store.complete_file(file_id, 4)

        assert await store.expire(older_than=100.0) == []

        assert await store.stored_file("file-old", "owner-a") is None
        assert await store.chunk("file-old", 0) is None
        assert await store.stored_file("file-recent", "owner-a") is not None
        assert await _listed(store, "owner-a") == ["file-recent"]
        assert await store.count_stored_files("owner-a") == 2
        assert await kit.query("SELECT file_id FROM openai_file_chunks ORDER BY file_id") == [
            ("file-recent",),
            ("file-recent-incomplete",),
        ]

    # Batches of the OpenAI Batch API

    async def test_an_openai_batch_is_its_owners_and_reads_how_its_batch_stands(self, kit):
        store = await kit.open()
        record = an_openai_batch("ob1", metadata='{"project": "a"}', request_total=2)
        await store.create_openai_batch(record)
        # Recorded before the batch it runs as: nothing of that batch to read yet.
        assert await store.openai_batch("ob1", "owner-a") == record
        assert await store.openai_batch("ob1", "owner-b") is None
        assert await store.openai_batch("ob-missing", "owner-a") is None

        await created_and_held(store, a_batch("ob1", rows=[ExecutionStatus.PENDING] * 2))
        queued = await store.openai_batch("ob1", "owner-a")
        assert queued == replace(record, status=BatchStatus.QUEUED)
        await store.apply([BatchStarted("ob1", 2.0)])
        started = await store.openai_batch("ob1", "owner-a")
        assert started == replace(record, status=BatchStatus.PROCESSING, started_at=2.0)
        await store.apply(
            [
                ended("ob1", 1, ExecutionStatus.SUCCEEDED, 1, result="r"),
                ended("ob1", 2, ExecutionStatus.FAILED, 2, error="e"),
                BatchEnded("ob1", BatchStatus.COMPLETED, "Done.", 5.0, None),
            ]
        )
        assert await store.openai_batch("ob1", "owner-a") == replace(
            record,
            status=BatchStatus.COMPLETED,
            started_at=2.0,
            finished_at=5.0,
            counts=Counter({ExecutionStatus.SUCCEEDED: 1, ExecutionStatus.FAILED: 1}),
        )

        # One whose input was invalid has no batch: only its errors.
        errors = json.dumps([{"code": "invalid_json_line", "line": 3, "message": "Not JSON."}])
        invalid = an_openai_batch("ob2", owner="owner-b", errors=errors, failed_at=1.5)
        await store.create_openai_batch(invalid)
        assert await store.openai_batch("ob2", "owner-b") == invalid
        assert await store.openai_batch("ob2", "owner-a") is None

    async def test_openai_batches_are_listed_newest_first_and_paged_after_an_id(self, kit):
        store = await kit.open()
        # Created out of order, "ob-b" and "ob-c" in the same instant.
        for batch_id, owner, created_at in (
            ("ob-c", "owner-a", 20.0),
            ("ob-a", "owner-a", 10.0),
            ("ob-x", "owner-b", 25.0),
            ("ob-d", "owner-a", 30.5),
            ("ob-b", "owner-a", 20.0),
        ):
            await store.create_openai_batch(
                an_openai_batch(batch_id, owner=owner, created_at=created_at)
            )
        await store.create(a_batch("ob-d", status=BatchStatus.PROCESSING))
        newest_first = ["ob-d", "ob-c", "ob-b", "ob-a"]

        found = await store.openai_batches("owner-a", after=None, limit=10)
        assert [record.id for record in found] == newest_first
        assert found[0] == an_openai_batch("ob-d", created_at=30.5, status=BatchStatus.PROCESSING)
        pages, after = [], None
        while page := await _openai_listed(store, "owner-a", after=after, limit=2):
            pages.append(page)
            after = page[-1]
        assert pages == [newest_first[0:2], newest_first[2:4]]
        # From inside the tie.
        assert await _openai_listed(store, "owner-a", after="ob-c") == ["ob-b", "ob-a"]
        assert await _openai_listed(store, "owner-a", after="ob-b") == ["ob-a"]
        assert await _openai_listed(store, "owner-a", after="ob-a") == []
        # Another owner's batch, or none, is no place to start a page from.
        assert await _openai_listed(store, "owner-a", after="ob-x") == []
        assert await _openai_listed(store, "owner-a", after="ob-missing") == []
        assert await _openai_listed(store, "owner-b") == ["ob-x"]
        assert await _openai_listed(store, "owner-c") == []

    async def test_openai_cancelling_keeps_the_first_time_it_was_asked(self, kit):
        store = await kit.open()
        await store.create_openai_batch(an_openai_batch("ob1"))
        await store.create_openai_batch(an_openai_batch("ob2"))

        await store.openai_cancelling("ob1", 5.0)
        await store.openai_cancelling("ob1", 9.0)
        await store.openai_cancelling("ob-missing", 9.0)

        assert await store.openai_batch("ob1", "owner-a") == an_openai_batch(
            "ob1", cancelling_at=5.0
        )
        assert await store.openai_batch("ob2", "owner-a") == an_openai_batch("ob2")

    async def test_due_finalizations_gives_only_ended_unfinalized_batches_and_holds_them(self, kit):
        store = await kit.open()
        ended_as = {
            "completed": BatchStatus.COMPLETED,
            "cancelled": BatchStatus.CANCELLED,
            "failed": BatchStatus.FAILED,
        }
        for batch_id, status in ended_as.items():
            await store.create_openai_batch(an_openai_batch(batch_id))
            await store.create(a_batch(batch_id, status=status, finished_at=5.0))
        for batch_id, status in (
            ("queued", BatchStatus.QUEUED),
            ("running", BatchStatus.PROCESSING),
        ):
            await store.create_openai_batch(an_openai_batch(batch_id))
            await store.create(a_batch(batch_id, status=status))
        # Its input was invalid: it never ran, and has no files to write.
        await store.create_openai_batch(an_openai_batch("invalid", errors="[]", failed_at=1.0))
        # Recorded, its batch not (yet) stored.
        await store.create_openai_batch(an_openai_batch("alone"))

        due = await store.due_finalizations(10, 60.0)

        assert sorted(record.id for record in due) == sorted(ended_as)
        for record in due:
            assert record == an_openai_batch(
                record.id,
                status=ended_as[record.id],
                finished_at=5.0,
                counts=Counter({ExecutionStatus.PENDING: 1}),
            )
        # Held: nobody gets them again until the hold ends.
        assert await store.due_finalizations(10, 60.0) == []

    async def test_a_due_finalization_is_given_to_one_caller_until_its_hold_lapses(self, kit):
        store = await kit.open()
        other = await kit.another_process(store)
        ids = [f"ob{n}" for n in range(6)]
        for batch_id in ids:
            await store.create_openai_batch(an_openai_batch(batch_id))
            await store.create(a_batch(batch_id, status=BatchStatus.COMPLETED, finished_at=5.0))

        first, second = await asyncio.gather(
            store.due_finalizations(4, 60.0), other.due_finalizations(4, 60.0)
        )
        given = [record.id for record in first + second]
        assert sorted(given) == ids  # each to one caller
        assert len(first) <= 4 and len(second) <= 4
        assert await store.due_finalizations(10, 60.0) == []

        # A caller that died holding them: they are due again once the hold ends.
        await store.create_openai_batch(an_openai_batch("lapsing"))
        await store.create(a_batch("lapsing", status=BatchStatus.CANCELLED, finished_at=6.0))
        assert [record.id for record in await store.due_finalizations(10, -1.0)] == ["lapsing"]
        assert [record.id for record in await other.due_finalizations(10, 60.0)] == ["lapsing"]
        assert await store.due_finalizations(10, -1.0) == []

    async def test_a_finalized_batch_has_its_files_and_is_never_due_again(self, kit):
        store = await kit.open()
        for batch_id in ("ob1", "ob2"):
            await store.create_openai_batch(an_openai_batch(batch_id))
            await store.create(a_batch(batch_id, status=BatchStatus.COMPLETED, finished_at=5.0))
        assert len(await store.due_finalizations(10, -1.0)) == 2  # claimed, the hold lapsed

        assert await store.openai_finalized("ob1", "file-out", None, 7.0)
        assert await store.openai_finalized("ob2", None, "file-err", 8.0)
        # A process whose claim lapsed wrote its own files: the first record stays.
        assert not await store.openai_finalized("ob1", "file-late", "file-late-err", 9.0)

        assert await store.due_finalizations(10, 60.0) == []
        finalized = await store.openai_batch("ob1", "owner-a")
        assert finalized is not None
        assert (finalized.output_file_id, finalized.error_file_id, finalized.finalized_at) == (
            "file-out",
            None,
            7.0,
        )
        assert finalized.status is BatchStatus.COMPLETED
        other = await store.openai_batch("ob2", "owner-a")
        assert other is not None
        assert (other.output_file_id, other.error_file_id, other.finalized_at) == (
            None,
            "file-err",
            8.0,
        )

    async def test_a_refused_openai_batch_is_deleted(self, kit):
        store = await kit.open()
        await store.create_openai_batch(an_openai_batch("refused"))
        await store.delete_openai_batch("refused")
        assert await store.openai_batch("refused", "owner-a") is None
        await store.delete_openai_batch("refused")  # twice is harmless

    async def test_expire_drops_the_old_openai_batches_whose_batch_is_gone(self, kit):
        store = await kit.open()
        done = BatchStatus.COMPLETED
        for batch_id, created_at, batch in (
            # Its input was invalid: it never had a batch.
            ("old invalid", 10.0, None),
            ("recent invalid", 150.0, None),
            ("old expired", 10.0, a_batch("old expired", status=done, finished_at=50.0)),
            ("old ended late", 10.0, a_batch("old ended late", status=done, finished_at=150.0)),
            ("old running", 10.0, a_batch("old running", status=BatchStatus.PROCESSING)),
        ):
            await store.create_openai_batch(
                an_openai_batch(
                    batch_id,
                    created_at=created_at,
                    errors=None if batch else "[]",
                    failed_at=None if batch else created_at,
                )
            )
            if batch is not None:
                await store.create(batch)

        assert await store.expire(older_than=100.0) == []

        for gone in ("old invalid", "old expired"):
            assert await store.openai_batch(gone, "owner-a") is None
        for kept in ("recent invalid", "old ended late", "old running"):
            assert await store.openai_batch(kept, "owner-a") is not None
        assert await _openai_listed(store, "owner-a") == [
            "recent invalid",
            "old running",
            "old ended late",
        ]


def a_stored_file(
    file_id: str,
    *,
    owner: str = "owner-a",
    purpose: str = "batch",
    created_at: float = 1.0,
    size: int = 0,
) -> StoredFile:
    """A file of the OpenAI Batch API, named ``<id>.jsonl``; ``size`` is for a complete one."""
    return StoredFile(file_id, owner, purpose, f"{file_id}.jsonl", created_at, size)


async def _listed(
    store: BatchStore,
    owner: str,
    *,
    purpose: str | None = None,
    after: str | None = None,
    limit: int = 100,
    newest_first: bool = True,
) -> list[str]:
    """The ids of ``owner``'s files ``stored_files`` lists."""
    files = await store.stored_files(
        owner, purpose=purpose, after=after, limit=limit, newest_first=newest_first
    )
    return [file.id for file in files]


def an_openai_batch(batch_id: str, *, owner: str = "owner-a", **fields: Any) -> OpenAIBatch:
    """A batch of the OpenAI Batch API created at 1.0 (unless told), its window 24 hours."""
    created_at = fields.pop("created_at", 1.0)
    return OpenAIBatch(
        id=batch_id,
        owner=owner,
        input_file_id=f"file-{batch_id}",
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata=fields.pop("metadata", None),
        created_at=created_at,
        expires_at=created_at + 24 * 3600,
        **fields,
    )


async def _openai_listed(
    store: BatchStore, owner: str, *, after: str | None = None, limit: int = 100
) -> list[str]:
    """The ids of ``owner``'s OpenAI batches ``openai_batches`` lists."""
    return [record.id for record in await store.openai_batches(owner, after=after, limit=limit)]
