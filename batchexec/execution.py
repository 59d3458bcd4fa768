"""One execution: a row's prompt sent to its model, and the ``Outcome`` that came of it.

``Executor`` refuses a row whose input did not succeed or whose filled-in
prompt is too long (``max_sent_prompt_length``). Otherwise it builds the
``ChatRequest``, calls the row's provider under the model's limits
(``ModelLimits``) with retries, all within ``execution_timeout_s``, and turns
the answer or the error into an ``Outcome``; an answer longer than
``max_result_length`` is not kept. It knows nothing of batches or the
registry: the engine records what it returns.

Structured answers (``structured``): a row's request whose ``response_format``
gives a JSON Schema (an assistant's ``response_schema`` becomes one) has each
answer validated as part of its try. An invalid answer is a retryable error,
asked for again at once, and the result is the answer as canonical JSON. A
provider that cannot take the schema natively is given it in words, after the
system prompt. A chat request of the OpenAI Batch API is the exception: it is
sent as written and its answer passed on as given, as OpenAI's own Batch API
does.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from batchexec.answer_cache import AnswerCache
from batchexec.answer_cache import key as cache_key
from batchexec.config import Settings
from batchexec.errors import ProviderError, ProviderNotConfiguredError
from batchexec.estimates import output_limit, request_tokens
from batchexec.limits import CallLimits, ModelLimits
from batchexec.metrics import NO_METRICS, Metrics
from batchexec.planning import ChatInput, PlannedRow
from batchexec.providers import (
    ChatOptions,
    ChatRequest,
    Completion,
    Provider,
    unconfigured,
)
from batchexec.providers.http import response_schema
from batchexec.records import ExecutionStatus, Outcome
from batchexec.retry import Attempts, RetryPolicy, call_with_retries
from batchexec.structured import instruction, parse_answer
from batchexec.token_limits import TokenAccounts, TokenLimits

log = logging.getLogger(__name__)

#: The most a model's reservations are scaled by its provider's counts.
_MOST_TOKEN_SCALE = 4.0

#: What a row that sets nothing of its own sends besides its prompt.
_NO_CHAT = ChatInput()


def unsupported_options(provider: Provider, options: ChatOptions) -> list[str]:
    """What of a row's ``options`` ``provider`` cannot honour (``Provider.unsupported``),
    less a JSON Schema ``response_format``: where the provider cannot take one, the
    executor asks for it in words instead. Not for the OpenAI Batch API's chat
    requests, which are sent as written."""
    if response_schema(options) is not None and not _takes_schema(provider, options):
        options = replace(options, response_format=None)
    return provider.unsupported(options)


def _as_sent(provider: Provider, request: ChatRequest, schema: dict[str, Any]) -> ChatRequest:
    """``request`` as ``provider`` is sent it: a schema it cannot take natively is taken
    out of the options and asked for in words after the system prompt instead."""
    if _takes_schema(provider, request.options):
        return request
    system = "\n\n".join(part for part in (request.system_prompt, instruction(schema)) if part)
    options = replace(request.options, response_format=None)
    return replace(request, system_prompt=system, options=options)


def _takes_schema(provider: Provider, options: ChatOptions) -> bool:
    return not provider.unsupported(ChatOptions(response_format=options.response_format))


@dataclass
class _Usage:
    """Tokens over every answer a row was given, the ones rejected as invalid included:
    what the provider bills for."""

    prompt_tokens: int | None = None
    completion_tokens: int | None = None

    def add(self, completion: Completion) -> None:
        self.prompt_tokens = _sum(self.prompt_tokens, completion.prompt_tokens)
        self.completion_tokens = _sum(self.completion_tokens, completion.completion_tokens)


def _sum(total: int | None, count: int | None) -> int | None:
    return total if count is None else (total or 0) + count


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
        answers: AnswerCache | None = None,
        tokens: TokenAccounts | None = None,
    ) -> None:
        """``rng`` draws the retries' jitter (not security); ``limits`` are this
        process's own unless given (a cluster's); ``metrics`` times each call."""
        self._settings = settings
        self._metrics = metrics
        self._providers = providers
        self._limits: CallLimits = limits or ModelLimits()
        self._tokens: TokenAccounts = tokens or TokenLimits(settings.tpm_window_s)
        self._answers = answers
        #: By model, the most its provider's prompt counts have been over the estimate:
        #: later reservations are scaled by it, so a tokenizer counting more than the
        #: estimate (other languages, code) does not let a minute overfill.
        self._token_scale: dict[str, float] = {}
        self._retry = RetryPolicy(max_retries=settings.max_retries)
        self._rng = rng

    def refusal(self, row: PlannedRow, outputs: Mapping[int, str]) -> Outcome | None:
        """Why ``row`` is not sent, given the results of the rows that succeeded; else ``None``."""
        missing = sorted(index for index in row.depends_on if index not in outputs)
        if missing:
            # Named as the prompt names them: side by side, by the input row.
            names = ", ".join(f"${{output.{row.written(index)}}}" for index in missing)
            return Outcome(ExecutionStatus.SKIPPED, error=f"Skipped: {names} did not succeed.")
        limit = self._settings.max_sent_prompt_length
        length = row.sent_length(outputs)
        if length > limit:
            return Outcome(
                ExecutionStatus.FAILED,
                error=f"Not sent: with ${{output.n}} filled in the prompt is {length} "
                f"characters; the limit (MAX_SENT_PROMPT_LENGTH) is {limit}.",
            )
        return None

    async def run(
        self,
        row: PlannedRow,
        prompt: str,
        earlier_attempts: int = 0,
        *,
        cached_for: str | None = None,
    ) -> Outcome:
        """One execution: its model call with retries, all under the execution timeout.

        ``earlier_attempts`` counts the calls made in earlier lives of the row;
        the outcome's ``attempts`` includes them, and its token counts sum
        every answer of this life (``_Usage``). Errors end as a failed or
        timed-out outcome, never as an exception (``CancelledError`` aside).
        With ``cached_for`` (an owner), the answer cache answers a request that
        owner asked before (``answer_cache``).
        """
        target = row.target
        chat = row.chat or _NO_CHAT
        # A row's own system prompt wins over an assistant's.
        request = ChatRequest(
            prompt=prompt,
            system_prompt=chat.system or target.system_prompt,
            params=target.params,
            history=chat.history,
            options=chat.options,
        )
        # A request of the OpenAI Batch API is sent as written, its answer passed on as
        # given (module docstring); a row's schema (its own, its batch's or its
        # assistant's: ``planning``) is in its options.
        schema = None if row.verbatim else response_schema(request.options)
        provider = self._providers.get(target.model.provider)
        if schema is not None and provider is not None:
            request = _as_sent(provider, request, schema)
        if cached_for is not None and self._answers is not None:
            return await self._answers.answer(
                cached_for,
                cache_key(target.model, request),
                lambda left_s: self._ask(row, request, schema, earlier_attempts, left_s),
                timeout_s=self._settings.execution_timeout_s,
                priced=target.model.priced,
            )
        return await self._ask(
            row, request, schema, earlier_attempts, self._settings.execution_timeout_s
        )

    async def _ask(
        self,
        row: PlannedRow,
        request: ChatRequest,
        schema: dict[str, Any] | None,
        earlier_attempts: int,
        timeout_s: float,
    ) -> Outcome:
        """``run``'s call of the model, with retries, all within ``timeout_s``."""
        target = row.target
        loop = asyncio.get_running_loop()
        started = loop.time()
        attempts = Attempts(earlier_attempts)
        usage = _Usage()

        async def attempt() -> Completion:
            completion = await self._call(row, request, retry=attempts.count > earlier_attempts + 1)
            usage.add(completion)
            if schema is None:
                return completion
            # Raises InvalidAnswerError, which call_with_retries tries again at once. Off
            # the loop: a checked answer costs what the schema makes of it, bounded
            # (structured.MAX_CHECK_STEPS) but not small.
            text = await asyncio.to_thread(parse_answer, completion.text, schema)
            return replace(completion, text=text)

        def ended(
            status: ExecutionStatus,
            error: str | None = None,
            result: str | None = None,
            *,
            tokens: bool = True,
        ) -> Outcome:
            return Outcome(
                status,
                result=result,
                error=error,
                latency_ms=round((loop.time() - started) * 1000),
                attempts=attempts.count,
                prompt_tokens=usage.prompt_tokens if tokens else None,
                completion_tokens=usage.completion_tokens if tokens else None,
                # Every answer was paid for, a failed row's too.
                cost=target.model.cost(usage.prompt_tokens, usage.completion_tokens)
                if usage.prompt_tokens is not None or usage.completion_tokens is not None
                else None,
            )

        try:
            async with asyncio.timeout(timeout_s):
                completion = await call_with_retries(
                    attempt,
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
            # Its token counts go with it, as they always have.
            return ended(
                ExecutionStatus.FAILED,
                error=f"The answer is {len(completion.text)} characters; "
                f"the limit (MAX_RESULT_LENGTH) is {limit}.",
                tokens=False,
            )
        return ended(ExecutionStatus.SUCCEEDED, result=completion.text)

    async def _call(self, row: PlannedRow, request: ChatRequest, *, retry: bool) -> Completion:
        model = row.target.model
        missing = unconfigured(self._providers, model)
        if missing is not None:
            raise ProviderNotConfiguredError(missing)
        if retry:
            self._metrics.retry(model.name)
        # What the call may use of the model's tokens per minute, if it has a tpm: the
        # prompt's estimate, scaled by how far the provider's counts have exceeded such
        # estimates before, and the answer's bound.
        tokens = estimated = 0
        if model.tpm is not None:
            estimated = request_tokens(request)
            bound = output_limit(row.target, request.options)
            scale = self._token_scale.get(model.name, 1.0)
            tokens = math.ceil(estimated * scale) + (bound or 0)
        async with self._limits.call(model), self._tokens.reserve(model, tokens) as reserved:
            with self._metrics.call(model.name, model.provider):
                completion = await self._providers[model.provider].complete(model, request)
            if completion.prompt_tokens is not None and estimated:
                ratio = min(completion.prompt_tokens / estimated, _MOST_TOKEN_SCALE)
                if ratio > self._token_scale.get(model.name, 1.0):
                    self._token_scale[model.name] = ratio
            reported = [completion.prompt_tokens, completion.completion_tokens]
            if any(count is not None for count in reported):
                reserved.used(sum(count or 0 for count in reported))
            return completion
