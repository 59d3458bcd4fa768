"""CSV text to rows of cells, with errors that name the line."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass

from batchexec.columns import (
    KNOWN_COLUMNS,
    RESERVED_COLUMNS,
    Cell,
    is_added_column,
    is_result_column,
)
from batchexec.errors import FieldError, InputError
from batchexec.wording import counted


@dataclass(frozen=True)
class Table:
    """Parsed input: column names in order, and each data row's cells with its line number
    (a CSV's line, a sheet's row). A CSV's cells are text; a sheet's may be numbers."""

    columns: tuple[str, ...]
    rows: tuple[dict[str, Cell], ...]
    lines: tuple[int, ...]


def parse_csv(text: str, *, max_field_chars: int, max_columns: int | None = None) -> Table:
    """Parse CSV text whose header names a ``prompt`` column.

    Handles a UTF-8 byte order mark, quoted commas and newlines, and fields up
    to ``max_field_chars``. Blank lines are skipped. A header of more than
    ``max_columns`` fields is refused before any row is read, since every row
    becomes a mapping of that many cells. Raises ``InputError``.
    """
    text = text.removeprefix("\ufeff")
    # The csv module's field limit is process-wide; it is only ever raised,
    # never lowered, so concurrent parses cannot undercut each other.
    if csv.field_size_limit() < max_field_chars:
        csv.field_size_limit(max_field_chars)
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = next((row for row in reader if any(cell.strip() for cell in row)), None)
        if header is None:
            raise InputError("The CSV is empty: it needs a header line with a 'prompt' column.")
        if max_columns is not None and len(header) > max_columns:
            message = (
                f"CSV line {reader.line_num}: the header has {len(header)} columns; "
                f"the limit (MAX_COLUMNS) is {max_columns}."
            )
            raise InputError(message, [FieldError(None, "columns", message)])
        columns = header_columns(header, f"CSV line {reader.line_num}", unnamed_ok=False)
        rows: list[dict[str, Cell]] = []
        lines: list[int] = []
        while True:
            # A quoted field may span lines: a row is named by the line it starts on.
            line = reader.line_num + 1
            row = next(reader, None)
            if row is None:
                break
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                raise InputError(
                    f"CSV line {line}: expected {counted(len(header), 'field')}, found {len(row)}.",
                    [_row_error(len(rows) + 1, line, len(header), len(row))],
                )
            rows.append(
                {name: cell for name, cell in zip(columns, row, strict=True) if name is not None}
            )
            lines.append(line)
    except csv.Error as exc:
        raise InputError(f"CSV line {reader.line_num}: {exc}.") from exc
    if not rows:
        raise InputError("The CSV has a header but no rows.")
    return Table(tuple(name for name in columns if name is not None), tuple(rows), tuple(lines))


def header_columns(header: list[str], where: str, *, unnamed_ok: bool) -> list[str | None]:
    """Column names of an input header, known ones lower-cased; None for output columns to drop.

    A results file fed back in carries batchexec's output columns; they are
    dropped, and so are the columns a run adds after ``result`` (``model``,
    ``cost``, ``result.score``, ``status [gpt-4o]``, ...), which are the output's,
    not the input's: before it, such names are the input's own.
    With ``unnamed_ok`` an unnamed column is kept as "" (a spreadsheet's
    formatted, empty column).
    """
    columns: list[str | None] = []
    seen: set[str] = set()
    after_result = False
    for position, raw in enumerate(header, start=1):
        name = raw.strip()
        if name.lower() in KNOWN_COLUMNS or name.lower() in RESERVED_COLUMNS:
            name = name.lower()
        if (
            name in RESERVED_COLUMNS
            or is_result_column(name)
            or (after_result and is_added_column(name))
        ):
            after_result = after_result or is_result_column(name)
            columns.append(None)
            continue
        if not name and not unnamed_ok:
            raise InputError(f"{where}: column {position} has no name.")
        if name and name in seen:
            raise InputError(f"{where}: column {name!r} appears twice.")
        seen.add(name)
        columns.append(name)
    if "prompt" not in seen:
        raise InputError(f"{where}: the header has no 'prompt' column.")
    return columns


def _row_error(index: int, line: int, expected: int, found: int) -> FieldError:
    return FieldError(
        index=index,
        field=None,
        message=f"line {line}: expected {counted(expected, 'field')}, found {found}",
    )
