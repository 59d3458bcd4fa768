"""Output files of the commands: checked before a run (written by ``batchexec.files``)."""

from __future__ import annotations

import os
from pathlib import Path


def unwritable(path: Path) -> str | None:
    """Why ``path`` cannot be written, or None; checked before a long run rather than after."""
    if path.is_dir():
        return f"{path} is a folder; give a file name."
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"cannot write {path}: {folder} is not writable."
    return None
