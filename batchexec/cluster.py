"""This process as one replica of several that share a PostgreSQL store.

Every replica can take any request; batches are run by lease
(``store.SharedStore``):

- **Claims.** A submitted batch is only stored. Whenever this process has a
  free batch slot it claims the oldest batches no replica holds (woken by a
  ``queued`` notice, and every ``_POLL_S`` anyway), and runs them from what
  the store holds: finished rows kept, rows that were running sent again.
- **Heartbeats.** Every ``LEASE_S / 3`` the leases of the batches it runs are
  renewed. A lease not renewed within ``LEASE_S`` less a margin, timed from
  when the last renewal was *sent*, is let go here first: its rows in flight
  are cancelled before the database would let another replica claim it, so
  no row runs on two replicas at once. A renewal that finds a lease taken
  over lets the batch go at once; the store refuses its late writes anyway.
- **Cancels.** A ``cancel`` notice (or a heartbeat's answer) cancels a batch
  running here. A cancel asked here of a batch another replica runs is
  written to the store for its holder (or, if none holds it, for the replica
  that claims it to cancel), and waited for.
- **Changes.** An event stream here of a batch that runs elsewhere waits on
  ``changed`` notices (``watching``) and reads what changed from the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from batchexec.engine import Engine
from batchexec.errors import ConflictError
from batchexec.planning import BatchPlan
from batchexec.records import Batch
from batchexec.registry import Registry
from batchexec.store import Notice, SharedStore, StoreError
from batchexec.wording import counted

log = logging.getLogger(__name__)

#: Seconds between claims when no notice comes (a lost notice, an expired lease).
_POLL_S = 1.0
#: The part of a lease kept as a margin: a lease not renewed by then is let go.
_MARGIN = 0.2
#: The longest a cancel waits for another replica to stop the batch, past a lease.
_CANCEL_WAIT_S = 10.0


def replica_name() -> str:
    """A name for this process in the leases it takes: host, pid and a random part."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Replica:
    """Claims, heartbeats, cancels and change notices for one process of the cluster."""

    def __init__(
        self,
        store: SharedStore,
        registry: Registry,
        engine: Engine,
        plan_of: Callable[[Batch], BatchPlan],
        *,
        lease_s: float,
        rng: random.Random | None = None,
    ) -> None:
        """``plan_of`` plans a batch read back from the store (``runtime.plan_again``)."""
        self._store = store
        self._registry = registry
        self._engine = engine
        self._plan_of = plan_of
        self._lease_s = lease_s
        self._rng = rng or random.Random()
        #: By batch id: the loop time by which its lease must have been renewed.
        self._deadlines: dict[str, float] = {}
        self._wake = asyncio.Event()
        self._watchers: dict[str, set[asyncio.Event]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        engine.remote = self
        engine.on_slot_freed = self._wake.set

    async def start(self) -> None:
        """Listen for notices and start claiming; ``StoreError`` if the store cannot listen."""
        await self._store.listen(self._notice)
        self._tasks = [
            asyncio.create_task(self._claim_forever(), name="replica-claims"),
            asyncio.create_task(self._renew_forever(), name="replica-heartbeat"),
            asyncio.create_task(self._watch_deadlines(), name="replica-deadlines"),
        ]
        self._wake.set()  # whatever waits already

    async def stop_claiming(self) -> None:
        """Claim no more batches (the process is stopping); leases held are still renewed."""
        await self._cancel_tasks(self._tasks[:1])

    async def close(self) -> None:
        """Stop, and give up the leases of the batches left here, for others to take at once."""
        await self._cancel_tasks(self._tasks)
        self._tasks = []
        left = list(self._deadlines)
        self._deadlines.clear()
        if left:
            try:
                await self._store.release(left)
            except StoreError as exc:
                log.warning(
                    "could not give up %s (they lapse by themselves): %s",
                    counted(len(left), "lease"),
                    exc,
                )

    @staticmethod
    async def _cancel_tasks(tasks: list[asyncio.Task[None]]) -> None:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    @asynccontextmanager
    async def watching(self, batch_id: str) -> AsyncIterator[asyncio.Event]:
        """An event set whenever a replica tells of a change to ``batch_id`` (clear it yourself)."""
        changed = asyncio.Event()
        self._watchers.setdefault(batch_id, set()).add(changed)
        try:
            yield changed
        finally:
            watchers = self._watchers[batch_id]
            watchers.discard(changed)
            if not watchers:
                del self._watchers[batch_id]

    async def cancel(self, batch_id: str, reason: str) -> None:
        """Have ``batch_id`` cancelled by whichever replica runs it; wait until it has ended.

        ``ConflictError`` when it has ended already. Waits at most a lease
        (a dead holder's batch is claimed, and cancelled, once it lapses) and
        ``_CANCEL_WAIT_S`` more; the answer then shows the batch as it is.
        """
        async with self.watching(batch_id) as changed:
            if not await self._store.request_cancel(batch_id, reason):
                raise ConflictError("The batch has already ended; there is nothing to cancel.")
            self._wake.set()  # held by nobody: this replica claims it to cancel it
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._lease_s + _CANCEL_WAIT_S):
                    while True:
                        batch = await self._store.load(batch_id)
                        if batch is None or batch.status.finished:
                            return
                        with contextlib.suppress(TimeoutError):
                            async with asyncio.timeout(_POLL_S):
                                await changed.wait()
                        changed.clear()

    def _notice(self, notice: Notice) -> None:
        if notice.kind == "queued":
            self._wake.set()
        elif notice.kind == "cancel":
            self._engine.cancel_soon(notice.batch_id, _BY_REQUEST)
            self._wake.set()
        else:
            for changed in self._watchers.get(notice.batch_id, ()):
                changed.set()

    async def _claim_forever(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_POLL_S * self._rng.uniform(0.5, 1.0)):
                    await self._wake.wait()
            self._wake.clear()
            try:
                if await self._claim():
                    self._wake.set()  # there may be more: claim again at once
            except StoreError as exc:
                log.warning("could not claim batches: %s", exc)

    async def _claim(self) -> bool:
        """Claim what this process has room for; whether it took all it had room for."""
        free = self._engine.free_slots()
        batches = await self._store.claim(free, self._lease_s)
        if not batches:
            return False
        # Renewed at once, and timed from this renewal: a claim may have been retried
        # across a database outage, so when its lease began is not known here. The
        # renewal also tells of a cancel asked before the claim.
        sent = asyncio.get_running_loop().time()
        renewal = await self._store.renew([batch.id for batch in batches], self._lease_s)
        for batch in batches:
            if batch.id not in renewal.held:
                continue  # lapsed again already: another replica's now
            if self._registry.holds(batch.id):
                # Still being let go here after this process's own lease lapsed.
                await self._store.release([batch.id])
                continue
            self._deadlines[batch.id] = sent + self._lease_s
            self._registry.adopt(batch)
            self._engine.resume_stored(batch, self._plan_of)
        for batch_id, reason in renewal.cancels.items():
            self._engine.cancel_soon(batch_id, reason)
        return 0 < free <= len(batches)

    async def _renew_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self._lease_s / 3)
            running = self._engine.running()
            for batch_id in set(self._deadlines) - set(running):
                del self._deadlines[batch_id]  # ended, or let go
            held = [batch_id for batch_id in running if batch_id in self._deadlines]
            if not held:
                continue
            sent = loop.time()
            try:
                async with asyncio.timeout(self._lease_s / 3):
                    renewal = await self._store.renew(held, self._lease_s)
            except (StoreError, TimeoutError) as exc:
                log.warning(
                    "could not renew %s: %s", counted(len(held), "lease"), exc or "no answer"
                )
                continue
            for batch_id in held:
                if batch_id in renewal.held:
                    if batch_id in self._deadlines:
                        self._deadlines[batch_id] = sent + self._lease_s
                else:
                    self._let_go(batch_id)
            for batch_id, reason in renewal.cancels.items():
                self._engine.cancel_soon(batch_id, reason)

    async def _watch_deadlines(self) -> None:
        loop = asyncio.get_running_loop()
        margin_s = self._lease_s * _MARGIN
        while True:
            await asyncio.sleep(min(self._lease_s / 10, 0.5))
            now = loop.time()
            for batch_id, deadline in list(self._deadlines.items()):
                if now >= deadline - margin_s:
                    log.warning("batch %s: lease not renewed in time", batch_id)
                    self._let_go(batch_id)

    def _let_go(self, batch_id: str) -> None:
        self._deadlines.pop(batch_id, None)
        self._engine.abandon(batch_id)


_BY_REQUEST = "Cancelled by request."
