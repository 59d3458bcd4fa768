"""Input files to rows: CSV, JSON, JSONL and XLSX, each row named by where it came from.

Every format ends as ``Rows``: the input columns, one ``RowInput`` per
execution, and each row's place in its file (``line 3`` of a CSV or JSONL,
``row 3`` of a sheet, ``execution 3`` of a JSON document), so that a problem
can be reported where the user will look for it.
"""

from __future__ import annotations

import datetime
import io
import json
import time
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import PurePath
from typing import Any

from pydantic import ValidationError

from batchexec.catalog import Catalog
from batchexec.csvinput import Table, header_columns, parse_csv
from batchexec.errors import FieldError, InputError
from batchexec.planning import BatchPlan, Limits, RowInput, plan_batch
from batchexec.schemas import ExecutionIn


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
_RESULTS_SHEET = "results"
#: Why ``json.loads`` raises a ValueError that is no JSONDecodeError: Python
#: refuses to read integers longer than this.
TOO_MANY_DIGITS = "a number has more than 4300 digits"
#: Excel's last column, XFD; a value said to lie past it is refused whatever the limit.
_EXCEL_COLUMNS = 16_384


@dataclass(frozen=True)
class Rows:
    """Rows read from an input, with each one's place in it."""

    columns: tuple[str, ...]
    rows: tuple[RowInput, ...]
    #: Where each row came from: ``line 3``, ``row 3``, ``execution 3``.
    places: tuple[str, ...]
    #: Rows that could not be read at all; their entries in ``rows`` are placeholders.
    problems: tuple[FieldError, ...] = ()

    def place(self, index: int | None) -> str | None:
        """Where execution ``index`` (1-based) came from; None for a batch-wide problem."""
        if index is None or not 1 <= index <= len(self.places):
            return None
        return self.places[index - 1]

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


def from_table(table: Table) -> Rows:
    """Rows of a parsed CSV, each placed at the line it starts on."""
    return Rows(
        columns=table.columns,
        rows=tuple(_row_of(cells) for cells in table.rows),
        places=tuple(f"line {line}" for line in table.lines),
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

    Every cell is read as text: the value a formula last showed, integral
    numbers without ``.0``, dates in ISO form, empty cells as ``""``. Output
    columns (``result``, ``status``, ...) are dropped as a CSV's are.

    Reading costs what the sheet's XML holds, never the row and column numbers
    it claims. ``max_unzipped_bytes`` refuses a workbook whose parts unpack to
    more; ``max_cells`` bounds the ``<row>`` and ``<c>`` elements read, empty
    ones included; ``max_columns`` refuses a value past that column;
    ``timeout_s`` bounds the whole read, checked at every row.
    """
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    # Imported here: openpyxl pulls in numpy where it is installed, which would
    # slow every start of the server and the command line, XLSX or not.
    import openpyxl

    _check_archive(data, max_unzipped_bytes, max_cells)
    try:
        workbook = openpyxl.load_workbook(io.BytesIO(data), read_only=True, data_only=True)
    except Exception as exc:
        # openpyxl fails on a bad file with whatever its zip or XML layer raised.
        raise InputError(f"The XLSX file cannot be read: {_reason(exc)}.") from exc
    try:
        sheets = workbook.worksheets
        if not sheets:
            raise InputError("The XLSX workbook has no worksheet.")
        sheet = next((s for s in sheets if s.title.casefold() == _RESULTS_SHEET), sheets[0])
        limits = _SheetLimits(sheet.title, max_columns, max_cells, timeout_s, deadline)
        return _sheet_rows(sheet.title, limits.rows(_parsed_rows(sheet)), max_rows)
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"The XLSX file cannot be read: {_reason(exc)}.") from exc
    finally:
        workbook.close()


def cell_text(value: object) -> str:
    """A sheet cell as the text it shows: ``7`` not ``7.0``, ISO dates, ``TRUE``; None is ``""``."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, datetime.datetime):
        if value.time() == datetime.time():
            return value.date().isoformat()
        return value.isoformat(sep=" ")
    if isinstance(value, datetime.date | datetime.time):
        return value.isoformat()
    return str(value)


def rows_from_executions(
    executions: Sequence[ExecutionIn | None],
) -> tuple[list[str], list[RowInput]]:
    """Columns and rows of ``execute_batch`` executions: extra keys become extra columns.

    A None entry (an execution that could not be read) becomes a placeholder row.
    """
    columns = ["prompt", "model"]
    if any(execution and execution.assistant for execution in executions):
        columns.append("assistant")
    rows: list[RowInput] = []
    for execution in executions:
        if execution is None:
            rows.append(_PLACEHOLDER)
            continue
        extra = execution.extra_cells()
        columns += [name for name in extra if name not in columns]
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
    return columns, rows


def plan_rows(rows: Rows, catalog: Catalog, limits: Limits) -> BatchPlan:
    """Validate ``rows`` as the server does; ``InputError`` lists every problem, rows unread too."""
    try:
        plan = plan_batch(list(rows.rows), list(rows.columns), catalog, limits)
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


def _row_of(cells: dict[str, str]) -> RowInput:
    return RowInput(
        prompt=cells["prompt"],
        model=cells.get("model"),
        assistant=cells.get("assistant"),
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
    columns, rows = rows_from_executions(executions)
    return Rows(tuple(columns), tuple(rows), tuple(places), tuple(problems))


def _field_errors(index: int, exc: ValidationError) -> Iterable[FieldError]:
    for error in exc.errors(include_url=False):
        field = ".".join(str(part) for part in error["loc"]) or None
        yield FieldError(index, field, error["msg"])


def _invalid(errors: list[FieldError], detail: str) -> InputError:
    """One error listing ``errors`` by row; a batch-wide problem keeps ``detail``."""
    errors.sort(key=lambda error: error.index or 0)
    if all(error.index is not None for error in errors):
        count = len({error.index for error in errors})
        noun = "execution is" if count == 1 else "executions are"
        detail = f"{count} {noun} invalid."
    return InputError(detail, errors)


def _refuse_xls(data: bytes) -> None:
    if data.startswith(_OLE2_MAGIC):
        raise InputError(
            "This is an Excel 97-2003 (.xls) file, which batchexec cannot read; "
            "save it as .xlsx or .csv."
        )


def _check_archive(data: bytes, max_unzipped_bytes: int | None, max_cells: int | None) -> None:
    """Refuse a workbook whose parts unpack to more than ``max_unzipped_bytes``, or whose
    sheets hold more than ``max_cells`` cell elements, before openpyxl reads any of it.

    The zip module never unpacks a part past its recorded size, so summing
    those sizes bounds the work before it is done. Cells are counted in the
    sheets' XML as bytes (a ``<c`` each, an overcount by the few ``<col``
    elements): openpyxl builds a whole row before the per-row bounds can look
    at it, and one row of a million empty cells costs gigabytes.
    """
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            parts = archive.infolist()
            total = sum(info.file_size for info in parts)
            if max_unzipped_bytes is not None and total > max_unzipped_bytes:
                raise InputError(
                    f"The XLSX workbook unpacks to {total} bytes; "
                    f"the limit is {max_unzipped_bytes}."
                )
            if max_cells is None:
                return
            for info in parts:
                if info.filename.startswith("xl/worksheets/") and info.filename.endswith(".xml"):
                    cells = archive.read(info).count(b"<c")
                    if cells > max_cells:
                        raise InputError(
                            f"The XLSX sheet {info.filename} holds {cells} cells, empty ones "
                            f"included; the limit is {max_cells}."
                        )
    except InputError:
        raise
    except Exception as exc:
        # The zip module fails on a damaged archive with BadZipFile, and on odd
        # headers with NotImplementedError, UnicodeDecodeError and others.
        raise InputError(f"The XLSX file cannot be read: {_reason(exc)}.") from exc


def _reason(exc: Exception) -> str:
    return str(exc).rstrip(".") or type(exc).__name__


def _parsed_rows(sheet: Any) -> Iterator[tuple[int, list[dict[str, Any]]]]:
    """The rows a read-only sheet's XML holds: each one's number and openpyxl's cell dicts.

    ``iter_rows`` fills every gap the XML claims, so ``<row r="2000000000"/>``
    costs two billion empty rows and one empty cell at XFD makes a row 16,384
    wide; openpyxl has no public way to read only what is there. This drives
    the parser ``ReadOnlyWorksheet._cells_by_row`` uses, with the same
    arguments, keeping its private names in this one place. Checked against
    openpyxl 3.1.5.
    """
    from openpyxl.worksheet._reader import WorkSheetParser

    workbook = sheet.parent
    with sheet._get_source() as source:
        parser = WorkSheetParser(
            source,
            sheet._shared_strings,
            data_only=workbook.data_only,
            epoch=workbook.epoch,
            date_formats=workbook._date_formats,
            timedelta_formats=workbook._timedelta_formats,
        )
        yield from parser.parse()


@dataclass(frozen=True)
class _SheetLimits:
    """What reading one sheet may cost: its columns, its elements, its time."""

    title: str
    max_columns: int | None
    max_cells: int | None
    timeout_s: float | None
    #: ``time.monotonic()`` past which reading stops; None for no limit.
    deadline: float | None

    def rows(
        self, parsed: Iterable[tuple[int, list[dict[str, Any]]]]
    ) -> Iterator[tuple[int, dict[int, str]]]:
        """Each row of ``parsed`` as its number and its cells' text by column (1-based)."""
        last_column = min(self.max_columns or _EXCEL_COLUMNS, _EXCEL_COLUMNS)
        elements = 0
        previous = 0
        for number, cells in parsed:
            if self.deadline is not None and time.monotonic() >= self.deadline:
                raise InputError(
                    f"The sheet {self.title!r} took too long to read; "
                    f"the limit is {self.timeout_s:g} s."
                )
            elements += 1 + len(cells)
            if self.max_cells is not None and elements > self.max_cells:
                raise InputError(
                    f"The sheet {self.title!r} has more than {self.max_cells} cells, "
                    f"counting rows and empty cells; the limit is {self.max_cells}."
                )
            # openpyxl's own reader skipped a row that comes out of order; so do we.
            if number <= previous:
                continue
            previous = number
            texts: dict[int, str] = {}
            for cell in cells:
                column: int = cell["column"]
                text = cell_text(cell["value"])
                if column <= last_column:
                    texts[column] = text
                elif text.strip():
                    raise InputError(
                        f"Sheet {self.title!r} row {number}: column {_column_letter(column)} "
                        f"has a value; the limit is {last_column} columns "
                        f"(up to {_column_letter(last_column)})."
                    )
            yield number, texts


def _sheet_rows(
    title: str, sheet_rows: Iterable[tuple[int, dict[int, str]]], max_rows: int | None
) -> Rows:
    lines = iter(sheet_rows)
    header: list[str] | None = None
    header_number = 0
    for number, texts in lines:
        filled = [column for column, text in texts.items() if text.strip()]
        if filled:
            header = [texts.get(column, "") for column in range(1, max(filled) + 1)]
            header_number = number
            break
    if header is None:
        raise InputError(
            f"The sheet {title!r} is empty: it needs a header row with a 'prompt' column."
        )
    where = f"Sheet {title!r} row {header_number}"
    names = header_columns(header, where, unnamed_ok=True)
    rows: list[RowInput] = []
    places: list[str] = []
    for number, texts in lines:
        filled = sorted(column for column, text in texts.items() if text.strip())
        if not filled:
            continue
        for column in filled:
            if column > len(names) or names[column - 1] == "":
                message = (
                    f"Sheet {title!r} row {number}: column {_column_letter(column)} has a value "
                    f"but no name in the header (row {header_number})."
                )
                raise InputError(message, [FieldError(len(rows) + 1, None, message)])
        if max_rows is not None and len(rows) == max_rows:
            message = f"The sheet {title!r} has more than {max_rows} rows; the limit is {max_rows}."
            raise InputError(message, [FieldError(None, "executions", message)])
        row = {name: texts.get(column, "") for column, name in enumerate(names, start=1) if name}
        rows.append(_row_of(row))
        places.append(f"row {number}")
    if not rows:
        raise InputError(f"The sheet {title!r} has a header but no rows.")
    columns = tuple(name for name in names if name)
    return Rows(columns=columns, rows=tuple(rows), places=tuple(places))


def _column_letter(number: int) -> str:
    """A spreadsheet's name for column ``number`` (1-based): A, B, ..., Z, AA, AB, ..."""
    letters = ""
    while number:
        number, remainder = divmod(number - 1, 26)
        letters = chr(ord("A") + remainder) + letters
    return letters
