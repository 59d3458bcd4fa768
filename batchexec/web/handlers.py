"""The batch routes: submit, follow, cancel, retry, list, and the catalog.

Each handler parses its request, calls the layer below (inputs and
planning, the engine, the registry) and answers with a response model; the
spreadsheet routes are in ``uploads``, the event stream in ``streams``, the
results body in ``presenting`` and workbooks in ``downloads``.
"""

from __future__ import annotations

from dataclasses import replace

from aiohttp import web

from batchexec.errors import ConflictError, NotFoundError, TemplateNotRunError
from batchexec.inputs import Rows, from_executions
from batchexec.openai_requests import OPENAI, limits_of, row_of_cells
from batchexec.planning import RowInput
from batchexec.providers import unconfigured
from batchexec.records import Batch, Execution, ExecutionStatus
from batchexec.runtime import input_rows
from batchexec.schemas import (
    AssistantOut,
    BatchList,
    BatchSummary,
    CatalogResponse,
    ExecuteBatchRequest,
    ExecutionIn,
    InvokeResponse,
    ListQuery,
    ModelOut,
    ResultsQuery,
    ResultsRequest,
    RetryRequest,
    RetryResponse,
)
from batchexec.web import streams
from batchexec.web.bodies import HealthResponse
from batchexec.web.keys import CATALOG, ENGINE, OWNER, PROVIDERS, REGISTRY, SETTINGS
from batchexec.web.presenting import answer_kept, answer_results
from batchexec.web.requests import (
    answer,
    batch_options,
    budget,
    callback_url,
    parse_body,
    plan_off_loop,
    require_ready_off_loop,
    validated,
    xlsx_url,
)


async def health(request: web.Request) -> web.Response:
    """Liveness: answers without an API key."""
    return answer(HealthResponse())


async def execute_batch(request: web.Request) -> web.Response:
    """Validate a batch of executions and start it in the background.

    A batch naming a model that cannot be called as configured is refused
    (422) before anything is stored: its rows would all fail.
    """
    body = await parse_body(request, ExecuteBatchRequest, count_of="executions")
    callback = callback_url(request, body.callback_url)
    options = batch_options(request, body.models, body.response_schema, body.max_cost, body.cache)
    executions: list[ExecutionIn | None] = list(body.executions)
    body.executions.clear()  # the rows are made from ``executions``, and each let go as made
    plan = await plan_off_loop(
        request, lambda: from_executions(executions, body.columns, consume=True), None, options
    )
    await require_ready_off_loop(request, plan)
    batch = await request.app[ENGINE].submit(request[OWNER], plan, callback_url=callback)
    return answer(InvokeResponse.started(batch.id))


async def results(request: web.Request) -> web.StreamResponse:
    """A batch's status, progress, finished executions and, once ended, its outputs."""
    body = await parse_body(request, ResultsQuery)
    if not body.progress_only and body.since is None:
        kept = await answer_kept(request, body.invocation_id, request[OWNER])
        if kept is not None:
            return kept
    batch = await _batch_of(request, body.invocation_id)
    return await answer_results(request, batch, body)


async def events(request: web.Request) -> web.StreamResponse:
    """The event stream of ``streams``, whose 404 for a template's id says what the id is."""
    try:
        return await streams.events(request)
    except NotFoundError as exc:
        raise await _not_found(request, request.match_info["invocation_id"], exc) from None


async def cancel(request: web.Request) -> web.StreamResponse:
    """Cancel a queued or running batch; answers like the results route once it has stopped."""
    body = await parse_body(request, ResultsRequest)
    registry = request.app[REGISTRY]
    batch = await _batch_of(request, body.invocation_id)
    await request.app[ENGINE].cancel(batch.id)
    # The store may tell of its end before this process shows it (a change is durable
    # before it is visible): shown first. Then read again: another replica may have
    # run (and ended) it.
    await registry.flush()
    return await answer_results(request, await registry.get(batch.id, request[OWNER]))


async def retry(request: web.Request) -> web.Response:
    """Start a new batch that reruns only the rows of a finished batch that did not succeed.

    Refused (422) when a row to rerun names a model that cannot be called as
    configured; rows that keep their results are not checked. The new batch's
    end goes to the first one's webhook, if it had one.
    """
    body = await parse_body(request, RetryRequest)
    original = await _batch_of(request, body.invocation_id)
    # A new budget is checked as any batch's; a kept one is held to today's MAX_COST.
    max_cost = (
        budget(request, body.max_cost)
        if body.max_cost is not None
        else request.app[SETTINGS].kept_budget(original.options.max_cost)
    )
    options = replace(original.options, max_cost=max_cost)
    if not original.status.finished:
        raise ConflictError("The batch is still running; retry it once it has ended.")
    rerun = [e.index for e in original.executions if e.status is not ExecutionStatus.SUCCEEDED]
    if not rerun:
        raise ConflictError("Every execution of the batch succeeded; there is nothing to retry.")

    # Planned again, against today's catalog: the rows run now, not when first sent. A
    # request of the OpenAI Batch API is planned from the request kept in its cells, with
    # its messages and options, as on a restart.
    again = frozenset(rerun)

    def rows() -> Rows:
        if original.options.models:
            # Side by side, each row runs on the batch's models again, not on its own.
            return Rows.of(original.columns, input_rows(original))
        inputs = [
            row_of_cells(execution.cells)
            if original.api == OPENAI
            else _again(execution)
            if execution.index in again
            else execution.row_input
            for execution in original.executions
        ]
        return Rows.of(original.columns, inputs)

    bounds = limits_of(request.app[SETTINGS]) if original.api == OPENAI else None
    plan = await plan_off_loop(request, rows, bounds, options)
    await require_ready_off_loop(request, plan, only=rerun)
    batch = await request.app[ENGINE].submit(
        request[OWNER],
        plan,
        retry_of=original,
        callback_url=original.callback_url,
        api=original.api,
    )
    return answer(RetryResponse.retrying(batch.id, original, rerun))


def _again(execution: Execution) -> RowInput:
    """An execution's row as submitted, to plan it again; one that named neither a model
    nor an assistant keeps the model it ran on (an upload's ``model`` field, say), as on
    a restart."""
    row = execution.row_input
    if execution.by_assistant or (row.model or "").strip():
        return row
    return replace(row, model=execution.model)


async def batches(request: web.Request) -> web.Response:
    """The caller's batches, newest first; ``limit`` and ``status`` filter them."""
    query = validated(ListQuery, dict(request.query), what="query string")
    found = await request.app[REGISTRY].owned_by(
        request[OWNER], status=query.status, limit=query.limit
    )
    return answer(BatchList(batches=[BatchSummary.of(batch) for batch in found]))


async def models(request: web.Request) -> web.Response:
    """The model catalog: names, aliases, provider and whether it is ready; never a secret."""
    catalog = request.app[CATALOG]
    providers = request.app[PROVIDERS]
    model_list = [
        ModelOut.of(model, configured=unconfigured(providers, model) is None)
        for model in catalog.models
    ]
    assistant_list = []
    for assistant in catalog.assistants:
        model = catalog.model(assistant.model)
        ready = unconfigured(providers, model) is None
        assistant_list.append(AssistantOut.of(assistant, model, configured=ready))
    default_model = request.app[SETTINGS].default_model
    return answer(
        CatalogResponse(default_model=default_model, models=model_list, assistants=assistant_list)
    )


async def _batch_of(request: web.Request, invocation_id: str) -> Batch:
    """The caller's batch ``invocation_id``; ``NotFoundError`` saying what an id with none is."""
    try:
        return await request.app[REGISTRY].get(invocation_id, request[OWNER])
    except NotFoundError as exc:
        raise await _not_found(request, invocation_id, exc) from None


async def _not_found(request: web.Request, invocation_id: str, exc: NotFoundError) -> NotFoundError:
    """The 404 for an id that names no batch of the caller's.

    The id of a template (``process_csv`` or ``upload`` without ``execute``)
    names a workbook, not a batch: it never runs, and this says so, where the
    workbook is and how to run its rows (send them again with ``execute``,
    which starts a batch with an id of its own). Any other id is plain
    "Invocation ID not found", as the original contract answers.
    """
    file_name = Batch.file_name_for(invocation_id)
    try:
        entry = await request.app[REGISTRY].check_file(file_name, request[OWNER])
    except NotFoundError:
        return exc
    if not entry.template:
        return exc
    return TemplateNotRunError(
        f"Invocation ID {invocation_id} names a template workbook (written by process_csv "
        'or upload without "execute"): its rows have not run, so it has no results. '
        'To run them, send the CSV again with "execute": true, or upload the workbook '
        "(filled in, if you like) with execute=true; the batch that starts has an "
        "invocation ID of its own. The workbook is at xlsx_url.",
        xlsx_url=xlsx_url(request, file_name),
    )
