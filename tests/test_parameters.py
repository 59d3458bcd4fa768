"""A row's parameters read from its cells, checked as a submission checks them."""

from __future__ import annotations

import pytest

from batchexec.parameters import NO_PARAMETERS, RowParameters, read_parameters


def test_a_row_without_parameter_columns_sets_none() -> None:
    assert read_parameters({"prompt": "x", "note": "y"}) == (NO_PARAMETERS, [])


def test_text_numbers_and_sheet_numbers_are_read_empty_cells_leave_unset() -> None:
    parameters, errors = read_parameters(
        {
            "system": "Be brief.",
            "temperature": " 0.7 ",
            "max_tokens": 100.0,
            "top_p": 1,
            "stop": '["\\n", "END"]',
            "seed": "42",
        }
    )
    assert errors == []
    assert parameters == RowParameters(
        system="Be brief.", temperature=0.7, max_tokens=100, top_p=1.0, stop=("\n", "END"), seed=42
    )
    assert read_parameters({"temperature": "", "stop": "   "}) == (NO_PARAMETERS, [])
    assert read_parameters({"stop": "###"})[0].stop == ("###",)
    assert read_parameters({"max_tokens": "1e3"})[0].max_tokens == 1000


@pytest.mark.parametrize(
    ("cells", "field", "message"),
    [
        ({"temperature": "7"}, "temperature", "is 7; it must be from 0 to 2"),
        ({"temperature": "nan"}, "temperature", "is nan; it must be from 0 to 2"),
        ({"temperature": True}, "temperature", "must be a number from 0 to 2"),
        ({"top_p": "-0.1"}, "top_p", "is -0.1; it must be from 0 to 1"),
        ({"max_tokens": "0"}, "max_tokens", "is 0; it must be a whole number from 1 to"),
        ({"max_tokens": "2.5"}, "max_tokens", "2.5 is not a whole number"),
        ({"max_tokens": "9" * 5000}, "max_tokens", "must be a whole number"),
        ({"seed": "x"}, "seed", "'x' is not a whole number (64-bit)"),
        ({"seed": str(2**64)}, "seed", "it must be a whole number (64-bit)"),
        ({"stop": "[1, 2]"}, "stop", "must be a JSON list of texts"),
        ({"stop": "[oops"}, "stop", "starts with [ but is not a JSON list"),
        ({"stop": '["a","b","c","d","e"]'}, "stop", "holds 5 sequences; give 1 to 4"),
        ({"stop": "x" * 300}, "stop", "a sequence is 300 characters; the limit is 256"),
        ({"system": 5}, "system", "must be text"),
    ],
)
def test_a_bad_value_is_an_error_naming_its_field(cells, field, message) -> None:
    parameters, errors = read_parameters(cells)
    assert parameters == NO_PARAMETERS
    [error] = errors
    assert error.field == field
    assert message in str(error)


def test_every_bad_value_of_a_row_is_reported_at_once() -> None:
    _, errors = read_parameters({"temperature": "9", "seed": "y", "top_p": "0.5"})
    assert [error.field for error in errors] == ["temperature", "seed"]
