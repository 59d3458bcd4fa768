"""Completion webhooks: a batch's end POSTed, signed, to the ``callback_url`` it named.

**What is sent.** One POST a batch, once it has ended (completed, failed or
cancelled), with a JSON body::

    {"type": "batch.completed", "timestamp": "2026-12-01T14:00:00Z",
     "data": {"invocationId": "...", "status": "completed", "message": "...",
              "progress": {"total": 3, "succeeded": 3, ...},
              "created_at": "...", "finished_at": "...", "retry_of": null}}

``data`` is the batch as the list route shows it; fetch the rows with the
results route and the id.

**How it is signed.** As Standard Webhooks (https://www.standardwebhooks.com)
specifies, so its libraries verify it (``standardwebhooks.Webhook(secret)
.verify(body, headers)``), or a few lines of any language:

- ``webhook-id``: the batch's id, the same on every attempt (drop repeats);
- ``webhook-timestamp``: the attempt's time, in Unix seconds (refuse old ones);
- ``webhook-signature``: ``v1,`` then the base64 of HMAC-SHA256 over
  ``"{webhook-id}.{webhook-timestamp}.{body}"`` keyed with ``CALLBACK_SECRET``
  (the bytes of its base64 after ``whsec_`` when written in that form, which
  the libraries take; else its UTF-8 bytes).

**How it is delivered.** At least once: an answer 2xx is delivered; 410 Gone
gives it up; any other answer, a connection error or ``CALLBACK_TIMEOUT_S``
without an answer is retried after ``CALLBACK_BACKOFF_S``, twice as long at
each next attempt (at most an hour), or after the receiver's ``Retry-After``
if it asks for longer, until ``CALLBACK_ATTEMPTS`` attempts were made.
Redirects are not followed: a 3xx is a failed attempt. The URL is checked
against ``CALLBACK_ALLOW`` again before every attempt.

**Why nothing is lost.** Each delivery's state is in the store
(``BatchStore.due_callbacks``): a webhook due when the server stops, or
held by a replica that dies, is sent after the restart or by another replica.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import logging
import time

import aiohttp
from yarl import URL

from batchexec import __version__
from batchexec.config import Settings
from batchexec.metrics import NO_METRICS, Metrics
from batchexec.providers.http import retry_after_s
from batchexec.records import Batch
from batchexec.schemas import BatchEndedWebhook
from batchexec.store import BatchStore
from batchexec.store.base import CallbackDue

log = logging.getLogger(__name__)

#: Webhooks sent at once; more wait their turn.
MAX_IN_FLIGHT = 16
#: The longest wait between two attempts.
MAX_BACKOFF_S = 3600.0
#: How often the store is asked for webhooks due, besides when a batch here ends: a
#: replica's batches ended just before it died are sent this soon by another.
POLL_S = 30.0
#: A claim holds a webhook for this many times the attempt's timeout: the attempt, then
#: the store's write of how it went. Should the write take longer, another replica may
#: send it again, which at-least-once allows.
_HOLD_TIMEOUTS = 2
_SECRET_PREFIX = "whsec_"  # noqa: S105 - the form's prefix, not a secret


class Webhooks:
    """Sends the webhooks of ended batches, the store's record of each kept up to date.

    ``start`` begins; ``wake`` is called when a batch ends here; ``close``
    stops, leaving what is in flight due again for the next process.
    """

    def __init__(
        self,
        store: BatchStore,
        session: aiohttp.ClientSession,
        settings: Settings,
        *,
        metrics: Metrics = NO_METRICS,
    ) -> None:
        self._store = store
        self._session = session
        self._settings = settings
        self._metrics = metrics
        self._key = signing_key(settings.callback_secret.get_secret_value())
        self._hold_s = settings.callback_timeout_s * _HOLD_TIMEOUTS
        self._woken = asyncio.Event()
        self._sending: set[asyncio.Task[None]] = set()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Begin sending: what a previous process left due goes first."""
        self._task = asyncio.create_task(self._run(), name="webhooks")

    def batch_ended(self, batch: Batch) -> None:
        """``batch`` ended here, its end in the store: send its webhook now, if it has one."""
        if batch.callback_url:
            self._woken.set()

    async def close(self) -> None:
        """Stop; a webhook cut off in flight is due again once its hold ends."""
        tasks = [task for task in (self._task, *self._sending) if task is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        while True:
            self._woken.clear()
            wait_s = POLL_S
            try:
                room = MAX_IN_FLIGHT - len(self._sending)
                due = await self._store.due_callbacks(room, self._hold_s) if room else []
                for callback in due:
                    task = asyncio.create_task(self._deliver(callback))
                    self._sending.add(task)
                    task.add_done_callback(self._sent)
                if room and len(due) < room:
                    next_in_s = await self._store.next_callback_in()
                    if next_in_s is not None:
                        # Due now but not given: held elsewhere, or the clock moved; not a spin.
                        wait_s = min(max(next_in_s, 0.05), POLL_S)
                elif room:
                    wait_s = 0.0  # as many as there was room for: there may be more
            except Exception:
                log.exception("webhooks: the store cannot be read; trying again in %.0f s", POLL_S)
            if wait_s:
                # asyncio.timeout, not wait_for: Python 3.11's wait_for swallows a cancel
                # that arrives as the event is set.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait_s):
                        await self._woken.wait()

    def _sent(self, task: asyncio.Task[None]) -> None:
        self._sending.discard(task)
        self._woken.set()  # room for another
        if not task.cancelled() and task.exception() is not None:
            log.error("webhooks: a delivery failed", exc_info=task.exception())

    async def _deliver(self, callback: CallbackDue) -> None:
        """Make one attempt at ``callback``, and record how it went.

        Counted before it is recorded, so that whoever sees the record also sees it
        counted.
        """
        batch_id = callback.batch.id
        attempts = callback.attempts + 1
        target = _origin(callback.url)
        try:
            url = self._settings.callbacks.check(callback.url)
        except ValueError as exc:
            log.error("webhook of batch %s given up: %s", batch_id, exc)
            self._metrics.webhook("failed")
            await self._store.callback_tried(batch_id, callback.attempts, "failed")
            return
        retry_in_s = self._backoff_s(attempts)
        try:
            status, asked_s = await self._post(url, callback)
        except (aiohttp.ClientError, TimeoutError) as exc:
            reason = f"no answer ({_reason(exc)})"
        else:
            if 200 <= status < 300:
                self._metrics.webhook("delivered")
                await self._store.callback_tried(batch_id, attempts, "delivered")
                log.info("webhook of batch %s delivered to %s", batch_id, target)
                return
            if status == 410:
                self._metrics.webhook("failed")
                await self._store.callback_tried(batch_id, attempts, "failed")
                log.warning("webhook of batch %s given up: %s answered 410 Gone", batch_id, target)
                return
            reason = f"HTTP {status}"
            if asked_s is not None:
                retry_in_s = min(max(retry_in_s, asked_s), MAX_BACKOFF_S)
        if attempts >= self._settings.callback_attempts:
            self._metrics.webhook("failed")
            await self._store.callback_tried(batch_id, attempts, "failed")
            log.error(
                "webhook of batch %s given up after %d attempts: %s answered %s",
                batch_id,
                attempts,
                target,
                reason,
            )
            return
        self._metrics.webhook("retried")
        await self._store.callback_tried(batch_id, attempts, "pending", retry_in_s)
        log.warning(
            "webhook of batch %s: %s answered %s; attempt %d again in %.1f s",
            batch_id,
            target,
            reason,
            attempts + 1,
            retry_in_s,
        )

    async def _post(self, url: str, callback: CallbackDue) -> tuple[int, float | None]:
        """POST ``callback``'s body to ``url``: the answer's status and the wait it asks for."""
        body = payload(callback)
        timestamp = int(time.time())
        headers = {
            "Content-Type": "application/json",
            "User-Agent": f"batchexec/{__version__}",
            **signed_headers(self._key, callback.batch.id, timestamp, body),
        }
        timeout = aiohttp.ClientTimeout(total=self._settings.callback_timeout_s)
        async with self._session.post(
            URL(url, encoded=True),
            data=body,
            headers=headers,
            allow_redirects=False,
            timeout=timeout,
        ) as response:
            # The answer's body is never read: nothing in it counts.
            return response.status, retry_after_s(response.headers)

    def _backoff_s(self, attempts: int) -> float:
        """The wait after the ``attempts``-th failed attempt."""
        return min(self._settings.callback_backoff_s * 2.0 ** (attempts - 1), MAX_BACKOFF_S)


def payload(callback: CallbackDue) -> bytes:
    """The JSON body of ``callback``'s POST."""
    return BatchEndedWebhook.of(callback.batch).model_dump_json().encode()


def signing_key(secret: str) -> bytes:
    """The HMAC key of ``CALLBACK_SECRET``: a ``whsec_`` secret's base64, else its UTF-8."""
    if secret.startswith(_SECRET_PREFIX):
        try:
            return base64.b64decode(secret.removeprefix(_SECRET_PREFIX), validate=True)
        except ValueError:
            pass  # not base64 after all: the text is the key
    return secret.encode()


def signed_headers(key: bytes, message_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """The Standard Webhooks headers of ``body`` sent as ``message_id`` at ``timestamp``."""
    signed = f"{message_id}.{timestamp}.".encode() + body
    digest = hmac.new(key, signed, hashlib.sha256).digest()
    return {
        "webhook-id": message_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": "v1," + base64.b64encode(digest).decode(),
    }


def _origin(url: str) -> str:
    """``url`` as logged: its scheme, host and port, never its path or query (a token)."""
    parsed = URL(url)
    return f"{parsed.scheme}://{parsed.host}:{parsed.port}"


def _reason(exc: BaseException) -> str:
    return "timed out" if isinstance(exc, TimeoutError) else str(exc) or type(exc).__name__
