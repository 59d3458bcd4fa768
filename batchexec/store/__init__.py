"""Where batches are kept: ``memory://`` or ``sqlite:///PATH``, chosen by ``DATABASE_URL``."""

from __future__ import annotations

from pathlib import Path

from batchexec.config import MEMORY_URL, SQLITE_URL_PREFIX, check_database_url
from batchexec.store.base import (
    BatchEnded,
    BatchStarted,
    BatchStore,
    Change,
    ExecutionEnded,
    ExecutionStarted,
    FileEntry,
    StoreError,
)

__all__ = [
    "BatchEnded",
    "BatchStarted",
    "BatchStore",
    "Change",
    "ExecutionEnded",
    "ExecutionStarted",
    "FileEntry",
    "StoreError",
    "store_for",
]


def store_for(url: str) -> BatchStore:
    """The store ``url`` names (a ``DATABASE_URL``); call ``open()`` before use."""
    from batchexec.store.memory import MemoryStore
    from batchexec.store.sqlite import SQLiteStore

    if check_database_url(url) == MEMORY_URL:
        return MemoryStore()
    return SQLiteStore(Path(url.removeprefix(SQLITE_URL_PREFIX)))
