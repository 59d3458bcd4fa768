"""Request and response bodies of the HTTP API.

Field names of the original Batch Execution Integration (``invocationId``,
``csv_content``, ``xlsx_path``, ``xlsx_url``) are part of its contract and kept
as they were; fields added since are snake_case.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    StrictBool,
    StrictStr,
    model_validator,
)

from batchexec.records import BatchStatus, ExecutionStatus


class ExecutionIn(BaseModel):
    """One execution of ``execute_batch``; keys besides these are kept as extra columns."""

    model_config = ConfigDict(extra="allow")

    prompt: StrictStr
    model: StrictStr | None = None
    assistant: StrictStr | None = None
    _cells: dict[str, str] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _write_extra_cells(self) -> ExecutionIn:
        # Once, while validating: a value nested just under the JSON parser's
        # limit raises RecursionError here, where the caller expects errors.
        self._cells = {key: _cell(value) for key, value in (self.model_extra or {}).items()}
        return self

    def extra_cells(self) -> dict[str, str]:
        """Extra keys as text cells: scalars as they read, lists and objects as JSON."""
        return self._cells


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)


class ExecuteBatchRequest(BaseModel):
    """Body of ``POST /experience/batch_execution/execute_batch/invoke``."""

    executions: list[ExecutionIn]


class ProcessCsvRequest(BaseModel):
    """Body of ``POST /system/batch_execution/process_csv/invoke``."""

    csv_content: StrictStr
    execute: StrictBool = False


class ResultsRequest(BaseModel):
    """Body of the results, cancel and retry routes: which batch."""

    invocation_id: Annotated[StrictStr, Field(min_length=1, max_length=200)]


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


class RetryResponse(InvokeResponse):
    """Answer to the retry route: the new batch, and the one it retries."""

    retry_of: str
    rerun: list[int]


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


class Usage(BaseModel):
    """Tokens summed over the executions whose provider reported them."""

    prompt_tokens: int
    completion_tokens: int


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


class BatchSummary(BaseModel):
    """One batch in the list route."""

    invocationId: str  # the original contract's name
    status: BatchStatus
    message: str
    progress: Progress
    created_at: datetime
    finished_at: datetime | None
    retry_of: str | None


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


class AssistantOut(BaseModel):
    """One catalog assistant."""

    name: str
    aliases: list[str]
    model: str
    description: str | None
    configured: bool


class CatalogResponse(BaseModel):
    """Answer to ``GET /system/batch_execution/models``."""

    default_model: str
    models: list[ModelOut]
    assistants: list[AssistantOut]
