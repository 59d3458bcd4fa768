"""The SQLite store's SQL, and how records become rows and rows records.

``sqlite.py`` owns the connections, the threads and the transactions; this
holds what they run: the statements, a group of changes coalesced into bulk
updates, and the conversions (text with lone surrogates kept as bytes).
"""

from __future__ import annotations

import json
import sqlite3
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

from batchexec.records import Batch, BatchStatus, Execution, ExecutionStatus, Outcome
from batchexec.store.base import BatchEnded, BatchStarted, Change
from batchexec.store.changes import coalesced as shared_coalesced

INSERT_BATCH = (
    "INSERT INTO batches (id, owner, columns, status, message, created_at, "
    "started_at, finished_at, xlsx_name, retry_of, counts) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
INSERT_EXECUTION = (
    "INSERT INTO executions (batch_id, idx, model, cells, status, prompt_sent, result, error, "
    "latency_ms, attempts, prompt_tokens, completion_tokens, ended_seq) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
SELECT_EXECUTIONS = (
    "SELECT idx, model, cells, status, prompt_sent, result, error, latency_ms, attempts, "
    "prompt_tokens, completion_tokens, ended_seq FROM executions WHERE batch_id = ? ORDER BY idx"
)
#: A row's end is final: neither a start nor a second end (a cancel racing the
#: row's own answer) changes a row that has ended.
UPDATE_STARTED = (
    "UPDATE executions SET status = 'running', prompt_sent = ?, attempts = ? "
    "WHERE batch_id = ? AND idx = ? AND status IN ('pending', 'running')"
)
#: An end with no prompt (a row never sent, or cancelled) keeps the prompt as sent.
UPDATE_ENDED = (
    "UPDATE executions SET status = ?, prompt_sent = coalesce(?, prompt_sent), result = ?, "
    "error = ?, latency_ms = ?, attempts = ?, prompt_tokens = ?, completion_tokens = ?, "
    "ended_seq = ? WHERE batch_id = ? AND idx = ? AND status IN ('pending', 'running')"
)
SELECT_SUMMARIES = (
    "SELECT id, status, message, created_at, finished_at, retry_of, counts FROM batches "
    "WHERE owner = ? AND (? IS NULL OR status = ?) "
    "ORDER BY created_at DESC, rowid DESC LIMIT ?"
)


def batch_row(batch: Batch) -> tuple[Any, ...]:
    """``batch``'s row of ``batches``, for ``INSERT_BATCH``."""
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
    )


def execution_rows(batch: Batch) -> Iterator[tuple[Any, ...]]:
    """``batch``'s rows of ``executions``, for ``INSERT_EXECUTION``."""
    for e in batch.executions:
        yield (
            batch.id,
            e.index,
            text(e.model),
            json.dumps(e.cells),
            e.status.value,
            text(e.prompt_sent),
            text(e.result),
            text(e.error),
            e.latency_ms,
            e.attempts,
            e.prompt_tokens,
            e.completion_tokens,
            e.seq,
        )


def coalesced(
    changes: Sequence[Change],
) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]], list[Change]]:
    """A group's changes as rows' starts and ends to write in bulk (see ``changes.coalesced``)."""
    return shared_coalesced(changes, text)


def apply_batch_change(db: sqlite3.Connection, change: Change) -> None:
    match change:
        case BatchStarted(batch_id, started_at):
            db.execute(
                "UPDATE batches SET status = 'processing', message = ?, started_at = ? "
                "WHERE id = ?",
                ("Batch execution in progress.", started_at, batch_id),
            )
        case BatchEnded(batch_id, status, message, finished_at, xlsx_name):
            # Counted here, in the transaction, after the group's rows: exact, and
            # listing a finished batch then counts nothing.
            counts = dict(
                db.execute(
                    "SELECT status, count(*) FROM executions WHERE batch_id = ? GROUP BY status",
                    (batch_id,),
                ).fetchall()
            )
            db.execute(
                "UPDATE batches SET status = ?, message = ?, finished_at = ?, xlsx_name = ?, "
                "counts = ? WHERE id = ?",
                (
                    status.value,
                    text(message),
                    finished_at,
                    xlsx_name,
                    json.dumps(counts),
                    batch_id,
                ),
            )


def batch_of(db: sqlite3.Connection, row: tuple[Any, ...]) -> Batch:
    batch_id, owner, columns, status, message, created_at, started_at, finished_at = row[:8]
    executions = [
        Execution(
            index=idx,
            model=read_text(model) or "",
            cells=json.loads(cells),
            outcome=Outcome(
                ExecutionStatus(execution_status),
                result=read_text(result),
                error=read_text(error),
                latency_ms=latency_ms,
                attempts=attempts,
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
                seq=ended_seq,
            ),
            prompt_sent=read_text(prompt_sent),
        )
        for (
            idx,
            model,
            cells,
            execution_status,
            prompt_sent,
            result,
            error,
            latency_ms,
            attempts,
            prompt_tokens,
            completion_tokens,
            ended_seq,
        ) in db.execute(SELECT_EXECUTIONS, (batch_id,))
    ]
    return Batch(
        id=batch_id,
        owner=owner,
        columns=tuple(json.loads(columns)),
        executions=executions,
        created_at=created_at,
        status=BatchStatus(status),
        message=read_text(message) or "",
        started_at=started_at,
        finished_at=finished_at,
        xlsx_name=row[8],
        retry_of=row[9],
    )


def counts_of(stored: str | None) -> Counter[ExecutionStatus] | None:
    """Counts written with a batch's end, if it has ended."""
    if stored is None:
        return None
    return Counter({ExecutionStatus(state): count for state, count in json.loads(stored).items()})


def text(value: str | None) -> str | bytes | None:
    """``value`` as SQLite can hold it; ``read_text`` gives it back exactly.

    Text with a lone surrogate (JSON can carry one) has no UTF-8 form, so it
    is kept as the bytes Python's ``surrogatepass`` makes of it instead.
    """
    if value is None or value.isascii():
        return value
    try:
        value.encode()
    except UnicodeEncodeError:
        return value.encode("utf-8", "surrogatepass")
    return value


def read_text(value: str | bytes | None) -> str | None:
    """Text written by ``text``, exactly as it was."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "surrogatepass")
    return value
