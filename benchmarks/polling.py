"""Scenario 7: the results route of a finished 1,000-row batch under 32 concurrent clients."""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass

import aiohttp

from benchmarks.client import RESULTS, BatchClient
from benchmarks.common import RUNS, Figure, Samples, Target, progress
from benchmarks.overhead import instant_rows

ROWS = 1_000
CLIENTS = 32
DURATION_S = 5.0
#: Seconds of the same load against `GET /health`, for comparison.
FLOOR_S = 2.0
TARGET_REQUESTS_PER_S = 1_000.0


@dataclass(frozen=True)
class Load:
    """What one load run saw."""

    requests_per_s: float
    p50_ms: float
    p99_ms: float
    response_bytes: int


async def load(
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    *,
    json_body: object = None,
    headers: dict[str, str] | None = None,
    clients: int = CLIENTS,
    duration_s: float = DURATION_S,
) -> Load:
    """``clients`` loops sending the same request back to back for ``duration_s`` seconds."""
    latencies: list[float] = []
    sizes: list[int] = []
    deadline = time.perf_counter() + duration_s

    async def client() -> None:
        while time.perf_counter() < deadline:
            sent = time.perf_counter()
            async with session.request(method, url, json=json_body, headers=headers) as answer:
                body = await answer.read()
                if answer.status != 200:
                    raise RuntimeError(f"{url}: HTTP {answer.status}: {body[:300]!r}")
            latencies.append(time.perf_counter() - sent)
            sizes.append(len(body))

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    elapsed = time.perf_counter() - started
    cuts = statistics.quantiles(latencies, n=100, method="inclusive")
    return Load(
        requests_per_s=len(latencies) / elapsed,
        p50_ms=statistics.median(latencies) * 1000,
        p99_ms=cuts[98] * 1000,
        response_bytes=round(statistics.median(sizes)),
    )


async def polling(client: BatchClient) -> Figure:
    batch_id = await client.run(instant_rows(ROWS))
    await client.check_succeeded(batch_id, ROWS)
    url = client.base_url + RESULTS
    runs: list[Load] = []
    floor: list[Load] = []
    for run in range(1, RUNS + 1):
        runs.append(
            await load(
                client.session,
                "POST",
                url,
                json_body={"invocation_id": batch_id},
                headers=client.headers,
            )
        )
        progress(
            "results polling",
            f"run {run}/{RUNS}: {runs[-1].requests_per_s:,.0f} req/s, "
            f"p50 {runs[-1].p50_ms:.1f} ms, p99 {runs[-1].p99_ms:.1f} ms",
        )
        # The cheapest route under the same load: what the server and this client manage at most.
        floor.append(
            await load(client.session, "GET", client.base_url + "/health", duration_s=FLOOR_S)
        )
        progress(
            "results polling", f"run {run}/{RUNS}: /health {floor[-1].requests_per_s:,.0f} req/s"
        )
    rate = Samples.of([r.requests_per_s for r in runs], "req/s")
    p50 = Samples.of([r.p50_ms for r in runs], "ms")
    p99 = Samples.of([r.p99_ms for r in runs], "ms")
    health = Samples.of([r.requests_per_s for r in floor], "req/s")
    size_kb = runs[0].response_bytes / 1024
    return Figure(
        key="polling",
        title="results polling",
        how=f"results route of a finished {ROWS:,}-row batch ({size_kb:,.0f} KB answer), "
        f"{CLIENTS} concurrent clients for {DURATION_S:g} s from the harness process; "
        f"`GET /health` under the same load does {health.median:,.0f} req/s",
        measured=f"{rate.text(thousands=True)}; p50 {p50.median:.1f} ms, p99 {p99.median:.1f} ms",
        reference=f"the target itself, {TARGET_REQUESTS_PER_S:,.0f} req/s",
        ratio=rate.median / TARGET_REQUESTS_PER_S,
        target=Target(">=", 1.0),
        data={
            "requests_per_s": rate.as_json(),
            "p50_ms": p50.as_json(),
            "p99_ms": p99.as_json(),
            "health_requests_per_s": health.as_json(),
            "response_bytes": runs[0].response_bytes,
        },
    )
