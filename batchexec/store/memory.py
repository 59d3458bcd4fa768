"""``memory://``: batches kept in this process only, for embedding and tests."""

from __future__ import annotations

import secrets
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import replace

from batchexec.records import Batch, BatchStatus, ExecutionStatus, Summary
from batchexec.store.base import (
    BatchStore,
    CachedAnswer,
    CallbackDue,
    CallbackState,
    Change,
    FileEntry,
    OpenAIBatch,
    StoredFile,
)


class MemoryStore(BatchStore):
    """Holds the registry's own records; nothing outlives the process.

    The records are the registry's objects, which it changes itself, so
    ``apply`` has nothing to write.
    """

    durable = False

    def __init__(self) -> None:
        super().__init__()
        self._batches: dict[str, Batch] = {}
        self._files: dict[str, FileEntry] = {}
        #: The OpenAI Batch API's files, whether each is complete, and their chunks.
        self._stored: dict[str, tuple[StoredFile, bool]] = {}
        self._answers: dict[tuple[str, str], tuple[CachedAnswer, float]] = {}
        self._chunks: dict[str, list[bytes]] = {}
        #: The OpenAI Batch API's batches, and until when each one's finalizing is held.
        self._openai: dict[str, OpenAIBatch] = {}
        self._finalizing: dict[str, float] = {}
        #: Each pending webhook's attempts so far and when it is due next.
        self._callbacks: dict[str, tuple[int, float]] = {}

    async def open(self) -> None:
        self._secret = secrets.token_bytes(32)

    async def close(self) -> None:
        pass

    async def create(self, batch: Batch) -> None:
        self._batches[batch.id] = batch
        if batch.callback_url:
            self._callbacks[batch.id] = (0, 0.0)

    async def apply(self, changes: Sequence[Change]) -> frozenset[str]:
        return frozenset()

    async def delete(self, batch_id: str) -> None:
        self._batches.pop(batch_id, None)
        self._callbacks.pop(batch_id, None)

    async def load(self, batch_id: str) -> Batch | None:
        return self._batches.get(batch_id)

    async def summaries(
        self, owner: str, *, status: BatchStatus | None, limit: int
    ) -> list[Summary]:
        found: list[Summary] = []
        for batch in reversed(self._batches.values()):
            if batch.owner == owner and (status is None or batch.status is status):
                found.append(_summary(batch))
                if len(found) == limit:
                    break
        return found

    async def counts(self, batch_id: str) -> Counter[ExecutionStatus]:
        batch = self._batches.get(batch_id)
        return batch.counts.copy() if batch is not None else Counter()

    async def unfinished(self) -> list[Batch]:
        return []

    async def add_file(self, entry: FileEntry) -> None:
        self._files[entry.name] = entry

    async def file(self, name: str) -> FileEntry | None:
        return self._files.get(name)

    async def forget_file(self, name: str) -> None:
        self._files.pop(name, None)

    async def templates_of(self, owner: str) -> list[float]:
        return sorted(
            entry.written_at
            for entry in self._files.values()
            if entry.template and entry.owner == owner
        )

    async def expire(self, older_than: float) -> list[str]:
        for batch_id, batch in list(self._batches.items()):
            if batch.finished_at is not None and batch.finished_at < older_than:
                del self._batches[batch_id]
                self._callbacks.pop(batch_id, None)
        for batch_id, openai in list(self._openai.items()):
            if openai.created_at < older_than and batch_id not in self._batches:
                del self._openai[batch_id]
        active = {batch.file_name for batch in self._batches.values()}
        expired = [
            name
            for name, entry in self._files.items()
            if entry.written_at < older_than and name not in active
        ]
        for name in expired:
            del self._files[name]
        for file_id, (file, _) in list(self._stored.items()):
            if file.created_at < older_than:
                await self.delete_stored_file(file_id)
        now = time.time()
        for entry, (_, expires_at) in list(self._answers.items()):
            if expires_at <= now:
                del self._answers[entry]
        return expired

    async def cached_answer(self, owner: str, key: str, now: float) -> CachedAnswer | None:
        kept = self._answers.get((owner, key))
        return kept[0] if kept is not None and kept[1] > now else None

    async def cache_answer(
        self, owner: str, key: str, answer: CachedAnswer, expires_at: float
    ) -> None:
        self._answers[(owner, key)] = (answer, expires_at)

    async def create_stored_file(self, file: StoredFile) -> None:
        self._stored[file.id] = (file, False)
        self._chunks[file.id] = []

    async def write_chunk(self, file_id: str, seq: int, data: bytes) -> None:
        chunks = self._chunks[file_id]
        assert seq == len(chunks), "chunks are written in order"
        chunks.append(data)

    async def complete_file(self, file_id: str, size: int) -> None:
        file, _ = self._stored[file_id]
        self._stored[file_id] = (replace(file, bytes=size), True)

    async def stored_file(self, file_id: str, owner: str) -> StoredFile | None:
        file, complete = self._stored.get(file_id, (None, False))
        return file if file is not None and complete and file.owner == owner else None

    async def stored_files(
        self, owner: str, *, purpose: str | None, after: str | None, limit: int, newest_first: bool
    ) -> list[StoredFile]:
        files = sorted(
            (
                file
                for file, complete in self._stored.values()
                if complete and file.owner == owner and purpose in (None, file.purpose)
            ),
            key=lambda file: (file.created_at, file.id),
            reverse=newest_first,
        )
        if after is not None:
            ids = [file.id for file in files]
            if after not in ids:
                return []
            files = files[ids.index(after) + 1 :]
        return files[:limit]

    async def chunk(self, file_id: str, seq: int) -> bytes | None:
        chunks = self._chunks.get(file_id, [])
        return chunks[seq] if seq < len(chunks) else None

    async def delete_stored_file(self, file_id: str) -> None:
        self._stored.pop(file_id, None)
        self._chunks.pop(file_id, None)

    async def count_stored_files(self, owner: str) -> int:
        return sum(1 for file, _ in self._stored.values() if file.owner == owner)

    async def create_openai_batch(self, batch: OpenAIBatch) -> None:
        self._openai[batch.id] = batch

    async def openai_batch(self, batch_id: str, owner: str) -> OpenAIBatch | None:
        batch = self._openai.get(batch_id)
        return self._joined(batch) if batch is not None and batch.owner == owner else None

    async def openai_batches(
        self, owner: str, *, after: str | None, limit: int
    ) -> list[OpenAIBatch]:
        mine = sorted(
            (batch for batch in self._openai.values() if batch.owner == owner),
            key=lambda batch: (batch.created_at, batch.id),
            reverse=True,
        )
        if after is not None:
            ids = [batch.id for batch in mine]
            if after not in ids:
                return []
            mine = mine[ids.index(after) + 1 :]
        return [self._joined(batch) for batch in mine[:limit]]

    async def openai_cancelling(self, batch_id: str, at: float) -> None:
        batch = self._openai.get(batch_id)
        if batch is not None and batch.cancelling_at is None:
            self._openai[batch_id] = replace(batch, cancelling_at=at)

    async def overdue_openai_batches(self) -> list[str]:
        now = time.time()
        overdue = []
        for batch in list(self._openai.values()):
            ran = self._batches.get(batch.id)
            running = ran is not None and not ran.status.finished
            if batch.expires_at < now and batch.failed_at is None and running:
                if batch.expired_at is None:
                    self._openai[batch.id] = replace(batch, expired_at=now)
                overdue.append(batch.id)
        return overdue

    async def due_finalizations(self, limit: int, hold_s: float) -> list[OpenAIBatch]:
        now = time.time()
        due = []
        for batch in self._openai.values():
            ran = self._batches.get(batch.id)
            if (
                batch.finalized_at is None
                and batch.failed_at is None
                and ran is not None
                and ran.status.finished
                and self._finalizing.get(batch.id, 0.0) < now
            ):
                self._finalizing[batch.id] = now + hold_s
                due.append(self._joined(batch))
                if len(due) == limit:
                    break
        return due

    async def openai_finalized(
        self, batch_id: str, output_file_id: str | None, error_file_id: str | None, at: float
    ) -> bool:
        batch = self._openai.get(batch_id)
        if batch is None or batch.finalized_at is not None:
            return False
        self._openai[batch_id] = replace(
            batch, output_file_id=output_file_id, error_file_id=error_file_id, finalized_at=at
        )
        return True

    async def delete_openai_batch(self, batch_id: str) -> None:
        self._openai.pop(batch_id, None)

    def _joined(self, batch: OpenAIBatch) -> OpenAIBatch:
        """``batch`` with how the batch it runs as stands."""
        ran = self._batches.get(batch.id)
        if ran is None:
            return batch
        return replace(
            batch,
            status=ran.status,
            started_at=ran.started_at,
            finished_at=ran.finished_at,
            counts=ran.counts.copy(),
        )

    async def due_callbacks(self, limit: int, hold_s: float) -> list[CallbackDue]:
        now = time.time()
        due = sorted(
            (
                batch
                for batch in self._ended_with_callbacks()
                if self._callbacks[batch.id][1] <= now
            ),
            key=lambda batch: batch.finished_at or 0.0,
        )[:limit]
        for batch in due:
            self._callbacks[batch.id] = (self._callbacks[batch.id][0], now + hold_s)
        return [
            CallbackDue(_summary(batch), batch.callback_url or "", self._callbacks[batch.id][0])
            for batch in due
        ]

    async def callback_tried(
        self, batch_id: str, attempts: int, state: CallbackState, retry_in_s: float = 0.0
    ) -> None:
        if state == "pending":
            self._callbacks[batch_id] = (attempts, time.time() + retry_in_s)
        else:
            self._callbacks.pop(batch_id, None)

    async def next_callback_in(self) -> float | None:
        due = [self._callbacks[batch.id][1] for batch in self._ended_with_callbacks()]
        return min(due) - time.time() if due else None

    def _ended_with_callbacks(self) -> list[Batch]:
        batches = (self._batches.get(batch_id) for batch_id in self._callbacks)
        return [batch for batch in batches if batch is not None and batch.status.finished]


def _summary(batch: Batch) -> Summary:
    return Summary(
        id=batch.id,
        status=batch.status,
        message=batch.message,
        created_at=batch.created_at,
        finished_at=batch.finished_at,
        retry_of=batch.retry_of,
        counts=batch.counts.copy(),
        cost=batch.cost()[0],
    )
