"""Structured answers: schemas vetted, answers validated and spread into typed cells."""

from __future__ import annotations

import json
import math
import urllib.request
from datetime import date
from typing import Any

import pytest

from batchexec.errors import FatalProviderError, InvalidAnswerError, RetryableProviderError
from batchexec.structured import (
    MAX_ERROR_CHARS,
    MAX_SCHEMA_CHARS,
    MAX_SCHEMA_DEPTH,
    check_schema,
    field_cells,
    fields_of,
    instruction,
    parse_answer,
    response_format,
)

SENTIMENT = {
    "type": "object",
    "properties": {
        "sentiment": {"enum": ["positive", "neutral", "negative"]},
        "score": {"type": "number"},
        "tags": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["sentiment", "score"],
}


def nested(depth: int) -> dict[str, Any]:
    """A schema ``depth`` objects deep: ``{"not": {"not": ... {}}}``."""
    schema: dict[str, Any] = {}
    for _ in range(depth - 1):
        schema = {"not": schema}
    return schema


# check_schema


def test_a_usable_schema_is_returned_as_it_is():
    assert check_schema(SENTIMENT) is SENTIMENT


def test_local_references_are_usable():
    schema = {
        "$defs": {"score": {"type": "number"}},
        "type": "object",
        "properties": {"score": {"$ref": "#/$defs/score"}},
    }
    assert check_schema(schema) is schema


@pytest.mark.parametrize(
    ("schema", "kind"),
    [([], "an array"), (True, "a boolean"), ("{}", "a string"), (None, "null"), (3, "a number")],
)
def test_a_schema_must_be_an_object(schema, kind):
    with pytest.raises(ValueError, match=f"^The response schema must be a JSON object, not {kind}"):
        check_schema(schema)


def test_a_schema_invalid_under_the_metaschema_is_refused_naming_where():
    schema = {"type": "object", "properties": {"score": {"type": "numeric"}}}
    with pytest.raises(ValueError) as caught:
        check_schema(schema)
    message = str(caught.value)
    assert message.startswith("The response schema is not a valid JSON Schema (draft 2020-12): ")
    assert message.endswith("(at $.properties.score.type)")


def test_a_schema_at_the_size_limit_is_usable_and_one_character_more_is_not():
    padding = MAX_SCHEMA_CHARS - len(json.dumps({"description": ""}, separators=(",", ":")))
    schema = {"description": "x" * padding}
    assert check_schema(schema) is schema
    with pytest.raises(ValueError, match="is 65,537 characters of JSON; at most 65,536"):
        check_schema({"description": "x" * (padding + 1)})


def test_a_huge_schema_is_refused_before_it_is_serialized():
    # A million small values: refused once the first 65,536 are counted.
    with pytest.raises(ValueError, match="over 65,536 characters"):
        check_schema({"enum": list(range(1_000_000))})


def test_a_schema_at_the_depth_limit_is_usable_and_one_level_more_is_not():
    assert check_schema(nested(MAX_SCHEMA_DEPTH)) is not None
    with pytest.raises(ValueError, match="nested over 32 levels deep"):
        check_schema(nested(MAX_SCHEMA_DEPTH + 1))


def test_a_very_deep_schema_is_refused_without_recursing():
    # Far deeper than Python's recursion limit: json.dumps would raise RecursionError.
    schema: object = []
    for _ in range(100_000):
        schema = [schema]
    with pytest.raises(ValueError, match="nested over 32 levels deep"):
        check_schema({"enum": schema})


@pytest.mark.parametrize(
    "reference",
    ["https://example.com/schema.json", "other.json#/$defs/x", "urn:example:x", "/abs"],
)
def test_a_reference_outside_the_schema_is_refused(reference):
    schema = {"type": "object", "properties": {"a": {"$ref": reference}}}
    with pytest.raises(ValueError, match="refers outside itself") as caught:
        check_schema(schema)
    assert reference in str(caught.value)


def test_a_remote_dynamic_reference_is_refused():
    with pytest.raises(ValueError, match="refers outside itself"):
        check_schema({"$dynamicRef": "https://example.com/meta#items"})


def test_a_remote_reference_hidden_in_data_is_refused():
    # Reachable through a local reference to where it sits.
    schema = {"x-stash": {"$ref": "https://example.com/s"}, "$ref": "#/x-stash"}
    with pytest.raises(ValueError, match="refers outside itself"):
        check_schema(schema)


@pytest.mark.parametrize("value", [math.nan, math.inf, date(2024, 1, 1)])
def test_a_schema_must_hold_json_values_alone(value):
    # TOML, which catalogs are written in, has dates and infinities; JSON has neither.
    with pytest.raises(ValueError, match="must hold only JSON values"):
        check_schema({"type": "number", "default": value})


# response_format and instruction


def test_response_format_is_openais_json_schema_shape():
    assert response_format(SENTIMENT) == {
        "type": "json_schema",
        "json_schema": {"name": "answer", "schema": SENTIMENT, "strict": False},
    }


def test_instruction_gives_the_schema_as_json():
    text = instruction(SENTIMENT)
    assert "JSON" in text.splitlines()[0]
    assert json.loads(text.splitlines()[1]) == SENTIMENT


# parse_answer


def test_a_valid_answer_comes_back_as_canonical_json():
    answer = '  {"score": 0.75,\n "sentiment": "positive", "note": "très bien"}\n'
    assert parse_answer(answer, SENTIMENT) == (
        '{"score":0.75,"sentiment":"positive","note":"très bien"}'
    )


@pytest.mark.parametrize(
    "answer",
    [
        '```json\n{"sentiment": "neutral", "score": 0}\n```',
        '```JSON\n{"sentiment": "neutral", "score": 0}\n```\n',
        '\n```\n{"sentiment": "neutral", "score": 0}\n```',
        '```json\r\n{"sentiment": "neutral", "score": 0}\r\n```',
    ],
)
def test_one_markdown_fence_around_the_answer_is_taken_off(answer):
    assert parse_answer(answer, SENTIMENT) == '{"sentiment":"neutral","score":0}'


@pytest.mark.parametrize(
    "answer",
    [
        'Here you are:\n```json\n{"sentiment": "neutral", "score": 0}\n```',
        '```python\n{"sentiment": "neutral", "score": 0}\n```',
        '```json\n```json\n{"sentiment": "neutral", "score": 0}\n```\n```',
        '```{"sentiment": "neutral", "score": 0}```',
    ],
)
def test_anything_else_around_the_answer_is_not_json(answer):
    with pytest.raises(InvalidAnswerError, match=r"^The answer is not valid JSON: "):
        parse_answer(answer, SENTIMENT)


def test_an_answer_that_is_not_json_says_so_and_how_it_begins():
    with pytest.raises(InvalidAnswerError) as caught:
        parse_answer("Sure! The sentiment is positive, with a score of 0.9 out of 1.", SENTIMENT)
    assert str(caught.value) == (
        "The answer is not valid JSON: Expecting value: line 1 column 1 (char 0); "
        "it begins 'Sure! The sentiment is positive, with a '…"
    )


@pytest.mark.parametrize("answer", ["", "  \n ", "```json\n```"])
def test_an_empty_answer_is_not_json(answer):
    with pytest.raises(InvalidAnswerError, match=r"^The answer is not valid JSON: it is empty\.$"):
        parse_answer(answer, SENTIMENT)


@pytest.mark.parametrize("answer", ["NaN", '{"sentiment": "neutral", "score": Infinity}'])
def test_non_json_numbers_are_refused(answer):
    with pytest.raises(InvalidAnswerError, match="is not a JSON value"):
        parse_answer(answer, SENTIMENT)


def test_a_deeply_nested_answer_is_refused_not_crashed_on():
    with pytest.raises(InvalidAnswerError, match="nested too deeply"):
        parse_answer("[" * 100_000 + "]" * 100_000, {})


def test_an_answer_missing_a_required_field_names_it_and_where():
    with pytest.raises(InvalidAnswerError) as caught:
        parse_answer('{"sentiment": "positive"}', SENTIMENT)
    assert str(caught.value) == (
        "The answer does not match the schema: 'score' is a required property (at $)"
    )


def test_a_wrong_value_deep_in_the_answer_names_its_path():
    with pytest.raises(InvalidAnswerError) as caught:
        parse_answer('{"sentiment": "positive", "score": 1, "tags": ["a", 2]}', SENTIMENT)
    assert str(caught.value) == (
        "The answer does not match the schema: 2 is not of type 'string' (at $.tags[1])"
    )


def test_an_invalid_answer_is_retried_at_once():
    with pytest.raises(InvalidAnswerError) as caught:
        parse_answer("{}", SENTIMENT)
    assert isinstance(caught.value, RetryableProviderError)
    assert caught.value.retryable
    assert caught.value.retry_after_s == 0
    assert caught.value.status is None


def test_error_messages_are_one_bounded_line():
    huge = json.dumps({f"key{n}": "value\nwith a line break" for n in range(1000)})
    with pytest.raises(InvalidAnswerError) as caught:
        parse_answer(huge, {"type": "array"})
    message = str(caught.value)
    assert len(message) <= MAX_ERROR_CHARS
    assert "\n" not in message
    assert message.endswith("…")
    with pytest.raises(InvalidAnswerError) as caught:
        parse_answer("{" + "\n" * 10_000, {})
    assert len(str(caught.value)) <= MAX_ERROR_CHARS
    assert "\n" not in str(caught.value)


def test_an_unusable_schema_never_reaches_the_network(monkeypatch):
    # jsonschema's own default would fetch the reference with urllib.
    def no_network(*args, **kwargs):
        raise AssertionError("validation tried to fetch a schema")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    schema = {"$ref": "http://127.0.0.1:9/schema.json"}
    with pytest.raises(FatalProviderError, match=r"^The response schema cannot be used: "):
        parse_answer("{}", schema)


def test_a_local_reference_is_followed():
    schema = {"$defs": {"n": {"type": "integer"}}, "items": {"$ref": "#/$defs/n"}}
    assert parse_answer("[1, 2]", schema) == "[1,2]"
    with pytest.raises(InvalidAnswerError, match=r"\(at \$\[1\]\)"):
        parse_answer("[1, 2.5]", schema)


def test_format_is_an_annotation():
    assert parse_answer('"not a date"', {"type": "string", "format": "date"}) == '"not a date"'


# fields_of


def test_fields_are_the_top_level_properties_in_order():
    assert fields_of(SENTIMENT) == ("sentiment", "score", "tags")
    assert fields_of({"properties": {"b": {}, "a": {}}}) == ("b", "a")
    assert fields_of({"type": ["object", "null"], "properties": {"a": {}}}) == ("a",)


@pytest.mark.parametrize(
    "schema",
    [
        {},
        {"type": "object"},
        {"type": "array", "properties": {"a": {}}},
        {"type": ["string", "null"], "properties": {"a": {}}},
        {"properties": ["a"]},
    ],
)
def test_no_fields_without_object_properties(schema):
    assert fields_of(schema) == ()


# field_cells


def test_field_cells_are_typed():
    result = parse_answer(
        '{"n": 3, "x": 0.5, "whole": 2.0, "ok": false, "text": "3", "none": null, '
        '"list": [1, "é"], "object": {"a": {"b": 1}}}',
        {},
    )
    fields = ["n", "x", "whole", "ok", "text", "none", "list", "object", "missing"]
    cells = field_cells(result, fields)
    assert cells == [3, 0.5, 2.0, False, "3", None, '[1,"é"]', '{"a":{"b":1}}', None]
    assert [type(cell) for cell in cells[:5]] == [int, float, float, bool, str]


@pytest.mark.parametrize("result", [None, "[1, 2]", '"text"', "3", "null", "not json", ""])
def test_a_result_that_is_not_an_object_gives_no_cells(result):
    assert field_cells(result, ["a", "b"]) == [None, None]


def test_no_fields_no_cells():
    assert field_cells('{"a": 1}', []) == []
