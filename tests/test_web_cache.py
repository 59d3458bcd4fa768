"""Finished batches' results are rendered once, kept by batch within a byte budget."""

from __future__ import annotations

import asyncio

from batchexec.api import RESULTS
from batchexec.web.cache import RenderedResults
from batchexec.web.keys import RESULTS_CACHE
from tests.helpers import AUTH, finished, submit


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
