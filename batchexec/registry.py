"""The invocation registry: every batch and execution, and the only place their state changes.

Handlers and the engine read ``Batch`` objects but change them only through
``Registry`` methods, so a journal to disk can later sit behind these methods
without touching either of them.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from batchexec.errors import NotFoundError
from batchexec.planning import BatchPlan


class BatchStatus(StrEnum):
    """Where a batch is in its life."""

    #: Accepted, waiting for a free batch slot.
    QUEUED = "queued"
    #: Its executions are running.
    PROCESSING = "processing"
    #: Every execution ended, whatever its outcome.
    COMPLETED = "completed"
    #: The batch itself could not run.
    FAILED = "failed"
    #: Stopped before every execution ended.
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        """Whether the batch will change no more."""
        return self not in (BatchStatus.QUEUED, BatchStatus.PROCESSING)


class ExecutionStatus(StrEnum):
    """Where one execution is in its life."""

    #: Waiting for its inputs or for a free slot.
    PENDING = "pending"
    #: A model call is in progress.
    RUNNING = "running"
    #: The model answered.
    SUCCEEDED = "succeeded"
    #: The model call failed.
    FAILED = "failed"
    #: The model did not answer within the execution timeout.
    TIMED_OUT = "timed_out"
    #: Not sent: an execution it uses did not succeed.
    SKIPPED = "skipped"
    #: Stopped by a cancel or shutdown before it ended.
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        """Whether the execution has ended."""
        return self not in (ExecutionStatus.PENDING, ExecutionStatus.RUNNING)


@dataclass
class Execution:
    """One row of a batch and its outcome."""

    index: int
    model: str
    status: ExecutionStatus = ExecutionStatus.PENDING
    #: The prompt as sent, ``${output.n}`` filled in; None until it is sent.
    prompt_sent: str | None = None
    result: str | None = None
    error: str | None = None
    latency_ms: int | None = None
    attempts: int = 0
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


@dataclass(frozen=True)
class Outcome:
    """How an execution ended."""

    status: ExecutionStatus
    result: str | None = None
    error: str | None = None
    latency_ms: int | None = None
    attempts: int = 0
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


@dataclass
class Batch:
    """One submitted batch; read it freely, change it through ``Registry``."""

    id: str
    owner: str
    plan: BatchPlan
    executions: list[Execution]
    created_at: float
    status: BatchStatus = BatchStatus.QUEUED
    message: str = "Batch is queued."
    started_at: float | None = None
    finished_at: float | None = None
    csv_content: str | None = None
    xlsx_name: str | None = None
    #: The batch whose failed rows this one reruns.
    retry_of: str | None = None
    counts: Counter[ExecutionStatus] = field(default_factory=Counter)
    #: Queues of the event streams watching this batch.
    watchers: set[asyncio.Queue[Event]] = field(default_factory=set, repr=False)

    @property
    def file_name(self) -> str:
        """Name of this batch's workbook in the results folder."""
        return self.file_name_for(self.id)

    @staticmethod
    def file_name_for(batch_id: str) -> str:
        """Name of the workbook of batch ``batch_id``."""
        return f"batch_execution_{batch_id}.xlsx"


@dataclass(frozen=True)
class Event:
    """A change worth telling a watcher: ``execution``, ``progress`` or ``done``."""

    name: str
    data: Mapping[str, Any]


def execution_event(execution: Execution) -> Event:
    """The ``execution`` event of an execution that has ended."""
    return Event(
        "execution",
        {
            "index": execution.index,
            "status": execution.status.value,
            "latency_ms": execution.latency_ms,
            "error": execution.error,
            "attempts": execution.attempts,
        },
    )


def progress_event(batch: Batch) -> Event:
    """The ``progress`` event: how many executions are in each state."""
    return Event("progress", progress_counts(batch))


def done_event(batch: Batch) -> Event:
    """The ``done`` event of a batch that has ended."""
    return Event("done", {"status": batch.status.value, "message": batch.message})


def progress_counts(batch: Batch) -> dict[str, int]:
    """Executions per state; ``failed`` includes timed out, and the counts add up to ``total``."""
    counts = batch.counts
    return {
        "total": len(batch.executions),
        "succeeded": counts[ExecutionStatus.SUCCEEDED],
        "failed": counts[ExecutionStatus.FAILED] + counts[ExecutionStatus.TIMED_OUT],
        "skipped": counts[ExecutionStatus.SKIPPED],
        "cancelled": counts[ExecutionStatus.CANCELLED],
        "running": counts[ExecutionStatus.RUNNING],
        "pending": counts[ExecutionStatus.PENDING],
    }


class Registry:
    """In-memory batches by id, each owned by the API key (a digest of it) that created it."""

    def __init__(self) -> None:
        self._batches: dict[str, Batch] = {}
        #: Workbooks in the results folder, by file name: owner and when written.
        self._files: dict[str, tuple[str, float]] = {}
        #: The workbooks among them that are templates, no batch's outputs.
        self._templates: set[str] = set()

    @staticmethod
    def new_id() -> str:
        """A fresh invocation id."""
        return str(uuid.uuid4())

    def add(
        self,
        owner: str,
        plan: BatchPlan,
        *,
        batch_id: str | None = None,
        retry_of: Batch | None = None,
    ) -> Batch:
        """Register a new ``queued`` batch for ``plan``, under ``batch_id`` when given.

        With ``retry_of``, the rows that succeeded there are copied over as
        already ``succeeded``; only the others are left to run.
        """
        batch = Batch(
            id=batch_id or self.new_id(),
            owner=owner,
            plan=plan,
            executions=[Execution(row.index, row.target.model.name) for row in plan.rows],
            created_at=time.time(),
            retry_of=retry_of.id if retry_of else None,
        )
        batch.counts[ExecutionStatus.PENDING] = len(batch.executions)
        for earlier in retry_of.executions if retry_of else ():
            if earlier.status is ExecutionStatus.SUCCEEDED:
                execution = batch.executions[earlier.index - 1]
                execution.prompt_sent = earlier.prompt_sent
                self._end(batch, execution, _outcome_of(earlier))
        self._batches[batch.id] = batch
        return batch

    def get(self, batch_id: str, owner: str) -> Batch:
        """The batch ``batch_id`` if ``owner`` created it; otherwise ``NotFoundError``."""
        batch = self._batches.get(batch_id)
        if batch is None or batch.owner != owner:
            raise NotFoundError("Invocation ID not found")
        return batch

    def owned_by(self, owner: str, *, status: BatchStatus | None = None, limit: int) -> list[Batch]:
        """``owner``'s batches, newest first, of ``status`` when given, at most ``limit``."""
        found: list[Batch] = []
        for batch in reversed(self._batches.values()):
            if batch.owner == owner and (status is None or batch.status is status):
                found.append(batch)
                if len(found) == limit:
                    break
        return found

    def add_file(self, file_name: str, owner: str, *, template: bool = False) -> None:
        """Record that ``owner`` may download the workbook ``file_name``.

        A ``template`` is a workbook of rows not (yet) run; ``templates_of``
        counts them.
        """
        self._files[file_name] = (owner, time.time())
        if template:
            self._templates.add(file_name)
        else:
            self._templates.discard(file_name)

    def forget_file(self, file_name: str) -> None:
        """Nobody may download ``file_name`` any more (it was removed)."""
        self._files.pop(file_name, None)
        self._templates.discard(file_name)

    def templates_of(self, owner: str) -> list[float]:
        """When each of ``owner``'s template workbooks was written, oldest first."""
        return sorted(
            written_at
            for name in self._templates
            for file_owner, written_at in (self._files[name],)
            if file_owner == owner
        )

    def check_file(self, file_name: str, owner: str) -> None:
        """Raise ``NotFoundError`` unless ``owner`` may download ``file_name``."""
        entry = self._files.get(file_name)
        if entry is None or entry[0] != owner:
            raise NotFoundError("File not found")

    def start_batch(self, batch: Batch) -> None:
        """The batch got a slot and its executions begin."""
        batch.status = BatchStatus.PROCESSING
        batch.message = "Batch execution in progress."
        batch.started_at = time.time()
        if batch.watchers:
            self._publish(batch, progress_event(batch))

    def start_execution(self, batch: Batch, index: int, prompt: str) -> None:
        """Execution ``index`` (1-based) is being sent to its model as ``prompt``."""
        execution = batch.executions[index - 1]
        execution.prompt_sent = prompt
        self._move(batch, execution, ExecutionStatus.RUNNING)

    def finish_execution(self, batch: Batch, index: int, outcome: Outcome) -> None:
        """Execution ``index`` (1-based) ended with ``outcome``."""
        execution = batch.executions[index - 1]
        self._end(batch, execution, outcome)
        if batch.watchers:
            self._publish(batch, execution_event(execution))
            self._publish(batch, progress_event(batch))

    def cancel_unfinished(self, batch: Batch, reason: str) -> None:
        """Every execution that has not ended becomes ``cancelled``."""
        for execution in batch.executions:
            if not execution.status.finished:
                self._end(batch, execution, Outcome(ExecutionStatus.CANCELLED, error=reason))
                self._publish(batch, execution_event(execution))
        self._publish(batch, progress_event(batch))

    def set_outputs(self, batch: Batch, *, csv_content: str | None, xlsx_name: str | None) -> None:
        """Record the batch's CSV content and workbook."""
        batch.csv_content = csv_content
        batch.xlsx_name = xlsx_name
        if xlsx_name is not None:
            self.add_file(xlsx_name, batch.owner)

    def finish_batch(self, batch: Batch, status: BatchStatus, message: str) -> None:
        """The batch ended as ``status``; its watchers get ``done``."""
        batch.status = status
        batch.message = message
        batch.finished_at = time.time()
        self._publish(batch, done_event(batch))

    def expire(self, older_than: float) -> list[str]:
        """Forget finished batches and workbooks from before ``older_than`` (epoch seconds).

        Returns the file names whose workbooks should now be deleted.
        """
        for batch_id, batch in list(self._batches.items()):
            if batch.finished_at is not None and batch.finished_at < older_than:
                del self._batches[batch_id]
        active = {batch.file_name for batch in self._batches.values()}
        expired = [
            name
            for name, (_, written_at) in self._files.items()
            if written_at < older_than and name not in active
        ]
        for name in expired:
            del self._files[name]
            self._templates.discard(name)
        return expired

    @contextmanager
    def watch(self, batch: Batch) -> Iterator[asyncio.Queue[Event]]:
        """A queue that receives the batch's events while the block runs."""
        queue: asyncio.Queue[Event] = asyncio.Queue()
        batch.watchers.add(queue)
        try:
            yield queue
        finally:
            batch.watchers.discard(queue)

    @staticmethod
    def _publish(batch: Batch, event: Event) -> None:
        for queue in batch.watchers:
            queue.put_nowait(event)

    def _end(self, batch: Batch, execution: Execution, outcome: Outcome) -> None:
        execution.result = outcome.result
        execution.error = outcome.error
        execution.latency_ms = outcome.latency_ms
        execution.attempts = outcome.attempts
        execution.prompt_tokens = outcome.prompt_tokens
        execution.completion_tokens = outcome.completion_tokens
        self._move(batch, execution, outcome.status)

    @staticmethod
    def _move(batch: Batch, execution: Execution, status: ExecutionStatus) -> None:
        batch.counts[execution.status] -= 1
        batch.counts[status] += 1
        execution.status = status


def _outcome_of(execution: Execution) -> Outcome:
    return Outcome(
        execution.status,
        result=execution.result,
        error=execution.error,
        latency_ms=execution.latency_ms,
        attempts=execution.attempts,
        prompt_tokens=execution.prompt_tokens,
        completion_tokens=execution.completion_tokens,
    )
