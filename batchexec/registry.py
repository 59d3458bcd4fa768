"""The invocation registry: every batch and execution, and the only place their state changes.

Handlers and the engine read ``Batch`` records but change them only through
``Registry`` methods. Every change is written through the ``BatchStore``
behind it and becomes visible (in the records handlers read, and as an event
to watchers) only once the store has made it durable: at once for
``memory://``, after the group commit it joins for SQLite (``commits.py``).
A client can therefore never see a row finished that a crash could take back.

Batches that are queued or running live here in memory. Finished ones are
read back from the store when asked and kept in a small cache bounded by
bytes (``finished.py``), so memory does not grow with the batches kept.

Layering: ``web/`` and ``cli/`` above; the engine calls this; this calls the
store through ``GroupCommits``; the records (``records.py``) are plain data
that all of them share.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import replace

from batchexec.commits import GroupCommits, StoreFailure, Visible, nothing
from batchexec.errors import NotFoundError
from batchexec.events import (
    EventHub,
    done_event,
    execution_event,
    interrupted_event,
    progress_event,
    started_event,
)
from batchexec.finished import FinishedBatches
from batchexec.metrics import NO_METRICS, Metrics
from batchexec.planning import BatchPlan
from batchexec.records import (
    Batch,
    BatchStatus,
    Execution,
    ExecutionStatus,
    Outcome,
    Summary,
)
from batchexec.store import (
    BatchEnded,
    BatchStarted,
    BatchStore,
    Change,
    ExecutionEnded,
    ExecutionStarted,
    FileEntry,
    SharedStore,
    StoreError,
)

log = logging.getLogger(__name__)


class Registry:
    """Batches by id, each owned by the API key (a fingerprint of it) that created it."""

    def __init__(
        self,
        store: BatchStore,
        *,
        cache_bytes: int = 8 * 1024 * 1024,
        events: EventHub | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        """``metrics`` is told of each batch's and row's end and of each store write,
        and is what the engine that runs this registry's batches reports to."""
        self.store = store
        self.events = events or EventHub()
        self.metrics = metrics or NO_METRICS
        self._active: dict[str, Batch] = {}
        self._finished = FinishedBatches(cache_bytes)
        #: Changes on their way to a durable store; None for ``memory://``.
        self._commits = (
            GroupCommits(store, self._store_failed, self._lease_lost, metrics=self.metrics)
            if store.durable
            else None
        )
        #: Told when a change could not be written, so the batch can be failed.
        self.on_store_failure: StoreFailure | None = None
        #: Told when another replica has taken a batch over, so its work here stops.
        self.on_lease_lost: Callable[[str], None] | None = None
        #: Told of each batch that ended here, once its end is in the store (the webhooks,
        #: the OpenAI Batch API's output files).
        self.batch_ended_listeners: list[Callable[[Batch], None]] = []
        self._templates_lock = asyncio.Lock()
        #: Batches failed because the store refused their changes (rare, kept till exit).
        self._failed: dict[str, Batch] = {}
        #: Reads of finished batches from the store under way, by batch id.
        self._loading: dict[str, asyncio.Future[Batch | None]] = {}
        #: What holds the group commits back while ``storing`` makes a batch, by its id.
        self._holding: dict[str, asyncio.Future[None]] = {}

    async def start(self) -> None:
        """Start committing changes; call once the store is open."""
        if self._commits is not None:
            self._commits.start()

    async def close(self) -> None:
        """Commit what is pending, then stop."""
        if self._commits is not None:
            await self._commits.close()

    @property
    def shared(self) -> bool:
        """Whether other processes share the store (and run some of its batches)."""
        return isinstance(self.store, SharedStore)

    def _store_failed(self, batch_id: str, error: StoreError) -> None:
        if self.on_store_failure is not None:
            self.on_store_failure(batch_id, error)

    def _lease_lost(self, batch_id: str) -> None:
        batch = self._active.get(batch_id)
        if batch is not None:
            self.leave(batch)
        if self.on_lease_lost is not None:
            self.on_lease_lost(batch_id)

    @staticmethod
    def new_id() -> str:
        """A fresh invocation id."""
        return str(uuid.uuid4())

    async def add(
        self,
        owner: str,
        plan: BatchPlan,
        *,
        batch_id: str | None = None,
        retry_of: Batch | None = None,
        callback_url: str | None = None,
        api: str | None = None,
        hold: bool = True,
    ) -> Batch:
        """Register a new ``queued`` batch for ``plan``, under ``batch_id`` when given.

        It is in the store when this returns. With ``retry_of``, the rows that
        succeeded there are copied over as already ``succeeded``; only the
        others are left to run. Its end is POSTed to ``callback_url``
        (``webhooks.py``). ``hold=False`` leaves it to whichever replica
        claims it (a shared store): this process keeps no record of it.
        """
        batch = await self.made(
            owner, plan, batch_id=batch_id, retry_of=retry_of, callback_url=callback_url, api=api
        )
        await self.store.create(batch)
        if hold:
            self._active[batch.id] = batch
        return batch

    async def made(
        self,
        owner: str,
        plan: BatchPlan,
        *,
        batch_id: str | None = None,
        retry_of: Batch | None = None,
        callback_url: str | None = None,
        api: str | None = None,
    ) -> Batch:
        """The new ``queued`` batch ``add`` makes, not yet stored nor held (``storing``)."""
        batch_id = batch_id or self.new_id()
        if len(plan.rows) > _BUILT_INLINE_ROWS:
            # Plain records, shared with nothing yet: made in a thread, so a
            # batch of 100,000 rows does not hold the event loop.
            batch = await asyncio.to_thread(
                _new_batch, batch_id, owner, plan, retry_of, callback_url
            )
        else:
            batch = _new_batch(batch_id, owner, plan, retry_of, callback_url)
        batch.api = api
        batch.options = plan.options
        return batch

    @contextlib.asynccontextmanager
    async def storing(
        self, batch: Batch, *, after: asyncio.Future[None] | None = None
    ) -> AsyncIterator[asyncio.Future[None]]:
        """Hold ``batch`` (from ``made``) and make it in the store while the block runs.

        The block may start the batch at once: until the batch is in the store
        no change of any batch is written, so none of its changes is durable,
        nor shown, before the batch itself is. It gets the store's write to
        await; the block must not end before that write has. If the write
        failed, what the batch recorded meanwhile is dropped (the block stops
        it first) and the batch is forgotten.

        With ``after``, the write starts once that future is done (the engine's
        batch has sent its first calls): a write in a thread would otherwise
        compete with them for the interpreter, and the first calls go out
        later for it.
        """
        loop = asyncio.get_running_loop()
        if self._commits is None:
            await self.store.create(batch)  # memory://: nothing to wait for
            self._active[batch.id] = batch
            created = loop.create_future()
            created.set_result(None)
            yield created
            return
        creating = asyncio.ensure_future(self._created(batch, after))
        self._active[batch.id] = batch
        written = self._holding[batch.id] = loop.create_future()
        self._commits.hold(written)
        try:
            yield creating
        finally:
            if not creating.done():
                # The block gave up on it: whatever it becomes, this process forgets it.
                creating.add_done_callback(_retrieved)
            if not creating.done() or creating.cancelled() or creating.exception() is not None:
                self.unstored(batch)
                self._active.pop(batch.id, None)
                self._commits.undrop(batch.id)
            self._holding.pop(batch.id, None)
            if not written.done():
                written.set_result(None)

    async def _created(self, batch: Batch, after: asyncio.Future[None] | None) -> None:
        if after is not None:
            await asyncio.wait([after])
        await self.store.create(batch)

    def unstored(self, batch: Batch) -> None:
        """``storing``'s batch could not be made in the store: whatever it records from now
        on is dropped (the block stops it), and the other batches' changes are written."""
        if self._commits is not None:
            self._commits.drop(batch.id)
        written = self._holding.get(batch.id)
        if written is not None and not written.done():
            written.set_result(None)

    async def discard(self, batch: Batch) -> None:
        """Forget a batch that was refused after it was stored: it will never run."""
        self._active.pop(batch.id, None)
        await self.store.delete(batch.id)

    async def get(self, batch_id: str, owner: str) -> Batch:
        """The batch ``batch_id`` if ``owner`` created it; otherwise ``NotFoundError``."""
        batch = self.cached(batch_id)
        if batch is None:
            batch = await self._load(batch_id)
        if batch is None or batch.owner != owner:
            raise NotFoundError("Invocation ID not found")
        return batch

    async def _load(self, batch_id: str) -> Batch | None:
        """The batch read back from the store; concurrent asks share one read."""
        loading = self._loading.get(batch_id)
        if loading is None:
            loading = self._loading[batch_id] = asyncio.ensure_future(self.store.load(batch_id))
            loading.add_done_callback(lambda _: self._loaded(batch_id))
        return await asyncio.shield(loading)

    def _loaded(self, batch_id: str) -> None:
        loading = self._loading.pop(batch_id)
        if not loading.cancelled() and loading.exception() is None:
            batch = loading.result()
            if batch is not None and batch.status.finished:
                self._finished.put(batch)

    def cached(self, batch_id: str) -> Batch | None:
        """The batch ``batch_id`` if it is in memory (running, or finished and cached or
        still held elsewhere: ``FinishedBatches``)."""
        return (
            self._active.get(batch_id) or self._failed.get(batch_id) or self._finished.get(batch_id)
        )

    async def owned_by(
        self, owner: str, *, status: BatchStatus | None = None, limit: int
    ) -> list[Summary]:
        """``owner``'s batches, newest first, of ``status`` when given, at most ``limit``.

        A running batch's counts are this process's: only what is durable is
        shown, so they are the store's without counting its rows again.
        """
        found = await self.store.summaries(owner, status=status, limit=limit)
        return [
            summary if summary.counts is not None else await self._counted(summary)
            for summary in found
        ]

    async def _counted(self, summary: Summary) -> Summary:
        live = self._active.get(summary.id)
        if live is None:
            return replace(summary, counts=await self.store.counts(summary.id))
        spent, _ = live.cost()
        return replace(summary, counts=live.counts.copy(), cost=spent)

    async def resumable(self) -> list[Batch]:
        """The batches a previous process left queued or running, now this one's to run."""
        batches = await self.store.unfinished()
        for batch in batches:
            self.adopt(batch)
        return batches

    def adopt(self, batch: Batch) -> None:
        """Make ``batch``, read back from the store unfinished, this process's to run.

        Rows that were running are pending again: they run again (at least
        once, not exactly once), their ``attempts`` counting on.
        """
        for execution in batch.executions:
            if execution.status is ExecutionStatus.RUNNING:
                batch.moved(execution, replace(execution.outcome, status=ExecutionStatus.PENDING))
        # Queued until it has a slot again, here as for a new batch.
        batch.status = BatchStatus.QUEUED
        batch.message = "Batch is queued."
        self._failed.pop(batch.id, None)  # what the store holds wins over an end never written
        self._active[batch.id] = batch

    def active_counts(self) -> Counter[BatchStatus]:
        """How many batches this process holds unfinished, by status (queued or processing)."""
        return Counter(batch.status for batch in self._active.values())

    def holds(self, batch_id: str) -> bool:
        """Whether this process runs (or is about to run) batch ``batch_id``."""
        return batch_id in self._active

    async def add_file(
        self, file_name: str, owner: str, *, batch_id: str, template: bool = False
    ) -> None:
        """Record that ``owner`` may download the workbook ``file_name``.

        A ``template`` is a workbook of rows not (yet) run; ``templates_of``
        counts them.
        """
        await self.store.add_file(FileEntry(file_name, owner, time.time(), batch_id, template))

    async def forget_file(self, file_name: str) -> None:
        """Nobody may download ``file_name`` any more (it was removed, or never written)."""
        await self.store.forget_file(file_name)

    async def check_file(self, file_name: str, owner: str) -> FileEntry:
        """The entry of ``file_name`` if ``owner`` may download it; else ``NotFoundError``."""
        entry = await self.store.file(file_name)
        if entry is None or entry.owner != owner:
            raise NotFoundError("File not found")
        return entry

    async def templates_of(self, owner: str) -> list[float]:
        """When each of ``owner``'s template workbooks was written, oldest first."""
        return await self.store.templates_of(owner)

    async def add_template(
        self, file_name: str, owner: str, *, batch_id: str, limit: int
    ) -> list[float] | None:
        """Record the template ``file_name`` unless ``owner`` keeps ``limit`` already.

        Returns None once it is recorded, else when each kept template was
        written. Checked and recorded under one lock, so concurrent requests
        cannot all pass the bound.
        """
        async with self._templates_lock:
            kept = await self.store.templates_of(owner)
            if len(kept) >= limit:
                return kept
            await self.add_file(file_name, owner, batch_id=batch_id, template=True)
            return None

    def start_batch(self, batch: Batch) -> None:
        """The batch got a slot and its executions begin."""
        started_at = time.time()

        def visible() -> None:
            batch.status = BatchStatus.PROCESSING
            batch.message = "Batch execution in progress."
            batch.started_at = started_at
            self.events.publish(batch.id, progress_event(batch))

        self._record(BatchStarted(batch.id, started_at), visible)

    def start_execution(self, batch: Batch, index: int, prompt: str, attempts: int) -> None:
        """Execution ``index`` (1-based) is being sent to its model as ``prompt``.

        ``attempts`` counts the calls made for it so far, this one included.
        """
        execution = batch.executions[index - 1]

        def visible() -> None:
            execution.prompt_sent = prompt
            running = execution.outcome.running(attempts)
            batch.moved(execution, running)
            if self.events.watched(batch.id):
                self.events.publish(batch.id, started_event(execution))

        self._record(ExecutionStarted(batch.id, index, prompt, attempts), visible)

    def finish_execution(
        self, batch: Batch, index: int, outcome: Outcome, prompt: str | None
    ) -> None:
        """Execution ``index`` (1-based) ended with ``outcome``, sent as ``prompt`` if at all."""
        execution = batch.executions[index - 1]

        def visible() -> None:
            if execution.status.finished:
                return  # a row's end is final (a cancel or a failure came first)
            if prompt is not None:
                execution.prompt_sent = prompt
            batch.moved(execution, outcome)
            self.metrics.execution_ended(outcome.status, execution.model)
            if self.events.watched(batch.id):
                self.events.publish(batch.id, execution_event(execution), progress_event(batch))

        outcome = outcome.numbered(batch.next_seq())
        self._record(ExecutionEnded(batch.id, index, outcome, prompt), visible)

    def cancel_unfinished(self, batch: Batch, reason: str) -> None:
        """Every execution that has not ended becomes ``cancelled``."""
        for execution in batch.executions:
            if execution.status.finished:
                continue
            cancelled = Outcome(
                ExecutionStatus.CANCELLED,
                error=reason,
                attempts=execution.attempts,
                seq=batch.next_seq(),
            )

            def visible(execution: Execution = execution, cancelled: Outcome = cancelled) -> None:
                if not execution.status.finished:
                    batch.moved(execution, cancelled)
                    self.metrics.execution_ended(cancelled.status, execution.model)
                    self.events.publish(batch.id, execution_event(execution))

            self._record(ExecutionEnded(batch.id, execution.index, cancelled, None), visible)
        self._record(None, lambda: self.events.publish(batch.id, progress_event(batch)))

    async def set_outputs(self, batch: Batch, *, xlsx_name: str | None) -> None:
        """Record the batch's workbook."""
        batch.xlsx_name = xlsx_name
        if xlsx_name is not None:
            await self.add_file(xlsx_name, batch.owner, batch_id=batch.id)

    def finish_batch(self, batch: Batch, status: BatchStatus, message: str) -> None:
        """The batch ended as ``status``; its watchers get ``done``."""
        finished_at = time.time()
        self._record(
            BatchEnded(batch.id, status, message, finished_at, batch.xlsx_name),
            lambda: self._ended(batch, status, message, finished_at),
        )

    def _ended(self, batch: Batch, status: BatchStatus, message: str, finished_at: float) -> None:
        """Show the batch's end: out of the running ones, into the cache; ``done`` told."""
        batch.status = status
        batch.message = message
        batch.finished_at = finished_at
        plan, batch.plan = batch.plan, None
        if plan is not None and len(plan.rows) > _BUILT_INLINE_ROWS:
            # Freeing 100,000 planned rows takes a while: let a thread do it. In a
            # list the thread empties, so that the thread's own arguments do not keep
            # the plan until it ends.
            threading.Thread(target=_drop, args=([plan],), daemon=True).start()
        del plan
        self._active.pop(batch.id, None)
        self._finished.put(batch)
        self.metrics.batch_ended(status)
        self.events.publish(batch.id, done_event(batch))
        for listener in self.batch_ended_listeners:
            listener(batch)

    def leave(self, batch: Batch) -> None:
        """Let go of an unfinished batch without ending it: a later process resumes it.

        Its watchers get ``interrupted``, so an event stream ends rather than
        waiting for a ``done`` that this process will not send.
        """
        self._active.pop(batch.id, None)
        self.events.publish(batch.id, interrupted_event(batch))

    def fail(self, batch: Batch, message: str) -> None:
        """End a batch whose changes the store refused: ``failed``, shown at once.

        What the store could not write was never shown (see ``_write_forever``);
        this end is shown whether or not it can be written, since this process
        will not go on with the batch. A later process resumes it from what the
        store holds.
        """
        reason = "The batch failed before this execution ended."
        for execution in batch.executions:
            if not execution.status.finished:
                cancelled = Outcome(
                    ExecutionStatus.CANCELLED,
                    error=reason,
                    attempts=execution.attempts,
                    seq=batch.next_seq(),
                )
                batch.moved(execution, cancelled)
                self.metrics.execution_ended(cancelled.status, execution.model)
                self._record(ExecutionEnded(batch.id, execution.index, cancelled, None), nothing)
        finished_at = time.time()
        self.events.publish(batch.id, progress_event(batch))
        self._ended(batch, BatchStatus.FAILED, message, finished_at)
        # Kept in memory whatever the cache holds: the store may never learn of this end.
        self._failed[batch.id] = batch
        self._record(
            BatchEnded(batch.id, BatchStatus.FAILED, message, finished_at, batch.xlsx_name),
            nothing,
        )

    async def flush(self) -> bool:
        """Wait until every change recorded so far is durable and visible; whether it
        waited (handing the event loop back), which ``memory://`` never does."""
        if self._commits is None:
            return False
        return await self._commits.flush()

    async def expire(self, older_than: float) -> list[str]:
        """Forget finished batches and workbooks from before ``older_than`` (epoch seconds).

        Returns the file names whose workbooks should now be deleted.
        """
        self._finished.drop_older(older_than)
        for batch_id, batch in list(self._failed.items()):
            if batch.finished_at is not None and batch.finished_at < older_than:
                del self._failed[batch_id]
        return await self.store.expire(older_than)

    def _record(self, change: Change | None, visible: Visible) -> None:
        if self._commits is None:
            visible()
        else:
            self._commits.record(change, visible)


#: Batches of more rows than this are made off the event loop.
_BUILT_INLINE_ROWS = 2000


def _retrieved(done: asyncio.Future[None]) -> None:
    """Take a finished future's outcome, so that asyncio does not log it as never read."""
    if not done.cancelled():
        done.exception()


def _drop(holding: list[BatchPlan]) -> None:
    """Let go of the plan ``holding`` holds, the last reference to it, a slice of rows at
    a time: freeing them all at once is one call into C that holds the interpreter
    (100,000 rows: 18-23 ms during which the event loop cannot run; in slices, at
    most 1-2 ms at a time)."""
    rows = list(holding.pop().rows)
    while rows:
        del rows[-_DROPPED_AT_ONCE:]


#: Planned rows ``_drop`` lets go of at a time.
_DROPPED_AT_ONCE = 500


def _new_batch(
    batch_id: str, owner: str, plan: BatchPlan, retry_of: Batch | None, callback_url: str | None
) -> Batch:
    """A ``queued`` batch for ``plan``; a retry's rows that succeeded there come ended."""
    batch = Batch(
        id=batch_id,
        owner=owner,
        columns=plan.columns,
        executions=[Execution(row.index, row.target.model.name, row.cells) for row in plan.rows],
        created_at=time.time(),
        retry_of=retry_of.id if retry_of else None,
        callback_url=callback_url,
        plan=plan,
    )
    for earlier in retry_of.executions if retry_of else ():
        if earlier.status is ExecutionStatus.SUCCEEDED:
            execution = batch.executions[earlier.index - 1]
            execution.prompt_sent = earlier.prompt_sent
            batch.moved(execution, earlier.outcome.numbered(batch.next_seq()))
    return batch
