"""The store interface: what the registry writes through, and reads back after a restart.

One interface for every backend: ``memory://`` (nothing outlives the
process), SQLite (one process, durable) and, later, PostgreSQL (several
processes sharing one batch space). It assumes no single writer: every
change is a small, self-contained ``Change`` applied in a group by
``apply``, each keyed by batch id and row, so two processes can write the
same database and a process can read back what another wrote. Every method
is a coroutine; implementations do their I/O off the event loop.
"""

from __future__ import annotations

import hashlib
import hmac
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from batchexec.errors import BatchexecError
from batchexec.records import Batch, BatchStatus, ExecutionStatus, Outcome, Summary


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
    async def apply(self, changes: Sequence[Change]) -> None:
        """Apply ``changes``, in order, in one transaction: all of them or none."""

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
