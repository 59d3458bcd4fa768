"""Scenario 5: batchexec's OpenAI provider vs the official SDK, against one fake server.

Both clients send the same N chat completions with at most 100 in flight
(an ``asyncio.Semaphore(100)``) and 100 connections, one after the other, in
this process; the server runs in its own process.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import openai

from batchexec.catalog import ModelSpec
from batchexec.config import Settings
from batchexec.providers.base import ChatRequest
from batchexec.providers.openai import OpenAIProvider
from benchmarks.common import RUNS, Figure, Samples, Target, env_int, progress
from benchmarks.server import child_env, free_port, stop_process, wait_for_http

try:  # the openai SDK moved from httpx to httpx2
    import httpx2 as httpx
except ImportError:  # pragma: no cover - older SDKs
    import httpx  # type: ignore[no-redef]

#: Completions per client per run.
CALLS = env_int("BENCH_PROVIDER_CALLS", 5_000)
IN_FLIGHT = 100
PROMPT = "Say something short."

Call = Callable[[], Awaitable[object]]


async def _throughput(call: Call, calls: int) -> float:
    """Completions per second for ``calls`` calls, ``IN_FLIGHT`` at a time."""
    gate = asyncio.Semaphore(IN_FLIGHT)

    async def one() -> None:
        async with gate:
            await call()

    started = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(calls)))
    return calls / (time.perf_counter() - started)


async def batchexec_rate(base_url: str, calls: int) -> float:
    model = ModelSpec(name="m", provider="openai", base_url=base_url, model_id="m")
    request = ChatRequest(prompt=PROMPT)
    connector = aiohttp.TCPConnector(limit=IN_FLIGHT)
    async with aiohttp.ClientSession(connector=connector) as session:
        provider = OpenAIProvider(Settings(), session)
        # Checked once, so that a broken provider fails loudly instead of fast.
        if (await provider.complete(model, request)).text != "A short answer.":
            raise RuntimeError("batchexec's provider read the wrong text")
        return await _throughput(lambda: provider.complete(model, request), calls)


async def sdk_rate(base_url: str, calls: int) -> float:
    limits = httpx.Limits(max_connections=IN_FLIGHT, max_keepalive_connections=IN_FLIGHT)
    http_client = openai.DefaultAsyncHttpxClient(limits=limits)
    client = openai.AsyncOpenAI(
        base_url=base_url, api_key="x", max_retries=0, http_client=http_client
    )
    messages = [{"role": "user", "content": PROMPT}]

    async def call() -> object:
        return await client.chat.completions.create(model="m", messages=messages)  # type: ignore[arg-type]

    async with client:
        answer = await client.chat.completions.create(model="m", messages=messages)  # type: ignore[arg-type]
        if answer.choices[0].message.content != "A short answer.":
            raise RuntimeError("the SDK read the wrong text")
        return await _throughput(call, calls)


def providers(workdir: Path) -> Figure:
    port = free_port()
    with (workdir / "fake-openai.log").open("wb") as log:
        server = subprocess.Popen(  # noqa: S603 - our own interpreter and module
            [sys.executable, "-m", "benchmarks.fake_openai", "--port", str(port)],
            env=child_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    ours: list[float] = []
    theirs: list[float] = []
    try:
        wait_for_http(f"http://127.0.0.1:{port}/health", server, 30)
        base_url = f"http://127.0.0.1:{port}/v1"
        for run in range(1, RUNS + 1):
            # Each client in its own event loop, one after the other; the server idles between.
            ours.append(asyncio.run(batchexec_rate(base_url, CALLS)))
            theirs.append(asyncio.run(sdk_rate(base_url, CALLS)))
            progress(
                "provider client",
                f"run {run}/{RUNS}: batchexec {ours[-1]:,.0f}/s, SDK {theirs[-1]:,.0f}/s",
            )
    finally:
        stop_process(server, "the fake OpenAI server")
    mine = Samples.of(ours, "calls/s")
    sdk = Samples.of(theirs, "calls/s")
    return Figure(
        key="provider_client",
        title="provider client vs the official SDK",
        how=f"{CALLS:,} chat completions, {IN_FLIGHT} in flight and {IN_FLIGHT} connections each, "
        "against a fake OpenAI server in its own process: `OpenAIProvider.complete` on "
        f"aiohttp vs `openai.AsyncOpenAI` {openai.__version__}",
        measured=f"batchexec {mine.text(thousands=True)}",
        reference=f"SDK {sdk.text(thousands=True)}",
        ratio=mine.median / sdk.median,
        target=Target(">=", 1.5),
        data={"batchexec": mine.as_json(), "sdk": sdk.as_json(), "calls": CALLS},
    )
