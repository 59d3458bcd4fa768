"""Tests for batchexec/templating.py: ``${output.n}`` parsing and substitution."""

from __future__ import annotations

import pytest

from batchexec.templating import TemplateError, references, substitute


def test_prompt_without_references_names_no_rows() -> None:
    assert references("Summarise this: $5, {braces} and $output.1") == frozenset()


def test_references_collects_every_row_named_once() -> None:
    prompt = "Compare ${output.1} with ${output.3}, then ${output.1} again."
    assert references(prompt) == frozenset({1, 3})


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("${output.12}", {12}),
        ("${ output.2 }", {2}),
        ("${output. 4}", {4}),
        ("x${output.1}y${output.2}z", {1, 2}),
    ],
)
def test_references_accepts_positive_integers_with_surrounding_spaces(
    prompt: str, expected: set[int]
) -> None:
    assert references(prompt) == frozenset(expected)


@pytest.mark.parametrize(
    "reference",
    [
        "${output.0}",
        "${output.-1}",
        "${output.one}",
        "${output.}",
        "${output.1.5}",
        "${output.1 2}",
        "${output.²}",  # a digit to str.isdigit, but not a number
        "${output.\u0661}",  # Arabic-Indic one: a digit, but not ASCII
    ],
)
def test_malformed_reference_is_reported_not_passed_through(reference: str) -> None:
    with pytest.raises(TemplateError) as caught:
        references(f"Look at {reference} please")
    assert reference in str(caught.value)
    assert "${output.n}" in str(caught.value)


def test_template_error_is_a_value_error() -> None:
    assert issubclass(TemplateError, ValueError)


@pytest.mark.parametrize(
    "text", ["${outputs.1}", "${input.1}", "$ {output.1}", "{output.1}", "$output.1", "${output.1"]
)
def test_lookalikes_are_neither_references_nor_errors(text: str) -> None:
    assert references(text) == frozenset()
    assert substitute(text, {1: "SHOULD NOT APPEAR"}) == text


def test_substitute_replaces_each_reference_with_its_output() -> None:
    prompt = "A=${output.1}; B=${ output.2 }; A again=${output.1}."
    assert substitute(prompt, {1: "one", 2: "two"}) == "A=one; B=two; A again=one."


def test_substitute_leaves_prompt_without_references_unchanged() -> None:
    prompt = "No references here: $ { } \\1"
    assert substitute(prompt, {}) == prompt


def test_substitute_does_not_expand_references_inside_outputs() -> None:
    # A model answering with a reference of its own must not pull in other rows.
    outputs = {1: "see ${output.2}", 2: "secret"}
    assert substitute("Got: ${output.1}", outputs) == "Got: see ${output.2}"


def test_substitute_inserts_outputs_verbatim() -> None:
    # Regex replacement syntax in an output must not be interpreted.
    output = r"\1 \g<0> $1 \n ${x} " + "line\nbreak"
    assert substitute("[${output.1}]", {1: output}) == f"[{output}]"


def test_substitute_handles_empty_output() -> None:
    assert substitute("before ${output.1} after", {1: ""}) == "before  after"
