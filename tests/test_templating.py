"""Tests for batchexec/templating.py: ``${output.n}`` parsing and substitution."""

from __future__ import annotations

import pytest

from batchexec.templating import (
    Template,
    TemplateError,
    compile_template,
    filled_length,
    references,
    substitute,
)


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


# {{column}} variables


CELLS = {"text": "Good morning", "lang": "French", "Product Name": "lamp"}


def compiled(prompt: str, cells: dict[str, str] = CELLS) -> Template:
    return compile_template(prompt, cells.get, lambda: list(cells))


def test_variables_are_filled_in_and_references_kept_to_fill() -> None:
    template = compiled("Translate {{text}} into {{ lang }}, after {{output.2}} and ${output.1}")
    assert template.references == frozenset({1, 2})
    assert template.render({1: "ONE", 2: "TWO"}) == (
        "Translate Good morning into French, after TWO and ONE"
    )
    assert template.length({1: "ONE", 2: "TWO"}) == len(template.render({1: "ONE", 2: "TWO"}))


def test_a_cell_is_inserted_as_text_and_never_read_again() -> None:
    cells = {"a": "${output.1} {{b}}", "b": "B"}
    template = compiled("{{a}}", cells)
    assert template.references == frozenset()
    assert template.render({}) == "${output.1} {{b}}"


def test_only_a_name_between_braces_is_a_variable() -> None:
    prompt = 'JSON {{"a": 1}}, Jinja {{ x | upper }}, {{}}, {{ 1abc }}, {{Product Name}}'
    assert compiled(prompt).render({}) == (
        'JSON {{"a": 1}}, Jinja {{ x | upper }}, {{}}, {{ 1abc }}, lamp'
    )


def test_a_backslash_makes_a_literal_double_brace() -> None:
    assert compiled(r"\{{text}} is {{text}}").render({}) == "{{text}} is Good morning"
    assert filled_length(r"\{{text}}", CELLS.get) == len("{{text}}")


def test_a_reference_cut_short_by_a_dollar_is_refused_as_before() -> None:
    for prompt in ("${output.1$}", "${output.$1}", "a ${output.1 costs $5}"):
        with pytest.raises(TemplateError, match="is not a reference"):
            references(prompt)
    assert references("price $5 for ${output.1}, $") == frozenset({1})


def test_an_unknown_name_lists_the_columns_and_a_bad_reference_is_refused() -> None:
    with pytest.raises(TemplateError, match=r"\{\{missing\}\} names no column; the columns are"):
        compiled("{{missing}}")
    many = {f"c{n}": "" for n in range(30)}
    with pytest.raises(TemplateError, match="c19 and 10 more"):
        compiled("{{nope}}", many)
    with pytest.raises(TemplateError, match="not a reference"):
        compiled("{{output.x}}")


def test_the_filled_length_is_counted_before_the_prompt_is_built() -> None:
    cells = {"big": "x" * 1000}
    assert filled_length("{{big}}" * 1000, cells.get) == 1_000_000
    assert filled_length("{{unknown}} ${output.1}", cells.get) == len("{{unknown}} ${output.1}")


def test_renumbering_moves_each_reference() -> None:
    template = compiled("{{text}}: ${output.1} {{output.3}}").renumbered(lambda n: n * 10)
    assert template.references == frozenset({10, 30})


@pytest.mark.parametrize(
    "prompt",
    [
        "{{" + " " * 200_000 + "x",
        "{{" + "a" * 200_000,
        "{{a" * 100_000,
        "{{ " * 100_000 + "}}",
        "${output." + " " * 200_000,
        "{{x}}" + "${output." * 20_000,
        "${output." * 100_000,
    ],
)
def test_a_long_prompt_of_unclosed_braces_is_read_in_one_pass(prompt: str) -> None:
    # Each of these backtracked for minutes with an earlier pattern; now each is linear.
    cells = {**CELLS, "x": "{{x}}"}
    assert filled_length(prompt, cells.get) == len(prompt)
    if "${output.${output." in prompt:
        # Cut short by the next one: not references, and refused as such.
        with pytest.raises(TemplateError, match="is not a reference"):
            compiled(prompt, cells)
        with pytest.raises(TemplateError, match="is not a reference"):
            references(prompt)
        return
    assert compiled(prompt, cells).render({}) == prompt
    assert references(prompt) == frozenset()
