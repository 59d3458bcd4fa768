"""Completion webhooks, received by an in-process server and verified as a receiver would.

Signatures are checked with the Standard Webhooks reference library, not with
the code that makes them.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import sqlite3
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import FormData, web
from aiohttp.test_utils import TestClient, TestServer
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from batchexec import create_app
from batchexec.api import BATCHES, CANCEL, EXECUTE_BATCH, PROCESS_CSV, RETRY, UPLOAD
from batchexec.store import BatchStore
from batchexec.web.keys import REGISTRY
from batchexec.webhooks import signed_headers, signing_key
from tests.fakes import GatedProvider
from tests.helpers import AUTH, finished, gated
from tests.test_metrics import scrape, value

SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()
#: Generous bounds on what happens at once on a healthy machine: they only stop a hang.
WAIT_S = 20.0


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes

    def verified(self, secret: str | bytes = SECRET) -> Any:
        """The body, once the reference library has checked its signature."""
        return Webhook(secret).verify(self.body, self.headers)


@dataclass
class Receiver:
    """A webhook receiver: records each POST and answers as ``answers`` says, then 200."""

    answers: list[Callable[[], Awaitable[web.StreamResponse]] | int] = field(default_factory=list)
    received: list[Received] = field(default_factory=list)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    server: TestServer | None = None

    @property
    def origin(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.port}"

    def url(self, path: str = "/hooks/batches") -> str:
        return self.origin + path

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.received.append(Received(request.path, dict(request.headers), await request.read()))
        async with self.changed:
            self.changed.notify_all()
        answer = self.answers.pop(0) if self.answers else 200
        if isinstance(answer, int):
            return web.Response(status=answer)
        return await answer()

    async def wait_for(self, count: int) -> list[Received]:
        async with self.changed:
            await asyncio.wait_for(
                self.changed.wait_for(lambda: len(self.received) >= count), WAIT_S
            )
        return self.received


@pytest.fixture
async def receiver(aiohttp_server: Any) -> Receiver:
    receiver = Receiver()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", receiver.handle)
    receiver.server = await aiohttp_server(app)
    return receiver


@pytest.fixture
def hooked(make_client: Any, receiver: Receiver) -> Callable[..., Awaitable[TestClient[Any, Any]]]:
    """A client of an app whose webhooks may go to ``receiver``, retried at once."""

    async def make(**overrides: Any) -> TestClient[Any, Any]:
        settings: dict[str, Any] = {
            "callback_allow": receiver.origin,
            "callback_secret": SECRET,
            "callback_backoff_s": 0.01,
            "callback_timeout_s": 5.0,
            **overrides,
        }
        client: TestClient[Any, Any] = await make_client(**settings)
        return client

    return make


async def submit_hooked(
    client: TestClient[Any, Any], url: str | None, rows: list[dict[str, Any]] | None = None
) -> str:
    body: dict[str, Any] = {"executions": rows or [{"prompt": "hello", "model": "gated"}]}
    if url is not None:
        body["callback_url"] = url
    response = await client.post(EXECUTE_BATCH, json=body, headers=AUTH)
    assert response.status == 200, await response.text()
    invocation_id: str = (await response.json())["invocationId"]
    return invocation_id


async def settled(client: TestClient[Any, Any]) -> None:
    """Wait until no webhook is pending in the app's store: each delivered or given up."""
    store = _store(client)
    deadline = time.monotonic() + WAIT_S
    while await store.next_callback_in() is not None:
        assert time.monotonic() < deadline, "a webhook is still pending"
        await asyncio.sleep(0.01)


def _store(client: TestClient[Any, Any]) -> BatchStore:
    store: BatchStore = client.app[REGISTRY].store
    return store


async def test_a_finished_batch_gets_one_signed_post_that_the_reference_library_verifies(
    hooked, receiver
):
    client = await hooked()
    gated(client).open()
    invocation_id = await submit_hooked(
        client,
        receiver.url("/hooks/batches?token=abc"),
        [{"prompt": "hello", "model": "gated"}, {"prompt": "fail: no", "model": "gated"}],
    )
    await finished(client, invocation_id)
    [post] = await receiver.wait_for(1)
    await settled(client)

    assert len(receiver.received) == 1
    assert post.path == "/hooks/batches"
    assert post.headers["Content-Type"] == "application/json"
    assert post.headers["webhook-id"] == invocation_id
    assert abs(int(post.headers["webhook-timestamp"]) - time.time()) < 60
    body = post.verified()
    assert body["type"] == "batch.completed"
    data = body["data"]
    assert data["invocationId"] == invocation_id
    assert data["status"] == "completed"
    assert data["progress"]["total"] == 2
    assert data["progress"]["succeeded"] == 1
    assert data["progress"]["failed"] == 1
    assert data["finished_at"] is not None
    # Any change to the body or another secret fails verification.
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(post.body.replace(b"completed", b"cancelled"), post.headers)
    with pytest.raises(WebhookVerificationError):
        post.verified("whsec_" + base64.b64encode(b"another secret").decode())
    samples = await scrape(client)
    assert value(samples, "batchexec_webhook_attempts_total", outcome="delivered") == 1


async def test_a_receiver_answering_500_gets_retries_with_the_same_id_until_it_accepts(
    hooked, receiver
):
    receiver.answers = [500, 500]
    client = await hooked()
    gated(client).open()
    invocation_id = await submit_hooked(client, receiver.url())
    await finished(client, invocation_id)
    posts = await receiver.wait_for(3)
    await settled(client)

    assert len(receiver.received) == 3
    assert {post.headers["webhook-id"] for post in posts} == {invocation_id}
    for post in posts:
        assert post.verified()["data"]["status"] == "completed"
    samples = await scrape(client)
    assert value(samples, "batchexec_webhook_attempts_total", outcome="retried") == 2
    assert value(samples, "batchexec_webhook_attempts_total", outcome="delivered") == 1


async def test_a_webhook_is_given_up_after_its_attempts_and_logged_without_its_query(
    hooked, receiver, caplog
):
    receiver.answers = [503, 503, 503, 503]
    client = await hooked(callback_attempts=3)
    gated(client).open()
    with caplog.at_level(logging.WARNING, logger="batchexec.webhooks"):
        invocation_id = await submit_hooked(client, receiver.url("/in?token=secret-token"))
        await finished(client, invocation_id)
        await receiver.wait_for(3)
        await settled(client)

    assert len(receiver.received) == 3
    samples = await scrape(client)
    assert value(samples, "batchexec_webhook_attempts_total", outcome="retried") == 2
    assert value(samples, "batchexec_webhook_attempts_total", outcome="failed") == 1
    assert "given up after 3 attempts" in caplog.text
    assert invocation_id in caplog.text
    assert "secret-token" not in caplog.text


async def test_redirects_are_not_followed_and_410_gives_up_at_once(hooked, receiver):
    async def redirect() -> web.StreamResponse:
        raise web.HTTPTemporaryRedirect(receiver.url("/elsewhere"))

    receiver.answers = [redirect, 410]
    client = await hooked()
    gated(client).open()
    invocation_id = await submit_hooked(client, receiver.url("/in"))
    await finished(client, invocation_id)
    await receiver.wait_for(2)
    await settled(client)

    assert [post.path for post in receiver.received] == ["/in", "/in"]
    samples = await scrape(client)
    assert value(samples, "batchexec_webhook_attempts_total", outcome="retried") == 1
    assert value(samples, "batchexec_webhook_attempts_total", outcome="failed") == 1
    assert value(samples, "batchexec_webhook_attempts_total", outcome="delivered") == 0


async def test_a_longer_retry_after_is_waited_for(hooked, receiver):
    async def busy() -> web.StreamResponse:
        return web.Response(status=503, headers={"Retry-After": "120"})

    receiver.answers = [busy]
    client = await hooked()
    gated(client).open()
    invocation_id = await submit_hooked(client, receiver.url())
    await finished(client, invocation_id)
    await receiver.wait_for(1)
    store = _store(client)
    deadline = time.monotonic() + WAIT_S
    while (next_in_s := await store.next_callback_in()) is None or next_in_s < 60:
        # The claim's hold is seconds; the receiver's wait is minutes.
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    assert 100 < next_in_s <= 120
    assert len(receiver.received) == 1


async def test_every_ended_status_is_posted_cancelled_and_failed_alike(hooked, receiver):
    client = await hooked()
    invocation_id = await submit_hooked(client, receiver.url())
    await gated(client).wait_started(1)
    response = await client.post(
        CANCEL,
        json={"invocation_id": invocation_id},
        headers=AUTH,
    )
    assert response.status == 200, await response.text()
    [post] = await receiver.wait_for(1)
    body = post.verified()
    assert body["type"] == "batch.cancelled"
    assert body["data"]["progress"]["cancelled"] == 1


async def test_the_server_default_is_used_and_an_empty_callback_url_opts_out(hooked, receiver):
    client = await hooked(callback_url=receiver.url("/default"))
    gated(client).open()
    with_default = await submit_hooked(client, None)
    opted_out = await submit_hooked(client, "")
    await finished(client, with_default)
    await finished(client, opted_out)
    await receiver.wait_for(1)
    await settled(client)

    assert [(post.path, post.headers["webhook-id"]) for post in receiver.received] == [
        ("/default", with_default)
    ]


async def test_a_retry_posts_to_the_webhook_of_the_batch_it_retries(hooked, receiver):
    client = await hooked()
    gated(client).open()
    first = await submit_hooked(client, receiver.url(), [{"prompt": "flaky: x", "model": "gated"}])
    await finished(client, first)
    response = await client.post(RETRY, json={"invocation_id": first}, headers=AUTH)
    assert response.status == 200, await response.text()
    second = (await response.json())["invocationId"]
    await finished(client, second)
    posts = await receiver.wait_for(2)

    assert {post.headers["webhook-id"]: post.verified()["data"]["retry_of"] for post in posts} == {
        first: None,
        second: first,
    }


async def test_spreadsheet_routes_take_a_callback_url_with_execute_only(hooked, receiver):
    client = await hooked()
    gated(client).open()
    csv = "prompt,model\nhello,gated\n"
    response = await client.post(
        PROCESS_CSV,
        json={"csv_content": csv, "execute": True, "callback_url": receiver.url("/csv")},
        headers=AUTH,
    )
    assert response.status == 200, await response.text()
    form = FormData()
    form.add_field("file", csv.encode(), filename="prompts.csv")
    form.add_field("execute", "true")
    form.add_field("callback_url", receiver.url("/upload"))
    response = await client.post(UPLOAD, data=form, headers=AUTH)
    assert response.status == 200, await response.text()
    await receiver.wait_for(2)
    assert sorted(post.path for post in receiver.received) == ["/csv", "/upload"]

    template = await client.post(
        PROCESS_CSV, json={"csv_content": csv, "callback_url": receiver.url()}, headers=AUTH
    )
    assert template.status == 422
    body = await template.json()
    assert "execute" in body["detail"]
    assert body["errors"][0]["field"] == "callback_url"


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("http://169.254.169.254/latest/meta-data", "is not among the webhook targets"),
        ("http://127.0.0.1:1/hooks", "is not among the webhook targets"),
        ("https://127.0.0.1/hooks", "is not among the webhook targets"),
        ("ftp://127.0.0.1/x", "must be an http:// or https:// URL"),
        ("/relative/path", "must be an http:// or https:// URL"),
        ("http://user:pass@127.0.0.1/x", "user name or password"),
        ("http://127.0.0.1/x#frag", "#fragment"),
        ("http://127.0.0.1/a b", "spaces or control characters"),
        ("http://127.0.0.1:99999/x", "is not a URL"),
    ],
)
async def test_a_callback_url_the_server_does_not_allow_is_refused_and_nothing_runs(
    hooked, receiver, url, says
):
    client = await hooked()
    if url.startswith(("http://127.0.0.1/", "http://user")):
        url = url.replace("127.0.0.1", f"127.0.0.1:{receiver.server.port}", 1)
    response = await client.post(
        EXECUTE_BATCH,
        json={"executions": [{"prompt": "p", "model": "gated"}], "callback_url": url},
        headers=AUTH,
    )
    assert response.status == 422, await response.text()
    body = await response.json()
    assert body["detail"].startswith("The callback_url ")
    assert says in body["detail"]
    assert body["errors"] == [
        {"index": None, "field": "callback_url", "message": body["errors"][0]["message"]}
    ]
    assert gated(client).started == []
    listed = await client.get(BATCHES, headers=AUTH)
    assert (await listed.json())["batches"] == []


async def test_an_overlong_callback_url_is_refused(hooked, receiver):
    client = await hooked()
    url = receiver.url("/" + "a" * 3000)
    response = await client.post(
        EXECUTE_BATCH,
        json={"executions": [{"prompt": "p", "model": "gated"}], "callback_url": url},
        headers=AUTH,
    )
    assert response.status == 422
    assert "callback_url" in await response.text()


async def test_with_webhooks_off_a_callback_url_is_refused_naming_the_setting(make_client):
    client = await make_client()
    response = await client.post(
        EXECUTE_BATCH,
        json={
            "executions": [{"prompt": "p", "model": "gated"}],
            "callback_url": "https://hooks.example.com/in",
        },
        headers=AUTH,
    )
    assert response.status == 422
    assert "CALLBACK_ALLOW" in (await response.json())["detail"]


async def test_a_webhook_cut_off_by_a_restart_is_sent_by_the_next_process(
    make_settings, receiver, aiohttp_client
):
    held, gone = asyncio.Event(), asyncio.Event()

    async def hang() -> web.StreamResponse:
        held.set()
        await gone.wait()  # until the first process has gone away
        return web.Response()

    receiver.answers = [hang]
    # An attempt that cannot time out before the first process is stopped.
    settings = make_settings(
        callback_allow=receiver.origin,
        callback_secret=SECRET,
        callback_backoff_s=0.01,
        callback_timeout_s=60.0,
    )
    first = await aiohttp_client(create_app(settings, extra_providers=(GatedProvider,)))
    gated(first).open()
    invocation_id = await submit_hooked(first, receiver.url())
    await finished(first, invocation_id)
    await asyncio.wait_for(held.wait(), WAIT_S)
    await first.close()  # the attempt in flight is cut off
    gone.set()
    path = settings.database_url.removeprefix("sqlite:///")

    def query(sql: str) -> list[Any]:
        db = sqlite3.connect(path)
        try:
            with db:
                return db.execute(sql, (invocation_id,)).fetchall()
        finally:
            db.close()

    # Still pending, no attempt recorded; held by the first process's claim, which lapses
    # in two timeouts (the store's tests check that): here it has lapsed.
    assert query("SELECT callback_state, callback_attempts FROM batches WHERE id = ?") == [
        ("pending", 0)
    ]
    query("UPDATE batches SET callback_next = 0 WHERE id = ?")

    second = await aiohttp_client(create_app(settings, extra_providers=(GatedProvider,)))
    posts = await receiver.wait_for(2)
    await settled(second)
    assert [post.headers["webhook-id"] for post in posts] == [invocation_id, invocation_id]
    assert posts[1].verified()["data"]["status"] == "completed"
    assert query("SELECT callback_state, callback_attempts FROM batches WHERE id = ?") == [
        ("delivered", 1)
    ]


async def delivered_once(hooked: Any, receiver: Receiver, database_url: str) -> None:
    client = await hooked(database_url=database_url)
    gated(client).open()
    invocation_id = await submit_hooked(client, receiver.url())
    # With PostgreSQL the batch waits in the store for a replica (this one) to claim it.
    await receiver.wait_for(1)
    await settled(client)
    [post] = receiver.received
    assert post.headers["webhook-id"] == invocation_id
    assert post.verified()["data"]["status"] == "completed"


async def test_a_memory_store_delivers_alike(hooked, receiver):
    await delivered_once(hooked, receiver, "memory://")


async def test_a_postgresql_store_delivers_alike(hooked, receiver, postgres_url):
    await delivered_once(hooked, receiver, postgres_url)


def test_a_plain_secret_signs_with_its_own_bytes():
    body = json.dumps({"type": "batch.completed"}).encode()
    headers = signed_headers(signing_key("plain secret"), "b1", int(time.time()), body)
    assert Webhook(b"plain secret").verify(body, headers) == {"type": "batch.completed"}
    assert signing_key(SECRET) == b"0123456789abcdef0123456789abcdef"
