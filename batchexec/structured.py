"""Structured answers: a JSON Schema for a row's answer, checked, asked for and enforced.

``check_schema`` vets a user's schema before anything runs; ``response_format``
and ``instruction`` ask a model for it (natively, or in words where a provider
cannot constrain its output); ``parse_answer`` turns an answer into canonical
JSON text or raises ``InvalidAnswerError``; ``fields_of`` and ``field_cells``
spread a result into one typed cell per top-level field.

Schemas are JSON Schema draft 2020-12; ``format`` is an annotation, not checked.
Validation never fetches anything: a ``$ref`` that is not ``#...`` is refused
up front, and the validator's registry cannot retrieve.

Regular expressions in a schema (``pattern``, ``patternProperties``, and the
property names ``additionalProperties`` matches against the latter) are matched
with the ``regex`` package rather than ``re``, which cannot be stopped: a match
gets ``PATTERN_TIMEOUT_S``, and all of an answer's ``ANSWER_PATTERNS_TIMEOUT_S``.
Over either, or past ``MAX_CHECK_STEPS`` keyword checks in all (``allOf`` and
``$ref`` can multiply them), the row fails at once (``FatalProviderError``) rather than asking
for another answer (``InvalidAnswerError``): the slowness is the pattern's, the
next answer (the same one, from ``echo``) would likely be as slow, and each try
would cost another paid answer and another check.

``check_schema`` compiles every pattern up front (one that does not compile is a
``ValueError``), within ``MAX_PATTERN_SIZE`` (``regex`` writes repeats out as it
compiles: ``(?:a{1000}){1000}`` takes seconds), and refuses what would leave
matching to ``re``: ``$schema`` below the root (jsonschema would switch to that
dialect's own validator there) and ``unevaluatedProperties`` beside
``patternProperties`` (jsonschema matches the latter's patterns for the former
with ``re``). Patterns keep ``re``'s meaning, as the metaschema's ``format:
regex`` compiles them with ``re`` too, but for two things ``re`` reads as
literal characters: ``regex``'s fuzzy constraints (``(?:abc){e<=1}``) and POSIX
classes (``[[:alpha:]]``).
"""

from __future__ import annotations

import json
import math
import re._parser as re_parser  # type: ignore[import-not-found]
import time
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from typing import Any

import regex  # type: ignore[import-untyped]
from jsonschema import Draft202012Validator, validators
from jsonschema.exceptions import SchemaError, UnknownType, ValidationError, best_match
from jsonschema.protocols import Validator
from referencing import Registry
from referencing.exceptions import Unresolvable

from batchexec.columns import Cell
from batchexec.errors import FatalProviderError, InvalidAnswerError

#: Characters of a schema as compact JSON, at most.
MAX_SCHEMA_CHARS = 65_536
#: Levels of objects and arrays in a schema, at most: deeper only costs time.
MAX_SCHEMA_DEPTH = 32
#: Keyword checks one answer may take, at most: a small schema of ``allOf`` and ``$ref``
#: can ask for 2**n of them (n ``$defs`` each naming the next twice), which would take
#: hours; a real answer needs far fewer (a 1,000-item list of 5-keyword objects, 10,000).
MAX_CHECK_STEPS = 50_000
#: Seconds one of a schema's patterns may take on one string, at most.
PATTERN_TIMEOUT_S = 0.05
#: Seconds a schema's patterns may take on one answer in all, compiling them included.
ANSWER_PATTERNS_TIMEOUT_S = 0.2
#: Size of a schema's patterns in all, at most, each counting its characters or, if more,
#: its items with repeats written out (``a{1000}``: 1,000); ``regex`` takes time for
#: the one and memory for the other to compile them, 25 ms at most for 5,000.
MAX_PATTERN_SIZE = 5_000
#: Characters of an ``InvalidAnswerError`` message, at most.
MAX_ERROR_CHARS = 300
#: The name a schema goes by in a ``response_format``; OpenAI requires one.
SCHEMA_NAME = "answer"
#: Characters of an answer quoted in the error when it is not JSON.
_QUOTED_CHARS = 40
#: Keywords whose values are references a validator follows.
_REFERENCE_KEYWORDS = ("$ref", "$dynamicRef")
#: A registry that knows no resource and cannot retrieve one (jsonschema's default
#: would fetch a remote ``$ref`` over the network).
_NO_RETRIEVAL: Registry[Any] = Registry()
#: The matcher of the answer ``parse_answer`` is checking, where the keyword functions
#: find it (jsonschema passes them nothing more): set and reset around each check.
_MATCHING: ContextVar[_Matcher] = ContextVar("batchexec.structured.matching")
#: re's opcodes for a repeat, whose argument is (at least, at most, what repeats).
_REPEATS = frozenset({re_parser.MAX_REPEAT, re_parser.MIN_REPEAT, re_parser.POSSESSIVE_REPEAT})
_TOO_DEEP = "The response schema has a pattern nested too deeply to compile."


def check_schema(schema: object) -> dict[str, Any]:
    """``schema``, when it is a usable JSON Schema object; else ``ValueError`` saying why."""
    if not isinstance(schema, dict):
        raise ValueError(f"The response schema must be a JSON object, not {_kind(schema)}.")
    _check_bounds(schema)
    try:
        text = json.dumps(schema, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"The response schema must hold only JSON values: {exc}.") from None
    if len(text) > MAX_SCHEMA_CHARS:
        raise ValueError(
            f"The response schema is {len(text):,} characters of JSON; "
            f"at most {MAX_SCHEMA_CHARS:,} are allowed."
        )
    remote = _remote_reference(schema)
    if remote is not None:
        raise ValueError(
            f"The response schema refers outside itself ({remote!r}): "
            "only references within it (starting with '#') are followed."
        )
    # First: the metaschema's format: regex compiles every pattern with re, unbounded.
    _check_patterns(schema)
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        # jsonschema raises its best match among the schema's problems.
        raise ValueError(
            _shortened(
                "The response schema is not a valid JSON Schema (draft 2020-12): "
                f"{exc.message} (at {exc.json_path})"
            )
        ) from None
    return schema


def response_format(schema: dict[str, Any]) -> dict[str, Any]:
    """The OpenAI-shaped ``response_format`` asking for ``schema``, as providers take it.

    Not ``strict``: OpenAI's strict mode takes only a subset of JSON Schema, and
    every answer is validated here anyway.
    """
    return {
        "type": "json_schema",
        "json_schema": {"name": SCHEMA_NAME, "schema": schema, "strict": False},
    }


def instruction(schema: dict[str, Any]) -> str:
    """Words asking for ``schema``, for a provider that cannot constrain its output."""
    return (
        "Answer with JSON alone, no other text: one JSON value matching this JSON Schema.\n"
        + json.dumps(schema, ensure_ascii=False)
    )


def parse_answer(text: str, schema: dict[str, Any]) -> str:
    """``text`` as canonical compact JSON, when it is JSON that matches ``schema``.

    Surrounding whitespace and one Markdown code fence (```` ```json ... ``` ````),
    which models like to add, are taken off first. Raises ``InvalidAnswerError``,
    saying in one line what is wrong, or ``FatalProviderError`` when ``schema``
    itself cannot be used (``check_schema`` lets no such schema through).
    """
    body = _unfenced(text)
    if not body:
        raise InvalidAnswerError("The answer is not valid JSON: it is empty.")
    try:
        value = json.loads(body, parse_constant=_refuse_constant, parse_float=_finite_float)
    except ValueError as exc:
        raise InvalidAnswerError(
            _shortened(f"The answer is not valid JSON: {exc}; it begins {_opening(text)}")
        ) from None
    except RecursionError:
        raise InvalidAnswerError("The answer is not valid JSON: it is nested too deeply.") from None
    if "$schema" in schema:
        # jsonschema would switch to the dialect's own validator, matching with re, at
        # any $ref to the root; check_schema refuses $schema anywhere else.
        schema = {key: value for key, value in schema.items() if key != "$schema"}
    validator = _BoundedValidator(schema, registry=_NO_RETRIEVAL)
    matching = _MATCHING.set(_Matcher())
    try:
        problem = best_match(validator.iter_errors(value))
    except FatalProviderError:
        raise
    except (Unresolvable, UnknownType, regex.error) as exc:
        raise FatalProviderError(_shortened(f"The response schema cannot be used: {exc}")) from None
    except (TypeError, ValueError, AttributeError, KeyError) as exc:
        # A $ref into data the metaschema never checked ({"minLength": "a"}, say).
        raise FatalProviderError(
            _shortened(f"The response schema cannot be used: {type(exc).__name__}: {exc}")
        ) from None
    except RecursionError:
        raise InvalidAnswerError(
            "The answer does not match the schema: it is nested too deeply to check."
        ) from None
    finally:
        _MATCHING.reset(matching)
    if problem is not None:
        raise InvalidAnswerError(
            _shortened(
                f"The answer does not match the schema: {problem.message} (at {problem.json_path})"
            )
        )
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def fields_of(schema: dict[str, Any]) -> tuple[str, ...]:
    """The names of the schema's top-level ``properties``, in order; none unless it
    describes an object."""
    kind = schema.get("type", "object")
    kinds = kind if isinstance(kind, list) else [kind]
    properties = schema.get("properties")
    if "object" not in kinds or not isinstance(properties, dict):
        return ()
    return tuple(name for name in properties if isinstance(name, str))


def field_cells(result: str | None, fields: Sequence[str]) -> list[Cell | None]:
    """One cell per field of ``result`` (canonical JSON text): numbers, booleans and
    text as themselves, arrays and objects as compact JSON, null or missing as None.

    A result that is not a JSON object gives None for every field.
    """
    value: object = None
    if result is not None:
        try:
            value = json.loads(result)
        except (ValueError, RecursionError):
            value = None
    if not isinstance(value, dict):
        return [None] * len(fields)
    return [_cell(value.get(name)) for name in fields]


def _cell(value: object) -> Cell | None:
    if value is None or isinstance(value, str | bool | int | float):
        return value
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _check_bounds(schema: dict[str, Any]) -> None:
    """Raise ``ValueError`` for a schema nested deeper than ``MAX_SCHEMA_DEPTH`` or plainly
    over ``MAX_SCHEMA_CHARS``, as soon as either shows: no recursion, no serializing."""
    # A lower bound of the JSON text's length: a character a value, its text, and its keys.
    chars = 0
    stack: list[tuple[object, int]] = [(schema, 1)]
    while stack:
        node, depth = stack.pop()
        chars += 1 + (len(node) if isinstance(node, str) else 0)
        if chars > MAX_SCHEMA_CHARS:
            raise ValueError(
                f"The response schema is over {MAX_SCHEMA_CHARS:,} characters of JSON."
            )
        if isinstance(node, dict | list) and depth > MAX_SCHEMA_DEPTH:
            raise ValueError(f"The response schema is nested over {MAX_SCHEMA_DEPTH} levels deep.")
        if isinstance(node, dict):
            chars += sum(len(str(key)) for key in node)
            stack.extend((value, depth + 1) for value in node.values())
        elif isinstance(node, list):
            stack.extend((item, depth + 1) for item in node)


def _check_patterns(schema: dict[str, Any]) -> None:
    """Raise ``ValueError`` unless every pattern in ``schema`` parses as ``re`` reads it
    and compiles with ``regex``, within ``MAX_PATTERN_SIZE`` in all, and ``regex`` alone
    would match them (module docstring).

    Every object is looked at, even ones that are data, as in ``_remote_reference``.
    """
    patterns: dict[str, None] = {}
    keywords: set[str] = set()
    for node in _objects(schema):
        if node is not schema and "$schema" in node:
            raise ValueError(
                "The response schema names a dialect ($schema) below its root: "
                "only its root may, and it is read as draft 2020-12."
            )
        keywords.update(
            key for key in ("unevaluatedProperties", "patternProperties") if key in node
        )
        if isinstance(node.get("pattern"), str):
            patterns[node["pattern"]] = None
        if isinstance(node.get("patternProperties"), dict):
            patterns.update(dict.fromkeys(node["patternProperties"]))
    if len(keywords) == 2:
        raise ValueError(
            "The response schema uses unevaluatedProperties with patternProperties, whose "
            "patterns jsonschema then matches with no time limit; use additionalProperties."
        )
    size = 0
    for pattern in patterns:
        try:
            # re's own parser (its compiler's first step) gives the pattern's structure.
            size += max(len(pattern), _unrolled_size(re_parser.parse(pattern)))
            if size > MAX_PATTERN_SIZE:
                raise ValueError(
                    f"The response schema's patterns are too big to compile: {size:,} in size "
                    f"with {_opening(pattern)}, at most {MAX_PATTERN_SIZE:,} (a pattern's "
                    "characters or, if more, its items with repeats written out: 'a{1000}' "
                    "is 1,000)."
                )
            regex.compile(pattern, cache_pattern=False)
        except (re_parser.error, regex.error) as exc:
            raise ValueError(
                _shortened(f"The response schema's pattern {_opening(pattern)} is invalid: {exc}.")
            ) from None
        except RecursionError:
            raise ValueError(_TOO_DEEP) from None


def _unrolled_size(parsed: Any) -> int:
    """The items of ``parsed`` (a pattern as re parses it) with repeats written out as
    often as they must repeat, as ``regex`` compiles them."""
    size = 0
    for opcode, argument in parsed:
        if opcode in _REPEATS:
            at_least, _at_most, repeated = argument
            size += max(at_least, 1) * _unrolled_size(repeated)
        else:
            size += 1 + sum(_unrolled_size(part) for part in _subpatterns(argument))
    return size


def _subpatterns(argument: object) -> Iterator[Any]:
    # A group, branch, assertion or condition holds its parts in tuples and lists.
    if isinstance(argument, re_parser.SubPattern):
        yield argument
    elif isinstance(argument, tuple | list):
        for item in argument:
            yield from _subpatterns(item)


def _objects(schema: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every object in ``schema``, itself included (no recursion)."""
    stack: list[object] = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            yield node
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


class _Matcher:
    """Matches a schema's patterns against one answer: each compiled once, each match
    within ``PATTERN_TIMEOUT_S``, all of them within ``ANSWER_PATTERNS_TIMEOUT_S``."""

    def __init__(self) -> None:
        self._compiled: dict[str, Any] = {}
        self._spent_s = 0.0
        self._steps = 0

    def step(self) -> None:
        """Count one keyword check; ``FatalProviderError`` past ``MAX_CHECK_STEPS``."""
        self._steps += 1
        if self._steps > MAX_CHECK_STEPS:
            raise FatalProviderError(
                f"The answer could not be checked: the schema takes over {MAX_CHECK_STEPS:,} "
                "steps to check it (references that multiply, say)."
            )

    def search(self, pattern: str, text: str) -> bool:
        """Whether ``pattern`` matches somewhere in ``text``; ``FatalProviderError`` when
        that takes too long."""
        left_s = ANSWER_PATTERNS_TIMEOUT_S - self._spent_s
        started = time.perf_counter()
        try:
            compiled = self._compiled.get(pattern)
            if compiled is None:
                # Not regex's cache: it would keep up to 500 patterns, from every schema.
                compiled = self._compiled[pattern] = regex.compile(pattern, cache_pattern=False)
            timeout_s = min(PATTERN_TIMEOUT_S, left_s - (time.perf_counter() - started))
            if timeout_s <= 0:
                raise TimeoutError
            return compiled.search(text, timeout=timeout_s) is not None
        except TimeoutError:
            if left_s > PATTERN_TIMEOUT_S:
                limit = f"over {PATTERN_TIMEOUT_S} s on {_opening(text)}"
            else:
                limit = f"the schema's patterns have {ANSWER_PATTERNS_TIMEOUT_S} s in all"
            raise FatalProviderError(
                _shortened(
                    f"The answer could not be checked: the schema's pattern {pattern!r} "
                    f"took too long ({limit})."
                )
            ) from None
        finally:
            self._spent_s += time.perf_counter() - started


def _search(pattern: str, text: str) -> bool:
    return _MATCHING.get().search(pattern, text)


# jsonschema's own pattern, patternProperties and additionalProperties (_keywords.py,
# _utils.find_additional_properties) and their messages, matching with _search, not re.


def _pattern(
    validator: Any, pattern: str, instance: Any, schema: dict[str, Any]
) -> Iterator[ValidationError]:
    if validator.is_type(instance, "string") and not _search(pattern, instance):
        yield ValidationError(f"{instance!r} does not match {pattern!r}")


def _pattern_properties(
    validator: Any, patterns: dict[str, Any], instance: Any, schema: dict[str, Any]
) -> Iterator[ValidationError]:
    if not validator.is_type(instance, "object"):
        return
    for pattern, subschema in patterns.items():
        for key, value in instance.items():
            if _search(pattern, key):
                yield from validator.descend(value, subschema, path=key, schema_path=pattern)


def _additional_properties(
    validator: Any, additional: Any, instance: Any, schema: dict[str, Any]
) -> Iterator[ValidationError]:
    if not validator.is_type(instance, "object"):
        return
    properties = schema.get("properties", {})
    patterns = schema.get("patternProperties", {})
    # Each pattern on its own: jsonschema's one alternation of them all would renumber
    # their groups (a backreference) and refuse inline flags past the first.
    extras = [
        key
        for key in instance
        if key not in properties and not any(_search(pattern, key) for pattern in patterns)
    ]
    if validator.is_type(additional, "object"):
        for extra in extras:
            yield from validator.descend(instance[extra], additional, path=extra)
    elif not additional and extras:
        if "patternProperties" in schema:
            verb = "does" if len(extras) == 1 else "do"
            joined = ", ".join(repr(each) for each in sorted(extras))
            expressions = ", ".join(repr(each) for each in sorted(patterns))
            yield ValidationError(f"{joined} {verb} not match any of the regexes: {expressions}")
        else:
            listed = ", ".join(repr(extra) for extra in sorted(extras, key=str))
            verb = "was" if len(extras) == 1 else "were"
            yield ValidationError(
                f"Additional properties are not allowed ({listed} {verb} unexpected)"
            )


def _counted(check: Any) -> Any:
    """``check``, a keyword's, counting a step each time it is applied."""

    def counted(
        validator: Any, value: Any, instance: Any, schema: dict[str, Any]
    ) -> Iterator[ValidationError]:
        _MATCHING.get().step()
        return check(validator, value, instance, schema)  # type: ignore[no-any-return]

    return counted


#: Draft 2020-12, its regular expressions matched within time limits and its keyword
#: checks counted (module docstring).
_BoundedValidator: type[Validator] = validators.extend(  # type: ignore[no-untyped-call]
    Draft202012Validator,
    {
        keyword: _counted(check)
        for keyword, check in {
            **Draft202012Validator.VALIDATORS,
            "pattern": _pattern,
            "patternProperties": _pattern_properties,
            "additionalProperties": _additional_properties,
        }.items()
    },
)


def _remote_reference(node: object) -> str | None:
    """The first reference in ``node`` that does not start with ``#``, if any.

    Every object is looked at, even ones that are data (an ``enum``'s values):
    a ``#`` reference may point anywhere in the document.
    """
    if isinstance(node, dict):
        for keyword in _REFERENCE_KEYWORDS:
            target = node.get(keyword)
            if isinstance(target, str) and not target.startswith("#"):
                return target
        children: list[object] = list(node.values())
    elif isinstance(node, list):
        children = node
    else:
        return None
    for child in children:
        found = _remote_reference(child)
        if found is not None:
            return found
    return None


def _unfenced(text: str) -> str:
    """``text`` stripped, and out of its Markdown code fence if it is one (```` ``` ````
    or ```` ```json ````, each on its own line)."""
    text = text.strip()
    if len(text) < 6 or not (text.startswith("```") and text.endswith("```")):
        return text
    opener, newline, body = text[3:-3].partition("\n")
    if not newline or opener.strip().casefold() not in ("", "json"):
        return text
    return body.strip()


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        # 1e400 reads as infinity, which JSON cannot hold: no valid answer has it.
        raise ValueError(f"the number {text[:20]} is too large")
    return value


def _refuse_constant(name: str) -> object:
    # json.loads takes NaN and Infinity, which JSON does not have.
    raise ValueError(f"{name} is not a JSON value")


def _opening(text: str) -> str:
    text = " ".join(text.split())
    if len(text) <= _QUOTED_CHARS:
        return repr(text)
    return repr(text[:_QUOTED_CHARS]) + "…"


def _shortened(message: str) -> str:
    message = " ".join(message.split())
    if len(message) <= MAX_ERROR_CHARS:
        return message
    return message[: MAX_ERROR_CHARS - 1] + "…"


def _kind(value: object) -> str:
    if isinstance(value, list | tuple):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    return "null" if value is None else type(value).__name__
