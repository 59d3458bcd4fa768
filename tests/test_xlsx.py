"""The streaming XLSX writer, read back by openpyxl: any text survives, nothing becomes code."""

from __future__ import annotations

import re
from pathlib import Path

import openpyxl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batchexec.xlsx import CELL_LIMIT, Cell, column_letter, fit, write_sheet
from tests.helpers import sheet_rows

#: What the writer replaces: characters XML 1.0 forbids, and lone surrogates.
_REPLACED = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def written(tmp_path: Path, header: list[str], rows: list[list[Cell]]) -> list[list[object]]:
    path = tmp_path / "book.xlsx"
    write_sheet(str(path), "Results", header, rows, [12.0] * len(header))
    return sheet_rows(path, padded=True)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(st.text(max_size=60), min_size=1, max_size=4))
def test_any_text_reads_back_as_the_same_string(tmp_path, texts):
    rows = written(tmp_path, ["n", "text"], [[n, text] for n, text in enumerate(texts)])
    expected = [_REPLACED.sub("\ufffd", text) or None for text in texts]
    assert [row[1] for row in rows[1:]] == expected


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
