"""Log lines: plain text, or one JSON object a line (``LOG_FORMAT=json``), never showing a key.

A JSON line holds ``timestamp``, ``level``, ``logger`` and ``message``, the
``exception`` text when there is one, and ``batch_id`` and ``owner`` (the
fingerprint of the batch's API key, never the key) when known: given with
``extra={"batch_id": ..., "owner": ...}``, or bound to the task that logs
(``bind_batch``; the engine binds each batch's task, so what the executor
and the providers log while running its rows names it too).

Both formats mask the secrets they are given (the accepted API keys and the
providers' keys). The providers mask keys in their errors already
(``providers.http``); this is the net under that, for a line that quotes
something nobody thought to mask.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Literal

LogFormat = Literal["text", "json"]
#: What a secret is replaced with.
MASK = "***"
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# Context variables hold no state of their own: each task sees the values it
# (or the task that created it) set.
_batch_id: ContextVar[str | None] = ContextVar("batchexec_batch_id", default=None)
_owner: ContextVar[str | None] = ContextVar("batchexec_owner", default=None)


def bind_batch(batch_id: str, owner: str) -> None:
    """Name batch ``batch_id`` of ``owner`` (a key fingerprint) in every line the current
    task logs from now on, and the tasks it creates."""
    _batch_id.set(batch_id)
    _owner.set(owner)


def configure(log_format: LogFormat, secrets: Iterable[str] = ()) -> None:
    """Send the log lines of INFO and above to stderr as ``log_format``, ``secrets`` masked.

    Like ``logging.basicConfig``, it does nothing if the root logger has a handler already.
    """
    handler = logging.StreamHandler()
    handler.setFormatter(formatter(log_format, secrets))
    logging.basicConfig(level=logging.INFO, handlers=[handler])


def formatter(log_format: LogFormat, secrets: Iterable[str] = ()) -> logging.Formatter:
    """The formatter of ``log_format``, masking ``secrets``."""
    if log_format == "json":
        return JSONFormatter(secrets)
    return TextFormatter(secrets)


class _Masking(logging.Formatter):
    """A formatter that replaces each of its secrets with ``MASK``."""

    def __init__(self, secrets: Iterable[str] = (), fmt: str | None = None) -> None:
        super().__init__(fmt)
        # Longest first, so a key that contains another is masked whole.
        self._secrets = sorted({secret for secret in secrets if secret}, key=len, reverse=True)

    def mask(self, text: str) -> str:
        """``text`` with every secret replaced."""
        for secret in self._secrets:
            text = text.replace(secret, MASK)
        return text


class TextFormatter(_Masking):
    """``2025-01-31 12:00:00,123 WARNING batchexec.engine: message``, secrets masked."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__(secrets, TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        return self.mask(super().format(record))


class JSONFormatter(_Masking):
    """One JSON object a line; secrets masked in every text it holds."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "timestamp": datetime.fromtimestamp(record.created, UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": self.mask(record.getMessage()),
        }
        if hasattr(record, "batch_id"):  # given with the line: its owner too, if at all
            batch_id, owner = record.batch_id, getattr(record, "owner", None)
        else:
            batch_id, owner = _batch_id.get(), _owner.get()
        if batch_id:
            entry["batch_id"] = str(batch_id)
        if owner:
            entry["owner"] = str(owner)
        if record.exc_info:
            entry["exception"] = self.mask(self.formatException(record.exc_info))
        elif record.exc_text:
            entry["exception"] = self.mask(record.exc_text)
        if record.stack_info:
            entry["stack"] = self.mask(self.formatStack(record.stack_info))
        return json.dumps(entry, ensure_ascii=False)
