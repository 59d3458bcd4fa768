"""Tests for batchexec/planning.py: submitted rows to a validated plan, or every problem."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from batchexec.catalog import Catalog
from batchexec.errors import FieldError, InputError
from batchexec.planning import BatchPlan, Limits, RowInput, plan_batch

ASSISTANTS = """
[models."tuned-echo"]
provider = "echo"
system_prompt = "model prompt"
params = { temperature = 0.7, top_p = 0.9 }

[assistants."Summarizer"]
model = "tuned-echo"
system_prompt = "Summarise the text in three bullet points."
params = { temperature = 0.1 }
"""


@pytest.fixture
def catalog(tmp_path: Path) -> Catalog:
    path = tmp_path / "models.toml"
    path.write_text(ASSISTANTS, encoding="utf-8")
    return Catalog.load(path)


def limits(
    *, max_executions: int = 10, max_prompt_length: int = 50, default_model: str = "echo"
) -> Limits:
    return Limits(
        max_executions=max_executions,
        max_prompt_length=max_prompt_length,
        default_model=default_model,
    )


def plan(
    catalog: Catalog,
    rows: Sequence[RowInput],
    columns: Sequence[str] = ("prompt", "model"),
    *,
    max_executions: int = 10,
    max_prompt_length: int = 50,
) -> BatchPlan:
    checks = limits(max_executions=max_executions, max_prompt_length=max_prompt_length)
    return plan_batch(rows, columns, catalog, checks)


def problems(
    catalog: Catalog,
    rows: Sequence[RowInput],
    *,
    max_executions: int = 10,
    max_prompt_length: int = 50,
    default_model: str = "echo",
) -> InputError:
    checks = limits(
        max_executions=max_executions,
        max_prompt_length=max_prompt_length,
        default_model=default_model,
    )
    with pytest.raises(InputError) as caught:
        plan_batch(rows, ["prompt"], catalog, checks)
    return caught.value


def test_valid_rows_become_numbered_planned_rows(catalog: Catalog) -> None:
    rows = [
        RowInput("Hello", model="ECHO", cells={"prompt": "Hello", "model": "ECHO"}),
        RowInput("Again: ${output.1}", cells={"prompt": "Again: ${output.1}", "model": ""}),
        RowInput("Both ${output.1} and ${ output.2 }", model="  "),
    ]
    result = plan(catalog, rows)
    assert [row.index for row in result.rows] == [1, 2, 3]
    assert [row.prompt for row in result.rows] == [row.prompt for row in rows]
    assert [row.depends_on for row in result.rows] == [
        frozenset(),
        frozenset({1}),
        frozenset({1, 2}),
    ]
    # "ECHO" folds to echo; a missing or blank model is the default.
    assert [row.target.model.name for row in result.rows] == ["echo", "echo", "echo"]
    assert result.rows[0].cells == {"prompt": "Hello", "model": "ECHO"}
    assert result.rows[2].cells == {}


def test_default_model_is_used_when_a_row_names_none(catalog: Catalog) -> None:
    result = plan_batch([RowInput("Hi")], ["prompt"], catalog, limits(default_model="granite-13b"))
    assert result.rows[0].target.model.name == "Granite 13B V2.1"


def test_assistant_row_targets_its_model_with_its_prompt_and_params(catalog: Catalog) -> None:
    result = plan(catalog, [RowInput("Text", assistant="summarizer")])
    target = result.rows[0].target
    assert target.assistant == "Summarizer"
    assert target.model.name == "tuned-echo"
    assert target.system_prompt == "Summarise the text in three bullet points."
    assert target.params == {"temperature": 0.1, "top_p": 0.9}


def test_cells_are_copied_not_shared(catalog: Catalog) -> None:
    cells = {"prompt": "Hi", "note": "x"}
    result = plan(catalog, [RowInput("Hi", cells=cells)], columns=["prompt", "note"])
    cells["note"] = "changed"
    assert result.rows[0].cells == {"prompt": "Hi", "note": "x"}


def test_output_columns_are_not_input_columns(catalog: Catalog) -> None:
    columns = ["prompt", "result", "model", "status", "error", "topic", "latency_ms"]
    assert plan(catalog, [RowInput("Hi")], columns=columns).columns == ("prompt", "model", "topic")


def test_empty_batch(catalog: Catalog) -> None:
    error = problems(catalog, [])
    assert "no executions" in error.detail
    assert error.errors == [FieldError(None, "executions", "must not be empty")]


def test_too_many_executions(catalog: Catalog) -> None:
    error = problems(catalog, [RowInput("Hi")] * 4, max_executions=3)
    assert error.detail == "The batch has 4 executions; the limit is 3."
    assert len(error.errors) == 1
    assert error.errors[0].index is None
    assert error.errors[0].field == "executions"


def test_batch_at_the_execution_limit_is_accepted(catalog: Catalog) -> None:
    assert len(plan(catalog, [RowInput("Hi")] * 3, max_executions=3).rows) == 3


def test_prompt_at_the_length_limit_is_accepted(catalog: Catalog) -> None:
    assert plan(catalog, [RowInput("x" * 50)], max_prompt_length=50).rows[0].prompt == "x" * 50


def test_prompt_too_long(catalog: Catalog) -> None:
    error = problems(catalog, [RowInput("ok"), RowInput("x" * 51)], max_prompt_length=50)
    assert error.errors == [FieldError(2, "prompt", "is 51 characters; the limit is 50")]
    assert error.detail == "1 execution is invalid."


def test_prompt_length_counts_references_as_written(catalog: Catalog) -> None:
    prompt = "${output.1}" + "y" * 39  # 50 characters before substitution
    result = plan(catalog, [RowInput("x" * 50), RowInput(prompt)], max_prompt_length=50)
    assert result.rows[1].depends_on == frozenset({1})


@pytest.mark.parametrize("prompt", ["", "   ", "\n\t"])
def test_empty_prompt(catalog: Catalog, prompt: str) -> None:
    error = problems(catalog, [RowInput("fine"), RowInput(prompt)])
    assert error.errors == [FieldError(2, "prompt", "must not be empty")]


def test_model_and_assistant_together(catalog: Catalog) -> None:
    error = problems(catalog, [RowInput("Hi", model="echo", assistant="Summarizer")])
    assert error.errors == [FieldError(1, "assistant", "set either model or assistant, not both")]


def test_unknown_model_lists_known_models(catalog: Catalog) -> None:
    error = problems(catalog, [RowInput("Hi"), RowInput("Hi", model="gpt-99")])
    (only,) = error.errors
    assert (only.index, only.field) == (2, "model")
    assert "'gpt-99'" in only.message
    assert "Known models:" in only.message
    for name in ("echo", "tuned-echo", "Granite 13B V2.1"):
        assert name in only.message


def test_unknown_default_model_is_reported_on_rows_naming_none(catalog: Catalog) -> None:
    error = problems(catalog, [RowInput("Hi")], default_model="missing-model")
    assert error.errors[0].field == "model"
    assert "'missing-model'" in error.errors[0].message


def test_unknown_assistant_lists_known_assistants(catalog: Catalog) -> None:
    error = problems(catalog, [RowInput("Hi", assistant="Translator")])
    (only,) = error.errors
    assert (only.index, only.field) == (1, "assistant")
    assert "'Translator'" in only.message
    assert "Known assistants: Summarizer" in only.message


def test_reference_to_the_same_or_a_later_row(catalog: Catalog) -> None:
    rows = [RowInput("a"), RowInput("b ${output.2}"), RowInput("c ${output.5}")]
    error = problems(catalog, rows)
    assert error.errors == [
        FieldError(2, "prompt", "${output.2} must name an earlier execution (1 to 1)"),
        FieldError(3, "prompt", "${output.5} must name an earlier execution (1 to 2)"),
    ]
    assert error.detail == "2 executions are invalid."


def test_first_row_cannot_reference_anything(catalog: Catalog) -> None:
    error = problems(catalog, [RowInput("${output.1}")])
    assert error.errors[0].index == 1
    assert error.errors[0].field == "prompt"
    assert "first execution" in error.errors[0].message


@pytest.mark.parametrize("reference", ["${output.x}", "${output.0}", "${output.}", "${output.-2}"])
def test_malformed_reference(catalog: Catalog, reference: str) -> None:
    error = problems(catalog, [RowInput("a"), RowInput(f"use {reference}")])
    (only,) = error.errors
    assert (only.index, only.field) == (2, "prompt")
    assert reference in only.message


def test_every_problem_is_listed_with_its_row_and_field(catalog: Catalog) -> None:
    rows = [
        RowInput("fine"),
        RowInput("", model="nope"),
        RowInput("fine too"),
        RowInput("x" * 60 + "${output.9}", model="echo", assistant="Summarizer"),
        RowInput("${output.q}", assistant="ghost"),
    ]
    error = problems(catalog, rows)
    assert [(e.index, e.field) for e in error.errors] == [
        (2, "prompt"),
        (2, "model"),
        (4, "prompt"),
        (4, "prompt"),
        (4, "assistant"),
        (5, "prompt"),
        (5, "assistant"),
    ]
    assert error.detail == "3 executions are invalid."


def test_one_row_with_several_problems_counts_once(catalog: Catalog) -> None:
    error = problems(catalog, [RowInput("", model="nope")])
    assert len(error.errors) == 2
    assert error.detail == "1 execution is invalid."
