"""Records as rows and rows as records: what every SQL store converts the same way.

Each dialect keeps text its own way (``text`` and ``read_text`` in
``sqlite_rows.py`` and ``postgres_rows.py``: SQLite keeps text with no UTF-8
form as bytes, PostgreSQL escapes what its text cannot hold), so the
conversions here that write or read text take the dialect's as an argument.
The order of each row's values is the order of the columns in every
dialect's statements.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

from batchexec.planning import BatchOptions
from batchexec.records import Batch, BatchStatus, Execution, ExecutionStatus, Outcome, Summary
from batchexec.store.base import (
    CallbackDue,
    Change,
    ExecutionEnded,
    ExecutionStarted,
    OpenAIBatch,
)

#: How a dialect stores a text value (None stays None).
TextOf = Callable[[str | None], Any]
#: How a dialect reads back a text value ``TextOf`` stored, exactly as it was.
ReadText = Callable[[Any], str | None]


def batch_row(batch: Batch, text: TextOf) -> tuple[Any, ...]:
    """``batch``'s row of ``batches``, for the dialect's ``INSERT_BATCH``."""
    counts = {str(state): n for state, n in batch.counts.items() if n}
    return (
        batch.id,
        batch.owner,
        json.dumps(batch.columns),
        batch.status.value,
        text(batch.message),
        batch.created_at,
        batch.started_at,
        batch.finished_at,
        batch.xlsx_name,
        batch.retry_of,
        json.dumps(counts) if batch.status.finished else None,
        batch.callback_url,
        # Due as soon as the batch ends (see 0006_callbacks.sql).
        "pending" if batch.callback_url else None,
        0.0 if batch.callback_url else None,
        batch.api,
        text(batch.options.to_json()),
    )


def execution_rows(batch: Batch, text: TextOf) -> Iterator[tuple[Any, ...]]:
    """``batch``'s rows of ``executions``, in the order ``batches_of`` reads them."""
    for e in batch.executions:
        yield (
            batch.id,
            e.index,
            text(e.model),
            json.dumps(e.cells),
            *outcome_values(e.outcome, e.prompt_sent, text),
        )


def outcome_values(outcome: Outcome, prompt_sent: str | None, text: TextOf) -> list[Any]:
    """A row's ``outcome``, sent as ``prompt_sent``, as ``execution_of`` takes it back:
    ``[status, prompt_sent, result, error, latency_ms, attempts, prompt_tokens,
    completion_tokens, cost, cached, seq]``, its text as the dialect stores it (an
    execution's, or what a row's end writes)."""
    return [
        outcome.status.value,
        text(prompt_sent),
        text(outcome.result),
        text(outcome.error),
        outcome.latency_ms,
        outcome.attempts,
        outcome.prompt_tokens,
        outcome.completion_tokens,
        outcome.cost,
        outcome.cached,
        outcome.seq,
    ]


def coalesced(
    changes: Sequence[Change], text: TextOf
) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]], list[Change]]:
    """A group's changes as rows' starts and ends to write in bulk, and the batches' changes.

    A start is ``(prompt_sent, attempts, batch_id, idx)``; an end is ``(status,
    prompt_sent, result, error, latency_ms, attempts, prompt_tokens,
    completion_tokens, cost, cached, seq, batch_id, idx)``: the batch id is always second
    from last. A row's end overwrites everything its start wrote, so a start
    whose end is in the same group is not written at all: a fast row costs
    one update, not two. Rows are independent of each other and of their
    batch's record, so writing each kind in bulk leaves the same state as
    writing in order.
    """
    started, ended, batches = coalesced_by_row(changes)
    return (
        [(text(s.prompt_sent), s.attempts, s.batch_id, s.index) for s in started],
        [
            (*outcome_values(end.outcome, end.prompt_sent, text), end.batch_id, end.index)
            for end in ended
        ],
        batches,
    )


def coalesced_by_row(
    changes: Sequence[Change],
) -> tuple[list[ExecutionStarted], list[ExecutionEnded], list[Change]]:
    """A group's starts and ends of rows to write, and the batches' changes, each in
    order: a start whose end is in the group is dropped, and every end of a row after
    its first."""
    started: dict[tuple[str, int], ExecutionStarted] = {}
    ended: dict[tuple[str, int], ExecutionEnded] = {}
    batches: list[Change] = []
    for change in changes:
        if isinstance(change, ExecutionEnded):
            key = (change.batch_id, change.index)
            if key in ended:
                continue  # the first end wins, as in the store
            started.pop(key, None)
            ended[key] = change
        elif isinstance(change, ExecutionStarted):
            started[change.batch_id, change.index] = change
        else:
            batches.append(change)
    return list(started.values()), list(ended.values()), batches


def batches_of(
    batch_rows: Iterable[Any], execution_rows: Iterable[Any], read_text: ReadText
) -> list[Batch]:
    """Batches from their rows of ``batches`` (in the order given) and of ``executions``.

    A batch's row is ``(id, owner, columns, status, message, created_at,
    started_at, finished_at, xlsx_name, retry_of, callback_url, api, options)``; an execution's is
    ``(batch_id, idx, model, cells, status, prompt_sent, result, error,
    latency_ms, attempts, prompt_tokens, completion_tokens, cost, cached, ended_seq)``, each
    batch's in the order of their index.
    """
    return batches_with(batch_rows, executions_of(execution_rows, read_text), read_text)


def executions_of(
    execution_rows: Iterable[Any], read_text: ReadText
) -> defaultdict[str, list[Execution]]:
    """Executions by batch from their rows of ``executions`` (as ``batches_of`` has them)."""
    executions: defaultdict[str, list[Execution]] = defaultdict(list)
    for batch_id, idx, model, cells, status, prompt_sent, result, error, *counts in execution_rows:
        outcome = [status, read_text(prompt_sent), read_text(result), read_text(error), *counts]
        executions[batch_id].append(
            execution_of(idx, read_text(model) or "", json.loads(cells), outcome)
        )
    return executions


def execution_of(
    index: int, model: str, cells: dict[str, Any], outcome: Sequence[Any]
) -> Execution:
    """An execution from its input and its outcome's fields (as ``outcome_values`` has
    them), text read back."""
    (
        status,
        prompt_sent,
        result,
        error,
        latency_ms,
        attempts,
        prompt_tokens,
        completion_tokens,
        cost,
        cached,
        seq,
    ) = outcome
    return Execution(
        index=index,
        model=model,
        cells=cells,
        outcome=Outcome(
            ExecutionStatus(status),
            result=result,
            error=error,
            latency_ms=latency_ms,
            attempts=attempts,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            cost=cost,
            cached=bool(cached),
            seq=seq,
        ),
        prompt_sent=prompt_sent,
    )


def batches_with(
    batch_rows: Iterable[Any], executions: Mapping[str, list[Execution]], read_text: ReadText
) -> list[Batch]:
    """Batches from their rows of ``batches`` (as ``batches_of`` has them) and their
    executions, by batch id."""
    return [
        Batch(
            id=row[0],
            owner=row[1],
            columns=tuple(json.loads(row[2])),
            executions=executions.get(row[0], []),
            created_at=row[5],
            status=BatchStatus(row[3]),
            message=read_text(row[4]) or "",
            started_at=row[6],
            finished_at=row[7],
            xlsx_name=row[8],
            retry_of=row[9],
            callback_url=row[10],
            api=row[11],
            options=BatchOptions.from_json(read_text(row[12])),
        )
        for row in batch_rows
    ]


def summaries_of(rows: Iterable[Any], read_text: ReadText) -> list[Summary]:
    """Summaries from rows of ``(id, status, message, created_at, finished_at, retry_of,
    counts, cost)``."""
    return [
        Summary(
            row[0],
            BatchStatus(row[1]),
            read_text(row[2]) or "",
            row[3],
            row[4],
            row[5],
            counts_of(row[6]),
            row[7],
        )
        for row in rows
    ]


def callbacks_of(rows: Sequence[Any], read_text: ReadText) -> list[CallbackDue]:
    """Webhooks due from rows of a summary's columns then ``callback_url`` and
    ``callback_attempts``, the earliest ended first."""
    due = [
        CallbackDue(summary, row[8], row[9])
        for summary, row in zip(summaries_of(rows, read_text), rows, strict=True)
    ]
    return sorted(due, key=lambda callback: callback.batch.finished_at or 0.0)


def counted(rows: Iterable[Any]) -> Counter[ExecutionStatus]:
    """Rows per status from ``(status, count)`` pairs (``GROUP BY status``)."""
    return Counter({ExecutionStatus(status): count for status, count in rows})


def counts_of(stored: str | None) -> Counter[ExecutionStatus] | None:
    """Counts written with a batch's end, if it has ended."""
    if stored is None:
        return None
    return counted(json.loads(stored).items())


def openai_batch_row(batch: OpenAIBatch) -> tuple[Any, ...]:
    """``batch``'s row of ``openai_batches``, for the dialect's ``INSERT_OPENAI_BATCH``."""
    return (
        batch.id,
        batch.owner,
        batch.input_file_id,
        batch.endpoint,
        batch.completion_window,
        batch.metadata,
        batch.created_at,
        batch.expires_at,
        batch.request_total,
        batch.errors,
        batch.failed_at,
    )


def openai_batches_of(rows: Iterable[Any]) -> list[OpenAIBatch]:
    """OpenAI batches from rows of ``OPENAI_BATCH_COLUMNS`` (JSON text is ASCII: no dialect's
    text needs converting)."""
    return [
        OpenAIBatch(
            id=row[0],
            owner=row[1],
            input_file_id=row[2],
            endpoint=row[3],
            completion_window=row[4],
            metadata=row[5],
            created_at=row[6],
            expires_at=row[7],
            request_total=row[8],
            errors=row[9],
            failed_at=row[10],
            cancelling_at=row[11],
            output_file_id=row[12],
            error_file_id=row[13],
            finalized_at=row[14],
            expired_at=row[15],
            status=None if row[16] is None else BatchStatus(row[16]),
            started_at=row[17],
            finished_at=row[18],
            counts=counts_of(row[19]),
        )
        for row in rows
    ]


#: What every dialect selects of an OpenAI batch, ``o``, and of the batch it runs as, ``b``.
OPENAI_BATCH_COLUMNS = (
    "o.id, o.owner, o.input_file_id, o.endpoint, o.completion_window, o.metadata, "
    "o.created_at, o.expires_at, o.request_total, o.errors, o.failed_at, o.cancelling_at, "
    "o.output_file_id, o.error_file_id, o.finalized_at, o.expired_at, "
    "b.status, b.started_at, b.finished_at, b.counts "
    "FROM openai_batches o LEFT JOIN batches b ON b.id = o.id"
)
