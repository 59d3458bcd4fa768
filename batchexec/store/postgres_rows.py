"""The PostgreSQL store's SQL, and how PostgreSQL keeps text.

``postgres.py`` owns the pool, the retries, the transactions and the
listener; this holds what they run: the statements (a group's bulk updates
through ``unnest`` of one array a column, ``columns_of``, so a thousand row
ends are one statement) and how text PostgreSQL cannot hold is kept exactly
(``text``, ``read_text``). The conversions between records and rows, the
same in every SQL store, are in ``rows.py``; ``postgres.py`` hands them these
two.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from typing import Any

from batchexec.store.rows import OPENAI_BATCH_COLUMNS

#: The longest channel name NOTIFY takes (an identifier: 63 bytes).
_CHANNEL_BYTES = 63

SCHEMA_MIGRATIONS = (
    "CREATE TABLE IF NOT EXISTS schema_migrations ("
    "version INTEGER PRIMARY KEY, name TEXT NOT NULL, "
    "applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
)

INSERT_BATCH = (
    "INSERT INTO batches (id, owner, columns, status, message, created_at, started_at, "
    "finished_at, xlsx_name, retry_of, counts, callback_url, callback_state, callback_next, "
    "api, options) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, "
    "$16)"
)
#: The columns of ``rows.execution_rows``, which ``create`` copies in (COPY: the fastest
#: way in for a batch of many thousand rows).
EXECUTION_COLUMNS = [
    "batch_id",
    "idx",
    "model",
    "cells",
    "status",
    "prompt_sent",
    "result",
    "error",
    "latency_ms",
    "attempts",
    "prompt_tokens",
    "completion_tokens",
    "cost",
    "cached",
    "ended_seq",
]
SELECT_BATCH = (
    "SELECT id, owner, columns, status, message, created_at, started_at, finished_at, "
    "xlsx_name, retry_of, callback_url, api, options FROM batches WHERE id = $1"
)
SELECT_UNFINISHED = (
    "SELECT id, owner, columns, status, message, created_at, started_at, finished_at, "
    "xlsx_name, retry_of, callback_url, api, options FROM batches "
    "WHERE status IN ('queued', 'processing') "
    "ORDER BY created_at, created_order"
)
SELECT_BATCHES = (
    "SELECT id, owner, columns, status, message, created_at, started_at, finished_at, "
    "xlsx_name, retry_of, callback_url, api, options FROM batches WHERE id = ANY($1::text[]) "
    "ORDER BY created_at, created_order"
)
SELECT_EXECUTIONS = (
    "SELECT batch_id, idx, model, cells, status, prompt_sent, result, error, latency_ms, "
    "attempts, prompt_tokens, completion_tokens, cost, cached, ended_seq FROM executions "
    "WHERE batch_id = ANY($1::text[]) ORDER BY batch_id, idx"
)

#: The batches of a group this replica may write (``lease_owner`` is it), locked
#: until the group commits so that no claim can take one over meanwhile.
SELECT_HELD = (
    "SELECT id FROM batches WHERE id = ANY($1::text[]) AND lease_owner = $2 ORDER BY id FOR SHARE"
)
#: A row's end is final: neither a start nor a second end (a cancel racing the
#: row's own answer) changes a row that has ended. Rows as ``rows.coalesced``
#: makes them, one array a column.
UPDATE_STARTED = (
    "UPDATE executions AS e SET status = 'running', prompt_sent = c.prompt_sent, "
    "attempts = c.attempts "
    "FROM unnest($1::text[], $2::bigint[], $3::text[], $4::int[]) "
    "AS c (prompt_sent, attempts, batch_id, idx) "
    "WHERE e.batch_id = c.batch_id AND e.idx = c.idx AND e.status IN ('pending', 'running')"
)
#: An end with no prompt (a row never sent, or cancelled) keeps the prompt as sent.
UPDATE_ENDED = (
    "UPDATE executions AS e SET status = c.status, "
    "prompt_sent = coalesce(c.prompt_sent, e.prompt_sent), result = c.result, "
    "error = c.error, latency_ms = c.latency_ms, attempts = c.attempts, "
    "prompt_tokens = c.prompt_tokens, completion_tokens = c.completion_tokens, "
    "cost = c.cost, cached = c.cached, ended_seq = c.seq "
    "FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::bigint[], $6::bigint[], "
    "$7::bigint[], $8::bigint[], $9::float8[], $10::bool[], $11::bigint[], $12::text[], "
    "$13::int[]) "
    "AS c (status, prompt_sent, result, error, latency_ms, attempts, prompt_tokens, "
    "completion_tokens, cost, cached, seq, batch_id, idx) "
    "WHERE e.batch_id = c.batch_id AND e.idx = c.idx AND e.status IN ('pending', 'running')"
)
#: A batch's end is final too: a start applied again (a retried group) or late
#: never reopens it.
UPDATE_BATCH_STARTED = (
    "UPDATE batches SET status = 'processing', message = $2, started_at = $3 "
    "WHERE id = $1 AND status IN ('queued', 'processing')"
)
#: Counted here, in the transaction, after the group's rows: exact, and listing a
#: finished batch then counts nothing. The lease lapses with the end (nothing is
#: left to run); its owner stays, the only replica that may still write the batch.
UPDATE_BATCH_ENDED = (
    "UPDATE batches SET status = $2, message = $3, finished_at = $4, xlsx_name = $5, "
    "lease_until = NULL, counts = (SELECT coalesce(json_object_agg(status, n), '{}')::text "
    "FROM (SELECT status, count(*) AS n FROM executions WHERE batch_id = $1 "
    "GROUP BY status) AS rows), "
    "cost = (SELECT sum(cost) FROM executions WHERE batch_id = $1) "
    "WHERE id = $1"
)
NOTIFY_CHANGED = "SELECT pg_notify($2, 'changed:' || id) FROM unnest($1::text[]) AS ids (id)"
NOTIFY = "SELECT pg_notify($1, $2)"

SELECT_SUMMARIES = (
    "SELECT id, status, message, created_at, finished_at, retry_of, counts, cost FROM batches "
    "WHERE owner = $1 AND ($2::text IS NULL OR status = $2) "
    "ORDER BY created_at DESC, created_order DESC LIMIT $3"
)

# Leases. Times are the database's clock, extract(epoch FROM clock_timestamp()), and a
# lease is free when no replica holds it (lease_until is NULL) or its holder let it lapse.

#: Up to $2 free batches oldest first, and every free one asked to cancel; two
#: replicas claiming at once skip each other's rows instead of waiting or sharing.
CLAIM = (
    "WITH now AS (SELECT extract(epoch FROM clock_timestamp())::double precision AS t), "
    "oldest AS (SELECT id FROM batches WHERE status IN ('queued', 'processing') "
    "AND (lease_until IS NULL OR lease_until < (SELECT t FROM now)) "
    "ORDER BY created_at, created_order LIMIT $2 FOR UPDATE SKIP LOCKED), "
    "cancels AS (SELECT id FROM batches WHERE status IN ('queued', 'processing') "
    "AND (lease_until IS NULL OR lease_until < (SELECT t FROM now)) "
    "AND cancel_reason IS NOT NULL FOR UPDATE SKIP LOCKED) "
    "UPDATE batches SET lease_owner = $1, lease_until = (SELECT t FROM now) + $3 "
    "WHERE id IN (SELECT id FROM oldest UNION SELECT id FROM cancels) RETURNING id"
)
RENEW = (
    "UPDATE batches SET lease_until = extract(epoch FROM clock_timestamp())::double precision + $3 "
    "WHERE id = ANY($1::text[]) AND lease_owner = $2 AND status IN ('queued', 'processing') "
    "RETURNING id, cancel_reason"
)
#: The owner goes too: see ``PostgresStore.release``.
RELEASE = (
    "UPDATE batches SET lease_owner = NULL, lease_until = NULL "
    "WHERE id = ANY($1::text[]) AND lease_owner = $2"
)
#: The first reason asked is kept.
REQUEST_CANCEL = (
    "UPDATE batches SET cancel_reason = coalesce(cancel_reason, $2) "
    "WHERE id = $1 AND status IN ('queued', 'processing') RETURNING id"
)
#: The webhooks due now, held for ``$2`` seconds: one replica makes each attempt.
CLAIM_CALLBACKS = (
    "WITH now AS (SELECT extract(epoch FROM clock_timestamp())::double precision AS t), "
    "due AS (SELECT id FROM batches WHERE callback_state = 'pending' "
    "AND callback_next <= (SELECT t FROM now) AND status IN ('completed', 'failed', 'cancelled') "
    "ORDER BY callback_next LIMIT $1 FOR UPDATE SKIP LOCKED) "
    "UPDATE batches SET callback_next = (SELECT t FROM now) + $2 "
    "WHERE id IN (SELECT id FROM due) "
    "RETURNING id, status, message, created_at, finished_at, retry_of, counts, cost, "
    "callback_url, callback_attempts"
)
UPDATE_CALLBACK = (
    "UPDATE batches SET callback_attempts = $2, callback_state = $3, "
    "callback_next = extract(epoch FROM clock_timestamp())::double precision + $4 WHERE id = $1"
)
NEXT_CALLBACK = (
    "SELECT min(callback_next) - extract(epoch FROM clock_timestamp())::double precision "
    "FROM batches WHERE callback_state = 'pending' "
    "AND status IN ('completed', 'failed', 'cancelled')"
)
WAITING = (
    "SELECT count(*) FROM batches WHERE status IN ('queued', 'processing') "
    "AND (lease_until IS NULL "
    "OR lease_until < extract(epoch FROM clock_timestamp())::double precision)"
)

ADD_FILE = (
    "INSERT INTO files (name, owner, written_at, batch_id, template) "
    "VALUES ($1, $2, $3, $4, $5) ON CONFLICT (name) DO UPDATE SET owner = excluded.owner, "
    "written_at = excluded.written_at, batch_id = excluded.batch_id, "
    "template = excluded.template"
)
EXPIRE_BATCHES = "DELETE FROM batches WHERE finished_at IS NOT NULL AND finished_at < $1"
#: A workbook goes with its batch; a template once it is old enough.
EXPIRE_FILES = (
    "DELETE FROM files WHERE written_at < $1 "
    "AND NOT EXISTS (SELECT 1 FROM batches WHERE batches.id = files.batch_id) RETURNING name"
)


def channel_of(schema: str) -> str:
    """Where NOTIFY tells the notices of the batches in ``schema``, as ``kind:batch_id``.

    Channels are the whole database's, not a schema's: one a schema keeps
    batchexecs on other schemas of the same database from hearing each other.
    """
    channel = f"batchexec:{schema}"
    if len(channel.encode()) <= _CHANNEL_BYTES:
        return channel
    return f"batchexec:{hashlib.sha256(schema.encode()).hexdigest()[:32]}"


def columns_of(rows: Iterable[tuple[Any, ...]]) -> list[list[Any]]:
    """Rows of values as one list a column: what ``unnest`` of arrays takes."""
    return [list(column) for column in zip(*rows, strict=True)]


#: Starts text stored escaped. A noncharacter, which Unicode sets aside for a
#: program's own use: no text a person writes begins with one.
_ESCAPED = "\ufdd0"
#: What PostgreSQL's UTF-8 text cannot hold: NUL, and surrogates (no UTF-8 form).
_UNREPRESENTABLE = re.compile("[\x00\ud800-\udfff]")
#: What is escaped in escaped text: those, and the backslash that escapes them.
_TO_ESCAPE = re.compile("[\\\\\x00\ud800-\udfff]")
_ESCAPE = re.compile(r"\\u([0-9a-f]{4})")


def text(value: str | None) -> str | None:
    """``value`` as PostgreSQL text can hold it; ``read_text`` gives it back exactly.

    Text with a NUL or a lone surrogate is stored as ``_ESCAPED`` followed by
    the text with each of those characters, and each backslash, written
    ``\\uXXXX``; so is text that itself begins with ``_ESCAPED``, so that
    reading back is never ambiguous. Any other text is stored as it is.
    """
    if value is None or not (value.startswith(_ESCAPED) or _UNREPRESENTABLE.search(value)):
        return value
    return _ESCAPED + _TO_ESCAPE.sub(lambda match: f"\\u{ord(match[0]):04x}", value)


def read_text(value: str | None) -> str | None:
    """Text written by ``text``, exactly as it was."""
    if value is None or not value.startswith(_ESCAPED):
        return value
    return _ESCAPE.sub(lambda match: chr(int(match[1], 16)), value[1:])


INSERT_STORED_FILE = (
    "INSERT INTO openai_files (id, owner, purpose, filename, created_at) "
    "VALUES ($1, $2, $3, $4, $5)"
)
INSERT_CHUNK = "INSERT INTO openai_file_chunks (file_id, seq, data) VALUES ($1, $2, $3)"
COMPLETE_FILE = "UPDATE openai_files SET bytes = $2, complete = true WHERE id = $1"
SELECT_STORED_FILE = (
    "SELECT id, owner, purpose, filename, created_at, bytes FROM openai_files "
    "WHERE id = $1 AND owner = $2 AND complete"
)
#: ``$1`` the owner, ``$2`` the purpose (NULL for any), ``$3`` the id of the file the page
#: starts after (NULL for the first page), ``$4`` the limit.
SELECT_STORED_FILES_DESC = (
    "SELECT id, owner, purpose, filename, created_at, bytes FROM openai_files "
    "WHERE owner = $1 AND complete AND ($2::text IS NULL OR purpose = $2) "
    "AND ($3::text IS NULL OR (created_at, id) < "
    "(SELECT created_at, id FROM openai_files WHERE id = $3 AND owner = $1)) "
    "ORDER BY created_at DESC, id DESC LIMIT $4"
)
SELECT_STORED_FILES_ASC = (
    "SELECT id, owner, purpose, filename, created_at, bytes FROM openai_files "
    "WHERE owner = $1 AND complete AND ($2::text IS NULL OR purpose = $2) "
    "AND ($3::text IS NULL OR (created_at, id) > "
    "(SELECT created_at, id FROM openai_files WHERE id = $3 AND owner = $1)) "
    "ORDER BY created_at, id LIMIT $4"
)
SELECT_CHUNK = "SELECT data FROM openai_file_chunks WHERE file_id = $1 AND seq = $2"

INSERT_OPENAI_BATCH = (
    "INSERT INTO openai_batches (id, owner, input_file_id, endpoint, completion_window, "
    "metadata, created_at, expires_at, request_total, errors, failed_at) "
    "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"
)
# The f-strings below join constants only (noqa S608: no value is interpolated).
SELECT_OPENAI_BATCH = f"SELECT {OPENAI_BATCH_COLUMNS} WHERE o.id = $1 AND o.owner = $2"
SELECT_OPENAI_BATCHES_BY_ID = f"SELECT {OPENAI_BATCH_COLUMNS} WHERE o.id = ANY($1::text[])"
#: ``$1`` the owner, ``$2`` the id the page starts after (NULL for the first), ``$3`` the limit.
SELECT_OPENAI_BATCHES = (
    f"SELECT {OPENAI_BATCH_COLUMNS} WHERE o.owner = $1 AND ($2::text IS NULL OR "  # noqa: S608
    "(o.created_at, o.id) < (SELECT created_at, id FROM openai_batches "
    "WHERE id = $2 AND owner = $1)) ORDER BY o.created_at DESC, o.id DESC LIMIT $3"
)
OPENAI_CANCELLING = (
    "UPDATE openai_batches SET cancelling_at = coalesce(cancelling_at, $2) WHERE id = $1"
)
MARK_OVERDUE = (
    "WITH now AS (SELECT extract(epoch FROM clock_timestamp())::double precision AS t) "
    "UPDATE openai_batches SET expired_at = coalesce(expired_at, (SELECT t FROM now)) "
    "WHERE expires_at < (SELECT t FROM now) AND failed_at IS NULL AND id IN "
    "(SELECT id FROM batches WHERE status IN ('queued', 'processing')) RETURNING id"
)
CLAIM_FINALIZATIONS = (
    "WITH now AS (SELECT extract(epoch FROM clock_timestamp())::double precision AS t), "
    "due AS (SELECT o.id FROM openai_batches o JOIN batches b ON b.id = o.id "
    "WHERE o.finalized_at IS NULL AND o.failed_at IS NULL "
    "AND b.status IN ('completed', 'failed', 'cancelled') "
    "AND (o.finalize_until IS NULL OR o.finalize_until < (SELECT t FROM now)) "
    "LIMIT $1 FOR UPDATE OF o SKIP LOCKED) "
    "UPDATE openai_batches SET finalize_until = (SELECT t FROM now) + $2 "
    "WHERE id IN (SELECT id FROM due) RETURNING id"
)
OPENAI_FINALIZED = (
    "UPDATE openai_batches SET output_file_id = $2, error_file_id = $3, finalized_at = $4 "
    "WHERE id = $1 AND finalized_at IS NULL RETURNING id"
)
