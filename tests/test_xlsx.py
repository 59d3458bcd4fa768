"""The XLSX writer, read back by openpyxl and by batchexec's reader: any text survives,
nothing becomes code.

Text is written as OOXML holds it: control characters (and literal ``_xHHHH_``
text) as ``_xHHHH_`` escapes, which Excel and ``batchexec.xlsxinput`` decode and
plain openpyxl shows as written; everything else reads back as it is.
"""

from __future__ import annotations

import asyncio
import errno
import math
import os
import re
import tempfile
import zipfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import openpyxl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openpyxl.utils.escape import unescape

from batchexec import exports, xlsx
from batchexec.exports import Sheet, write_xlsx
from batchexec.xlsx import CELL_LIMIT, Cell, column_letter, fit, write_sheet
from batchexec.xlsxinput import read_sheet
from tests.helpers import sheet_rows

#: What the writer replaces: lone surrogates and the two non-characters (control
#: characters are kept, as OOXML escapes).
_REPLACED = re.compile("[\ud800-\udfff\ufffe\uffff]")

Writer = Callable[[Path, Sequence[str], Sequence[Sequence[Cell]]], None]


def via_write_sheet(path: Path, header: Sequence[str], rows: Sequence[Sequence[Cell]]) -> None:
    write_sheet(str(path), "Results", header, rows, [12.0] * len(header))


def via_write_xlsx(path: Path, header: Sequence[str], rows: Sequence[Sequence[Cell]]) -> None:
    # The command line's workbooks, and the server's small ones, go through write_xlsx.
    write_xlsx(path, Sheet(list(header), [list(row) for row in rows]))


def via_writer_process(path: Path, header: Sequence[str], rows: Sequence[Sequence[Cell]]) -> None:
    # The server's large workbooks: rows sent through a pipe to a process of their own.
    sheet = Sheet(list(header), [list(row) for row in rows])
    asyncio.run(exports.write_workbook(path, sheet))


@pytest.fixture(
    params=[via_write_sheet, via_write_xlsx, via_writer_process],
    ids=["write_sheet", "write_xlsx", "writer_process"],
)
def writer(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Writer:
    chosen: Writer = request.param
    if chosen is via_writer_process:
        monkeypatch.setattr(exports, "_APART_ROWS", 0)
    return chosen


def decoded(value: object) -> object:
    """A cell as Excel shows it: OOXML's _xHHHH_ escapes decoded."""
    return unescape(value) if isinstance(value, str) else value


def written(tmp_path: Path, header: list[str], rows: list[list[Cell]]) -> list[list[object]]:
    path = tmp_path / "book.xlsx"
    write_sheet(str(path), "Results", header, rows, [12.0] * len(header))
    return sheet_rows(path, padded=True)


#: Characters past U+FFFF that are not emoji: Fraktur letters, CJK extension B, plane 16.
_ASTRAL = "astral \U0001d518\U0001d52b \U00020000 \U0010fffd"
#: (text written, text read back by Excel and batchexec's reader, text plain openpyxl
#: shows when it differs).
TEXTS: list[tuple[str, str, str | None]] = [
    ("_x0041_ is not A", "_x0041_ is not A", "_x005F_x0041_ is not A"),
    ("_x0041_x0042_", "_x0041_x0042_", "_x005F_x0041_x005F_x0042_"),
    ("_x005F_x0041_", "_x005F_x0041_", "_x005F_x005F_x005F_x0041_"),
    ("_x00_ and _xZZZZ_ and _X0041_", "_x00_ and _xZZZZ_ and _X0041_", None),
    ("soh \x01 us \x1f nul \x00 bell \x07", "soh \x01 us \x1f nul \x00 bell \x07", None),
    ("a\tb", "a\tb", None),
    ("a\rb", "a\rb", "a_x000D_b"),
    ("a\nb", "a\nb", None),
    ("\r\n", "\r\n", "_x000D_\n"),
    ("\tlead and trail ", "\tlead and trail ", None),
    ("=1+1", "=1+1", None),
    ('=HYPERLINK("http://example.com","x")', '=HYPERLINK("http://example.com","x")', None),
    ("+1", "+1", None),
    ("-1", "-1", None),
    ("@x", "@x", None),
    ("http://example.com", "http://example.com", None),
    ("mailto:a@example.com", "mailto:a@example.com", None),
    ("0123", "0123", None),
    ("1e5", "1e5", None),
    ("TRUE", "TRUE", None),
    ("emoji 😀👍🏽🇫🇷", "emoji 😀👍🏽🇫🇷", None),
    (_ASTRAL, _ASTRAL, None),
    ("lone \ud800 high, \udfff low", "lone \ufffd high, \ufffd low", None),
    ("non-characters \ufffe \uffff", "non-characters \ufffd \ufffd", None),
    ("<b>&amp;</b> ]]><x/>", "<b>&amp;</b> ]]><x/>", None),
    # xlsxwriter writes text shaped like this as raw rich-text XML; batchexec does not.
    ("<r>&</r>", "<r>&</r>", "_x003C_r>&</r>"),
    (
        '<r><t>a</t></r></is></c><c r="B2"><f>1+1</f></c><c r="C2" t="inlineStr"><is><r>',
        '<r><t>a</t></r></is></c><c r="B2"><f>1+1</f></c><c r="C2" t="inlineStr"><is><r>',
        None,
    ),
    (
        '<r><t>a</t></r></is></c><c r="B2"><f>1+1</f></c><c r="C2"><is><r><t>b</t></r>',
        '<r><t>a</t></r></is></c><c r="B2"><f>1+1</f></c><c r="C2"><is><r><t>b</t></r>',
        '_x003C_r><t>a</t></r></is></c><c r="B2"><f>1+1</f></c><c r="C2"><is><r><t>b</t></r>',
    ),
]


def _raw(text: str, shown: str, raw: str | None) -> str:
    if raw is not None:
        return raw
    # Control characters other than tab and LF are escaped; nothing else differs.
    return re.sub("[\x00-\x08\x0b-\x1f]", lambda m: f"_x{ord(m[0]):04X}_", shown)


def test_every_text_reads_back_as_documented(tmp_path, writer):
    path = tmp_path / "book.xlsx"
    writer(path, ["n", "prompt"], [[n, text] for n, (text, _, _) in enumerate(TEXTS)])
    sheet = openpyxl.load_workbook(path)["Results"]
    for n, (text, shown, raw) in enumerate(TEXTS, start=2):
        cell = sheet.cell(n, 2)
        assert cell.data_type == "s", text
        assert cell.hyperlink is None, text
        assert cell.value == _raw(text, shown, raw), text
        assert unescape(cell.value) == shown, text
    # One sheet, one cell a text: nothing injected (no formula, no third column).
    assert sheet.max_column == 2
    assert sheet.max_row == len(TEXTS) + 1
    assert all(cell.data_type != "f" for row in sheet.iter_rows() for cell in row)

    table = read_sheet(path.read_bytes())
    assert table.columns == ("n", "prompt")
    assert [row["prompt"] for row in table.rows] == [shown for _, shown, _ in TEXTS]
    assert [row["n"] for row in table.rows] == list(range(len(TEXTS)))  # numbers stay numbers


def test_read_only_openpyxl_reads_the_same_cells(tmp_path, writer):
    path = tmp_path / "book.xlsx"
    writer(path, ["n", "prompt"], [[n, text] for n, (text, _, _) in enumerate(TEXTS)])
    rows = sheet_rows(path)
    assert [row[1] for row in rows[1:]] == [_raw(*entry) for entry in TEXTS]


def test_a_40000_character_text_is_cut_at_the_limit_with_a_marker(tmp_path, writer):
    text = "abcdefghij" * 4_000
    path = tmp_path / "long.xlsx"
    writer(path, ["prompt"], [[text], ["x" * CELL_LIMIT]])
    rows = sheet_rows(path)
    cut = rows[1][0]
    assert len(cut) == CELL_LIMIT
    assert cut.endswith("… [truncated by batchexec: 40000 characters in all]")
    assert text.startswith(cut[: CELL_LIMIT - 60])
    assert rows[2][0] == "x" * CELL_LIMIT
    table = read_sheet(path.read_bytes())
    assert [row["prompt"] for row in table.rows] == [cut, "x" * CELL_LIMIT]


def _units(text: str) -> int:
    return len(text.encode("utf-16-le")) // 2


@pytest.mark.parametrize("unit", ["😀", "a😀", "😀" * 3 + "b", "\r😀"])
def test_long_astral_text_is_cut_in_utf16_units_and_keeps_its_marker(tmp_path, writer, unit):
    # Excel's limit counts UTF-16 units (an emoji is two); xlsxwriter would cut the
    # marker off a text cut by characters.
    text = unit * (40_000 // len(unit))
    path = tmp_path / "emoji.xlsx"
    writer(path, ["prompt"], [[text]])
    cut = unescape(sheet_rows(path)[1][0])
    marker = f"… [truncated by batchexec: {len(text)} characters in all]"
    assert cut.endswith(marker)
    assert text.startswith(cut.removesuffix(marker))
    assert CELL_LIMIT - 1 <= _units(cut) <= CELL_LIMIT
    assert read_sheet(path.read_bytes()).rows[0]["prompt"] == cut


@settings(max_examples=200, deadline=None)
@given(st.text(st.sampled_from("ab😀𠀀\ud800"), max_size=120), st.integers(60, 100))
def test_fit_keeps_the_longest_prefix_that_fits(text, limit):
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(xlsx, "CELL_LIMIT", limit)
        cut = fit(text)
    units = len(text.encode("utf-16-le", "surrogatepass")) // 2
    if units <= limit:
        assert cut == text
        return
    marker = f"… [truncated by batchexec: {len(text)} characters in all]"
    kept = cut.removesuffix(marker)
    assert cut.endswith(marker)
    assert text.startswith(kept)
    room = limit - len(marker)
    assert len(kept.encode("utf-16-le", "surrogatepass")) // 2 <= room
    longer = text[: len(kept) + 1]
    assert len(longer.encode("utf-16-le", "surrogatepass")) // 2 > room


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(st.text(max_size=60), min_size=1, max_size=4))
def test_any_text_reads_back_as_the_same_string(tmp_path, texts):
    # Control characters are kept now (the hand-written writer made them U+FFFD),
    # as the _xHHHH_ escapes Excel decodes.
    rows = written(tmp_path, ["n", "text"], [[n, text] for n, text in enumerate(texts)])
    expected = [_REPLACED.sub("\ufffd", text) or None for text in texts]
    assert [decoded(row[1]) for row in rows[1:]] == expected


#: Text made of the pieces OOXML escapes are built from, to find any text that
#: does not read back through batchexec's own reader.
escape_like = st.lists(
    st.sampled_from(["_x", "_", "x", "0041", "005F", "00", "D", "_x000D_", "\r", "\x01", "a"])
    | st.sampled_from(["<r>", "</r>", "<", ">", "&", " ", "\n", "\t", "😀", "\ud800"]),
    max_size=12,
).map("".join)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(escape_like, min_size=1, max_size=4))
def test_escape_like_text_round_trips_through_batchexec_reader(tmp_path, texts):
    path = tmp_path / "book.xlsx"
    via_write_sheet(path, ["n", "prompt"], [[n, text] for n, text in enumerate(texts)])
    table = read_sheet(path.read_bytes())
    assert [row["prompt"] for row in table.rows] == [_REPLACED.sub("\ufffd", t) for t in texts]


@pytest.mark.parametrize(
    "text",
    [
        '=HYPERLINK("http://example.invalid","x")',
        "=1+1",
        "+SUM(A1:A2)",
        "@cmd",
        "http://example.invalid",
        "0042",
        "1e5",
        "TRUE",
        "  padded  ",
        "<b>&amp;</b>",
        "]]><x/>",
    ],
)
def test_text_that_looks_like_something_else_stays_text(tmp_path, text):
    path = tmp_path / "book.xlsx"
    write_sheet(str(path), "Results", ["v"], [[text]], [10.0])
    cell = openpyxl.load_workbook(path)["Results"]["A2"]
    assert cell.data_type == "s"
    assert cell.value == text
    assert cell.hyperlink is None


def test_numbers_and_empty_cells(tmp_path):
    rows = written(tmp_path, ["a", "b", "c"], [[1, None, 2.5], ["", 7, "x"]])
    assert rows == [["a", "b", "c"], [1, None, 2.5], [None, 7, "x"]]


def test_booleans_nan_infinities_and_huge_ints_make_a_valid_file(tmp_path, writer):
    # No number cell holds NaN or an infinity, nor every digit of an int past 2**53:
    # those are written as text (NaN and infinities as the CSV writes them).
    row: list[Cell] = [True, False, math.nan, math.inf, -math.inf, 2**60, -(2**60), 2**53]
    header = ["prompt", "t", "f", "nan", "inf", "-inf", "big", "-big", "exact"]
    path = tmp_path / "odd.xlsx"
    writer(path, header, [["p", *row]])
    assert sheet_rows(path, padded=True)[1] == [
        "p",
        True,
        False,
        "nan",
        "inf",
        "-inf",
        str(2**60),
        str(-(2**60)),
        2**53,
    ]
    # Read back as written: booleans and the number cell as such, the texts as text.
    table = read_sheet(path.read_bytes())
    assert list(table.rows[0].values()) == [
        "p",
        True,
        False,
        "nan",
        "inf",
        "-inf",
        str(2**60),
        str(-(2**60)),
        2**53,
    ]


def test_long_text_is_cut_with_a_marker():
    text = "x" * (CELL_LIMIT + 10)
    cut = fit(text)
    assert len(cut) == CELL_LIMIT
    assert cut.endswith(f"[truncated by batchexec: {CELL_LIMIT + 10} characters in all]")
    assert fit("x" * CELL_LIMIT) == "x" * CELL_LIMIT


def test_column_letters():
    assert [column_letter(n) for n in (0, 25, 26, 27, 51, 52, 701, 702)] == [
        "A",
        "Z",
        "AA",
        "AB",
        "AZ",
        "BA",
        "ZZ",
        "AAA",
    ]


def test_many_columns_and_an_odd_sheet_name(tmp_path):
    header = [f"c{n}" for n in range(30)]
    path = tmp_path / "book.xlsx"
    write_sheet(str(path), "It's <mine> & yours", header, [list(range(30))], [8.0] * 30)
    workbook = openpyxl.load_workbook(path)
    sheet = workbook["It's <mine> & yours"]
    assert sheet["AD1"].value == "c29"
    assert sheet["AD2"].value == 29
    assert sheet.auto_filter.ref == "A1:AD2"
    assert sheet.freeze_panes == "A2"


def test_workbooks_batchexec_writes_have_one_sheet_named_results(tmp_path):
    path = tmp_path / "book.xlsx"
    write_xlsx(path, Sheet(["prompt"], [["a"]]))
    assert openpyxl.load_workbook(path).sheetnames == ["Results"]


@pytest.mark.parametrize("name", ["a[b]", "a:b", "a/b", "a?b", "a*b", "'quoted'", "x" * 32])
def test_a_sheet_name_excel_refuses_raises_value_error(tmp_path, name):
    with pytest.raises(ValueError, match="sheet name"):
        write_sheet(str(tmp_path / "book.xlsx"), name, ["v"], [["a"]], [10.0])


def test_a_file_that_cannot_be_written_raises_os_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        write_sheet(str(tmp_path / "missing" / "book.xlsx"), "Results", ["v"], [["a"]], [10.0])


def test_a_failed_write_leaves_no_temporary_row_file(tmp_path, monkeypatch):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))

    def rows() -> Iterator[list[Cell]]:
        yield ["a"]
        raise RuntimeError("the records went away")

    with pytest.raises(RuntimeError, match="went away"):
        write_sheet(str(tmp_path / "book.xlsx"), "Results", ["v"], rows(), [10.0])
    assert os.listdir(scratch) == []


def test_a_write_leaves_no_temporary_row_file(tmp_path, monkeypatch):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    write_sheet(str(tmp_path / "book.xlsx"), "Results", ["v"], [["a"]] * 3, [10.0])
    assert os.listdir(scratch) == []


def test_a_full_disk_while_zipping_raises_os_error_and_leaves_no_temporary_file(
    tmp_path, monkeypatch
):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    # xlsxwriter adds each part to the zip with ZipFile.write, and wraps what it raises.
    monkeypatch.setattr(zipfile.ZipFile, "write", full)
    with pytest.raises(OSError, match="No space left") as raised:
        write_sheet(str(tmp_path / "book.xlsx"), "Results", ["v"], [["a"]] * 3, [10.0])
    assert raised.value.errno == errno.ENOSPC
    assert os.listdir(scratch) == []
