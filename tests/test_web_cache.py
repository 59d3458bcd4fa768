"""Finished batches' results are rendered once, kept by batch within a byte budget."""

from __future__ import annotations

import asyncio
import gc
import time
from dataclasses import replace
from typing import Any

from batchexec.api import API_KEY_HEADER, RESULTS
from batchexec.records import BatchStatus
from batchexec.web.cache import Head, RenderedResults
from batchexec.web.keys import REGISTRY, RESULTS_CACHE, SETTINGS
from tests.helpers import API_KEY, AUTH, finished, submit


def pieces(body: bytes) -> tuple[bytes, ...]:
    """``body`` as a rendered answer is kept: in pieces."""
    return (body[:1], body[1:])


def renderer(body: bytes, calls: list[bytes]):
    async def render() -> tuple[bytes, ...]:
        calls.append(body)
        return pieces(body)

    return render


async def test_least_recently_used_answer_goes_first_when_over_the_byte_budget():
    cache = RenderedResults(max_bytes=10)
    calls: list[bytes] = []
    assert await cache.get("a", renderer(b"AAAA", calls)) == pieces(b"AAAA")
    assert await cache.get("b", renderer(b"BBBB", calls)) == pieces(b"BBBB")
    assert await cache.get("a", renderer(b"new", calls)) == pieces(b"AAAA")
    await cache.get("c", renderer(b"CCCC", calls))
    assert cache.size_bytes == 8
    assert await cache.get("b", renderer(b"B2", calls)) == pieces(b"B2")
    assert calls == [b"AAAA", b"BBBB", b"CCCC", b"B2"]


async def test_an_answer_larger_than_the_budget_is_served_but_not_kept():
    cache = RenderedResults(max_bytes=3)
    calls: list[bytes] = []
    assert await cache.get("a", renderer(b"four", calls)) == pieces(b"four")
    assert await cache.get("a", renderer(b"four", calls)) == pieces(b"four")
    assert cache.size_bytes == 0
    assert len(calls) == 2


async def test_concurrent_requests_share_one_rendering():
    cache = RenderedResults(max_bytes=100)
    gate = asyncio.Event()
    calls = 0

    async def render() -> tuple[bytes, ...]:
        nonlocal calls
        calls += 1
        await gate.wait()
        return (b"body",)

    waiters = [asyncio.ensure_future(cache.get("a", render)) for _ in range(20)]
    await asyncio.sleep(0)
    waiters[0].cancel()  # one client going away does not stop the others' answer
    gate.set()
    answers = await asyncio.gather(*waiters[1:])
    assert answers == [(b"body",)] * 19
    assert calls == 1


async def test_finished_results_are_kept_once_whatever_the_host(make_client):
    client = await make_client()
    invocation_id = await submit(client, [{"prompt": "p", "model": "echo"}])
    first = await finished(client, invocation_id)
    cache = client.app[RESULTS_CACHE]
    size = cache.size_bytes
    assert size > 0
    for host in ("batch.example.com", "other.example.com", "a.example.org"):
        other = await client.post(
            RESULTS, json={"invocation_id": invocation_id}, headers={**AUTH, "Host": host}
        )
        body = await other.json()
        assert body["xlsx_url"].startswith(f"http://{host}/public/")
        assert body["csv_content"] == first["csv_content"]
        assert body == {**first, "xlsx_url": body["xlsx_url"]}
        assert list(body) == list(first)
    assert cache.size_bytes == size


async def test_a_kept_answer_is_served_without_reading_its_batch_back(make_client, monkeypatch):
    """A finished batch too large for the batch cache (here: any) is read back from the
    store for each request; once its answer is kept, polling it reads nothing."""
    client = await make_client(batch_cache_bytes=0, integrations_api_keys=f"{API_KEY},other-key")
    invocation_id = await submit(client, [{"prompt": "p", "model": "echo"}])
    first = await finished(client, invocation_id)  # rendered and kept
    gc.collect()  # nothing else holds the batch now
    store = client.app[REGISTRY].store
    loads: list[str] = []
    load = store.load

    async def counted(batch_id: str) -> Any:
        loads.append(batch_id)
        return await load(batch_id)

    monkeypatch.setattr(store, "load", counted)
    for host in ("batch.example.com", "other.example.com"):
        again = await client.post(
            RESULTS, json={"invocation_id": invocation_id}, headers={**AUTH, "Host": host}
        )
        body = await again.json()
        assert body["xlsx_url"].startswith(f"http://{host}/public/")
        assert {**body, "xlsx_url": None} == {**first, "xlsx_url": None}
    assert loads == []
    # Another key's request gets the 404 it always got, from the registry.
    other = await client.post(
        RESULTS, json={"invocation_id": invocation_id}, headers={API_KEY_HEADER: "other-key"}
    )
    assert other.status == 404
    # A cursor asks the registry too: its answer is not the kept one.
    since = await client.post(
        RESULTS, json={"invocation_id": invocation_id, "since": 0}, headers=AUTH
    )
    assert since.status == 200
    assert len(loads) == 2


async def test_a_kept_answer_past_the_results_ttl_is_not_served(make_client, monkeypatch):
    client = await make_client(batch_cache_bytes=0)
    invocation_id = await submit(client, [{"prompt": "p", "model": "echo"}])
    await finished(client, invocation_id)
    ttl_s = client.app[SETTINGS].results_ttl_s
    later = time.time() + ttl_s + 60
    monkeypatch.setattr(time, "time", lambda: later)
    await client.app[REGISTRY].expire(older_than=later - ttl_s)
    gone = await client.post(RESULTS, json={"invocation_id": invocation_id}, headers=AUTH)
    assert gone.status == 404


def test_a_kept_answer_is_not_refreshed_by_another_owner_and_goes_once_expired():
    cache = RenderedResults(max_bytes=100)
    mine = Head("me", BatchStatus.COMPLETED, "done", None, finished_at=1000.0)

    async def render() -> tuple[bytes, ...]:
        return (b"{", b"body}")

    async def fill() -> None:
        await cache.get("a", render, mine)
        await cache.get("b", render, replace(mine, finished_at=2000.0))

    asyncio.run(fill())
    assert cache.kept("a", "someone else", 0.0) is None
    assert cache.kept("a", "me", 0.0) == (mine, (b"{", b"body}"))
    assert cache.kept("a", "me", expired_before=1500.0) is None  # expired: let go
    assert cache.kept("a", "me", 0.0) is None
    assert cache.size_bytes == len(b"{body}")
    assert cache.kept("b", "me", 1500.0) is not None
