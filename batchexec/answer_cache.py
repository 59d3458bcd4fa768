"""The answer cache: a request asked before by the same key is answered again, not sent.

Opt-in: a batch's ``cache`` (``true``, or ``false`` to bypass it), else its
model's ``cache`` in the catalog, else ``CACHE_ANSWERS``. A request is the
same when its provider, address, model id, parameters (the catalog's and the
row's), system prompt, earlier turns and prompt as sent are: ``key`` is a
digest of them. Answers are kept in the store (``BatchStore.cache_answer``),
so they survive restarts and replicas share them, for ``CACHE_TTL_HOURS``,
and only for the key (its fingerprint) that was given them: nothing crosses
keys. Within a process, identical requests in flight at once are sent once:
the others wait for its answer. Only answers that succeeded are kept; one
given again is marked ``cached`` and costs nothing.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Awaitable, Callable

from batchexec.catalog import ModelSpec
from batchexec.providers import ChatRequest
from batchexec.records import ExecutionStatus, Outcome
from batchexec.store.base import BatchStore, CachedAnswer, StoreError

log = logging.getLogger(__name__)


def key(model: ModelSpec, request: ChatRequest) -> str:
    """The digest that names ``request`` to ``model`` in the cache."""
    document = {
        "provider": model.provider,
        "base_url": model.base_url,
        "model": model.wire_id,
        "params": request.params,
        "system": request.system_prompt,
        "history": [[turn.role, turn.content] for turn in request.history],
        "options": dataclasses.asdict(request.options),
        "prompt": request.prompt,
    }
    text = json.dumps(document, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


class AnswerCache:
    """Answers from the store's cache, and identical requests in flight sent once."""

    def __init__(self, store: BatchStore, ttl_s: float) -> None:
        self._store = store
        self._ttl_s = ttl_s
        self._asking: dict[tuple[str, str], asyncio.Future[Outcome]] = {}

    async def answer(
        self,
        owner: str,
        request_key: str,
        ask: Callable[[float], Awaitable[Outcome]],
        *,
        timeout_s: float,
        priced: bool = False,
    ) -> Outcome:
        """The cached answer of ``owner``'s request, else ``ask(seconds)``'s, kept if it
        succeeded, all within ``timeout_s``: waiting for the same request asked by another
        row counts, and ``ask`` is given what is left.

        A cached answer costs 0 where the model is ``priced``, else, as any row of an
        unpriced model, nothing known (None).
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        entry = (owner, request_key)
        while (asking := self._asking.get(entry)) is not None:
            # Waited for, not awaited: its failure or cancellation is the other row's.
            await asyncio.wait([asking], timeout=max(deadline - loop.time(), 0.0))
            if not asking.done():
                return Outcome(
                    ExecutionStatus.TIMED_OUT,
                    error=f"Timed out after {timeout_s:g} s (waiting for the same request "
                    "of another row).",
                    latency_ms=round(timeout_s * 1000),
                )
            if not asking.cancelled() and asking.exception() is None and _kept(asking.result()):
                return _cached(asking.result().result, priced)
            # It failed: the first waiter to get here asks again, and the others wait for it.
        # Claimed before the store is asked: another row's same request waits for this one.
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self._asking[entry] = future
        try:
            try:
                kept = await self._store.cached_answer(owner, request_key, time.time())
            except StoreError as exc:
                # The cache is a saving, never a reason for a row to fail.
                log.warning("answer cache: not read: %s", exc)
                kept = None
            if kept is not None:
                outcome = _cached(kept.result, priced)
                future.set_result(outcome)
                return outcome
            outcome = await ask(max(deadline - loop.time(), 0.0))
            if _kept(outcome):
                assert outcome.result is not None
                answer = CachedAnswer(
                    outcome.result, outcome.prompt_tokens, outcome.completion_tokens
                )
                try:
                    await self._store.cache_answer(
                        owner, request_key, answer, time.time() + self._ttl_s
                    )
                except StoreError as exc:
                    log.warning("answer cache: not kept: %s", exc)
            future.set_result(outcome)
            return outcome
        except BaseException:
            future.cancel()  # the waiters ask for themselves
            raise
        finally:
            del self._asking[entry]


def _kept(outcome: Outcome) -> bool:
    return outcome.status is ExecutionStatus.SUCCEEDED and outcome.result is not None


def _cached(result: str | None, priced: bool) -> Outcome:
    return Outcome(
        ExecutionStatus.SUCCEEDED,
        result=result,
        latency_ms=0,
        attempts=0,
        cost=0.0 if priced else None,
        cached=True,
    )
