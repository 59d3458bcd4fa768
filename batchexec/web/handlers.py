"""Route handlers: parse with pydantic, call the engine or registry, answer with a model."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError
from pydantic import BaseModel

from batchexec.csvinput import parse_csv
from batchexec.errors import (
    ConflictError,
    FieldError,
    InputError,
    NotFoundError,
    QueueFullError,
    ShuttingDownError,
    StorageError,
)
from batchexec.events import FINAL_EVENTS, Event, done_event, execution_event, progress_event
from batchexec.exports import csv_sheet, render_csv, results_sheet, template_sheet, write_xlsx
from batchexec.inputs import (
    TOO_MANY_DIGITS,
    ZIP_MAGIC,
    Format,
    Rows,
    decode,
    format_of,
    from_table,
    plan_rows,
    rows_from_executions,
    sniff,
)
from batchexec.planning import BatchPlan, RowInput, plan_batch
from batchexec.providers import unconfigured
from batchexec.records import Batch, ExecutionStatus, Summary, progress_counts
from batchexec.runtime import limits_from
from batchexec.schemas import (
    AssistantOut,
    BatchList,
    BatchSummary,
    CatalogResponse,
    ExecuteBatchRequest,
    ExecutionOut,
    InvokeResponse,
    ListQuery,
    Message,
    ModelOut,
    ProcessCsvRequest,
    ProcessCsvResponse,
    Progress,
    ResultsRequest,
    ResultsResponse,
    RetryResponse,
    Usage,
)
from batchexec.web.keys import (
    CATALOG,
    ENGINE,
    INPUT_POOL,
    OWNER,
    PROVIDERS,
    REGISTRY,
    RESULTS_CACHE,
    SETTINGS,
    WORKBOOKS,
)

log = logging.getLogger(__name__)

_Body = TypeVar("_Body", bound=BaseModel)
XLSX_CONTENT_TYPE = "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"
#: Seconds between comments that keep an idle event stream open through proxies.
_HEARTBEAT_S = 15.0
#: CSV bodies above this are parsed off the event loop.
_INLINE_CSV_CHARS = 64 * 1024
#: JSON bodies above this are parsed off the event loop, two at a time.
_INLINE_JSON_BYTES = 64 * 1024
#: Bytes of an answer written at a time, so a client that reads slowly holds a
#: chunk in the server's buffers, not a copy of the whole answer.
_WRITE_CHUNK_BYTES = 64 * 1024
#: Seconds a client may take to read one chunk before its connection is closed.
_WRITE_TIMEOUT_S = 30.0
#: Fields of the results answer rendered per request, ahead of the cached rest.
_HEAD_FIELDS = ("status", "invocationId", "message", "xlsx_url")


async def health(request: web.Request) -> web.Response:
    """Liveness: answers without an API key."""
    return web.json_response({"status": "ok"})


async def execute_batch(request: web.Request) -> web.Response:
    """Validate a batch of executions and start it in the background."""
    body = await _parse(request, ExecuteBatchRequest, count_of="executions")
    columns, rows = rows_from_executions(body.executions)
    plan = _plan(request, rows, columns)
    batch = await request.app[ENGINE].submit(request[OWNER], plan)
    message = (
        f"Batch execution started. Use invocation ID {batch.id} "
        "to check status and retrieve results."
    )
    return _answer(InvokeResponse(invocationId=batch.id, response=[Message(message=message)]))


async def process_csv(request: web.Request) -> web.Response:
    """Parse a CSV, write its XLSX template and, with ``execute``, start the batch."""
    body = await _parse(request, ProcessCsvRequest)
    rows = await _csv_rows(request, body.csv_content)
    return await _process_rows(request, rows, execute=body.execute, kind="CSV")


async def upload(request: web.Request) -> web.Response:
    """Like ``process_csv``, for a multipart upload of a CSV or XLSX ``file``."""
    name, data, execute = await _read_upload(request)
    # A workbook is a zip whatever its name says; otherwise the name decides, then the content.
    fmt = Format.XLSX if data.startswith(ZIP_MAGIC) else format_of(name or "") or sniff(data)
    if fmt is Format.XLSX:
        rows = await request.app[WORKBOOKS].read(data)
        return await _process_rows(request, rows, execute=execute, kind="XLSX")
    if fmt is not Format.CSV:
        raise InputError(f"Upload a CSV or XLSX file; this one looks like {fmt.value.upper()}.")
    rows = await _csv_rows(request, decode(data, Format.CSV))
    return await _process_rows(request, rows, execute=execute, kind="CSV")


async def _csv_rows(request: web.Request, text: str) -> Rows:
    settings = request.app[SETTINGS]
    max_field_chars = max(settings.max_prompt_length, settings.max_body_bytes)

    def parse() -> Rows:
        return from_table(
            parse_csv(text, max_field_chars=max_field_chars, max_columns=settings.max_columns)
        )

    if len(text) > _INLINE_CSV_CHARS:
        return await _off_loop(request, parse)
    return parse()


async def _off_loop(request: web.Request, parse: Callable[[], Rows]) -> Rows:
    """Run ``parse`` on the input pool: its own threads, so uploads never hold up the
    threads that write batches' outputs."""
    return await asyncio.get_running_loop().run_in_executor(request.app[INPUT_POOL], parse)


async def _process_rows(
    request: web.Request, rows: Rows, *, execute: bool, kind: str
) -> web.Response:
    """Validate ``rows``, write their XLSX template and, with ``execute``, start the batch."""
    settings = request.app[SETTINGS]
    try:
        plan = plan_rows(rows, request.app[CATALOG], limits_from(settings))
    except InputError as exc:
        raise InputError(exc.detail, [rows.located(error) for error in exc.errors]) from None
    registry = request.app[REGISTRY]
    owner = request[OWNER]
    batch_id = registry.new_id()
    file_name = Batch.file_name_for(batch_id)
    # Recorded before the write: a template counts against the bound at once.
    if execute:
        await registry.add_file(file_name, owner, batch_id=batch_id)
    else:
        await _add_template(request, file_name, batch_id)
    try:
        await asyncio.to_thread(write_xlsx, settings.results_dir / file_name, template_sheet(plan))
    except OSError as exc:
        await registry.forget_file(file_name)
        raise StorageError(
            f"The server cannot write the workbook: {exc.strerror or exc}. Try again later."
        ) from exc
    count = f"{len(plan.rows)} row{'s' if len(plan.rows) != 1 else ''}"
    if execute:
        try:
            await request.app[ENGINE].submit(request[OWNER], plan, batch_id=batch_id)
        except (QueueFullError, ShuttingDownError):
            # Refused: leave nothing behind for a batch that will not run.
            await registry.forget_file(file_name)
            (settings.results_dir / file_name).unlink(missing_ok=True)
            raise
        message = (
            f"{kind} processed: {count}. Batch execution started. Use invocation ID "
            f"{batch_id} to check status and retrieve results."
        )
    else:
        message = f"{kind} processed: {count} written to the XLSX template."
    return _answer(
        ProcessCsvResponse(
            invocationId=batch_id,
            response=[Message(message=message)],
            # The original contract's relative path, whatever PUBLIC_DIR is: the
            # server's own folders are none of the client's business.
            xlsx_path=f"public/batch_execution_results/{file_name}",
            xlsx_url=_xlsx_url(request, file_name),
        )
    )


async def _add_template(request: web.Request, file_name: str, batch_id: str) -> None:
    """Record a template workbook, refused when the caller keeps ``max_templates`` already."""
    settings = request.app[SETTINGS]
    kept = await request.app[REGISTRY].add_template(
        file_name, request[OWNER], batch_id=batch_id, limit=settings.max_templates
    )
    if kept is not None:
        wait_s = kept[0] + settings.results_ttl_s - time.time() if kept else settings.results_ttl_s
        raise QueueFullError(
            f"This API key keeps {len(kept)} template workbooks; the limit (MAX_TEMPLATES) "
            f"is {settings.max_templates}. They expire after RESULTS_TTL_HOURS; "
            'send "execute": true to run the rows instead.',
            retry_after_s=max(wait_s, 1.0),
        )


async def _read_upload(request: web.Request) -> tuple[str | None, bytes, bool]:
    """The ``file`` part's name and bytes, and ``execute``, of a multipart upload.

    Parts are read in chunks and counted, since a multipart body is not
    bounded by ``client_max_size`` the way ``read()`` is.
    """
    limit = request.app[SETTINGS].max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=request.content_length)
    if request.content_type != "multipart/form-data":
        raise InputError(
            "Send the spreadsheet as multipart/form-data with a 'file' field "
            "(curl -F file=@prompts.xlsx)."
        )
    name: str | None = None
    data: bytes | None = None
    execute = False
    size = 0
    try:
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader):
                raise InputError("Nested multipart parts are not supported.")
            chunks: list[bytes] = []
            while chunk := await part.read_chunk():
                size += len(chunk)
                if size > limit:
                    raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=size)
                chunks.append(chunk)
            if part.name == "file":
                name, data = part.filename, b"".join(chunks)
            elif part.name == "execute":
                execute = _flag(b"".join(chunks).decode("utf-8", errors="replace"))
    except ValueError as exc:
        # aiohttp's multipart reader says "boundary missed" and the like.
        raise InputError(f"The multipart body cannot be read: {exc}.") from exc
    except HttpProcessingError as exc:
        # A part's headers: not a header, a line over 8 KB, bytes a header cannot hold.
        reason = " ".join(exc.message.split()) if exc.message else type(exc).__name__
        raise InputError(f"The multipart body cannot be read: {reason}.") from exc
    if data is None:
        raise InputError(
            "The upload has no 'file' field.",
            [FieldError(None, "file", "attach a CSV or XLSX file")],
        )
    return name, data, execute


def _flag(value: str) -> bool:
    """A form field's boolean: ``true``/``1`` or ``false``/``0``/empty."""
    text = value.strip().lower()
    if text in ("true", "1"):
        return True
    if text in ("false", "0", ""):
        return False
    raise InputError(
        "The execute field must be true or false.",
        [FieldError(None, "execute", f"must be true, false, 1 or 0, not {value!r}")],
    )


async def results(request: web.Request) -> web.StreamResponse:
    """A batch's status, progress, finished executions and, once ended, its outputs."""
    body = await _parse(request, ResultsRequest)
    batch = await request.app[REGISTRY].get(body.invocation_id, request[OWNER])
    return await _answer_results(request, batch)


async def _answer_results(request: web.Request, batch: Batch) -> web.StreamResponse:
    """The results answer of ``batch``: a finished one's rendered once, off the loop."""
    xlsx_url = _xlsx_url(request, batch.xlsx_name) if batch.xlsx_name else None
    if batch.status.finished:

        async def render() -> bytes:
            return await asyncio.to_thread(lambda: _dumps_in_pieces(_tail(_results(batch))))

        rest = await request.app[RESULTS_CACHE].get(batch.id, render)
    else:
        rest = _dumps(_tail(_results(batch)))
    head = _head(batch, xlsx_url)
    # The head's closing brace gives way to the rest's fields; a view, not a copy,
    # of the cached rest, which may be tens of megabytes.
    return await _stream(request, [_dumps(head)[:-1], b",", memoryview(rest)[1:]])


def _head(batch: Batch, xlsx_url: str | None) -> dict[str, object]:
    """The fields of a results answer that come first: from the record, costing no row.

    ``xlsx_url`` follows the request, so it is never part of the cached rest.
    """
    return {
        "status": batch.status.value,
        "invocationId": batch.id,
        "message": batch.message,
        "xlsx_url": xlsx_url if batch.status.finished else None,
    }


def _tail(answer: ResultsResponse) -> dict[str, object]:
    """The fields of a results answer that depend on the batch alone."""
    return answer.model_dump(mode="json", exclude=set(_HEAD_FIELDS))


def _dumps_in_pieces(fields: dict[str, object]) -> bytes:
    """``_dumps(fields)``, made a field and a list item at a time.

    The same bytes; but the C encoder holds the interpreter lock for the whole
    of one call, so one call over a large answer would stall the event loop
    even from another thread.
    """
    chunks = [b"{"]
    for position, (name, value) in enumerate(fields.items()):
        if position:
            chunks.append(b", ")
        chunks.append(_dumps(name) + b": ")
        if isinstance(value, list):
            chunks.append(b"[" + b", ".join(_dumps(item) for item in value) + b"]")
        else:
            chunks.append(_dumps(value))
    chunks.append(b"}")
    return b"".join(chunks)


def _dumps(value: object) -> bytes:
    """``value`` as UTF-8 JSON: a third of the bytes of ``\\u`` escapes for most non-ASCII text.

    A lone surrogate (JSON input can carry one) has no UTF-8 form; a body
    holding one is written with escapes instead.
    """
    try:
        return json.dumps(value, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        return json.dumps(value).encode()


async def _stream(request: web.Request, parts: list[bytes | memoryview]) -> web.StreamResponse:
    """A JSON answer of ``parts``, written a chunk at a time to the client's pace.

    A client that takes longer than ``_WRITE_TIMEOUT_S`` to read a chunk is
    disconnected, so clients that never read cannot pin answers in memory; one
    that goes away mid-answer is no error of the server's.
    """
    response = web.StreamResponse(headers={"Content-Type": "application/json; charset=utf-8"})
    response.content_length = sum(len(part) for part in parts)
    await response.prepare(request)
    try:
        for part in parts:
            view = memoryview(part)
            for start in range(0, len(view), _WRITE_CHUNK_BYTES):
                async with asyncio.timeout(_WRITE_TIMEOUT_S):
                    await response.write(view[start : start + _WRITE_CHUNK_BYTES])
                # write() yields only when the socket's buffer is full; a client that
                # reads fast would otherwise get megabytes in one turn of the loop.
                await asyncio.sleep(0)
    except TimeoutError:
        log.info("%s: the client read too slowly; connection closed", request.path)
        if request.transport is not None:
            request.transport.abort()
        return response
    except ConnectionError:
        log.info("%s: the client went away before the answer ended", request.path)
        return response
    await response.write_eof()
    return response


async def cancel(request: web.Request) -> web.StreamResponse:
    """Cancel a queued or running batch; answers like the results route once it has stopped."""
    body = await _parse(request, ResultsRequest)
    batch = await request.app[REGISTRY].get(body.invocation_id, request[OWNER])
    await request.app[ENGINE].cancel(batch.id)
    return await _answer_results(request, batch)


async def retry(request: web.Request) -> web.Response:
    """Start a new batch that reruns only the rows of a finished batch that did not succeed."""
    body = await _parse(request, ResultsRequest)
    original = await request.app[REGISTRY].get(body.invocation_id, request[OWNER])
    if not original.status.finished:
        raise ConflictError("The batch is still running; retry it once it has ended.")
    rerun = [e.index for e in original.executions if e.status is not ExecutionStatus.SUCCEEDED]
    if not rerun:
        raise ConflictError("Every execution of the batch succeeded; there is nothing to retry.")
    # Planned again, against today's catalog: the rows run now, not when first sent.
    rows = [execution.row_input for execution in original.executions]
    plan = _plan(request, rows, original.columns)
    batch = await request.app[ENGINE].submit(request[OWNER], plan, retry_of=original)
    message = (
        f"Retrying {len(rerun)} of {len(original.executions)} executions of {original.id}. "
        f"Use invocation ID {batch.id} to check status and retrieve results."
    )
    return _answer(
        RetryResponse(
            invocationId=batch.id,
            response=[Message(message=message)],
            retry_of=original.id,
            rerun=rerun,
        )
    )


async def batches(request: web.Request) -> web.Response:
    """The caller's batches, newest first; ``limit`` and ``status`` filter them."""
    query = ListQuery.model_validate(dict(request.query))
    found = await request.app[REGISTRY].owned_by(
        request[OWNER], status=query.status, limit=query.limit
    )
    return _answer(BatchList(batches=[_summary(batch) for batch in found]))


def _summary(batch: Summary) -> BatchSummary:
    return BatchSummary(
        invocationId=batch.id,
        status=batch.status,
        message=batch.message,
        # The registry fills the counts the store does not keep.
        progress=Progress(**progress_counts(batch.counts or Counter())),
        created_at=_utc(batch.created_at),
        finished_at=_utc(batch.finished_at) if batch.finished_at else None,
        retry_of=batch.retry_of,
    )


async def events(request: web.Request) -> web.StreamResponse:
    """Server-sent events: ``execution`` as each row ends, ``progress``, then ``done``.

    A client that connects late first gets the current state: an
    ``execution`` event per row already ended, then ``progress`` (and
    ``done`` if the batch has ended).
    """
    registry = request.app[REGISTRY]
    batch = await registry.get(request.match_info["invocation_id"], request[OWNER])
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
        }
    )
    await response.prepare(request)
    # Subscribing and taking the snapshot happen with no await between them,
    # so no event is missed or sent twice.
    with registry.events.watch(batch.id) as queue:
        backlog = [execution_event(e) for e in batch.executions if e.status.finished]
        backlog.append(progress_event(batch))
        if batch.status.finished:
            backlog.append(done_event(batch))
        try:
            await _send(response, request, batch, backlog)
            # Decided from what was sent, not from the batch now: the write above
            # may have waited for a slow client while the batch finished.
            done = backlog[-1].name in FINAL_EVENTS
            while not done:
                try:
                    first = await asyncio.wait_for(queue.get(), _HEARTBEAT_S)
                except TimeoutError:
                    await response.write(b": keep-alive\n\n")
                    continue
                # Everything that happened since the last write goes out in one
                # write, with only the latest progress: a fast batch ends
                # hundreds of rows per loop turn.
                events = [first]
                while not queue.empty():
                    events.append(queue.get_nowait())
                await _send(response, request, batch, _coalesced(events))
                done = any(event.name in FINAL_EVENTS for event in events)
        except ConnectionResetError:
            pass  # the client went away; nothing to tell it
    return response


def _coalesced(events: list[Event]) -> list[Event]:
    """``events`` with every ``progress`` but the last dropped, keeping order otherwise."""
    last_progress = max(
        (position for position, event in enumerate(events) if event.name == "progress"),
        default=None,
    )
    return [
        event
        for position, event in enumerate(events)
        if event.name != "progress" or position == last_progress
    ]


async def _send(
    response: web.StreamResponse, request: web.Request, batch: Batch, events: list[Event]
) -> None:
    """Write ``events`` in the server-sent events format, in one write."""
    chunks = []
    for event in events:
        data = dict(event.data)
        if event.name in FINAL_EVENTS:
            data["invocationId"] = batch.id
            data["xlsx_url"] = _xlsx_url(request, batch.xlsx_name) if batch.xlsx_name else None
        chunks.append(f"event: {event.name}\ndata: {json.dumps(data)}\n\n")
    await response.write("".join(chunks).encode())


def _results(batch: Batch) -> ResultsResponse:
    """The results answer of ``batch``, ``xlsx_url`` left to ``_head``.

    A finished batch's CSV content is rendered from its records: the results
    route does it once, off the event loop, and keeps the rendered answer.
    """
    csv_content = None
    if batch.status.finished:
        csv_content = render_csv(csv_sheet(batch))
    prompt_tokens, completion_tokens = batch.tokens()
    return ResultsResponse(
        status=batch.status,
        invocationId=batch.id,
        message=batch.message,
        xlsx_url=None,
        csv_content=csv_content,
        progress=_progress(batch),
        usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens),
        executions=[
            ExecutionOut(
                index=execution.index,
                status=execution.status,
                result=execution.result,
                error=execution.error,
                model=execution.model,
                latency_ms=execution.latency_ms,
                attempts=execution.attempts,
                prompt_tokens=execution.prompt_tokens,
                completion_tokens=execution.completion_tokens,
            )
            for execution in batch.executions
            if execution.status.finished
        ],
    )


def _utc(timestamp: float) -> datetime:
    return datetime.fromtimestamp(timestamp, tz=UTC)


async def download(request: web.Request) -> web.StreamResponse:
    """A workbook of the caller's, by its plain file name; anything else is 404."""
    name = request.match_info["file_name"]
    registry = request.app[REGISTRY]
    entry = await registry.check_file(name, request[OWNER])
    folder = request.app[SETTINGS].results_dir
    if not entry.template and not (folder / name).is_file():
        # Gone (a new disk, a cleaned folder): made again from the batch's records.
        batch = await registry.get(entry.batch_id, request[OWNER])
        if batch.status.finished and _plain_name(name):
            await asyncio.to_thread(write_xlsx, folder / name, results_sheet(batch))
    path = _inside(folder, name)
    return web.FileResponse(
        path,
        headers={
            "Content-Type": XLSX_CONTENT_TYPE,
            "Content-Disposition": f'attachment; filename="{name}"',
        },
    )


async def models(request: web.Request) -> web.Response:
    """The model catalog: names, aliases, provider and whether it is ready; never a secret."""
    catalog = request.app[CATALOG]
    providers = request.app[PROVIDERS]

    def configured(model_name: str) -> bool:
        return unconfigured(providers, catalog.model(model_name)) is None

    model_list = [
        ModelOut(
            name=model.name,
            aliases=list(model.aliases),
            provider=model.provider,
            model_id=model.wire_id,
            description=model.description,
            configured=configured(model.name),
        )
        for model in catalog.models
    ]
    assistant_list = [
        AssistantOut(
            name=assistant.name,
            aliases=list(assistant.aliases),
            model=catalog.model(assistant.model).name,
            description=assistant.description,
            configured=configured(assistant.model),
        )
        for assistant in catalog.assistants
    ]
    return _answer(
        CatalogResponse(
            default_model=request.app[SETTINGS].default_model,
            models=model_list,
            assistants=assistant_list,
        )
    )


async def _parse(request: web.Request, model: type[_Body], *, count_of: str | None = None) -> _Body:
    """The JSON body as ``model``: 400 when it is not JSON, 422 when it does not fit.

    A body above ``_INLINE_JSON_BYTES`` is parsed on the input pool: parsed
    JSON can take 25 times the bytes of its text, and the pool's two threads
    bound how many such parses hold memory at once. With ``count_of``, the
    list under that key is checked against ``MAX_EXECUTIONS_PER_BATCH`` before
    the body is validated, so an oversized batch costs no more than its JSON.
    """
    raw = await request.read()
    if not raw.strip():
        raise InputError("The request body is empty; send a JSON object.")
    if len(raw) > _INLINE_JSON_BYTES:
        pool = request.app[INPUT_POOL]
        data = await asyncio.get_running_loop().run_in_executor(pool, _loads, raw)
    else:
        data = _loads(raw)
    if not isinstance(data, dict):
        raise InputError("The request body must be a JSON object.")
    if count_of is not None and isinstance(items := data.get(count_of), list):
        limits_from(request.app[SETTINGS]).check_count(len(items))
    return model.model_validate(data)


def _loads(raw: bytes) -> Any:
    """``raw`` as JSON; ``HTTPBadRequest`` saying why it cannot be."""
    try:
        return json.loads(raw)
    except UnicodeDecodeError:
        raise web.HTTPBadRequest(text="The request body is not UTF-8 JSON.") from None
    except json.JSONDecodeError as exc:
        raise web.HTTPBadRequest(
            text=f"The request body is not valid JSON: {exc.msg} at position {exc.pos}."
        ) from None
    except ValueError:
        # Python refuses integers of more than 4,300 digits; nothing else raises this.
        raise web.HTTPBadRequest(
            text=f"The request body cannot be read: {TOO_MANY_DIGITS}."
        ) from None
    except RecursionError:
        raise web.HTTPBadRequest(text="The request body is nested too deeply.") from None


def _plan(request: web.Request, rows: Sequence[RowInput], columns: Sequence[str]) -> BatchPlan:
    limits = limits_from(request.app[SETTINGS])
    return plan_batch(rows, list(columns), request.app[CATALOG], limits)


def _answer(body: BaseModel) -> web.Response:
    return web.json_response(body.model_dump(mode="json"))


def _xlsx_url(request: web.Request, file_name: str) -> str:
    """Public URL of a workbook: from ``SERVER_NAME``, else the request and the mount prefix."""
    server_name = request.app[SETTINGS].server_name
    if server_name:
        return f"{server_name}/public/batch_execution_results/{file_name}"
    path = request.app.router["download"].url_for(file_name=file_name)
    return str(request.url.origin().join(path))


def _progress(batch: Batch) -> Progress:
    return Progress(**progress_counts(batch.counts))


def _plain_name(name: str) -> bool:
    """Whether ``name`` is a plain file name: no folder, not hidden, nothing odd in it."""
    return (
        bool(name)
        and name == Path(name).name
        and not name.startswith(".")
        and not any(char in name for char in "\\\x00")
    )


def _inside(folder: Path, name: str) -> Path:
    """``folder / name`` if ``name`` is a plain file name of a regular file there, else 404."""
    if not _plain_name(name):
        raise NotFoundError("File not found")
    path = folder / name
    try:
        if path.is_symlink() or not path.is_file():
            raise NotFoundError("File not found")
        if path.resolve().parent != folder.resolve():
            raise NotFoundError("File not found")
    except OSError:
        raise NotFoundError("File not found") from None
    return path
