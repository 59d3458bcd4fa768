"""What a batch's watchers are told, and the hub that tells them.

The registry publishes an event once the change it reports is durable; the
event-stream route and the command line's progress subscribe here, by batch
id, so a batch record carries no live state.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from batchexec.records import Batch, Execution, progress_counts


@dataclass(frozen=True)
class Event:
    """A change worth telling a watcher: ``started``, ``execution``, ``progress``, ``done``."""

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
            "cost": execution.cost,
            "cached": execution.cached,
        },
    )


def started_event(execution: Execution) -> Event:
    """The ``started`` event of an execution sent to its model (once a run, retries not
    told again): a page can show the row running before it ends."""
    return Event(
        "started",
        {"index": execution.index, "model": execution.model, "attempts": execution.attempts},
    )


def progress_event(batch: Batch) -> Event:
    """The ``progress`` event: how many executions are in each state."""
    return Event("progress", progress_counts(batch.counts))


def done_event(batch: Batch) -> Event:
    """The ``done`` event of a batch that has ended."""
    cost, uncosted = batch.cost()
    return Event(
        "done",
        {
            "status": batch.status.value,
            "message": batch.message,
            "cost": cost,
            "uncosted": uncosted,
        },
    )


def interrupted_event(batch: Batch) -> Event:
    """The ``interrupted`` event: this process stops, and the batch resumes where it restarts."""
    return Event(
        "interrupted",
        {
            "status": batch.status.value,
            "message": "The server is stopping; the batch resumes when it starts again. "
            "Reconnect to follow it.",
        },
    )


#: Events after which a stream has nothing more to send.
FINAL_EVENTS = frozenset({"done", "interrupted"})


class EventHub:
    """Queues of the watchers of each batch, by batch id."""

    def __init__(self) -> None:
        self._watchers: dict[str, set[asyncio.Queue[Event]]] = {}

    def watched(self, batch_id: str) -> bool:
        """Whether anyone watches ``batch_id`` (so events need not be built otherwise)."""
        return batch_id in self._watchers

    def publish(self, batch_id: str, *events: Event) -> None:
        """Give ``events`` to every watcher of ``batch_id``."""
        for queue in self._watchers.get(batch_id, ()):
            for event in events:
                queue.put_nowait(event)

    @contextmanager
    def watch(self, batch_id: str) -> Iterator[asyncio.Queue[Event]]:
        """A queue that receives the batch's events while the block runs."""
        queue: asyncio.Queue[Event] = asyncio.Queue()
        self._watchers.setdefault(batch_id, set()).add(queue)
        try:
            yield queue
        finally:
            watchers = self._watchers.get(batch_id)
            if watchers is not None:
                watchers.discard(queue)
                if not watchers:
                    del self._watchers[batch_id]
