"""The INPUT argument: a file, or ``-`` for standard input, read into rows; its problems shown."""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, TextIO

from batchexec.errors import FieldError, InputError
from batchexec.inputs import Format, Rows, format_of, read_rows, sniff
from batchexec.planning import BatchPlan
from batchexec.providers import Provider
from batchexec.readiness import unready

#: The INPUT that means standard input.
STDIN = "-"
INPUT_HELP = (
    "CSV, JSON, JSONL or XLSX file, told apart by its extension; "
    "'-' reads standard input and tells the format from the content"
)
#: The setting that bounds what a limit error is about, by the error's field.
_LIMIT_SETTINGS = {"executions": "MAX_EXECUTIONS_PER_BATCH", "prompt": "MAX_PROMPT_LENGTH"}
#: The option a batch-wide error is about, by the error's field.
_OPTIONS = {"models": "--models", "response_schema": "--schema"}


@dataclass(frozen=True)
class Source:
    """An INPUT read into rows."""

    #: How messages name it: its path, or ``<stdin>``.
    label: str
    fmt: Format
    rows: Rows


def label_of(path: str) -> str:
    """How messages name the INPUT ``path``."""
    return "<stdin>" if path == STDIN else path


def read_source(path: str, *, max_rows: int | None, stdin: BinaryIO | None = None) -> Source:
    """Read and parse INPUT; ``InputError`` names the line or row of the first unreadable one."""
    if path == STDIN:
        data = (stdin or sys.stdin.buffer).read()
        fmt = sniff(data)
    else:
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise InputError(f"cannot read it: {exc.strerror or exc}.") from exc
        fmt = format_of(path) or sniff(data)
    return Source(label_of(path), fmt, read_rows(data, fmt, max_rows=max_rows))


def print_problems(exc: InputError, label: str, rows: Rows | None, stream: TextIO) -> None:
    """Every problem of ``exc``, each row's named by where it is in the input; a problem
    with ``--models`` or ``--schema`` by that option."""
    if exc.errors and all(_OPTIONS.get(e.field or "") and e.index is None for e in exc.errors):
        for error in exc.errors:
            print(f"batchexec: {_OPTIONS[error.field or '']}: {error.message}", file=stream)
        return
    batch_wide = next((e for e in exc.errors if e.message == exc.detail), None)
    detail = exc.detail + (_hint(batch_wide) if batch_wide else "")
    print(f"batchexec: {label}: {detail}", file=stream)
    if rows is None:
        return
    for error in exc.errors:
        if error is not batch_wide:
            print(f"  {rows.describe(error)}{_hint(error)}", file=stream)


def execution_place(rows: Rows, index: object, models: Sequence[str] = ()) -> str:
    """Where execution ``index`` came from: ``line 3``; side by side, with the model it ran
    on: ``line 3 [m-b]`` (execution ``(i - 1) * len(models) + k`` is row i on model k)."""
    if not isinstance(index, int) or isinstance(index, bool) or index < 1:
        return f"execution {index}"
    if not models:
        return rows.place(index) or f"execution {index}"
    row, model = divmod(index - 1, len(models))
    return f"{rows.place(row + 1) or f'row {row + 1}'} [{models[model]}]"


def warn_unconfigured(
    plan: BatchPlan, providers: Mapping[str, Provider], rows: Rows, stream: TextIO
) -> None:
    """Warn of each model the plan names that cannot be called as configured.

    ``validate``'s words for what ``run`` (``readiness.require_ready``) refuses.
    """
    for group in unready(plan, providers):
        print(f"batchexec: warning: {group.describe(rows)}", file=stream)


def _hint(error: FieldError) -> str:
    """The setting to raise, for an error about a limit."""
    setting = _LIMIT_SETTINGS.get(error.field or "")
    if setting and "the limit is" in error.message:
        return f" (set by {setting})"
    return ""
