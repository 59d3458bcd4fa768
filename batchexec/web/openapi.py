"""The OpenAPI 3.1 document of the HTTP API, made from the models the handlers use.

``OPERATIONS`` lists every route once: its method and path (from ``api``),
its route name (the document's ``operationId``), the model of its JSON
body, query or multipart form, what it answers with and which errors. The
schemas are pydantic's, of the very models the handlers parse requests
with and answer from, so the document cannot drift from the code; the
tests check the list against the routes the app registers.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from aiohttp import web
from pydantic import AliasChoices, BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from batchexec import __version__, api
from batchexec.schemas import (
    BatchEndedWebhook,
    BatchList,
    CatalogResponse,
    ExecuteBatchRequest,
    InvokeResponse,
    ListQuery,
    ProcessCsvRequest,
    ProcessCsvResponse,
    Progress,
    ResultsQuery,
    ResultsRequest,
    ResultsResponse,
    RetryRequest,
    RetryResponse,
    ValidateRequest,
    ValidateResponse,
)
from batchexec.web.bodies import (
    ErrorResponse,
    ExecutionEvent,
    FinalEvent,
    HealthResponse,
    InvalidResponse,
    StartedEvent,
    TemplateNotRunResponse,
    UploadForm,
    ValidateForm,
)
from batchexec.web.downloads import XLSX_CONTENT_TYPE
from batchexec.web.keys import SETTINGS
from batchexec.web.middlewares import OPEN_ROUTES
from batchexec.web.page import FILE_NAME_PATTERN
from batchexec.web.v1.schemas import (
    BatchCreate,
    BatchesQuery,
    BatchObject,
    ErrorEnvelope,
    FileDeleted,
    FileObject,
    FilesQuery,
    Page,
    V1FileForm,
)

#: The names of the key schemes in ``components/securitySchemes``: the header every
#: route takes, and the bearer token a metrics scraper may send instead.
SECURITY_SCHEME = "IntegrationsApiKey"
BEARER_SCHEME = "ScraperBearer"
_REF_TEMPLATE = "#/components/schemas/{model}"
#: The reference to a model's schema in the document, by the model and its mode.
_Ref = Callable[[type[BaseModel], JsonSchemaMode], dict[str, Any]]


@dataclass(frozen=True)
class Content:
    """A 200 answer that is not a model's JSON: a file, a stream, a page.

    For ``text/event-stream``, ``events`` names each event and the model of its
    JSON data; the schema is then of one event, as OpenAPI 3.1 has it.
    ``other_media_types`` are types the same answer may have instead (a file
    of one of several kinds), with the same schema.
    """

    media_type: str
    schema: Mapping[str, Any]
    description: str
    events: Mapping[str, type[BaseModel]] = field(default_factory=dict)
    other_media_types: tuple[str, ...] = ()


#: What an operation answers with when it succeeds: a model (as JSON), or other content.
Answer = type[BaseModel] | Content


@dataclass(frozen=True)
class Operation:
    """One route of the API, as the document describes it."""

    #: The route's name in the app's router, and the operation's ``operationId``.
    name: str
    method: Literal["GET", "POST", "DELETE"]
    path: str
    summary: str
    description: str
    answer: Answer
    #: Statuses of ``ERRORS`` the route can answer with (401 is added unless it is open).
    errors: tuple[int, ...] = ()
    #: The JSON body, the query, the multipart form: a route taking both a body and a form
    #: reads the one its Content-Type names.
    body: type[BaseModel] | None = None
    query: type[BaseModel] | None = None
    form: type[BaseModel] | None = None
    #: Schemas of path parameters narrower than any string, by name.
    path_schemas: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    #: A request body worth sending, shown in the document (and sent by fuzzers first).
    example: Mapping[str, Any] | None = None
    #: Whether the answer's ``invocationId`` names a batch the batch routes take.
    starts_batch: bool = False
    #: Whether the key may come as ``Authorization: Bearer <key>`` instead.
    bearer: bool = False
    #: A route of the OpenAI Batch API: OpenAI's error envelope (``V1_ERRORS``), Bearer keys.
    openai: bool = False
    tags: tuple[str, ...] = field(default=("batches",))

    @property
    def open(self) -> bool:
        """Whether the route answers without an API key."""
        return self.name in OPEN_ROUTES


@dataclass(frozen=True)
class ErrorAnswer:
    """An error status: when it is answered, and the envelope's models it answers with."""

    description: str
    models: tuple[type[BaseModel], ...] = (ErrorResponse,)
    retry_after: bool = False


#: Every error status of the API, with the error envelope's model for it.
ERRORS: Mapping[int, ErrorAnswer] = {
    400: ErrorAnswer(
        "The body is not JSON (or is nested too deeply, or holds a number of more than "
        "4,300 digits), or the HTTP request itself is malformed."
    ),
    401: ErrorAnswer(f"The {api.API_KEY_HEADER} header is missing or not accepted."),
    404: ErrorAnswer(
        "No such batch or file of the caller's (another key's is not found either), or no "
        "such file of the web page. For "
        "the id of a template workbook the answer says what the id is and carries the "
        "workbook's xlsx_url.",
        (TemplateNotRunResponse, ErrorResponse),
    ),
    409: ErrorAnswer(
        "The batch is not in a state that allows this: cancel of a batch that has ended, "
        "retry of one still running or with nothing to retry."
    ),
    413: ErrorAnswer("The body is larger than MAX_BODY_BYTES."),
    422: ErrorAnswer(
        "The request is invalid, each problem listed (1-based index of the row at fault; "
        "null when no one row is); or it names a model that cannot be called as configured, "
        "or an input is over MAX_COLUMNS, MAX_INPUT_CELLS or PARSE_TIMEOUT_S. Nothing was "
        "stored or run.",
        (InvalidResponse,),
    ),
    429: ErrorAnswer(
        "MAX_QUEUED_BATCHES batches already wait, or the key keeps MAX_TEMPLATES template "
        "workbooks: try again after Retry-After seconds.",
        retry_after=True,
    ),
    503: ErrorAnswer(
        "The server is shutting down (with Retry-After), or cannot write a workbook or "
        "its store (a full or read-only disk, a lost database).",
        retry_after=True,
    ),
}

#: The error statuses of the OpenAI Batch API's routes, in OpenAI's envelope.
V1_ERRORS: Mapping[int, ErrorAnswer] = {
    400: ErrorAnswer(
        "The request is invalid: error.message says how, error.param names the field.",
        (ErrorEnvelope,),
    ),
    401: ErrorAnswer(
        "The key is missing or not accepted (as Authorization: Bearer <key>).", (ErrorEnvelope,)
    ),
    404: ErrorAnswer("No such file or batch of the caller's.", (ErrorEnvelope,)),
    409: ErrorAnswer("The batch is not in a state that allows this.", (ErrorEnvelope,)),
    413: ErrorAnswer("The file is larger than MAX_FILE_BYTES.", (ErrorEnvelope,)),
    429: ErrorAnswer(
        "The key keeps MAX_STORED_FILES files, or MAX_QUEUED_BATCHES batches already wait.",
        (ErrorEnvelope,),
        retry_after=True,
    ),
    503: ErrorAnswer(
        "The server is shutting down, or cannot write its store.",
        (ErrorEnvelope,),
        retry_after=True,
    ),
}

_SUBMIT_ERRORS = (400, 413, 422, 429, 503)
_BATCH_ERRORS = (400, 404, 413, 422, 503)
_EXAMPLE_ID = "5fd70ec7-6084-422b-a35e-668ab138c6d5"
_RESULTS_DESCRIPTION = (
    "Status, progress and the executions finished so far; xlsx_url and csv_content once "
    "the batch has ended. With since (the cursor of an earlier answer) only the executions "
    "that ended after it, in the order they ended; with progress_only none. Either leaves "
    "csv_content out. The body may name the batch as invocationId instead."
)

#: Where the invocationId of an answer that starts a batch leads (for clients and fuzzers).
_BATCH_LINKS = {
    name: {
        "operationId": name,
        "requestBody": {"invocation_id": "$response.body#/invocationId"},
        "description": f"The {name} route of the batch.",
    }
    for name in ("results", "results_slash", "cancel", "retry")
} | {
    "events": {
        "operationId": "events",
        "parameters": {"invocation_id": "$response.body#/invocationId"},
        "description": "The events of the batch.",
    }
}

#: Every route of the API.
OPERATIONS: tuple[Operation, ...] = (
    Operation(
        name="process_csv",
        method="POST",
        path=api.PROCESS_CSV,
        summary="Validate a CSV, write its workbook and, with execute, run it",
        description=(
            "The CSV needs a prompt column; model and assistant are optional and any other "
            "column is carried into the outputs. Without execute only the XLSX template is "
            "written (its invocationId names the workbook, not a batch); with it the batch "
            "starts under that id."
        ),
        body=ProcessCsvRequest,
        answer=ProcessCsvResponse,
        errors=_SUBMIT_ERRORS,
        starts_batch=True,
        example={"csv_content": "prompt,model\nTranslate hello to French,echo\n", "execute": True},
    ),
    Operation(
        name="upload",
        method="POST",
        path=api.UPLOAD,
        summary="Like process_csv, for an uploaded CSV or XLSX file",
        description=(
            "A multipart/form-data body with a file part, an optional execute, callback_url "
            "and model (the model of the rows that name neither a model nor an assistant)."
        ),
        form=UploadForm,
        answer=ProcessCsvResponse,
        errors=(413, 422, 429, 503),
        starts_batch=True,
    ),
    Operation(
        name="validate",
        method="POST",
        path=api.VALIDATE,
        summary="Check a CSV or XLSX file without running or storing anything",
        description=(
            "The rows are read and checked as upload (a multipart/form-data body) or "
            "process_csv (a JSON body with csv_content) would, and so are their models: one "
            "that cannot be called as configured is a 422 too. A 200 says how many rows would "
            "run, their columns and models; a 422 lists every problem by its CSV line or "
            "sheet row. No workbook is written, nothing stored or run. model is the model of "
            "the rows that name neither a model nor an assistant. With estimate, the answer "
            "adds the estimated tokens and cost range of the run, by model and in all."
        ),
        body=ValidateRequest,
        form=ValidateForm,
        answer=ValidateResponse,
        errors=(400, 413, 422),
        example={"csv_content": "prompt\nTranslate hello to French\n", "model": "echo"},
    ),
    Operation(
        name="execute_batch",
        method="POST",
        path=api.EXECUTE_BATCH,
        summary="Validate a batch of executions and start it",
        description=(
            "${output.n} in a prompt is the result of execution n (1-based, an earlier one). "
            "Keys of an execution other than prompt, model and assistant become columns of "
            "the outputs; columns lists their order."
        ),
        body=ExecuteBatchRequest,
        answer=InvokeResponse,
        errors=_SUBMIT_ERRORS,
        starts_batch=True,
        example={
            "executions": [
                {"prompt": "Name a primary colour.", "model": "echo"},
                {"prompt": "Write a haiku about ${output.1}", "model": "echo"},
            ]
        },
    ),
    Operation(
        name="results",
        method="POST",
        path=api.RESULTS,
        summary="A batch's status, progress, executions and outputs",
        description=_RESULTS_DESCRIPTION,
        body=ResultsQuery,
        answer=ResultsResponse,
        errors=_BATCH_ERRORS,
        example={"invocation_id": _EXAMPLE_ID},
    ),
    Operation(
        name="results_slash",
        method="POST",
        path=api.RESULTS + "/",
        summary="The results route, with a trailing slash",
        description=_RESULTS_DESCRIPTION,
        body=ResultsQuery,
        answer=ResultsResponse,
        errors=_BATCH_ERRORS,
        example={"invocation_id": _EXAMPLE_ID},
    ),
    Operation(
        name="download",
        method="GET",
        path=api.DOWNLOAD,
        summary="A workbook of the caller's",
        description="The XLSX that xlsx_url names; a name that is no plain file name is 404.",
        answer=Content(
            XLSX_CONTENT_TYPE,
            {"type": "string", "format": "binary"},
            "The workbook, with a download file name.",
        ),
        errors=(404, 503),
        tags=("files",),
    ),
    Operation(
        name="models",
        method="GET",
        path=api.MODELS,
        summary="The model catalog",
        description="Names, aliases, provider and whether each can be called as configured.",
        answer=CatalogResponse,
        tags=("catalog",),
    ),
    Operation(
        name="events",
        method="GET",
        path=api.EVENTS,
        summary="A batch's life as server-sent events",
        description=(
            "An execution event as each row ends (index, status, latency_ms, error, "
            "attempts), a progress event with the counts, and a final done event (status, "
            "message, invocationId, xlsx_url), or interrupted if the server stops first. A "
            "client that connects late first gets the current state."
        ),
        answer=Content(
            "text/event-stream",
            {},
            "Events, each an event: line naming it and a data: line of JSON, until the "
            "last (done or interrupted). Comment lines keep an idle stream open.",
            events={
                "started": StartedEvent,
                "execution": ExecutionEvent,
                "progress": Progress,
                "done": FinalEvent,
                "interrupted": FinalEvent,
            },
        ),
        errors=(404, 503),
    ),
    Operation(
        name="cancel",
        method="POST",
        path=api.CANCEL,
        summary="Stop a queued or running batch, keeping what finished",
        description="Answers as the results route once the batch has stopped.",
        body=ResultsRequest,
        answer=ResultsResponse,
        errors=(400, 404, 409, 413, 422, 503),
        example={"invocation_id": _EXAMPLE_ID},
    ),
    Operation(
        name="retry",
        method="POST",
        path=api.RETRY,
        summary="Rerun the rows of a finished batch that did not succeed",
        description="Starts a new batch, retry_of the first; rerun lists the rows it runs.",
        body=RetryRequest,
        answer=RetryResponse,
        errors=(400, 404, 409, 413, 422, 429, 503),
        starts_batch=True,
        example={"invocation_id": _EXAMPLE_ID},
    ),
    Operation(
        name="batches",
        method="GET",
        path=api.BATCHES,
        summary="The caller's batches, newest first",
        description="limit (1 to 1000) and status filter them.",
        query=ListQuery,
        answer=BatchList,
        errors=(422, 503),
    ),
    Operation(
        name="health",
        method="GET",
        path=api.HEALTH,
        summary="Liveness",
        description="Answers without an API key.",
        answer=HealthResponse,
        tags=("service",),
    ),
    Operation(
        name="openapi",
        method="GET",
        path=api.OPENAPI,
        summary="This document",
        description="The OpenAPI 3.1 document of the API; no key needed.",
        answer=Content("application/json", {"type": "object"}, "The OpenAPI document."),
        tags=("service",),
    ),
    Operation(
        name="docs",
        method="GET",
        path=api.DOCS,
        summary="This document as a page",
        description="The routes, their parameters and schemas, for people; no key needed.",
        answer=Content("text/html", {"type": "string"}, "An HTML page."),
        tags=("service",),
    ),
    Operation(
        name="page",
        method="GET",
        path=api.PAGE,
        summary="The web page",
        description=(
            "A page to check a spreadsheet, run it, follow it and download its results; no "
            "key needed to load it (every call it makes sends the key the user gives). Its "
            "script and stylesheet are named relatively (page/app.js), so under a mount prefix "
            "open it with the trailing slash (/batch/)."
        ),
        answer=Content("text/html", {"type": "string"}, "The page's HTML."),
        tags=("page",),
    ),
    Operation(
        name="page_file",
        method="GET",
        path=api.PAGE_FILE,
        summary="A script or stylesheet of the web page",
        description="A file of the page's folder by its plain name; any other name is 404.",
        answer=Content(
            "text/javascript",
            {"type": "string"},
            "The file: a script (text/javascript) or a stylesheet (text/css).",
            other_media_types=("text/css",),
        ),
        errors=(404,),
        path_schemas={
            "name": {
                "type": "string",
                "pattern": FILE_NAME_PATTERN,
                "examples": ["app.js", "style.css"],
            }
        },
        tags=("page",),
    ),
    Operation(
        name="metrics",
        method="GET",
        path=api.METRICS,
        summary="Prometheus metrics",
        description=(
            "Batches, executions, provider calls, retries and store writes in Prometheus' "
            "text format (OpenMetrics if the Accept header asks for it). The key may also "
            "come as Authorization: Bearer <key>; with METRICS_OPEN=true, requests from a "
            "loopback address need none."
        ),
        answer=Content(
            "text/plain",
            {"type": "string"},
            "The metrics, in the Prometheus text exposition format.",
        ),
        tags=("service",),
        bearer=True,
    ),
    Operation(
        name="v1_files_create",
        method="POST",
        path=api.V1_FILES,
        summary="Upload a batch input file (OpenAI's Files API)",
        description=(
            "A JSONL file of /v1/chat/completions requests, purpose=batch, at most "
            "MAX_FILE_BYTES; streamed to the store, never held whole in memory."
        ),
        form=V1FileForm,
        answer=FileObject,
        errors=(400, 413, 429, 503),
        openai=True,
        tags=("openai",),
    ),
    Operation(
        name="v1_files_list",
        method="GET",
        path=api.V1_FILES,
        summary="The caller's files, newest first",
        description="Paged with after (the last id of a page) and limit; purpose filters them.",
        query=FilesQuery,
        answer=Page[FileObject],
        errors=(400, 503),
        openai=True,
        tags=("openai",),
    ),
    Operation(
        name="v1_files_retrieve",
        method="GET",
        path=api.V1_FILE,
        summary="One file",
        description="An upload (purpose batch) or a batch's output or error file (batch_output).",
        answer=FileObject,
        errors=(404, 503),
        openai=True,
        tags=("openai",),
    ),
    Operation(
        name="v1_files_delete",
        method="DELETE",
        path=api.V1_FILE,
        summary="Delete a file",
        description="Batches made from it keep their rows.",
        answer=FileDeleted,
        errors=(404, 503),
        openai=True,
        tags=("openai",),
    ),
    Operation(
        name="v1_files_content",
        method="GET",
        path=api.V1_FILE_CONTENT,
        summary="A file's content",
        description="The bytes as uploaded, or the JSONL a batch wrote.",
        answer=Content(
            "application/octet-stream",
            {"type": "string", "contentMediaType": "application/octet-stream"},
            "The file's bytes.",
        ),
        errors=(404, 503),
        openai=True,
        tags=("openai",),
    ),
    Operation(
        name="v1_batches_create",
        method="POST",
        path=api.V1_BATCHES,
        summary="Run the requests of an input file (OpenAI's Batch API)",
        description=(
            "Every line is checked first: a batch with any problem is failed at once, each in "
            "errors with its line, and runs nothing. Otherwise it runs as the batchexec batch "
            "of the same id."
        ),
        body=BatchCreate,
        answer=BatchObject,
        errors=(400, 404, 413, 429, 503),
        openai=True,
        tags=("openai",),
    ),
    Operation(
        name="v1_batches_list",
        method="GET",
        path=api.V1_BATCHES,
        summary="The caller's batches, newest first",
        description="Paged with after (the last id of a page) and limit (1 to 100).",
        query=BatchesQuery,
        answer=Page[BatchObject],
        errors=(400, 503),
        openai=True,
        tags=("openai",),
    ),
    Operation(
        name="v1_batches_retrieve",
        method="GET",
        path=api.V1_BATCH,
        summary="One batch",
        description="Its status, request counts and, once written, its output and error files.",
        answer=BatchObject,
        errors=(404, 503),
        openai=True,
        tags=("openai",),
    ),
    Operation(
        name="v1_batches_cancel",
        method="POST",
        path=api.V1_BATCH_CANCEL,
        summary="Stop a batch, keeping what finished",
        description="Answers cancelling; cancelled once its files are written.",
        answer=BatchObject,
        errors=(404, 409, 503),
        openai=True,
        tags=("openai",),
    ),
)


@functools.cache
def document() -> Mapping[str, Any]:
    """The OpenAPI document, with no ``servers`` (the handler adds where it is served).

    Made once a process: it depends on the code only. Read-only: callers copy
    what they change.
    """
    modes: list[tuple[type[BaseModel], JsonSchemaMode]] = []
    for operation in OPERATIONS:
        for request_model in (operation.body, operation.query, operation.form):
            if request_model is not None:
                modes.append((request_model, "validation"))
        if isinstance(operation.answer, type):
            modes.append((operation.answer, "serialization"))
        else:
            modes.extend((model, "serialization") for model in operation.answer.events.values())
    for error in (*ERRORS.values(), *V1_ERRORS.values()):
        modes.extend((model, "serialization") for model in error.models)
    modes.append((BatchEndedWebhook, "serialization"))
    refs, definitions = models_json_schema(list(dict.fromkeys(modes)), ref_template=_REF_TEMPLATE)
    schemas: dict[str, Any] = definitions.get("$defs", {})
    for model, mode in modes:
        if mode == "validation":
            _accept_alias_choices(model, schemas[_name(refs[(model, mode)]["$ref"])])

    def ref(model: type[BaseModel], mode: JsonSchemaMode) -> dict[str, Any]:
        return dict(refs[(model, mode)])

    paths: dict[str, dict[str, Any]] = {}
    for operation in OPERATIONS:
        described = _operation(operation, ref, schemas)
        paths.setdefault(operation.path, {})[operation.method.lower()] = described
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "batchexec",
            "version": __version__,
            "summary": "Run batches of LLM prompts; results as CSV and XLSX.",
            "description": (
                "Every route but health, the web page and its files, this document and its "
                f"page needs the {api.API_KEY_HEADER} header. Every error is JSON with a detail; "
                "a 422 lists each problem. A batch belongs to the key that created it: another "
                "key gets 404 for it and its files."
            ),
        },
        "tags": [
            {"name": "batches", "description": "Submit, follow, cancel and retry batches."},
            {"name": "files", "description": "The workbooks of batches and templates."},
            {"name": "catalog", "description": "The models and assistants a batch can name."},
            {"name": "service", "description": "The server itself; no key needed."},
            {"name": "page", "description": "The web page and its files; no key needed."},
            {
                "name": "openai",
                "description": "The OpenAI Batch API: OpenAI's paths, objects and errors.",
            },
        ],
        "paths": paths,
        "webhooks": {"batchEnded": _webhook(ref(BatchEndedWebhook, "serialization"))},
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                SECURITY_SCHEME: {"type": "apiKey", "in": "header", "name": api.API_KEY_HEADER},
                BEARER_SCHEME: {
                    "type": "http",
                    "scheme": "bearer",
                    "description": f"The same key, as Authorization: Bearer; {api.METRICS} only.",
                },
            },
        },
        "security": [{SECURITY_SCHEME: []}],
    }


def served(request: web.Request) -> dict[str, Any]:
    """``document()`` with ``servers``: ``SERVER_NAME``, else the app's mount prefix."""
    server_name = request.app[SETTINGS].server_name
    if server_name:
        url = server_name
    else:
        # The app may be mounted under a prefix; the document's paths are the app's own.
        own = str(request.app.router["openapi"].url_for())
        url = own[: -len(api.OPENAPI)] or "/"
    return {**document(), "servers": [{"url": url}]}


async def openapi_json(request: web.Request) -> web.Response:
    """The OpenAPI document of the API."""
    return web.Response(
        body=json.dumps(served(request), ensure_ascii=False).encode(),
        content_type="application/json",
    )


def _operation(operation: Operation, ref: _Ref, schemas: Mapping[str, Any]) -> dict[str, Any]:
    """The operation object of ``operation``."""
    described: dict[str, Any] = {
        "operationId": operation.name,
        "summary": operation.summary,
        "description": operation.description,
        "tags": list(operation.tags),
    }
    if operation.open:
        described["security"] = []
    elif operation.openai:
        described["security"] = [{BEARER_SCHEME: []}, {SECURITY_SCHEME: []}]
    elif operation.bearer:
        described["security"] = [{SECURITY_SCHEME: []}, {BEARER_SCHEME: []}]
    parameters = [
        {
            "name": name,
            "in": "path",
            "required": True,
            "schema": dict(operation.path_schemas.get(name, {"type": "string"})),
        }
        for name in _path_parameters(operation.path)
    ]
    if operation.query is not None:
        query = schemas[_name(ref(operation.query, "validation")["$ref"])]
        parameters.extend(_query_parameters(query))
    if parameters:
        described["parameters"] = parameters
    content: dict[str, Any] = {}
    if operation.body is not None:
        media: dict[str, Any] = {"schema": ref(operation.body, "validation")}
        if operation.example is not None:
            media["example"] = dict(operation.example)
        content["application/json"] = media
    if operation.form is not None:
        content["multipart/form-data"] = {"schema": ref(operation.form, "validation")}
    if content:
        described["requestBody"] = {"required": True, "content": content}
    responses: dict[str, Any] = {"200": _success(operation.answer, ref)}
    if operation.starts_batch:
        responses["200"]["links"] = _BATCH_LINKS
    statuses = sorted({*operation.errors, *(() if operation.open else (401,))})
    for status in statuses:
        responses[str(status)] = _error((V1_ERRORS if operation.openai else ERRORS)[status], ref)
    described["responses"] = responses
    return described


def _webhook(body: dict[str, Any]) -> dict[str, Any]:
    """The POST a batch's ``callback_url`` receives once the batch has ended."""
    headers = {
        "webhook-id": "The batch's id: the same on every attempt, so repeats can be dropped.",
        "webhook-timestamp": "When the attempt was made, in Unix seconds.",
        "webhook-signature": (
            "v1, then the base64 of HMAC-SHA256 over '{webhook-id}.{webhook-timestamp}.{body}' "
            "keyed with the server's CALLBACK_SECRET (Standard Webhooks)."
        ),
    }
    return {
        "post": {
            "operationId": "batch_ended",
            "summary": "A batch has ended (sent to its callback_url)",
            "description": (
                "Sent at least once, signed as Standard Webhooks specifies, when a batch that "
                "named a callback_url (or ran under the server's CALLBACK_URL) has ended. "
                "A 2xx answer delivers it; 410 stops it; any other answer, or none within "
                "CALLBACK_TIMEOUT_S, is retried with a doubling backoff up to "
                "CALLBACK_ATTEMPTS attempts. Redirects are not followed."
            ),
            "tags": ["batches"],
            "security": [],
            "parameters": [
                {
                    "name": name,
                    "in": "header",
                    "required": True,
                    "description": text,
                    "schema": {"type": "string"},
                }
                for name, text in headers.items()
            ],
            "requestBody": {"required": True, "content": {"application/json": {"schema": body}}},
            "responses": {
                "2XX": {"description": "Received; not sent again."},
                "410": {"description": "Gone: not sent again."},
                "default": {"description": "Sent again later, up to CALLBACK_ATTEMPTS attempts."},
            },
        }
    }


def _success(answer: Answer, ref: _Ref) -> dict[str, Any]:
    if isinstance(answer, Content):
        schema = dict(answer.schema)
        if answer.events:
            schema["oneOf"] = [
                _event(name, ref(model, "serialization")) for name, model in answer.events.items()
            ]
        media_types = (answer.media_type, *answer.other_media_types)
        return {
            "description": answer.description,
            "content": {media_type: {"schema": dict(schema)} for media_type in media_types},
        }
    return {
        "description": (answer.__doc__ or answer.__name__).splitlines()[0],
        "content": {"application/json": {"schema": ref(answer, "serialization")}},
    }


def _event(name: str, data: dict[str, Any]) -> dict[str, Any]:
    """The schema of one server-sent event ``name`` whose data is JSON of schema ``data``."""
    return {
        "type": "object",
        "properties": {
            "event": {"const": name},
            "data": {
                "type": "string",
                "contentMediaType": "application/json",
                "contentSchema": data,
            },
        },
        "required": ["event", "data"],
    }


def _error(error: ErrorAnswer, ref: _Ref) -> dict[str, Any]:
    refs = [ref(model, "serialization") for model in error.models]
    schema = refs[0] if len(refs) == 1 else {"anyOf": refs}
    answer: dict[str, Any] = {
        "description": error.description,
        "content": {"application/json": {"schema": schema}},
    }
    if error.retry_after:
        answer["headers"] = {
            "Retry-After": {
                "description": "Seconds to wait before trying again, when known.",
                "schema": {"type": "integer", "minimum": 1},
            }
        }
    return answer


def _path_parameters(path: str) -> list[str]:
    """The ``{name}`` parts of ``path``, in order."""
    return [part[1:-1] for part in path.split("/") if part.startswith("{") and part.endswith("}")]


def _query_parameters(schema: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One query parameter a property of the query model's ``schema``.

    An optional field's null is left out: a query string cannot say null,
    only leave the parameter out.
    """
    required = set(schema.get("required", ()))
    parameters = []
    for name, prop in schema.get("properties", {}).items():
        prop = dict(prop)
        description = prop.pop("description", None)
        choices = [choice for choice in prop.get("anyOf", ()) if choice != {"type": "null"}]
        if "anyOf" in prop and len(choices) == 1:
            del prop["anyOf"]
            prop = {**choices[0], **prop}
            if prop.get("default", ...) is None:
                del prop["default"]
        parameter: dict[str, Any] = {
            "name": name,
            "in": "query",
            "required": name in required,
            "schema": prop,
        }
        if description:
            parameter["description"] = description
        parameters.append(parameter)
    return parameters


def _accept_alias_choices(model: type[BaseModel], schema: dict[str, Any]) -> None:
    """Add to a request model's ``schema`` the other names its fields accept.

    pydantic describes a field by the first of its ``AliasChoices``; the
    model takes any of them (``invocation_id`` or ``invocationId``), so each
    is a property, and a required field needs one of them.
    """
    properties = schema.get("properties", {})
    required: list[str] = schema.get("required", [])
    for model_field in model.model_fields.values():
        alias = model_field.validation_alias
        if not isinstance(alias, AliasChoices):
            continue
        names = [choice for choice in alias.choices if isinstance(choice, str)]
        if len(names) < 2 or names[0] not in properties:
            continue
        for other in names[1:]:
            properties[other] = properties[names[0]]
        if names[0] in required:
            required.remove(names[0])
            # Both at once must name the same batch, which a schema cannot say: one of them.
            schema["oneOf"] = [{"required": [name]} for name in names]
    if not required:
        schema.pop("required", None)


def _name(reference: str) -> str:
    """The schema name a ``#/components/schemas/NAME`` reference points at."""
    return reference.rsplit("/", 1)[1]
