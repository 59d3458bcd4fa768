"""The invocation registry: every batch and execution, and the only place their state changes.

Handlers and the engine read ``Batch`` objects but change them only through
``Registry`` methods, so a journal to disk can later sit behind these methods
without touching either of them.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from enum import StrEnum

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
    counts: Counter[ExecutionStatus] = field(default_factory=Counter)

    @property
    def file_name(self) -> str:
        """Name of this batch's workbook in the results folder."""
        return self.file_name_for(self.id)

    @staticmethod
    def file_name_for(batch_id: str) -> str:
        """Name of the workbook of batch ``batch_id``."""
        return f"batch_execution_{batch_id}.xlsx"


class Registry:
    """In-memory batches by id, each owned by the API key (a digest of it) that created it."""

    def __init__(self) -> None:
        self._batches: dict[str, Batch] = {}
        #: Workbooks in the results folder, by file name, with their owner.
        self._files: dict[str, str] = {}

    @staticmethod
    def new_id() -> str:
        """A fresh invocation id."""
        return str(uuid.uuid4())

    def add(self, owner: str, plan: BatchPlan, *, batch_id: str | None = None) -> Batch:
        """Register a new ``queued`` batch for ``plan``, under ``batch_id`` when given."""
        batch = Batch(
            id=batch_id or self.new_id(),
            owner=owner,
            plan=plan,
            executions=[Execution(row.index, row.target.model.name) for row in plan.rows],
            created_at=time.time(),
        )
        batch.counts[ExecutionStatus.PENDING] = len(batch.executions)
        self._batches[batch.id] = batch
        return batch

    def get(self, batch_id: str, owner: str) -> Batch:
        """The batch ``batch_id`` if ``owner`` created it; otherwise ``NotFoundError``."""
        batch = self._batches.get(batch_id)
        if batch is None or batch.owner != owner:
            raise NotFoundError("Invocation ID not found")
        return batch

    def add_file(self, file_name: str, owner: str) -> None:
        """Record that ``owner`` may download the workbook ``file_name``."""
        self._files[file_name] = owner

    def check_file(self, file_name: str, owner: str) -> None:
        """Raise ``NotFoundError`` unless ``owner`` may download ``file_name``."""
        if self._files.get(file_name) != owner:
            raise NotFoundError("File not found")

    def start_batch(self, batch: Batch) -> None:
        """The batch got a slot and its executions begin."""
        batch.status = BatchStatus.PROCESSING
        batch.message = "Batch execution in progress."
        batch.started_at = time.time()

    def start_execution(self, batch: Batch, index: int, prompt: str) -> None:
        """Execution ``index`` (1-based) is being sent to its model as ``prompt``."""
        execution = batch.executions[index - 1]
        execution.prompt_sent = prompt
        self._move(batch, execution, ExecutionStatus.RUNNING)

    def finish_execution(self, batch: Batch, index: int, outcome: Outcome) -> None:
        """Execution ``index`` (1-based) ended with ``outcome``."""
        execution = batch.executions[index - 1]
        execution.result = outcome.result
        execution.error = outcome.error
        execution.latency_ms = outcome.latency_ms
        execution.attempts = outcome.attempts
        execution.prompt_tokens = outcome.prompt_tokens
        execution.completion_tokens = outcome.completion_tokens
        self._move(batch, execution, outcome.status)

    def cancel_unfinished(self, batch: Batch, reason: str) -> None:
        """Every execution that has not ended becomes ``cancelled``."""
        for execution in batch.executions:
            if not execution.status.finished:
                execution.error = reason
                self._move(batch, execution, ExecutionStatus.CANCELLED)

    def set_outputs(self, batch: Batch, *, csv_content: str | None, xlsx_name: str | None) -> None:
        """Record the batch's CSV content and workbook."""
        batch.csv_content = csv_content
        batch.xlsx_name = xlsx_name
        if xlsx_name is not None:
            self._files[xlsx_name] = batch.owner

    def finish_batch(self, batch: Batch, status: BatchStatus, message: str) -> None:
        """The batch ended as ``status``."""
        batch.status = status
        batch.message = message
        batch.finished_at = time.time()

    @staticmethod
    def _move(batch: Batch, execution: Execution, status: ExecutionStatus) -> None:
        batch.counts[execution.status] -= 1
        batch.counts[status] += 1
        execution.status = status
