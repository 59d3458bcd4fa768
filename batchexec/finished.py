"""Finished batches kept in memory: a small cache in front of the store, bounded by bytes.

A finished batch changes no more, so the registry can let it go and read it
back from the store when asked; this keeps the recently asked ones, so a
client polling a batch it just saw finish costs no read.

A batch out of the cache, or too large for it, is still found for as long as
something else holds it: its workbook being written, its answer being
rendered, an event stream. Reading it back then would cost a second copy
of every row (100,000 rows: about a second of Python in the store's
thread, and as much memory again as the batch) for the same records.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict

from batchexec.records import Batch


class FinishedBatches:
    """Finished batches by id, least recently used out once over ``max_bytes``; and
    any other finished batch given to it that is still held elsewhere."""

    def __init__(self, max_bytes: int) -> None:
        self._max_bytes = max_bytes
        self._size = 0
        self._batches: OrderedDict[str, tuple[Batch, int]] = OrderedDict()
        #: Every batch ``put`` here while it lives: held by nothing here.
        self._alive: weakref.WeakValueDictionary[str, Batch] = weakref.WeakValueDictionary()
        #: Batches that finished before this have expired: a read of one begun before the
        #: store let it go does not put it back.
        self._expired_before = 0.0

    def get(self, batch_id: str) -> Batch | None:
        entry = self._batches.get(batch_id)
        if entry is None:
            return self._alive.get(batch_id)
        self._batches.move_to_end(batch_id)
        return entry[0]

    def put(self, batch: Batch) -> None:
        if batch.finished_at is not None and batch.finished_at < self._expired_before:
            return
        self._alive[batch.id] = batch
        size = batch.size_bytes()
        if batch.id in self._batches:
            self._size -= self._batches.pop(batch.id)[1]
        if size > self._max_bytes:
            return
        self._batches[batch.id] = (batch, size)
        self._size += size
        while self._size > self._max_bytes:
            _, (_, dropped) = self._batches.popitem(last=False)
            self._size -= dropped

    def drop_older(self, older_than: float) -> None:
        self._expired_before = max(self._expired_before, older_than)
        for batch_id, (batch, size) in list(self._batches.items()):
            if batch.finished_at is not None and batch.finished_at < older_than:
                del self._batches[batch_id]
                self._size -= size
        for batch_id, batch in list(self._alive.items()):
            if batch.finished_at is not None and batch.finished_at < older_than:
                self._alive.pop(batch_id, None)
