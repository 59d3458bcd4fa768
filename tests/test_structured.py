"""Structured answers: schemas vetted, answers validated and spread into typed cells."""

from __future__ import annotations

import asyncio
import json
import math
import random
import urllib.request
from datetime import date
from typing import Any

import pytest
from aiohttp import web
from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match

from batchexec import structured
from batchexec.catalog import Catalog, ModelSpec, Target
from batchexec.config import Settings
from batchexec.errors import FatalProviderError, InvalidAnswerError, RetryableProviderError
from batchexec.execution import Executor, unsupported_options
from batchexec.planning import ChatInput, Limits, PlannedRow, RowInput, plan_batch
from batchexec.providers import ChatOptions, ChatRequest, Completion, Provider
from batchexec.providers.openai import OpenAIProvider
from batchexec.records import ExecutionStatus, Outcome
from batchexec.retry import RetryPolicy
from batchexec.structured import (
    MAX_ERROR_CHARS,
    MAX_PATTERN_SIZE,
    MAX_SCHEMA_CHARS,
    MAX_SCHEMA_DEPTH,
    check_schema,
    field_cells,
    fields_of,
    instruction,
    parse_answer,
    response_format,
)

pytest_plugins = ["tests.providerfakes"]

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


# Patterns: matched in bounded time, as jsonschema matches them

#: Backtracks exponentially in re and in regex alike on a run of a's that does not end
#: the string: 40 of them take re some seconds, and regex its timeout.
SLOW = "^(a|aa)+$"
NEAR_MISS = json.dumps("a" * 40 + "!")
PROPERTIES = {
    "type": "object",
    "properties": {"id": {"type": "integer"}},
    "patternProperties": {"^n_": {"type": "number"}, "^s_": {"type": "string"}},
    "additionalProperties": False,
}


def test_a_catastrophic_pattern_on_a_near_match_is_simply_not_matched():
    # re backtracks on this one for minutes, blocking the server; regex sees through it.
    schema = {"type": "string", "pattern": "^(a+)+$"}
    with pytest.raises(InvalidAnswerError) as caught:
        parse_answer(json.dumps("a" * 32 + "!"), schema)
    assert str(caught.value) == (
        "The answer does not match the schema: "
        "'aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa!' does not match '^(a+)+$' (at $)"
    )


@pytest.mark.parametrize(
    ("schema", "answer"),
    [
        ({"type": "string", "pattern": SLOW}, NEAR_MISS),
        ({"type": "object", "patternProperties": {SLOW: {}}}, f"{{{NEAR_MISS}: 1}}"),
        (
            {"patternProperties": {"^x": {}, SLOW: {}}, "additionalProperties": False},
            f"{{{NEAR_MISS}: 1}}",
        ),
        ({"propertyNames": {"pattern": SLOW}}, f"{{{NEAR_MISS}: 1}}"),
        # A $ref to the root, whose $schema would have jsonschema switch to its own
        # draft 2020-12 validator there, matching with re.
        (
            {
                "$schema": "https://json-schema.org/draft/2020-12/schema",
                "anyOf": [{"type": "string", "pattern": SLOW}, {"items": {"$ref": "#"}}],
            },
            f"[[{NEAR_MISS}]]",
        ),
    ],
    ids=["pattern", "patternProperties", "additionalProperties", "propertyNames", "root-ref"],
)
def test_a_pattern_that_takes_too_long_fails_the_answer_for_good(schema, answer):
    assert check_schema(schema) is schema
    with pytest.raises(FatalProviderError) as caught:
        parse_answer(answer, schema)
    assert str(caught.value) == (
        f"The answer could not be checked: the schema's pattern {SLOW!r} took too long "
        "(over 0.05 s on 'aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa'…)."
    )
    assert not caught.value.retryable


def test_an_answers_patterns_have_a_time_limit_in_all(monkeypatch):
    # Each string takes the pattern some milliseconds, well within its own limit.
    monkeypatch.setattr(structured, "ANSWER_PATTERNS_TIMEOUT_S", 0.01)
    schema = {"type": "array", "items": {"pattern": SLOW}}
    with pytest.raises(FatalProviderError) as caught:
        parse_answer(json.dumps(["a" * 22 + "!"] * 100), schema)
    assert str(caught.value) == (
        f"The answer could not be checked: the schema's pattern {SLOW!r} took too long "
        "(the schema's patterns have 0.01 s in all)."
    )


@pytest.mark.parametrize(
    ("schema", "answer", "expected"),
    [
        (PROPERTIES, '{"id": 1, "n_a": 2.5, "s_b": "x"}', None),
        (PROPERTIES, '{"id": 1, "n_a": "2.5"}', "'2.5' is not of type 'number' (at $.n_a)"),
        (
            PROPERTIES,
            '{"id": 1, "other": true}',
            "'other' does not match any of the regexes: '^n_', '^s_' (at $)",
        ),
        (
            PROPERTIES,
            '{"y": 1, "x": 2}',
            "'x', 'y' do not match any of the regexes: '^n_', '^s_' (at $)",
        ),
        (
            {"properties": {"id": {}}, "additionalProperties": False},
            '{"id": 1, "b": 2, "a": 3}',
            "Additional properties are not allowed ('a', 'b' were unexpected) (at $)",
        ),
        (
            {"patternProperties": {"^n_": {"type": "number"}}, "additionalProperties": {}},
            '{"n_a": 1, "note": 2}',
            None,
        ),
        (
            {
                "patternProperties": {"^n_": {"type": "number"}},
                "additionalProperties": {"type": "string"},
            },
            '{"n_a": 1, "note": 2}',
            "2 is not of type 'string' (at $.note)",
        ),
        (
            {"type": "string", "pattern": r"^\d{4}-\d{2}$"},
            '"2024-1"',
            r"'2024-1' does not match '^\\d{4}-\\d{2}$' (at $)",
        ),
        ({"type": "string", "pattern": "b"}, '"abc"', None),
        (
            {"propertyNames": {"pattern": "^[a-z]+$"}},
            '{"Abc": 1}',
            "'Abc' does not match '^[a-z]+$' (at $)",
        ),
    ],
)
def test_patterns_validate_as_jsonschemas_own_keywords_do(schema, answer, expected):
    """The same outcome, message and place as jsonschema's re-based keywords give."""
    plain = best_match(Draft202012Validator(schema).iter_errors(json.loads(answer)))
    if plain is None:
        assert expected is None
        assert parse_answer(answer, schema) == json.dumps(json.loads(answer), separators=(",", ":"))
        return
    if expected is not None:
        assert f"{plain.message} (at {plain.json_path})" == expected
    with pytest.raises(InvalidAnswerError) as caught:
        parse_answer(answer, schema)
    assert str(caught.value) == (
        f"The answer does not match the schema: {plain.message} (at {plain.json_path})"
    )


def test_each_pattern_of_patternproperties_is_matched_on_its_own():
    # jsonschema's additionalProperties matches one alternation of them all, which re
    # refuses for an inline flag past its start.
    schema = {"patternProperties": {"^a": {}, "(?i)^b": {}}, "additionalProperties": False}
    assert parse_answer('{"a1": 1, "B2": 2}', schema) == '{"a1":1,"B2":2}'
    with pytest.raises(InvalidAnswerError, match="'c3' does not match any of the regexes"):
        parse_answer('{"a1": 1, "c3": 2}', schema)


async def test_a_pattern_that_takes_too_long_fails_the_row_without_asking_again(fake, executor):
    fake.on(CHAT, Scripted({"review": [NEAR_MISS]}))
    schema = {"type": "string", "pattern": SLOW}
    [outcome] = await run_all(executor(), row(1, "review", schema))

    assert outcome.status is ExecutionStatus.FAILED
    assert outcome.error is not None
    assert outcome.error.startswith(
        f"The answer could not be checked: the schema's pattern {SLOW!r} took too long"
    )
    assert outcome.attempts == 1
    assert len(fake.seen(CHAT)) == 1


@pytest.mark.parametrize(
    ("schema", "message"),
    [
        ({"pattern": "("}, "pattern '(' is invalid: missing ), unterminated subpattern"),
        ({"patternProperties": {"[a": {}}}, "pattern '[a' is invalid: unterminated character"),
        # Data, which the metaschema does not look at, but which a $ref makes a schema.
        ({"x-rule": {"pattern": "a{2}{3}"}, "$ref": "#/x-rule"}, "'a{2}{3}' is invalid"),
    ],
)
def test_a_pattern_that_does_not_compile_is_refused(schema, message):
    with pytest.raises(ValueError) as caught:
        check_schema(schema)
    assert str(caught.value).startswith("The response schema's pattern ")
    assert message in str(caught.value)


def test_patterns_up_to_the_size_limit_are_usable_and_bigger_ones_are_not():
    # regex writes repeats out as it compiles: a{4294967294} would exhaust the memory.
    assert check_schema({"pattern": f"a{{{MAX_PATTERN_SIZE}}}"}) is not None
    assert check_schema({"pattern": "x" * MAX_PATTERN_SIZE}) is not None
    for pattern in [
        f"a{{{MAX_PATTERN_SIZE + 1}}}",
        "a{4294967294}",
        "(?:(?:(?:a{100}){100}){100}){100}",
        "x" * (MAX_PATTERN_SIZE + 1),
    ]:
        with pytest.raises(ValueError, match=r"^The response schema's patterns are too big"):
            check_schema({"pattern": pattern})
    # The limit is on all of a schema's patterns together, data included.
    half = MAX_PATTERN_SIZE // 2
    with pytest.raises(ValueError, match=f"{MAX_PATTERN_SIZE + 1:,} in size"):
        check_schema(
            {
                "properties": {"a": {"pattern": f"a{{{half}}}"}},
                "patternProperties": {f"b{{{half + 1}}}": {}},
            }
        )


def test_a_pattern_nested_too_deeply_is_refused():
    with pytest.raises(ValueError, match=r"^The response schema has a pattern nested too deeply"):
        check_schema({"pattern": "(" * 1000 + ")" * 1000})


def test_dollar_schema_is_refused_below_the_root():
    root = {"$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object"}
    assert check_schema(root) is root
    below = {"properties": {"a": {"$schema": "http://json-schema.org/draft-07/schema#"}}}
    with pytest.raises(ValueError, match=r"names a dialect \(\$schema\) below its root"):
        check_schema(below)


def test_unevaluated_properties_are_refused_beside_pattern_properties():
    # jsonschema's unevaluatedProperties matches patternProperties' patterns with re.
    unevaluated: dict[str, Any] = {"properties": {"a": {}}, "unevaluatedProperties": False}
    assert check_schema(unevaluated) is unevaluated
    assert parse_answer('{"a": 1}', unevaluated) == '{"a":1}'
    with pytest.raises(ValueError, match="uses unevaluatedProperties with patternProperties"):
        check_schema({"allOf": [unevaluated, {"patternProperties": {"^b": {}}}]})


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


# The executor: answers validated inside the retried call

CHAT = "/v1/chat/completions"
MODEL = ModelSpec(name="rater", provider="openai", model_id="gpt-4o-mini")
VALID = '{"sentiment": "positive", "score": 0.9}'
CANONICAL = '{"sentiment":"positive","score":0.9}'
CHATTY = "Sure! The review is positive, with a score of 0.9."


def chat_completion(content: str) -> dict[str, Any]:
    """A chat completion as OpenAI's API answers it (see tests/test_providers_openai.py)."""
    return {
        "id": "chatcmpl-123",
        "object": "chat.completion",
        "created": 1677652288,
        "model": "gpt-4o-mini",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content, "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 9, "completion_tokens": 12, "total_tokens": 21},
    }


class Scripted:
    """Answers each prompt (the last user message) with its script's contents in turn,
    the last one for good."""

    def __init__(self, scripts: dict[str, list[str]]) -> None:
        self.scripts = {prompt: list(contents) for prompt, contents in scripts.items()}

    def next(self, prompt: str) -> str:
        script = self.scripts[prompt]
        return script.pop(0) if len(script) > 1 else script[0]

    async def __call__(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        return web.json_response(chat_completion(self.next(body["messages"][-1]["content"])))


class NoJitter(random.Random):
    """Any backoff would draw its jitter here: an answer asked for again must not wait."""

    def uniform(self, a: float, b: float) -> float:
        raise AssertionError("a backoff delay was drawn")


class Unconstrained(Provider):
    """A custom provider on the base defaults: it honours no option, a schema included."""

    name = "custom"

    def __init__(self, settings: Settings, scripted: Scripted) -> None:
        super().__init__(settings, None)  # type: ignore[arg-type]
        self.scripted = scripted
        self.requests: list[ChatRequest] = []

    async def complete(self, model: ModelSpec, request: ChatRequest) -> Completion:
        self.refuse_unsupported(request.options)
        self.requests.append(request)
        return Completion(self.scripted.next(request.prompt), prompt_tokens=5, completion_tokens=7)


def row(
    index: int,
    prompt: str,
    schema: dict[str, Any] | None = SENTIMENT,
    *,
    model: ModelSpec = MODEL,
    system: str | None = None,
) -> PlannedRow:
    """A prompt row that asks for ``schema``, as the planner makes it: in its options."""
    target = Target(model=model, system_prompt=system, params={})
    chat = None
    if schema is not None:
        chat = ChatInput(options=ChatOptions(response_format=response_format(schema)))
    return PlannedRow(
        index=index, prompt=prompt, target=target, depends_on=frozenset(), cells={}, chat=chat
    )


@pytest.fixture
def settings(fake, no_provider_env):
    return Settings(_env_file=None, openai_base_url=fake.url("/v1"))


@pytest.fixture
def executor(settings, http_session):
    def make(*extra: Provider, max_retries: int = 3) -> Executor:
        providers: dict[str, Provider] = {"openai": OpenAIProvider(settings, http_session)}
        providers.update({provider.name: provider for provider in extra})
        tuned = settings.model_copy(update={"max_retries": max_retries})
        return Executor(tuned, providers, rng=NoJitter())

    return make


async def run_all(executor: Executor, *rows: PlannedRow) -> list[Outcome]:
    return list(await asyncio.gather(*(executor.run(r, r.prompt) for r in rows)))


def test_an_invalid_answer_is_asked_for_again_without_waiting():
    policy = RetryPolicy(base_delay_s=10)
    assert policy.delay_s(3, InvalidAnswerError("no"), NoJitter()) == 0


async def test_invalid_first_answers_are_retried_and_every_row_ends_valid(fake, executor):
    prompts = [f"review {n}" for n in range(6)]
    # Even rows answer in prose first, then in a fence; odd rows answer right away.
    fake.on(
        CHAT,
        Scripted(
            {
                prompt: [CHATTY, f"```json\n{VALID}\n```"] if n % 2 == 0 else [VALID]
                for n, prompt in enumerate(prompts)
            }
        ),
    )
    outcomes = await run_all(executor(), *(row(n, p) for n, p in enumerate(prompts, start=1)))

    assert [o.status for o in outcomes] == [ExecutionStatus.SUCCEEDED] * 6
    assert [o.result for o in outcomes] == [CANONICAL] * 6
    assert [o.error for o in outcomes] == [None] * 6
    assert [o.attempts for o in outcomes] == [2, 1, 2, 1, 2, 1]
    # Tokens are what the provider billed: both answers of a retried row.
    assert [o.prompt_tokens for o in outcomes] == [18, 9, 18, 9, 18, 9]
    assert [o.completion_tokens for o in outcomes] == [24, 12, 24, 12, 24, 12]
    seen = fake.seen(CHAT)
    assert len(seen) == 9
    for request in seen:
        body = request.json()
        assert body["response_format"] == {
            "type": "json_schema",
            "json_schema": {"name": "answer", "schema": SENTIMENT, "strict": False},
        }
        assert [message["role"] for message in body["messages"]] == ["user"]


@pytest.mark.parametrize("max_retries", [0, 3])
async def test_an_answer_never_valid_fails_the_row_with_the_reason(fake, executor, max_retries):
    fake.on(CHAT, Scripted({"review": ['{"sentiment": "great", "score": 1}']}))
    [outcome] = await run_all(executor(max_retries=max_retries), row(1, "review"))

    assert outcome.status is ExecutionStatus.FAILED
    assert outcome.error == (
        "The answer does not match the schema: "
        "'great' is not one of ['positive', 'neutral', 'negative'] (at $.sentiment)"
    )
    assert outcome.result is None
    assert outcome.attempts == max_retries + 1
    assert len(fake.seen(CHAT)) == max_retries + 1
    assert outcome.prompt_tokens == 9 * (max_retries + 1)


async def test_a_schema_that_cannot_be_used_fails_the_row_without_retrying(fake, executor):
    fake.on(CHAT, Scripted({"review": [VALID]}))
    schema = {"$ref": "http://127.0.0.1:9/schema.json"}
    [outcome] = await run_all(executor(), row(1, "review", schema))

    assert outcome.status is ExecutionStatus.FAILED
    assert outcome.error is not None
    assert outcome.error.startswith("The response schema cannot be used: ")
    assert outcome.attempts == 1


async def test_a_row_without_a_schema_keeps_its_answer_as_it_is(fake, executor):
    fake.on(CHAT, Scripted({"review": [CHATTY]}))
    [outcome] = await run_all(executor(), row(1, "review", None))

    assert (outcome.status, outcome.result, outcome.attempts) == (
        ExecutionStatus.SUCCEEDED,
        CHATTY,
        1,
    )
    assert (outcome.prompt_tokens, outcome.completion_tokens) == (9, 12)
    assert "response_format" not in fake.seen(CHAT)[0].json()


async def test_a_chat_request_of_the_openai_batch_api_is_passed_on_as_given(fake, executor):
    # OpenAI's Batch API hands back what the model said, schema or not; so does batchexec's.
    fake.on(CHAT, Scripted({"review": [CHATTY]}))
    planned = PlannedRow(
        index=1,
        prompt="review",
        target=Target(model=MODEL, system_prompt=None, params={}),
        depends_on=frozenset(),
        cells={},
        chat=ChatInput(options=ChatOptions(response_format=response_format(SENTIMENT))),
        verbatim=True,
    )
    [outcome] = await run_all(executor(), planned)

    assert (outcome.status, outcome.result, outcome.attempts) == (
        ExecutionStatus.SUCCEEDED,
        CHATTY,
        1,
    )
    assert fake.seen(CHAT)[0].json()["response_format"] == response_format(SENTIMENT)


async def test_an_assistants_schema_goes_from_the_catalog_to_the_wire(fake, executor, tmp_path):
    catalog = tmp_path / "models.toml"
    catalog.write_text(
        f'[models."rater"]\nprovider = "openai"\nmodel_id = "gpt-4o-mini"\n'
        f'base_url = "{fake.url("/v1")}"\n'
        + """
[assistants."Rater"]
model = "rater"
system_prompt = "Rate it."

[assistants."Rater".response_schema]
type = "object"
required = ["sentiment", "score"]
properties.sentiment = { enum = ["positive", "neutral", "negative"] }
properties.score = { type = "number" }
properties.tags = { type = "array", items = { type = "string" } }
"""
    )
    limits = Limits(max_executions=1, max_prompt_length=100, default_model="echo")
    plan = plan_batch(
        [RowInput("review", assistant="rater")], ["prompt"], Catalog.load(catalog), limits
    )
    [planned] = plan.rows
    assert plan.options.fields == ("sentiment", "score", "tags")
    fake.on(CHAT, Scripted({"review": [CHATTY, VALID]}))
    [outcome] = await run_all(executor(), planned)

    assert (outcome.status, outcome.result, outcome.attempts) == (
        ExecutionStatus.SUCCEEDED,
        CANONICAL,
        2,
    )
    first, again = fake.seen(CHAT)
    assert (
        first.json()
        == again.json()
        == {
            "model": "gpt-4o-mini",
            "messages": [
                {"role": "system", "content": "Rate it."},
                {"role": "user", "content": "review"},
            ],
            "response_format": response_format(SENTIMENT),
        }
    )


@pytest.mark.parametrize(
    ("system", "expected"),
    [
        ("Rate it.", "Rate it.\n\n" + instruction(SENTIMENT)),
        (None, instruction(SENTIMENT)),
    ],
)
async def test_a_provider_without_native_support_is_given_the_schema_in_words(
    settings, executor, system, expected
):
    custom = Unconstrained(settings, Scripted({"review": [CHATTY, VALID]}))
    model = ModelSpec(name="mine", provider="custom")
    [outcome] = await run_all(executor(custom), row(1, "review", model=model, system=system))

    assert (outcome.status, outcome.result, outcome.attempts) == (
        ExecutionStatus.SUCCEEDED,
        CANONICAL,
        2,
    )
    assert (outcome.prompt_tokens, outcome.completion_tokens) == (10, 14)
    assert len(custom.requests) == 2
    for request in custom.requests:
        assert request.system_prompt == expected
        assert request.options.response_format is None
        assert request.prompt == "review"


def test_unsupported_options_leave_a_schema_to_the_instruction(settings, http_session):
    custom = Unconstrained(settings, Scripted({}))
    options = ChatOptions(temperature=0.2, response_format=response_format(SENTIMENT))
    assert unsupported_options(custom, options) == [
        "temperature: the custom provider does not pass it on"
    ]
    # Where a provider does not take the response_format at all, it says so.
    other = ChatOptions(response_format={"type": "json_object"})
    assert unsupported_options(custom, other) == [
        "response_format: the custom provider does not pass it on"
    ]
    assert unsupported_options(OpenAIProvider(settings, http_session), options) == []


def test_a_schema_whose_references_multiply_is_stopped_after_a_bounded_count_of_steps() -> None:
    # Each definition names the next twice: 2**40 checks unbounded.
    defs: dict[str, object] = {
        f"d{n}": {"allOf": [{"$ref": f"#/$defs/d{n + 1}"}] * 2} for n in range(40)
    }
    defs["d40"] = {"type": "string"}
    schema = check_schema({"$defs": defs, "$ref": "#/$defs/d0"})
    with pytest.raises(FatalProviderError, match="takes over 50,000 steps"):
        parse_answer('"x"', schema)


def test_a_reference_into_data_the_metaschema_never_checked_fails_the_row_cleanly() -> None:
    schema = check_schema({"x-data": {"minLength": "a"}, "$ref": "#/x-data"})
    with pytest.raises(FatalProviderError, match="cannot be used"):
        parse_answer('"x"', schema)


def test_a_number_too_large_for_json_is_an_invalid_answer() -> None:
    with pytest.raises(InvalidAnswerError, match="too large"):
        parse_answer('{"s": 1e400}', {"type": "object"})
