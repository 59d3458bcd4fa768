"""Tests for batchexec/exports.py: CSV content and the XLSX workbook."""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import openpyxl
import pytest

from batchexec import exports
from batchexec.catalog import Catalog
from batchexec.columns import Cell
from batchexec.csvinput import parse_csv
from batchexec.exports import (
    Sheet,
    csv_sheet,
    render_csv,
    result_text,
    results_sheet,
    template_sheet,
    write_xlsx,
)
from batchexec.planning import BatchPlan, Limits, RowInput, plan_batch
from batchexec.records import Batch, Execution, ExecutionStatus, Outcome
from batchexec.registry import Registry
from batchexec.store.memory import MemoryStore
from batchexec.xlsx import CELL_LIMIT

FORMULA = '=HYPERLINK("http://x","y")'
TRICKY = [
    FORMULA,
    "=1+1",
    "+SUM(A1:A2)",
    "-2+3",
    "@cmd",
    "http://example.com/a?b=c",
    "mailto:someone@example.com",
    "0042",
    "1e5",
    "TRUE",
    "  padded  ",
    'comma, "quote" and\nnewline',
    "emoji 😀 and accents éà",
]

ASSISTANTS = """
[assistants."Summarizer"]
model = "slow-echo"
"""


def make_plan(
    rows: Sequence[Mapping[str, Cell]], columns: Sequence[str], catalog: Catalog | None = None
) -> BatchPlan:
    """A plan built the way handlers build one: a RowInput per row of cells."""
    inputs = [
        RowInput(
            prompt=str(cells["prompt"]),
            model=str(cells["model"]) if "model" in cells else None,
            assistant=str(cells["assistant"]) if "assistant" in cells else None,
            cells=cells,
        )
        for cells in rows
    ]
    limits = Limits(max_executions=100, max_prompt_length=1000, default_model="echo")
    return plan_batch(inputs, columns, catalog or Catalog.load(), limits)


def make_batch(
    rows: Sequence[Mapping[str, Cell]], columns: Sequence[str], catalog: Catalog | None = None
) -> tuple[Registry, Batch]:
    """A batch record of ``rows``, as the registry makes one, and a registry to change it."""
    plan = make_plan(rows, columns, catalog)
    batch = Batch(
        id="batch-id",
        owner="owner-digest",
        columns=plan.columns,
        executions=[Execution(row.index, row.target.model.name, row.cells) for row in plan.rows],
        created_at=0.0,
        plan=plan,
    )
    return Registry(MemoryStore()), batch


def finish(
    registry: Registry, batch: Batch, index: int, status: ExecutionStatus, **fields: Any
) -> None:
    """Run execution ``index`` through the registry: sent as ``prompt_sent``, ended as given."""
    prompt = fields.pop("prompt_sent", batch.executions[index - 1].cells["prompt"])
    registry.start_execution(batch, index, prompt, 1)
    registry.finish_execution(batch, index, Outcome(status=status, **fields), prompt)


def finished_batch() -> tuple[Registry, Batch]:
    """Three rows: succeeded, failed, and skipped because it used the failed one."""
    rows = [
        {"prompt": "Say hi", "model": "", "topic": "greeting"},
        {"prompt": "Fail please", "model": "slow-echo", "topic": "error"},
        {"prompt": "Use ${output.2}", "model": "ECHO", "topic": "chain"},
    ]
    registry, batch = make_batch(rows, ["prompt", "model", "topic"])
    finish(registry, batch, 1, ExecutionStatus.SUCCEEDED, result="hi!", latency_ms=12, attempts=1)
    finish(registry, batch, 2, ExecutionStatus.FAILED, error="HTTP 400: bad", attempts=1)
    registry.finish_execution(
        batch, 3, Outcome(ExecutionStatus.SKIPPED, error="execution 2 did not succeed"), None
    )
    return registry, batch


def load_sheet(path: Path) -> Any:
    workbook = openpyxl.load_workbook(path)
    try:
        assert workbook.sheetnames == ["Results"]
        return workbook["Results"]
    finally:
        workbook.close()


def values(worksheet: Any) -> list[list[Any]]:
    return [list(row) for row in worksheet.iter_rows(values_only=True)]


# result_text


@pytest.mark.parametrize(
    ("status", "result", "error", "expected"),
    [
        (ExecutionStatus.SUCCEEDED, "the answer", None, "the answer"),
        (ExecutionStatus.SUCCEEDED, None, None, ""),
        (ExecutionStatus.FAILED, None, "HTTP 401: bad key", "Error: HTTP 401: bad key"),
        (ExecutionStatus.TIMED_OUT, None, "no answer in 300 s", "Error: no answer in 300 s"),
        (ExecutionStatus.SKIPPED, None, "execution 1 failed", "Error: execution 1 failed"),
        (ExecutionStatus.CANCELLED, None, "cancelled", "Error: cancelled"),
        (ExecutionStatus.FAILED, None, None, ""),
    ],
)
def test_result_text(
    status: ExecutionStatus, result: str | None, error: str | None, expected: str
) -> None:
    registry, batch = make_batch([{"prompt": "p"}], ["prompt"])
    finish(registry, batch, 1, status, result=result, error=error)
    assert result_text(batch.executions[0]) == expected


def test_result_text_of_an_unfinished_execution_is_empty() -> None:
    registry, batch = make_batch([{"prompt": "p"}], ["prompt"])
    assert result_text(batch.executions[0]) == ""
    registry.start_execution(batch, 1, "p", 1)
    assert result_text(batch.executions[0]) == ""


# csv_sheet and render_csv


def test_csv_sheet_has_input_columns_then_result() -> None:
    _, batch = finished_batch()
    sheet = csv_sheet(batch)
    assert sheet.header == ["prompt", "model", "topic", "result"]
    assert sheet.rows == [
        ["Say hi", "echo", "greeting", "hi!"],
        ["Fail please", "slow-echo", "error", "Error: HTTP 400: bad"],
        ["Use ${output.2}", "ECHO", "chain", "Error: execution 2 did not succeed"],
    ]


def test_prompt_cell_shows_the_prompt_as_sent() -> None:
    rows = [{"prompt": "one"}, {"prompt": "two: ${output.1}"}]
    registry, batch = make_batch(rows, ["prompt"])
    finish(registry, batch, 1, ExecutionStatus.SUCCEEDED, result="ONE")
    finish(registry, batch, 2, ExecutionStatus.SUCCEEDED, result="TWO", prompt_sent="two: ONE")
    assert [row[0] for row in csv_sheet(batch).rows] == ["one", "two: ONE"]


def test_assistant_rows_keep_a_blank_model(tmp_path: Path) -> None:
    models = tmp_path / "models.toml"
    models.write_text(ASSISTANTS, encoding="utf-8")
    rows = [
        {"prompt": "a", "model": "", "assistant": "Summarizer"},
        {"prompt": "b", "model": "", "assistant": ""},
    ]
    registry, batch = make_batch(rows, ["prompt", "model", "assistant"], Catalog.load(models))
    finish(registry, batch, 1, ExecutionStatus.SUCCEEDED, result="A")
    finish(registry, batch, 2, ExecutionStatus.SUCCEEDED, result="B")
    assert csv_sheet(batch).rows == [["a", "", "Summarizer", "A"], ["b", "echo", "", "B"]]
    assert [execution.model for execution in batch.executions] == ["slow-echo", "echo"]


def test_render_csv_round_trips_through_dictreader() -> None:
    sheet = Sheet(
        ["prompt", "note, with comma", "result"],
        [[text, f"note {n}", f'answer "{n}",\r\nsecond line'] for n, text in enumerate(TRICKY)],
    )
    parsed = list(csv.DictReader(io.StringIO(render_csv(sheet), newline="")))
    assert parsed == [dict(zip(sheet.header, row, strict=True)) for row in sheet.rows]


def test_render_csv_writes_none_as_empty_and_numbers_as_digits() -> None:
    text = render_csv(Sheet(["a", "b", "c"], [[None, 12, "x"]]))
    assert text == "a,b,c\n,12,x\n"


def test_csv_content_of_a_finished_batch_round_trips() -> None:
    _, batch = finished_batch()
    parsed = list(csv.DictReader(io.StringIO(render_csv(csv_sheet(batch)), newline="")))
    assert [row["result"] for row in parsed] == [
        "hi!",
        "Error: HTTP 400: bad",
        "Error: execution 2 did not succeed",
    ]
    assert [row["topic"] for row in parsed] == ["greeting", "error", "chain"]


def test_csv_content_parses_back_as_batch_input() -> None:
    _, batch = finished_batch()
    table = parse_csv(render_csv(csv_sheet(batch)), max_field_chars=10_000)
    assert table.columns == ("prompt", "model", "topic")
    assert table.rows[0] == {"prompt": "Say hi", "model": "echo", "topic": "greeting"}


# results_sheet and template_sheet


def test_results_sheet_columns_and_cells() -> None:
    _, batch = finished_batch()
    sheet = results_sheet(batch)
    assert sheet.header == [
        "prompt",
        "model",
        "topic",
        "result",
        "status",
        "error",
        "latency_ms",
        "attempts",
        "prompt_tokens",
        "completion_tokens",
    ]
    assert sheet.rows[0] == [
        "Say hi",
        "echo",
        "greeting",
        "hi!",
        "succeeded",
        "",
        12,
        1,
        None,
        None,
    ]
    assert sheet.rows[1][3:6] == ["Error: HTTP 400: bad", "failed", "HTTP 400: bad"]
    assert sheet.rows[2][3:8] == [
        "Error: execution 2 did not succeed",
        "skipped",
        "execution 2 did not succeed",
        None,
        0,
    ]


def test_results_sheet_adds_model_column_when_input_has_none() -> None:
    registry, batch = make_batch([{"prompt": "a"}, {"prompt": "b"}], ["prompt"])
    finish(registry, batch, 1, ExecutionStatus.SUCCEEDED, result="A", prompt_tokens=3)
    sheet = results_sheet(batch)
    assert sheet.header[:5] == ["prompt", "result", "status", "error", "model"]
    assert sheet.rows[0][:5] == ["a", "A", "succeeded", "", "echo"]
    assert sheet.rows[1][:5] == ["b", "", "pending", "", "echo"]
    assert sheet.rows[0][sheet.header.index("prompt_tokens")] == 3


def test_template_sheet_has_input_rows_and_empty_result() -> None:
    rows = [{"prompt": "a", "topic": "t1"}, {"prompt": "b ${output.1}", "topic": "t2"}]
    sheet = template_sheet(make_plan(rows, ["prompt", "topic", "status"]))
    assert sheet.header == ["prompt", "topic", "result"]
    assert sheet.rows == [["a", "t1", ""], ["b ${output.1}", "t2", ""]]


def test_results_file_fed_back_in_gives_a_header_without_duplicates() -> None:
    _, first = finished_batch()
    table = parse_csv(render_csv(results_sheet(first)), max_field_chars=10_000)
    rows = [dict(row) for row in table.rows]
    _, second = make_batch(rows, table.columns)
    header = results_sheet(second).header
    assert len(header) == len(set(header)), header


# write_xlsx


def test_strings_are_never_formulas_links_or_numbers(tmp_path: Path) -> None:
    path = tmp_path / "out.xlsx"
    write_xlsx(path, Sheet([FORMULA, "n"], [[text, 7] for text in TRICKY]))
    worksheet = load_sheet(path)
    header = worksheet.cell(1, 1)
    assert (header.value, header.data_type) == (FORMULA, "s")
    for row_number, text in enumerate(TRICKY, start=2):
        cell = worksheet.cell(row_number, 1)
        assert cell.data_type == "s", text
        assert cell.value == text
        assert cell.hyperlink is None
        number = worksheet.cell(row_number, 2)
        assert (number.value, number.data_type) == (7, "n")


def test_hyperlink_formula_from_a_finished_batch_stays_text(tmp_path: Path) -> None:
    registry, batch = make_batch([{"prompt": FORMULA, "model": "echo"}], ["prompt", "model"])
    finish(registry, batch, 1, ExecutionStatus.SUCCEEDED, result=FORMULA, latency_ms=5)
    path = tmp_path / "batch.xlsx"
    write_xlsx(path, results_sheet(batch))
    worksheet = load_sheet(path)
    for column in (1, 3):  # prompt and result
        cell = worksheet.cell(2, column)
        assert (cell.value, cell.data_type) == (FORMULA, "s")


def test_workbook_holds_every_row(tmp_path: Path) -> None:
    _, batch = finished_batch()
    sheet = results_sheet(batch)
    path = tmp_path / "batch.xlsx"
    write_xlsx(path, sheet)
    table: list[list[Cell | None]] = [list(sheet.header), *sheet.rows]
    expected = [[None if cell in ("", None) else cell for cell in row] for row in table]
    assert values(load_sheet(path)) == expected


def test_header_is_bold_frozen_and_filtered(tmp_path: Path) -> None:
    _, batch = finished_batch()
    sheet = results_sheet(batch)
    path = tmp_path / "batch.xlsx"
    write_xlsx(path, sheet)
    worksheet = load_sheet(path)
    assert all(cell.font.b for cell in worksheet[1])
    assert not worksheet.cell(2, 1).font.b
    assert worksheet.freeze_panes == "A2"
    last_column = openpyxl.utils.get_column_letter(len(sheet.header))
    assert worksheet.auto_filter.ref == f"A1:{last_column}4"
    assert worksheet.cell(2, 1).alignment.wrap_text


def test_column_widths_fit_text_but_are_capped(tmp_path: Path) -> None:
    path = tmp_path / "w.xlsx"
    write_xlsx(path, Sheet(["prompt", "id"], [["word " * 200, "a"]]))
    worksheet = load_sheet(path)
    wide = worksheet.column_dimensions["A"].width
    narrow = worksheet.column_dimensions["B"].width
    assert 60 < wide <= 90
    assert 8 <= narrow < 20


def test_text_over_the_cell_limit_is_cut_with_a_visible_marker(tmp_path: Path) -> None:
    long_text = "abcdefghij" * 4_000  # 40,000 characters
    path = tmp_path / "long.xlsx"
    write_xlsx(path, Sheet(["prompt", "result"], [["short", long_text]]))
    cell = load_sheet(path).cell(2, 2)
    assert cell.data_type == "s"
    assert len(cell.value) == CELL_LIMIT
    tail = cell.value[-80:]
    assert "truncated" in tail
    assert "40000" in tail
    assert long_text.startswith(cell.value[: CELL_LIMIT - 80])


def test_text_at_the_cell_limit_is_kept_whole(tmp_path: Path) -> None:
    text = "x" * CELL_LIMIT
    path = tmp_path / "limit.xlsx"
    write_xlsx(path, Sheet(["result"], [[text]]))
    assert load_sheet(path).cell(2, 1).value == text


def test_write_creates_missing_folders_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    folder = tmp_path / "public" / "batch_execution_results"
    path = folder / "batch_execution_x.xlsx"
    write_xlsx(path, Sheet(["prompt", "result"], [["a", "b"]]))
    assert sorted(os.listdir(folder)) == ["batch_execution_x.xlsx"]
    assert values(load_sheet(path)) == [["prompt", "result"], ["a", "b"]]


def test_existing_file_is_replaced_whole_by_rename(tmp_path: Path) -> None:
    path = tmp_path / "out.xlsx"
    write_xlsx(path, Sheet(["prompt"], [[f"row {n} " * 50] for n in range(500)]))
    big_size = path.stat().st_size
    old_inode = path.stat().st_ino
    write_xlsx(path, Sheet(["prompt"], [["only"]]))
    assert values(load_sheet(path)) == [["prompt"], ["only"]]
    assert path.stat().st_size < big_size
    # A new file was renamed over the old one; the old one was not rewritten in place.
    assert path.stat().st_ino != old_inode
    assert os.listdir(tmp_path) == ["out.xlsx"]


def test_failed_write_leaves_the_old_file_and_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "out.xlsx"
    write_xlsx(path, Sheet(["prompt"], [["original"]]))
    before = path.read_bytes()

    def broken(filename: str, *args: object) -> None:
        Path(filename).write_bytes(b"half a workbook")
        raise OSError("disk full")

    monkeypatch.setattr(exports, "write_sheet", broken)
    with pytest.raises(OSError, match="disk full"):
        write_xlsx(path, Sheet(["prompt"], [["replacement"]]))
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["out.xlsx"]


def test_template_workbook_has_empty_result_column(tmp_path: Path) -> None:
    plan = make_plan([{"prompt": "a", "model": "echo"}], ["prompt", "model"])
    path = tmp_path / "template.xlsx"
    write_xlsx(path, template_sheet(plan))
    assert values(load_sheet(path)) == [["prompt", "model", "result"], ["a", "echo", None]]
