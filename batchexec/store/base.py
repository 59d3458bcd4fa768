"""The store interface: what the registry writes through, and reads back after a restart.

One interface for every backend: ``memory://`` (nothing outlives the
process), SQLite (one process, durable) and PostgreSQL (several processes,
the replicas, sharing one batch space: ``SharedStore``). It assumes no single
writer: every change is a small, self-contained ``Change`` applied in a group
by ``apply``, each keyed by batch id and row, so two processes can write the
same database and a process can read back what another wrote. Every method
is a coroutine; implementations do their I/O off the event loop.

In a shared store a batch is run by the replica holding its *lease*
(``SharedStore.claim``), renewed by heartbeat and taken over by another
replica once it lapses; ``apply`` writes only the changes of batches whose
lease this process still holds, so a replica that lost one (a long pause, a
partition) can no longer change it.
"""

from __future__ import annotations

import hashlib
import hmac
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import AsyncIterator, Callable, Collection, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Literal, Protocol

from batchexec.errors import BatchexecError
from batchexec.records import Batch, BatchStatus, ExecutionStatus, Outcome, Summary

if TYPE_CHECKING:
    from batchexec.catalog import ModelSpec
    from batchexec.token_limits import TokenAccounts

__all__ = [
    "FILE_CHUNK_BYTES",
    "BatchEnded",
    "BatchStarted",
    "BatchStore",
    "CallbackDue",
    "CallbackState",
    "Change",
    "ExecutionEnded",
    "ExecutionStarted",
    "FileEntry",
    "Notice",
    "NoticeKind",
    "OpenAIBatch",
    "Renewal",
    "SharedLimits",
    "SharedStore",
    "StoreError",
    "StoredFile",
]


class StoreError(BatchexecError):
    """The store cannot be opened or written; the message says what to do."""


@dataclass(frozen=True, slots=True)
class BatchStarted:
    """A batch got a slot and its rows begin."""

    batch_id: str
    started_at: float


@dataclass(frozen=True, slots=True)
class ExecutionStarted:
    """Row ``index`` was sent to its model; ``attempts`` counts this run's first call."""

    batch_id: str
    index: int
    prompt_sent: str
    attempts: int


@dataclass(frozen=True, slots=True)
class ExecutionEnded:
    """Row ``index`` ended; ``prompt_sent`` is None for a row never sent."""

    batch_id: str
    index: int
    outcome: Outcome
    prompt_sent: str | None


@dataclass(frozen=True, slots=True)
class BatchEnded:
    """A batch ended as ``status``, with its workbook's name if one was written."""

    batch_id: str
    status: BatchStatus
    message: str
    finished_at: float
    xlsx_name: str | None


Change = BatchStarted | ExecutionStarted | ExecutionEnded | BatchEnded


@dataclass(frozen=True)
class FileEntry:
    """A workbook in the results folder, and who may download it."""

    name: str
    owner: str
    written_at: float
    #: The batch whose workbook it is; for a template, the id it was given.
    batch_id: str
    #: A workbook of rows not (yet) run, written by ``process_csv`` or ``upload``.
    template: bool


#: Bytes of one chunk of a stored file's content (``BatchStore.write_chunk``): an upload
#: or a batch's output is written, and read back, this much at a time.
FILE_CHUNK_BYTES = 1024 * 1024


@dataclass(frozen=True, slots=True)
class CachedAnswer:
    """An answer kept for its request, to be given again to the same key (``answer_cache``)."""

    result: str
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


@dataclass(frozen=True, slots=True)
class StoredFile:
    """A file of the OpenAI Batch API: an uploaded batch input, or a batch's output or errors.

    Its content is kept in the store in chunks (``write_chunk``, ``chunk``).
    """

    id: str
    owner: str
    #: ``batch`` for an upload; ``batch_output`` for a batch's output and error files.
    purpose: str
    filename: str
    created_at: float
    #: The content's size; 0 until the file is complete.
    bytes: int = 0


@dataclass(frozen=True, slots=True)
class OpenAIBatch:
    """A batch of the OpenAI Batch API, and how its batchexec batch of the same id stands.

    The last four fields are read from that batch (None where there is none:
    its input was invalid, and it failed at once with ``errors``).
    """

    id: str
    owner: str
    input_file_id: str
    endpoint: str
    completion_window: str
    #: The client's ``metadata``, as JSON text; None for none.
    metadata: str | None
    created_at: float
    expires_at: float
    request_total: int = 0
    #: The input's problems, as JSON text of OpenAI's ``errors.data``.
    errors: str | None = None
    failed_at: float | None = None
    cancelling_at: float | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    finalized_at: float | None = None
    #: When it was found still running past ``expires_at``, and cancelled.
    expired_at: float | None = None
    status: BatchStatus | None = None
    started_at: float | None = None
    finished_at: float | None = None
    counts: Counter[ExecutionStatus] | None = None


#: Where a batch's completion webhook is: to be sent (again), sent, or given up.
CallbackState = Literal["pending", "delivered", "failed"]


@dataclass(frozen=True, slots=True)
class CallbackDue:
    """A completion webhook due now: the ended batch, where to POST it, the attempts so far."""

    batch: Summary
    url: str
    attempts: int


class BatchStore(ABC):
    """Where batches, their rows and their workbooks' owners are kept."""

    #: Whether what it holds outlives the process (and so a batch resumes after a restart).
    durable: ClassVar[bool]

    def __init__(self) -> None:
        self._secret = b""

    def fingerprint(self, api_key: str) -> str:
        """The owner recorded for ``api_key``: a keyed digest, never the key itself.

        The key is this store's secret (made when the store was created), so a
        digest says nothing of a key outside this store.
        """
        return hmac.new(self._secret, api_key.encode(), hashlib.sha256).hexdigest()

    @abstractmethod
    async def open(self) -> None:
        """Connect, migrate the schema and load the secret; ``StoreError`` if it cannot."""

    @abstractmethod
    async def close(self) -> None:
        """Write what is pending and let go of the connection."""

    @abstractmethod
    async def create(self, batch: Batch) -> None:
        """Record a new batch and every one of its rows, at once."""

    @abstractmethod
    async def apply(self, changes: Sequence[Change]) -> frozenset[str]:
        """Apply ``changes``, in order, in one transaction: all of them or none.

        Returns the batches whose changes were not written because this
        process no longer holds their lease (only a ``SharedStore`` has
        leases; every other store returns an empty set).
        """

    @abstractmethod
    async def delete(self, batch_id: str) -> None:
        """Forget batch ``batch_id`` and its rows (one that was refused after it was stored)."""

    @abstractmethod
    async def load(self, batch_id: str) -> Batch | None:
        """The batch ``batch_id`` with its rows, as last written; None if there is none."""

    @abstractmethod
    async def summaries(
        self, owner: str, *, status: BatchStatus | None, limit: int
    ) -> list[Summary]:
        """``owner``'s batches, newest first, of ``status`` when given, at most ``limit``.

        A finished batch's counts are the ones stored with its end; an
        unfinished one's are None (see ``counts``), so a list costs no count
        over rows the caller may hold in memory.
        """

    @abstractmethod
    async def counts(self, batch_id: str) -> Counter[ExecutionStatus]:
        """Batch ``batch_id``'s rows per status, as stored."""

    @abstractmethod
    async def unfinished(self) -> list[Batch]:
        """Batches queued or processing when their process stopped, oldest first."""

    @abstractmethod
    async def add_file(self, entry: FileEntry) -> None:
        """Record a workbook (replacing an entry of the same name)."""

    @abstractmethod
    async def file(self, name: str) -> FileEntry | None:
        """The entry of workbook ``name``, if one is recorded."""

    @abstractmethod
    async def forget_file(self, name: str) -> None:
        """Drop the entry of workbook ``name`` (it was removed, or never written)."""

    @abstractmethod
    async def templates_of(self, owner: str) -> list[float]:
        """When each of ``owner``'s template workbooks was written, oldest first."""

    @abstractmethod
    async def expire(self, older_than: float) -> list[str]:
        """Forget finished batches and workbooks from before ``older_than`` (epoch seconds).

        Returns the names of the workbooks whose files should now be deleted.
        """

    # The answer cache: an answer kept for a request (a digest of it), for one owner.

    @abstractmethod
    async def cached_answer(self, owner: str, key: str, now: float) -> CachedAnswer | None:
        """The answer ``owner`` was given for request ``key``, unless it expired by ``now``."""

    @abstractmethod
    async def cache_answer(
        self, owner: str, key: str, answer: CachedAnswer, expires_at: float
    ) -> None:
        """Keep ``answer`` for ``owner``'s request ``key`` until ``expires_at`` (replacing any);
        ``expire`` forgets it after that."""

    # Files of the OpenAI Batch API: written a chunk at a time, so neither an upload nor
    # a download is ever held whole in memory; a file is seen once complete.

    @abstractmethod
    async def create_stored_file(self, file: StoredFile) -> None:
        """Record ``file``, incomplete and empty: ``write_chunk`` fills it, ``complete_file``
        shows it."""

    @abstractmethod
    async def write_chunk(self, file_id: str, seq: int, data: bytes) -> None:
        """Write chunk ``seq`` (0, 1, ...) of incomplete file ``file_id``."""

    @abstractmethod
    async def complete_file(self, file_id: str, size: int) -> None:
        """Show file ``file_id``, whose chunks hold ``size`` bytes in all."""

    @abstractmethod
    async def stored_file(self, file_id: str, owner: str) -> StoredFile | None:
        """The complete file ``file_id`` if ``owner`` has it; None otherwise."""

    @abstractmethod
    async def stored_files(
        self, owner: str, *, purpose: str | None, after: str | None, limit: int, newest_first: bool
    ) -> list[StoredFile]:
        """Up to ``limit`` of ``owner``'s complete files (of ``purpose``, if given), by
        creation time, from the one after file ``after`` in that order."""

    @abstractmethod
    async def chunk(self, file_id: str, seq: int) -> bytes | None:
        """Chunk ``seq`` of file ``file_id``; None past the last one."""

    async def chunks(self, file_id: str) -> AsyncIterator[bytes]:
        """File ``file_id``'s chunks in order, each read when the one before is used."""
        seq = 0
        while (data := await self.chunk(file_id, seq)) is not None:
            yield data
            seq += 1

    @abstractmethod
    async def delete_stored_file(self, file_id: str) -> None:
        """Forget file ``file_id`` and its content, complete or not."""

    @abstractmethod
    async def count_stored_files(self, owner: str) -> int:
        """How many files ``owner`` keeps, incomplete uploads included."""

    # Batches of the OpenAI Batch API: their own record beside the batch they run as.

    @abstractmethod
    async def create_openai_batch(self, batch: OpenAIBatch) -> None:
        """Record ``batch`` (its own fields; the batch it runs as is created apart)."""

    @abstractmethod
    async def delete_openai_batch(self, batch_id: str) -> None:
        """Forget the record of ``batch_id`` (its batch was refused: it never ran)."""

    @abstractmethod
    async def openai_batch(self, batch_id: str, owner: str) -> OpenAIBatch | None:
        """The OpenAI batch ``batch_id`` if ``owner`` created it."""

    @abstractmethod
    async def openai_batches(
        self, owner: str, *, after: str | None, limit: int
    ) -> list[OpenAIBatch]:
        """Up to ``limit`` of ``owner``'s OpenAI batches, newest first, from the one after
        ``after``."""

    @abstractmethod
    async def openai_cancelling(self, batch_id: str, at: float) -> None:
        """Record that a cancel of ``batch_id`` was asked at ``at`` (the first time only)."""

    @abstractmethod
    async def overdue_openai_batches(self) -> list[str]:
        """The OpenAI batches still running past their ``expires_at``, each marked
        ``expired_at`` (the first time it is found): they are to be cancelled."""

    @abstractmethod
    async def due_finalizations(self, limit: int, hold_s: float) -> list[OpenAIBatch]:
        """Up to ``limit`` OpenAI batches whose batch has ended and whose output files are
        not written, each held for ``hold_s`` from other callers."""

    @abstractmethod
    async def openai_finalized(
        self, batch_id: str, output_file_id: str | None, error_file_id: str | None, at: float
    ) -> bool:
        """Record the output and error files written for ``batch_id``, unless another
        process recorded its own first (then False: these are for the caller to delete)."""

    # Completion webhooks: a batch created with a ``callback_url`` has one pending,
    # due from its end; every attempt is recorded, so none is lost to a restart.

    @abstractmethod
    async def due_callbacks(self, limit: int, hold_s: float) -> list[CallbackDue]:
        """Up to ``limit`` webhooks of ended batches due now, the earliest ended first.

        Each is held for ``hold_s``: no caller, in this process or another,
        gets it again before then, unless ``callback_tried`` says otherwise. A
        caller that dies during its attempt leaves it due again once the hold
        ends.
        """

    @abstractmethod
    async def callback_tried(
        self, batch_id: str, attempts: int, state: CallbackState, retry_in_s: float = 0.0
    ) -> None:
        """Record an attempt at ``batch_id``'s webhook: ``attempts`` made in all, and
        ``state`` (``pending``: due again in ``retry_in_s``)."""

    @abstractmethod
    async def next_callback_in(self) -> float | None:
        """Seconds until a pending webhook of an ended batch is due (0 or less: one is
        due now); None when none is pending."""


#: What a ``Notice`` says of its batch: its rows or state changed (``changed``), it
#: was asked to stop (``cancel``), or it waits for a replica to claim it (``queued``).
NoticeKind = Literal["changed", "cancel", "queued"]


@dataclass(frozen=True, slots=True)
class Notice:
    """A change another process (or this one) made to the shared store, as it is told."""

    kind: NoticeKind
    batch_id: str


@dataclass(frozen=True)
class Renewal:
    """What a heartbeat learned: the leases still held, and which of them to cancel."""

    #: The batches whose lease was renewed: still this process's to run.
    held: frozenset[str]
    #: Of those, the ones some replica was asked to cancel, with the reason given.
    cancels: Mapping[str, str] = field(default_factory=dict)


class SharedLimits(Protocol):
    """Per-model limits across replicas (``limits.CallLimits``, with a lifetime)."""

    def call(self, model: ModelSpec) -> AbstractAsyncContextManager[object]:
        """Held around each request to ``model``."""
        ...

    async def start(self) -> None:
        """Begin; before the first limited call."""

    async def close(self) -> None:
        """End; after the last call, before the store closes."""


class SharedStore(BatchStore):
    """A store several processes share: each unfinished batch is run by its lease holder.

    ``replica`` names this process in the leases it takes. Lease times are the
    database's clock, never a replica's, so replicas need no synchronised
    clocks; a replica times its own leases from when it *sent* the claim or
    renewal, which is never later than the database's, so it stops before
    another replica can start.
    """

    durable = True
    #: Whether several processes share this store (and the engine runs batches by lease).
    shared: ClassVar[bool] = True

    def __init__(self, replica: str) -> None:
        super().__init__()
        self.replica = replica

    @abstractmethod
    async def claim(self, limit: int, lease_s: float) -> list[Batch]:
        """Take the lease of up to ``limit`` unfinished batches whose lease is free, oldest first.

        A lease is free when no replica holds it or its holder let it lapse.
        Beyond ``limit``, every free batch asked to cancel is claimed too (it
        is run only to be cancelled). Each lease lasts ``lease_s`` seconds.
        Batches are returned whole, as ``load`` gives them; two replicas
        claiming at once never get the same batch.
        """

    @abstractmethod
    async def renew(self, batch_ids: Collection[str], lease_s: float) -> Renewal:
        """Extend this process's leases of ``batch_ids`` by ``lease_s`` from now.

        A lease another replica has taken since, or of a batch that no longer
        exists, is not renewed (and so not in ``Renewal.held``).
        """

    @abstractmethod
    async def release(self, batch_ids: Collection[str]) -> None:
        """Give up this process's leases of ``batch_ids``: another replica may take them now."""

    @abstractmethod
    async def request_cancel(self, batch_id: str, reason: str) -> bool:
        """Ask whichever replica runs (or next claims) ``batch_id`` to cancel it.

        False when the batch has finished or does not exist. Tells every
        replica (a ``cancel`` notice).
        """

    @abstractmethod
    async def waiting(self) -> int:
        """Unfinished batches no replica holds a lease of, in the whole cluster."""

    @abstractmethod
    def token_limits(self, *, window_s: float, hold_s: float) -> TokenAccounts:
        """Each model's ``tpm``, held for every replica together, over ``window_s``.

        A reservation whose holder died lapses after ``hold_s``.
        """

    @abstractmethod
    def call_limits(self, *, hold_s: float) -> SharedLimits:
        """Each model's ``max_concurrency`` and ``rpm``, held for every replica together.

        A call's slot whose holder died frees itself after ``hold_s``.
        """

    @abstractmethod
    async def listen(self, on_notice: Callable[[Notice], None]) -> None:
        """Call ``on_notice`` (on the event loop) for every ``Notice`` until ``close``.

        Returns once listening. ``create`` tells ``queued``, ``apply`` tells
        ``changed`` for each batch it wrote, ``request_cancel`` tells
        ``cancel``. A lost connection is made again with backoff; notices sent
        meanwhile are lost, so a listener also polls now and then.
        """
