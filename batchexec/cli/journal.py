"""The journal of ``run``: the store a run keeps beside its outputs, to be continued.

Where it goes, opening it, finding the earlier run it holds (to continue, to
write the outputs of, or to discard with ``--fresh``), how a stopped run is
shown while the journal keeps its rows unfinished, and removing its files
once the run has ended.

A run is continued only by a command of the same rows and the same batch
options (``--models``, ``--schema``), which the journal keeps with the batch:
they decide which executions there are and the outputs' columns, so a run
continued with other options would write a workbook the command did not ask
for (or mix two runs in one). An unfinished run with other options is refused,
naming both, as a run of other rows is; ``--fresh`` discards it. Options that
only pick a model for rows naming none (``--model``) do not count: the run
continues on the models it was planned with.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import TextIO

from batchexec.catalog import Catalog
from batchexec.config import Settings
from batchexec.engine import Engine
from batchexec.planning import BatchOptions, BatchPlan
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
        if not _same_options(earlier.options, plan.options):
            raise StoreError(
                f"{journal} holds an unfinished run of these rows with "
                f"{_described(earlier.options)}, not {_described(plan.options, earlier.options)}; "
                "run it with the same --models and --schema to finish it, "
                "or pass --fresh to discard it"
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
        if _same_rows(ended, plan) and _same_options(ended.options, plan.options):
            print(f"batchexec: the run in {journal} had ended; writing its outputs", file=stream)
            return ended
    return await engine.submit(OWNER, plan)


def _same_rows(batch: Batch, plan: BatchPlan) -> bool:
    """Whether ``batch`` is a run of the input rows ``plan`` holds, whatever its options."""
    # Side by side, each input row is its first model's execution.
    ran = batch.executions[:: max(len(batch.options.models), 1)]
    planned = plan.rows[:: max(len(plan.options.models), 1)]
    return list(batch.columns) == list(plan.columns) and [
        dict(execution.cells) for execution in ran
    ] == [dict(row.cells) for row in planned]


def _same_options(journaled: BatchOptions, asked: BatchOptions) -> bool:
    return (journaled.models, journaled.response_schema) == (asked.models, asked.response_schema)


def _described(options: BatchOptions, other: BatchOptions | None = None) -> str:
    """``options`` in the command line's words: ``--models a,b and no --schema``; ``another
    --schema`` where ``other`` has a different one."""
    models = f"--models {','.join(options.models)}" if options.models else "no --models"
    schema = "no --schema"
    if options.response_schema is not None:
        differs = other is not None and other.response_schema not in (None, options.response_schema)
        schema = "another --schema" if differs else "--schema"
    return f"{models} and {schema}"


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
