"""Where batches are kept: ``memory://``, ``sqlite:///PATH`` or ``postgresql://...``.

``DATABASE_URL`` chooses; ``store_for`` makes the store it names. The
interface every store implements (``base.py``) is this package's too.
"""

from __future__ import annotations

from pathlib import Path

from batchexec.config import (
    MEMORY_URL,
    POSTGRES_URL_PREFIXES,
    SQLITE_URL_PREFIX,
    check_database_url,
)
from batchexec.store import base
from batchexec.store.base import *  # noqa: F403  (the interface, named once in base.__all__)

__all__ = ["store_for"]
__all__ += base.__all__


def store_for(url: str, *, replica: str = "", pool_size: int = 10) -> base.BatchStore:
    """The store ``url`` names (a ``DATABASE_URL``); call ``open()`` before use.

    ``replica`` names this process in a PostgreSQL store's leases, which keeps
    ``pool_size`` connections.
    """
    from batchexec.store.memory import MemoryStore
    from batchexec.store.sqlite import SQLiteStore

    if check_database_url(url) == MEMORY_URL:
        return MemoryStore()
    if url.startswith(POSTGRES_URL_PREFIXES):
        from batchexec.store.postgres import PostgresStore

        return PostgresStore(url, replica=replica, pool_size=pool_size)
    return SQLiteStore(Path(url.removeprefix(SQLITE_URL_PREFIX)))
