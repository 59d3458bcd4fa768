"""batchexec mounted as a sub-app of another aiohttp application."""

from __future__ import annotations

import logging

from aiohttp import web

from batchexec import create_app
from batchexec.api import EXECUTE_BATCH, HEALTH, PROCESS_CSV, RESULTS, download_path
from batchexec.records import BatchStatus
from batchexec.web.keys import ENGINE, PROVIDERS, REGISTRY
from tests.fakes import GatedProvider
from tests.helpers import API_KEY, AUTH, owner_of


async def test_subapp_serves_under_its_prefix_and_stops_cleanly(
    aiohttp_client, make_settings, caplog
):
    caplog.set_level(logging.DEBUG)
    parent = web.Application()
    # memory://: a durable store would leave the running batch for the next start.
    batch_app = create_app(make_settings(database_url="memory://"), extra_providers=[GatedProvider])
    parent.add_subapp("/batch", batch_app)
    client = await aiohttp_client(parent)

    response = await client.post(
        "/batch" + EXECUTE_BATCH,
        json={"executions": [{"prompt": "hello", "model": "echo"}]},
        headers=AUTH,
    )
    assert response.status == 200
    done_id = (await response.json())["invocationId"]
    await batch_app[ENGINE].join(done_id)
    response = await client.post("/batch" + RESULTS, json={"invocation_id": done_id}, headers=AUTH)
    body = await response.json()
    prefix = str(client.make_url("/batch" + download_path("")))
    assert body["xlsx_url"] == f"{prefix}batch_execution_{done_id}.xlsx"
    download = await client.get(
        body["xlsx_url"].removeprefix(str(client.make_url(""))), headers=AUTH
    )
    assert download.status == 200
    assert (await client.get("/batch" + HEALTH)).status == 200

    response = await client.post(
        "/batch" + EXECUTE_BATCH,
        json={"executions": [{"prompt": "never answered", "model": "gated"}]},
        headers=AUTH,
    )
    running_id = (await response.json())["invocationId"]
    provider = batch_app[PROVIDERS]["gated"]
    assert isinstance(provider, GatedProvider)
    await provider.wait_started(1)

    await client.close()

    batch = await batch_app[REGISTRY].get(running_id, owner_of(batch_app, API_KEY))
    assert batch.status is BatchStatus.CANCELLED
    assert batch.executions[0].status.value == "cancelled"
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert "Task was destroyed" not in caplog.text


async def test_server_name_sets_the_public_url(make_client):
    client = await make_client(server_name="https://batch.example.com/prefix/")
    response = await client.post(
        PROCESS_CSV,
        json={"csv_content": "prompt\nhi\n"},
        headers=AUTH,
    )
    body = await response.json()
    assert body["xlsx_url"] == (
        "https://batch.example.com/prefix"
        + download_path(f"batch_execution_{body['invocationId']}.xlsx")
    )
