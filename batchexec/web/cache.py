"""Answers of the results route for finished batches, rendered once and served many times."""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from batchexec.records import Batch, BatchStatus

#: A rendered answer: its bytes in pieces, written one after another. Never joined:
#: joining a 30 MB answer is a 20 ms copy on the loop.
Pieces = tuple[bytes, ...]


@dataclass(frozen=True)
class Head:
    """What a kept answer's head and its access need of its finished batch, which never
    changes again: the answer is then served without the batch's rows."""

    owner: str
    status: BatchStatus
    message: str
    xlsx_name: str | None
    finished_at: float | None

    @classmethod
    def of(cls, batch: Batch) -> Head:
        return cls(batch.owner, batch.status, batch.message, batch.xlsx_name, batch.finished_at)


class RenderedResults:
    """Rendered results of finished batches by batch id, bounded by bytes, least recent out.

    A finished batch never changes, and clients poll it: rendering a
    1,000-row answer costs milliseconds, serving it again microseconds. What
    is kept is the part of the answer that depends on the batch alone; the
    fields that follow the request (``xlsx_url`` follows its host) are
    rendered per request, so no request header can multiply what is kept.
    Concurrent requests for the same batch share one rendering.
    """

    def __init__(self, max_bytes: int) -> None:
        self._max_bytes = max_bytes
        self._size = 0
        self._bodies: OrderedDict[str, Pieces] = OrderedDict()
        self._heads: dict[str, Head] = {}
        self._rendering: dict[str, asyncio.Future[Pieces]] = {}

    @property
    def size_bytes(self) -> int:
        """Bytes kept now."""
        return self._size

    async def get(
        self, batch_id: str, render: Callable[[], Awaitable[Pieces]], head: Head | None = None
    ) -> Pieces:
        """The rendered body of ``batch_id``: kept, being rendered, or rendered now by ``render``.

        A body larger than the whole budget is served but not kept. With
        ``head``, a kept body is kept with it, for ``kept``.
        """
        body = self._bodies.get(batch_id)
        if body is not None:
            self._bodies.move_to_end(batch_id)
            return body
        rendering = self._rendering.get(batch_id)
        if rendering is None:
            rendering = self._rendering[batch_id] = asyncio.ensure_future(render())
            rendering.add_done_callback(lambda done: self._rendered(batch_id, done, head))
        # Shielded: a client that goes away must not cancel the others' rendering.
        return await asyncio.shield(rendering)

    def kept(self, batch_id: str, owner: str, expired_before: float) -> tuple[Head, Pieces] | None:
        """The kept body of ``owner``'s batch ``batch_id`` with its head, if it was kept
        with one and the batch finished at or after ``expired_before``. One that finished
        before is let go; another owner's ask changes nothing, not even its place."""
        head = self._heads.get(batch_id)
        body = self._bodies.get(batch_id)
        if head is None or body is None or head.owner != owner:
            return None
        if head.finished_at is None or head.finished_at < expired_before:
            del self._bodies[batch_id], self._heads[batch_id]
            self._size -= _size(body)
            return None
        self._bodies.move_to_end(batch_id)
        return head, body

    def _rendered(self, batch_id: str, done: asyncio.Future[Pieces], head: Head | None) -> None:
        self._rendering.pop(batch_id, None)
        if done.cancelled() or done.exception() is not None:
            return
        body = done.result()
        size = _size(body)
        if size > self._max_bytes:
            return
        self._bodies[batch_id] = body
        if head is not None:
            self._heads[batch_id] = head
        self._size += size
        while self._size > self._max_bytes:
            dropped_id, dropped = self._bodies.popitem(last=False)
            self._heads.pop(dropped_id, None)
            self._size -= _size(dropped)


def _size(body: Pieces) -> int:
    return sum(len(piece) for piece in body)
