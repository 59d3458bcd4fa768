"""Scenario 4: the service's own cost per row, with instant echo rows, outputs included."""

from __future__ import annotations

import time

from benchmarks.client import BatchClient
from benchmarks.common import RUNS, Figure, Samples, Target, progress

MODEL = "bench-echo-0"
ROWS = 5_000
TARGET_ROWS_PER_S = 5_000.0


def instant_rows(count: int = ROWS) -> list[dict[str, str]]:
    return [{"prompt": f"Row {n}: say hello.", "model": MODEL} for n in range(1, count + 1)]


async def end_to_end_s(client: BatchClient, rows: list[dict[str, str]]) -> float:
    """Submit, wait for ``done``, fetch the results with ``csv_content``; seconds in all."""
    started = time.perf_counter()
    batch_id = await client.run(rows)
    payload = await client.results(batch_id)
    elapsed = time.perf_counter() - started
    succeeded = payload.get("progress", {}).get("succeeded")
    if payload["status"] != "completed" or succeeded != len(rows) or not payload["csv_content"]:
        raise RuntimeError(f"overhead batch {batch_id}: {payload['status']}, {succeeded} succeeded")
    await client.settle(batch_id)  # untimed: the workbook, written after `done`
    return elapsed


async def rows_per_s(client: BatchClient, runs: int = RUNS, scenario: str = "overhead") -> Samples:
    rows = instant_rows()
    values = []
    for run in range(1, runs + 1):
        seconds = await end_to_end_s(client, rows)
        values.append(len(rows) / seconds)
        progress(scenario, f"run {run}/{runs}: {seconds:.3f} s, {values[-1]:,.0f} rows/s")
    return Samples.of(values, "rows/s")


async def overhead(client: BatchClient) -> Figure:
    samples = await rows_per_s(client)
    return Figure(
        key="overhead",
        title="overhead per row",
        how=f"{ROWS:,} instant echo rows through HTTP: submit, `done` event, results route "
        "with `csv_content`; 100 in flight",
        measured=samples.text(thousands=True) + f"; {1e6 / samples.median:,.0f} µs per row",
        reference=f"the target itself, {TARGET_ROWS_PER_S:,.0f} rows/s",
        ratio=samples.median / TARGET_ROWS_PER_S,
        target=Target(">=", 1.0),
        data={"samples": samples.as_json(), "rows": ROWS},
    )
