"""The batch routes: submit, follow, cancel, retry, list, and the catalog.

Each handler parses its request, calls the layer below (inputs and
planning, the engine, the registry) and answers with a response model; the
spreadsheet routes are in ``uploads``, the event stream in ``streams``, the
results body in ``presenting`` and workbooks in ``downloads``.
"""

from __future__ import annotations

from aiohttp import web

from batchexec.errors import ConflictError
from batchexec.inputs import Rows, from_executions
from batchexec.providers import unconfigured
from batchexec.readiness import require_ready
from batchexec.records import ExecutionStatus
from batchexec.schemas import (
    AssistantOut,
    BatchList,
    BatchSummary,
    CatalogResponse,
    ExecuteBatchRequest,
    InvokeResponse,
    ListQuery,
    ModelOut,
    ResultsQuery,
    ResultsRequest,
    RetryResponse,
)
from batchexec.web.keys import CATALOG, ENGINE, OWNER, PROVIDERS, REGISTRY, SETTINGS
from batchexec.web.presenting import answer_results
from batchexec.web.requests import answer, parse_body, plan_off_loop, validated


async def health(request: web.Request) -> web.Response:
    """Liveness: answers without an API key."""
    return web.json_response({"status": "ok"})


async def execute_batch(request: web.Request) -> web.Response:
    """Validate a batch of executions and start it in the background.

    A batch naming a model that cannot be called as configured is refused
    (422) before anything is stored: its rows would all fail.
    """
    body = await parse_body(request, ExecuteBatchRequest, count_of="executions")
    plan = await plan_off_loop(request, lambda: from_executions(body.executions))
    providers = request.app[PROVIDERS]
    require_ready(plan, providers)
    batch = await request.app[ENGINE].submit(request[OWNER], plan)
    return answer(InvokeResponse.started(batch.id))


async def results(request: web.Request) -> web.StreamResponse:
    """A batch's status, progress, finished executions and, once ended, its outputs."""
    body = await parse_body(request, ResultsQuery)
    batch = await request.app[REGISTRY].get(body.invocation_id, request[OWNER])
    return await answer_results(request, batch, body)


async def cancel(request: web.Request) -> web.StreamResponse:
    """Cancel a queued or running batch; answers like the results route once it has stopped."""
    body = await parse_body(request, ResultsRequest)
    registry = request.app[REGISTRY]
    batch = await registry.get(body.invocation_id, request[OWNER])
    await request.app[ENGINE].cancel(batch.id)
    # Read again: another replica may have run (and ended) it.
    return await answer_results(request, await registry.get(batch.id, request[OWNER]))


async def retry(request: web.Request) -> web.Response:
    """Start a new batch that reruns only the rows of a finished batch that did not succeed.

    Refused (422) when a row to rerun names a model that cannot be called as
    configured; rows that keep their results are not checked.
    """
    body = await parse_body(request, ResultsRequest)
    original = await request.app[REGISTRY].get(body.invocation_id, request[OWNER])
    if not original.status.finished:
        raise ConflictError("The batch is still running; retry it once it has ended.")
    rerun = [e.index for e in original.executions if e.status is not ExecutionStatus.SUCCEEDED]
    if not rerun:
        raise ConflictError("Every execution of the batch succeeded; there is nothing to retry.")

    # Planned again, against today's catalog: the rows run now, not when first sent.
    def rows() -> Rows:
        return Rows.of(original.columns, [execution.row_input for execution in original.executions])

    plan = await plan_off_loop(request, rows)
    providers = request.app[PROVIDERS]
    require_ready(plan, providers, only=rerun)
    batch = await request.app[ENGINE].submit(request[OWNER], plan, retry_of=original)
    return answer(RetryResponse.retrying(batch.id, original, rerun))


async def batches(request: web.Request) -> web.Response:
    """The caller's batches, newest first; ``limit`` and ``status`` filter them."""
    query = validated(ListQuery, dict(request.query))
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
