"""The schema's versions: numbered SQL files, one folder a database, applied in order.

``sql/<dialect>/0001_initial.sql``, ``0002_...``: a database records the last
version applied, and a store applies the files after it when it opens. The
same numbers mean the same schema in every dialect.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources

_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


@dataclass(frozen=True)
class Migration:
    """One schema version and the SQL that makes it."""

    version: int
    name: str
    sql: str


def migrations(dialect: str) -> list[Migration]:
    """Every migration of ``dialect`` (``sqlite``, ``postgresql``), by version."""
    folder = resources.files("batchexec.store") / "sql" / dialect
    found = []
    for entry in folder.iterdir():
        match = _NAME.match(entry.name)
        if match:
            found.append(Migration(int(match.group(1)), entry.name, entry.read_text("utf-8")))
    found.sort(key=lambda migration: migration.version)
    versions = [migration.version for migration in found]
    if versions != list(range(1, len(found) + 1)):
        raise RuntimeError(f"{dialect} migrations are not numbered 1, 2, ...: {versions}")
    return found


def latest(dialect: str) -> int:
    """The schema version this batchexec writes."""
    return len(migrations(dialect))
