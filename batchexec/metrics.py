"""The hook points where batchexec reports what it does, for metrics to count.

The registry, the executor and the group commits call a ``Metrics`` at the
few places worth counting: a batch's end, a row's end, a provider call, a
retry, a store write, a webhook attempt. This base class counts nothing, and is what they get
unless given another, so the command line and an engine embedded without
metrics pay a method call and no metrics library.
``prometheus.PrometheusMetrics`` counts them for ``GET /metrics``; what is
cheaper to read than to count (batches queued or running) it reads at scrape
time instead.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Literal

from batchexec.records import BatchStatus, ExecutionStatus

#: How a webhook attempt ended: received, to be made again, or the last one failed.
WebhookOutcome = Literal["delivered", "retried", "failed"]

_NOTHING: AbstractContextManager[None] = nullcontext()


class Metrics:
    """Counts nothing; a subclass overrides each hook it counts."""

    def batch_ended(self, status: BatchStatus) -> None:
        """A batch ended as ``status`` (completed, failed or cancelled)."""

    def execution_ended(self, status: ExecutionStatus, model: str) -> None:
        """A row of a batch ended as ``status`` on ``model``."""

    def call(self, model: str, provider: str) -> AbstractContextManager[None]:
        """Held around one provider call: in flight while held, then timed by its outcome."""
        return _NOTHING

    def retry(self, model: str) -> None:
        """A call to ``model`` is made again after a retryable error."""

    def store_write(self, seconds: float, changes: int) -> None:
        """The store wrote a group of ``changes`` in one transaction, taking ``seconds``."""

    def webhook(self, outcome: WebhookOutcome) -> None:
        """An attempt at a completion webhook ended as ``outcome``."""


#: The default of every hook's caller.
NO_METRICS = Metrics()
