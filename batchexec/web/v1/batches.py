"""``/v1/batches``: create, retrieve, cancel and list batches of the OpenAI Batch API.

A batch's input file is read and every line checked before anything runs
(``openai_requests``): the JSON, ``custom_id`` (present, unique), ``method``
and ``url``, the model (through the catalog, and whether it can be called as
configured), the options each model's provider can honour, and the limits
(``MAX_FILE_LINES`` requests; ``MAX_BODY_BYTES`` a line;
``MAX_SENT_PROMPT_LENGTH`` characters of messages a request). A batch with any
problem ends ``failed`` at once with each in ``errors``, its line numbered,
and runs nothing, as at OpenAI. Otherwise it runs as a batchexec batch of the
same id (it shows in the list and events routes, and its workbook downloads),
its requests independent rows on the same engine, limits, retries and store
as every other batch.

Statuses: ``validating`` while it waits for a batch slot, ``in_progress``
while it runs, ``cancelling`` once asked to stop, ``finalizing`` while its
output and error files are written (``openai_batches.Finalizer``), then
``completed``, ``cancelled`` (with what finished), ``expired`` (still running
when its ``24h`` completion window passed: cancelled, with what finished) or
``failed``.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections import Counter

from aiohttp import web

from batchexec.errors import ConflictError, InputError, NotFoundError
from batchexec.inputs import Rows, plan_rows
from batchexec.openai_requests import (
    COLUMNS,
    OPENAI,
    LineError,
    ParsedLines,
    limits_of,
    parse_lines,
)
from batchexec.planning import BatchPlan
from batchexec.readiness import unready
from batchexec.records import BatchStatus, ExecutionStatus
from batchexec.store import OpenAIBatch
from batchexec.web.keys import CATALOG, ENGINE, OWNER, PROVIDERS, REGISTRY, SETTINGS, V1_INTAKE
from batchexec.web.requests import answer, on_input_pool, parse_body, validated
from batchexec.web.v1.schemas import (
    BatchCreate,
    BatchError,
    BatchErrors,
    BatchesQuery,
    BatchObject,
    BatchState,
    Page,
    RequestCounts,
)

#: The only completion window, as at OpenAI.
_WINDOW_S = 24 * 3600.0


def new_batch_id() -> str:
    """A fresh batch id in OpenAI's form: ``batch_`` and 32 hex digits."""
    return f"batch_{secrets.token_hex(16)}"


async def create_batch(request: web.Request) -> web.Response:
    """``POST /v1/batches``: check the input file's requests, then run them."""
    body = await parse_body(request, BatchCreate)
    settings = request.app[SETTINGS]
    store = request.app[REGISTRY].store
    owner = request[OWNER]
    file = await store.stored_file(body.input_file_id, owner)
    if file is None or file.purpose != "batch":
        raise NotFoundError(f"No such File object: {body.input_file_id}")
    async with request.app[V1_INTAKE]:  # a file may be MAX_FILE_BYTES: few at once
        data = b"".join([chunk async for chunk in store.chunks(file.id)])
        parsed = await on_input_pool(
            request,
            lambda: parse_lines(
                data,
                max_lines=settings.max_file_lines,
                max_chars=settings.max_sent_prompt_length,
                max_line_bytes=settings.max_body_bytes,
            ),
        )
        data = b""  # the rows hold what is needed now
        plan, errors = None, list(parsed.errors)
        if parsed.rows:
            # The lines that were read are checked further even when others were not:
            # every problem of the file is reported at once.
            plan, found = await on_input_pool(request, lambda: _plan(request, parsed))
            errors = sorted([*errors, *found], key=lambda error: error.line or 0)
            if errors:
                plan = None
    now = time.time()
    record = OpenAIBatch(
        id=new_batch_id(),
        owner=owner,
        input_file_id=file.id,
        endpoint=body.endpoint,
        completion_window=body.completion_window,
        metadata=json.dumps(body.metadata) if body.metadata is not None else None,
        created_at=now,
        expires_at=now + _WINDOW_S,
        request_total=len(parsed.rows),
        errors=json.dumps([error.as_json() for error in errors]) if errors else None,
        failed_at=now if errors else None,
    )
    # Recorded first (it reads validating until its batch is stored), so that no batch
    # ever runs without one, whatever happens between the two.
    await store.create_openai_batch(record)
    if plan is not None:
        try:
            await request.app[ENGINE].submit(owner, plan, batch_id=record.id, api=OPENAI)
        except BaseException:
            # Refused (no room, shutting down) or cut off before its batch was stored: it
            # never runs. Cut off once stored, the batch runs on (here, or after a
            # restart), and the record stays its.
            if not await asyncio.shield(_stored(request, record.id, owner)):
                await asyncio.shield(store.delete_openai_batch(record.id))
            raise
    return answer(await _object(request, record.id))


async def _stored(request: web.Request, batch_id: str, owner: str) -> bool:
    """Whether batch ``batch_id`` of ``owner`` is in the registry (and so in the store)."""
    try:
        await request.app[REGISTRY].get(batch_id, owner)
    except NotFoundError:
        return False
    return True


async def retrieve_batch(request: web.Request) -> web.Response:
    """``GET /v1/batches/{batch_id}``."""
    return answer(await _object(request, request.match_info["batch_id"]))


async def cancel_batch(request: web.Request) -> web.Response:
    """``POST /v1/batches/{batch_id}/cancel``: stop it, keeping what finished."""
    batch_id = request.match_info["batch_id"]
    record = await _record(request, batch_id)
    if record.status is None or record.status.finished or record.failed_at is not None:
        status = _status(record)
        raise ConflictError(f"Cannot cancel a batch with status {status}.")
    asked_at = time.time()
    # The engine may refuse (every row has ended): only a cancel it took is recorded.
    await request.app[ENGINE].cancel(batch_id)
    await request.app[REGISTRY].store.openai_cancelling(batch_id, asked_at)
    return answer(await _object(request, batch_id))


async def list_batches(request: web.Request) -> web.Response:
    """``GET /v1/batches``: the caller's batches, newest first, paged with ``after``."""
    query = validated(BatchesQuery, dict(request.query), what="query string")
    records = await request.app[REGISTRY].store.openai_batches(
        request[OWNER], after=query.after, limit=query.limit + 1
    )
    objects = [await _present(request, record) for record in records]
    return answer(
        Page[BatchObject].of(objects, limit=query.limit, ids=[record.id for record in records])
    )


def _plan(request: web.Request, parsed: ParsedLines) -> tuple[BatchPlan | None, list[LineError]]:
    """The plan of ``parsed``'s rows, or each line's problem with its model or options."""
    settings = request.app[SETTINGS]
    providers = request.app[PROVIDERS]
    rows = Rows(COLUMNS, tuple(parsed.rows), tuple(f"line {line}" for line in parsed.lines))
    limits = limits_of(settings)
    errors: list[LineError] = []
    lines = list(parsed.lines)
    try:
        plan = plan_rows(rows, request.app[CATALOG], limits)
    except InputError as exc:
        errors = [
            LineError(
                "model_not_found" if error.field == "model" else "invalid_request",
                parsed.lines[error.index - 1] if error.index else None,
                error.message,
                f"body.{error.field}" if error.field else None,
            )
            for error in exc.errors
        ]
        # The rows that did plan are checked further: every problem is reported at once.
        bad = {error.index for error in exc.errors}
        if None in bad:
            return None, errors
        pairs = enumerate(zip(parsed.rows, lines, strict=True), start=1)
        kept = [(row, line) for n, (row, line) in pairs if n not in bad]
        if not kept:
            return None, errors
        lines = [line for _, line in kept]
        subset = Rows(COLUMNS, tuple(row for row, _ in kept), tuple(f"line {n}" for n in lines))
        plan = plan_rows(subset, request.app[CATALOG], limits)
    errors += [
        LineError(
            "model_not_available",
            lines[group.indexes[0] - 1],
            f"{group.name!r} cannot be called on this server: {group.reason}",
            "body.model",
        )
        for group in unready(plan, providers)
    ]
    for row in plan.rows:
        provider = providers.get(row.target.model.provider)
        if provider is None or row.chat is None:
            continue
        for message in provider.unsupported(row.chat.options):
            errors.append(
                LineError(
                    "unsupported_parameter",
                    lines[row.index - 1],
                    f"{message} (model {row.target.model.name!r})",
                    "body",
                )
            )
    return (None if errors else plan), errors


async def _record(request: web.Request, batch_id: str) -> OpenAIBatch:
    record = (
        await request.app[REGISTRY].store.openai_batch(batch_id, request[OWNER])
        if batch_id.isprintable()
        else None
    )
    if record is None:
        raise NotFoundError(f"No such Batch object: {batch_id}")
    return record


async def _object(request: web.Request, batch_id: str) -> BatchObject:
    return await _present(request, await _record(request, batch_id))


async def _present(request: web.Request, record: OpenAIBatch) -> BatchObject:
    """``record`` as OpenAI's ``Batch``, its counts read live while it runs."""
    counts = record.counts
    if counts is None and record.status is not None:
        registry = request.app[REGISTRY]
        live = registry.cached(record.id)
        counts = live.counts.copy() if live is not None else await registry.store.counts(record.id)
    return present(record, counts or Counter())


def present(record: OpenAIBatch, counts: Counter[ExecutionStatus]) -> BatchObject:
    """``record`` as OpenAI's ``Batch``, with ``counts`` of its rows by status."""
    status = _status(record)
    ended = int(record.finalized_at) if record.finalized_at is not None else None
    errors = None
    if record.errors is not None:
        errors = BatchErrors(data=[BatchError(**error) for error in json.loads(record.errors)])
    failed = sum(
        counts[state]
        for state in (ExecutionStatus.FAILED, ExecutionStatus.TIMED_OUT, ExecutionStatus.SKIPPED)
    )
    return BatchObject(
        id=record.id,
        endpoint=record.endpoint,
        errors=errors,
        input_file_id=record.input_file_id,
        completion_window=record.completion_window,
        status=status,
        output_file_id=record.output_file_id,
        error_file_id=record.error_file_id,
        created_at=int(record.created_at),
        in_progress_at=_seconds(record.started_at),
        expires_at=int(record.expires_at),
        finalizing_at=_seconds(record.finished_at)
        if status in ("finalizing", "completed")
        else None,
        completed_at=ended if status == "completed" else None,
        failed_at=_seconds(record.failed_at) or (ended if status == "failed" else None),
        expired_at=ended if status == "expired" else None,
        cancelling_at=_seconds(record.cancelling_at),
        cancelled_at=ended if status == "cancelled" else None,
        request_counts=RequestCounts(
            completed=counts[ExecutionStatus.SUCCEEDED], failed=failed, total=record.request_total
        ),
        metadata=json.loads(record.metadata) if record.metadata is not None else None,
    )


def _status(record: OpenAIBatch) -> BatchState:
    if record.failed_at is not None:
        return "failed"
    if record.status is None or record.status is BatchStatus.QUEUED:
        return "cancelling" if record.cancelling_at is not None else "validating"
    if not record.status.finished or record.finalized_at is None:
        if record.cancelling_at is not None:
            return "cancelling"
        return "in_progress" if not record.status.finished else "finalizing"
    if record.status is BatchStatus.CANCELLED:
        return "expired" if record.expired_at is not None else "cancelled"
    if record.status is BatchStatus.FAILED:
        return "failed"
    return "completed"


def _seconds(at: float | None) -> int | None:
    return None if at is None else int(at)
