"""Scenarios 1 to 3: how close a batch's makespan comes to the ideal schedule, and to the original.

1. 2,000 independent rows of a 0.1 s echo model, 100 in flight: ideal 2.0 s.
2. 1,000 rows: 20 chains of 40 linked rows plus 200 independent rows,
   interleaved (see ``chain_rows``): ideal max(40, 1000 / 100) x 0.1 s = 4.0 s.
3. The same 2,000 rows one after another, as the original integration ran
   them: a plain loop awaiting the echo provider for each row.

Issue 11 adds two figures of scenario 1's batch: ``floor``, its makespan
from the first byte sent against the bare asyncio floor measured run for
run, and ``following``, its own makespan while a client polls the results
route with the cursor every 10 ms, against the same batch followed through
the events route.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from datetime import datetime

import aiohttp

from batchexec import api
from batchexec.catalog import ModelSpec
from batchexec.config import Settings
from batchexec.providers.base import ChatRequest
from batchexec.providers.echo import EchoProvider
from batchexec.templating import substitute
from benchmarks.client import FINISHED, BatchClient
from benchmarks.common import FULL, RUNS, Figure, Samples, Target, progress
from benchmarks.responsive import body_of, submit, to_done

MODEL = "bench-echo-100ms"
LATENCY_S = 0.1
IN_FLIGHT = 100
INDEPENDENT_ROWS = 2_000
CHAINS = 20
LINKS = 40
CHAIN_INDEPENDENTS = 200
#: How often ``following`` polls the results route.
POLL_EVERY_S = 0.01
#: Rows the sequential baseline runs by default; the rest is extrapolated.
SEQUENTIAL_SAMPLE = 200

Row = dict[str, str]


def independent_rows(count: int = INDEPENDENT_ROWS) -> list[Row]:
    return [{"prompt": f"Row {n}: name a colour.", "model": MODEL} for n in range(1, count + 1)]


def chain_rows(
    chains: int = CHAINS, links: int = LINKS, independents: int = CHAIN_INDEPENDENTS
) -> list[Row]:
    """Chains and independent rows interleaved in submission order.

    Round k (k = 1..links) submits link k of every chain, then
    ``independents / links`` independent rows; link k > 1 of a chain uses
    ``${output.n}`` of that chain's link k - 1, submitted one round earlier.
    """
    per_round, extra = divmod(independents, links)
    rows: list[Row] = []
    previous: dict[int, int] = {}  # chain -> row number of its latest link
    for link in range(1, links + 1):
        for chain in range(1, chains + 1):
            prompt = f"Chain {chain} link {link}"
            if chain in previous:
                prompt += f" after: ${{output.{previous[chain]}}}"
            rows.append({"prompt": prompt, "model": MODEL})
            previous[chain] = len(rows)
        for _ in range(per_round + (1 if link <= extra else 0)):
            rows.append({"prompt": f"Independent {len(rows) + 1}", "model": MODEL})
    return rows


def chain_ideal_s(rows: int = CHAINS * LINKS + CHAIN_INDEPENDENTS) -> float:
    return max(LINKS, rows / IN_FLIGHT) * LATENCY_S


async def makespan_s(client: BatchClient, rows: list[Row]) -> tuple[float, float]:
    """Seconds from submitting ``rows`` to the submit answer and to the ``done`` event.

    Checks, afterwards, that every row succeeded, and waits for its workbook.
    """
    started = time.perf_counter()
    batch_id = await client.submit(rows)
    accepted = time.perf_counter() - started
    await client.wait_done(batch_id)
    elapsed = time.perf_counter() - started
    await client.check_succeeded(batch_id, len(rows))
    await client.settle(batch_id)
    return accepted, elapsed


async def _runs(client: BatchClient, rows: list[Row], scenario: str) -> tuple[Samples, Samples]:
    """The makespans, and the times until the submit was answered (within them)."""
    makespans: list[float] = []
    submits: list[float] = []
    for run in range(1, RUNS + 1):
        accepted, elapsed = await makespan_s(client, rows)
        makespans.append(elapsed)
        submits.append(accepted)
        progress(
            scenario, f"run {run}/{RUNS}: {elapsed:.3f} s (submit answered in {accepted:.3f} s)"
        )
    return Samples.of(makespans, "s"), Samples.of(submits, "s")


async def bare_floor_s(rows: int = INDEPENDENT_ROWS) -> float:
    """The same schedule with nothing but a semaphore and ``asyncio.sleep``: the event loop's own
    floor on this machine (its timers wake up to a millisecond late, once per wave)."""
    slots = asyncio.Semaphore(IN_FLIGHT)

    async def row() -> None:
        async with slots:
            await asyncio.sleep(LATENCY_S)

    started = time.perf_counter()
    await asyncio.gather(*(row() for _ in range(rows)))
    return time.perf_counter() - started


async def independent(client: BatchClient) -> Figure:
    ideal = INDEPENDENT_ROWS / IN_FLIGHT * LATENCY_S
    samples, submits = await _runs(client, independent_rows(), "makespan, independent rows")
    floor = Samples.of([await bare_floor_s() for _ in range(RUNS)], "s")
    progress("makespan, independent rows", f"bare asyncio floor {floor.median:.3f} s")
    return Figure(
        key="makespan_independent",
        title="makespan vs ideal, independent rows",
        how=f"{INDEPENDENT_ROWS:,} rows of a {LATENCY_S:g} s echo model, {IN_FLIGHT} in flight, "
        "HTTP submit to the `done` event",
        measured=samples.text(3),
        reference=f"ideal {ideal:.2f} s ({INDEPENDENT_ROWS:,} / {IN_FLIGHT} x {LATENCY_S:g} s); "
        f"bare asyncio floor {floor.median:.3f} s ({floor.median / ideal:.3f})",
        ratio=samples.median / ideal,
        target=Target("<=", 1.05),
        data={
            "samples": samples.as_json(),
            "submit_s": submits.as_json(),
            "ideal_s": ideal,
            "bare_floor_s": floor.as_json(),
        },
    )


async def floor(client: BatchClient) -> Figure:
    """Scenario 1 against the bare asyncio floor, run for run: the body encoded beforehand,
    timed from the moment the client starts sending it to the ``done`` event."""
    body = body_of(independent_rows())
    samples: list[float] = []
    floors: list[float] = []
    for run in range(1, RUNS + 1):
        batch_id, elapsed = await to_done(client, body)
        samples.append(elapsed)
        await client.settle(batch_id)
        floors.append(await bare_floor_s())
        progress("makespan vs floor", f"run {run}/{RUNS}: {elapsed:.3f} s, {floors[-1]:.3f} s bare")
    ours, bare = Samples.of(samples, "s"), Samples.of(floors, "s")
    return Figure(
        key="makespan_floor",
        title="makespan vs the bare asyncio floor",
        how=f"scenario 1's {INDEPENDENT_ROWS:,} rows x {LATENCY_S:g} s, {IN_FLIGHT} in flight, "
        "the body encoded beforehand, from the first byte sent to the `done` event; each run "
        f"followed by the same schedule as an `asyncio.Semaphore({IN_FLIGHT})` around "
        f"`asyncio.sleep({LATENCY_S:g})` in the harness",
        measured=ours.text(3),
        reference=f"bare asyncio floor {bare.text(3)}",
        ratio=ours.median / bare.median,
        target=Target("<=", 1.03),
        data={"samples": ours.as_json(), "bare_floor_s": bare.as_json()},
    )


async def following(client: BatchClient) -> Figure:
    """Scenario 1 followed by polling the results route with its cursor every 10 ms, against
    the same batch followed through the events route, runs interleaved; each batch's own
    makespan (``finished_at - created_at`` of the list route)."""
    body = body_of(independent_rows())
    by_events: list[float] = []
    by_polling: list[float] = []
    polls: list[int] = []
    for run in range(1, RUNS + 1):
        batch_id, _ = await to_done(client, body)
        by_events.append(await own_makespan_s(client, batch_id))
        await client.settle(batch_id)
        batch_id = await submit(client, body)
        polls.append(await poll_with_cursor(client, batch_id, INDEPENDENT_ROWS))
        by_polling.append(await own_makespan_s(client, batch_id))
        await client.settle(batch_id)
        progress(
            "following a batch",
            f"run {run}/{RUNS}: events {by_events[-1]:.3f} s, cursor polling "
            f"{by_polling[-1]:.3f} s ({polls[-1]} polls)",
        )
    events, polling = Samples.of(by_events, "s"), Samples.of(by_polling, "s")
    return Figure(
        key="following",
        title="polling with the cursor vs the events route",
        how=f"scenario 1's {INDEPENDENT_ROWS:,} rows x {LATENCY_S:g} s followed by the results "
        f"route every {POLL_EVERY_S * 1000:g} ms with `since` (each answer's `cursor`), or "
        "through the events route, runs interleaved; the batch's own makespan "
        "(`finished_at - created_at` of the list route)",
        measured=f"cursor polling {polling.text(3)}, {statistics.median(polls):,.0f} polls",
        reference=f"events route {events.text(3)}",
        ratio=polling.median / events.median,
        target=Target("<=", 1.01),
        data={"polling": polling.as_json(), "events": events.as_json(), "polls": polls},
    )


async def poll_with_cursor(client: BatchClient, batch_id: str, total: int) -> int:
    """Follow ``batch_id`` through the results route with ``since``, every ``POLL_EVERY_S``,
    until it has ended; checks that every row came back once. The number of polls."""
    cursor, seen, polls = 0, 0, 0
    while True:
        payload = await client.results(batch_id, since=cursor)
        polls += 1
        seen += len(payload["executions"])
        cursor = payload["cursor"]
        if payload["status"] in FINISHED:
            if payload["status"] != "completed" or seen != total:
                raise RuntimeError(f"batch {batch_id}: {payload['status']}, {seen} of {total}")
            return polls
        await asyncio.sleep(POLL_EVERY_S)


async def own_makespan_s(client: BatchClient, batch_id: str) -> float:
    """``finished_at - created_at`` of the batch, as the list route shows it."""
    async with client.session.get(
        client.base_url + api.BATCHES, params={"limit": "1"}, headers=client.headers
    ) as answer:
        payload = await answer.json()
    # Newest first, and the harness submits one batch at a time: it is the first.
    entry = payload["batches"][0]
    if entry["invocationId"] != batch_id or entry["finished_at"] is None:
        raise RuntimeError(f"the list route does not show {batch_id} finished first: {entry}")
    created = datetime.fromisoformat(entry["created_at"])
    return (datetime.fromisoformat(entry["finished_at"]) - created).total_seconds()


async def chains(client: BatchClient) -> Figure:
    rows = chain_rows()
    ideal = chain_ideal_s(len(rows))
    samples, submits = await _runs(client, rows, "makespan, chains")
    return Figure(
        key="makespan_chains",
        title="makespan vs ideal, chains",
        how=f"{len(rows):,} rows: {CHAINS} chains of {LINKS} linked rows + {CHAIN_INDEPENDENTS} "
        f"independents, interleaved; {IN_FLIGHT} in flight, {LATENCY_S:g} s each",
        measured=samples.text(3),
        reference=f"ideal {ideal:.2f} s (max({LINKS}, {len(rows):,} / {IN_FLIGHT}) x "
        f"{LATENCY_S:g} s)",
        ratio=samples.median / ideal,
        target=Target("<=", 1.05),
        data={"samples": samples.as_json(), "submit_s": submits.as_json(), "ideal_s": ideal},
    )


async def sequential_s(rows: list[Row]) -> float:
    """The original integration's algorithm: one row after another, ``${output.n}`` filled in."""
    model = ModelSpec(name=MODEL, provider="echo", latency_s=LATENCY_S)
    async with aiohttp.ClientSession() as session:
        provider = EchoProvider(Settings(), session)
        outputs: dict[int, str] = {}
        started = time.perf_counter()
        for number, row in enumerate(rows, start=1):
            prompt = substitute(row["prompt"], outputs)
            completion = await provider.complete(model, ChatRequest(prompt=prompt))
            outputs[number] = completion.text
        return time.perf_counter() - started


async def sequential(ours_s: float | None) -> Figure:
    """Scenario 3; ``ours_s`` is scenario 1's median makespan (None if it failed)."""
    rows = independent_rows()
    sample = rows if FULL else rows[:SEQUENTIAL_SAMPLE]
    scale = len(rows) / len(sample)
    values = []
    for run in range(1, RUNS + 1):
        values.append(await sequential_s(sample) * scale)
        progress("sequential baseline", f"run {run}/{RUNS}: {values[-1]:.1f} s for {len(rows):,}")
    samples = Samples.of(values, "s")
    how_much = (
        f"all {len(rows):,} rows"
        if FULL
        else f"extrapolated from {len(sample)} rows (BENCH_FULL=1 runs all {len(rows):,})"
    )
    return Figure(
        key="vs_sequential",
        title="vs the original integration's algorithm",
        how=f"the same {len(rows):,} rows one after another (a `for` loop awaiting the echo "
        f"provider), {how_much}; speed-up of scenario 1",
        measured="scenario 1 failed"
        if ours_s is None
        else f"batchexec {ours_s:.3f} s (scenario 1)",
        reference=f"sequential {samples.text(1)}, {how_much}",
        ratio=None if ours_s is None else samples.median / ours_s,
        target=Target(None, label="report the speed-up"),
        data={"samples": samples.as_json(), "rows_run": len(sample), "scale": scale},
    )
