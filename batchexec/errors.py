"""The project's exception tree.

Foreign errors (aiohttp, pydantic, csv, provider wire errors) are mapped to
these classes at the module boundary where they occur and raised ``from`` the
original, so the rest of the code and the HTTP layer only ever see these.
"""

from __future__ import annotations

from dataclasses import dataclass


class BatchexecError(Exception):
    """Base class of every error batchexec raises on purpose."""


class ConfigError(BatchexecError):
    """A setting or the model catalog is invalid; the message names the culprit."""


@dataclass(frozen=True)
class FieldError:
    """One problem with one row of a submitted batch."""

    index: int | None
    field: str | None
    message: str


class InputError(BatchexecError):
    """A submitted batch is invalid; carries one entry per problem found."""

    def __init__(self, detail: str, errors: list[FieldError] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.errors = errors or []


class QueueFullError(BatchexecError):
    """No room for another batch or workbook; the client should try again later."""

    def __init__(self, message: str, *, retry_after_s: float = 5.0) -> None:
        super().__init__(message)
        #: When trying again may succeed.
        self.retry_after_s = retry_after_s


class StorageError(BatchexecError):
    """The server could not write a file it needs (a full or read-only disk)."""


class ShuttingDownError(BatchexecError):
    """The server is stopping and accepts no new batches."""

    #: When to try again: another replica, or the restart, should answer by then.
    retry_after_s = 5.0


class ConflictError(BatchexecError):
    """The batch is not in a state that allows this (cancel a finished batch, ...)."""


class NotFoundError(BatchexecError):
    """The batch or file does not exist, or belongs to another key."""


class TemplateNotRunError(NotFoundError):
    """The id names a template workbook (rows written, never run): no batch to answer for."""

    def __init__(self, message: str, *, xlsx_url: str) -> None:
        super().__init__(message)
        #: Where the template workbook can be downloaded.
        self.xlsx_url = xlsx_url


class ProviderError(BatchexecError):
    """A model provider could not give an answer.

    ``status`` is the provider's HTTP status when there was one. Subclasses say
    whether trying again may help.
    """

    retryable = False

    def __init__(
        self, message: str, *, status: int | None = None, retry_after_s: float | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.retry_after_s = retry_after_s

    def __str__(self) -> str:
        if self.status is None:
            return self.message
        return f"{self.message} (HTTP {self.status})"


class RetryableProviderError(ProviderError):
    """Rate limits, overload, server errors, dropped connections: worth another try."""

    retryable = True


class InvalidAnswerError(RetryableProviderError):
    """An answer that is not the JSON its request's schema asks for; another answer may be.

    It is asked for at once (``retry_after_s`` 0): no server needs time to recover.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message, retry_after_s=0.0)


class FatalProviderError(ProviderError):
    """Bad request, bad credentials, unknown model, refused content: retrying won't help."""


class ProviderNotConfiguredError(FatalProviderError):
    """The provider a model needs has no credentials or address configured."""
