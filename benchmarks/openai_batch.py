"""Scenario: the OpenAI Batch API's cost per request, beside the batchexec route's.

The same instant echo rows as the ``overhead`` scenario, as a JSONL file of
``/v1/chat/completions`` requests: upload, create, poll the batch until it is
``completed`` (every 20 ms), download the output file. Against the same rows
through ``execute_batch`` on the same server, measured in the same run.
"""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp

from benchmarks.client import BatchClient
from benchmarks.common import RUNS, Figure, Samples, Target, progress
from benchmarks.overhead import MODEL, ROWS, end_to_end_s, instant_rows

#: The Batch API's rows/s against the batchexec route's, at least.
TARGET_RATIO = 0.8
_POLL_S = 0.02


def request_file(count: int = ROWS) -> bytes:
    lines = (
        json.dumps(
            {
                "custom_id": f"row-{n}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {"model": MODEL, "messages": [{"role": "user", "content": f"Row {n}."}]},
            }
        )
        for n in range(1, count + 1)
    )
    return "\n".join(lines).encode()


async def v1_end_to_end_s(client: BatchClient, content: bytes) -> float:
    """Upload, create, wait for ``completed``, download the output; seconds in all."""
    base = client.base_url + "/v1"
    headers = {"Authorization": f"Bearer {client.headers['Integrations-API-Key']}"}
    session = client.session
    started = time.perf_counter()
    form = aiohttp.FormData()
    form.add_field("purpose", "batch")
    form.add_field("file", content, filename="requests.jsonl")
    async with session.post(base + "/files", data=form, headers=headers) as answer:
        file_id = (await answer.json())["id"]
    body = {
        "input_file_id": file_id,
        "endpoint": "/v1/chat/completions",
        "completion_window": "24h",
    }
    async with session.post(base + "/batches", json=body, headers=headers) as answer:
        batch = await answer.json()
    while batch["status"] not in ("completed", "failed", "cancelled", "expired"):
        await asyncio.sleep(_POLL_S)
        async with session.get(f"{base}/batches/{batch['id']}", headers=headers) as answer:
            batch = await answer.json()
    if batch["status"] != "completed" or batch["request_counts"]["completed"] != ROWS:
        raise RuntimeError(f"openai batch {batch['id']}: {batch['status']}, {batch['errors']}")
    async with session.get(
        f"{base}/files/{batch['output_file_id']}/content", headers=headers
    ) as answer:
        output = await answer.read()
    elapsed = time.perf_counter() - started
    lines = output.count(b"\n")
    if lines != ROWS:
        raise RuntimeError(f"openai batch {batch['id']}: {lines} output lines")
    return elapsed


async def openai_batch(client: BatchClient) -> Figure:
    content, rows = request_file(), instant_rows()
    v1_values, native_values = [], []
    for run in range(1, RUNS + 1):
        native_s = await end_to_end_s(client, rows)
        v1_s = await v1_end_to_end_s(client, content)
        native_values.append(ROWS / native_s)
        v1_values.append(ROWS / v1_s)
        progress(
            "openai",
            f"run {run}/{RUNS}: /v1 {v1_s:.3f} s ({v1_values[-1]:,.0f} rows/s), "
            f"execute_batch {native_s:.3f} s",
        )
    v1, native = Samples.of(v1_values, "rows/s"), Samples.of(native_values, "rows/s")
    return Figure(
        key="openai_batch",
        title="OpenAI Batch API vs the batchexec route",
        how=f"{ROWS:,} instant echo requests: upload, create, poll every 20 ms until "
        "completed, download the output file",
        measured=v1.text(thousands=True),
        reference=f"execute_batch on the same server: {native.text(thousands=True)}",
        ratio=v1.median / native.median,
        target=Target(">=", TARGET_RATIO),
        data={"v1": v1.as_json(), "native": native.as_json(), "rows": ROWS},
    )
