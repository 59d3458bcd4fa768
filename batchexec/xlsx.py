"""One sheet of text and numbers, written row by row with xlsxwriter in constant memory.

Every string is written with ``write_string``, and the workbook turns off
xlsxwriter's conversions of strings to formulas, links and numbers, so no
text can ever become anything but text. Text is cut at Excel's cell limit
with a visible marker; control characters (a lone CR among them) are written
as OOXML's ``_xHHHH_`` escapes and literal ``_xHHHH_`` text is escaped in
turn, so Excel, LibreOffice and batchexec's reader show the text as it was.
Called from a thread (``asyncio.to_thread``): it blocks.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import xlsxwriter

#: Excel refuses longer cell text.
CELL_LIMIT = 32_767
#: What no workbook can hold: lone surrogates (which JSON can carry but UTF-8
#: cannot) and the two non-characters; they become U+FFFD rather than a broken
#: file. Control characters are kept: xlsxwriter writes them as OOXML's
#: ``_xHHHH_`` escapes, which Excel and batchexec's own reader decode.
_ILLEGAL_XML = re.compile("[\ud800-\udfff\ufffe\uffff]")
_TRUNCATED = "… [truncated by batchexec: {} characters in all]"
#: xlsxwriter's options: rows go to disk as they are written, and strings stay strings.
_OPTIONS = {
    "constant_memory": True,
    "strings_to_formulas": False,
    "strings_to_urls": False,
    "strings_to_numbers": False,
}

Cell = str | int | float | None


def column_letter(index: int) -> str:
    """Excel's name of the 0-based column ``index``: A, B, ..., Z, AA, ..."""
    name = ""
    index += 1
    while index:
        index, remainder = divmod(index - 1, 26)
        name = chr(65 + remainder) + name
    return name


def fit(text: str) -> str:
    """``text`` cut to Excel's cell limit, with a marker saying so."""
    if len(text) <= CELL_LIMIT:
        return text
    marker = _TRUNCATED.format(len(text))
    return text[: CELL_LIMIT - len(marker)] + marker


def write_sheet(
    path: str,
    sheet_name: str,
    header: Sequence[str],
    rows: Iterable[Sequence[Cell]],
    widths: Sequence[float],
) -> None:
    """Write a workbook of one sheet: a bold frozen header with an autofilter, then ``rows``.

    Strings are text cells (never formulas or links), cut at Excel's cell
    limit; ints and floats are numbers; None and "" are empty cells.
    """
    workbook = xlsxwriter.Workbook(path, _OPTIONS)
    try:
        header_style = workbook.add_format({"bold": True, "text_wrap": True, "valign": "top"})
        body_style = workbook.add_format({"text_wrap": True, "valign": "top"})
        sheet = workbook.add_worksheet(sheet_name)
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
                else:
                    sheet.write_number(last_row, column, value, body_style)
        sheet.autofilter(0, 0, max(last_row, 1), max(len(header) - 1, 0))
    finally:
        workbook.close()


def _text(value: str) -> str:
    value = fit(value)
    # Checked before replacing: most model text has none of these.
    if _ILLEGAL_XML.search(value):
        value = _ILLEGAL_XML.sub("\ufffd", value)
    return value
