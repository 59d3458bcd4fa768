"""The SQLite store's SQL, and how SQLite keeps text.

``sqlite.py`` owns the connections, the threads and the transactions; this
holds what they run (the statements, and a batch's start or end written)
and how text is stored (``text``, ``read_text``: text with a lone surrogate
is kept as bytes). The conversions between records and rows, the same in
every SQL store, are in ``rows.py``; ``sqlite.py`` hands them these two.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Mapping

from batchexec.store.base import BatchEnded, BatchStarted, Change
from batchexec.store.rows import OPENAI_BATCH_COLUMNS

INSERT_BATCH = (
    "INSERT INTO batches (id, owner, columns, status, message, created_at, "
    "started_at, finished_at, xlsx_name, retry_of, counts, callback_url, callback_state, "
    "callback_next, api, options) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
SELECT_BATCH = (
    "SELECT id, owner, columns, status, message, created_at, started_at, finished_at, "
    "xlsx_name, retry_of, callback_url, api, options FROM batches WHERE id = ?"
)
SELECT_UNFINISHED = (
    "SELECT id, owner, columns, status, message, created_at, started_at, finished_at, "
    "xlsx_name, retry_of, callback_url, api, options FROM batches "
    "WHERE status IN ('queued', 'processing') "
    "ORDER BY created_at, rowid"
)
SELECT_SUMMARIES = (
    "SELECT id, status, message, created_at, finished_at, retry_of, counts, cost FROM batches "
    "WHERE owner = ? AND (? IS NULL OR status = ?) "
    "ORDER BY created_at DESC, rowid DESC LIMIT ?"
)


#: A batch's rows by status now, and the sum of their costs (None when none has one).
Tally = Callable[[sqlite3.Connection, str], tuple[Mapping[str, int], float | None]]


def apply_batch_change(db: sqlite3.Connection, change: Change, tally: Tally) -> None:
    """Write a change to a batch's own record; its end's counts and cost from ``tally``."""
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
            counts, cost = tally(db, batch_id)
            db.execute(
                "UPDATE batches SET status = ?, message = ?, finished_at = ?, xlsx_name = ?, "
                "counts = ?, cost = ? WHERE id = ?",
                (
                    status.value,
                    text(message),
                    finished_at,
                    xlsx_name,
                    json.dumps(dict(counts)),
                    cost,
                    batch_id,
                ),
            )


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


#: The webhooks due at ``?`` (now), held until now plus ``?`` seconds.
CLAIM_CALLBACKS = (
    "UPDATE batches SET callback_next = ? + ? WHERE id IN (SELECT id FROM batches "
    "WHERE callback_state = 'pending' AND callback_next <= ? "
    "AND status IN ('completed', 'failed', 'cancelled') "
    "ORDER BY callback_next LIMIT ?) "
    "RETURNING id, status, message, created_at, finished_at, retry_of, counts, cost, "
    "callback_url, callback_attempts"
)
UPDATE_CALLBACK = (
    "UPDATE batches SET callback_attempts = ?, callback_state = ?, callback_next = ? WHERE id = ?"
)
NEXT_CALLBACK = (
    "SELECT min(callback_next) FROM batches WHERE callback_state = 'pending' "
    "AND status IN ('completed', 'failed', 'cancelled')"
)

INSERT_STORED_FILE = (
    "INSERT INTO openai_files (id, owner, purpose, filename, created_at) VALUES (?, ?, ?, ?, ?)"
)
INSERT_CHUNK = "INSERT INTO openai_file_chunks (file_id, seq, data) VALUES (?, ?, ?)"
COMPLETE_FILE = "UPDATE openai_files SET bytes = ?, complete = 1 WHERE id = ?"
SELECT_STORED_FILE = (
    "SELECT id, owner, purpose, filename, created_at, bytes FROM openai_files "
    "WHERE id = ? AND owner = ? AND complete"
)
#: ``?`` after ``?``: the owner, the purpose twice (NULL for any), the cursor's created_at
#: and id (NULL for the first page) and the limit; newest first, and oldest first below.
SELECT_STORED_FILES_DESC = (
    "SELECT id, owner, purpose, filename, created_at, bytes FROM openai_files "
    "WHERE owner = ? AND complete AND (? IS NULL OR purpose = ?) "
    "AND (? IS NULL OR (created_at, id) < (?, ?)) ORDER BY created_at DESC, id DESC LIMIT ?"
)
SELECT_STORED_FILES_ASC = (
    "SELECT id, owner, purpose, filename, created_at, bytes FROM openai_files "
    "WHERE owner = ? AND complete AND (? IS NULL OR purpose = ?) "
    "AND (? IS NULL OR (created_at, id) > (?, ?)) ORDER BY created_at, id LIMIT ?"
)
SELECT_FILE_CURSOR = "SELECT created_at, id FROM openai_files WHERE id = ? AND owner = ?"
SELECT_CHUNK = "SELECT data FROM openai_file_chunks WHERE file_id = ? AND seq = ?"

INSERT_OPENAI_BATCH = (
    "INSERT INTO openai_batches (id, owner, input_file_id, endpoint, completion_window, "
    "metadata, created_at, expires_at, request_total, errors, failed_at) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
# The f-strings below join constants only (noqa S608: no value is interpolated).
SELECT_OPENAI_BATCH = f"SELECT {OPENAI_BATCH_COLUMNS} WHERE o.id = ? AND o.owner = ?"
SELECT_OPENAI_BATCHES_BY_ID = f"SELECT {OPENAI_BATCH_COLUMNS} WHERE o.id IN "
#: The owner, the id the page starts after twice (NULL for the first page), the owner, the limit.
SELECT_OPENAI_BATCHES = (
    f"SELECT {OPENAI_BATCH_COLUMNS} WHERE o.owner = ? AND (? IS NULL OR (o.created_at, o.id) < "  # noqa: S608
    "(SELECT created_at, id FROM openai_batches WHERE id = ? AND owner = ?)) "
    "ORDER BY o.created_at DESC, o.id DESC LIMIT ?"
)
OPENAI_CANCELLING = (
    "UPDATE openai_batches SET cancelling_at = coalesce(cancelling_at, ?) WHERE id = ?"
)
#: Now, now.
MARK_OVERDUE = (
    "UPDATE openai_batches SET expired_at = coalesce(expired_at, ?) WHERE expires_at < ? "
    "AND failed_at IS NULL AND id IN (SELECT id FROM batches "
    "WHERE status IN ('queued', 'processing')) RETURNING id"
)
#: Now, the hold, now, the limit.
CLAIM_FINALIZATIONS = (
    "UPDATE openai_batches SET finalize_until = ? + ? WHERE id IN (SELECT o.id "
    "FROM openai_batches o JOIN batches b ON b.id = o.id "
    "WHERE o.finalized_at IS NULL AND o.failed_at IS NULL "
    "AND b.status IN ('completed', 'failed', 'cancelled') "
    "AND (o.finalize_until IS NULL OR o.finalize_until < ?) LIMIT ?) RETURNING id"
)
OPENAI_FINALIZED = (
    "UPDATE openai_batches SET output_file_id = ?, error_file_id = ?, finalized_at = ? "
    "WHERE id = ? AND finalized_at IS NULL"
)
