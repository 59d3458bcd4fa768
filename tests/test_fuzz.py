"""Fuzzing (Hypothesis) of every input parser and of the routes that feed them.

Whatever arrives, a parser returns or raises ``InputError`` naming the problem
(``TemplateError`` for a reference), and a route answers below 500, with a JSON
``detail`` when it refuses, within a bound. Inputs are built to be interesting:
CSV with quotes, line breaks, NUL and ragged rows; JSON nested thousands deep
or holding numbers of thousands of digits; workbooks whose XML claims rows in
the billions and columns past XFD, then cut short or corrupted byte by byte.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import datetime
import functools
import io
import json
import re
import sys
import time
import zipfile
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar
from xml.sax.saxutils import escape, quoteattr

import aiohttp
import openpyxl
import pytest
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, currently_in_test_context, event, given, settings
from hypothesis import strategies as st

from batchexec import Settings, create_app
from batchexec.api import CANCEL, EXECUTE_BATCH, PROCESS_CSV, RESULTS, RETRY, UPLOAD
from batchexec.csvinput import parse_csv
from batchexec.errors import InputError
from batchexec.inputs import Rows, parse_json, parse_jsonl, parse_xlsx, read_rows, sniff
from batchexec.templating import TemplateError, references
from batchexec.xlsx import column_letter
from tests.helpers import AUTH, finished

T = TypeVar("T")

#: Every request must be answered within this, whatever its body.
REQUEST_TIMEOUT_S = 10.0
#: Reading one workbook may take this long; the parser enforces it.
PARSE_TIMEOUT_S = 5.0
#: Small enough that a few examples cross it: 413 is an answer too.
MAX_BODY_BYTES = 256 * 1024

#: The parsers cost microseconds an input: many examples.
PARSER = settings(max_examples=250, deadline=None, derandomize=True, database=None)
#: openpyxl costs milliseconds a workbook.
WORKBOOK = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
#: A fresh app per example, whose results folder is the test's ``tmp_path``.
ROUTE = settings(
    max_examples=30,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)


@pytest.fixture(autouse=True)
def _restore_csv_field_limit() -> Iterator[None]:
    """parse_csv raises the process-wide csv field limit; put it back after each test."""
    with csv_field_limit_kept():
        yield


@contextlib.contextmanager
def csv_field_limit_kept() -> Iterator[None]:
    """The csv field limit as it was, afterwards: examples must not depend on earlier ones."""
    before = csv.field_size_limit()
    try:
        yield
    finally:
        csv.field_size_limit(before)


def returned_or_named(parse: Callable[[], T]) -> T | None:
    """``parse()``'s result, or None when it raised an ``InputError`` that names the problem.

    Any other exception propagates, so Hypothesis reports it with its smallest input.
    """
    try:
        result = parse()
    except InputError as exc:
        assert exc.detail.strip() or exc.errors, f"an InputError that names nothing: {exc!r}"
        assert all(error.message.strip() for error in exc.errors), exc.errors
        counted("refused")
        return None
    counted("returned")
    if isinstance(result, Rows):
        assert len(result.rows) == len(result.places)
        for problem in result.problems:
            assert problem.message.strip(), problem
            assert problem.index is None or 1 <= problem.index <= len(result.rows), problem
    return result


def counted(outcome: str) -> None:
    """Count ``outcome`` in ``--hypothesis-show-statistics``: how many inputs got how far."""
    if currently_in_test_context():
        event(outcome)


def encoded(text: str) -> bytes:
    """``text`` as UTF-8, lone surrogates kept as the invalid bytes a careless client sends."""
    return text.encode("utf-8", "surrogatepass")


# Text ------------------------------------------------------------------------

#: Lone surrogates: JSON can carry them, UTF-8 cannot.
surrogates = st.integers(0xD800, 0xDFFF).map(chr)
any_text = st.text(st.one_of(st.characters(), surrogates), max_size=20)


# CSV -------------------------------------------------------------------------

_CSV_PIECES = (
    "prompt",
    "Prompt",
    " model ",
    "echo",
    "assistant",
    "result",
    "status",
    "note",
    ",",
    '"',
    '""',
    "\r",
    "\n",
    "\r\n",
    "\x00",
    "\ufeff",
    " ",
    "\t",
    "\u2028",
    "${output.1}",
    "${output.0}",
)
csv_pieces = st.lists(st.sampled_from(_CSV_PIECES) | st.text(max_size=3), max_size=40).map("".join)


def csv_field(text: str, quoted: bool) -> str:
    return '"' + text.replace('"', '""') + '"' if quoted else text


@st.composite
def csv_tables(draw: st.DrawFn) -> str:
    """A CSV with a ``prompt`` column, cells holding quotes, line breaks, NUL; some rows ragged."""
    header = draw(
        st.lists(
            st.sampled_from(["model", "assistant", "note", "result", "", "prompt"]), max_size=4
        )
    )
    header.insert(draw(st.integers(0, len(header))), "prompt")
    cell = st.builds(csv_field, csv_pieces | any_text, st.booleans())
    width = len(header)
    rows = draw(st.lists(st.lists(cell, min_size=width - 1, max_size=width + 1), max_size=6))
    newline = draw(st.sampled_from(["\n", "\r\n", "\r"]))
    start = draw(st.sampled_from(["", "\ufeff", "\n\n", " ,\n"]))
    end = draw(st.sampled_from(["", newline, '"', "\x00"]))
    return start + newline.join(",".join(row) for row in [header, *rows]) + end


@st.composite
def huge_field_csvs(draw: st.DrawFn) -> str:
    """A CSV whose one field is up to 200,000 characters, quoted or not."""
    field = "x" * draw(st.integers(0, 200_000))
    return f"prompt,note\n{csv_field(field, draw(st.booleans()))},n\n"


@st.composite
def wide_csvs(draw: st.DrawFn) -> str:
    """A CSV of up to 2,000 columns."""
    width = draw(st.integers(1, 2_000))
    header = ",".join(["prompt", *(f"c{n}" for n in range(1, width))])
    return f"{header}\n{','.join(['p'] * width)}\n"


@st.composite
def valid_csvs(draw: st.DrawFn) -> str:
    """A CSV the csv module writes, of any prompts for the echo model: most of it valid."""
    rows = draw(
        st.lists(
            st.tuples(st.text(min_size=1, max_size=30), st.sampled_from(["echo", ""]), st.text()),
            min_size=1,
            max_size=5,
        )
    )
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["prompt", "model", "note"])
    writer.writerows(rows)
    return buffer.getvalue()


csv_texts = st.one_of(
    st.text(), csv_pieces, csv_tables(), huge_field_csvs(), wide_csvs(), valid_csvs()
)


# JSON ------------------------------------------------------------------------

json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | any_text
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(any_text, inner, max_size=3),
    max_leaves=10,
)
prompts = (
    st.sampled_from(
        ["Hi", "${output.1}", "${output.2} then ${output.1}", "${output.x}", "${ output.1 }", ""]
    )
    | any_text
    | json_values
)
models = st.sampled_from(["echo", "Echo", " echo ", "slow-echo", "gpt-9", ""]) | json_values


def merged(known: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    return {**extra, **known}


valid_executions = st.builds(
    merged,
    st.fixed_dictionaries(
        {
            "prompt": st.sampled_from(["Hi", "${output.1} again"]) | any_text,
            "model": st.just("echo"),
        }
    ),
    st.dictionaries(st.text(max_size=5), json_values, max_size=2),
)
executions = (
    st.builds(
        merged,
        st.fixed_dictionaries(
            {}, optional={"prompt": prompts, "model": models, "assistant": models}
        ),
        st.dictionaries(any_text, json_values, max_size=2),
    )
    | json_values
)
execution_lists = st.lists(valid_executions, max_size=6) | st.lists(executions, max_size=6)
json_documents = st.one_of(
    st.fixed_dictionaries({"executions": execution_lists}),
    st.fixed_dictionaries({"executions": json_values}),
    json_values,
)
_JSON_PIECES = (
    "{",
    "}",
    "[",
    "]",
    '"executions"',
    ":",
    ",",
    '"prompt"',
    '"x"',
    "1",
    "-",
    "1e999",
    "NaN",
    "Infinity",
    '"\\ud800"',
    '"\\udc00\\ud800"',
    '"\\u12"',
    '"\\x"',
    "\n",
    "\r\n",
    "null",
    "true",
    " ",
    "\ufeff",
)
json_pieces = st.lists(st.sampled_from(_JSON_PIECES) | st.text(max_size=2), max_size=30).map(
    "".join
)
#: Where a deep or huge value goes; ``@`` marks the spot.
_JSON_SPOTS = (
    "@",
    '{"executions": @}',
    '{"executions": [@]}',
    '{"executions": [{"prompt": @}]}',
    '{"executions": [{"prompt": "x", "model": "echo", "extra": @}]}',
)


@st.composite
def deep_json(draw: st.DrawFn) -> str:
    """A value nested up to 12,000 deep, closed or not, at one of ``_JSON_SPOTS``."""
    depth = draw(st.integers(0, 12_000))
    opener, closer = draw(st.sampled_from([("[", "]"), ('{"a": ', "}")]))
    value = opener * depth + ("1" + closer * depth if draw(st.booleans()) else "")
    return draw(st.sampled_from(_JSON_SPOTS)).replace("@", value)


@st.composite
def huge_number_json(draw: st.DrawFn) -> str:
    """A number of 4,000 to 6,000 digits (Python refuses past 4,300), at one of ``_JSON_SPOTS``."""
    digits = "9" * draw(st.integers(4_000, 6_000))
    number = draw(st.sampled_from(["@", "-@", "0.@", "1e@", "@.5"])).replace("@", digits)
    return draw(st.sampled_from(_JSON_SPOTS)).replace("@", number)


json_texts = st.one_of(
    st.builds(json.dumps, json_documents, ensure_ascii=st.booleans()),
    json_pieces,
    deep_json(),
    huge_number_json(),
    st.text(),
)
jsonl_texts = st.one_of(
    st.lists(
        st.one_of(st.builds(json.dumps, executions), json_pieces, huge_number_json()),
        max_size=5,
    ).map("\n".join),
    deep_json(),
    st.text(),
)


# XLSX ------------------------------------------------------------------------

_MAIN_NS = "http://schemas.openxmlformats.org/spreadsheetml/2006/main"
_REL_NS = "http://schemas.openxmlformats.org/officeDocument/2006/relationships"
_PKG_NS = "http://schemas.openxmlformats.org/package/2006/relationships"
_SPREADSHEET = "application/vnd.openxmlformats-officedocument.spreadsheetml"
_RELATIONSHIPS = "application/vnd.openxmlformats-package.relationships+xml"
_CONTENT_TYPES = (
    '<Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types">'
    f'<Default Extension="rels" ContentType="{_RELATIONSHIPS}"/>'
    '<Default Extension="xml" ContentType="application/xml"/>'
    f'<Override PartName="/xl/workbook.xml" ContentType="{_SPREADSHEET}.sheet.main+xml"/>'
    f'<Override PartName="/xl/worksheets/sheet1.xml" ContentType="{_SPREADSHEET}.worksheet+xml"/>'
    f'<Override PartName="/xl/sharedStrings.xml" ContentType="{_SPREADSHEET}.sharedStrings+xml"/>'
    "</Types>"
)
_ROOT_RELS = (
    f'<Relationships xmlns="{_PKG_NS}"><Relationship Id="rId1" '
    f'Type="{_REL_NS}/officeDocument" Target="xl/workbook.xml"/></Relationships>'
)
_WORKBOOK_RELS = (
    f'<Relationships xmlns="{_PKG_NS}"><Relationship Id="rId1" '
    f'Type="{_REL_NS}/worksheet" Target="worksheets/sheet1.xml"/></Relationships>'
)
_SHEET = "xl/worksheets/sheet1.xml"
_STRINGS = "xl/sharedStrings.xml"


def workbook_parts(title: str, sheet_data: str, strings: list[str]) -> dict[str, str]:
    """The parts of a one-sheet workbook, as few as openpyxl reads, by their names in the zip."""
    return {
        "[Content_Types].xml": _CONTENT_TYPES,
        "_rels/.rels": _ROOT_RELS,
        "xl/workbook.xml": (
            f'<workbook xmlns="{_MAIN_NS}" xmlns:r="{_REL_NS}"><sheets>'
            f'<sheet name={quoteattr(title)} sheetId="1" r:id="rId1"/></sheets></workbook>'
        ),
        "xl/_rels/workbook.xml.rels": _WORKBOOK_RELS,
        _SHEET: f'<worksheet xmlns="{_MAIN_NS}"><sheetData>{sheet_data}</sheetData></worksheet>',
        _STRINGS: f'<sst xmlns="{_MAIN_NS}">'
        + "".join(f"<si><t>{escape(text)}</t></si>" for text in strings)
        + "</sst>",
    }


#: The date of every part of every zip made here (the zip format's first day).
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)
#: What openpyxl writes as a workbook's creation and change times.
_TIMESTAMP = re.compile(rb"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")


def zipped(parts: dict[str, str] | dict[str, bytes]) -> bytes:
    """A zip of ``parts``, the same bytes every time: Hypothesis replays each example exactly."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, content in parts.items():
            info = zipfile.ZipInfo(name, date_time=_ZIP_DATE)
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, encoded(content) if isinstance(content, str) else content)
    return buffer.getvalue()


def text_row(number: int, *texts: str) -> str:
    """A ``<row>`` of inline strings from column A, as a sheet's XML holds it."""
    cells = "".join(
        f'<c r="{letter}{number}" t="inlineStr"><is><t>{text}</t></is></c>'
        for letter, text in zip("ABCDEFGHIJ", texts, strict=False)
    )
    return f'<row r="{number}">{cells}</row>'


#: Text XML can hold; other text (control characters, lone surrogates) makes a
#: sheet that does not parse at all, which cut-short XML covers already.
xml_text = st.text(st.characters(exclude_categories=("Cc", "Cs")), max_size=20)
cell_texts = st.sampled_from(["prompt", "model", "echo", "note", "result", " ", ""]) | xml_text
columns = st.sampled_from(["A", "B", "Z", "AA", "XFD", "XFE", "ZZZ", "AAAA", "", "a", "1"]) | (
    st.integers(0, 20_000).map(column_letter)
)
row_numbers = st.integers(-2, 2_000_000_000).map(str) | st.sampled_from(
    ["", "x", "1.5", "0", "99999999999999999999"]
)
#: A cell's ``t`` attribute (None: no attribute), and the values to try with it.
_CELL_VALUES: dict[str | None, st.SearchStrategy[str]] = {
    "inlineStr": cell_texts,
    "str": cell_texts,
    # Shared-string indexes, most of them out of range.
    "s": st.integers(-2, 10**12).map(str) | st.sampled_from(["0", "1", "x", ""]),
    "n": st.sampled_from(["1", "1.5", "-0", "1e308", "1e309", "NaN", "abc", "", "9" * 400]),
    None: st.sampled_from(["7", "7.0", "2.5", "x", ""]),
    "b": st.sampled_from(["0", "1", "2", "x", ""]),
    "e": st.sampled_from(["#DIV/0!", "#N/A", ""]),
    "d": st.sampled_from(["2024-01-02", "2024-01-02T03:04:05", "2024-13-45", "x", ""]),
    "bogus": cell_texts,
}


@st.composite
def cell_xml(draw: st.DrawFn, row: str) -> str:
    kind = draw(st.sampled_from(list(_CELL_VALUES)))
    value = escape(draw(_CELL_VALUES[kind]))
    attributes = ""
    if draw(st.integers(0, 9)):  # mostly a reference, in its row or another
        attributes += f' r="{draw(columns)}{draw(st.just(row) | row_numbers)}"'
    if kind is not None:
        attributes += f' t="{kind}"'
    if draw(st.integers(0, 4)) == 0:  # a style that may not exist
        attributes += f' s="{draw(st.integers(0, 100))}"'
    if kind == "inlineStr":
        return f"<c{attributes}><is><t>{value}</t></is></c>"
    return f"<c{attributes}><v>{value}</v></c>" if value else f"<c{attributes}/>"


@st.composite
def row_xml(draw: st.DrawFn) -> str:
    number = draw(row_numbers)
    attributes = f' r="{number}"' if draw(st.integers(0, 9)) else ""
    cells = draw(st.lists(cell_xml(number), max_size=5))
    return f"<row{attributes}>{''.join(cells)}</row>" if cells else f"<row{attributes}/>"


@st.composite
def far_rows_workbooks(draw: st.DrawFn) -> bytes:
    """A readable workbook of rows numbered up to two billion, blank cells out to XFD and past."""
    numbers = sorted(draw(st.sets(st.integers(2, 2_000_000_000), min_size=1, max_size=4)))
    blank = draw(st.sampled_from(["", '<c r="XFD{}"/>', '<c r="AAAA{}"/>']))
    sheet_data = text_row(1, "prompt", "note") + "".join(
        text_row(n, *draw(st.lists(cell_texts.map(escape), max_size=2))).replace(
            "</row>", blank.format(n) + "</row>"
        )
        for n in numbers
    )
    return zipped(workbook_parts("Results", sheet_data, []))


@st.composite
def handmade_workbooks(draw: st.DrawFn) -> bytes:
    """A workbook from hand-written XML: any rows and cells, perhaps a part missing."""
    header = draw(st.sampled_from(["", text_row(1, "prompt"), text_row(1, "prompt", "model")]))
    sheet_data = header + "".join(draw(st.lists(row_xml(), max_size=6)))
    title = draw(st.sampled_from(["S", "Results", "RESULTS", "'", "x" * 40]) | xml_text)
    parts = workbook_parts(title, sheet_data, draw(st.lists(cell_texts, max_size=3)))
    for name in draw(st.sets(st.sampled_from(sorted(parts)), max_size=2)):
        if draw(st.integers(0, 2)) == 0:
            del parts[name]
    if draw(st.integers(0, 5)) == 0:  # XML cut short
        sheet = parts.get(_SHEET, "")
        parts[_SHEET] = sheet[: draw(st.integers(0, len(sheet)))]
    return zipped(parts)


_WORKBOOK_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**15), 10**15),
    st.floats(allow_nan=False, allow_infinity=False),
    # openpyxl refuses to write control characters.
    st.text(st.characters(codec="utf-8", exclude_categories=("Cc", "Cs")), max_size=20),
    st.sampled_from(["prompt", "model", "echo", "result", "=1+1", "Results"]),
    st.datetimes(min_value=datetime.datetime(1900, 3, 1)),
)


@st.composite
def openpyxl_workbooks(draw: st.DrawFn) -> bytes:
    """A workbook openpyxl writes (write-only, so fast), of any values, mostly under a header."""
    title = draw(st.sampled_from(["Sheet", "Results", "results"]))
    header = [["prompt", "model", "note"]] if draw(st.integers(0, 3)) else []
    rows = draw(st.lists(st.lists(_WORKBOOK_VALUES, max_size=3), max_size=5))
    # Drawn first: a write-only workbook left unsaved when a draw gives up fails as it is collected.
    book = openpyxl.Workbook(write_only=True)
    sheet = book.create_sheet(title)
    for row in header + rows:
        sheet.append(row)
    buffer = io.BytesIO()
    book.save(buffer)
    with zipfile.ZipFile(buffer) as archive:
        parts = {
            info.filename: _TIMESTAMP.sub(b"2024-01-02T03:04:05Z", archive.read(info))
            for info in archive.infolist()
        }
    return zipped(parts)


#: Offsets, in a zip's central directory entry, of the fields a damaged zip gets
#: wrong: versions, flags, method, sizes, name length, local header offset.
_CENTRAL_FIELDS = (4, 5, 6, 7, 8, 9, 10, 20, 24, 28, 42)
#: Offsets, in the end of central directory record: disks, entry counts, size, offset.
_END_FIELDS = (4, 6, 8, 10, 12, 16)
#: Where a central directory entry's file name starts.
_CENTRAL_NAME = 46
#: Bytes that sit on the edges of what a zip header field means (0x08 in the
#: high flag byte: UTF-8 names; past 63 in a version byte: unknown versions).
_EDGE_BYTES = st.sampled_from([0x00, 0x01, 0x08, 0x3F, 0x40, 0x7F, 0x80, 0xFF])


def _offsets(data: bytes | bytearray, signature: bytes) -> list[int]:
    return [match.start() for match in re.finditer(re.escape(signature), data)]


@st.composite
def damaged(draw: st.DrawFn, data: bytes) -> bytes:
    """``data`` with a byte changed anywhere or in a zip header field, or cut short."""
    buffer = bytearray(data)
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["byte", "central", "name", "end", "cut"]))
        entries = _offsets(buffer, b"PK\x01\x02") if kind in ("central", "name") else []
        ends = _offsets(buffer, b"PK\x05\x06") if kind == "end" else []
        if kind == "central" and entries:
            at = draw(st.sampled_from(entries)) + draw(st.sampled_from(_CENTRAL_FIELDS))
        elif kind == "name" and entries:
            at = draw(st.sampled_from(entries)) + _CENTRAL_NAME + draw(st.integers(0, 3))
        elif kind == "end" and ends:
            at = draw(st.sampled_from(ends)) + draw(st.sampled_from(_END_FIELDS))
        elif kind == "cut":
            del buffer[draw(st.integers(0, len(buffer))) :]
            continue
        elif buffer:
            at = draw(st.integers(0, len(buffer) - 1))
        else:
            continue
        if at < len(buffer):
            buffer[at] = draw(_EDGE_BYTES | st.integers(0, 255))
    return bytes(buffer)


xlsx_bytes = st.one_of(
    far_rows_workbooks(),
    handmade_workbooks(),
    handmade_workbooks().flatmap(damaged),
    openpyxl_workbooks(),
    openpyxl_workbooks().flatmap(damaged),
    st.binary(),
    st.binary().map(b"PK\x03\x04".__add__),
)


# Parsers, called directly -------------------------------------------------------


@PARSER
@given(
    text=csv_texts,
    max_field_chars=st.integers(1, 300_000),
    max_columns=st.none() | st.integers(1, 300),
)
def test_csv_parser_returns_or_names_the_problem(text, max_field_chars, max_columns):
    with csv_field_limit_kept():
        table = returned_or_named(
            lambda: parse_csv(text, max_field_chars=max_field_chars, max_columns=max_columns)
        )
    if table is not None:
        assert "prompt" in table.columns
        assert len(table.rows) == len(table.lines) > 0
        assert all(set(row) == set(table.columns) for row in table.rows)


@PARSER
@given(json_texts)
def test_json_parser_returns_or_names_the_problem(text):
    returned_or_named(lambda: parse_json(text))


@PARSER
@given(jsonl_texts)
def test_jsonl_parser_returns_or_names_the_problem(text):
    returned_or_named(lambda: parse_jsonl(text))


@PARSER
@given(
    st.one_of(
        st.binary(),
        json_texts.map(encoded),
        jsonl_texts.map(encoded),
        csv_texts.map(encoded),
        st.binary().map(b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1".__add__),
        st.binary().map(b"\xef\xbb\xbf".__add__),
    )
)
def test_sniffed_content_reads_as_its_format_or_names_the_problem(data):
    """Whatever ``sniff`` calls content, reading it as that returns or says what is wrong."""
    fmt = returned_or_named(lambda: sniff(data))
    if fmt is not None:
        with csv_field_limit_kept():
            returned_or_named(
                lambda: read_rows(
                    data, fmt, max_rows=100, max_columns=256, max_cells=10_000, timeout_s=5
                )
            )


#: Pieces of references, among them digits ``str.isdigit`` takes that are not
#: ASCII (superscript two, Arabic-Indic one) and a number of 19 digits.
_REFERENCE_PIECES = (
    "${",
    "output.",
    "}",
    "${output.",
    "1",
    "0",
    "-1",
    "9" * 19,
    " ",
    "\u00b2",
    "\u0661",
)


@PARSER
@given(st.lists(st.sampled_from(_REFERENCE_PIECES) | st.text(max_size=3), max_size=12).map("".join))
def test_references_are_row_numbers_or_a_template_error(prompt):
    try:
        found = references(prompt)
    except TemplateError as exc:
        assert str(exc).strip()
        return
    assert all(isinstance(number, int) and number >= 1 for number in found)


@WORKBOOK
@given(
    data=xlsx_bytes,
    max_rows=st.none() | st.integers(1, 10),
    # Mostly the route's kind of limit, which workbooks here never reach.
    max_unzipped_bytes=st.sampled_from([10_000_000, 10_000_000, 10_000_000, None, 2_000]),
    max_columns=st.none() | st.integers(1, 300),
    max_cells=st.sampled_from([None, 100_000]) | st.integers(1, 1_000),
)
def test_xlsx_parser_returns_or_names_the_problem(
    data, max_rows, max_unzipped_bytes, max_columns, max_cells
):
    started = time.monotonic()
    rows = returned_or_named(
        lambda: parse_xlsx(
            data,
            max_rows=max_rows,
            max_unzipped_bytes=max_unzipped_bytes,
            max_columns=max_columns,
            max_cells=max_cells,
            timeout_s=PARSE_TIMEOUT_S,
        )
    )
    assert time.monotonic() - started < PARSE_TIMEOUT_S + 1
    if rows is not None:
        assert rows.rows
        assert max_rows is None or len(rows.rows) <= max_rows


# Inputs the fuzzing above could miss -------------------------------------------------


def foreign_error(parse: Callable[[], object]) -> str | None:
    """The type of the exception ``parse()`` raises that names no problem; None if none."""
    try:
        returned_or_named(parse)
    except Exception as exc:
        return type(exc).__name__
    return None


def test_json_nested_to_every_depth_near_the_recursion_limit_names_the_problem():
    # Reading a value reaches a little deeper than writing it back as a cell, and
    # where depends on the stack of the caller: so every depth, not a sample.
    failures: dict[str, str] = {}
    for depth in range(1, sys.getrecursionlimit() + 50):
        execution = '{"prompt": "x", "model": "echo", "extra": ' + "[" * depth + "]" * depth + "}"
        document = '{"executions": [' + execution + "]}"
        for parse, text in ((parse_json, document), (parse_jsonl, execution)):
            error = foreign_error(functools.partial(parse, text))
            if error is not None:
                failures[f"{parse.__name__} at depth {depth}"] = error
    assert failures == {}


def with_central_byte(data: bytes, offset: int, value: int) -> bytes:
    """``data`` with byte ``offset`` of its first central directory entry set to ``value``."""
    buffer = bytearray(data)
    buffer[data.index(b"PK\x01\x02") + offset] = value
    return bytes(buffer)


_READABLE = zipped(workbook_parts("S", text_row(1, "prompt") + text_row(2, "Hi"), []))
#: Zip headers that make ``zipfile`` raise something other than ``BadZipFile``.
ZIPS_THE_ZIP_MODULE_REFUSES = {
    # "Version needed to extract" 6.4: NotImplementedError.
    "unknown-zip-version": with_central_byte(_READABLE, 6, 64),
    # The UTF-8 name flag on a name that is not UTF-8: UnicodeDecodeError.
    "undecodable-name": with_central_byte(
        with_central_byte(_READABLE, 9, 0x08), _CENTRAL_NAME, 0xFF
    ),
}


@pytest.mark.parametrize(
    "data", ZIPS_THE_ZIP_MODULE_REFUSES.values(), ids=ZIPS_THE_ZIP_MODULE_REFUSES.keys()
)
def test_zips_the_zip_module_refuses_are_input_errors(data):
    assert foreign_error(lambda: parse_xlsx(data)) is None
    assert foreign_error(lambda: parse_xlsx(data, max_unzipped_bytes=10_000_000)) is None


def test_one_row_of_many_empty_cells_is_refused_within_the_time_limit():
    # 600,000 empty cells in one row: 2.4 MB of XML, 10 KB zipped. max_cells and
    # timeout_s must bound one huge row as they bound many rows.
    sheet_data = text_row(1, "prompt") + '<row r="2">' + "<c/>" * 600_000 + "</row>"
    data = zipped(workbook_parts("S", sheet_data, []))
    timeout_s = 0.05
    started = time.monotonic()
    assert foreign_error(lambda: parse_xlsx(data, max_cells=1_000, timeout_s=timeout_s)) is None
    assert time.monotonic() - started < 5 * timeout_s


# Routes, through the real app -------------------------------------------------------


def route_settings(folder: Path) -> Settings:
    """Settings apart from the machine's, results under ``folder``, echo as the default model."""
    return Settings(
        _env_file=None,
        public_dir=folder / "public",
        default_model="echo",
        max_body_bytes=MAX_BODY_BYTES,
        shutdown_grace_s=0,
    )


def on_fresh_app(folder: Path, scenario: Callable[[TestClient[Any, Any]], Awaitable[None]]) -> None:
    """Run ``scenario`` against a new app: no example sees what an earlier one left."""

    async def run() -> None:
        async with TestClient(TestServer(create_app(route_settings(folder)))) as client:
            await scenario(client)

    asyncio.run(run())


async def answered(request: Awaitable[aiohttp.ClientResponse]) -> tuple[int, Any]:
    """The status and JSON body of ``request``: checked below 500, in time, with a ``detail``."""
    async with asyncio.timeout(REQUEST_TIMEOUT_S):
        response = await request
        body = await response.read()
    counted(f"{response.url.path} {response.status}")
    assert response.status < 500, f"{response.status}: {body[:500]!r}"
    document = json.loads(body) if body else None
    if response.status >= 400:
        assert isinstance(document, dict), body[:500]
        detail = document.get("detail")
        assert isinstance(detail, str), document
        assert detail.strip(), document
    return response.status, document


async def check_results(client: TestClient[Any, Any], invocation_id: str) -> dict[str, Any]:
    """Wait for a started batch to end; its results must then read back, every row ended."""
    async with asyncio.timeout(REQUEST_TIMEOUT_S):
        document = await finished(client, invocation_id)
    assert document["status"] in ("completed", "failed"), document
    assert document["progress"]["total"] == len(document["executions"]), document
    return document


_RAW_BODIES = (
    b"",
    b" ",
    b"\xff",
    b'{"executions": "\xff"}',
    b"\xef\xbb\xbf{}",
    b"[" * 10_000,
    b'{"executions": [' + b"9" * 5_000 + b"]}",
    b'{"invocation_id": ' + b"1" * 5_000 + b"}",
    b"null",
    b'{"csv_content": null}',
    b"x" * (MAX_BODY_BYTES + 1),
    # Past 64 KiB a body is parsed on the input pool's threads, not the loop.
    b'{"pad": "' + b"x" * 70_000 + b'", "executions": ' + b"[" * 10_000 + b"}",
    b'{"pad": "' + b"x" * 70_000 + b'", "executions": [' + b"9" * 5_000 + b"]}",
)
results_documents = st.fixed_dictionaries(
    {
        "invocation_id": st.sampled_from(["", "x" * 201, "../../etc/passwd", "\x00"])
        | any_text
        | json_values
    }
)
process_csv_documents = st.fixed_dictionaries(
    {"csv_content": csv_texts | json_values}, optional={"execute": st.just(False) | json_values}
)
route_bodies = st.one_of(
    st.builds(
        json.dumps,
        json_documents | results_documents | process_csv_documents,
        ensure_ascii=st.booleans(),
    ).map(encoded),
    json_texts.map(encoded),
    st.binary(),
    st.sampled_from(_RAW_BODIES),
)
JSON_ROUTES = (
    EXECUTE_BATCH,
    PROCESS_CSV,
    RESULTS,
    RESULTS + "/",
    CANCEL,
    RETRY,
)


@ROUTE
@pytest.mark.parametrize("path", JSON_ROUTES)
@given(body=route_bodies, content_type=st.sampled_from(["application/json", "text/plain"]))
def test_json_routes_answer_any_body_below_500_with_a_detail(tmp_path, path, body, content_type):
    async def scenario(client: TestClient[Any, Any]) -> None:
        headers = {**AUTH, "Content-Type": content_type}
        await answered(client.post(path, data=body, headers=headers))

    on_fresh_app(tmp_path, scenario)


@ROUTE
@given(execution_lists)
def test_execute_batch_runs_or_refuses_any_executions(tmp_path, items):
    async def scenario(client: TestClient[Any, Any]) -> None:
        status, document = await answered(
            client.post(EXECUTE_BATCH, json={"executions": items}, headers=AUTH)
        )
        if status == 200:
            results = await check_results(client, document["invocationId"])
            assert results["progress"]["total"] == len(items)

    on_fresh_app(tmp_path, scenario)


@ROUTE
@given(csv_content=csv_texts, execute=st.booleans())
def test_process_csv_runs_or_refuses_any_csv(tmp_path, csv_content, execute):
    async def scenario(client: TestClient[Any, Any]) -> None:
        body = {"csv_content": csv_content, "execute": execute}
        status, document = await answered(client.post(PROCESS_CSV, json=body, headers=AUTH))
        if status == 200 and execute:
            await check_results(client, document["invocationId"])

    on_fresh_app(tmp_path, scenario)


uploaded_files = st.one_of(
    valid_csvs().map(encoded),
    openpyxl_workbooks(),
    csv_texts.map(encoded),
    xlsx_bytes,
    json_texts.map(encoded),
    st.binary(),
)
file_names = st.none() | st.sampled_from(
    ["prompts.csv", "batch.XLSX", "book.xlsm", "rows.json", "rows.jsonl", "old.xls", "noext", ""]
)
execute_fields = st.none() | st.sampled_from(["false", "0", "", " FALSE ", "maybe", "true"])


@ROUTE
@given(
    data=uploaded_files,
    filename=file_names,
    execute=execute_fields,
    field_name=st.sampled_from(["file", "file", "file", "File", "other"]),
)
def test_upload_of_any_file_answers_below_500_with_a_detail(
    tmp_path, data, filename, execute, field_name
):
    async def scenario(client: TestClient[Any, Any]) -> None:
        form = aiohttp.FormData()
        # A stream rather than bytes, so that a part with no filename is still a file part.
        form.add_field(
            field_name, io.BytesIO(data), filename=filename, content_type="application/octet-stream"
        )
        if execute is not None:
            form.add_field("execute", execute)
        status, document = await answered(client.post(UPLOAD, data=form, headers=AUTH))
        if status == 200 and execute and execute.strip() == "true":
            await check_results(client, document["invocationId"])

    on_fresh_app(tmp_path, scenario)


_BOUNDARY = "fuzzboundary"
_PART_HEADERS = (
    'Content-Disposition: form-data; name="file"; filename="prompts.csv"',
    'Content-Disposition: form-data; name="file"; filename="book.xlsx"',
    'Content-Disposition: form-data; name="file"',
    'Content-Disposition: form-data; name="execute"',
    "Content-Disposition: form-data; name=file",
    "Content-Disposition: form-data; name=\"file\"; filename*=utf-8''%ff%fe.csv",
    'Content-Disposition: form-data; name="file"; name="execute"',
    "Content-Disposition: attachment",
    "Content-Disposition: ;;;",
    "Content-Disposition: form-data; name",
    "Content-Disposition:",
    "Content-Type: multipart/mixed",
    f"Content-Type: multipart/mixed; boundary={_BOUNDARY}",
    "Content-Type: text/csv; charset=latin-1",
    "Content-Transfer-Encoding: base64",
    "Content-Transfer-Encoding: quoted-printable",
    "Content-Encoding: gzip",
    "Content-Length: -1",
    "Content-Length: 99999999999999999999",
    "a header line without a colon",
    " folded continuation",
    "X-Long: " + "a" * 9_000,
    "X-Nul: \x00",
    "X-Latin: \xe9",
    "",
)
_PART_BODIES = (
    "prompt\nHello\n",
    "prompt,model\nHi,echo\n${output.1},echo\n",
    "true",
    "maybe",
    "",
    f"--{_BOUNDARY}",
    "\r\n\r\n",
    "\x00\xff",
)
_DELIMITER = f"--{_BOUNDARY}\r\n"
_WRONG_DELIMITERS = (f"--{_BOUNDARY}\n", f"--{_BOUNDARY}--\r\n", "--other\r\n", "")
_ENDS = (f"\r\n--{_BOUNDARY}--\r\n", f"\r\n--{_BOUNDARY}--", f"\r\n--{_BOUNDARY}\r\n", "\r\n", "")
_CONTENT_TYPE = f"multipart/form-data; boundary={_BOUNDARY}"
_WRONG_CONTENT_TYPES = (
    f'multipart/form-data; boundary="{_BOUNDARY}"',
    "multipart/form-data",
    "multipart/form-data; boundary=",
    "multipart/form-data; boundary=" + "b" * 80,
    f"multipart/mixed; boundary={_BOUNDARY}",
    "text/csv",
    "application/json",
    "application/x-www-form-urlencoded",
)


@st.composite
def raw_multipart(draw: st.DrawFn) -> bytes:
    """A hand-made multipart body: broken part headers, missing or wrong delimiters."""
    body = ""
    for _ in range(draw(st.integers(0, 3))):
        headers = draw(st.lists(st.sampled_from(_PART_HEADERS), max_size=3))
        content = draw(st.sampled_from(_PART_BODIES) | st.text(max_size=20))
        delimiter = draw(st.just(_DELIMITER) | st.sampled_from(_WRONG_DELIMITERS))
        body += delimiter + "".join(f"{header}\r\n" for header in headers)
        body += draw(st.sampled_from(["\r\n", "\n", ""])) + content
        body += draw(st.sampled_from(["\r\n", ""]))
    body += draw(st.sampled_from(_ENDS))
    # Latin-1: each character one byte, so "\xe9" and "\xff" go out as raw bytes.
    return encoded(body) if draw(st.booleans()) else body.encode("latin-1", "replace")


@ROUTE
@pytest.mark.filterwarnings("ignore::aiohttp.BadContentDispositionHeader")
@pytest.mark.filterwarnings("ignore::aiohttp.BadContentDispositionParam")
@given(
    body=raw_multipart() | st.binary(),
    # Mostly the right one, or the parts are never read.
    content_type=st.just(_CONTENT_TYPE) | st.sampled_from(_WRONG_CONTENT_TYPES),
)
def test_upload_of_broken_multipart_answers_below_500_with_a_detail(tmp_path, body, content_type):
    async def scenario(client: TestClient[Any, Any]) -> None:
        headers = {**AUTH, "Content-Type": content_type}
        await answered(client.post(UPLOAD, data=body, headers=headers))

    on_fresh_app(tmp_path, scenario)


@pytest.mark.parametrize(
    "data", ZIPS_THE_ZIP_MODULE_REFUSES.values(), ids=ZIPS_THE_ZIP_MODULE_REFUSES.keys()
)
def test_upload_of_a_zip_the_zip_module_refuses_answers_below_500(tmp_path, data):
    async def scenario(client: TestClient[Any, Any]) -> None:
        form = aiohttp.FormData()
        form.add_field("file", io.BytesIO(data), filename="book.xlsx")
        await answered(client.post(UPLOAD, data=form, headers=AUTH))

    on_fresh_app(tmp_path, scenario)
