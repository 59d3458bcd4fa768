"""The records' own behaviour: an outcome's copies keep every field but the ones they set."""

from __future__ import annotations

import dataclasses

from batchexec.records import ExecutionStatus, Outcome

#: An outcome with no field at its default, so a copy that drops one shows.
EVERY_FIELD = Outcome(
    ExecutionStatus.FAILED,
    result="answer",
    error="an error",
    latency_ms=12,
    attempts=3,
    prompt_tokens=40,
    completion_tokens=7,
    cost=0.25,
    cached=True,
    seq=9,
)


def test_the_outcome_above_sets_every_field_away_from_its_default():
    defaults = Outcome(ExecutionStatus.PENDING)
    for field in dataclasses.fields(Outcome):
        assert getattr(EVERY_FIELD, field.name) != getattr(defaults, field.name), field.name


def test_numbered_changes_only_the_seq():
    assert EVERY_FIELD.numbered(41) == dataclasses.replace(EVERY_FIELD, seq=41)


def test_running_changes_only_the_status_and_attempts():
    assert EVERY_FIELD.running(4) == dataclasses.replace(
        EVERY_FIELD, status=ExecutionStatus.RUNNING, attempts=4
    )
