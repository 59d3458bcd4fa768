"""A workbook's sheet to a table of cells, reading only what its XML holds.

The XLSX counterpart of ``csvinput``: ``read_sheet`` gives a ``Table`` whose
``lines`` are the sheet's row numbers. Reading is bounded before and while it
happens (unpacked size, cells, columns, time), since a workbook of a few
kilobytes can claim billions of rows.
"""

from __future__ import annotations

import datetime
import io
import time
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from batchexec.columns import KNOWN_COLUMNS, Cell
from batchexec.csvinput import Table, header_columns
from batchexec.errors import FieldError, InputError
from batchexec.wording import counted
from batchexec.xlsx import column_letter

_RESULTS_SHEET = "results"
#: Excel's last column, XFD; a value said to lie past it is refused whatever the limit.
_EXCEL_COLUMNS = 16_384
#: Integral numbers up to this are read as ints (``7``, not ``7.0``); past it a
#: double no longer holds every integer, so the number is kept as it was.
_EXACT_INT = 2**53


def read_sheet(
    data: bytes,
    *,
    max_rows: int | None = None,
    max_unzipped_bytes: int | None = None,
    max_columns: int | None = None,
    max_cells: int | None = None,
    timeout_s: float | None = None,
) -> Table:
    """The table of a workbook's ``Results`` sheet, else its first; ``lines`` are its row numbers.

    Every cell is read as its value (``cell_value``): the value a formula last
    showed; numbers and booleans as numbers and booleans (integral ones as
    ints), so that the outputs keep them; dates in ISO form, empty cells as
    ``""``, OOXML's ``_xHHHH_`` escapes decoded (as Excel shows them). The
    header and the ``prompt``, ``model`` and ``assistant`` cells are text
    (``cell_text``). Output columns (``result``, ``status``, ...) are dropped
    as a CSV's are.

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
        return _table(sheet.title, limits.rows(_parsed_rows(sheet)), max_rows)
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"The XLSX file cannot be read: {_reason(exc)}.") from exc
    finally:
        workbook.close()


def cell_text(value: object) -> str:
    """A sheet cell as the text it shows: ``7`` not ``7.0``, ISO dates, ``TRUE``; None is ``""``."""
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(cell_value(value))


def cell_value(value: object) -> Cell:
    """A sheet cell as batchexec keeps it: a number or boolean as itself, the rest as text.

    An integral float is an int (``7``, not ``7.0``) while a double holds it
    exactly; dates and times are ISO text; None is ``""``.
    """
    if value is None:
        return ""
    if isinstance(value, str):
        # OOXML writes characters XML cannot hold as _xHHHH_ (a CR is _x000D_) and
        # escapes literal _xHHHH_ text as _x005F_xHHHH_; Excel decodes both when it
        # reads, openpyxl neither.
        return _unescape(value) if "_x" in value else value
    if isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        return int(value) if value.is_integer() and abs(value) <= _EXACT_INT else value
    if isinstance(value, datetime.datetime):
        if value.time() == datetime.time():
            return value.date().isoformat()
        return value.isoformat(sep=" ")
    if isinstance(value, datetime.date | datetime.time):
        return value.isoformat()
    return str(value)


def _unescape(text: str) -> str:
    """``text`` with OOXML's ``_xHHHH_`` escapes decoded, left to right, as Excel does."""
    # Imported here, as openpyxl is above: importing it costs every start.
    from openpyxl.utils.escape import unescape

    result: str = unescape(text)
    return result


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
    ) -> Iterator[tuple[int, dict[int, Cell]]]:
        """Each row of ``parsed`` as its number and its cells' values by column (1-based)."""
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
                    f"The sheet {self.title!r} has more than {counted(self.max_cells, 'cell')}, "
                    f"counting rows and empty cells; the limit is {self.max_cells}."
                )
            # openpyxl's own reader skipped a row that comes out of order; so do we.
            if number <= previous:
                continue
            previous = number
            values: dict[int, Cell] = {}
            for cell in cells:
                column: int = cell["column"]
                value = cell_value(cell["value"])
                if column <= last_column:
                    values[column] = value
                elif _filled(value):
                    raise InputError(
                        f"Sheet {self.title!r} row {number}: column {column_letter(column - 1)} "
                        f"has a value; the limit is {counted(last_column, 'column')} "
                        f"(up to {column_letter(last_column - 1)})."
                    )
            yield number, values


def _filled(value: Cell) -> bool:
    """Whether a cell holds anything: a number or boolean does, text that is not blank."""
    return not isinstance(value, str) or bool(value.strip())


def _table(
    title: str, sheet_rows: Iterable[tuple[int, dict[int, Cell]]], max_rows: int | None
) -> Table:
    lines = iter(sheet_rows)
    header: list[str] | None = None
    header_number = 0
    for number, values in lines:
        filled = [column for column, value in values.items() if _filled(value)]
        if filled:
            header = [cell_text(values.get(column, "")) for column in range(1, max(filled) + 1)]
            header_number = number
            break
    if header is None:
        raise InputError(
            f"The sheet {title!r} is empty: it needs a header row with a 'prompt' column."
        )
    where = f"Sheet {title!r} row {header_number}"
    names = header_columns(header, where, unnamed_ok=True)
    rows: list[dict[str, Cell]] = []
    numbers: list[int] = []
    for number, values in lines:
        filled = sorted(column for column, value in values.items() if _filled(value))
        if not filled:
            continue
        for column in filled:
            if column > len(names) or names[column - 1] == "":
                message = (
                    f"Sheet {title!r} row {number}: column {column_letter(column - 1)} has a value "
                    f"but no name in the header (row {header_number})."
                )
                raise InputError(message, [FieldError(len(rows) + 1, None, message)])
        if max_rows is not None and len(rows) == max_rows:
            message = (
                f"The sheet {title!r} has more than {counted(max_rows, 'row')}; "
                f"the limit is {max_rows}."
            )
            raise InputError(message, [FieldError(None, "executions", message)])
        row = {
            name: _as_read(name, values.get(column, ""))
            for column, name in enumerate(names, start=1)
            if name
        }
        rows.append(row)
        numbers.append(number)
    if not rows:
        raise InputError(f"The sheet {title!r} has a header but no rows.")
    columns = tuple(name for name in names if name)
    return Table(columns=columns, rows=tuple(rows), lines=tuple(numbers))


def _as_read(column: str, value: Cell) -> Cell:
    """A cell of ``column``: text for ``prompt``, ``model`` and ``assistant``, else as it is."""
    return cell_text(value) if column in KNOWN_COLUMNS and not isinstance(value, str) else value
