"""Spreadsheets in: ``process_csv`` (CSV text in JSON), ``upload`` (a multipart file)
and ``validate`` (either, checked only).

Either way the rows are validated, written as an XLSX template and, with
``execute``, started as a batch whose id is the template's (a batch to start
whose model cannot be called as configured is refused first, with nothing
written). ``validate`` reads and checks the rows the same way, models
included, and stops there: nothing is written, stored or run. An upload's
``model`` field is the model of the rows that name none. Workbooks are read in
worker processes (``WORKBOOKS``); large CSV text on the input pool.
"""

from __future__ import annotations

import time
from dataclasses import replace

from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError

from batchexec.catalog import UnknownNameError
from batchexec.csvinput import parse_csv
from batchexec.errors import FieldError, InputError, QueueFullError, ShuttingDownError, StorageError
from batchexec.estimates import Estimate, estimate
from batchexec.exports import template_sheet, write_workbook
from batchexec.inputs import (
    ZIP_MAGIC,
    Format,
    Rows,
    decode,
    format_of,
    from_table,
    sniff,
)
from batchexec.planning import BatchOptions, BatchPlan, Limits
from batchexec.records import Batch
from batchexec.schemas import (
    Message,
    ProcessCsvRequest,
    ProcessCsvResponse,
    ValidateRequest,
    ValidateResponse,
)
from batchexec.web.keys import CATALOG, ENGINE, OWNER, REGISTRY, SETTINGS, WORKBOOKS
from batchexec.web.requests import (
    answer,
    batch_options,
    callback_url,
    form_flag,
    limits,
    on_input_pool,
    parse_body,
    plan_off_loop,
    require_ready_off_loop,
    xlsx_url,
)
from batchexec.wording import counted

#: How a template's rows are run, by the route that wrote it.
_RUN_AGAIN = {
    "process_csv": 'send the CSV again with "execute": true',
    "upload": "upload the file again with execute=true",
}
#: The fields of an upload's form besides its ``file``.
_FORM_FIELDS = (
    "execute",
    "callback_url",
    "model",
    "models",
    "response_schema",
    "max_cost",
    "cache",
    "estimate",
)
#: CSV bodies above this are parsed off the event loop.
_INLINE_CSV_CHARS = 64 * 1024
#: Plans of more executions than this are estimated off the event loop.
_INLINE_ESTIMATE_ROWS = 500


async def process_csv(request: web.Request) -> web.Response:
    """Parse a CSV, write its XLSX template and, with ``execute``, start the batch."""
    body = await parse_body(request, ProcessCsvRequest)
    callback = _callback(request, body.callback_url, execute=body.execute)
    bounds = _bounds(request, body.model)
    options = batch_options(request, body.models, body.response_schema, body.max_cost, body.cache)
    rows = await _csv_rows(request, body.csv_content)
    return await _process_rows(
        request,
        rows,
        bounds,
        options,
        execute=body.execute,
        callback=callback,
        kind="CSV",
        route="process_csv",
    )


async def upload(request: web.Request) -> web.Response:
    """Like ``process_csv``, for a multipart upload of a CSV or XLSX ``file``."""
    name, data, fields = await _read_upload(request)
    execute = form_flag(fields.get("execute"), "execute") or False
    callback = _callback(request, fields.get("callback_url"), execute=execute)
    bounds = _bounds(request, fields.get("model"))
    options = batch_options(
        request,
        fields.get("models"),
        fields.get("response_schema"),
        fields.get("max_cost"),
        fields.get("cache"),
    )
    rows, kind = await _file_rows(request, name, data)
    return await _process_rows(
        request,
        rows,
        bounds,
        options,
        execute=execute,
        callback=callback,
        kind=kind,
        route="upload",
    )


async def validate(request: web.Request) -> web.Response:
    """Check a spreadsheet as ``upload`` (multipart) or ``process_csv`` (JSON) would, and
    that its models can be called; nothing is written, stored or run. With ``estimate``,
    the answer adds the run's estimated tokens and cost (``batchexec.estimates``)."""
    if request.content_type == "multipart/form-data":
        name, data, fields = await _read_upload(request)
        wanted = form_flag(fields.get("estimate"), "estimate") or False
        bounds = _bounds(request, fields.get("model"))
        options = batch_options(
            request,
            fields.get("models"),
            fields.get("response_schema"),
            fields.get("max_cost"),
            fields.get("cache"),
        )
        rows, _ = await _file_rows(request, name, data)
    else:
        body = await parse_body(request, ValidateRequest)
        wanted = body.estimate
        bounds = _bounds(request, body.model)
        options = batch_options(
            request, body.models, body.response_schema, body.max_cost, body.cache
        )
        rows = await _csv_rows(request, body.csv_content)
    plan = await _plan(request, rows, bounds, options)
    await require_ready_off_loop(request, plan, rows)
    count = plan.input_rows
    found: Estimate | None = None
    if wanted:
        currency = request.app[CATALOG].currency
        if len(plan.rows) > _INLINE_ESTIMATE_ROWS:
            found = await on_input_pool(request, lambda: estimate(plan, currency))
        else:
            found = estimate(plan, currency)
    response = ValidateResponse(
        rows=count,
        columns=list(plan.columns),
        models=list(dict.fromkeys(row.target.model.name for row in plan.rows)),
        message=f"{counted(count, 'row')} {'is' if count == 1 else 'are'} ready to run.",
        estimate=found,
    )
    if found is None:
        # Unasked, the answer is what it was before estimates: no estimate key at all.
        return web.json_response(response.model_dump(mode="json", exclude={"estimate"}))
    return answer(response)


async def _file_rows(request: web.Request, name: str | None, data: bytes) -> tuple[Rows, str]:
    """The rows of an uploaded file, and its kind (``CSV`` or ``XLSX``)."""
    # A workbook is a zip whatever its name says; otherwise the name decides, then the content.
    fmt = Format.XLSX if data.startswith(ZIP_MAGIC) else format_of(name or "") or sniff(data)
    if fmt is Format.XLSX:
        return await request.app[WORKBOOKS].read(data), "XLSX"
    if fmt is not Format.CSV:
        raise InputError(f"Upload a CSV or XLSX file; this one looks like {fmt.value.upper()}.")
    return await _csv_rows(request, decode(data, Format.CSV)), "CSV"


def _bounds(request: web.Request, model: str | None) -> Limits:
    """The submission limits, with ``model`` (a form's or body's field, if not blank) the
    model of the rows that name neither a model nor an assistant."""
    bounds = limits(request)
    name = (model or "").strip()
    if not name:
        return bounds
    try:
        spec = request.app[CATALOG].model(name)
    except UnknownNameError as exc:
        raise InputError(
            "The model field names no model of the catalog.",
            [FieldError(None, "model", str(exc))],
        ) from None
    return replace(bounds, default_model=spec.name)


async def _plan(
    request: web.Request, rows: Rows, bounds: Limits, options: BatchOptions
) -> BatchPlan:
    """``rows`` planned, each problem located at its line or sheet row."""
    try:
        return await plan_off_loop(request, rows, bounds, options)
    except InputError as exc:
        raise InputError(exc.detail, [rows.located(error) for error in exc.errors]) from None


def _callback(request: web.Request, given: str | None, *, execute: bool) -> str | None:
    """The webhook of the batch ``execute`` starts; a template, which never ends, has none."""
    if given and not execute:
        raise InputError(
            "A callback_url is for a batch that runs: send execute=true with it, "
            "or leave it out to write the template only.",
            [FieldError(None, "callback_url", "only with execute")],
        )
    return callback_url(request, given) if execute else None


async def _csv_rows(request: web.Request, text: str) -> Rows:
    settings = request.app[SETTINGS]
    max_field_chars = max(settings.max_prompt_length, settings.max_body_bytes)

    def parse() -> Rows:
        return from_table(
            parse_csv(text, max_field_chars=max_field_chars, max_columns=settings.max_columns)
        )

    if len(text) > _INLINE_CSV_CHARS:
        return await on_input_pool(request, parse)
    return parse()


async def _process_rows(
    request: web.Request,
    rows: Rows,
    bounds: Limits,
    options: BatchOptions,
    *,
    execute: bool,
    callback: str | None,
    kind: str,
    route: str,
) -> web.Response:
    """Validate ``rows`` against ``bounds``, write their XLSX template and, with ``execute``,
    start the batch.

    Without ``execute`` nothing runs, and the answer says how to run the rows
    (through ``route`` again, with ``execute``): the template's id names its
    workbook, never a batch (the results route's 404 for it says the same).
    """
    plan = await _plan(request, rows, bounds, options)
    if execute:
        await require_ready_off_loop(request, plan, rows)
    batch_id = request.app[REGISTRY].new_id()
    file_name = Batch.file_name_for(batch_id)
    await _write_template(request, plan, file_name, batch_id, execute=execute)
    count = counted(plan.input_rows, "row")
    if execute:
        await _start(request, plan, file_name, batch_id, callback)
        message = (
            f"{kind} processed: {count}. Batch execution started. Use invocation ID "
            f"{batch_id} to check status and retrieve results."
        )
    else:
        again = _RUN_AGAIN[route]
        message = (
            f"{kind} processed: {count} written to the XLSX template; nothing was run. "
            f"To run {'it' if plan.input_rows == 1 else 'them'}, {again}."
        )
    return answer(
        ProcessCsvResponse(
            invocationId=batch_id,
            response=[Message(message=message)],
            # The original contract's relative path, whatever PUBLIC_DIR is: the
            # server's own folders are none of the client's business.
            xlsx_path=f"public/batch_execution_results/{file_name}",
            xlsx_url=xlsx_url(request, file_name),
        )
    )


async def _write_template(
    request: web.Request, plan: BatchPlan, file_name: str, batch_id: str, *, execute: bool
) -> None:
    """Write the plan's XLSX template, recorded first: it counts against the bound at once."""
    registry = request.app[REGISTRY]
    if execute:
        await registry.add_file(file_name, request[OWNER], batch_id=batch_id)
    else:
        await _add_template(request, file_name, batch_id)
    path = request.app[SETTINGS].results_dir / file_name
    try:
        await write_workbook(path, template_sheet(plan))
    except OSError as exc:
        await registry.forget_file(file_name)
        raise StorageError(
            f"The server cannot write the workbook: {exc.strerror or exc}. Try again later."
        ) from exc


async def _start(
    request: web.Request, plan: BatchPlan, file_name: str, batch_id: str, callback: str | None
) -> None:
    """Submit the batch; if it is refused, leave nothing behind for it."""
    try:
        await request.app[ENGINE].submit(
            request[OWNER], plan, batch_id=batch_id, callback_url=callback
        )
    except (QueueFullError, ShuttingDownError):
        await request.app[REGISTRY].forget_file(file_name)
        (request.app[SETTINGS].results_dir / file_name).unlink(missing_ok=True)
        raise


async def _add_template(request: web.Request, file_name: str, batch_id: str) -> None:
    """Record a template workbook, refused when the caller keeps ``max_templates`` already."""
    settings = request.app[SETTINGS]
    kept = await request.app[REGISTRY].add_template(
        file_name, request[OWNER], batch_id=batch_id, limit=settings.max_templates
    )
    if kept is not None:
        wait_s = kept[0] + settings.results_ttl_s - time.time() if kept else settings.results_ttl_s
        raise QueueFullError(
            f"This API key keeps {counted(len(kept), 'template workbook')}; "
            "the limit (MAX_TEMPLATES) "
            f"is {settings.max_templates}. They expire after RESULTS_TTL_HOURS; "
            'send "execute": true to run the rows instead.',
            retry_after_s=max(wait_s, 1.0),
        )


async def _read_upload(request: web.Request) -> tuple[str | None, bytes, dict[str, str]]:
    """The ``file`` part's name and bytes, and the form's other fields (``execute``,
    ``callback_url``, ``model``), of a multipart upload.

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
    fields: dict[str, str] = {}
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
            elif part.name in _FORM_FIELDS:
                fields[part.name] = b"".join(chunks).decode("utf-8", errors="replace")
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
    return name, data, fields
