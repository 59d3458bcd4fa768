"""Where a row's memory goes: ``python -m benchmarks.row_memory [ROWS]``.

Builds a batch of ``ROWS`` (100,000 by default) instant echo rows in this
process the way the server does, letting go of what it lets go of when it
does (the JSON body parsed, then freed once the ``ExecuteBatchRequest`` is
validated; each execution freed as its row is read; the rows, planned; a
``Batch`` made; its rows ended; its results answer rendered), and prints what
each stage holds (``tracemalloc``: bytes the interpreter allocated and has not
freed) per row, and the peak. No server, no store: what is
measured is the objects, not the process's RSS, which the ``memory`` and
``responsive`` scenarios report.
"""

from __future__ import annotations

import gc
import json
import sys
import tracemalloc
from collections.abc import Callable
from typing import Any

from batchexec.catalog import Catalog
from batchexec.inputs import from_executions, plan_rows
from batchexec.records import ExecutionStatus, Outcome
from batchexec.registry import _new_batch
from batchexec.runtime import limits_from, load_catalog, provider_classes
from batchexec.schemas import ExecuteBatchRequest
from batchexec.web.presenting import dumps


def main(rows: int) -> None:
    from batchexec.config import Settings

    settings = Settings(_env_file=None, max_executions_per_batch=rows)
    catalog: Catalog = load_catalog(settings, provider_classes(()))
    limits = limits_from(settings)
    body = json.dumps(
        {"executions": [{"prompt": f"Row {n}: say hello.", "model": "echo"} for n in range(rows)]}
    ).encode()
    tracemalloc.start()
    held: dict[str, Any] = {}
    previous = _measure()
    print(f"{rows:,} rows; bytes a row each stage adds (tracemalloc), and in all")

    def stage(name: str, make: Callable[[], Any]) -> None:
        nonlocal previous
        held[name] = make()
        now = _measure()
        print(f"  {name:<34} {(now - previous) / rows:>8,.0f} B   {now / rows:>8,.0f} B")
        previous = now

    stage("JSON body parsed", lambda: json.loads(body))
    stage(
        "request validated (pydantic)",
        lambda: ExecuteBatchRequest.model_validate(held.pop("JSON body parsed")),
    )
    # As the execute_batch handler does: the parsed JSON goes once validated (above), and
    # each execution as its row is made.
    request = held.pop("request validated (pydantic)")
    executions = list(request.executions)
    request.executions.clear()
    del request
    stage("rows read (inputs.Rows)", lambda: from_executions(executions, consume=True))
    stage(
        "planned (BatchPlan)",
        lambda: plan_rows(held.pop("rows read (inputs.Rows)"), catalog, limits),
    )
    stage(
        "batch made (records.Batch)",
        lambda: _new_batch("b", "owner", held["planned (BatchPlan)"], None, None),
    )
    batch = held["batch made (records.Batch)"]

    def end_rows() -> None:
        for execution in batch.executions:
            outcome = Outcome(
                ExecutionStatus.SUCCEEDED,
                result=execution.cells["prompt"],
                latency_ms=0,
                attempts=1,
                seq=batch.next_seq(),
            )
            batch.moved(execution, outcome)

    stage("every row ended (Outcome each)", end_rows)
    batch.plan = None
    del held["planned (BatchPlan)"]
    stage("plan let go (the batch ended)", lambda: None)
    stage(
        "results answer rendered (bytes)",
        lambda: dumps(
            {
                "executions": [
                    {"index": e.index, "status": e.status.value, "result": e.result}
                    for e in batch.executions
                ]
            }
        ),
    )
    _, peak = tracemalloc.get_traced_memory()
    print(f"  peak                               {peak / rows:>8,.0f} B a row")
    tracemalloc.stop()


def _measure() -> int:
    gc.collect()
    current, _ = tracemalloc.get_traced_memory()
    return current


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 100_000)
