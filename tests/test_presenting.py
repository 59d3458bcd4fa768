"""The results answer made a slice at a time (``web/presenting.py``): the same JSON as
the response models give, one moment's rows of a running batch."""

from __future__ import annotations

import json

import pytest

from batchexec.records import Batch, BatchStatus, Execution, ExecutionStatus, Outcome
from batchexec.schemas import ExecutionOut, execution_fields
from batchexec.web import presenting

OUTCOMES = [
    Outcome(ExecutionStatus.PENDING),
    Outcome(ExecutionStatus.RUNNING, attempts=1),
    Outcome(ExecutionStatus.SUCCEEDED, result="hi", latency_ms=12, attempts=1, seq=1),
    Outcome(
        ExecutionStatus.SUCCEEDED,
        result="priced ☃",
        latency_ms=0,
        attempts=2,
        prompt_tokens=10,
        completion_tokens=3,
        cost=0.000125,
        seq=2,
    ),
    Outcome(ExecutionStatus.SUCCEEDED, result="from the cache", cached=True, cost=0.0, seq=3),
    Outcome(ExecutionStatus.FAILED, error="HTTP 400: bad", attempts=3, seq=4),
    Outcome(ExecutionStatus.TIMED_OUT, error="no answer in 1 s", attempts=1, seq=5),
    Outcome(ExecutionStatus.SKIPPED, error="execution 1 did not succeed", seq=6),
    Outcome(ExecutionStatus.CANCELLED, error="cancelled", seq=7),
]


@pytest.mark.parametrize("outcome", OUTCOMES, ids=[o.status.value for o in OUTCOMES])
def test_execution_fields_are_the_models_fields(outcome: Outcome) -> None:
    execution = Execution(7, "echo", {"prompt": "p"}, outcome)
    fields = execution_fields(execution)
    assert fields == ExecutionOut.of(execution).model_dump(mode="json")
    assert list(fields) == list(ExecutionOut.model_fields)


def batch_of(outcomes: list[Outcome], status: BatchStatus = BatchStatus.PROCESSING) -> Batch:
    executions = [Execution(n, "echo", {"prompt": f"p{n}"}) for n in range(1, len(outcomes) + 1)]
    batch = Batch("b", "o", ("prompt",), executions, 0.0, status=status)
    for execution, outcome in zip(executions, outcomes, strict=True):
        if outcome.status is not ExecutionStatus.PENDING:
            batch.moved(execution, outcome)
    return batch


async def test_the_answer_lists_by_row_the_rows_ended_by_its_cursor() -> None:
    # Ends numbered out of row order: the answer lists by row, and leaves out
    # the row that ended after the cursor it was asked at.
    outcomes = [
        Outcome(ExecutionStatus.SUCCEEDED, result="third", attempts=1, seq=3),
        Outcome(ExecutionStatus.PENDING),
        Outcome(ExecutionStatus.FAILED, error="first", attempts=1, seq=1),
        Outcome(ExecutionStatus.SUCCEEDED, result="second", attempts=1, seq=2),
    ]
    batch = batch_of(outcomes)
    body = json.loads(
        b"".join(await presenting._render(batch, batch.executions, 2, currency="USD"))
    )
    assert [e["index"] for e in body["executions"]] == [3, 4]
    assert body["cursor"] == 2

    body = json.loads(
        b"".join(await presenting._render(batch, batch.executions, 3, currency="USD"))
    )
    assert [e["index"] for e in body["executions"]] == [1, 3, 4]
    assert body["executions"][0] == execution_fields(batch.executions[0])


async def test_a_large_answer_is_the_same_json_as_one_dumps_of_it() -> None:
    count = 1000
    outcomes = [
        Outcome(ExecutionStatus.SUCCEEDED, result=f"answer {n} é \ud800", attempts=1, seq=n)
        for n in range(1, count + 1)
    ]
    batch = batch_of(outcomes, BatchStatus.COMPLETED)
    # A CSV content longer than one piece, with escapes and non-ASCII across the cuts.
    csv_content = ('"quoted", tab\t, é 😀 \ud800 \\ \n' * 40_000)[
        : 3 * presenting._STRING_PIECE + 7
    ]

    rendered = await presenting._render(
        batch, batch.executions, batch.cursor, csv_content, currency="USD"
    )

    assert rendered[0] == b"{"
    body = json.loads(b"".join(rendered))
    assert body["csv_content"] == csv_content
    assert body["executions"] == [execution_fields(e) for e in batch.executions]
    assert body["progress"]["succeeded"] == count


async def test_a_string_in_pieces_is_the_whole_string() -> None:
    text = 'a\u2028b"c\\d\x00e\ud800f' * (presenting._STRING_PIECE // 5)
    pieces = await presenting._string(text)
    assert len(pieces) > 3
    assert json.loads(b"".join(pieces)) == text
