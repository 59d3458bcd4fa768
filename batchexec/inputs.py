"""Input files to rows: CSV, JSON, JSONL and XLSX, each row named by where it came from.

Every format ends as ``Rows``: the input columns, one ``RowInput`` per
execution, and each row's place in its file (``line 3`` of a CSV or JSONL,
``row 3`` of a sheet, ``execution 3`` of a JSON document), so that a problem
can be reported where the user will look for it.
"""

from __future__ import annotations

import gc
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import PurePath
from typing import Any

from pydantic import ValidationError

from batchexec.catalog import Catalog
from batchexec.columns import Cell, cell_text
from batchexec.csvinput import Table, parse_csv
from batchexec.errors import FieldError, InputError
from batchexec.planning import (
    NO_BATCH_OPTIONS,
    BatchOptions,
    BatchPlan,
    Limits,
    RowInput,
    plan_batch,
)
from batchexec.schemas import ExecutionIn
from batchexec.wording import counted
from batchexec.xlsxinput import read_sheet


class Format(StrEnum):
    """An input format."""

    #: The original integration's columns: ``prompt``, optional ``model``, ``assistant``, more.
    CSV = "csv"
    #: ``{"executions": [...]}``, the body of ``execute_batch``.
    JSON = "json"
    #: One execution object a line.
    JSONL = "jsonl"
    #: A workbook's ``Results`` sheet, else its first sheet.
    XLSX = "xlsx"


_EXTENSIONS = {
    ".csv": Format.CSV,
    ".json": Format.JSON,
    ".jsonl": Format.JSONL,
    ".ndjson": Format.JSONL,
    ".xlsx": Format.XLSX,
    ".xlsm": Format.XLSX,
}
#: Every XLSX workbook is a zip archive, and starts as one.
ZIP_MAGIC = b"PK\x03\x04"
#: Excel 97-2003 ``.xls`` files are OLE2 compound documents.
_OLE2_MAGIC = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"
#: Why ``json.loads`` raises a ValueError that is no JSONDecodeError: Python
#: refuses to read integers longer than this.
TOO_MANY_DIGITS = "a number has more than 4300 digits"


@dataclass(frozen=True)
class Rows:
    """Rows read from an input, with each one's place in it."""

    columns: tuple[str, ...]
    rows: tuple[RowInput, ...]
    #: Where each row came from: ``line 3``, ``row 3``, ``execution 3``.
    places: tuple[str, ...]
    #: Rows that could not be read at all; their entries in ``rows`` are placeholders.
    problems: tuple[FieldError, ...] = ()

    @classmethod
    def of(cls, columns: Sequence[str], rows: Sequence[RowInput]) -> Rows:
        """``rows`` under ``columns``, each placed as ``execution N``."""
        places = tuple(f"execution {number}" for number in range(1, len(rows) + 1))
        return cls(tuple(columns), tuple(rows), places)

    def place(self, index: int | None) -> str | None:
        """Where execution ``index`` (1-based) came from; None for a batch-wide problem."""
        if index is None or not 1 <= index <= len(self.places):
            return None
        return self.places[index - 1]

    def places_of(self, indexes: Iterable[int], *, most: int = 10) -> str:
        """Where executions ``indexes`` (1-based) came from, compactly: ``lines 2-4, 8``.

        Consecutive places are joined into a range; past ``most`` ranges the
        rest are counted (``... and 40 more``). Every place of one input is of
        one kind (line, row or execution).
        """
        kind = "execution"
        numbers: list[int] = []
        for index in sorted(set(indexes)):
            kind, _, digits = (self.place(index) or f"execution {index}").rpartition(" ")
            numbers.append(int(digits))
        ranges: list[list[int]] = []
        for number in numbers:
            if ranges and ranges[-1][1] == number - 1:
                ranges[-1][1] = number
            else:
                ranges.append([number, number])
        shown = ", ".join(
            f"{first}-{last}" if last > first else str(first) for first, last in ranges[:most]
        )
        rest = sum(last - first + 1 for first, last in ranges[most:])
        noun = kind if len(numbers) == 1 else f"{kind}s"
        return f"{noun} {shown}" + (f" and {rest} more" if rest else "")

    def located(self, error: FieldError) -> FieldError:
        """``error`` with its message starting with its row's place, as the HTTP API reports it."""
        place = self.place(error.index)
        return replace(error, message=f"{place}: {error.message}") if place else error

    def check_readable(self) -> None:
        """Raise ``InputError`` listing the rows that could not be read, if there are any."""
        if self.problems:
            raise _invalid(list(self.problems), "")

    def describe(self, error: FieldError) -> str:
        """``error`` as one line for a person: place, field, message."""
        parts = [self.place(error.index), error.field, error.message]
        return ": ".join(part for part in parts if part)


def format_of(name: str) -> Format | None:
    """The format a file name's extension names, case-insensitively; None when it names none."""
    return _EXTENSIONS.get(PurePath(name).suffix.lower())


def sniff(data: bytes) -> Format:
    """The format of content with no telling name: XLSX, a JSON object, JSONL lines, else CSV."""
    if data.startswith(ZIP_MAGIC):
        return Format.XLSX
    _refuse_xls(data)
    text = data.decode("utf-8", errors="replace").removeprefix("\ufeff").lstrip()
    if text.startswith("["):
        return Format.JSON  # read as JSON, which says what it expects instead
    if not text.startswith("{"):
        return Format.CSV
    try:
        document = json.loads(text)
    except RecursionError:
        return Format.JSON  # read as JSON, which says what is wrong with it
    except ValueError:
        # Several objects, one a line, do not parse as one document; but when
        # not even the first line does, it is one document with a mistake in it.
        first_line = text.split("\n", 1)[0]
        try:
            json.loads(first_line)
        except (ValueError, RecursionError):
            return Format.JSON
        return Format.JSONL
    return Format.JSON if isinstance(document, dict) and "executions" in document else Format.JSONL


def read_rows(
    data: bytes,
    fmt: Format,
    *,
    max_rows: int | None = None,
    max_field_chars: int | None = None,
    max_columns: int | None = None,
    max_cells: int | None = None,
    timeout_s: float | None = None,
) -> Rows:
    """Rows of ``data`` read as ``fmt``; raises ``InputError`` naming the line or row.

    ``max_rows`` stops reading a sheet early; ``max_field_chars`` bounds a CSV
    field (by default, the whole text may be one field); ``max_columns``,
    ``max_cells`` and ``timeout_s`` bound reading a sheet, as ``parse_xlsx`` says.
    """
    if fmt is Format.XLSX:
        return parse_xlsx(
            data,
            max_rows=max_rows,
            max_columns=max_columns,
            max_cells=max_cells,
            timeout_s=timeout_s,
        )
    text = decode(data, fmt)
    if fmt is Format.JSON:
        return parse_json(text)
    if fmt is Format.JSONL:
        return parse_jsonl(text)
    return from_table(parse_csv(text, max_field_chars=max_field_chars or max(len(text), 1)))


def decode(data: bytes, fmt: Format) -> str:
    """``data`` as UTF-8 text without a byte order mark; ``InputError`` naming the bad byte."""
    if fmt is not Format.XLSX:
        _refuse_xls(data)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(
            f"The {fmt.value.upper()} is not UTF-8 text: byte {exc.start + 1} cannot be read. "
            "Save it as UTF-8."
        ) from exc


def from_table(table: Table, *, place: str = "line") -> Rows:
    """Rows of a parsed CSV (placed at the line each starts on) or sheet (``place="row"``)."""
    return Rows(
        columns=table.columns,
        rows=tuple(_row_of(cells) for cells in table.rows),
        places=tuple(f"{place} {line}" for line in table.lines),
    )


def parse_json(text: str) -> Rows:
    """Rows of a ``{"executions": [...]}`` document; each execution is checked on its own."""
    try:
        document: Any = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"JSON line {exc.lineno}, column {exc.colno}: {exc.msg}.") from exc
    except ValueError as exc:
        raise InputError(f"The JSON cannot be read: {TOO_MANY_DIGITS}.") from exc
    except RecursionError:
        raise InputError("The JSON is nested too deeply.") from None
    if not isinstance(document, dict) or not isinstance(document.get("executions"), list):
        raise InputError(
            'The JSON must be an object with an "executions" list: '
            '{"executions": [{"prompt": "...", "model": "..."}, ...]}.'
        )
    items: list[Any] = document["executions"]
    return _from_items(items, [f"execution {number}" for number in range(1, len(items) + 1)])


def parse_jsonl(text: str) -> Rows:
    """Rows of JSON Lines text, one execution object a line; blank lines are skipped."""
    items: list[Any] = []
    places: list[str] = []
    # Not splitlines(): JSON strings may hold U+2028 and other separators it splits on.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            items.append(json.loads(line))
        except json.JSONDecodeError as exc:
            items.append(_Unreadable(f"not valid JSON: {exc.msg} at column {exc.colno}"))
        except ValueError:
            items.append(_Unreadable(f"cannot be read: {TOO_MANY_DIGITS}"))
        except RecursionError:
            items.append(_Unreadable("nested too deeply"))
        places.append(f"line {number}")
    return _from_items(items, places)


def parse_xlsx(
    data: bytes,
    *,
    max_rows: int | None = None,
    max_unzipped_bytes: int | None = None,
    max_columns: int | None = None,
    max_cells: int | None = None,
    timeout_s: float | None = None,
) -> Rows:
    """Rows of a workbook's ``Results`` sheet, else its first, each placed at its sheet row.

    The bounds are ``xlsxinput.read_sheet``'s.
    """
    table = read_sheet(
        data,
        max_rows=max_rows,
        max_unzipped_bytes=max_unzipped_bytes,
        max_columns=max_columns,
        max_cells=max_cells,
        timeout_s=timeout_s,
    )
    return from_table(table, place="row")


def from_executions(
    executions: Sequence[ExecutionIn | None],
    columns: Sequence[str] | None = None,
    *,
    consume: bool = False,
) -> Rows:
    """Rows of ``execute_batch`` executions: extra keys become extra columns.

    Without ``columns`` they are ``prompt``, ``model``, ``assistant`` (if any
    execution names one), then the other keys as they first appear. With
    ``columns`` (the input's own, in its order) the rows keep that order,
    and only what it leaves out follows: ``prompt``, and ``model`` or
    ``assistant`` where an execution names one, then the other keys. A None
    entry (an execution that could not be read) becomes a placeholder row.

    With ``consume``, each entry of ``executions`` (a list) is dropped as its
    row is made: a large batch then never holds both whole (an ``ExecutionIn``
    is about 800 bytes, twice its row). The two young generations of the
    cyclic collector are then collected every ``_COLLECT_EVERY_ROWS`` rows: CPython
    counts allocations net of frees, so making a row while freeing an
    execution leaves the count where it was and the collector never starts,
    until one collection walks all 100,000 new rows at once (20 ms holding the
    interpreter lock, which the event loop waits for; 1 ms at a time so). The
    middle generation too, which these collections fill and nothing else
    would empty.
    """
    if columns is None:
        names = ["prompt", "model"]
        if any(execution and execution.assistant for execution in executions):
            names.append("assistant")
    else:
        names = list(columns)
        if "prompt" not in names:
            names.insert(0, "prompt")
        for known in ("model", "assistant"):
            if known not in names and any(
                execution and getattr(execution, known) for execution in executions
            ):
                names.append(known)
    rows: list[RowInput] = []
    drop = executions if consume and isinstance(executions, list) else None
    for position, execution in enumerate(executions):
        if drop is not None:
            drop[position] = None
            if position % _COLLECT_EVERY_ROWS == _COLLECT_EVERY_ROWS - 1:
                gc.collect(1)
        if execution is None:
            rows.append(_PLACEHOLDER)
            continue
        extra = execution.extra_cells()
        names += [name for name in extra if name not in names]
        cells = {"prompt": execution.prompt, "model": execution.model or ""}
        cells["assistant"] = execution.assistant or ""
        rows.append(
            RowInput(
                prompt=execution.prompt,
                model=execution.model,
                assistant=execution.assistant,
                cells={**extra, **cells},
            )
        )
    return Rows.of(names, rows)


#: Rows ``from_executions`` makes, consuming, between two collections of the young
#: generations: about 1 ms each.
_COLLECT_EVERY_ROWS = 5_000


def plan_rows(
    rows: Rows, catalog: Catalog, limits: Limits, options: BatchOptions = NO_BATCH_OPTIONS
) -> BatchPlan:
    """The one way from rows to a plan, for every input: the HTTP routes, the command line.

    Validates ``rows`` as the server does; ``InputError`` lists every problem,
    rows unread too.
    """
    try:
        plan = plan_batch(list(rows.rows), list(rows.columns), catalog, limits, options)
    except InputError as exc:
        if not rows.problems:
            raise
        unread = {problem.index for problem in rows.problems}
        errors = [*rows.problems, *(e for e in exc.errors if e.index not in unread)]
        raise _invalid(errors, exc.detail) from None
    if rows.problems:
        raise _invalid(list(rows.problems), "")
    return plan


@dataclass(frozen=True)
class _Unreadable:
    """A JSONL line that is not JSON, kept in place so later lines keep their numbers."""

    message: str


#: Stands in for an execution that could not be read, so the others keep their numbers.
_PLACEHOLDER = RowInput(prompt="(unreadable)")


def _row_of(cells: Mapping[str, Cell]) -> RowInput:
    # The readers give prompt, model and assistant as text; the others may be numbers.
    def text(column: str) -> str | None:
        cell = cells.get(column)
        return None if cell is None else cell_text(cell)

    return RowInput(
        prompt=text("prompt") or "",
        model=text("model"),
        assistant=text("assistant"),
        cells=cells,
    )


def _from_items(items: Sequence[Any], places: Sequence[str]) -> Rows:
    """Rows of JSON values, each validated as the server validates an execution."""
    executions: list[ExecutionIn | None] = []
    problems: list[FieldError] = []
    for index, item in enumerate(items, start=1):
        execution: ExecutionIn | None = None
        if isinstance(item, _Unreadable):
            problems.append(FieldError(index, None, item.message))
        elif not isinstance(item, dict):
            problems.append(FieldError(index, None, 'must be an object: {"prompt": "..."}'))
        else:
            try:
                execution = ExecutionIn.model_validate(item)
            except ValidationError as exc:
                problems.extend(_field_errors(index, exc))
            except RecursionError:
                # Extra values are written back as JSON cells: one nested just
                # under the parser's limit can be read but not written.
                problems.append(FieldError(index, None, "nested too deeply"))
        executions.append(execution)
    return replace(from_executions(executions), places=tuple(places), problems=tuple(problems))


def _field_errors(index: int, exc: ValidationError) -> Iterable[FieldError]:
    for error in exc.errors(include_url=False):
        field = ".".join(str(part) for part in error["loc"]) or None
        yield FieldError(index, field, error["msg"])


def _invalid(errors: list[FieldError], detail: str) -> InputError:
    """One error listing ``errors`` by row; a batch-wide problem keeps ``detail``."""
    errors.sort(key=lambda error: error.index or 0)
    if all(error.index is not None for error in errors):
        count = len({error.index for error in errors})
        detail = f"{counted(count, 'execution')} {'is' if count == 1 else 'are'} invalid."
    return InputError(detail, errors)


def _refuse_xls(data: bytes) -> None:
    if data.startswith(_OLE2_MAGIC):
        raise InputError(
            "This is an Excel 97-2003 (.xls) file, which batchexec cannot read; "
            "save it as .xlsx or .csv."
        )
