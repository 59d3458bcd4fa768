"""The journal of ``run``: the store a run keeps beside its outputs, to be continued.

Where it goes, opening it, finding the earlier run it holds (to continue, to
write the outputs of, or to discard with ``--fresh``), how a stopped run is
shown while the journal keeps its rows unfinished, and removing its files
once the run has ended.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import TextIO

from batchexec.catalog import Catalog
from batchexec.config import Settings
from batchexec.engine import Engine
from batchexec.planning import BatchPlan
from batchexec.records import Batch, BatchStatus, ExecutionStatus, Outcome
from batchexec.registry import Registry
from batchexec.runtime import plan_again
from batchexec.store import BatchStore, StoreError
from batchexec.store.memory import MemoryStore
from batchexec.store.sqlite import SQLiteStore
from batchexec.wording import counted

#: Whose batch it is, for the registry; there is only ever one here.
OWNER = "cli"
_STOPPED = "Cancelled by request."
#: Most runs one journal is looked through for (it only ever holds a few).
_JOURNALED = 100


def journal_for(output: Path) -> Path:
    """Where the run writing ``output`` is journaled by default: beside it."""
    return output.with_name(output.name + ".journal")


def journal_store(journal: Path | None) -> BatchStore:
    """The store of a run journaled to ``journal``, not yet opened (None keeps nothing)."""
    if journal is None:
        return MemoryStore()
    try:
        journal.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(f"--journal: cannot create {journal.parent}: {exc}") from exc
    return SQLiteStore(journal, setting="--journal")


async def journaled_run(
    engine: Engine,
    registry: Registry,
    plan: BatchPlan,
    journal: Path | None,
    stream: TextIO,
    *,
    fresh: bool,
    catalog: Catalog,
    settings: Settings,
) -> Batch:
    """The journal's run of these rows, continued (or ended already), else a new one.

    With ``fresh`` what the journal holds is discarded first (it is open, so
    no other run holds it).
    """
    unfinished = await registry.resumable()
    if fresh:
        for earlier in unfinished:
            await registry.discard(earlier)
        for summary in await registry.owned_by(OWNER, limit=_JOURNALED):
            await registry.store.delete(summary.id)
        unfinished = []
    for earlier in unfinished:
        if not _same_rows(earlier, plan):
            raise StoreError(
                f"{journal} holds an unfinished run of other rows; run that command "
                "again to finish it, or pass --fresh to discard it"
            )
        done = sum(1 for execution in earlier.executions if execution.status.finished)
        print(
            f"batchexec: continuing the run in {journal}: {done} of "
            f"{counted(len(earlier.executions), 'row')} had finished",
            file=stream,
        )
        # Planned as it was, not with today's options: a continued run is the same
        # run (a changed --model does not move its remaining rows to another).
        engine.resume(earlier, plan_again(earlier, catalog, settings))
        return earlier
    for summary in await registry.owned_by(OWNER, limit=1):
        # A run that ended but whose outputs were not written (a full disk, a
        # Ctrl-C while writing them): its outputs are written, nothing is sent.
        ended = await registry.get(summary.id, OWNER)
        if _same_rows(ended, plan):
            print(f"batchexec: the run in {journal} had ended; writing its outputs", file=stream)
            return ended
    return await engine.submit(OWNER, plan)


def _same_rows(batch: Batch, plan: BatchPlan) -> bool:
    """Whether ``batch`` is a run of the rows ``plan`` holds."""
    return list(batch.columns) == list(plan.columns) and [
        dict(execution.cells) for execution in batch.executions
    ] == [dict(row.cells) for row in plan.rows]


def end_journal(journal: Path, stream: TextIO, *, stopped_early: bool, failed: bool) -> None:
    """Remove the journal of a run that ended with its outputs written, else say it is kept."""
    if stopped_early or failed:
        what = "the rest of the run" if stopped_early else "the finished run"
        print(
            f"batchexec: {what} is kept in {journal}; run the same command again "
            "to " + ("continue it" if stopped_early else "write its outputs"),
            file=stream,
        )
    else:
        _remove_journal(journal)


def _remove_journal(journal: Path) -> None:
    for suffix in ("", "-wal", "-shm", ".lock"):
        journal.with_name(journal.name + suffix).unlink(missing_ok=True)


def _stopped(outcome: Outcome) -> Outcome:
    return replace(outcome, status=ExecutionStatus.CANCELLED, error=_STOPPED)


def as_stopped(batch: Batch) -> Batch:
    """The batch as its outputs show it after Ctrl-C: rows not ended read ``cancelled``.

    A copy: the journal keeps those rows unfinished, for the next run.
    """
    executions = [
        execution
        if execution.status.finished
        else replace(execution, outcome=_stopped(execution.outcome))
        for execution in batch.executions
    ]
    return replace(
        batch,
        executions=executions,
        counts=Counter(execution.status for execution in executions),
        status=BatchStatus.CANCELLED,
        message="Batch cancelled (stopped by Ctrl-C); finished executions kept.",
    )
