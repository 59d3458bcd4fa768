"""Request and response bodies of the HTTP API.

Field names of the original Batch Execution Integration (``invocationId``,
``csv_content``, ``xlsx_path``, ``xlsx_url``) are part of its contract and kept
as they were; fields added since are snake_case.
"""

from __future__ import annotations

import json
from collections import Counter
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from batchexec.catalog import DEFAULT_CURRENCY, AssistantSpec, ModelSpec
from batchexec.columns import PARAMETER_COLUMNS, Cell
from batchexec.estimates import Estimate
from batchexec.parameters import (
    MAX_STOP_CHARS,
    MAX_STOP_SEQUENCES,
    MAX_TOKENS_LIMIT,
    SEED_RANGE,
    TEMPERATURE_RANGE,
    TOP_P_RANGE,
)
from batchexec.planning import MAX_MODELS
from batchexec.records import (
    Batch,
    BatchStatus,
    Execution,
    ExecutionStatus,
    Summary,
    progress_counts,
)
from batchexec.webhook_urls import MAX_URL_CHARS


class RowFields(BaseModel):
    """The fields of an execution besides its prompt, model and assistant, as documented.

    Only documentation (``ExecutionIn``'s JSON Schema shows them): an execution
    keeps them as extra keys, which cost a large batch nothing where unset,
    and the planner checks them as it checks a CSV's columns of those names,
    every row's problems at once.
    """

    vars: dict[str, StrictStr | StrictInt | float | StrictBool | None] | None = Field(
        default=None,
        description="Values for the prompt's {{name}} variables; each becomes a column, as "
        "the other extra keys do (which {{name}} finds too).",
    )
    system: StrictStr | None = Field(
        default=None,
        description="The row's system prompt ({{name}} variables allowed); it wins over an "
        "assistant's.",
    )
    temperature: (
        Annotated[float, Field(ge=TEMPERATURE_RANGE[0], le=TEMPERATURE_RANGE[1])] | None
    ) = None
    max_tokens: Annotated[StrictInt, Field(ge=1, le=MAX_TOKENS_LIMIT)] | None = None
    top_p: Annotated[float, Field(ge=TOP_P_RANGE[0], le=TOP_P_RANGE[1])] | None = None
    stop: (
        Annotated[StrictStr, Field(min_length=1, max_length=MAX_STOP_CHARS)]
        | Annotated[
            list[Annotated[StrictStr, Field(min_length=1, max_length=MAX_STOP_CHARS)]],
            Field(min_length=1, max_length=MAX_STOP_SEQUENCES),
        ]
        | None
    ) = None
    seed: Annotated[StrictInt, Field(ge=SEED_RANGE[0], le=SEED_RANGE[1])] | None = None
    response_schema: dict[str, Any] | None = Field(
        default=None,
        description="The JSON Schema this row's answer must match; it wins over the batch's.",
    )


def _document_row_fields(schema: dict[str, Any]) -> None:
    schema["properties"].update(RowFields.model_json_schema()["properties"])


class ExecutionIn(BaseModel):
    """One execution of ``execute_batch``; keys besides these are kept as extra columns.

    The keys of ``RowFields`` are extra keys too, kept as columns (``stop`` and
    ``response_schema`` as JSON text), the way a CSV gives them, so that every
    input format plans (and a restart plans again) from cells; ``vars`` gives
    more columns.
    """

    model_config = ConfigDict(extra="allow", json_schema_extra=_document_row_fields)

    prompt: StrictStr
    model: StrictStr | None = None
    assistant: StrictStr | None = None

    @model_validator(mode="after")
    def _check_extra_cells(self) -> ExecutionIn:
        # While validating: a value nested just under the JSON parser's limit
        # raises RecursionError here, where the caller expects errors.
        if self.model_extra:
            _extra_cells(self.model_extra)
        return self

    def extra_cells(self) -> dict[str, Cell]:
        """Every cell besides ``prompt``, ``model`` and ``assistant``: text, numbers and
        booleans as they are; null empty; lists and objects as JSON text.

        Made again from the extra keys, not kept from the validation: a private
        attribute costs pydantic two thirds of the validation of the common
        execution, which has none (2.4 of 3.5 ms for 2,000).
        """
        return _extra_cells(self.model_extra) if self.model_extra else {}


def _extra_cells(extra: dict[str, Any]) -> dict[str, Cell]:
    """The cells of an execution's extra keys, ``vars`` spread; ``PydanticCustomError``
    for a ``vars`` that cannot be."""
    variables = extra.get("vars")
    # A vars that is no object is a column of that name, as any key was before vars.
    given = isinstance(variables, dict)
    cells = {key: _cell(value) for key, value in extra.items() if key != "vars" or not given}
    if isinstance(variables, dict):
        if not all(
            value is None or isinstance(value, str | int | float) for value in variables.values()
        ):
            raise PydanticCustomError(
                "vars", "vars must be an object of texts, numbers, booleans or nulls"
            )
        for name, value in variables.items():
            if name in cells or name in _ROW_FIELDS:
                raise PydanticCustomError(
                    "vars", f"vars: {name!r} is already a field of the execution"
                )
            cells[name] = _cell(value)
    return cells


#: Names a ``vars`` entry cannot take.
_ROW_FIELDS = frozenset({"prompt", "model", "assistant", "vars", *PARAMETER_COLUMNS})


def _cell(value: Any) -> Cell:
    if value is None:
        return ""
    if isinstance(value, str | int | float):  # bool is an int
        return value
    return json.dumps(value, ensure_ascii=False)


#: The description of the ``models`` field of every batch route (and form).
MODELS_FIELD = (
    "Models (or assistants) of the catalog to run every row on, side by side: one "
    "column group each in the outputs, and ${output.n} names row n's answer from the same "
    "model. Rows then name no model of their own. In a form: names separated by commas."
)
#: The description of the ``response_schema`` field of every batch route (and form).
RESPONSE_SCHEMA_FIELD = (
    "A JSON Schema every answer must match (a row's own response_schema wins over it): "
    "sent to the model natively where its provider takes one, checked on arrival, retried "
    "when it does not match. Its top-level properties become result.<name> columns. In a "
    "form: the schema as JSON text."
)
Models = Annotated[
    list[Annotated[StrictStr, Field(min_length=1, max_length=200)]],
    Field(min_length=1, max_length=MAX_MODELS, description=MODELS_FIELD),
]
ResponseSchema = Annotated[dict[str, Any], Field(description=RESPONSE_SCHEMA_FIELD)]
#: The description of the ``max_cost`` field of every batch route (and form).
MAX_COST_FIELD = (
    "The batch's budget, in the catalog's currency: once its rows' cost reaches it, no "
    "other row is sent, and those left end cancelled (budget reached). Without it, the "
    "server's DEFAULT_MAX_COST (else MAX_COST, the most any batch may set) applies."
)
#: The description of the ``cache`` field of every batch route (and form).
CACHE_FIELD = (
    "true: a request this key asked before (the same model, parameters and prompt as "
    "sent) is answered from the answer cache, marked cached and costing nothing; false "
    "bypasses the cache; without it, the model's cache setting, else CACHE_ANSWERS."
)
MaxCost = Annotated[
    float, Field(strict=True, ge=0, allow_inf_nan=False, description=MAX_COST_FIELD)
]

#: Where a batch's end is POSTed (``webhooks.py``).
CallbackUrl = Annotated[
    StrictStr,
    Field(
        max_length=MAX_URL_CHARS,
        description="Where the batch's end is POSTed, signed (see webhooks), if the server's "
        'CALLBACK_ALLOW allows it; without it, the server\'s CALLBACK_URL; "" for none.',
    ),
]


class ExecuteBatchRequest(BaseModel):
    """Body of ``POST /experience/batch_execution/execute_batch/invoke``.

    ``columns`` (optional, added to the original contract) is the order of the
    input's columns, a file's header, which the outputs keep; ``submit``
    sends it, so a file's batch has the columns ``run`` gives it. Without it
    the columns are ``prompt``, ``model`` (and ``assistant``), then the other
    keys as they first appear.

    ``callback_url`` (optional) is where the batch's end is POSTed, signed
    (``webhooks.py``), if the server allows it; without it, the server's
    ``CALLBACK_URL``; ``""`` for none.
    """

    executions: list[ExecutionIn]
    columns: list[StrictStr] | None = None
    callback_url: CallbackUrl | None = None
    models: Models | None = None
    response_schema: ResponseSchema | None = None
    max_cost: MaxCost | None = None
    cache: StrictBool | None = Field(default=None, description=CACHE_FIELD)

    @field_validator("columns")
    @classmethod
    def _distinct(cls, columns: list[str] | None) -> list[str] | None:
        if columns is not None:
            seen: set[str] = set()
            for name in columns:
                if name in seen:
                    raise PydanticCustomError("twice", f"{name!r} appears twice")
                seen.add(name)
        return columns


class ProcessCsvRequest(BaseModel):
    """Body of ``POST /system/batch_execution/process_csv/invoke``; ``callback_url`` as in
    ``ExecuteBatchRequest``, with ``execute``."""

    csv_content: StrictStr
    execute: StrictBool = False
    callback_url: CallbackUrl | None = None
    #: The model of the rows that name neither a model nor an assistant, as the upload
    #: route's ``model`` field (and the validate route's) has it.
    model: Annotated[StrictStr, Field(max_length=200)] | None = None
    models: Models | None = None
    response_schema: ResponseSchema | None = None
    max_cost: MaxCost | None = None
    cache: StrictBool | None = Field(default=None, description=CACHE_FIELD)


#: The description of the ``model`` field of the spreadsheet routes (here and in ``web.bodies``).
DEFAULT_MODEL_FIELD = (
    "The model (a name or alias of the catalog) the rows that name neither a model nor an "
    "assistant run on, instead of the server's ASSISTANTS_DEFAULT_MODEL_ID_OR_NAME; empty "
    "or left out for the server's. An unknown name is a 422 naming the field model."
)


class ValidateRequest(BaseModel):
    """JSON body of ``POST /system/batch_execution/validate``: a CSV to check, as
    ``process_csv`` reads it."""

    csv_content: StrictStr
    model: StrictStr | None = Field(default=None, description=DEFAULT_MODEL_FIELD)
    models: Models | None = None
    response_schema: ResponseSchema | None = None
    max_cost: MaxCost | None = None
    cache: StrictBool | None = Field(default=None, description=CACHE_FIELD)
    estimate: StrictBool = Field(
        default=False,
        description="true adds the estimated tokens and cost of the run to the answer.",
    )


class ValidateResponse(BaseModel):
    """Answer to ``validate``: the rows are ready to run (nothing was run or stored)."""

    rows: int = Field(description="How many rows would run.")
    columns: list[str] = Field(
        description="The input's columns the outputs keep, in the file's order."
    )
    models: list[str] = Field(
        description="The models the rows would run on (an assistant's model for its rows), "
        "each once, in the order the rows first name them."
    )
    message: str
    estimate: Estimate | None = Field(
        default=None,
        description="Asked for with estimate: the run's estimated tokens and cost, per model "
        "and in total. Absent otherwise.",
    )


class ResultsRequest(BaseModel):
    """Body of the results, cancel and retry routes: which batch.

    The id is ``invocation_id``, or ``invocationId`` as every answer spells
    it, so a client may send back the field it was given; both at once must
    agree.
    """

    invocation_id: Annotated[
        StrictStr,
        Field(
            min_length=1,
            max_length=200,
            validation_alias=AliasChoices("invocation_id", "invocationId"),
        ),
    ]

    @model_validator(mode="before")
    @classmethod
    def _one_id(cls, data: Any) -> Any:
        if (
            isinstance(data, dict)
            and "invocation_id" in data
            and "invocationId" in data
            and data["invocation_id"] != data["invocationId"]
        ):
            raise PydanticCustomError(
                "two_ids", "invocation_id and invocationId name different batches; send one"
            )
        return data


class RetryRequest(ResultsRequest):
    """Body of the retry route: which batch, and optionally the new batch's budget."""

    max_cost: MaxCost | None = Field(
        default=None,
        description="The new batch's budget (a batch stopped at its budget continues with "
        "a larger one); without it, the retried batch's own. It counts the cost of the "
        "rows kept from the retried batch too.",
    )


class ResultsQuery(ResultsRequest):
    """Body of the results route: which batch, and how much of it.

    ``since`` (a ``cursor`` of an earlier answer) asks only for the executions
    that ended after it, in the order they ended; ``progress_only`` for none.
    Either way ``csv_content`` is left out: it comes with the whole answer.
    """

    since: Annotated[StrictInt, Field(ge=0, le=2**53)] | None = None
    progress_only: StrictBool = False


class ListQuery(BaseModel):
    """Query of ``GET /system/batch_execution/batches``."""

    limit: Annotated[int, Field(ge=1, le=1000)] = 50
    status: BatchStatus | None = None


class Message(BaseModel):
    """One entry of ``response``."""

    message: str
    type: Literal["text"] = "text"


class InvokeResponse(BaseModel):
    """Answer to ``execute_batch``."""

    status: Literal["success"] = "success"
    invocationId: str  # the original contract's name
    response: list[Message]

    @classmethod
    def started(cls, batch_id: str) -> InvokeResponse:
        message = (
            f"Batch execution started. Use invocation ID {batch_id} "
            "to check status and retrieve results."
        )
        return cls(invocationId=batch_id, response=[Message(message=message)])


class RetryResponse(InvokeResponse):
    """Answer to the retry route: the new batch, and the one it retries."""

    retry_of: str
    rerun: list[int]

    @classmethod
    def retrying(cls, batch_id: str, original: Batch, rerun: list[int]) -> RetryResponse:
        total = len(original.executions)
        which = f"{len(rerun)} of {total} executions" if total > 1 else "the one execution"
        message = (
            f"Retrying {which} of {original.id}. "
            f"Use invocation ID {batch_id} to check status and retrieve results."
        )
        return cls(
            invocationId=batch_id,
            response=[Message(message=message)],
            retry_of=original.id,
            rerun=rerun,
        )


class ProcessCsvResponse(InvokeResponse):
    """Answer to ``process_csv``: also where its workbook is."""

    xlsx_path: str
    xlsx_url: str


class Progress(BaseModel):
    """How many executions are in each state; the counts add up to ``total``."""

    total: int
    succeeded: int
    failed: int
    skipped: int
    cancelled: int
    running: int
    pending: int

    @classmethod
    def of(cls, counts: Counter[ExecutionStatus] | None) -> Progress:
        """The progress of executions counted by state (none counted: all zero)."""
        return cls(**progress_counts(counts or Counter()))


class ExecutionOut(BaseModel):
    """One execution as the results route reports it."""

    index: int
    status: ExecutionStatus
    result: str | None
    error: str | None
    model: str
    latency_ms: int | None
    attempts: int
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cost: float | None = Field(
        default=None,
        description="What its calls cost, in usage.currency: the reported tokens at its "
        "model's prices; null when the model has no price or no usage was reported.",
    )
    cached: bool = Field(
        default=False, description="Answered from the answer cache, without a call."
    )

    @classmethod
    def of(cls, execution: Execution) -> ExecutionOut:
        return cls(
            index=execution.index,
            status=execution.status,
            result=execution.result,
            error=execution.error,
            model=execution.model,
            latency_ms=execution.latency_ms,
            attempts=execution.attempts,
            prompt_tokens=execution.prompt_tokens,
            completion_tokens=execution.completion_tokens,
            cost=execution.cost,
            cached=execution.cached,
        )


def execution_fields(execution: Execution) -> dict[str, Cell | None]:
    """``ExecutionOut.of(execution).model_dump(mode="json")``, made directly.

    The same fields and values at a tenth of the cost (1 µs a row, not 13):
    the results route lists 100,000 of them. ``ExecutionOut`` stays the
    schema; a test holds the two to the same answer.
    """
    return {
        "index": execution.index,
        "status": execution.status.value,
        "result": execution.result,
        "error": execution.error,
        "model": execution.model,
        "latency_ms": execution.latency_ms,
        "attempts": execution.attempts,
        "prompt_tokens": execution.prompt_tokens,
        "completion_tokens": execution.completion_tokens,
        "cost": execution.cost,
        "cached": execution.cached,
    }


class ModelUsage(BaseModel):
    """One model's share of a batch's usage."""

    prompt_tokens: int
    completion_tokens: int
    cost: float | None
    uncosted: int


class Usage(BaseModel):
    """Tokens summed over the executions whose provider reported them, and their cost."""

    prompt_tokens: int
    completion_tokens: int
    cost: float | None = Field(
        default=None,
        description="The cost of the executions that have one, in currency; null when none "
        "has (no model of the batch is priced).",
    )
    currency: str = "USD"
    uncosted: int = Field(
        default=0,
        description="Executions that were sent and have no cost (their model has no price, "
        "or its provider reported no usage): not counted in cost, rather than counted as 0.",
    )
    models: dict[str, ModelUsage] = Field(
        default_factory=dict, description="The same by model (an assistant's, its model's)."
    )


class ResultsResponse(BaseModel):
    """Answer to the results route."""

    status: BatchStatus
    invocationId: str  # the original contract's name
    message: str
    xlsx_url: str | None = None
    csv_content: str | None = None
    progress: Progress
    usage: Usage
    executions: list[ExecutionOut]
    #: Send it back as ``since`` to get only the executions that end from now on.
    cursor: int = 0
    models: list[str] = Field(
        default_factory=list,
        description="The models the batch runs every row on, side by side (execution "
        "(i - 1) * len(models) + k is row i on model k); empty when each row names its own.",
    )

    @classmethod
    def of(
        cls,
        batch: Batch,
        *,
        csv_content: str | None,
        executions: list[Execution],
        cursor: int,
        currency: str = DEFAULT_CURRENCY,
    ) -> ResultsResponse:
        """The answer for ``batch`` listing ``executions``; ``xlsx_url`` is the caller's."""
        prompt_tokens, completion_tokens = batch.tokens()
        cost, uncosted = batch.cost()
        by_model = {
            name: ModelUsage(
                prompt_tokens=prompt, completion_tokens=completion, cost=spent, uncosted=missing
            )
            for name, (spent, missing, prompt, completion) in batch.usage_by_model().items()
        }
        return cls(
            status=batch.status,
            invocationId=batch.id,
            message=batch.message,
            csv_content=csv_content,
            progress=Progress.of(batch.counts),
            usage=Usage(
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
                cost=cost,
                currency=currency,
                uncosted=uncosted,
                models=by_model,
            ),
            executions=[ExecutionOut.of(e) for e in executions],
            cursor=cursor,
            models=list(batch.options.models),
        )


class BatchSummary(BaseModel):
    """One batch in the list route."""

    invocationId: str  # the original contract's name
    status: BatchStatus
    message: str
    progress: Progress
    created_at: datetime
    finished_at: datetime | None
    retry_of: str | None
    cost: float | None = Field(
        default=None,
        description="What its rows cost, in the catalog's currency; null when none has a cost.",
    )

    @classmethod
    def of(cls, batch: Summary) -> BatchSummary:
        return cls(
            invocationId=batch.id,
            status=batch.status,
            message=batch.message,
            # The registry fills the counts the store does not keep.
            progress=Progress.of(batch.counts),
            created_at=_utc(batch.created_at),
            finished_at=_utc(batch.finished_at) if batch.finished_at else None,
            retry_of=batch.retry_of,
            cost=batch.cost,
        )


class BatchEndedWebhook(BaseModel):
    """The body of a completion webhook (``webhooks.py``): POSTed once a batch has ended."""

    type: Literal["batch.completed", "batch.failed", "batch.cancelled"]
    #: When this attempt was made.
    timestamp: datetime
    #: The batch as the list route shows it.
    data: BatchSummary

    @classmethod
    def of(cls, batch: Summary) -> BatchEndedWebhook:
        return cls(
            type=f"batch.{batch.status.value}",
            timestamp=datetime.now(UTC),
            data=BatchSummary.of(batch),
        )


class BatchList(BaseModel):
    """Answer to ``GET /system/batch_execution/batches``: newest first."""

    batches: list[BatchSummary]


class ModelOut(BaseModel):
    """One catalog model; never carries a secret."""

    name: str
    aliases: list[str]
    provider: str
    model_id: str
    description: str | None
    configured: bool

    @classmethod
    def of(cls, model: ModelSpec, *, configured: bool) -> ModelOut:
        return cls(
            name=model.name,
            aliases=list(model.aliases),
            provider=model.provider,
            model_id=model.wire_id,
            description=model.description,
            configured=configured,
        )


class AssistantOut(BaseModel):
    """One catalog assistant."""

    name: str
    aliases: list[str]
    model: str
    description: str | None
    configured: bool

    @classmethod
    def of(cls, assistant: AssistantSpec, model: ModelSpec, *, configured: bool) -> AssistantOut:
        return cls(
            name=assistant.name,
            aliases=list(assistant.aliases),
            model=model.name,
            description=assistant.description,
            configured=configured,
        )


class CatalogResponse(BaseModel):
    """Answer to ``GET /system/batch_execution/models``."""

    default_model: str
    models: list[ModelOut]
    assistants: list[AssistantOut]


def _utc(timestamp: float) -> datetime:
    return datetime.fromtimestamp(timestamp, tz=UTC)
