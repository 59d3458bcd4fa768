"""The worst batch the default limits admit stays within the memory budget the README states."""

from __future__ import annotations

import tracemalloc
from collections.abc import Iterator

import pytest

from batchexec.api import BATCHES, RESULTS
from batchexec.config import Settings
from batchexec.web.keys import ENGINE, RESULT_WORKBOOKS
from tests.helpers import AUTH, submit

MB = 1024 * 1024
#: The README's budget for one worst-case batch, run and answered (measured: about 125 MB).
BUDGET_MB = 160
#: What the finished batch keeps in memory: beyond BATCH_CACHE_BYTES it is read back from
#: the store when asked (measured: under 1 MB; 38 MB with the records kept).
HELD_MB = 60
#: A character that takes four bytes in a Python string, the most any character takes.
WIDE = "\U0001f600"


@pytest.fixture
def traced() -> Iterator[None]:
    tracemalloc.start()
    try:
        yield
    finally:
        tracemalloc.stop()


def worst_case_rows(settings: Settings) -> list[dict[str, str]]:
    """Every row at the length limits: the prompt as written, as sent, and its answer."""
    written, sent = settings.max_prompt_length, settings.max_sent_prompt_length
    reference = "${output.1}"
    copies = sent // written  # each reference to row 1 sends its whole prompt again
    padding = min(written - copies * len(reference), sent - copies * written)
    rows = [{"prompt": WIDE * written, "model": "echo"}]
    rows += [
        {"prompt": reference * copies + WIDE * padding, "model": "echo"}
        for _ in range(settings.max_executions_per_batch - 1)
    ]
    return rows


async def test_the_worst_batch_under_the_default_limits_stays_within_budget(
    make_client, make_settings, traced
):
    settings = make_settings()
    defaults = Settings(_env_file=None)
    for name in ("max_executions_per_batch", "max_prompt_length", "max_sent_prompt_length"):
        assert getattr(settings, name) == getattr(defaults, name), f"{name} is not the default"
    client = await make_client(settings)
    rows = worst_case_rows(settings)
    base = tracemalloc.get_traced_memory()[0]

    invocation_id = await submit(client, rows)
    await client.app[ENGINE].join(invocation_id)
    # The workbook is written after the batch ends: what is held is measured after it.
    await client.app[RESULT_WORKBOOKS].idle()
    held = tracemalloc.get_traced_memory()[0] - base
    listed = await client.get(BATCHES, headers=AUTH)
    (entry,) = (await listed.json())["batches"]
    assert entry["progress"]["succeeded"] == settings.max_executions_per_batch

    # Read and dropped a chunk at a time, so the test's own copy does not count.
    response = await client.post(RESULTS, json={"invocation_id": invocation_id}, headers=AUTH)
    size = 0
    async for chunk in response.content.iter_chunked(64 * 1024):
        size += len(chunk)
    _, peak = tracemalloc.get_traced_memory()

    assert size > 30 * MB, "the answer is as large as the worst case makes it"
    assert (peak - base) / MB < BUDGET_MB
    assert held / MB < HELD_MB
