"""Tests for batchexec/inputs.py: CSV, JSON, JSONL and XLSX to rows, each named by its place."""

from __future__ import annotations

import csv
import datetime
import gc
import io
import json
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openpyxl
import pytest

from batchexec.catalog import Catalog
from batchexec.csvinput import parse_csv
from batchexec.errors import FieldError, InputError
from batchexec.exports import template_sheet, write_xlsx
from batchexec.inputs import (
    Format,
    Rows,
    format_of,
    parse_json,
    parse_jsonl,
    parse_xlsx,
    plan_rows,
    read_rows,
    sniff,
)
from batchexec.planning import Limits
from batchexec.xlsxinput import cell_text

LIMITS = Limits(max_executions=100, max_prompt_length=1000, default_model="echo")


@pytest.fixture(autouse=True)
def _restore_csv_field_limit() -> Iterator[None]:
    """parse_csv raises the process-wide csv field limit; put it back after each test."""
    before = csv.field_size_limit()
    yield
    csv.field_size_limit(before)


def workbook_bytes(*sheets: tuple[str, list[list[Any]]]) -> bytes:
    """An XLSX file with ``sheets``, each a title and rows of cells (None leaves a cell empty)."""
    workbook = openpyxl.Workbook()
    workbook.remove(workbook.active)
    for title, rows in sheets:
        sheet = workbook.create_sheet(title)
        for number, row in enumerate(rows, start=1):
            for column, value in enumerate(row, start=1):
                if value is not None:
                    sheet.cell(number, column, value)
    buffer = io.BytesIO()
    workbook.save(buffer)
    return buffer.getvalue()


def with_sheet_data(data: bytes, sheet_data: str) -> bytes:
    """``data``, a one-sheet workbook, with that sheet's rows replaced by ``sheet_data``.

    For XML no writer makes: rows numbered in the billions, empty cells at XFD.
    """
    rows = f"<sheetData>{sheet_data}</sheetData>".encode()
    buffer = io.BytesIO()
    with (
        zipfile.ZipFile(io.BytesIO(data)) as source,
        zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as target,
    ):
        for info in source.infolist():
            part = source.read(info)
            if info.filename == "xl/worksheets/sheet1.xml":
                part = re.sub(rb"<sheetData>.*</sheetData>", lambda _: rows, part)
            target.writestr(info, part)
    return buffer.getvalue()


def text_row(number: int, *texts: str) -> str:
    """A ``<row>`` of inline strings from column A, as a sheet's XML holds it."""
    cells = "".join(
        f'<c r="{letter}{number}" t="inlineStr"><is><t>{text}</t></is></c>'
        for letter, text in zip("ABCDEFGHIJ", texts, strict=False)
    )
    return f'<row r="{number}">{cells}</row>'


def cells(rows: Rows) -> list[dict[str, Any]]:
    return [dict(row.cells or {}) for row in rows.rows]


def input_error(call: Any, *args: Any, **kwargs: Any) -> InputError:
    with pytest.raises(InputError) as caught:
        call(*args, **kwargs)
    return caught.value


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("prompts.csv", Format.CSV),
        ("PROMPTS.CSV", Format.CSV),
        ("batch.json", Format.JSON),
        ("batch.JSONL", Format.JSONL),
        ("batch.ndjson", Format.JSONL),
        ("book.Xlsx", Format.XLSX),
        ("dir.v2/prompts.txt", None),
        ("prompts", None),
    ],
)
def test_format_comes_from_the_extension_whatever_its_case(name, expected):
    assert format_of(name) is expected


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b'{"executions": [{"prompt": "hi"}]}', Format.JSON),
        (b'\xef\xbb\xbf  \n{\n "executions": []\n}', Format.JSON),
        (b'{"prompt": "a"}\n{"prompt": "b"}\n', Format.JSONL),
        (b'{"prompt": "only one"}', Format.JSONL),
        (b"prompt,model\nhi,echo\n", Format.CSV),
        (b"PK\x03\x04rest of a zip", Format.XLSX),
        # A JSON array, or one document with a mistake, is JSON: its reader says what is wrong.
        (b'[{"prompt": "x"}]', Format.JSON),
        (b'{\n  "executions": [\n    {"prompt": "x" "model": "echo"}\n  ]\n}\n', Format.JSON),
    ],
)
def test_sniffing_tells_json_object_jsonl_lines_xlsx_else_csv(data, expected):
    assert sniff(data) is expected


def test_legacy_xls_is_refused_with_a_way_out():
    error = input_error(sniff, b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + b"\0" * 100)
    assert ".xls" in error.detail
    assert "save it as .xlsx or .csv" in error.detail


def test_csv_rows_are_placed_at_their_lines():
    rows = read_rows(b'prompt,model,note\n"two\nlines",echo,a\n\nsecond,,b\n', Format.CSV)
    assert rows.columns == ("prompt", "model", "note")
    assert cells(rows) == [
        {"prompt": "two\nlines", "model": "echo", "note": "a"},
        {"prompt": "second", "model": "", "note": "b"},
    ]
    assert rows.places == ("line 2", "line 5")
    assert rows.rows[1].model == ""
    assert rows.problems == ()


def test_non_utf8_text_names_the_byte():
    error = input_error(read_rows, b"prompt\ncaf\xe9\n", Format.CSV)
    assert "not UTF-8" in error.detail
    assert "byte 11" in error.detail


def test_json_becomes_the_columns_execute_batch_makes():
    document = {
        "executions": [
            {"prompt": "a", "model": "echo", "tag": 7, "meta": {"k": [1]}},
            {"prompt": "b", "assistant": "helper", "note": None},
        ]
    }
    rows = parse_json(json.dumps(document))
    assert rows.columns == ("prompt", "model", "assistant", "tag", "meta", "note")
    assert cells(rows) == [
        # A JSON number stays a number; a list or an object becomes JSON text.
        {"prompt": "a", "model": "echo", "assistant": "", "tag": 7, "meta": '{"k": [1]}'},
        {"prompt": "b", "model": "", "assistant": "helper", "note": ""},
    ]
    assert rows.places == ("execution 1", "execution 2")
    assert rows.rows[1].assistant == "helper"


@pytest.mark.parametrize(
    "text",
    ['[{"prompt": "a"}]', '{"executions": {"prompt": "a"}}', '{"rows": []}', '"just text"'],
)
def test_json_must_be_an_object_with_an_executions_list(text):
    assert '"executions" list' in input_error(parse_json, text).detail


def test_broken_json_names_line_and_column():
    error = input_error(parse_json, '{"executions": [\n  {"prompt": "a",}\n]}')
    assert error.detail.startswith("JSON line 2, column ")


def test_invalid_json_executions_are_each_reported_and_the_others_kept():
    rows = parse_json('{"executions": [{"prompt": "ok"}, 5, {"prompt": 3}, {"model": "echo"}]}')
    assert [(p.index, p.field) for p in rows.problems] == [(2, None), (3, "prompt"), (4, "prompt")]
    assert len(rows.rows) == 4
    assert rows.rows[0].prompt == "ok"


def test_jsonl_skips_blank_lines_and_names_lines():
    text = '{"prompt": "a", "model": "echo"}\n\n  \n{"prompt": "b\u2028c", "extra": true}\r\n'
    rows = parse_jsonl(text)
    assert rows.places == ("line 1", "line 4")
    assert [row.prompt for row in rows.rows] == ["a", "b\u2028c"]
    assert cells(rows)[1]["extra"] is True


def test_unreadable_jsonl_lines_are_problems_in_place():
    rows = parse_jsonl('{"prompt": "a"}\nnot json\n["list"]\n{"prompt": "d"}\n')
    assert [(p.index, p.message.split(":")[0]) for p in rows.problems] == [
        (2, "not valid JSON"),
        (3, "must be an object"),
    ]
    assert rows.places == ("line 1", "line 2", "line 3", "line 4")
    assert rows.rows[3].prompt == "d"


def test_xlsx_rows_are_placed_at_their_sheet_rows():
    data = workbook_bytes(
        (
            "Prompts",
            [
                [],
                ["Prompt", "Model", "id"],
                ["first", "echo", 1],
                [],
                ["second", None, 2.5],
            ],
        )
    )
    rows = parse_xlsx(data)
    assert rows.columns == ("prompt", "model", "id")
    assert cells(rows) == [
        {"prompt": "first", "model": "echo", "id": 1},
        {"prompt": "second", "model": "", "id": 2.5},
    ]
    assert rows.places == ("row 3", "row 5")


def test_the_results_sheet_is_read_rather_than_the_first():
    data = workbook_bytes(
        ("Notes", [["anything"], ["else"]]),
        ("results", [["prompt"], ["from results"]]),
    )
    assert parse_xlsx(data).rows[0].prompt == "from results"
    first_only = workbook_bytes(("Notes", [["prompt"], ["from notes"]]), ("Other", [["x"]]))
    assert parse_xlsx(first_only).rows[0].prompt == "from notes"


def test_xlsx_output_columns_are_dropped_and_model_kept():
    header = ["prompt", "model", "result", "Status", "error", "latency_ms", "attempts"]
    data = workbook_bytes(
        ("Results", [header, ["hi", "echo", "old answer", "succeeded", "", 3, 1]])
    )
    rows = parse_xlsx(data)
    assert rows.columns == ("prompt", "model")
    assert cells(rows) == [{"prompt": "hi", "model": "echo"}]


@pytest.mark.parametrize(
    "header",
    [
        ["Prompt", "MODEL", "Assistant", "Note"],
        [" prompt ", "result", "status", "custom"],
        ["note", "prompt", "completion_tokens"],
    ],
)
def test_sheet_headers_follow_the_csv_column_rules(header):
    from_csv = parse_csv(
        ",".join(header) + "\n" + ",".join("x" for _ in header) + "\n", max_field_chars=100
    )
    from_sheet = parse_xlsx(workbook_bytes(("S", [header, ["x" for _ in header]])))
    assert from_sheet.columns == from_csv.columns


def test_unnamed_columns_are_fine_while_empty():
    data = workbook_bytes(("S", [["prompt", None, "note"], ["a", None, "n"], ["b"]]))
    assert cells(parse_xlsx(data)) == [{"prompt": "a", "note": "n"}, {"prompt": "b", "note": ""}]


@pytest.mark.parametrize(
    ("row", "column"),
    [
        (["a", "stray", "n"], "B"),
        (["a", None, "n", None, "far"], "E"),
        (["a", None, "n", *([None] * 24), "farther"], "AB"),
    ],
)
def test_a_value_under_no_header_names_its_row_and_column(row, column):
    data = workbook_bytes(("S", [["prompt", None, "note"], ["ok"], row]))
    error = input_error(parse_xlsx, data)
    assert error.detail == (
        f"Sheet 'S' row 3: column {column} has a value but no name in the header (row 1)."
    )
    assert error.errors[0].index == 2


@pytest.mark.parametrize(
    ("sheet", "message"),
    [
        ([], "The sheet 'S' is empty"),
        ([[None], ["  "]], "The sheet 'S' is empty"),
        ([["prompt", "model"]], "The sheet 'S' has a header but no rows."),
        ([["model"], ["echo"]], "Sheet 'S' row 1: the header has no 'prompt' column."),
        ([["prompt", "Prompt"], ["a", "b"]], "Sheet 'S' row 1: column 'prompt' appears twice."),
    ],
)
def test_sheet_structure_errors(sheet, message):
    assert input_error(parse_xlsx, workbook_bytes(("S", sheet))).detail.startswith(message)


def test_reading_stops_past_max_rows():
    data = workbook_bytes(("S", [["prompt"], *([f"p{n}"] for n in range(5))]))
    assert len(parse_xlsx(data, max_rows=5).rows) == 5
    error = input_error(parse_xlsx, data, max_rows=4)
    assert error.detail == "The sheet 'S' has more than 4 rows; the limit is 4."
    assert error.errors == [FieldError(None, "executions", error.detail)]


def test_blank_rows_do_not_count_against_max_rows():
    data = with_sheet_data(
        workbook_bytes(("S", [])),
        text_row(1, "prompt")
        + text_row(2, "a")
        + "".join(f'<row r="{n}"><c r="B{n}"/></row>' for n in range(3, 90))
        + text_row(90, "b"),
    )
    assert parse_xlsx(data, max_rows=2).places == ("row 2", "row 90")
    error = input_error(parse_xlsx, data, max_rows=1)
    assert error.detail == "The sheet 'S' has more than 1 row; the limit is 1."


def test_a_row_numbered_in_the_billions_costs_nothing():
    # iter_rows would yield two billion empty rows before this one.
    data = with_sheet_data(
        workbook_bytes(("S", [])),
        text_row(1, "prompt", "note") + text_row(2, "a", "n") + '<row r="2000000000"/>',
    )
    rows = parse_xlsx(data, max_rows=10, max_cells=100)
    assert cells(rows) == [{"prompt": "a", "note": "n"}]
    assert rows.places == ("row 2",)


def test_empty_cells_at_xfd_count_against_the_cell_budget():
    # iter_rows would make each blank row 16,384 cells wide.
    blank_rows = "".join(f'<row r="{n}"><c r="XFD{n}"/></row>' for n in range(3, 5003))
    data = with_sheet_data(
        workbook_bytes(("S", [])), text_row(1, "prompt") + text_row(2, "a") + blank_rows
    )
    # Every <row> and every <c> counts one: two of each per row.
    elements = 2 * 5002
    assert parse_xlsx(data, max_cells=elements).places == ("row 2",)
    assert read_rows(data, Format.XLSX).places == ("row 2",)
    error = input_error(parse_xlsx, data, max_cells=elements - 1)
    assert error.detail == (
        f"The sheet 'S' has more than {elements - 1} cells, counting rows and empty cells; "
        f"the limit is {elements - 1}."
    )
    error = input_error(read_rows, data, Format.XLSX, max_cells=1000)
    assert "the limit is 1000." in error.detail


@pytest.mark.parametrize(
    ("sheet", "max_columns", "message"),
    [
        (
            [["prompt", "note"], ["a", None, None, None, "far"]],
            4,
            "Sheet 'S' row 2: column E has a value; the limit is 4 columns (up to D).",
        ),
        (
            [["prompt", None, None, "note", "extra"], ["a"]],
            4,
            "Sheet 'S' row 1: column E has a value; the limit is 4 columns (up to D).",
        ),
    ],
)
def test_a_value_past_max_columns_names_its_column_and_the_limit(sheet, max_columns, message):
    data = workbook_bytes(("S", sheet))
    assert input_error(parse_xlsx, data, max_columns=max_columns).detail == message
    assert input_error(read_rows, data, Format.XLSX, max_columns=max_columns).detail == message


def test_empty_cells_past_max_columns_are_ignored():
    data = workbook_bytes(("S", [["prompt", "note"], ["a", "n", None, ""]]))
    assert cells(parse_xlsx(data, max_columns=2)) == [{"prompt": "a", "note": "n"}]


def test_no_value_lies_past_excels_last_column():
    data = with_sheet_data(
        workbook_bytes(("S", [])),
        text_row(1, "prompt") + '<row r="2"><c r="ZZZ2" t="inlineStr"><is><t>x</t></is></c></row>',
    )
    error = input_error(parse_xlsx, data)
    assert error.detail == (
        "Sheet 'S' row 2: column ZZZ has a value; the limit is 16384 columns (up to XFD)."
    )


def test_reading_stops_at_the_time_limit():
    data = workbook_bytes(("S", [["prompt"], *([f"p{n}"] for n in range(50))]))
    assert len(parse_xlsx(data, timeout_s=60).rows) == 50
    error = input_error(parse_xlsx, data, timeout_s=0)
    assert error.detail == "The sheet 'S' took too long to read; the limit is 0 s."
    error = input_error(read_rows, data, Format.XLSX, timeout_s=0)
    assert "the limit is 0 s." in error.detail


def test_a_workbook_that_unpacks_too_large_is_refused_before_reading():
    data = workbook_bytes(("S", [["prompt"], ["x" * 5000]]))
    assert parse_xlsx(data, max_unzipped_bytes=1_000_000).rows[0].prompt == "x" * 5000
    error = input_error(parse_xlsx, data, max_unzipped_bytes=2000)
    assert "unpacks to" in error.detail
    assert "the limit is 2000" in error.detail


@pytest.mark.parametrize(
    "data",
    [b"PK\x03\x04 not really a zip", b"prompt\nhi\n", b""],
)
def test_unreadable_workbooks_are_input_errors(data):
    assert input_error(parse_xlsx, data).detail.startswith("The XLSX file cannot be read:")


def test_a_zip_that_is_no_workbook_is_an_input_error():
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("hello.txt", "hi")
    error = input_error(parse_xlsx, buffer.getvalue(), max_unzipped_bytes=10_000)
    assert error.detail.startswith("The XLSX file cannot be read:")


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (None, ""),
        ("  kept as is ", "  kept as is "),
        (7, "7"),
        (7.0, "7"),
        (-3.0, "-3"),
        (2.5, "2.5"),
        (0.1, "0.1"),
        (1e20, "100000000000000000000"),
        (True, "TRUE"),
        (False, "FALSE"),
        (datetime.datetime(2024, 5, 6), "2024-05-06"),
        (datetime.datetime(2024, 5, 6, 7, 8, 9), "2024-05-06 07:08:09"),
        (datetime.date(2024, 5, 6), "2024-05-06"),
        (datetime.time(7, 8), "07:08:00"),
    ],
)
def test_cells_read_as_the_text_they_show(value, text):
    assert cell_text(value) == text


def test_a_real_workbooks_numbers_and_booleans_stay_so_and_dates_read_as_text():
    data = workbook_bytes(
        (
            "S",
            [
                ["prompt", "n", "when", "ok", "x"],
                ["p", 7, datetime.datetime(2024, 1, 2), True, 0.5],
                [42, 7.0, "7", False, 1e20],
            ],
        )
    )
    rows = parse_xlsx(data)
    assert cells(rows) == [
        {"prompt": "p", "n": 7, "when": "2024-01-02", "ok": True, "x": 0.5},
        # A prompt is text whatever its cell; text that looks like a number stays text.
        {"prompt": "42", "n": 7, "when": "7", "ok": False, "x": 1e20},
    ]
    assert [type(cell) for cell in cells(rows)[1].values()] == [str, int, str, bool, float]


def test_the_process_csv_template_round_trips(tmp_path: Path):
    rows = read_rows(b"id,prompt,model,Note\n1,hello,echo,first\n2,there,,second\n", Format.CSV)
    plan = plan_rows(rows, Catalog.load(), LIMITS)
    path = tmp_path / "template.xlsx"
    write_xlsx(path, template_sheet(plan))
    again = parse_xlsx(path.read_bytes())
    assert again.columns == ("id", "prompt", "model", "Note")
    assert cells(again) == cells(rows)
    assert again.places == ("row 2", "row 3")


def test_plan_rows_lists_unread_rows_and_plan_problems_together():
    rows = parse_jsonl(
        '{"prompt": "a", "model": "nope"}\nbroken\n{"prompt": "${output.9}"}\n{"prompt": "ok"}\n'
    )
    error = input_error(plan_rows, rows, Catalog.load(), LIMITS)
    assert error.detail == "3 executions are invalid."
    assert [(e.index, e.field) for e in error.errors] == [(1, "model"), (2, None), (3, "prompt")]
    assert rows.describe(error.errors[1]).startswith("line 2: not valid JSON")
    assert rows.located(error.errors[0]).message.startswith("line 1: Unknown model 'nope'.")


def test_plan_rows_of_valid_rows_is_the_plan():
    plan = plan_rows(
        parse_jsonl('{"prompt": "a"}\n{"prompt": "b ${output.1}"}\n'), Catalog.load(), LIMITS
    )
    assert [row.depends_on for row in plan.rows] == [frozenset(), frozenset({1})]
    assert plan.columns == ("prompt", "model")


def test_batch_wide_problems_keep_their_detail_and_no_place():
    rows = parse_jsonl("\n".join('{"prompt": "x"}' for _ in range(3)) + "\nbad\n")
    limits = Limits(max_executions=2, max_prompt_length=10, default_model="echo")
    error = input_error(plan_rows, rows, Catalog.load(), limits)
    assert error.detail == "The batch has 4 executions; the limit is 2."
    assert rows.describe(error.errors[0]) == "executions: " + error.detail
    assert rows.describe(error.errors[1]).startswith("line 4: not valid JSON")


def test_check_readable_raises_only_when_rows_could_not_be_read():
    parse_jsonl('{"prompt": "a"}\n').check_readable()
    error = input_error(parse_jsonl('{"prompt": 1}\n').check_readable)
    assert error.detail == "1 execution is invalid."


@pytest.mark.parametrize(
    ("indexes", "expected"),
    [
        ([2], "line 3"),
        ([1, 2, 3, 7], "lines 2-4, 8"),
        ([7, 1, 3, 2, 3], "lines 2-4, 8"),
        ([1, 5], "lines 2, 6"),
    ],
)
def test_places_are_named_compactly(indexes, expected):
    rows = Rows(("prompt",), (), tuple(f"line {number}" for number in range(2, 12)))
    assert rows.places_of(indexes) == expected


def test_executions_without_places_and_past_the_shown_ranges_are_counted():
    rows = Rows.of(["prompt"], [])
    assert rows.places_of([1, 2, 3, 7]) == "executions 1-3, 7"
    assert rows.places_of(range(1, 40, 2), most=3) == "executions 1, 3, 5 and 17 more"


def test_executions_consumed_are_let_go_as_their_rows_are_made():
    from batchexec.inputs import from_executions
    from batchexec.schemas import ExecutionIn

    executions: list[ExecutionIn | None] = [
        ExecutionIn.model_validate({"prompt": f"p{n}", "model": "echo", "note": n})
        for n in range(3)
    ]
    kept = list(executions)

    consumed = from_executions(executions, consume=True)

    assert executions == [None, None, None]
    assert consumed == from_executions(kept)
    assert [(row.cells or {})["note"] for row in consumed.rows] == [0, 1, 2]


def test_executions_consumed_in_bulk_leave_the_young_generations_small():
    """Each row made while its execution is freed: the collector's count stands still,
    so ``from_executions`` collects the young generations itself every few thousand
    rows; what one collection then walks stays bounded, whatever the batch's size."""
    from batchexec import inputs
    from batchexec.schemas import ExecutionIn

    executions: list[ExecutionIn | None] = [
        ExecutionIn.model_validate({"prompt": f"p{n}", "model": "echo"}) for n in range(30_000)
    ]
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()  # no automatic collection: only from_executions's own
    try:
        rows = inputs.from_executions(executions, consume=True)
        young = len(gc.get_objects(0)) + len(gc.get_objects(1))
    finally:
        if was_enabled:
            gc.enable()
    assert len(rows.rows) == 30_000
    # Each row is two tracked objects (the row, its cells): all 60,000 without it.
    assert young <= 2 * 2 * inputs._COLLECT_EVERY_ROWS
