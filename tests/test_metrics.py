"""``GET /metrics``: what the hooks count, read back through a Prometheus text parser."""

from __future__ import annotations

from typing import Any
from unittest import mock

import prometheus_client
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, make_mocked_request
from prometheus_client.parser import text_string_to_metric_families

from batchexec import create_app
from batchexec.api import API_KEY_HEADER, METRICS
from batchexec.catalog import ModelSpec
from batchexec.errors import RetryableProviderError
from batchexec.providers import ChatRequest, Completion, Provider
from batchexec.web.keys import ENGINE
from batchexec.web.middlewares import auth_middleware
from tests.fakes import GatedProvider
from tests.helpers import API_KEY, AUTH, finished, gated, submit

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
#: The labels of the gated test model's calls.
GATED = {"model": "gated", "provider": "gated"}


async def scrape(client: TestClient[Any, Any], headers: dict[str, str] = AUTH) -> Samples:
    """Every sample of ``GET /metrics``, as a Prometheus text parser reads them."""
    response = await client.get(METRICS, headers=headers)
    assert response.status == 200, await response.text()
    assert response.content_type == "text/plain"
    samples: Samples = {}
    for family in text_string_to_metric_families(await response.text()):
        for sample in family.samples:
            samples[sample.name, frozenset(sample.labels.items())] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[name, frozenset(labels.items())]


async def test_after_a_batch_the_metrics_show_its_counts_and_call_latencies(make_client):
    client = await make_client()
    invocation_id = await submit(
        client,
        [{"prompt": "hello", "model": "gated"}, {"prompt": "fail: no", "model": "gated"}],
    )
    gated(client).open()
    await finished(client, invocation_id)

    samples = await scrape(client)
    executions = "batchexec_executions_ended_total"
    assert value(samples, executions, status="succeeded", model="gated") == 1
    assert value(samples, executions, status="failed", model="gated") == 1
    assert value(samples, "batchexec_batches_ended_total", status="completed") == 1
    assert value(samples, "batchexec_batches_ended_total", status="failed") == 0
    calls = "batchexec_provider_call_duration_seconds"
    for outcome in ("ok", "error"):
        labels = {**GATED, "outcome": outcome}
        assert value(samples, f"{calls}_count", **labels) == 1
        assert value(samples, f"{calls}_bucket", **labels, le="+Inf") == 1
        assert value(samples, f"{calls}_sum", **labels) >= 0
    assert value(samples, "batchexec_provider_calls_in_flight", **GATED) == 0
    # SQLite (the default store): the batch's and rows' starts and ends went through group commits.
    assert value(samples, "batchexec_store_write_duration_seconds_count") >= 1
    assert value(samples, "batchexec_store_write_changes_sum") >= 6
    assert value(samples, "batchexec_batches_active", status="queued") == 0
    assert value(samples, "batchexec_batches_active", status="processing") == 0
    assert value(samples, "batchexec_queue_depth") == 0


async def test_queued_and_running_batches_and_calls_in_flight_are_read_when_scraped(make_client):
    client = await make_client(max_concurrent_batches=1)
    running = await submit(client, [{"prompt": "first", "model": "gated"}])
    waiting = await submit(client, [{"prompt": "second", "model": "gated"}])
    await gated(client).wait_started(1)

    samples = await scrape(client)
    assert value(samples, "batchexec_batches_active", status="processing") == 1
    assert value(samples, "batchexec_batches_active", status="queued") == 1
    assert value(samples, "batchexec_queue_depth") == 1
    assert value(samples, "batchexec_provider_calls_in_flight", **GATED) == 1

    await client.app[ENGINE].cancel(running)
    gated(client).open()
    await finished(client, waiting)
    samples = await scrape(client)
    assert value(samples, "batchexec_batches_ended_total", status="cancelled") == 1
    assert value(samples, "batchexec_batches_ended_total", status="completed") == 1
    ended = "batchexec_executions_ended_total"
    assert value(samples, ended, status="cancelled", model="gated") == 1
    assert value(samples, ended, status="succeeded", model="gated") == 1
    cut_off = {**GATED, "outcome": "cancelled"}
    assert value(samples, "batchexec_provider_call_duration_seconds_count", **cut_off) == 1
    assert value(samples, "batchexec_batches_active", status="processing") == 0
    assert value(samples, "batchexec_queue_depth") == 0


class FlakyProvider(Provider):
    """Rate limited on each prompt's first call, then answers."""

    name = "flaky"

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.seen: set[str] = set()

    async def complete(self, model: ModelSpec, request: ChatRequest) -> Completion:
        if request.prompt not in self.seen:
            self.seen.add(request.prompt)
            raise RetryableProviderError("busy", status=429, retry_after_s=0)
        return Completion(text="fine")


async def test_retries_are_counted_by_model(make_client, make_settings, tmp_path):
    catalog = tmp_path / "flaky.toml"
    catalog.write_text('[models."flaky"]\nprovider = "flaky"\n')
    client = await make_client(make_settings(models_path=catalog), extra_providers=[FlakyProvider])
    invocation_id = await submit(client, [{"prompt": "hi", "model": "flaky"}])
    body = await finished(client, invocation_id)
    assert body["executions"][0]["attempts"] == 2

    samples = await scrape(client)
    assert value(samples, "batchexec_retries_total", model="flaky") == 1
    calls = "batchexec_provider_call_duration_seconds_count"
    labels = {"model": "flaky", "provider": "flaky"}
    assert value(samples, calls, **labels, outcome="retryable_error") == 1
    assert value(samples, calls, **labels, outcome="ok") == 1


async def test_metrics_need_the_key(make_client):
    client = await make_client()
    assert (await client.get(METRICS)).status == 401
    assert (await client.get(METRICS, headers={API_KEY_HEADER: "not-a-key"})).status == 401
    # What a Prometheus scrape config's `authorization` sends.
    bearer = await client.get(METRICS, headers={"Authorization": f"Bearer {API_KEY}"})
    assert bearer.status == 200
    wrong = await client.get(METRICS, headers={"Authorization": "Bearer not-a-key"})
    assert wrong.status == 401


async def test_bearer_keys_open_only_the_metrics(make_client):
    client = await make_client()
    response = await client.get(
        "/system/batch_execution/batches", headers={"Authorization": f"Bearer {API_KEY}"}
    )
    assert response.status == 401


async def test_metrics_open_needs_no_key_from_a_loopback_address(make_client):
    client = await make_client(metrics_open=True)
    await scrape(client, headers={})
    # Only the metrics are open.
    assert (await client.get("/system/batch_execution/batches")).status == 401


@pytest.mark.parametrize(
    ("peer", "status"),
    [
        ("127.0.0.1", 200),
        ("::1", 200),
        ("::ffff:127.0.0.1", 200),
        ("192.0.2.7", 401),
        ("::ffff:192.0.2.7", 401),
        ("2001:db8::1", 401),
    ],
)
async def test_metrics_open_is_for_loopback_peers_only(make_settings, peer, status):
    app = create_app(make_settings(metrics_open=True), extra_providers=[GatedProvider])
    transport = mock.Mock()
    transport.get_extra_info.side_effect = lambda name, default=None: (
        (peer, 40000) if name == "peername" else default
    )
    request = make_mocked_request("GET", METRICS, app=app, transport=transport)
    route: Any = request.match_info.route  # a Mock: named as the router names it
    route.resource.name = "metrics"

    async def handler(request: web.Request) -> web.Response:
        return web.Response(text="metrics")

    try:
        response = await auth_middleware(request, handler)
    except web.HTTPUnauthorized:
        assert status == 401
    else:
        assert (status, response.status) == (200, 200)


async def test_each_app_keeps_its_own_registry(make_client):
    busy = await make_client(database_url="memory://")
    idle = await make_client(database_url="memory://")
    await finished(busy, await submit(busy, [{"prompt": "hi", "model": "echo"}]))

    ended = "batchexec_executions_ended_total"
    assert value(await scrape(busy), ended, status="succeeded", model="echo") == 1
    assert (ended, frozenset({("status", "succeeded"), ("model", "echo")})) not in await scrape(
        idle
    )
    assert prometheus_client.REGISTRY.get_sample_value("batchexec_queue_depth") is None


async def test_openmetrics_is_answered_when_asked_for(make_client):
    client = await make_client()
    response = await client.get(
        METRICS, headers={**AUTH, "Accept": "application/openmetrics-text; version=1.0.0"}
    )
    assert response.status == 200
    assert response.content_type == "application/openmetrics-text"
    assert (await response.text()).endswith("# EOF\n")
