"""A group of changes as bulk row updates: what every SQL store writes the same way.

Each dialect keeps text its own way (``text`` below), so this takes that
conversion as an argument; the order of each row's values is the same in
every dialect's statements.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from batchexec.store.base import Change, ExecutionEnded, ExecutionStarted

#: How a dialect stores a text value (None stays None).
TextOf = Callable[[str | None], Any]


def coalesced(
    changes: Sequence[Change], text: TextOf
) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]], list[Change]]:
    """A group's changes as rows' starts and ends to write in bulk, and the batches' changes.

    A start is ``(prompt_sent, attempts, batch_id, idx)``; an end is ``(status,
    prompt_sent, result, error, latency_ms, attempts, prompt_tokens,
    completion_tokens, seq, batch_id, idx)``: the batch id is always second
    from last. A row's end overwrites everything its start wrote, so a start
    whose end is in the same group is not written at all: a fast row costs
    one update, not two. Rows are independent of each other and of their
    batch's record, so writing each kind in bulk leaves the same state as
    writing in order.
    """
    started: dict[tuple[str, int], tuple[Any, ...]] = {}
    ended: dict[tuple[str, int], tuple[Any, ...]] = {}
    batches: list[Change] = []
    for change in changes:
        if isinstance(change, ExecutionEnded):
            key = (change.batch_id, change.index)
            if key in ended:
                continue  # the first end wins, as in the store
            started.pop(key, None)
            outcome = change.outcome
            ended[key] = (
                outcome.status.value,
                text(change.prompt_sent),
                text(outcome.result),
                text(outcome.error),
                outcome.latency_ms,
                outcome.attempts,
                outcome.prompt_tokens,
                outcome.completion_tokens,
                outcome.seq,
                *key,
            )
        elif isinstance(change, ExecutionStarted):
            key = (change.batch_id, change.index)
            started[key] = (text(change.prompt_sent), change.attempts, *key)
        else:
            batches.append(change)
    return list(started.values()), list(ended.values()), batches
