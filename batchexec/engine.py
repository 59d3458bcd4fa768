"""The batch runner: admission, batch slots, cancellation, shutdown, outputs.

Each accepted batch is one asyncio task. A semaphore of
``max_concurrent_batches`` decides which batches run; the others stay
``queued``. Inside a batch, ``max_threads`` workers run the rows in dependency
order (``scheduling``); the ``Executor`` (``execution``) says whether a row
may be sent and makes its model call, with retries, under
``execution_timeout_s``. The engine records each row's start and outcome, and
cancels or leaves rows when stopping; it changes state only through the
registry, and writes a finished batch's outputs through the ``OutputWriter``
it was given.

With a durable store a stopping engine ends no batch it has not finished:
rows that had not started stay pending, rows cut off stay running, and the
next process resumes them (``resume``). With ``memory://`` they are cancelled.

With a shared store (PostgreSQL, several replicas) a submitted batch is only
stored: whichever replica claims its lease runs it (``cluster.Replica``
calls ``resume``), a batch whose lease is lost is let go (``abandon``) as at
a shutdown, and a cancel of a batch another replica runs is passed on
through the store (``Remote``).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Protocol

from batchexec import slices
from batchexec.answer_cache import AnswerCache
from batchexec.config import Settings
from batchexec.errors import ConflictError, InputError, QueueFullError, ShuttingDownError
from batchexec.execution import Executor
from batchexec.exports import OutputWriter
from batchexec.limits import CallLimits
from batchexec.logs import bind_batch
from batchexec.planning import BatchPlan, PlannedRow
from batchexec.providers import Provider
from batchexec.records import Batch, BatchStatus, ExecutionStatus, Outcome
from batchexec.registry import Registry
from batchexec.scheduling import ReadyRows
from batchexec.store import SharedStore, StoreError
from batchexec.token_limits import TokenAccounts
from batchexec.wording import counted

log = logging.getLogger(__name__)


class Remote(Protocol):
    """Batches that other replicas run, as a shared store lets this process reach them."""

    async def cancel(self, batch_id: str, reason: str) -> None:
        """Have the batch cancelled wherever it runs, and wait until it has ended."""


class Engine:
    """Runs batches in the background; ``drain()`` stops gently, ``close()`` at once."""

    def __init__(
        self,
        settings: Settings,
        registry: Registry,
        providers: Mapping[str, Provider],
        *,
        rng: random.Random | None = None,
        outputs: OutputWriter | None = None,
        limits: CallLimits | None = None,
        tokens: TokenAccounts | None = None,
        log_failed_rows: bool = False,
    ) -> None:
        """``outputs`` writes a finished batch's CSV content and workbook; without one they
        are left to the caller (the command line writes only the files it was asked for).
        ``limits`` are the per-model limits, and ``tokens`` the models' tokens per
        minute, this process's own unless given.
        ``log_failed_rows`` logs each row that fails or times out, once, at WARNING (the
        command line reports them itself). Calls are reported to ``registry.metrics``."""
        self._settings = settings
        self._log_failed_rows = log_failed_rows
        self._outputs = outputs
        self._registry = registry
        registry.on_store_failure = self._store_failed
        #: Whether unfinished batches are left to the next process when this one stops.
        self._keep_unfinished = registry.store.durable
        self._batch_slots = asyncio.Semaphore(settings.max_concurrent_batches)
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._batches: dict[str, Batch] = {}
        self._queued: set[str] = set()
        self._cancel_reasons: dict[str, str] = {}
        #: Batches whose changes the store refused, with why.
        self._failures: dict[str, str] = {}
        #: Batches that reached their max_cost: what their rows had cost then.
        self._over_budget: dict[str, float] = {}
        #: Batches whose end has been recorded.
        self._ended: set[str] = set()
        self._executor = Executor(
            settings,
            providers,
            rng=rng or random.Random(),
            limits=limits,
            metrics=registry.metrics,
            answers=AnswerCache(registry.store, settings.cache_ttl_hours * 3600),
            tokens=tokens,
        )
        self._stopping = False
        #: Batches let go because another replica took their lease.
        self._abandoned: set[str] = set()
        #: How a batch run by another replica is reached (a shared store only).
        self.remote: Remote | None = None
        #: Told when a batch of this process's has stopped, so its slot can be filled.
        self.on_slot_freed: Callable[[], None] | None = None
        registry.on_lease_lost = self.abandon

    async def submit(
        self,
        owner: str,
        plan: BatchPlan,
        *,
        batch_id: str | None = None,
        retry_of: Batch | None = None,
        callback_url: str | None = None,
        api: str | None = None,
    ) -> Batch:
        """Register ``plan`` as a batch of ``owner`` and start it in the background.

        The batch is in the store when this returns; its first rows are sent
        before the store writes it (none of its changes is written, nor shown,
        before it), and if the write fails they stop and nothing of the batch
        is kept. With ``retry_of``, rows
        that succeeded there keep their results and only the others run. Its
        end is POSTed to ``callback_url`` by ``webhooks.Webhooks``. ``api`` names the
        API whose batch it is (``openai``), for ``runtime.plan_again``.
        Raises ``QueueFullError`` when every batch slot is busy and
        ``max_queued_batches`` batches already wait, and ``ShuttingDownError``
        once the engine is stopping.

        With a shared store the batch is only stored, for a replica to claim;
        ``max_queued_batches`` then counts the batches no replica has claimed.
        """
        if self._registry.shared:
            return await self._store_for_claim(owner, plan, batch_id, retry_of, callback_url, api)
        self._check_room()
        batch = await self._registry.made(
            owner, plan, batch_id=batch_id, retry_of=retry_of, callback_url=callback_url, api=api
        )
        self._check_room()  # a large batch is made in a thread: others may have come first
        # Started before the store makes it (no change is written before it is): its
        # first calls do not wait for the write, only the answer does.
        sent = asyncio.get_running_loop().create_future()
        async with self._registry.storing(batch, after=sent) as creating:
            self._start(batch, sent)
            cancelled = await _awaited_through_cancels(creating)
            error = (
                StoreError("The store's write of the batch was cancelled.")
                if creating.cancelled()
                else creating.exception()
            )
            if error is not None:
                # Stopped without a trace: nothing of it is in the store to resume.
                self._registry.unstored(batch)
                task = self._tasks.get(batch.id)
                if task is not None:  # else a shutdown stopped it meanwhile
                    self._abandoned.add(batch.id)
                    self._cancel(task)
                    await _awaited_through_cancels(asyncio.ensure_future(asyncio.wait([task])))
                raise error
            if cancelled:
                raise asyncio.CancelledError  # the batch is stored, and runs on
        return batch

    async def _store_for_claim(
        self,
        owner: str,
        plan: BatchPlan,
        batch_id: str | None,
        retry_of: Batch | None,
        callback_url: str | None,
        api: str | None,
    ) -> Batch:
        if self._stopping:
            raise ShuttingDownError("The server is shutting down; try again later.")
        store = self._registry.store
        assert isinstance(store, SharedStore)
        # Concurrent submissions to several replicas may each see room for one
        # more: the bound holds to within the submissions in flight.
        if self.free_slots() == 0 and await store.waiting() >= self._settings.max_queued_batches:
            raise QueueFullError("Too many batches are queued; try again later.")
        return await self._registry.add(
            owner,
            plan,
            batch_id=batch_id,
            retry_of=retry_of,
            callback_url=callback_url,
            api=api,
            hold=False,
        )

    def free_slots(self) -> int:
        """How many more batches this process would run now."""
        return max(self._settings.max_concurrent_batches - len(self._tasks), 0)

    def queued(self) -> int:
        """How many batches this process has accepted that wait for a batch slot."""
        return len(self._queued)

    def running(self) -> list[str]:
        """The batches this process runs or holds queued, by id."""
        return list(self._tasks)

    def abandon(self, batch_id: str) -> None:
        """Stop working on ``batch_id`` without ending it: another replica has it now.

        Its rows in flight are cancelled and nothing more of it is recorded
        here; the replica that took it over runs them again.
        """
        task = self._tasks.get(batch_id)
        if task is not None and batch_id not in self._abandoned | self._ended:
            self._abandoned.add(batch_id)
            log.warning("batch %s: lease lost; stopping work on it here", batch_id)
            self._cancel(task)

    def resume_stored(self, batch: Batch, plan_of: Callable[[Batch], BatchPlan]) -> None:
        """Resume ``batch`` (read back from the store) with the plan ``plan_of`` makes of it.

        A batch that can no longer be planned (its model left the catalog)
        fails, saying why.
        """
        try:
            plan = plan_of(batch)
        except InputError as exc:
            reason = "; ".join(error.message for error in exc.errors) or exc.detail
            log.error("batch %s cannot resume: %s", batch.id, reason)
            self._registry.cancel_unfinished(batch, f"Not resumed: {reason}")
            self._registry.finish_batch(
                batch, BatchStatus.FAILED, f"Batch failed to resume: {reason}"
            )
            return
        left = _rows_left(batch)
        log.info("resuming batch %s (%s left)", batch.id, counted(left, "row"))
        self.resume(batch, plan)

    def resume(self, batch: Batch, plan: BatchPlan) -> None:
        """Run ``batch``, which a previous process left unfinished, to its end with ``plan``.

        Rows that ended keep their outcome; the others run (again).
        """
        batch.plan = plan
        self._start(batch)

    def _check_room(self) -> None:
        if self._stopping:
            raise ShuttingDownError("The server is shutting down; try again later.")
        limit = self._settings.max_concurrent_batches + self._settings.max_queued_batches
        if len(self._tasks) >= limit:
            raise QueueFullError("Too many batches are queued; try again later.")

    def _start(self, batch: Batch, sent: asyncio.Future[None] | None = None) -> None:
        """Run ``batch`` in a task of its own; ``sent`` is set once its first calls are
        made, it waits for a slot, or it has stopped."""
        task = asyncio.create_task(self._run_batch(batch, sent), name=f"batch-{batch.id}")
        self._tasks[batch.id] = task
        self._batches[batch.id] = batch
        self._queued.add(batch.id)
        task.add_done_callback(lambda done: self._forget(batch.id, done))
        if sent is not None:
            task.add_done_callback(lambda _: _set(sent))

    async def join(self, batch_id: str) -> None:
        """Wait until batch ``batch_id`` has finished, and its end is durable and visible."""
        task = self._tasks.get(batch_id)
        if task is not None:
            # Shielded: a waiter that gives up must not cancel the batch.
            await asyncio.shield(asyncio.wait([task]))
        await self._registry.flush()

    async def cancel(self, batch_id: str, reason: str | None = None) -> None:
        """Cancel a queued or running batch and wait until its outputs are written;
        ``reason`` is the error of the rows it stops (by default, cancelled by request).

        Raises ``ConflictError`` when the batch has ended, or when every row has
        and only its outputs are still being written.
        """
        reason = reason or _BY_REQUEST
        task = self._tasks.get(batch_id)
        batch = self._batches.get(batch_id)
        if task is None and self.remote is not None:
            await self.remote.cancel(batch_id, reason)
            return
        if task is None or batch is None or _all_rows_ended(batch):
            raise ConflictError("The batch has already ended; there is nothing to cancel.")
        self.cancel_soon(batch_id, reason)
        await self.join(batch_id)

    def cancel_soon(self, batch_id: str, reason: str) -> None:
        """Start cancelling batch ``batch_id`` (if it runs here), giving ``reason``."""
        task = self._tasks.get(batch_id)
        if task is None:
            return
        self._cancel_reasons.setdefault(batch_id, reason)
        self._cancel(task)

    async def drain(self, grace_s: float) -> None:
        """Stop gently: refuse new batches, start no new executions, stop queued batches,
        give running executions ``grace_s`` to finish, then stop what remains.

        With a durable store, stopped batches are left for the next process to
        resume; otherwise they are cancelled.
        """
        self._stopping = True
        for batch_id in list(self._queued):
            self._cancel(self._tasks[batch_id])
        tasks = list(self._tasks.values())
        if tasks:
            await asyncio.wait(tasks, timeout=grace_s)
        await self.close()

    async def close(self) -> None:
        """Refuse new batches, stop running ones and wait until each has written its state."""
        self._stopping = True
        tasks = list(self._tasks.values())
        for task in tasks:
            self._cancel(task)
        await asyncio.gather(*tasks, return_exceptions=True)

    @staticmethod
    def _cancel(task: asyncio.Task[None]) -> None:
        # Once is enough: a second cancel would interrupt the first one's bookkeeping.
        if not task.cancelling():
            task.cancel()

    def _forget(self, batch_id: str, task: asyncio.Task[None]) -> None:
        self._tasks.pop(batch_id, None)
        batch = self._batches.pop(batch_id, None)
        if task.cancelled() and batch is not None and batch_id not in self._ended:
            # Cancelled before its first step (a shutdown right after the
            # submit): _run_batch never ran, so its bookkeeping happens here.
            self._stopped(batch)
        self._queued.discard(batch_id)
        self._cancel_reasons.pop(batch_id, None)
        self._failures.pop(batch_id, None)
        self._over_budget.pop(batch_id, None)
        self._ended.discard(batch_id)
        self._abandoned.discard(batch_id)
        if not task.cancelled() and (error := task.exception()) is not None:
            log.error("batch %s: background task failed", batch_id, exc_info=error)
        if self.on_slot_freed is not None:
            self.on_slot_freed()

    def _store_failed(self, batch_id: str, error: StoreError) -> None:
        """The store refused a change to ``batch_id``: the batch fails, the server goes on.

        With a shared store it is let go instead: what the store holds is the
        truth, and another replica (or this one, once the lease lapses)
        resumes the batch from it.
        """
        task = self._tasks.get(batch_id)
        if self._registry.shared:
            log.warning("batch %s: letting it go, its changes could not be written", batch_id)
            if task is not None and not task.done() and batch_id not in self._ended:
                self.abandon(batch_id)
            elif (batch := self._registry.cached(batch_id)) and not batch.status.finished:
                self._registry.leave(batch)
            return
        if task is None or task.done() or batch_id in self._ended:
            # Its end is recorded already: the change that failed was that end.
            batch = self._registry.cached(batch_id)
            if batch is not None and not batch.status.finished:
                self._registry.fail(batch, f"Batch failed: {error}")
            return
        if batch_id not in self._failures:
            self._failures[batch_id] = str(error)
            self._cancel(task)

    def _leaves_unfinished(self, batch: Batch) -> bool:
        """Whether a batch being stopped is left for the next process rather than ended."""
        if batch.id in self._abandoned:
            return True
        return (
            self._stopping
            and self._keep_unfinished
            and batch.id not in self._cancel_reasons
            and batch.id not in self._failures
        )

    def _stopped(self, batch: Batch) -> None:
        """End (or leave) a batch whose task was cancelled; its outputs are not written."""
        failure = self._failures.get(batch.id)
        if batch.id in self._abandoned:
            self._registry.leave(batch)
        elif failure is not None:
            self._registry.fail(batch, f"Batch failed: {failure}")
        elif self._leaves_unfinished(batch):
            self._registry.leave(batch)
        else:
            reason = self._cancel_reasons.get(batch.id, _SHUTDOWN)
            self._registry.cancel_unfinished(batch, reason)
            self._registry.finish_batch(batch, BatchStatus.CANCELLED, _cancelled_message(reason))
        self._ended.add(batch.id)

    async def _run_batch(self, batch: Batch, sent: asyncio.Future[None] | None) -> None:
        bind_batch(batch.id, batch.owner)  # what this task logs names the batch
        registry = self._registry
        try:
            if sent is not None and self._batch_slots.locked():
                _set(sent)  # queued: nothing is sent until a slot is free
            # The outputs are written inside the slot, so the batches that show
            # ``processing`` never outnumber ``max_concurrent_batches``.
            async with self._batch_slots:
                self._queued.discard(batch.id)
                registry.start_batch(batch)
                try:
                    await self._run_rows(batch, sent)
                finally:
                    # Whatever stopped them: no wait for the first calls outlives the rows.
                    if sent is not None:
                        _set(sent)
                # Every row's end is visible from here on: the counts are complete.
                await registry.flush()
                if _rows_left(batch) and self._leaves_unfinished(batch):
                    registry.leave(batch)
                    self._ended.add(batch.id)
                    return
                if batch.id in self._over_budget:
                    status = BatchStatus.CANCELLED
                    message = _cancelled_message(
                        _budget_reached(batch, self._over_budget[batch.id])
                    )
                elif batch.counts[ExecutionStatus.CANCELLED]:
                    status, message = BatchStatus.CANCELLED, _cancelled_message(_SHUTDOWN)
                else:
                    status, message = BatchStatus.COMPLETED, _completed_message(batch)
                await self._settle(batch, status, message)
        except asyncio.CancelledError:
            if batch.id not in self._ended:
                if (
                    batch.id in self._failures
                    or batch.id in self._abandoned
                    or self._leaves_unfinished(batch)
                ):
                    self._stopped(batch)
                else:
                    reason = self._cancel_reasons.get(batch.id, _SHUTDOWN)
                    registry.cancel_unfinished(batch, reason)
                    await self._settle(batch, BatchStatus.CANCELLED, _cancelled_message(reason))
            raise
        except Exception as exc:
            log.exception("batch %s failed", batch.id)
            # A worker's error arrives wrapped by the TaskGroup: name the error itself.
            while isinstance(exc, ExceptionGroup):
                exc = exc.exceptions[0]
            registry.cancel_unfinished(batch, "The batch failed before this execution ended.")
            registry.finish_batch(batch, BatchStatus.FAILED, f"Batch failed: {exc}")
            self._ended.add(batch.id)

    async def _settle(self, batch: Batch, status: BatchStatus, message: str) -> None:
        """Record the outputs and end the batch as ``status``, whatever happens meanwhile.

        Once every row has ended, a cancellation can no longer change the
        outcome: recording runs to its end and the batch is finished, and only
        then is the cancellation passed on. The writer only names the workbook
        here (the server's writes it after the batch has ended), so ``done``
        waits for no file.
        """
        writing = asyncio.ensure_future(self._write_outputs(batch))
        cancelled = await _awaited_through_cancels(writing)
        error = writing.exception()
        if error is not None:
            log.error("batch %s: could not write its outputs", batch.id, exc_info=error)
            status, message = (
                BatchStatus.FAILED,
                f"Batch failed: could not write its outputs: {error}",
            )
        if batch.id in self._abandoned:
            self._registry.leave(batch)  # another replica ends it
        elif (failure := self._failures.get(batch.id)) is not None:
            # The store refused a change meanwhile (a cancel's, say): the batch fails.
            self._registry.fail(batch, f"Batch failed: {failure}")
        else:
            self._registry.finish_batch(batch, status, message)
        self._ended.add(batch.id)
        if cancelled:
            raise asyncio.CancelledError

    async def _run_rows(self, batch: Batch, sent: asyncio.Future[None] | None = None) -> None:
        """Run every row not yet ended on ``max_threads`` workers, in ``ReadyRows`` order;
        ``sent`` is set once the workers have started (their first calls are made in
        the turn they start in, before anything woken by ``sent``)."""
        plan = batch.plan
        if plan is None:
            raise RuntimeError("a batch runs with a plan")
        max_threads = self._settings.max_threads
        if len(plan.rows) > _SET_UP_INLINE_ROWS:
            # New objects, shared with nothing until it returns: set up in a
            # thread, so that a batch of 100,000 rows does not hold the loop.
            run = await asyncio.to_thread(_RowsRun.of, batch, plan, max_threads)
        else:
            run = _RowsRun.of(batch, plan, max_threads)
        if run is None:
            return
        rows, outputs, spent, ready = run.rows, run.outputs, run.spent, run.ready

        async def work() -> None:
            while (index := await ready.take()) is not None:
                started = time.perf_counter()
                waited = await self._run_row(batch, rows[index], outputs, spent)
                ready.ended(index)
                took = time.perf_counter() - started
                if took >= _CALLED_S:
                    # It waited for its model: the loop has run meanwhile, and a
                    # wave of calls ending together starts its next calls in the
                    # turn it ends in, as unpaced (a pause here cost the 0.1 s
                    # waves of make bench's floor 1.5 %).
                    continue
                if waited or took >= slices.SLICE_S:
                    # It waited for its end to be durable: the loop ran meanwhile.
                    slices.resumed()
                # Rows that end without I/O (an instant model, skipped dependents)
                # never hand the loop back on their own; nor do many workers woken
                # together by one group commit, each running a row.
                await slices.pause()

        async with asyncio.TaskGroup() as group:
            for _ in range(run.workers):
                group.create_task(work())
            if sent is not None:
                _set(sent)
        if batch.id in self._over_budget:
            # Said at the end: what the batch spent, the rows in flight then included.
            self._over_budget[batch.id] = spent.total

    async def _run_row(
        self, batch: Batch, row: PlannedRow, outputs: dict[int, str], spent: _Spent
    ) -> bool:
        """End one ready row: run it, or skip or cancel it without calling its model.
        Whether it waited for its end to be durable (``Registry.flush``).

        Once the batch's rows have cost its ``max_cost``, no other row is sent:
        the rows in flight finish (a budget is exceeded by their cost at
        most), the others end cancelled.
        """
        if self._stopping and self._leaves_unfinished(batch):
            return False  # left pending, for the next process to run
        max_cost = batch.options.max_cost
        if self._stopping:
            # Not started because of the shutdown (or its input was not), not failed.
            unsent: Outcome | None = Outcome(ExecutionStatus.CANCELLED, error=_SHUTDOWN)
        elif (
            max_cost is not None
            and spent.total >= max_cost
            # A budget of 0 sends no priced row; a row of an unpriced model costs nothing.
            and (spent.total > 0 or row.target.model.priced)
        ):
            self._over_budget.setdefault(batch.id, spent.total)
            unsent = Outcome(
                ExecutionStatus.CANCELLED,
                error=f"Cancelled: {_budget_reached(batch, spent.total)}.",
            )
        else:
            unsent = self._executor.refusal(row, outputs)
        if unsent is not None:
            attempts = batch.executions[row.index - 1].attempts
            self._finish_row(batch, row.index, replace(unsent, attempts=attempts), None)
            return False
        prompt = row.sent_prompt(outputs)
        # Calls made in earlier lives of the row (it was running when a process died).
        earlier = batch.executions[row.index - 1].attempts
        self._registry.start_execution(batch, row.index, prompt, earlier + 1)
        cache = batch.options.cache
        if cache is None:
            cache = row.target.model.cache or self._settings.cache_answers
        outcome = await self._executor.run(
            row, prompt, earlier, cached_for=batch.owner if cache else None
        )
        spent.total += outcome.cost or 0.0
        self._finish_row(batch, row.index, outcome, prompt)
        # The worker takes no other row until this one's end is durable: a process
        # killed at any moment then sends again only the rows in flight, one a
        # worker, and a dependent only ever uses a stored output. Commits are
        # grouped, so this costs one commit's wait, shared by every worker.
        waited = await self._registry.flush()
        if outcome.status is ExecutionStatus.SUCCEEDED and outcome.result is not None:
            outputs[row.index] = outcome.result
        return waited

    def _finish_row(self, batch: Batch, index: int, outcome: Outcome, prompt: str | None) -> None:
        """Record how row ``index`` ended; a failure is logged here, once, naming its batch."""
        self._registry.finish_execution(batch, index, outcome, prompt)
        if self._log_failed_rows and outcome.status in _FAILURES:
            log.warning(
                "batch %s: execution %d (%s) %s: %s",
                batch.id,
                index,
                batch.executions[index - 1].model,
                outcome.status.value.replace("_", " "),
                outcome.error,
                extra={"batch_id": batch.id, "owner": batch.owner},
            )

    async def _write_outputs(self, batch: Batch) -> None:
        """Hand the batch to the outputs writer and record the workbook it names."""
        if self._outputs is None:
            return
        # Rows ended just before (a cancel) must be in the outputs.
        await self._registry.flush()
        outputs = await self._outputs(batch)
        await self._registry.set_outputs(batch, xlsx_name=outputs.xlsx_name)


_SHUTDOWN = "Cancelled: the server shut down."
#: A row that took this long waited for its model's answer, not only for its end's
#: commit (a few milliseconds): its worker goes on to the next row unpaced.
_CALLED_S = 0.02
#: The ends of a row that are logged: it was sent, or meant to be, and did not succeed.
_FAILURES = frozenset({ExecutionStatus.FAILED, ExecutionStatus.TIMED_OUT})
_BY_REQUEST = "Cancelled by request."


@dataclass
class _Spent:
    """What a running batch's rows have cost so far, as their outcomes arrive."""

    total: float


#: Batches of more rows than this are set up to run off the event loop.
_SET_UP_INLINE_ROWS = 2000


@dataclass
class _RowsRun:
    """What ``Engine._run_rows`` follows: the rows to run, in ``ReadyRows`` order."""

    rows: dict[int, PlannedRow]
    #: The answers ``${output.n}`` takes, by row.
    outputs: dict[int, str]
    spent: _Spent
    ready: ReadyRows
    workers: int

    @classmethod
    def of(cls, batch: Batch, plan: BatchPlan, max_threads: int) -> _RowsRun | None:
        """The run of ``batch``'s rows not yet ended; None when every one has."""
        rows = {row.index: row for row in plan.rows}
        outputs: dict[int, str] = {}
        # What its rows have cost so far: those a restart or a retry keeps count too.
        spent = _Spent(sum(execution.cost or 0.0 for execution in batch.executions))
        for execution in batch.executions:
            # A retry's rows that succeeded before are already ended; their
            # results feed the ${output.n} of the rows that run again.
            if execution.status is ExecutionStatus.SUCCEEDED and execution.result is not None:
                outputs[execution.index] = execution.result
        pending = {index for index in rows if not batch.executions[index - 1].status.finished}
        if not pending:
            return None
        workers = min(max_threads, len(pending))
        ready = ReadyRows(
            {index: rows[index].depends_on for index in pending},
            plan.chain_lengths(),
            workers=workers,
        )
        return cls(rows, outputs, spent, ready, workers)


def _set(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


async def _awaited_through_cancels(work: asyncio.Future[Any]) -> bool:
    """Wait for ``work`` to end, even through cancels: whether one came meanwhile."""
    cancelled = False
    while not work.done():
        try:
            await asyncio.shield(work)
        except asyncio.CancelledError:
            cancelled = True
        except Exception:
            break
    return cancelled


def _budget_reached(batch: Batch, spent: float) -> str:
    return f"budget reached ({spent:.6g} spent of max_cost {batch.options.max_cost:g})"


def _cancelled_message(reason: str) -> str:
    return f"Batch cancelled ({reason.rstrip('.')}); finished executions kept."


def _rows_left(batch: Batch) -> int:
    counts = batch.counts
    return counts[ExecutionStatus.PENDING] + counts[ExecutionStatus.RUNNING]


def _all_rows_ended(batch: Batch) -> bool:
    return _rows_left(batch) == 0


def _completed_message(batch: Batch) -> str:
    total = len(batch.executions)
    succeeded = batch.counts[ExecutionStatus.SUCCEEDED]
    errors = total - succeeded
    if errors == 0:
        return "Execution completed successfully."
    if succeeded == 0:
        if total == 1:
            return "Execution completed, but its one execution failed."
        return f"Execution completed, but all {total} executions failed."
    noun = "error" if errors == 1 else "errors"
    return f"Execution completed with {errors} {noun}."
