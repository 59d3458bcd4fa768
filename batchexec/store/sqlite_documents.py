"""A SQLite batch's rows as documents: its input in parts, its rows' changes appended.

Written row by row, a batch cost SQLite an ``INSERT`` a row when it was made
and an ``UPDATE`` a row (found by its key) when each ended: about 13 and
14 µs a row on a small machine, plus the Python that built every
statement's values, all of it the single writer's time and on the way of
every commit that workers wait for. As documents (schema 0014):

- ``row_inputs``: a batch's rows, ``PART_ROWS`` a part, each part two JSON
  arrays: the rows' input (model and cells) and their outcome when the batch
  was made (a retry's copied rows have ended already).
- ``row_changes``: each group commit appends one entry a batch it touches,
  a JSON array of its rows' starts and ends (``row_changes_of``).

A row's state is its part's outcome with the batch's entries applied in
order (``replay``): a start makes a row not yet ended ``running``, and the
first end of a row is final, as the ``UPDATE`` statements' guards had it.
Batches written before schema 0014 keep their rows in ``executions``; their
entries apply over those the same way.

Text goes into the JSON unescaped, and the JSON is kept as SQLite keeps any
text (``sqlite_rows.text``: as bytes when it has no UTF-8 form): a lone
surrogate, or a high and a low one as two code points, reads back exactly,
as the \\u escapes of ``json.dumps`` would not.
"""

from __future__ import annotations

import json
import sqlite3
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from typing import Any

from batchexec.records import PENDING, Batch, Execution, ExecutionStatus
from batchexec.store.base import Change
from batchexec.store.rows import coalesced_by_row, execution_of, outcome_values
from batchexec.store.sqlite_rows import read_text, text

#: Rows a part of ``row_inputs``: a 100,000-row batch reads back a part at a time, each
#: a short parse.
PART_ROWS = 1000

INSERT_INPUTS = "INSERT INTO row_inputs (batch_id, part, inputs, outcomes) VALUES (?, ?, ?, ?)"
INSERT_CHANGES = "INSERT INTO row_changes (batch_id, changes) VALUES (?, ?)"
_SELECT_INPUTS = "SELECT inputs, outcomes FROM row_inputs WHERE batch_id = ? ORDER BY part"
_SELECT_OUTCOMES = "SELECT outcomes FROM row_inputs WHERE batch_id = ? ORDER BY part"
_SELECT_CHANGES = "SELECT changes FROM row_changes WHERE batch_id = ? ORDER BY id"
#: Rows written before schema 0014.
_SELECT_EXECUTIONS = (
    "SELECT model, cells, status, prompt_sent, result, error, latency_ms, attempts, "
    "prompt_tokens, completion_tokens, cost, cached, ended_seq FROM executions "
    "WHERE batch_id = ? ORDER BY idx"
)
_SELECT_EXECUTION_OUTCOMES = (
    "SELECT status, prompt_sent, result, error, latency_ms, attempts, prompt_tokens, "
    "completion_tokens, cost, cached, ended_seq FROM executions WHERE batch_id = ? ORDER BY idx"
)
#: The place of each field in an outcome: ``[status, prompt_sent, result, error,
#: latency_ms, attempts, prompt_tokens, completion_tokens, cost, cached, seq]``.
_STATUS, _PROMPT, _ATTEMPTS, _COST = 0, 1, 5, 8
#: latency_ms, attempts, prompt_tokens, completion_tokens and seq.
_INTEGERS = (4, 5, 6, 7, 10)
_NOT_ENDED = frozenset({ExecutionStatus.PENDING.value, ExecutionStatus.RUNNING.value})
#: How an entry of ``row_changes`` tells a start (``[START, idx, prompt_sent, attempts]``)
#: from an end (``[END, idx, *outcome]``).
_START, _END = "s", "e"
#: Where an end's outcome begins in its item.
_FIRST_VALUE = 2


def document(value: object) -> str | bytes:
    """``value`` as JSON that SQLite can hold and ``_loads`` reads back exactly: its
    text unescaped, kept as ``sqlite_rows.text`` keeps text."""
    stored = text(json.dumps(value, ensure_ascii=False))
    assert stored is not None
    return stored


def _loads(stored: str | bytes) -> Any:
    return json.loads(read_text(stored) or "null")


def input_parts(batch: Batch) -> Iterator[tuple[str, int, str | bytes, str | bytes]]:
    """``batch``'s rows of ``row_inputs``, for ``INSERT_INPUTS``."""
    executions = batch.executions
    for part, start in enumerate(range(0, len(executions), PART_ROWS)):
        rows = executions[start : start + PART_ROWS]
        inputs = [[e.model, e.cells] for e in rows]
        yield batch.id, part, document(inputs), _outcomes(rows)


def _outcomes(rows: Sequence[Execution]) -> str | bytes:
    """The ``outcomes`` document of ``rows``. A new batch's rows have not started: they
    share one JSON text, not built and encoded again for each (a third of the time a
    10,000-row batch took to be made)."""
    if all(e.outcome is PENDING and e.prompt_sent is None for e in rows):
        return "[" + ",".join([_NOT_STARTED] * len(rows)) + "]"
    outcomes = [outcome_values(e.outcome, e.prompt_sent, _same) for e in rows]
    for outcome in outcomes:
        _check_integers(outcome)
    return document(outcomes)


def row_changes_of(
    changes: Sequence[Change],
) -> tuple[dict[str, list[list[Any]]], list[Change]]:
    """A group's changes as the items of ``row_changes`` entries, by batch (``entries``
    makes them rows of ``INSERT_CHANGES``), and the changes to batches themselves, in
    order.

    ``rows.coalesced_by_row`` drops a start whose end is in the group, and every
    end of a row after its first.
    """
    started, ended, batch_changes = coalesced_by_row(changes)
    items: defaultdict[str, list[list[Any]]] = defaultdict(list)
    for start in started:
        items[start.batch_id].append([_START, start.index, start.prompt_sent, start.attempts])
    for end in ended:
        item = [_END, end.index, *outcome_values(end.outcome, end.prompt_sent, _same)]
        _check_integers(item, _FIRST_VALUE)
        items[end.batch_id].append(item)
    return items, batch_changes


def entries(items: dict[str, list[list[Any]]]) -> list[tuple[str, str | bytes]]:
    """``row_changes_of``'s items as rows of ``INSERT_CHANGES``, one a batch."""
    return [(batch_id, document(batch_items)) for batch_id, batch_items in items.items()]


class Tally:
    """A running batch's rows by status and their costs, kept as its changes are written,
    so that its end is counted without reading its rows back (``counts_and_cost`` does
    the same from the store). Applied as ``replay`` applies entries."""

    def __init__(self, statuses: list[str], costs: list[float | None]) -> None:
        self._statuses = statuses
        self._costs = costs

    @classmethod
    def of(cls, batch: Batch) -> Tally:
        """The tally of ``batch`` as it is made in the store."""
        return cls(
            [execution.status.value for execution in batch.executions],
            [execution.cost for execution in batch.executions],
        )

    def apply(self, items: Sequence[Sequence[Any]]) -> None:
        """Count the starts and ends of a ``row_changes`` entry."""
        statuses, costs = self._statuses, self._costs
        running = ExecutionStatus.RUNNING.value
        for item in items:
            row = item[1] - 1
            if statuses[row] not in _NOT_ENDED:
                continue  # a row's end is final
            if item[0] == _START:
                statuses[row] = running
            else:
                statuses[row] = item[_FIRST_VALUE + _STATUS]
                costs[row] = item[_FIRST_VALUE + _COST]

    def counts_and_cost(self) -> tuple[Counter[str], float | None]:
        costs = [cost for cost in self._costs if cost is not None]
        return Counter(self._statuses), (sum(costs) if costs else None)


def executions(db: sqlite3.Connection, batch_id: str) -> list[Execution]:
    """Batch ``batch_id``'s executions, as its rows and their changes leave them."""
    models: list[str] = []
    cells: list[dict[str, Any]] = []
    outcomes: list[list[Any]] = []
    legacy = db.execute(_SELECT_EXECUTIONS, (batch_id,)).fetchall()
    if legacy:
        for model, cells_text, *outcome in legacy:
            models.append(read_text(model) or "")
            cells.append(json.loads(cells_text))
            outcomes.append(_read_outcome(outcome))
    else:
        for inputs, stored in db.execute(_SELECT_INPUTS, (batch_id,)):
            for model, row_cells in _loads(inputs):
                models.append(model)
                cells.append(row_cells)
            outcomes += _loads(stored)
    replay(db, batch_id, outcomes)
    return [
        execution_of(index, model, row_cells, outcome)
        for index, (model, row_cells, outcome) in enumerate(
            zip(models, cells, outcomes, strict=True), start=1
        )
    ]


def counts_and_cost(db: sqlite3.Connection, batch_id: str) -> tuple[Counter[str], float | None]:
    """Batch ``batch_id``'s rows by status now, and the sum of their costs (None if none
    has one), reading no input."""
    legacy = db.execute(_SELECT_EXECUTION_OUTCOMES, (batch_id,)).fetchall()
    if legacy:
        outcomes = [_read_outcome(row) for row in legacy]
    else:
        outcomes = []
        for (stored,) in db.execute(_SELECT_OUTCOMES, (batch_id,)):
            outcomes += _loads(stored)
    replay(db, batch_id, outcomes)
    costs = [outcome[_COST] for outcome in outcomes if outcome[_COST] is not None]
    return Counter(outcome[_STATUS] for outcome in outcomes), (sum(costs) if costs else None)


def replay(db: sqlite3.Connection, batch_id: str, outcomes: list[list[Any]]) -> None:
    """Apply batch ``batch_id``'s ``row_changes`` to its rows' ``outcomes``, in order."""
    for (stored,) in db.execute(_SELECT_CHANGES, (batch_id,)):
        for kind, idx, *values in _loads(stored):
            outcome = outcomes[idx - 1]
            if outcome[_STATUS] not in _NOT_ENDED:
                continue  # a row's end is final
            if kind == _START:
                outcome[_STATUS] = ExecutionStatus.RUNNING.value
                outcome[_PROMPT], outcome[_ATTEMPTS] = values
            else:
                # An end with no prompt (a row never sent, or cancelled) keeps the one sent.
                if values[_PROMPT] is None:
                    values[_PROMPT] = outcome[_PROMPT]
                outcome[:] = values


def _check_integers(outcome: Sequence[Any], offset: int = 0) -> None:
    """Refuse an outcome (from ``offset`` on) with a count SQLite's integers cannot hold,
    as a column would: JSON could keep it, but no other store, nor the list route's
    sums, could."""
    for position in _INTEGERS:
        value = outcome[offset + position]
        if value is not None and not -(2**63) <= value < 2**63:
            raise OverflowError("Python int too large to convert to SQLite INTEGER")


def _read_outcome(row: Sequence[Any]) -> list[Any]:
    """An outcome of ``executions`` (its text read back) as ``row_inputs`` keeps one."""
    status, prompt_sent, result, error, *numbers = row
    return [status, read_text(prompt_sent), read_text(result), read_text(error), *numbers]


def _same(value: str | None) -> str | None:
    return value


#: A row not yet started, as ``_outcomes`` writes it.
_NOT_STARTED = json.dumps(outcome_values(PENDING, None, _same))
