"""One sheet of text and numbers, written row by row with xlsxwriter in constant memory.

Every string is written with ``write_string``, and the workbook turns off
xlsxwriter's conversions of strings to formulas, links and numbers, so no
text can ever become anything but text. Text is cut at Excel's cell limit
with a visible marker; control characters (a lone CR among them) are written
as OOXML's ``_xHHHH_`` escapes and literal ``_xHHHH_`` text is escaped in
turn, so Excel and batchexec's reader show the text as it was (openpyxl and
pandas show the escapes); lone surrogates and U+FFFE/U+FFFF become U+FFFD.
Called from a thread (``asyncio.to_thread``): it blocks.
"""

from __future__ import annotations

import contextlib
import copy
import math
import re
import tempfile
from collections.abc import Iterable, Sequence
from typing import Any

import xlsxwriter
from xlsxwriter.exceptions import FileCreateError, InvalidWorksheetName
from xlsxwriter.worksheet import Worksheet

#: Excel refuses longer cell text; Excel counts UTF-16 units, so an emoji counts two.
CELL_LIMIT = 32_767
#: What no workbook can hold: lone surrogates (which JSON can carry but UTF-8
#: cannot) and the two non-characters; they become U+FFFD rather than a broken
#: file. Control characters are kept, as OOXML's ``_xHHHH_`` escapes.
_ILLEGAL_XML = re.compile("[\ud800-\udfff\ufffe\uffff]")
_TRUNCATED = "… [truncated by batchexec: {} characters in all]"
#: xlsxwriter's options: rows go to disk as they are written, and strings stay strings.
_OPTIONS = {
    "constant_memory": True,
    "strings_to_formulas": False,
    "strings_to_urls": False,
    "strings_to_numbers": False,
}
#: What is written as an ``_xHHHH_`` escape: the characters XML 1.0 cannot hold,
#: or (CR) would read back as LF, and every underscore that would start an escape
#: once written: one before ``xHHHH_`` (overlapping ones too, the second in
#: ``_x0041_x0042_``) or before ``xHHHH`` and a control character, which is
#: written as an escape starting with ``_``. Tab and LF are written as they are.
_ESCAPED = re.compile("_(?=x[0-9A-Fa-f]{4}[_\x00-\x08\x0b-\x1f])|[\x00-\x08\x0b-\x1f]")
#: Past 2**53 a number cell would not keep every digit; such ints are written as text.
_EXACT_INT = 2**53

Cell = str | int | float | None
#: A sheet written after the first: its name, header, rows and column widths.
MoreSheet = tuple[str, Sequence[str], Sequence[Sequence[Cell]], Sequence[float]]


class _TextSheet(Worksheet):  # type: ignore[misc]  # xlsxwriter has no type hints
    """xlsxwriter's worksheet with one private method replaced: how cell text is escaped.

    xlsxwriter 3.2-3.3 escapes literal ``_xHHHH_`` text one match at a time and
    before control characters, so ``_x0041_x0042_`` reads back as ``_x0041B`` and
    ``_x0041`` and a CR as ``Ax000D_``; and in constant-memory mode it
    writes text that starts with ``<r>`` and ends with ``</r>`` as raw rich-text
    XML, which breaks the file or adds cells (a formula among them). The
    replacement below fixes both; its tests (tests/test_xlsx.py) fail if a
    later xlsxwriter stops calling it. Checked against xlsxwriter 3.3.1.
    """

    @staticmethod
    def _escape_control_characters(data: object) -> object:
        if not isinstance(data, str):
            # As xlsxwriter's own: it passes numbers too (a boolean cell's value).
            return data
        if _ESCAPED.search(data):
            data = _ESCAPED.sub(_escape, data)
        if data.startswith("<r>") and data.endswith("</r>"):
            # "<" as its OOXML escape: the same text to a reader, but not rich-text XML.
            data = "_x003C_" + data[1:]
        return data


def _escape(match: re.Match[str]) -> str:
    return f"_x{ord(match[0]):04X}_"


def column_letter(index: int) -> str:
    """Excel's name of the 0-based column ``index``: A, B, ..., Z, AA, ..."""
    name = ""
    index += 1
    while index:
        index, remainder = divmod(index - 1, 26)
        name = chr(65 + remainder) + name
    return name


def fit(text: str) -> str:
    """``text`` cut to Excel's cell limit, with a marker saying so.

    The limit is in UTF-16 units, as Excel (and xlsxwriter, which would
    otherwise cut the marker off) counts it: 32,767 BMP characters, fewer
    where characters past U+FFFF (emoji) count two.
    """
    if len(text) <= CELL_LIMIT // 2 or (len(text) <= CELL_LIMIT and _units(text) <= CELL_LIMIT):
        return text
    marker = _TRUNCATED.format(len(text))
    room = CELL_LIMIT - len(marker)
    kept = text[:room]
    over = _units(kept) - room
    # Each character is one unit or two: dropping ceil(over / 2) never drops
    # more than one unit too many, which the last step gives back when it can.
    while over > 0:
        kept = kept[: len(kept) - (over + 1) // 2]
        over = _units(kept) - room
    if over < 0 and ord(text[len(kept)]) <= 0xFFFF:
        kept = text[: len(kept) + 1]
    return kept + marker


def _units(text: str) -> int:
    """``text``'s length in UTF-16 units; a lone surrogate is one."""
    return len(text.encode("utf-16-le", "surrogatepass")) // 2


def write_sheet(
    path: str,
    sheet_name: str,
    header: Sequence[str],
    rows: Iterable[Sequence[Cell]],
    widths: Sequence[float],
    more: Sequence[MoreSheet] = (),
) -> None:
    """Write a workbook of one sheet: a bold frozen header with an autofilter, then ``rows``;
    then each of ``more`` (name, header, rows, widths), written the same way after it.

    Strings are text cells (never formulas, links or numbers), cut at Excel's
    cell limit; ints and floats are numbers, booleans TRUE or FALSE; NaN and
    infinities, which no number cell holds, are the text ``nan``, ``inf`` and
    ``-inf`` (as in the CSV), and ints past 2**53 their digits as text; None
    and "" are empty cells. A sheet name Excel refuses raises ``ValueError``;
    a file that cannot be written raises ``OSError``, as ``open`` would.
    """
    # Opened here first, so a folder that is missing or read-only fails as a plain
    # OSError before xlsxwriter has made any temporary file (it would leave its row
    # file open). Temporary files go in a folder of this write's own, removed
    # whatever happens: xlsxwriter leaves some behind when writing the zip fails.
    with open(path, "wb"):
        pass
    with tempfile.TemporaryDirectory(
        prefix="batchexec-xlsx-", ignore_cleanup_errors=True
    ) as scratch:
        workbook = xlsxwriter.Workbook(path, {**_OPTIONS, "tmpdir": scratch})
        try:
            _fill(workbook, sheet_name, header, rows, widths)
            for other in more:
                _fill(workbook, *other)
        except BaseException:
            # Closing closes the row file constant_memory keeps open; the
            # half-written workbook it leaves is the caller's to discard.
            with contextlib.suppress(Exception):  # the first failure is the one to report
                workbook.close()
            raise
        try:
            workbook.close()
        except FileCreateError as exc:
            error = exc.args[0] if exc.args else None
            raise (copy.copy(error) if isinstance(error, OSError) else OSError(str(exc))) from exc


def _fill(
    workbook: Any,
    sheet_name: str,
    header: Sequence[str],
    rows: Iterable[Sequence[Cell]],
    widths: Sequence[float],
) -> None:
    header_style = workbook.add_format({"bold": True, "text_wrap": True, "valign": "top"})
    body_style = workbook.add_format({"text_wrap": True, "valign": "top"})
    try:
        sheet = workbook.add_worksheet(sheet_name, worksheet_class=_TextSheet)
    except InvalidWorksheetName as exc:
        raise ValueError(f"Excel refuses the sheet name {sheet_name!r}: {exc}") from exc
    for column, width in enumerate(widths):
        sheet.set_column(column, column, width, body_style)
    sheet.freeze_panes(1, 0)
    for column, name in enumerate(header):
        sheet.write_string(0, column, _text(name), header_style)
    last_row = 0
    for last_row, row in enumerate(rows, start=1):
        for column, value in enumerate(row[: len(header)]):
            if value is None or value == "":
                continue
            if isinstance(value, str):
                sheet.write_string(last_row, column, _text(value), body_style)
            elif isinstance(value, bool):
                sheet.write_boolean(last_row, column, value, body_style)
            elif isinstance(value, float) and not math.isfinite(value):
                sheet.write_string(last_row, column, repr(value), body_style)
            elif isinstance(value, int) and abs(value) > _EXACT_INT:
                sheet.write_string(last_row, column, str(value), body_style)
            else:
                sheet.write_number(last_row, column, value, body_style)
    sheet.autofilter(0, 0, max(last_row, 1), max(len(header) - 1, 0))


def _text(value: str) -> str:
    value = fit(value)
    # Checked before replacing: most model text has none of these.
    if _ILLEGAL_XML.search(value):
        value = _ILLEGAL_XML.sub("\ufffd", value)
    return value
