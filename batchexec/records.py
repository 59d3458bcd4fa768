"""The records of batches and executions: plain data that a store saves and loads.

Nothing here knows of live state (event watchers, tasks, the plan a running
batch follows): a ``Batch`` read back from a database after a restart is the
same as the one the process that ran it held, and everything presented to
clients (results, outputs, the list) is built from these records alone.
"""

from __future__ import annotations

import bisect
from array import array
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from batchexec.columns import Cell, cell_text
from batchexec.planning import NO_BATCH_OPTIONS, BatchOptions, BatchPlan, RowInput


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


@dataclass(frozen=True, slots=True)
class Outcome:
    """Where an execution stands: its status and, once it has ended, how."""

    status: ExecutionStatus
    result: str | None = None
    error: str | None = None
    latency_ms: int | None = None
    #: Calls made to the model, over every run of the row (a restart runs a
    #: row that was running again, and counts on).
    attempts: int = 0
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    #: What its calls cost, in the catalog's currency, from the provider's reported
    #: tokens and the model's prices then; None when either is missing.
    cost: float | None = None
    #: Whether it was answered from the answer cache, without a call (its cost 0).
    cached: bool = False
    #: When the row ended, in its batch's order of ends (1, 2, ...); 0 until then.
    #: The results route's ``since`` cursor counts in these.
    seq: int = 0

    def running(self, attempts: int) -> Outcome:
        """This outcome as its row is sent again, ``attempts`` calls made with this one."""
        return self._copy(ExecutionStatus.RUNNING, attempts, self.seq)

    def numbered(self, seq: int) -> Outcome:
        """This outcome as the ``seq``-th end of its batch."""
        return self._copy(self.status, self.attempts, seq)

    def _copy(self, status: ExecutionStatus, attempts: int, seq: int) -> Outcome:
        # What dataclasses.replace does at half its cost: every row's start and end
        # make one.
        return Outcome(
            status,
            result=self.result,
            error=self.error,
            latency_ms=self.latency_ms,
            attempts=attempts,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            cost=self.cost,
            cached=self.cached,
            seq=seq,
        )


#: Where every execution starts.
PENDING = Outcome(ExecutionStatus.PENDING)


@dataclass(slots=True)
class Execution:
    """One row of a batch: its input cells, the prompt as sent, and its outcome.

    ``status``, ``result`` and the other fields of ``Outcome`` read through to
    ``outcome``; the registry changes a row by giving it a new outcome.
    """

    index: int
    #: The model that runs it (an assistant's model for an assistant's row).
    model: str
    #: The row's input cells by column, ``prompt`` (as written) among them; a
    #: workbook's numbers and booleans stay numbers and booleans.
    cells: Mapping[str, Cell]
    outcome: Outcome = PENDING
    #: The prompt as sent, ``${output.n}`` filled in; None until it is sent.
    prompt_sent: str | None = None

    @property
    def status(self) -> ExecutionStatus:
        return self.outcome.status

    @property
    def result(self) -> str | None:
        return self.outcome.result

    @property
    def error(self) -> str | None:
        return self.outcome.error

    @property
    def latency_ms(self) -> int | None:
        return self.outcome.latency_ms

    @property
    def attempts(self) -> int:
        return self.outcome.attempts

    @property
    def prompt_tokens(self) -> int | None:
        return self.outcome.prompt_tokens

    @property
    def completion_tokens(self) -> int | None:
        return self.outcome.completion_tokens

    @property
    def cost(self) -> float | None:
        return self.outcome.cost

    @property
    def cached(self) -> bool:
        return self.outcome.cached

    @property
    def seq(self) -> int:
        return self.outcome.seq

    @property
    def row_input(self) -> RowInput:
        """The row as it was submitted, to plan it again (a resume, a retry)."""
        cells = self.cells
        return RowInput(
            prompt=self._text("prompt") or "",
            model=self._text("model"),
            assistant=self._text("assistant"),
            cells=cells,
        )

    def _text(self, column: str) -> str | None:
        """The text of the cell ``column``; None when the row has none."""
        cell = self.cells.get(column)
        return None if cell is None else cell_text(cell)

    @property
    def by_assistant(self) -> bool:
        """Whether the row named an assistant rather than a model."""
        return bool((self._text("assistant") or "").strip())

    def input_bytes(self) -> int:
        """About what the row's input holds in memory: its cells, and the objects around it."""
        text = sum(len(value) if isinstance(value, str) else 8 for value in self.cells.values())
        # Measured: about 600 bytes a row of short text, read back from the store.
        return 700 + text

    def outcome_bytes(self) -> int:
        """About what the row's end added: the prompt as sent, the answer, the error."""
        outcome = self.outcome
        return len(self.prompt_sent or "") + len(outcome.result or "") + len(outcome.error or "")


@dataclass
class Batch:
    """One submitted batch; read it freely, change it through ``Registry``."""

    id: str
    owner: str
    #: The input columns, in the input's order.
    columns: tuple[str, ...]
    executions: list[Execution]
    created_at: float
    status: BatchStatus = BatchStatus.QUEUED
    message: str = "Batch is queued."
    started_at: float | None = None
    finished_at: float | None = None
    xlsx_name: str | None = None
    #: The batch whose failed rows this one reruns.
    retry_of: str | None = None
    #: Where its end is POSTed (``webhooks.py``); None for no completion webhook.
    callback_url: str | None = None
    #: ``openai`` for a batch of the OpenAI Batch API (``web/v1``), whose rows are requests.
    api: str | None = None
    #: The models it runs side by side, its answer schema (``planning.BatchOptions``).
    options: BatchOptions = NO_BATCH_OPTIONS
    counts: Counter[ExecutionStatus] = field(default_factory=Counter)
    #: What a running batch follows: targets and dependencies. None for a batch
    #: read back from a store, until it is planned again to run.
    plan: BatchPlan | None = field(default=None, repr=False, compare=False)
    #: The last ``seq`` given to an end (shown or not yet).
    last_seq: int = field(default=0, init=False, repr=False, compare=False)
    #: The ends clients can see, in the order they ended: each one's seq and row,
    #: and the tokens they used, so a poll costs what changed, not every row.
    _shown_seqs: array[int] = field(init=False, repr=False, compare=False)
    _shown_rows: array[int] = field(init=False, repr=False, compare=False)
    _tokens: list[int] = field(init=False, repr=False, compare=False)
    #: Over the ends shown: their cost, and how many of those sent lack one.
    _cost: list[float] = field(init=False, repr=False, compare=False)
    #: The same by model: cost, rows without one, prompt and completion tokens.
    _by_model: dict[str, list[float]] = field(init=False, repr=False, compare=False)
    #: ``size_bytes``, kept as rows end: adding up 100,000 rows would hold the event loop.
    _size: int = field(init=False, repr=False, compare=False)
    #: The rows running now, in the order they started (``running``).
    _running: dict[int, None] = field(init=False, repr=False, compare=False)
    #: Of the ends shown, those answered from the answer cache.
    _cached: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts.update(execution.status for execution in self.executions)
        self._size = 1000 + sum(execution.input_bytes() for execution in self.executions)
        self._running = {
            e.index: None for e in self.executions if e.status is ExecutionStatus.RUNNING
        }
        self._shown_seqs, self._shown_rows, self._tokens = array("q"), array("q"), [0, 0]
        self._cost = [0.0, 0, 0]
        self._by_model = {}
        self._cached = 0
        ended = sorted((e.seq, e.index) for e in self.executions if e.status.finished)
        for _, index in ended:
            self.shown(self.executions[index - 1])
        self.last_seq = ended[-1][0] if ended else 0

    def next_seq(self) -> int:
        """The ``seq`` of the next end."""
        self.last_seq += 1
        return self.last_seq

    def moved(self, execution: Execution, outcome: Outcome) -> None:
        """``execution`` takes ``outcome`` (the registry calls this): the counts by status,
        the running rows and, once it has ended, what clients may see follow."""
        status = outcome.status
        self.counts[execution.outcome.status] -= 1
        self.counts[status] += 1
        execution.outcome = outcome
        if status is ExecutionStatus.RUNNING:
            self._running[execution.index] = None
        else:
            self._running.pop(execution.index, None)
            if status is not ExecutionStatus.PENDING:
                self.shown(execution)

    def running(self) -> list[Execution]:
        """The executions running now, in the order they started."""
        return [self.executions[index - 1] for index in self._running]

    def shown(self, execution: Execution) -> None:
        """``execution`` ended and clients may now see it (``moved`` calls this)."""
        # Read from the outcome, not through the execution's properties: every row's
        # end passes here.
        outcome = execution.outcome
        self._shown_seqs.append(outcome.seq)
        self._shown_rows.append(execution.index)
        self._size += execution.outcome_bytes()
        self._cached += outcome.cached
        prompt_tokens = outcome.prompt_tokens or 0
        completion_tokens = outcome.completion_tokens or 0
        self._tokens[0] += prompt_tokens
        self._tokens[1] += completion_tokens
        model = self._by_model.get(execution.model)
        if model is None:
            model = self._by_model[execution.model] = [0.0, 0, 0, 0, 0]
        model[2] += prompt_tokens
        model[3] += completion_tokens
        if outcome.cost is not None:
            self._cost[0] += outcome.cost
            self._cost[2] += 1
            model[0] += outcome.cost
            model[4] += 1
        elif outcome.attempts:
            self._cost[1] += 1
            model[1] += 1

    def ended_since(self, seq: int) -> tuple[list[Execution], int]:
        """The executions shown ended after ``seq``, in the order they ended, and the cursor
        to ask from next (the last one's seq, else ``seq``)."""
        start = bisect.bisect_right(self._shown_seqs, seq)
        rows = self._shown_rows[start:]
        cursor = self._shown_seqs[-1] if len(rows) else seq
        return [self.executions[index - 1] for index in rows], cursor

    @property
    def cursor(self) -> int:
        """The seq of the last end shown; 0 before any."""
        return self._shown_seqs[-1] if self._shown_seqs else 0

    @property
    def file_name(self) -> str:
        """Name of this batch's workbook in the results folder."""
        return self.file_name_for(self.id)

    @staticmethod
    def file_name_for(batch_id: str) -> str:
        """Name of the workbook of batch ``batch_id``."""
        return f"batch_execution_{batch_id}.xlsx"

    def tokens(self) -> tuple[int, int]:
        """Prompt and completion tokens over the ended executions; rows with no usage count 0."""
        return self._tokens[0], self._tokens[1]

    def cost(self) -> tuple[float | None, int]:
        """The cost of the ended executions that have one (None when none has), and how
        many were sent and have none (an unpriced model, or no usage reported): those
        are not counted as zero."""
        return (self._cost[0] if self._cost[2] else None), int(self._cost[1])

    def cached(self) -> int:
        """How many of the ended executions were answered from the answer cache."""
        return self._cached

    def usage_by_model(self) -> dict[str, tuple[float | None, int, int, int]]:
        """By model, over the ended executions: cost (None when no row has one),
        executions sent without one, and prompt and completion tokens."""
        return {
            name: (cost if costed else None, int(uncosted), int(prompt), int(completion))
            for name, (cost, uncosted, prompt, completion, costed) in self._by_model.items()
        }

    def size_bytes(self) -> int:
        """About what the batch holds in memory: its rows' input, and the ends shown."""
        return self._size


@dataclass(frozen=True)
class Summary:
    """A batch as the list route shows it, without its rows."""

    id: str
    status: BatchStatus
    message: str
    created_at: float
    finished_at: float | None
    retry_of: str | None
    #: None when the store keeps no counts for it (a batch not finished): ask the store.
    counts: Counter[ExecutionStatus] | None
    #: What its rows cost, in the catalog's currency; None when none has a cost (or, for
    #: a batch running elsewhere, until it ends).
    cost: float | None = None


def progress_counts(counts: Counter[ExecutionStatus]) -> dict[str, int]:
    """Executions per state; ``failed`` includes timed out, and the counts add up to ``total``."""
    return {
        "total": sum(counts.values()),
        "succeeded": counts[ExecutionStatus.SUCCEEDED],
        "failed": counts[ExecutionStatus.FAILED] + counts[ExecutionStatus.TIMED_OUT],
        "skipped": counts[ExecutionStatus.SKIPPED],
        "cancelled": counts[ExecutionStatus.CANCELLED],
        "running": counts[ExecutionStatus.RUNNING],
        "pending": counts[ExecutionStatus.PENDING],
    }
