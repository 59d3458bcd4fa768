"""Output files of the commands: checked before a run (written by ``batchexec.files``).

An output is refused, with one line saying why, before anything runs, when
it is not what a user would mean: a name whose extension is not the format
written there (``-o`` writes XLSX, ``--csv`` CSV), a folder that does not
exist (it is never made: a mistyped folder is a mistake, not a wish), a
folder or something else that is no file, a folder that cannot be written,
the input file itself, or the same file as another output.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Output:
    """A file a command is asked to write."""

    #: The option that names it, as the user typed it: ``-o``, ``--csv``.
    option: str
    path: Path
    #: The extension the file must have (lower-case, with its dot); None for any.
    suffix: str | None = None
    #: What is written there, for the message: ``an XLSX workbook``.
    what: str = "a file"


def _unwritable(path: Path) -> str | None:
    """Why ``path``, no folder, cannot be written, or None."""
    if path.exists() and not path.is_file():
        return "that is not a file; give the name of a file to write."
    folder = path.parent
    if not folder.is_dir():
        return f"the folder {folder} does not exist; create it first."
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"the folder {folder} is not writable."
    return None


def output_problem(outputs: Sequence[Output], input_path: str | None = None) -> str | None:
    """The first reason one of ``outputs`` is not a file to write, or None.

    ``input_path`` (None, or ``-`` for standard input, when there is no file)
    is the input, which no output may overwrite.
    """
    for position, output in enumerate(outputs):
        path = output.path
        where = f"{output.option} {path}"
        if path.is_dir():
            return f"{where}: that is a folder; give a file name."
        if output.suffix is not None and path.suffix.lower() != output.suffix:
            return (
                f"{where}: {output.option} writes {output.what}; "
                f"give a file name ending in {output.suffix}."
            )
        problem = _unwritable(path)
        if problem:
            return f"{where}: {problem}"
        if input_path is not None and input_path != "-" and _same_file(path, Path(input_path)):
            return f"{where}: that is the input file; write to another file."
        for earlier in outputs[:position]:
            if _same_file(path, earlier.path):
                return f"{where}: {earlier.option} names that file too; give each its own."
    return None


def _same_file(a: Path, b: Path) -> bool:
    """Whether ``a`` and ``b`` name one file (existing or not)."""
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        return False
    return a.resolve() == b.resolve()
