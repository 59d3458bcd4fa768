"""Prometheus metrics: what the ``Metrics`` hooks report, counted in a registry of the app's own.

Each ``PrometheusMetrics`` has its own ``CollectorRegistry`` (never the
library's global one), so tests and several apps in one process keep apart.
What changes on every submission or slot (batches queued or running) is read
from the engine's registry when scraped (``watch``), not counted as it changes.
Only the server loads this module: the command line never pays for the library.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from types import TracebackType
from typing import get_args

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import GaugeMetricFamily, Metric

from batchexec.errors import RetryableProviderError
from batchexec.metrics import Metrics, WebhookOutcome
from batchexec.records import BatchStatus, ExecutionStatus

#: Model calls take from a fraction of a second to EXECUTION_TIMEOUT (300 s by default).
_CALL_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)
#: A group commit takes about a millisecond on a local disk; a slow one is what to see.
_STORE_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
#: Changes a group commit writes: one, or a thousand rows that ended together.
_GROUP_SIZES = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)
_LIVE_STATUSES = (BatchStatus.QUEUED, BatchStatus.PROCESSING)


class PrometheusMetrics(Metrics):
    """Counts every hook in ``registry``; ``exposition`` renders it for a scraper."""

    def __init__(self) -> None:
        registry = self.registry = CollectorRegistry()
        self._batches_ended = Counter(
            "batchexec_batches_ended",
            "Batches that ended, by status.",
            ["status"],
            registry=registry,
        )
        for status in BatchStatus:
            if status.finished:
                self._batches_ended.labels(status.value)  # shown as 0 before the first end
        self._executions_ended = Counter(
            "batchexec_executions_ended",
            "Executions (rows) that ended, by status and model.",
            ["status", "model"],
            registry=registry,
        )
        self._call_seconds = Histogram(
            "batchexec_provider_call_duration_seconds",
            "Provider calls (each try of an execution), by model, provider and outcome.",
            ["model", "provider", "outcome"],
            buckets=_CALL_BUCKETS_S,
            registry=registry,
        )
        self._in_flight = Gauge(
            "batchexec_provider_calls_in_flight",
            "Provider calls awaiting their answer, by model and provider.",
            ["model", "provider"],
            registry=registry,
        )
        self._retries = Counter(
            "batchexec_retries",
            "Provider calls made again after a retryable error, by model.",
            ["model"],
            registry=registry,
        )
        self._store_seconds = Histogram(
            "batchexec_store_write_duration_seconds",
            "Group commits: time the store took to write one group of changes.",
            buckets=_STORE_BUCKETS_S,
            registry=registry,
        )
        self._store_changes = Histogram(
            "batchexec_store_write_changes",
            "Group commits: changes written in one transaction.",
            buckets=_GROUP_SIZES,
            registry=registry,
        )
        self._webhooks = Counter(
            "batchexec_webhook_attempts",
            "Completion webhook attempts, by outcome (delivered, retried, failed: given up).",
            ["outcome"],
            registry=registry,
        )
        for outcome in get_args(WebhookOutcome):
            self._webhooks.labels(outcome)
        #: Each series a row's end or call counts in, by its labels: ``labels()`` looks
        #: them up at a cost that every row would pay. Models come from the catalog,
        #: so these stay as small as it.
        self._ended_by: dict[tuple[ExecutionStatus, str], Counter] = {}
        self._calls_by: dict[tuple[str, str], _CallSeries] = {}
        self._live = _LiveBatches()
        registry.register(self._live)
        ProcessCollector(registry=registry)

    def watch(
        self, active: Callable[[], Mapping[BatchStatus, int]], queued: Callable[[], int]
    ) -> None:
        """Read, at each scrape, the batches unfinished by status and those waiting for a slot."""
        self._live.active = active
        self._live.queued = queued

    def exposition(self, accept: str | None) -> tuple[bytes, str]:
        """Every metric, and its content type, in the format ``accept`` asks for
        (OpenMetrics, or Prometheus' text format by default)."""
        encode, content_type = choose_encoder(accept or "")
        return encode(self.registry), content_type

    def batch_ended(self, status: BatchStatus) -> None:
        self._batches_ended.labels(status.value).inc()

    def execution_ended(self, status: ExecutionStatus, model: str) -> None:
        counter = self._ended_by.get((status, model))
        if counter is None:
            counter = self._ended_by[status, model] = self._executions_ended.labels(
                status.value, model
            )
        counter.inc()

    def call(self, model: str, provider: str) -> AbstractContextManager[None]:
        series = self._calls_by.get((model, provider))
        if series is None:
            series = self._calls_by[model, provider] = _CallSeries(
                self._in_flight.labels(model, provider),
                lambda outcome: self._call_seconds.labels(model, provider, outcome),
            )
        return _Call(series)

    def retry(self, model: str) -> None:
        self._retries.labels(model).inc()

    def store_write(self, seconds: float, changes: int) -> None:
        self._store_seconds.observe(seconds)
        self._store_changes.observe(changes)

    def webhook(self, outcome: WebhookOutcome) -> None:
        self._webhooks.labels(outcome).inc()


@dataclass(frozen=True, slots=True)
class _CallSeries:
    """The series of one model and provider's calls: in flight, and timed by outcome
    (each made by ``timed`` when a call first ends so)."""

    in_flight: Gauge
    timed: Callable[[str], Histogram]
    seconds: dict[str, Histogram] = field(default_factory=dict)

    def of(self, outcome: str) -> Histogram:
        series = self.seconds.get(outcome)
        if series is None:
            series = self.seconds[outcome] = self.timed(outcome)
        return series


class _Call:
    """Held around one provider call: counted in flight, then timed by how it ended."""

    __slots__ = ("_series", "_started_s")

    def __init__(self, series: _CallSeries) -> None:
        self._series = series
        self._started_s = 0.0

    def __enter__(self) -> None:
        self._series.in_flight.inc()
        self._started_s = time.perf_counter()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        elapsed_s = time.perf_counter() - self._started_s
        self._series.in_flight.dec()
        if kind is None:
            outcome = "ok"
        elif issubclass(kind, RetryableProviderError):
            outcome = "retryable_error"
        elif issubclass(kind, asyncio.CancelledError):
            # Cut off by the execution timeout, a cancel or a shutdown.
            outcome = "cancelled"
        else:
            outcome = "error"
        self._series.of(outcome).observe(elapsed_s)


class _LiveBatches:
    """The collector of what is read when scraped: batches unfinished, and waiting for a slot."""

    def __init__(self) -> None:
        self.active: Callable[[], Mapping[BatchStatus, int]] = dict
        self.queued: Callable[[], int] = int

    def describe(self) -> Iterable[Metric]:
        # Names only, so the registry can check them without reading the engine.
        return _live_families({}, 0)

    def collect(self) -> Iterable[Metric]:
        return _live_families(self.active(), self.queued())


def _live_families(active: Mapping[BatchStatus, int], queued: int) -> list[Metric]:
    batches = GaugeMetricFamily(
        "batchexec_batches_active",
        "Batches this process holds unfinished, by status.",
        labels=["status"],
    )
    for status in _LIVE_STATUSES:
        batches.add_metric([status.value], active.get(status, 0))
    depth = GaugeMetricFamily(
        "batchexec_queue_depth",
        "Batches accepted by this process and waiting for a batch slot (MAX_CONCURRENT_BATCHES).",
        value=queued,
    )
    return [batches, depth]
