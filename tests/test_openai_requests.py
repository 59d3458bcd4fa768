"""Reading the OpenAI Batch API's input lines: what a bad file costs stays bounded."""

from __future__ import annotations

import json

from batchexec.openai_requests import MAX_ERRORS, parse_lines


def line(custom_id: str, **body: object) -> bytes:
    request = {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": "echo", "messages": [{"role": "user", "content": "hi"}], **body},
    }
    return json.dumps(request).encode() + b"\n"


def test_a_file_of_bad_lines_lists_a_bounded_number_of_problems():
    parsed = parse_lines(b"not json\n" * 200_000, max_lines=50_000, max_chars=1000)

    assert parsed.rows == []
    assert len(parsed.errors) == MAX_ERRORS + 1
    last = parsed.errors[-1]
    assert (last.code, last.line) == ("too_many_errors", MAX_ERRORS + 1)
    assert f"first {MAX_ERRORS} problems" in last.message


def test_every_request_line_counts_against_the_limit_good_or_bad():
    data = b"bad\n" + line("a") + b"\n\n" + b"bad\n" + line("b") + line("c")
    parsed = parse_lines(data, max_lines=3, max_chars=1000)

    assert [error.code for error in parsed.errors] == [
        "invalid_json_line",
        "invalid_json_line",
        "too_many_requests",
    ]
    assert parsed.errors[-1].line == 6  # the fourth request, blank lines skipped
    assert parsed.lines == [2]


def test_a_line_over_the_byte_limit_is_refused_unread():
    long = line("long", temperature=0.5)[:-1] + b" " * 5000 + b"\n"
    parsed = parse_lines(line("short") + long, max_lines=10, max_chars=1000, max_line_bytes=4096)

    assert parsed.lines == [1]
    [error] = parsed.errors
    assert (error.line, error.code) == (2, "invalid_request")
    assert "MAX_BODY_BYTES" in error.message


def test_max_completion_tokens_keeps_its_name_and_both_names_at_once_are_refused():
    parsed = parse_lines(
        line("named", max_completion_tokens=50)
        + line("both", max_tokens=5, max_completion_tokens=5),
        max_lines=10,
        max_chars=1000,
    )

    [row] = parsed.rows
    assert row.chat is not None
    assert (row.chat.options.max_tokens, row.chat.options.max_tokens_as) == (
        50,
        "max_completion_tokens",
    )
    assert "max_tokens_as" not in row.chat.options.given()
    [error] = parsed.errors
    assert (error.line, error.param) == (2, "body.max_tokens")
    assert "not both" in error.message
