"""A batch of ``/v1/batches`` still running past its completion window ends ``expired``."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time

import openai
import pytest

from batchexec import openai_batches
from tests.helpers import API_KEY, gated

WAIT_S = 20.0


def request_line(custom_id: str, prompt: str) -> str:
    body = {"model": "gated", "messages": [{"role": "user", "content": prompt}]}
    line = {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}
    return json.dumps(line)


async def test_a_batch_running_past_its_window_is_cancelled_as_expired(
    make_client, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(openai_batches, "POLL_S", 0.02)
    client = await make_client()
    api = openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key=API_KEY, max_retries=0)
    content = "\n".join([request_line("done", "first"), request_line("late", "second")])
    uploaded = await api.files.create(file=("in.jsonl", content.encode()), purpose="batch")
    batch = await api.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    assert batch.expires_at is not None
    assert 24 * 3600 - 5 <= batch.expires_at - batch.created_at <= 24 * 3600
    provider = gated(client)
    provider.open("first")
    await provider.wait_started(2)
    while (await api.batches.retrieve(batch.id)).request_counts.completed < 1:  # type: ignore[union-attr]
        await asyncio.sleep(0.01)

    # The window passes while "second" is still waiting for its answer.
    db = sqlite3.connect("batchexec.db")  # the default store, in the test's folder
    try:
        with db:
            db.execute("UPDATE openai_batches SET expires_at = ?", (time.time() - 1,))
    finally:
        db.close()
    deadline = time.monotonic() + WAIT_S
    while (batch := await api.batches.retrieve(batch.id)).status != "expired":
        assert time.monotonic() < deadline, batch.status
        await asyncio.sleep(0.01)

    assert batch.expired_at is not None
    assert batch.cancelled_at is None
    assert batch.request_counts is not None
    assert (batch.request_counts.completed, batch.request_counts.total) == (1, 2)
    assert batch.output_file_id is not None and batch.error_file_id is not None
    output = [
        json.loads(line)
        for line in (await api.files.content(batch.output_file_id)).text.splitlines()
    ]
    errors = [
        json.loads(line)
        for line in (await api.files.content(batch.error_file_id)).text.splitlines()
    ]
    assert [line["custom_id"] for line in output] == ["done"]
    assert output[0]["response"]["body"]["choices"][0]["message"]["content"] == "answer(first)"
    assert [(line["custom_id"], line["error"]["code"]) for line in errors] == [
        ("late", "batch_expired")
    ]
    assert "completion window" in errors[0]["error"]["message"]
    await api.close()
