"""Files written whole or not at all: one atomic-write helper for every output."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; renamed to ``path`` when the block ends.

    Its own steps are a few file-system calls; what the block writes should
    be written off the event loop (a worker thread, or aiofiles). If the block
    raises, the temporary file is removed and ``path`` is left as it was, so
    a reader never sees half a file. The file is made readable by all, as an
    ordinary output is (``mkstemp`` makes it private).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=".tmp-", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    temporary = Path(name)
    try:
        yield temporary
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through ``atomic_path``."""
    with atomic_path(path) as temporary:
        temporary.write_bytes(data)
