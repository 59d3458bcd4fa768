"""Tests for batchexec/wording.py: counts in messages."""

from __future__ import annotations

import pytest

from batchexec.wording import counted


@pytest.mark.parametrize(
    ("count", "expected"), [(0, "0 rows"), (1, "1 row"), (2, "2 rows"), (-1, "-1 rows")]
)
def test_the_noun_is_plural_unless_there_is_one(count, expected):
    assert counted(count, "row") == expected


def test_an_irregular_plural_is_given():
    assert counted(3, "batch", "batches") == "3 batches"
    assert counted(1, "batch", "batches") == "1 batch"
