"""The engine's scheduling: dependency order, in-flight limits, timeouts, queueing, crashes."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from batchexec.catalog import Catalog
from batchexec.config import Settings
from batchexec.engine import Engine
from batchexec.errors import ConflictError, QueueFullError, ShuttingDownError, StorageError
from batchexec.exports import ResultWorkbooks, csv_sheet, render_csv
from batchexec.planning import BatchPlan, Limits, RowInput, plan_batch
from batchexec.providers.echo import EchoProvider
from batchexec.records import Batch, BatchStatus, ExecutionStatus
from batchexec.registry import Registry
from batchexec.store.memory import MemoryStore
from tests.fakes import GATED_CATALOG, GatedProvider
from tests.helpers import until


@pytest.fixture
def catalog(tmp_path: Path) -> Catalog:
    path = tmp_path / "models.toml"
    path.write_text(GATED_CATALOG)
    return Catalog.load(path)


def plan(catalog: Catalog, *prompts: str, model: str = "gated") -> BatchPlan:
    rows = [RowInput(prompt=prompt, model=model) for prompt in prompts]
    limits = Limits(max_executions=10_000, max_prompt_length=10_000, default_model="echo")
    return plan_batch(rows, ["prompt", "model"], catalog, limits)


def csv_of(batch: Batch) -> str:
    """The batch's ``csv_content``, as the results route renders it from the records."""
    return render_csv(csv_sheet(batch))


class Harness:
    """An engine over a registry, with the gated provider and echo."""

    def __init__(self, tmp_path: Path, **overrides: Any) -> None:
        overrides.setdefault("public_dir", tmp_path / "public")
        self.settings = Settings(_env_file=None, **overrides)
        self.registry = Registry(MemoryStore())
        self.gated = GatedProvider(self.settings, None)
        providers = {"gated": self.gated, "echo": EchoProvider(self.settings, None)}  # type: ignore[arg-type]
        self.workbooks = ResultWorkbooks(self.settings.results_dir, self.registry.get)
        self.registry.batch_ended_listeners.append(self.workbooks.batch_ended)
        outputs = self.workbooks.writer()
        self.engine = Engine(self.settings, self.registry, providers, outputs=outputs)

    def statuses(self, batch: Batch) -> list[str]:
        return [execution.status.value for execution in batch.executions]


@pytest.fixture
async def make_harness(tmp_path: Path):
    harnesses: list[Harness] = []

    def make(**overrides: Any) -> Harness:
        harness = Harness(tmp_path, **overrides)
        harnesses.append(harness)
        return harness

    yield make
    for harness in harnesses:
        await harness.engine.close()


async def test_independent_rows_fill_every_slot_and_no_more(make_harness, catalog):
    harness = make_harness(max_threads=8)
    batch = await harness.engine.submit("owner", plan(catalog, *(f"p{i}" for i in range(16))))
    await harness.gated.wait_started(8)
    await asyncio.sleep(0)  # give any ninth call its chance to start
    assert len(harness.gated.started) == 8
    assert harness.gated.max_in_flight == 8
    harness.gated.open()
    await harness.engine.join(batch.id)
    assert harness.gated.max_in_flight == 8
    assert sorted(harness.gated.finished) == sorted(f"p{i}" for i in range(16))
    assert batch.status is BatchStatus.COMPLETED


async def test_a_chain_waits_only_for_its_own_links(make_harness, catalog):
    harness = make_harness(max_threads=8)
    prompts = [
        "c1",
        "c2 after ${output.1}",
        "c3 after ${output.2}",
        "c4 after ${output.3}",
        "i5",
        "i6",
        "i7",
    ]
    batch = await harness.engine.submit("owner", plan(catalog, *prompts))
    await harness.gated.wait_started(4)
    # The chain's head and every independent row run at once; links 2-4 wait.
    assert sorted(harness.gated.started) == ["c1", "i5", "i6", "i7"]
    harness.gated.open("c1")
    await harness.gated.wait_started(5)
    assert harness.gated.started[-1] == "c2 after answer(c1)"
    harness.gated.open("c2 after answer(c1)")
    await harness.gated.wait_started(6)
    assert harness.gated.started[-1] == "c3 after answer(c2 after answer(c1))"
    harness.gated.open()
    await harness.engine.join(batch.id)
    assert harness.statuses(batch) == ["succeeded"] * 7


async def test_failed_dependency_skips_its_dependents_only(make_harness, catalog):
    harness = make_harness()
    prompts = ["fail: one", "uses ${output.1}", "uses ${output.2}", "independent"]
    batch = await harness.engine.submit("owner", plan(catalog, *prompts))
    harness.gated.open()
    await harness.engine.join(batch.id)
    assert harness.statuses(batch) == ["failed", "skipped", "skipped", "succeeded"]
    assert batch.executions[1].error == "Skipped: ${output.1} did not succeed."
    assert batch.executions[2].error == "Skipped: ${output.2} did not succeed."
    assert harness.gated.started == ["fail: one", "independent"]
    assert batch.status is BatchStatus.COMPLETED
    assert batch.message == "Execution completed with 3 errors."


async def test_timeout_ends_the_row_not_the_batch(make_harness, catalog):
    harness = make_harness(execution_timeout_s=0.05)
    batch = await harness.engine.submit(
        "owner", plan(catalog, "stuck", "after ${output.1}", "free")
    )
    harness.gated.open("free")
    await harness.engine.join(batch.id)
    assert harness.statuses(batch) == ["timed_out", "skipped", "succeeded"]
    assert batch.executions[0].error == "Timed out after 0.05 s."
    assert batch.executions[0].attempts == 1
    assert batch.status is BatchStatus.COMPLETED


async def test_batches_beyond_the_running_limit_queue_then_refuse(make_harness, catalog):
    harness = make_harness(max_concurrent_batches=1, max_queued_batches=1)
    first = await harness.engine.submit("owner", plan(catalog, "first"))
    second = await harness.engine.submit("owner", plan(catalog, "second"))
    await harness.gated.wait_started(1)
    assert first.status is BatchStatus.PROCESSING
    assert second.status is BatchStatus.QUEUED
    with pytest.raises(QueueFullError):
        await harness.engine.submit("owner", plan(catalog, "third"))
    harness.gated.open()
    await harness.engine.join(first.id)
    await harness.engine.join(second.id)
    assert second.status is BatchStatus.COMPLETED
    third = await harness.engine.submit("owner", plan(catalog, "third"))
    await harness.engine.join(third.id)
    assert third.status is BatchStatus.COMPLETED


async def test_close_cancels_running_batches_and_keeps_what_finished(make_harness, catalog):
    harness = make_harness()
    batch = await harness.engine.submit("owner", plan(catalog, "done", "stuck"))
    harness.gated.open("done")
    await harness.gated.wait_started(2)
    await until(lambda: batch.executions[0].status is ExecutionStatus.SUCCEEDED)
    await harness.engine.close()
    assert batch.status is BatchStatus.CANCELLED
    assert harness.statuses(batch) == ["succeeded", "cancelled"]
    assert csv_of(batch) == "prompt,model,result\ndone,gated,answer(done)\n" + (
        "stuck,gated,Error: Cancelled: the server shut down.\n"
    )
    assert batch.xlsx_name is not None
    await harness.workbooks.idle()
    assert (harness.settings.results_dir / batch.xlsx_name).is_file()
    with pytest.raises(ShuttingDownError):
        await harness.engine.submit("owner", plan(catalog, "late"))


async def test_the_workbook_is_written_once_the_batch_has_ended_and_done_was_told(
    make_harness, catalog, monkeypatch
):
    """Building the sheets competes with the loop for the interpreter: it starts only
    after ``done`` has gone to the batch's watchers."""
    import batchexec.exports as exports

    harness = make_harness()
    seen: list[tuple[BatchStatus, bool]] = []
    streamed_results = exports.streamed_results

    def watched_streamed_results(batch: Batch) -> Any:
        seen.append((batch.status, told.done()))
        return streamed_results(batch)

    monkeypatch.setattr(exports, "streamed_results", watched_streamed_results)
    batch = await harness.engine.submit("owner", plan(catalog, "one", "two", model="echo"))
    told: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    with harness.registry.events.watch(batch.id) as queue:
        while (await queue.get()).name != "done":
            pass
        told.set_result(None)
        await harness.engine.join(batch.id)
        await harness.workbooks.idle()
    assert seen == [(BatchStatus.COMPLETED, True)]
    assert batch.xlsx_name is not None
    assert (harness.settings.results_dir / batch.xlsx_name).is_file()


async def test_a_workbook_that_cannot_be_written_keeps_the_csv(make_harness, catalog, tmp_path):
    """The batch ends as it ran (the workbook is written after ``done``); asking for the
    workbook then says why it is missing, and the CSV content is complete."""
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the results folder should be")
    harness = make_harness(public_dir=blocker)
    batch = await harness.engine.submit("owner", plan(catalog, "hello", model="echo"))
    await harness.engine.join(batch.id)
    assert batch.status is BatchStatus.COMPLETED
    assert batch.message == "Execution completed successfully."
    assert batch.xlsx_name == batch.file_name
    with pytest.raises(StorageError, match=r"could not be written \(Not a directory\)"):
        await harness.workbooks.ensure(batch)
    assert csv_of(batch) == "prompt,model,result\nhello,echo,hello\n"
    assert batch.executions[0].status is ExecutionStatus.SUCCEEDED


async def test_provider_bug_fails_its_row_only(make_harness, catalog, caplog):
    harness = make_harness()

    async def broken(model, request):
        raise KeyError("oops")

    harness.gated.complete = broken
    batch = await harness.engine.submit("owner", plan(catalog, "a", "b"))
    await harness.engine.join(batch.id)
    assert harness.statuses(batch) == ["failed", "failed"]
    assert batch.executions[0].error == "Internal error: KeyError"
    assert batch.status is BatchStatus.COMPLETED
    assert batch.message == "Execution completed, but all 2 executions failed."
    assert "unexpected error from gated" in caplog.text


async def test_a_one_row_batch_that_failed_says_so_in_the_singular(make_harness, catalog):
    harness = make_harness()

    async def broken(model, request):
        raise KeyError("oops")

    harness.gated.complete = broken
    batch = await harness.engine.submit("owner", plan(catalog, "a"))
    await harness.engine.join(batch.id)
    assert batch.message == "Execution completed, but its one execution failed."


async def test_cancel_stops_pending_and_running_rows_and_writes_outputs(make_harness, catalog):
    harness = make_harness(max_threads=2)
    batch = await harness.engine.submit("owner", plan(catalog, "done", "running", "pending"))
    harness.gated.open("done")
    await harness.gated.wait_started(3)
    await until(lambda: batch.counts[ExecutionStatus.SUCCEEDED] == 1)
    await harness.engine.cancel(batch.id)
    assert batch.status is BatchStatus.CANCELLED
    assert batch.message == "Batch cancelled (Cancelled by request); finished executions kept."
    assert harness.statuses(batch) == ["succeeded", "cancelled", "cancelled"]
    assert "answer(done)" in csv_of(batch)
    calls = len(harness.gated.started)
    harness.gated.open()
    await asyncio.sleep(0)
    assert len(harness.gated.started) == calls
    with pytest.raises(ConflictError):
        await harness.engine.cancel(batch.id)


async def test_drain_lets_running_rows_finish_and_cancels_the_rest(make_harness, catalog):
    harness = make_harness(max_threads=2)
    running = await harness.engine.submit("owner", plan(catalog, "a", "b", "c", "d"))
    await harness.gated.wait_started(2)
    draining = asyncio.create_task(harness.engine.drain(grace_s=30))
    await asyncio.sleep(0)
    with pytest.raises(ShuttingDownError):
        await harness.engine.submit("owner", plan(catalog, "late"))
    harness.gated.open("a", "b")
    await draining
    assert harness.statuses(running) == ["succeeded", "succeeded", "cancelled", "cancelled"]
    assert harness.gated.started == ["a", "b"]
    assert running.status is BatchStatus.CANCELLED
    assert running.xlsx_name is not None


async def test_drain_cancels_queued_batches_and_gives_up_after_the_grace(make_harness, catalog):
    harness = make_harness(max_concurrent_batches=1)
    running = await harness.engine.submit("owner", plan(catalog, "never answers"))
    queued = await harness.engine.submit("owner", plan(catalog, "queued"))
    await harness.gated.wait_started(1)
    await harness.engine.drain(grace_s=0.01)
    assert queued.status is BatchStatus.CANCELLED
    assert running.status is BatchStatus.CANCELLED
    assert harness.statuses(running) == ["cancelled"]
    assert harness.gated.started == ["never answers"]


async def test_retry_reruns_only_rows_that_did_not_succeed(make_harness, catalog):
    harness = make_harness()
    prompts = ["ok", "fail: once", "uses ${output.1}", "uses ${output.2}"]
    first = await harness.engine.submit("owner", plan(catalog, *prompts))
    harness.gated.open()
    await harness.engine.join(first.id)
    assert harness.statuses(first) == ["succeeded", "failed", "succeeded", "skipped"]
    harness.gated.started.clear()
    second = await harness.engine.submit("owner", plan(catalog, *prompts), retry_of=first)
    await harness.engine.join(second.id)
    assert second.retry_of == first.id
    # The failed row and its skipped dependent run again; row 1 and 3 keep their results.
    assert harness.gated.started == ["fail: once"]
    assert harness.statuses(second) == ["succeeded", "failed", "succeeded", "skipped"]
    assert second.executions[2].result == "answer(uses answer(ok))"


async def test_long_chains_get_scarce_slots_before_independent_rows(make_harness, catalog):
    harness = make_harness(max_threads=1)
    prompts = ["free 1", "head", "free 2", "link ${output.2}", "link ${output.4}"]
    batch = await harness.engine.submit("owner", plan(catalog, *prompts))
    harness.gated.open()
    await harness.engine.join(batch.id)
    # The chain 2 -> 4 -> 5 is the critical path: its head runs first and its
    # second link as soon as it is ready, ahead of rows that could run at any
    # time; the last link is then no more urgent than they are.
    assert harness.gated.started == [
        "head",
        "link answer(head)",
        "free 1",
        "free 2",
        "link answer(link answer(head))",
    ]


def test_chain_lengths_count_the_longest_chain_from_each_row(catalog):
    prompts = ["a", "b ${output.1}", "c ${output.2}", "d ${output.1}", "e"]
    assert plan(catalog, *prompts).chain_lengths() == {1: 3, 2: 2, 3: 1, 4: 1, 5: 1}


async def test_cancelling_twice_still_ends_the_batch(make_harness, catalog):
    harness = make_harness()
    batch = await harness.engine.submit("owner", plan(catalog, "stuck", "also stuck"))
    await harness.gated.wait_started(2)
    results = await asyncio.gather(
        harness.engine.cancel(batch.id), harness.engine.cancel(batch.id), return_exceptions=True
    )
    assert all(result is None or isinstance(result, ConflictError) for result in results)
    assert batch.status is BatchStatus.CANCELLED
    assert batch.finished_at is not None
    assert batch.xlsx_name is not None


async def test_shutdown_cancels_the_dependents_of_cancelled_rows(make_harness, catalog):
    harness = make_harness(max_threads=1)
    running = await harness.engine.submit(
        "owner", plan(catalog, "head", "mid ${output.1}", "tail ${output.2}")
    )
    await harness.gated.wait_started(1)
    draining = asyncio.create_task(harness.engine.drain(grace_s=30))
    await asyncio.sleep(0)
    harness.gated.open("head")
    await draining
    # "mid" never started; "tail" lacks its input because of the shutdown, not
    # because anything failed, so it is cancelled too rather than skipped.
    assert harness.statuses(running) == ["succeeded", "cancelled", "cancelled"]
    assert harness.gated.started == ["head"]


async def test_a_large_batch_runs_on_a_few_workers_not_a_task_per_row(make_harness, catalog):
    harness = make_harness(max_threads=4)
    batch = await harness.engine.submit("owner", plan(catalog, *(f"row {n}" for n in range(500))))
    await harness.gated.wait_started(4)
    engine_tasks = [
        task
        for task in asyncio.all_tasks()
        if getattr(task.get_coro(), "__qualname__", "").startswith("Engine.")
    ]
    # The batch's own task and its four workers: memory does not grow with rows.
    assert len(engine_tasks) == 5
    harness.gated.open()
    await harness.engine.join(batch.id)
    assert batch.counts[ExecutionStatus.SUCCEEDED] == 500


async def test_a_batch_cancelled_before_it_started_still_ends(make_harness, catalog):
    harness = make_harness()
    batch = await harness.engine.submit("owner", plan(catalog, "never started"))
    await harness.engine.close()
    assert batch.status is BatchStatus.CANCELLED
    assert harness.statuses(batch) == ["cancelled"]
    assert harness.gated.started == []


async def test_an_engine_bug_fails_the_batch_naming_the_error(make_harness, catalog, caplog):
    harness = make_harness()

    def broken(*args):
        raise RuntimeError("registry is broken")

    harness.registry.start_execution = broken
    batch = await harness.engine.submit("owner", plan(catalog, "a"))
    await harness.engine.join(batch.id)
    assert batch.status is BatchStatus.FAILED
    assert batch.message == "Batch failed: registry is broken"
