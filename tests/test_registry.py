"""The registry over a real SQLite store: what is shown is what is stored, through every race."""

from __future__ import annotations

import asyncio
import gc
import time
import weakref
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from batchexec.catalog import Catalog
from batchexec.config import Settings
from batchexec.engine import Engine
from batchexec.errors import NotFoundError, ShuttingDownError
from batchexec.exports import ResultWorkbooks, csv_sheet, render_csv
from batchexec.finished import FinishedBatches
from batchexec.planning import BatchPlan, Limits, RowInput, plan_batch
from batchexec.providers.echo import EchoProvider
from batchexec.records import Batch, BatchStatus, ExecutionStatus, Outcome
from batchexec.registry import Registry, _drop
from batchexec.store import BatchEnded, Change, ExecutionEnded, StoreError
from batchexec.store.sqlite import SQLiteStore
from tests.fakes import GATED_CATALOG, GatedProvider


class Harness:
    """An engine and a registry over ``store``, with the gated provider."""

    def __init__(
        self, tmp_path: Path, store: SQLiteStore, *, cache_bytes: int = 8 << 20, **overrides: Any
    ) -> None:
        self.settings = Settings(_env_file=None, public_dir=tmp_path / "public", **overrides)
        self.store = store
        self.registry = Registry(store, cache_bytes=cache_bytes)
        self.gated = GatedProvider(self.settings, None)
        providers = {"gated": self.gated, "echo": EchoProvider(self.settings, None)}  # type: ignore[arg-type]
        self.workbooks = ResultWorkbooks(self.settings.results_dir, self.registry.get)
        self.registry.batch_ended_listeners.append(self.workbooks.batch_ended)
        outputs = self.workbooks.writer()
        self.engine = Engine(self.settings, self.registry, providers, outputs=outputs)
        path = tmp_path / "models.toml"
        path.write_text(GATED_CATALOG)
        self.catalog = Catalog.load(path)

    def plan(self, *prompts: str) -> BatchPlan:
        rows = [RowInput(p, "gated", cells={"prompt": p, "model": "gated"}) for p in prompts]
        limits = Limits(max_executions=100, max_prompt_length=1000, default_model="echo")
        return plan_batch(rows, ["prompt", "model"], self.catalog, limits)

    async def stored(self, batch_id: str) -> list[tuple[str, str | None]]:
        batch = await self.store.load(batch_id)
        assert batch is not None
        return [(e.status.value, e.result) for e in batch.executions]


class Refusing(SQLiteStore):
    """A store that refuses the groups ``refuse`` picks, while ``refusing`` is set."""

    refusing = True

    def refuse(self, changes: Sequence[Change]) -> bool:
        return False

    async def apply(self, changes: Sequence[Change]) -> frozenset[str]:
        if self.refusing and self.refuse(changes):
            raise StoreError("database or disk is full")
        return await super().apply(changes)


@pytest.fixture
async def make(tmp_path: Path) -> AsyncIterator[Any]:
    made: list[Harness] = []

    async def make_(store_class: type[SQLiteStore] = SQLiteStore, **overrides: Any) -> Harness:
        harness = Harness(tmp_path, store_class(tmp_path / "batchexec.db"), **overrides)
        await harness.store.open()
        await harness.registry.start()
        made.append(harness)
        return harness

    yield make_
    for harness in made:
        if isinstance(harness.store, Refusing):
            harness.store.refusing = False
        if isinstance(harness.store, SlowToCreate):
            harness.store.go.set()
        harness.gated.open()
        await harness.engine.close()
        await harness.registry.close()
        await harness.store.close()


async def test_a_cancel_racing_a_rows_answer_never_undoes_it_in_the_store(make):
    harness = await make(max_threads=2)
    batch = await harness.engine.submit("o", harness.plan("a", "b"))
    await harness.gated.wait_started(2)
    harness.gated.open("a")
    while "a" not in harness.gated.finished:
        await asyncio.sleep(0)
    await asyncio.sleep(0)  # row 1's end is recorded, its commit not yet done
    await harness.engine.cancel(batch.id)
    shown = [(e.status.value, e.result) for e in batch.executions]
    assert shown == [("succeeded", "answer(a)"), ("cancelled", None)]
    assert await harness.stored(batch.id) == shown


async def test_a_cancelled_row_keeps_its_prompt_as_sent_in_the_store(make):
    harness = await make(max_threads=2)
    batch = await harness.engine.submit("o", harness.plan("a", "uses ${output.1}"))
    await harness.gated.wait_started(1)
    harness.gated.open("a")
    await harness.gated.wait_started(2)
    await harness.registry.flush()
    await harness.engine.cancel(batch.id)
    stored = await harness.store.load(batch.id)
    assert stored is not None
    assert render_csv(csv_sheet(stored)) == render_csv(csv_sheet(batch))
    assert stored.executions[1].prompt_sent == "uses answer(a)"


async def test_a_batch_whose_end_cannot_be_written_fails_and_tells_its_watchers(make):
    class EndRefused(Refusing):
        def refuse(self, changes: Sequence[Change]) -> bool:
            return any(isinstance(change, BatchEnded) for change in changes)

    harness = await make(EndRefused)
    batch = await harness.engine.submit("o", harness.plan("a"))
    with harness.registry.events.watch(batch.id) as events:
        harness.gated.open()
        await harness.engine.join(batch.id)
        # A watcher (an event stream, the command line's progress) is told it ended.
        while (await asyncio.wait_for(events.get(), 5)).name != "done":
            pass
    assert batch.status is BatchStatus.FAILED
    assert batch.message == "Batch failed: database or disk is full"
    assert await harness.registry.get(batch.id, "o") is batch


async def test_a_cancel_whose_rows_cannot_be_written_fails_the_batch(make):
    class CancelRefusedOnce(Refusing):
        def refuse(self, changes: Sequence[Change]) -> bool:
            cancels = [
                c
                for c in changes
                if isinstance(c, ExecutionEnded) and c.outcome.status is ExecutionStatus.CANCELLED
            ]
            if cancels:
                self.refusing = False
            return bool(cancels)

    harness = await make(CancelRefusedOnce, max_threads=2)
    batch = await harness.engine.submit("o", harness.plan("a", "b", "c"))
    await harness.gated.wait_started(2)
    await harness.registry.flush()
    await harness.engine.cancel(batch.id)
    assert batch.status is BatchStatus.FAILED
    assert all(e.status.finished for e in batch.executions)


class RefusesRowEnds(Refusing):
    """A store that refuses every group holding a row's end: the batch fails."""

    def refuse(self, changes: Sequence[Change]) -> bool:
        return any(isinstance(c, ExecutionEnded) for c in changes)


async def test_a_failed_batch_reads_failed_even_when_not_cached(make):
    harness = await make(RefusesRowEnds, cache_bytes=0)
    batch = await harness.engine.submit("o", harness.plan("a"))
    harness.gated.open()
    await harness.engine.join(batch.id)
    seen = await harness.registry.get(batch.id, "o")
    assert (seen.status, seen.message) == (
        BatchStatus.FAILED,
        "Batch failed: database or disk is full",
    )


class HeldWrites(SQLiteStore):
    """A store whose groups wait for ``open_gate`` before they are written."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.gate = asyncio.Event()
        self.gate.set()
        self.waiting = asyncio.Event()

    async def apply(self, changes: Sequence[Change]) -> frozenset[str]:
        self.waiting.set()
        await self.gate.wait()
        return await super().apply(changes)


@pytest.mark.parametrize("waiters", [2, 40])  # a large group's waiters wake a turn later
async def test_a_flush_cancelled_while_its_group_is_written_leaves_the_others_waiting(
    make, waiters
):
    harness = await make(HeldWrites)
    store, registry = harness.store, harness.registry
    batch = await registry.add("o", harness.plan("a", "b"))
    await registry.flush()
    store.gate.clear()
    store.waiting.clear()
    registry.finish_execution(batch, 1, Outcome(ExecutionStatus.SUCCEEDED, "x", attempts=1), "a")
    given_up, *waiting = (asyncio.create_task(registry.flush()) for _ in range(waiters))
    await asyncio.wait_for(store.waiting.wait(), 5)  # the group is being written
    late = asyncio.create_task(registry.flush())  # waits for the group being written
    await asyncio.sleep(0)
    given_up.cancel()
    await asyncio.sleep(0)
    assert given_up.cancelled() and not any(w.done() for w in waiting) and not late.done()
    assert batch.executions[0].status is ExecutionStatus.PENDING  # not shown before durable
    store.gate.set()
    await asyncio.wait_for(asyncio.gather(*waiting, late), 5)
    assert batch.executions[0].status is ExecutionStatus.SUCCEEDED
    assert (await harness.stored(batch.id))[0] == ("succeeded", "x")


async def test_close_writes_what_is_recorded_while_it_flushes(make):
    harness = await make()
    registry = harness.registry
    batch = await registry.add("o", harness.plan("a", "b"))
    registry.start_batch(batch)
    closing = asyncio.create_task(registry.close())
    await asyncio.sleep(0)
    registry.finish_execution(batch, 1, Outcome(ExecutionStatus.SUCCEEDED, "x", attempts=1), "a")
    flushing = asyncio.create_task(registry.flush())
    await closing
    await asyncio.wait_for(flushing, 5)
    assert batch.executions[0].status is ExecutionStatus.SUCCEEDED
    assert (await harness.stored(batch.id))[0] == ("succeeded", "x")


async def test_a_batch_refused_once_made_leaves_nothing_to_resume(make):
    harness = await make()
    original = harness.registry.made

    async def made_then_stop(*args: Any, **kwargs: Any) -> Any:
        batch = await original(*args, **kwargs)
        harness.engine._stopping = True  # a SIGTERM while a large batch was made
        return batch

    harness.registry.made = made_then_stop
    with pytest.raises(ShuttingDownError):
        await harness.engine.submit("o", harness.plan("a"))
    assert await harness.store.unfinished() == []


class SlowToCreate(SQLiteStore):
    """A store whose ``create`` waits for ``go``, then fails if ``fail`` says so."""

    fail = False

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.go = asyncio.Event()

    async def create(self, batch: Batch) -> None:
        await self.go.wait()
        if self.fail:
            raise StoreError("database or disk is full")
        await super().create(batch)


async def test_a_batch_runs_while_the_store_makes_it_and_nothing_of_it_shows_before(make):
    """Its first calls do not wait for the store's write; no change of any batch is
    written, nor shown, until the batch is in the store; then the submit answers."""
    harness = await make(SlowToCreate)
    store = harness.store
    assert isinstance(store, SlowToCreate)
    store.go.set()
    earlier = await harness.engine.submit("o", harness.plan("earlier", "later"))
    await harness.gated.wait_started(1)
    await harness.registry.flush()  # its start is shown
    store.go.clear()
    submitting = asyncio.ensure_future(harness.engine.submit("o", harness.plan("a", "b")))
    # A row of the batch being made is sent already.
    await asyncio.wait_for(harness.gated.wait_started(3), 30)
    harness.gated.open("earlier")
    harness.gated.open("a")
    flushing = asyncio.ensure_future(harness.registry.flush())
    await asyncio.sleep(0.05)
    # Held: the other batch's row end too, until the new batch is in the store.
    assert not submitting.done() and not flushing.done()
    assert earlier.executions[0].status is ExecutionStatus.RUNNING
    assert await harness.store.load(earlier.id) is not None
    assert (await harness.stored(earlier.id))[0] == ("running", None)
    store.go.set()
    batch = await asyncio.wait_for(submitting, 30)
    await asyncio.wait_for(flushing, 30)
    assert earlier.executions[0].status is ExecutionStatus.SUCCEEDED
    harness.gated.open()
    await harness.engine.join(batch.id)
    assert batch.status is BatchStatus.COMPLETED
    answers = [("succeeded", "answer(a)"), ("succeeded", "answer(b)")]
    assert await harness.stored(batch.id) == answers


class CountsCallsAtCreate(SQLiteStore):
    """A store that notes, as each batch's write begins, how many calls had started."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.started: list[str] = []
        self.seen: list[int] = []

    async def create(self, batch: Batch) -> None:
        self.seen.append(len(self.started))
        await super().create(batch)


async def test_the_store_writes_a_batch_once_its_first_calls_are_made(make):
    """The write (in a thread) does not compete with the first calls for the interpreter."""
    harness = await make(CountsCallsAtCreate, max_threads=3)
    store = harness.store
    assert isinstance(store, CountsCallsAtCreate)
    store.started = harness.gated.started
    batch = await harness.engine.submit("o", harness.plan("a", "b", "c", "d"))
    assert store.seen == [3]
    harness.gated.open()
    await harness.engine.join(batch.id)
    assert batch.status is BatchStatus.COMPLETED


async def test_a_queued_batch_is_written_without_waiting_for_a_slot(make):
    harness = await make(CountsCallsAtCreate, max_threads=1, max_concurrent_batches=1)
    store = harness.store
    assert isinstance(store, CountsCallsAtCreate)
    store.started = harness.gated.started
    running = await harness.engine.submit("o", harness.plan("a"))
    queued = await asyncio.wait_for(harness.engine.submit("o", harness.plan("b")), 30)
    assert store.seen == [1, 1]
    assert queued.status is BatchStatus.QUEUED
    harness.gated.open()
    await harness.engine.join(running.id)
    await harness.engine.join(queued.id)
    assert queued.status is BatchStatus.COMPLETED


async def test_a_batch_with_nothing_left_to_run_is_written_and_ends(make):
    """A batch whose rows all kept their results makes no call, and still ends."""
    harness = await make(CountsCallsAtCreate)
    store = harness.store
    assert isinstance(store, CountsCallsAtCreate)
    store.started = harness.gated.started
    harness.gated.open()
    first = await harness.engine.submit("o", harness.plan("a", "b"))
    await harness.engine.join(first.id)
    again = await asyncio.wait_for(
        harness.engine.submit("o", harness.plan("a", "b"), retry_of=first), 30
    )
    await asyncio.wait_for(harness.engine.join(again.id), 30)
    assert again.status is BatchStatus.COMPLETED
    assert store.seen == [2, 2]  # no call made for the second
    assert await harness.stored(again.id) == [
        ("succeeded", "answer(a)"),
        ("succeeded", "answer(b)"),
    ]


async def test_a_batch_the_store_cannot_make_stops_and_leaves_the_others_alone(make):
    """The submit fails with the store's error; the batch's rows stop, nothing of it is
    written or kept, and the rows of another batch held meanwhile are written."""
    harness = await make(SlowToCreate)
    store = harness.store
    assert isinstance(store, SlowToCreate)
    store.go.set()
    earlier = await harness.engine.submit("o", harness.plan("earlier"))
    await harness.gated.wait_started(1)
    store.go.clear()
    store.fail = True
    submitting = asyncio.ensure_future(harness.engine.submit("o", harness.plan("a", "b")))
    await asyncio.wait_for(harness.gated.wait_started(3), 30)
    harness.gated.open("earlier")
    harness.gated.open("a")
    await asyncio.sleep(0.05)
    store.go.set()
    with pytest.raises(StoreError, match="disk is full"):
        await asyncio.wait_for(submitting, 30)
    await harness.engine.join(earlier.id)
    assert earlier.status is BatchStatus.COMPLETED
    assert await harness.stored(earlier.id) == [("succeeded", "answer(earlier)")]
    assert [batch.id for batch in await harness.store.unfinished()] == []
    [(rows,)] = await harness.store._read(
        lambda db: db.execute("SELECT count(*) FROM row_changes").fetchall()
    )
    stored_ids = await harness.store._read(
        lambda db: db.execute("SELECT DISTINCT batch_id FROM row_changes").fetchall()
    )
    assert stored_ids == [(earlier.id,)]
    assert rows >= 1
    assert harness.engine.running() == []


async def test_a_batch_stopped_by_a_shutdown_while_the_store_fails_to_make_it_says_why(make):
    """The shutdown stops the batch first; the submit still fails with the store's error."""
    harness = await make(SlowToCreate)
    store = harness.store
    assert isinstance(store, SlowToCreate)
    store.fail = True
    submitting = asyncio.ensure_future(harness.engine.submit("o", harness.plan("a")))
    await asyncio.wait_for(harness.gated.wait_started(1), 30)
    closing = asyncio.ensure_future(harness.engine.close())
    await asyncio.sleep(0.05)
    assert not submitting.done()
    store.go.set()
    with pytest.raises(StoreError, match="disk is full"):
        await asyncio.wait_for(submitting, 30)
    await asyncio.wait_for(closing, 30)
    assert harness.engine.running() == []
    assert await harness.store.unfinished() == []


def test_a_dropped_plan_lets_go_of_every_row(tmp_path):
    """``_drop`` frees the plan it is handed in a list, leaving nothing holding its rows
    (the thread's own arguments included: the list is emptied)."""
    catalog_path = tmp_path / "models.toml"
    catalog_path.write_text(GATED_CATALOG)
    rows = [RowInput(f"p{n}", "echo", cells={"prompt": f"p{n}"}) for n in range(1200)]
    limits = Limits(max_executions=2000, max_prompt_length=1000, default_model="echo")
    plan = plan_batch(rows, ["prompt"], Catalog.load(catalog_path), limits)
    planned = [weakref.ref(row) for row in plan.rows]
    holding = [plan]
    del plan
    _drop(holding)
    assert holding == []
    assert [ref for ref in planned if ref() is not None] == []


class CountsLoads(SQLiteStore):
    """A store that counts the batches read back from it."""

    loads = 0

    async def load(self, batch_id: str) -> Batch | None:
        self.loads += 1
        return await super().load(batch_id)


async def test_a_batch_too_large_for_the_cache_is_not_read_back_while_it_is_held(make):
    harness = await make(CountsLoads, cache_bytes=0)
    store = harness.store
    assert isinstance(store, CountsLoads)
    harness.gated.open()
    batch = await harness.engine.submit("o", harness.plan("a", "b"))
    await harness.engine.join(batch.id)
    await harness.workbooks.idle()
    # The workbook was written from the batch that ended, and the batch is found as
    # long as anything holds it: one copy of its rows, not one a request.
    assert (harness.settings.results_dir / batch.file_name).is_file()
    assert await harness.registry.get(batch.id, "o") is batch
    assert store.loads == 0
    batch_id, alive = batch.id, weakref.ref(batch)
    del batch
    gc.collect()
    assert alive() is None
    again = await harness.registry.get(batch_id, "o")
    assert store.loads == 1
    assert [(e.status, e.result) for e in again.executions] == [
        (ExecutionStatus.SUCCEEDED, "answer(a)"),
        (ExecutionStatus.SUCCEEDED, "answer(b)"),
    ]


async def test_an_expired_batch_is_gone_even_while_something_holds_it(make):
    harness = await make(cache_bytes=0)
    harness.gated.open()
    batch = await harness.engine.submit("o", harness.plan("a"))
    await harness.engine.join(batch.id)
    await harness.workbooks.idle()
    await harness.registry.expire(time.time() + 60)
    with pytest.raises(NotFoundError):
        await harness.registry.get(batch.id, "o")
    with pytest.raises(NotFoundError):
        await harness.registry.get(batch.id, "someone else")


async def test_workbook_writes_that_wait_for_a_slot_hold_only_their_batch_id(make):
    """Three batches ending in one turn: the two writes that start at once take their
    batch as it is, the third reads its batch when its turn comes."""
    harness = await make()
    harness.gated.open()
    batches = [await harness.engine.submit("o", harness.plan(f"p{n}")) for n in range(3)]
    for batch in batches:
        await harness.engine.join(batch.id)
    await harness.workbooks.idle()
    loaded: list[str] = []

    async def load(batch_id: str, owner: str) -> Batch:
        loaded.append(batch_id)
        batch: Batch = await harness.registry.get(batch_id, owner)
        return batch

    folder = harness.settings.results_dir / "again"
    folder.mkdir()
    workbooks = ResultWorkbooks(folder, load)
    for batch in batches:
        workbooks.batch_ended(batch)
    await workbooks.idle()
    assert loaded == [batches[2].id]
    assert sorted(path.name for path in folder.iterdir()) == sorted(b.file_name for b in batches)


async def test_a_batch_read_back_across_its_expiry_is_not_kept_again(make):
    """A read of the store begun before an expiry ends after it: what it brings back
    has expired and is not cached again, nor found while something holds it."""
    harness = await make()
    harness.gated.open()
    batch = await harness.engine.submit("o", harness.plan("a"))
    await harness.engine.join(batch.id)
    assert batch.finished_at is not None
    finished = FinishedBatches(max_bytes=8 << 20)
    finished.drop_older(batch.finished_at + 1)
    finished.put(batch)  # the late read's batch
    assert finished.get(batch.id) is None


async def test_an_expired_failed_batch_is_forgotten(make):
    harness = await make(RefusesRowEnds, cache_bytes=0)
    batch = await harness.engine.submit("o", harness.plan("a"))
    harness.gated.open()
    await harness.engine.join(batch.id)
    assert (await harness.registry.get(batch.id, "o")).status is BatchStatus.FAILED
    await harness.registry.expire(time.time() + 60)
    assert harness.registry.cached(batch.id) is None
