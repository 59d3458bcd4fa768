"""The results route's cursor: only what ended since, or progress alone."""

from __future__ import annotations

from typing import Any

import pytest

from batchexec.api import RESULTS
from batchexec.records import ExecutionStatus
from batchexec.web.keys import ENGINE
from tests.helpers import AUTH, batch_of, finished, gated, submit, until


async def ask(client: Any, invocation_id: str, **query: Any) -> dict[str, Any]:
    response = await client.post(
        RESULTS, json={"invocation_id": invocation_id, **query}, headers=AUTH
    )
    assert response.status == 200, await response.text()
    body: dict[str, Any] = await response.json()
    return body


async def test_since_gives_the_rows_ended_after_the_cursor_in_the_order_they_ended(make_client):
    client = await make_client(max_threads=3)
    rows = [{"prompt": f"row {n}", "model": "gated"} for n in range(1, 4)]
    invocation_id = await submit(client, rows)
    provider = gated(client)
    await provider.wait_started(3)
    batch = batch_of(client, invocation_id)

    first = await ask(client, invocation_id, since=0)
    assert (first["executions"], first["cursor"]) == ([], 0)

    provider.open("row 3")
    await until(lambda: batch.counts[ExecutionStatus.SUCCEEDED] == 1)
    provider.open("row 1")
    await until(lambda: batch.counts[ExecutionStatus.SUCCEEDED] == 2)
    both = await ask(client, invocation_id, since=0)
    assert [e["index"] for e in both["executions"]] == [3, 1]
    after_first = await ask(client, invocation_id, since=both["cursor"] - 1)
    assert [e["index"] for e in after_first["executions"]] == [1]
    nothing_new = await ask(client, invocation_id, since=both["cursor"])
    assert (nothing_new["executions"], nothing_new["cursor"]) == ([], both["cursor"])
    assert nothing_new["progress"]["succeeded"] == 2
    assert nothing_new["csv_content"] is None

    provider.open("row 2")
    await client.app[ENGINE].join(invocation_id)
    last = await ask(client, invocation_id, since=both["cursor"])
    assert [e["index"] for e in last["executions"]] == [2]
    assert last["status"] == "completed"
    assert last["csv_content"] is None, "the whole answer brings the CSV"
    assert last["xlsx_url"] is not None

    whole = await finished(client, invocation_id)
    assert [e["index"] for e in whole["executions"]] == [1, 2, 3]
    assert whole["cursor"] == last["cursor"]
    assert whole["csv_content"].startswith("prompt,model,result\n")


async def test_progress_only_leaves_the_rows_out(make_client):
    client = await make_client()
    invocation_id = await submit(client, [{"prompt": f"p{n}", "model": "echo"} for n in range(4)])
    whole = await finished(client, invocation_id)
    body = await ask(client, invocation_id, progress_only=True)
    assert body["executions"] == []
    assert body["csv_content"] is None
    assert body["progress"] == whole["progress"]
    assert body["usage"] == whole["usage"]
    assert body["cursor"] == whole["cursor"] == 4
    kept = await ask(client, invocation_id, progress_only=True, since=2)
    assert kept["cursor"] == 2, "a poller asking for progress keeps its place"


@pytest.mark.parametrize("since", [-1, "3", 1.5, 2**60])
async def test_a_bad_cursor_is_422(make_client, since):
    client = await make_client()
    invocation_id = await submit(client, [{"prompt": "p", "model": "echo"}])
    response = await client.post(
        RESULTS, json={"invocation_id": invocation_id, "since": since}, headers=AUTH
    )
    assert response.status == 422
    body = await response.json()
    assert body["errors"][0]["field"] == "since"


async def test_the_cursor_holds_across_a_restart(make_client, make_settings):
    settings = make_settings(max_threads=1)
    client = await make_client(settings)
    invocation_id = await submit(client, [{"prompt": f"p{n}", "model": "echo"} for n in range(3)])
    before = await finished(client, invocation_id)
    await client.close()
    again = await make_client(settings)
    after = await ask(again, invocation_id, since=1)
    assert [e["index"] for e in after["executions"]] == [2, 3]
    assert after["cursor"] == before["cursor"] == 3
