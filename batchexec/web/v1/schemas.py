"""The OpenAI objects ``/v1`` answers with, their field names and values as OpenAI's.

Taken from the types the official ``openai`` client parses
(``openai/types/file_object.py``, ``batch.py``): a client reading these never
meets a field it does not know or misses one it needs.
"""

from __future__ import annotations

from typing import Annotated, Generic, Literal, TypeVar

from pydantic import BaseModel, Field

from batchexec.store import StoredFile

_Item = TypeVar("_Item", bound=BaseModel)
#: What an id sent by a client may hold: every id batchexec makes is printable ASCII.
Id = Annotated[str, Field(max_length=100, pattern=r"^[\x21-\x7e]+$")]


class ErrorBody(BaseModel):
    """What went wrong: OpenAI's ``error`` object."""

    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorEnvelope(BaseModel):
    """Every ``/v1`` error answer."""

    error: ErrorBody


class FileObject(BaseModel):
    """A file in ``/v1/files``."""

    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: Literal["batch", "batch_output"]
    #: OpenAI's (deprecated) status: a stored file is always ``processed``.
    status: Literal["processed"] = "processed"
    expires_at: int | None
    status_details: None = None

    @classmethod
    def of(cls, file: StoredFile, ttl_s: float) -> FileObject:
        return cls(
            id=file.id,
            bytes=file.bytes,
            created_at=int(file.created_at),
            filename=file.filename,
            purpose=file.purpose,
            expires_at=int(file.created_at + ttl_s),
        )


class V1FileForm(BaseModel):
    """The multipart/form-data body of ``POST /v1/files``."""

    file: bytes = Field(description="The JSONL file of requests, at most MAX_FILE_BYTES.")
    purpose: Literal["batch"] = Field(description="What the file is for: batch input.")


class FileDeleted(BaseModel):
    """Answer to ``DELETE /v1/files/{id}``."""

    id: str
    object: Literal["file"] = "file"
    deleted: bool = True


class Page(BaseModel, Generic[_Item]):
    """A page of a list route: ``after`` the last id for the next one while ``has_more``."""

    object: Literal["list"] = "list"
    data: list[_Item]
    first_id: str | None
    last_id: str | None
    has_more: bool

    @classmethod
    def of(cls, items: list[_Item], *, limit: int, ids: list[str]) -> Page[_Item]:
        """The page of the first ``limit`` of ``items`` (fetched one more, to know of more)."""
        shown = ids[:limit]
        return cls(
            data=items[:limit],
            first_id=shown[0] if shown else None,
            last_id=shown[-1] if shown else None,
            has_more=len(items) > limit,
        )


class FilesQuery(BaseModel):
    """The query string of ``GET /v1/files``."""

    purpose: Literal["batch", "batch_output"] | None = None
    limit: Annotated[int, Field(ge=1, le=10_000)] = 10_000
    order: Literal["asc", "desc"] = "desc"
    after: Id | None = None


class BatchCreate(BaseModel):
    """The body of ``POST /v1/batches``."""

    input_file_id: Id
    endpoint: Literal["/v1/chat/completions"]
    completion_window: Literal["24h"]
    metadata: (
        Annotated[
            dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]],
            Field(max_length=16),
        ]
        | None
    ) = None
    #: OpenAI's option for when output files expire; batchexec keeps them RESULTS_TTL_HOURS.
    output_expires_after: dict[str, object] | None = None


class BatchError(BaseModel):
    """One problem of a batch's input file."""

    code: str | None
    line: int | None
    message: str | None
    param: str | None


class BatchErrors(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchError]


class RequestCounts(BaseModel):
    completed: int
    failed: int
    total: int


BatchState = Literal[
    "validating",
    "failed",
    "in_progress",
    "finalizing",
    "completed",
    "expired",
    "cancelling",
    "cancelled",
]


class BatchObject(BaseModel):
    """A batch of ``/v1/batches``, as OpenAI's ``Batch``."""

    id: str
    object: Literal["batch"] = "batch"
    endpoint: str
    errors: BatchErrors | None
    input_file_id: str
    completion_window: str
    status: BatchState
    output_file_id: str | None
    error_file_id: str | None
    created_at: int
    in_progress_at: int | None
    expires_at: int | None
    finalizing_at: int | None
    completed_at: int | None
    failed_at: int | None
    expired_at: int | None
    cancelling_at: int | None
    cancelled_at: int | None
    request_counts: RequestCounts
    metadata: dict[str, str] | None


class BatchesQuery(BaseModel):
    """The query string of ``GET /v1/batches``."""

    limit: Annotated[int, Field(ge=1, le=100)] = 20
    after: Id | None = None
