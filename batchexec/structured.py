"""Structured answers: a JSON Schema for a row's answer, checked, asked for and enforced.

``check_schema`` vets a user's schema before anything runs; ``response_format``
and ``instruction`` ask a model for it (natively, or in words where a provider
cannot constrain its output); ``parse_answer`` turns an answer into canonical
JSON text or raises ``InvalidAnswerError``; ``fields_of`` and ``field_cells``
spread a result into one typed cell per top-level field.

Schemas are JSON Schema draft 2020-12; ``format`` is an annotation, not checked.
Validation never fetches anything: a ``$ref`` that is not ``#...`` is refused
up front, and the validator's registry cannot retrieve.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError, UnknownType, best_match
from referencing import Registry
from referencing.exceptions import Unresolvable

from batchexec.columns import Cell
from batchexec.errors import FatalProviderError, InvalidAnswerError

#: Characters of a schema as compact JSON, at most.
MAX_SCHEMA_CHARS = 65_536
#: Levels of objects and arrays in a schema, at most: deeper only costs time.
MAX_SCHEMA_DEPTH = 32
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
        value = json.loads(body, parse_constant=_refuse_constant)
    except ValueError as exc:
        raise InvalidAnswerError(
            _shortened(f"The answer is not valid JSON: {exc}; it begins {_opening(text)}")
        ) from None
    except RecursionError:
        raise InvalidAnswerError("The answer is not valid JSON: it is nested too deeply.") from None
    validator = Draft202012Validator(schema, registry=_NO_RETRIEVAL)
    try:
        problem = best_match(validator.iter_errors(value))
    except (Unresolvable, UnknownType) as exc:
        raise FatalProviderError(_shortened(f"The response schema cannot be used: {exc}")) from None
    except RecursionError:
        raise InvalidAnswerError(
            "The answer does not match the schema: it is nested too deeply to check."
        ) from None
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
