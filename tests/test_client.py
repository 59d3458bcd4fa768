"""``batchexec.client`` against the real app on a loopback port."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from batchexec import create_app
from batchexec.api import API_KEY_HEADER
from batchexec.client import (
    AuthError,
    BadAnswer,
    BusyError,
    Client,
    Conflict,
    ConnectionFailed,
    Event,
    InvalidRequest,
    NotFound,
)
from batchexec.config import DEV_API_KEY
from batchexec.web.keys import PROVIDERS
from tests.fakes import GatedProvider

ServerFactory = Callable[..., Awaitable[TestServer]]


@pytest.fixture
def make_server(aiohttp_server: Any, make_settings: Any) -> ServerFactory:
    """The real app, with the gated test provider, served on a loopback port."""

    async def make(**overrides: Any) -> TestServer:
        app = create_app(make_settings(**overrides), extra_providers=(GatedProvider,))
        server: TestServer = await aiohttp_server(app)
        return server

    return make


def url_of(server: TestServer) -> str:
    return str(server.make_url("")).rstrip("/")


def gated(server: TestServer) -> GatedProvider:
    provider = server.app[PROVIDERS]["gated"]
    assert isinstance(provider, GatedProvider)
    return provider


@pytest.fixture
async def server(make_server: ServerFactory) -> TestServer:
    return await make_server()


@pytest.fixture
async def client(server: TestServer) -> AsyncIterator[Client]:
    async with Client(url_of(server), DEV_API_KEY) as client:
        yield client


async def events_of(client: Client, invocation_id: str) -> list[Event]:
    return [event async for event in client.follow(invocation_id)]


async def test_a_batch_is_submitted_followed_and_its_workbook_downloaded(server, client, tmp_path):
    gated(server).open()
    executions = [
        {"prompt": "a", "model": "echo", "note": "n1"},
        {"prompt": "fail: then ${output.1}", "model": "gated"},
    ]
    invocation_id = await client.submit(executions)
    events = await events_of(client, invocation_id)
    assert [event.name for event in events].count("execution") == 2
    assert "progress" in [event.name for event in events]
    name, data = events[-1]
    assert name == "done"
    assert data["status"] == "completed"
    body = await client.results(invocation_id)
    assert body["status"] == "completed"
    assert body["progress"]["succeeded"] == 1  # the model refuses the second row
    assert [e["status"] for e in body["executions"]] == ["succeeded", "failed"]
    workbook = await client.download(body["xlsx_url"])
    assert workbook.startswith(b"PK")
    assert await client.download(f"batch_execution_{invocation_id}.xlsx") == workbook
    target = tmp_path / "out" / "results.xlsx"
    await client.download_to(body["xlsx_url"], target)
    assert target.read_bytes() == workbook
    assert [path.name for path in target.parent.iterdir()] == ["results.xlsx"]
    listed = await client.batches(limit=5)
    assert [batch["invocationId"] for batch in listed] == [invocation_id]


async def test_a_finished_batch_is_retried_once(server, client):
    gated(server).open()
    rows = [{"prompt": "flaky:x", "model": "gated"}, {"prompt": "ok", "model": "gated"}]
    first = await client.submit(rows)
    await events_of(client, first)
    assert (await client.results(first))["progress"]["failed"] == 1
    second = await client.retry(first)
    assert second != first
    assert (await events_of(client, second))[-1].data["status"] == "completed"
    body = await client.results(second)
    assert [e["status"] for e in body["executions"]] == ["succeeded", "succeeded"]
    with pytest.raises(Conflict) as nothing_to_retry:
        await client.retry(second)
    assert nothing_to_retry.value.status == 409
    assert "nothing to retry" in nothing_to_retry.value.detail


async def test_a_running_batch_is_cancelled(server, client):
    invocation_id = await client.submit([{"prompt": "held", "model": "gated"}])
    await gated(server).wait_started(1)
    with pytest.raises(Conflict, match="still running"):
        await client.retry(invocation_id)
    cancelled = await client.cancel(invocation_id)
    assert cancelled["status"] == "cancelled"
    name, data = (await events_of(client, invocation_id))[-1]
    assert (name, data["status"]) == ("done", "cancelled")


async def test_a_wrong_key_is_an_auth_error_with_the_servers_message(server):
    async with Client(url_of(server), "wrong") as client:
        with pytest.raises(AuthError) as refused:
            await client.submit([{"prompt": "a"}])
    assert refused.value.status == 401
    assert refused.value.detail == f"Missing or invalid {API_KEY_HEADER} header."
    assert str(refused.value) == f"Missing or invalid {API_KEY_HEADER} header. (HTTP 401)"


async def test_an_unknown_batch_is_not_found_on_every_route(client):
    with pytest.raises(NotFound, match="Invocation ID not found"):
        await client.results("no-such-batch")
    with pytest.raises(NotFound):
        await events_of(client, "no-such-batch")
    with pytest.raises(NotFound):
        await client.cancel("no-such-batch")
    with pytest.raises(NotFound):
        await client.download("http://elsewhere.invalid/public/batch_execution_results/x.xlsx")


async def test_an_invalid_batch_names_each_rows_problem(client):
    with pytest.raises(InvalidRequest) as refused:
        await client.submit(
            [{"prompt": "ok", "model": "echo"}, {"prompt": ""}, {"prompt": "x", "model": "nope"}]
        )
    assert refused.value.status == 422
    assert refused.value.detail == "2 executions are invalid."
    assert [(e.index, e.field) for e in refused.value.errors] == [(2, "prompt"), (3, "model")]
    assert refused.value.errors[1].message.startswith("Unknown model 'nope'.")


async def test_a_full_queue_is_busy_with_its_retry_after(make_server):
    server = await make_server(max_concurrent_batches=1, max_queued_batches=0)
    async with Client(url_of(server), DEV_API_KEY) as client:
        running = await client.submit([{"prompt": "held", "model": "gated"}])
        with pytest.raises(BusyError) as refused:
            await client.submit([{"prompt": "one too many", "model": "echo"}])
        gated(server).open()
        await events_of(client, running)
    assert refused.value.status == 429
    assert refused.value.retry_after_s == 5
    assert "Too many batches are queued" in refused.value.detail


@pytest.fixture
def refusing_port() -> Iterator[int]:
    """A loopback port that is bound but not listening: connecting is refused at once."""
    with socket.socket() as bound:
        bound.bind(("127.0.0.1", 0))
        yield bound.getsockname()[1]


async def test_an_unreachable_server_is_a_connection_failure(refusing_port):
    async with Client(f"http://127.0.0.1:{refusing_port}", DEV_API_KEY) as client:
        with pytest.raises(ConnectionFailed) as failed:
            await client.results("x")
    assert failed.value.status is None
    assert isinstance(failed.value.__cause__, aiohttp.ClientError)


async def test_a_server_that_is_not_batchexec_is_a_bad_answer(aiohttp_server):
    async def page(request: web.Request) -> web.Response:
        return web.Response(text="<html>hello</html>", content_type="text/html")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", page)
    other = await aiohttp_server(app)
    async with Client(url_of(other), DEV_API_KEY) as client:
        with pytest.raises(BadAnswer, match="unexpected mimetype"):
            await client.submit([{"prompt": "a"}])


async def test_a_given_session_is_used_and_left_open(server):
    async with aiohttp.ClientSession() as session:
        async with Client(url_of(server), DEV_API_KEY, session=session) as client:
            assert (await client.batches()) == []
        assert not session.closed


async def test_a_client_used_outside_its_block_says_so(server):
    with pytest.raises(RuntimeError, match="async with"):
        await Client(url_of(server), DEV_API_KEY).results("x")


def test_the_client_loads_none_of_the_server():
    code = (
        "import sys, batchexec.client; "
        "loaded = [m for m in sys.modules if m.startswith(('batchexec.web', 'pydantic'))]; "
        "print(loaded)"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert loaded.strip() == "[]"
