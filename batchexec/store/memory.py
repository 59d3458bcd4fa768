"""``memory://``: batches kept in this process only, for embedding and tests."""

from __future__ import annotations

import secrets
from collections import Counter
from collections.abc import Sequence

from batchexec.records import Batch, BatchStatus, ExecutionStatus, Summary
from batchexec.store.base import BatchStore, Change, FileEntry


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

    async def open(self) -> None:
        self._secret = secrets.token_bytes(32)

    async def close(self) -> None:
        pass

    async def create(self, batch: Batch) -> None:
        self._batches[batch.id] = batch

    async def apply(self, changes: Sequence[Change]) -> frozenset[str]:
        return frozenset()

    async def delete(self, batch_id: str) -> None:
        self._batches.pop(batch_id, None)

    async def load(self, batch_id: str) -> Batch | None:
        return self._batches.get(batch_id)

    async def summaries(
        self, owner: str, *, status: BatchStatus | None, limit: int
    ) -> list[Summary]:
        found: list[Summary] = []
        for batch in reversed(self._batches.values()):
            if batch.owner == owner and (status is None or batch.status is status):
                found.append(
                    Summary(
                        id=batch.id,
                        status=batch.status,
                        message=batch.message,
                        created_at=batch.created_at,
                        finished_at=batch.finished_at,
                        retry_of=batch.retry_of,
                        counts=batch.counts.copy(),
                    )
                )
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
        active = {batch.file_name for batch in self._batches.values()}
        expired = [
            name
            for name, entry in self._files.items()
            if entry.written_at < older_than and name not in active
        ]
        for name in expired:
            del self._files[name]
        return expired
