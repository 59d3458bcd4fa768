"""Finished batches' results are rendered once, per public URL."""

from __future__ import annotations

from batchexec.web.cache import RenderedResults
from batchexec.web.keys import RESULTS_CACHE
from tests.conftest import AUTH, RESULTS, finished, submit


def test_least_recently_used_answer_goes_first():
    cache = RenderedResults(max_entries=2)
    cache.put("a", "http://x", b"A")
    cache.put("b", "http://x", b"B")
    assert cache.get("a", "http://x") == b"A"
    cache.put("c", "http://x", b"C")
    assert cache.get("b", "http://x") is None
    assert cache.get("a", "http://x") == b"A"
    assert cache.get("a", "http://y") is None


async def test_finished_results_are_served_from_the_cache_per_host(make_client):
    client = await make_client()
    invocation_id = await submit(client, [{"prompt": "p", "model": "echo"}])
    first = await finished(client, invocation_id)
    cache = client.app[RESULTS_CACHE]
    cached = cache.get(invocation_id, first["xlsx_url"].rsplit("/", 1)[0] + "/")
    assert cached is not None
    again = await client.post(RESULTS, json={"invocation_id": invocation_id}, headers=AUTH)
    assert await again.read() == cached
    other = await client.post(
        RESULTS,
        json={"invocation_id": invocation_id},
        headers={**AUTH, "Host": "batch.example.com"},
    )
    body = await other.json()
    assert body["xlsx_url"].startswith("http://batch.example.com/public/")
    assert body["csv_content"] == first["csv_content"]
