"""Bodies of the HTTP layer's own: the error envelope, health, the upload forms, events.

Every refusal is one of the envelope's models, made by
``middlewares.error_middleware``; the OpenAPI document describes them from
the same models. (The batch routes' bodies are in ``batchexec.schemas``.)
The events route writes its events' data from ``batchexec.events``, a row
at a time and without a model; ``ExecutionEvent`` and ``FinalEvent``
describe it, and the tests hold the two together.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from batchexec.errors import FieldError
from batchexec.records import BatchStatus, ExecutionStatus
from batchexec.schemas import (
    CACHE_FIELD,
    DEFAULT_MODEL_FIELD,
    MAX_COST_FIELD,
    MODELS_FIELD,
    RESPONSE_SCHEMA_FIELD,
)
from batchexec.webhook_urls import MAX_URL_CHARS


class ErrorResponse(BaseModel):
    """Every error: what went wrong, in a sentence."""

    detail: str


class FieldErrorOut(BaseModel):
    """One problem of a refused request."""

    index: int | None = Field(
        description="The 1-based execution, CSV line or sheet row; null when the problem "
        "is no one row's."
    )
    field: str | None = Field(description="The field or column at fault, when there is one.")
    message: str

    @classmethod
    def of(cls, error: FieldError) -> FieldErrorOut:
        return cls(index=error.index, field=error.field, message=error.message)


class InvalidResponse(ErrorResponse):
    """422: the request is invalid; each problem listed (nothing was stored or run)."""

    errors: list[FieldErrorOut]


class TemplateNotRunResponse(ErrorResponse):
    """404 for the id of a template workbook: ``detail`` says what the id is and how to
    run its rows."""

    xlsx_url: str = Field(description="Where the template workbook can be downloaded.")


class HealthResponse(BaseModel):
    """Answer to ``GET /health``."""

    status: Literal["ok"] = "ok"


class SpreadsheetForm(BaseModel):
    """What the validate and upload routes' multipart/form-data bodies share: a spreadsheet
    and the options of its batch.

    ``uploads`` reads the parts itself, a chunk at a time, with the same names
    and meanings.
    """

    file: bytes = Field(
        description="The spreadsheet: CSV (UTF-8, a BOM is fine) or XLSX, told by its "
        "content and its file name."
    )
    model: str | None = Field(default=None, description=DEFAULT_MODEL_FIELD)
    models: str | None = Field(default=None, description=MODELS_FIELD)
    response_schema: str | None = Field(default=None, description=RESPONSE_SCHEMA_FIELD)
    max_cost: float | None = Field(default=None, ge=0, description=MAX_COST_FIELD)
    cache: bool | None = Field(default=None, description=CACHE_FIELD)


class ValidateForm(SpreadsheetForm):
    """The multipart/form-data body of the validate route: a spreadsheet to check."""

    estimate: bool = Field(
        default=False,
        description="true (or 1) adds the estimated tokens and cost of the run to the answer.",
    )


class UploadForm(SpreadsheetForm):
    """The multipart/form-data body of the upload route: ``SpreadsheetForm``'s fields, and
    whether to run the rows."""

    execute: bool = Field(
        default=False,
        description="true (or 1) starts the batch; false, 0 or empty writes only the template.",
    )
    callback_url: str | None = Field(
        default=None,
        max_length=MAX_URL_CHARS,
        description="With execute: where the batch's end is POSTed, as in execute_batch.",
    )


class StartedEvent(BaseModel):
    """Data of a ``started`` event: a row has been sent to its model (on connecting, one for
    each row running then)."""

    index: int
    model: str
    attempts: int


class ExecutionEvent(BaseModel):
    """Data of an ``execution`` event: a row has ended."""

    index: int
    status: ExecutionStatus
    latency_ms: int | None
    error: str | None
    attempts: int
    cost: float | None = Field(
        default=None, description="What its calls cost, as the results route's cost."
    )
    cached: bool = Field(default=False, description="Answered from the answer cache.")


class FinalEvent(BaseModel):
    """Data of the last event: ``done`` (the batch has ended) or ``interrupted`` (the
    server stops first; the batch resumes when it starts again, so reconnect)."""

    status: BatchStatus
    message: str
    invocationId: str  # the original contract's name
    xlsx_url: str | None
    cost: float | None = Field(
        default=None, description="done only: the batch's cost, as the results route's usage."
    )
    uncosted: int | None = Field(
        default=None, description="done only: executions sent that have no cost."
    )
