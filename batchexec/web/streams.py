"""The events route: a batch's life as server-sent events.

``execution`` as each row ends, ``progress``, then ``done`` (or another
final event). A client that connects late first gets the current state, so
following a batch never needs a second call.

A batch that another replica runs (a shared store) is followed from the
store instead: each ``changed`` notice from its replica (and, lacking one,
every ``_STORED_POLL_S``) reads it again and sends what ended since the last
read, at most every ``_STORED_GAP_S``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass

from aiohttp import web

from batchexec.cluster import Replica
from batchexec.errors import NotFoundError
from batchexec.events import (
    FINAL_EVENTS,
    Event,
    done_event,
    execution_event,
    progress_event,
    started_event,
)
from batchexec.records import Batch, Execution
from batchexec.registry import Registry
from batchexec.slices import in_slices
from batchexec.web.keys import OWNER, REGISTRY, REPLICA
from batchexec.web.requests import xlsx_url

#: Seconds between comments that keep an idle event stream open through proxies.
_HEARTBEAT_S = 15.0
#: A batch run by another replica is read again at least this often, and at most
#: once every ``_STORED_GAP_S``.
_STORED_POLL_S = 1.0
_STORED_GAP_S = 0.2
_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
#: A late client's backlog is made and written this many ended rows at a time.
_BACKLOG_SLICE = 500
#: Seconds a stream waits at least between two writes; a final event is sent at once.
_WRITE_GAP_S = 0.02


async def events(request: web.Request) -> web.StreamResponse:
    """Server-sent events: ``started`` as each row is sent, ``execution`` as it ends,
    ``progress``, then ``done``. A batch another replica runs is followed from the store,
    which tells its rows' ends, not their starts (``started`` only on connecting)."""
    registry = request.app[REGISTRY]
    batch = await registry.get(request.match_info["invocation_id"], request[OWNER])
    response = web.StreamResponse(headers={**_HEADERS, "X-Accel-Buffering": "no"})
    await response.prepare(request)
    replica = request.app.get(REPLICA)
    if replica is not None and not batch.status.finished and not registry.holds(batch.id):
        with contextlib.suppress(ConnectionResetError):
            await _follow_stored(request, response, registry, replica, batch)
        return response
    # Subscribing and taking the snapshot happen with no await between them,
    # so no event is missed or sent twice.
    # A client that goes away has nothing more to be told.
    with registry.events.watch(batch.id) as queue, contextlib.suppress(ConnectionResetError):
        await _follow(request, response, batch, Backlog.of(batch), queue)
    return response


async def _follow_stored(
    request: web.Request,
    response: web.StreamResponse,
    registry: Registry,
    replica: Replica,
    batch: Batch,
) -> None:
    """Follow a batch another replica runs, from the store, until it ends."""
    async with replica.watching(batch.id) as changed:
        # Watching before the first read: a change made after it is not missed.
        backlog = Backlog.of(batch)
        cursor, counts = batch.cursor, dict(batch.counts)
        await backlog.send(response, request, batch)
        quiet_s = 0.0
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_STORED_POLL_S):
                    await changed.wait()
            changed.clear()
            try:
                fresh = await registry.get(batch.id, batch.owner)
            except NotFoundError:
                return  # expired meanwhile
            ended, cursor = fresh.ended_since(cursor)
            news = [execution_event(execution) for execution in ended]
            if news or dict(fresh.counts) != counts:
                news.append(progress_event(fresh))
            if fresh.status.finished:
                news.append(done_event(fresh))
            if news:
                await _send(response, request, fresh, news)
                quiet_s = 0.0
            else:
                quiet_s += _STORED_POLL_S
                if quiet_s >= _HEARTBEAT_S:
                    await response.write(b": keep-alive\n\n")
                    quiet_s = 0.0
            if fresh.status.finished:
                return
            counts = dict(fresh.counts)
            await asyncio.sleep(_STORED_GAP_S)


@dataclass(frozen=True)
class Backlog:
    """What a client connecting now has missed: every ended row (in the order they
    ended), the rows running now, progress, maybe ``done``.

    Taken at once (``of`` costs a reference a row), and its events made and
    sent in slices of ``_BACKLOG_SLICE``, handing the loop back between them:
    an ended row changes no more, so its event made later is the one it had.
    """

    ended: list[Execution]
    running: list[Execution]
    last: list[Event]

    @classmethod
    def of(cls, batch: Batch) -> Backlog:
        last = [progress_event(batch)]
        if batch.status.finished:
            last.append(done_event(batch))
        return cls(batch.ended_since(0)[0], batch.running(), last)

    @property
    def final(self) -> bool:
        """Whether it ends with a final event: the batch had ended."""
        return self.last[-1].name in FINAL_EVENTS

    async def send(self, response: web.StreamResponse, request: web.Request, batch: Batch) -> None:
        for start in range(0, len(self.ended), _BACKLOG_SLICE):
            rows = self.ended[start : start + _BACKLOG_SLICE]
            await _send(response, request, batch, [execution_event(e) for e in rows])
            await asyncio.sleep(0)
        started = [started_event(e) for e in self.running]
        await _send(response, request, batch, [*started, *self.last])


async def _follow(
    request: web.Request,
    response: web.StreamResponse,
    batch: Batch,
    backlog: Backlog,
    queue: asyncio.Queue[Event],
) -> None:
    """Send ``backlog``, then what ``queue`` brings, until a final event has gone out."""
    await backlog.send(response, request, batch)
    loop = asyncio.get_running_loop()
    written_at = loop.time()
    # Decided from what was sent, not from the batch now: the write above may
    # have waited for a slow client while the batch finished.
    done = backlog.final
    while not done:
        try:
            # asyncio.timeout, not wait_for: Python 3.11's wait_for swallows a cancel (a
            # client gone, a shutdown) that arrives as an event does.
            async with asyncio.timeout(_HEARTBEAT_S):
                first = await queue.get()
        except TimeoutError:
            await response.write(b": keep-alive\n\n")
            continue
        pending = await _gathered(queue, first, written_at + _WRITE_GAP_S)
        await _send(response, request, batch, _coalesced(pending))
        written_at = loop.time()
        done = any(event.name in FINAL_EVENTS for event in pending)


async def _gathered(queue: asyncio.Queue[Event], first: Event, until: float) -> list[Event]:
    """``first`` and what else ``queue`` brings until the loop's time ``until``, or until
    a final event, which is never held back.

    Everything that happened since the last write goes out in one write, with
    only the latest progress: a batch ending rows all the time costs each of
    its followers one write every ``_WRITE_GAP_S``, not one a row (a write to a
    socket costs more than making the events it carries).
    """
    pending = [first]
    # One timer for the whole wait; an event taken from the queue is never lost
    # to it (``Queue.get`` leaves the item queued if it is cancelled).
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout_at(until):
            while pending[-1].name not in FINAL_EVENTS:
                pending.append(await queue.get())
    while pending[-1].name not in FINAL_EVENTS and not queue.empty():
        pending.append(queue.get_nowait())
    return pending


def _coalesced(events: list[Event]) -> list[Event]:
    """``events`` with every ``progress`` but the last dropped, keeping order otherwise."""
    last_progress = max(
        (position for position, event in enumerate(events) if event.name == "progress"),
        default=None,
    )
    return [
        event
        for position, event in enumerate(events)
        if event.name != "progress" or position == last_progress
    ]


async def _send(
    response: web.StreamResponse, request: web.Request, batch: Batch, events: list[Event]
) -> None:
    """Write ``events`` in the server-sent events format, in one write.

    Made a slice at a time (``slices``): what a busy batch ends between two
    writes is hundreds of events, milliseconds of encoding.
    """
    chunks = []
    async for some in in_slices(events):
        for event in some:
            data = dict(event.data)
            if event.name in FINAL_EVENTS:
                data["invocationId"] = batch.id
                data["xlsx_url"] = xlsx_url(request, batch.xlsx_name) if batch.xlsx_name else None
            chunks.append(f"event: {event.name}\ndata: {json.dumps(data)}\n\n")
    await response.write("".join(chunks).encode())
