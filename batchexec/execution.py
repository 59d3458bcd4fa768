"""One execution: a row's prompt sent to its model, and the ``Outcome`` that came of it.

``Executor`` refuses a row whose input did not succeed or whose filled-in
prompt is too long (``max_sent_prompt_length``). Otherwise it builds the
``ChatRequest``, calls the row's provider under the model's limits
(``ModelLimits``) with retries, all within ``execution_timeout_s``, and turns
the answer or the error into an ``Outcome``; an answer longer than
``max_result_length`` is not kept. It knows nothing of batches or the
registry: the engine records what it returns.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Mapping

from batchexec.config import Settings
from batchexec.errors import ProviderError, ProviderNotConfiguredError
from batchexec.limits import CallLimits, ModelLimits
from batchexec.metrics import NO_METRICS, Metrics
from batchexec.planning import PlannedRow
from batchexec.providers import ChatRequest, Completion, Provider, unconfigured
from batchexec.records import ExecutionStatus, Outcome
from batchexec.retry import Attempts, RetryPolicy, call_with_retries
from batchexec.templating import substituted_length

log = logging.getLogger(__name__)


class Executor:
    """Runs single executions; its per-model limits are shared by every batch that uses it."""

    def __init__(
        self,
        settings: Settings,
        providers: Mapping[str, Provider],
        *,
        rng: random.Random,
        limits: CallLimits | None = None,
        metrics: Metrics = NO_METRICS,
    ) -> None:
        """``rng`` draws the retries' jitter (not security); ``limits`` are this
        process's own unless given (a cluster's); ``metrics`` times each call."""
        self._settings = settings
        self._metrics = metrics
        self._providers = providers
        self._limits: CallLimits = limits or ModelLimits()
        self._retry = RetryPolicy(max_retries=settings.max_retries)
        self._rng = rng

    def refusal(self, row: PlannedRow, outputs: Mapping[int, str]) -> Outcome | None:
        """Why ``row`` is not sent, given the results of the rows that succeeded; else ``None``."""
        missing = sorted(index for index in row.depends_on if index not in outputs)
        if missing:
            names = ", ".join(f"${{output.{index}}}" for index in missing)
            return Outcome(ExecutionStatus.SKIPPED, error=f"Skipped: {names} did not succeed.")
        limit = self._settings.max_sent_prompt_length
        length = substituted_length(row.prompt, outputs) if row.chat is None else len(row.prompt)
        if length > limit:
            return Outcome(
                ExecutionStatus.FAILED,
                error=f"Not sent: with ${{output.n}} filled in the prompt is {length} "
                f"characters; the limit (MAX_SENT_PROMPT_LENGTH) is {limit}.",
            )
        return None

    async def run(self, row: PlannedRow, prompt: str, earlier_attempts: int = 0) -> Outcome:
        """One execution: its model call with retries, all under the execution timeout.

        ``earlier_attempts`` counts the calls made in earlier lives of the row;
        the outcome's ``attempts`` includes them. Errors end as a failed or
        timed-out outcome, never as an exception (``CancelledError`` aside).
        """
        target = row.target
        chat = row.chat
        if chat is None:
            request = ChatRequest(
                prompt=prompt, system_prompt=target.system_prompt, params=target.params
            )
        else:
            # A request's own system prompt wins over an assistant's.
            request = ChatRequest(
                prompt=prompt,
                system_prompt=chat.system or target.system_prompt,
                params=target.params,
                history=chat.history,
                options=chat.options,
            )
        loop = asyncio.get_running_loop()
        timeout_s = self._settings.execution_timeout_s
        started = loop.time()
        attempts = Attempts(earlier_attempts)

        def ended(
            status: ExecutionStatus, error: str | None = None, answer: Completion | None = None
        ) -> Outcome:
            return Outcome(
                status,
                result=answer.text if answer else None,
                error=error,
                latency_ms=round((loop.time() - started) * 1000),
                attempts=attempts.count,
                prompt_tokens=answer.prompt_tokens if answer else None,
                completion_tokens=answer.completion_tokens if answer else None,
            )

        try:
            async with asyncio.timeout(timeout_s):
                completion = await call_with_retries(
                    lambda: self._call(row, request, retry=attempts.count > earlier_attempts + 1),
                    self._retry,
                    attempts=attempts,
                    deadline=started + timeout_s,
                    rng=self._rng,
                )
        except TimeoutError:
            return ended(ExecutionStatus.TIMED_OUT, error=f"Timed out after {timeout_s:g} s.")
        except ProviderError as exc:
            return ended(ExecutionStatus.FAILED, error=str(exc))
        except Exception as exc:
            # A provider bug fails its own row, never the whole batch.
            log.exception(
                "execution %d: unexpected error from %s", row.index, target.model.provider
            )
            return ended(ExecutionStatus.FAILED, error=f"Internal error: {type(exc).__name__}")
        limit = self._settings.max_result_length
        if len(completion.text) > limit:
            # Not kept: every result is held in memory and written to both outputs.
            return ended(
                ExecutionStatus.FAILED,
                error=f"The answer is {len(completion.text)} characters; "
                f"the limit (MAX_RESULT_LENGTH) is {limit}.",
            )
        return ended(ExecutionStatus.SUCCEEDED, answer=completion)

    async def _call(self, row: PlannedRow, request: ChatRequest, *, retry: bool) -> Completion:
        model = row.target.model
        missing = unconfigured(self._providers, model)
        if missing is not None:
            raise ProviderNotConfiguredError(missing)
        if retry:
            self._metrics.retry(model.name)
        async with self._limits.call(model):
            with self._metrics.call(model.name, model.provider):
                return await self._providers[model.provider].complete(model, request)
