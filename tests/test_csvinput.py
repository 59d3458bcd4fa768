"""Tests for batchexec/csvinput.py: CSV text to rows, with errors naming the line."""

from __future__ import annotations

import csv
from collections.abc import Iterator

import pytest

from batchexec.columns import OUTPUT_COLUMNS
from batchexec.csvinput import Table, header_columns, parse_csv
from batchexec.errors import InputError

LIMIT = 1_000


@pytest.fixture(autouse=True)
def _restore_csv_field_limit() -> Iterator[None]:
    """parse_csv raises the process-wide csv field limit; put it back after each test."""
    before = csv.field_size_limit()
    yield
    csv.field_size_limit(before)


def parse(text: str, *, max_field_chars: int = LIMIT) -> Table:
    return parse_csv(text, max_field_chars=max_field_chars)


def input_error(text: str, *, max_field_chars: int = LIMIT) -> InputError:
    with pytest.raises(InputError) as caught:
        parse_csv(text, max_field_chars=max_field_chars)
    return caught.value


def test_simple_csv_gives_columns_rows_and_line_numbers() -> None:
    table = parse("prompt,model\nHello,echo\nBye,\n")
    assert table.columns == ("prompt", "model")
    assert table.rows == ({"prompt": "Hello", "model": "echo"}, {"prompt": "Bye", "model": ""})
    assert table.lines == (2, 3)


def test_last_line_without_newline_is_read() -> None:
    assert parse("prompt\nonly row").rows == ({"prompt": "only row"},)


def test_utf8_byte_order_mark_is_not_part_of_the_first_column() -> None:
    table = parse("\ufeffprompt,model\nHi,echo\n")
    assert table.columns == ("prompt", "model")
    assert table.rows[0]["prompt"] == "Hi"


def test_crlf_line_endings() -> None:
    table = parse("prompt,model\r\nHi,echo\r\nBye,echo\r\n")
    assert [row["prompt"] for row in table.rows] == ["Hi", "Bye"]
    assert table.lines == (2, 3)


def test_quoted_commas_quotes_and_embedded_newlines_are_kept() -> None:
    text = 'prompt,note\n"Hello, world","She said ""hi"""\n"line one\nline two",x\nlast,y\n'
    table = parse(text)
    assert table.rows == (
        {"prompt": "Hello, world", "note": 'She said "hi"'},
        {"prompt": "line one\nline two", "note": "x"},
        {"prompt": "last", "note": "y"},
    )
    # The row after a two-line record is on line 5 of the text.
    assert table.lines[0] == 2
    assert table.lines[2] == 5


def test_field_longer_than_the_csv_module_default_parses_when_allowed() -> None:
    big = "x" * 200_000
    assert len(big) > 131_072
    table = parse(f'prompt,model\n"{big}",echo\n', max_field_chars=250_000)
    assert table.rows[0]["prompt"] == big
    assert table.rows[0]["model"] == "echo"


def test_blank_lines_are_skipped_and_lines_still_counted() -> None:
    table = parse("\n\nprompt,model\n\nHi,echo\n   \n,\nBye,echo\n\n")
    assert [row["prompt"] for row in table.rows] == ["Hi", "Bye"]
    assert table.lines == (5, 8)


def test_ragged_row_names_its_line() -> None:
    error = input_error("prompt,model\nok,echo\ntoo,many,cells\n")
    assert "line 3" in error.detail
    assert "expected 2 fields, found 3" in error.detail
    assert len(error.errors) == 1
    assert error.errors[0].index == 2
    assert "line 3" in error.errors[0].message


def test_a_one_column_header_expects_one_field() -> None:
    error = input_error("prompt\nok\ntwo,fields\n")
    assert error.detail == "CSV line 3: expected 1 field, found 2."
    assert error.errors[0].message == "line 3: expected 1 field, found 2"


def test_short_row_is_ragged_too() -> None:
    error = input_error("prompt,model,note\na,echo,n\nb,echo\n")
    assert "line 3" in error.detail
    assert "found 2" in error.detail


def test_unterminated_quote_is_an_input_error_naming_a_line() -> None:
    error = input_error('prompt,model\nfine,echo\n"never closed,echo\n')
    assert error.detail.startswith("CSV line ")
    assert isinstance(error.__cause__, csv.Error)


def test_text_after_closing_quote_is_an_input_error() -> None:
    error = input_error('prompt,model\n"quoted"trailing,echo\n')
    assert "CSV line 2" in error.detail


def test_header_without_prompt_column() -> None:
    error = input_error("question,model\nHi,echo\n")
    assert "line 1" in error.detail
    assert "'prompt'" in error.detail


@pytest.mark.parametrize("text", ["", "\n\n", "  \n \n", "\ufeff"])
def test_empty_text(text: str) -> None:
    assert "empty" in input_error(text).detail


def test_header_only() -> None:
    assert "no rows" in input_error("prompt,model\n").detail
    assert "no rows" in input_error("prompt,model\n\n\n").detail


def test_duplicate_column() -> None:
    error = input_error("prompt,note,note\na,b,c\n")
    assert "'note'" in error.detail
    assert "twice" in error.detail


def test_duplicate_column_differing_only_in_case_of_a_known_name() -> None:
    error = input_error("prompt,Prompt\na,b\n")
    assert "'prompt'" in error.detail
    assert "twice" in error.detail


def test_column_without_a_name() -> None:
    error = input_error("prompt,,model\na,b,echo\n")
    assert "line 1" in error.detail
    assert "column 2" in error.detail


def test_known_headers_match_case_insensitively_and_are_lower_cased() -> None:
    table = parse(" Prompt ,MODEL,Assistant,Note\nHi,echo,,kept as written\n")
    assert table.columns == ("prompt", "model", "assistant", "Note")
    assert table.rows[0] == {
        "prompt": "Hi",
        "model": "echo",
        "assistant": "",
        "Note": "kept as written",
    }


def test_output_columns_of_a_results_file_are_dropped() -> None:
    text = "prompt,Result,status,error,latency_ms,attempts,topic\nHi,old,succeeded,,12,1,t\n"
    table = parse(text)
    assert table.columns == ("prompt", "topic")
    assert table.rows == ({"prompt": "Hi", "topic": "t"},)
    assert {"result", "status", "error"} <= set(OUTPUT_COLUMNS)


def test_cells_are_not_stripped_or_converted() -> None:
    table = parse('prompt,n\n"  padded  ",007\n')
    assert table.rows[0] == {"prompt": "  padded  ", "n": "007"}


def test_a_results_sheets_model_column_is_output_not_input():
    header = ["prompt", "assistant", "result", "status", "error", "model", "latency_ms"]
    assert header_columns(header, "here", unnamed_ok=False) == [
        "prompt",
        "assistant",
        None,
        None,
        None,
        None,
        None,
    ]
    table = parse_csv("prompt,model,result,status\nhi,echo,old,succeeded\n", max_field_chars=100)
    assert table.columns == ("prompt", "model")
