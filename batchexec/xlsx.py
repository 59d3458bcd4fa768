"""A small streaming XLSX writer: one sheet of text and numbers, written row by row.

batchexec writes large result sheets often and reads none of the features a
general library offers; writing the few XML parts itself makes it several
times faster than xlsxwriter or openpyxl (see BENCHMARKS.md) with memory that
does not grow with the number of rows. Every string is an inline string
cell, so no text can ever become a formula, a number or a link.
"""

from __future__ import annotations

import re
import zipfile
from collections.abc import Iterable, Sequence
from xml.sax.saxutils import quoteattr

#: Excel refuses longer cell text.
CELL_LIMIT = 32_767
#: Rows joined into one write; large enough to amortise the zip stream's overhead.
_ROWS_PER_CHUNK = 512
#: zlib level 1: output about a third larger than the default level, written
#: several times faster; results are downloaded once and rarely archived.
_COMPRESS_LEVEL = 1
#: Characters XML 1.0 forbids, and lone surrogates (which JSON can carry but
#: UTF-8 cannot); they become U+FFFD rather than a broken file.
_ILLEGAL_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")
_TRUNCATED = "… [truncated by batchexec: {} characters in all]"

_MAIN_NS = "http://schemas.openxmlformats.org/spreadsheetml/2006/main"
_REL_NS = "http://schemas.openxmlformats.org/officeDocument/2006/relationships"
_PKG_REL_NS = "http://schemas.openxmlformats.org/package/2006/relationships"
_XML_HEAD = '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n'

_CONTENT_TYPES = (
    _XML_HEAD + '<Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types">'
    '<Default Extension="rels" '
    'ContentType="application/vnd.openxmlformats-package.relationships+xml"/>'
    '<Default Extension="xml" ContentType="application/xml"/>'
    '<Override PartName="/xl/workbook.xml" ContentType="application/'
    'vnd.openxmlformats-officedocument.spreadsheetml.sheet.main+xml"/>'
    '<Override PartName="/xl/worksheets/sheet1.xml" ContentType="application/'
    'vnd.openxmlformats-officedocument.spreadsheetml.worksheet+xml"/>'
    '<Override PartName="/xl/styles.xml" ContentType="application/'
    'vnd.openxmlformats-officedocument.spreadsheetml.styles+xml"/>'
    "</Types>"
)
_ROOT_RELS = (
    _XML_HEAD + f'<Relationships xmlns="{_PKG_REL_NS}">'
    f'<Relationship Id="rId1" Type="{_REL_NS}/officeDocument" Target="xl/workbook.xml"/>'
    "</Relationships>"
)
_WORKBOOK_RELS = (
    _XML_HEAD + f'<Relationships xmlns="{_PKG_REL_NS}">'
    f'<Relationship Id="rId1" Type="{_REL_NS}/worksheet" Target="worksheets/sheet1.xml"/>'
    f'<Relationship Id="rId2" Type="{_REL_NS}/styles" Target="styles.xml"/>'
    "</Relationships>"
)
#: Style 0 plain, 1 the header (bold, wrapped, top), 2 the body (wrapped, top).
_HEADER_STYLE, _BODY_STYLE = 1, 2
_STYLES = (
    _XML_HEAD + f'<styleSheet xmlns="{_MAIN_NS}">'
    '<fonts count="2"><font><sz val="11"/><name val="Calibri"/></font>'
    '<font><b/><sz val="11"/><name val="Calibri"/></font></fonts>'
    '<fills count="2"><fill><patternFill patternType="none"/></fill>'
    '<fill><patternFill patternType="gray125"/></fill></fills>'
    '<borders count="1"><border><left/><right/><top/><bottom/><diagonal/></border></borders>'
    '<cellStyleXfs count="1"><xf numFmtId="0" fontId="0" fillId="0" borderId="0"/></cellStyleXfs>'
    '<cellXfs count="3"><xf numFmtId="0" fontId="0" fillId="0" borderId="0" xfId="0"/>'
    '<xf numFmtId="0" fontId="1" fillId="0" borderId="0" xfId="0" applyFont="1" '
    'applyAlignment="1"><alignment vertical="top" wrapText="1"/></xf>'
    '<xf numFmtId="0" fontId="0" fillId="0" borderId="0" xfId="0" applyAlignment="1">'
    '<alignment vertical="top" wrapText="1"/></xf></cellXfs>'
    '<cellStyles count="1"><cellStyle name="Normal" xfId="0" builtinId="0"/></cellStyles>'
    "</styleSheet>"
)

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

    Strings are inline text cells (never formulas or links), cut at Excel's
    cell limit; ints and floats are numbers; None is an empty cell.
    """
    letters = [column_letter(index) for index in range(len(header))]
    last_row = 1
    with zipfile.ZipFile(
        path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=_COMPRESS_LEVEL
    ) as archive:
        archive.writestr("[Content_Types].xml", _CONTENT_TYPES)
        archive.writestr("_rels/.rels", _ROOT_RELS)
        archive.writestr("xl/_rels/workbook.xml.rels", _WORKBOOK_RELS)
        archive.writestr("xl/styles.xml", _STYLES)
        with archive.open("xl/worksheets/sheet1.xml", "w") as part:
            part.write(_sheet_head(widths).encode())
            chunk = [_row(1, header, letters, _HEADER_STYLE)]
            for last_row, row in enumerate(rows, start=2):
                chunk.append(_row(last_row, row, letters, _BODY_STYLE))
                if len(chunk) >= _ROWS_PER_CHUNK:
                    part.write("".join(chunk).encode())
                    chunk.clear()
            area = f"A1:{letters[-1]}{max(last_row, 2)}"
            chunk.append(f'</sheetData><autoFilter ref="{area}"/></worksheet>')
            part.write("".join(chunk).encode())
        archive.writestr("xl/workbook.xml", _workbook(sheet_name, area))


def _row(number: int, cells: Sequence[Cell], letters: Sequence[str], style: int) -> str:
    parts = [f'<row r="{number}">']
    for letter, value in zip(letters, cells, strict=False):
        if value is None or value == "":
            continue
        if isinstance(value, str):
            parts.append(
                f'<c r="{letter}{number}" s="{style}" t="inlineStr"><is>'
                f'<t xml:space="preserve">{_escape(value)}</t></is></c>'
            )
        else:
            parts.append(f'<c r="{letter}{number}" s="{style}"><v>{value!r}</v></c>')
    parts.append("</row>")
    return "".join(parts)


def _escape(text: str) -> str:
    text = fit(text)
    # Checked before replacing: most model text has none of these.
    if "&" in text:
        text = text.replace("&", "&amp;")
    if "<" in text:
        text = text.replace("<", "&lt;")
    if ">" in text:
        text = text.replace(">", "&gt;")
    if "\r" in text:
        # A literal CR would be read back as LF (XML normalises line ends).
        text = text.replace("\r", "&#13;")
    if _ILLEGAL_XML.search(text):
        text = _ILLEGAL_XML.sub("\ufffd", text)
    return text


def _sheet_head(widths: Sequence[float]) -> str:
    columns = "".join(
        f'<col min="{n}" max="{n}" width="{width:.1f}" customWidth="1" style="{_BODY_STYLE}"/>'
        for n, width in enumerate(widths, start=1)
    )
    return (
        _XML_HEAD + f'<worksheet xmlns="{_MAIN_NS}" xmlns:r="{_REL_NS}">'
        '<sheetViews><sheetView tabSelected="1" workbookViewId="0">'
        '<pane ySplit="1" topLeftCell="A2" activePane="bottomLeft" state="frozen"/>'
        '<selection pane="bottomLeft" activeCell="A2" sqref="A2"/></sheetView></sheetViews>'
        f'<sheetFormatPr defaultRowHeight="15"/><cols>{columns}</cols><sheetData>'
    )


def _workbook(sheet_name: str, area: str) -> str:
    absolute = "$" + area.replace(":", ":$")
    absolute = re.sub(r"([A-Z]+)(\d+)", r"\1$\2", absolute)
    quoted = "'" + sheet_name.replace("'", "''") + "'"
    return (
        _XML_HEAD + f'<workbook xmlns="{_MAIN_NS}" xmlns:r="{_REL_NS}">'
        "<bookViews><workbookView/></bookViews>"
        f'<sheets><sheet name={quoteattr(sheet_name)} sheetId="1" r:id="rId1"/></sheets>'
        '<definedNames><definedName name="_xlnm._FilterDatabase" localSheetId="0" hidden="1">'
        f"{_escape(quoted)}!{absolute}</definedName></definedNames></workbook>"
    )
