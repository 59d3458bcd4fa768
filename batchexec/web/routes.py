"""The route table."""

from __future__ import annotations

from aiohttp import web

from batchexec import api
from batchexec.web import downloads, handlers, metrics, uploads


def setup_routes(app: web.Application) -> None:
    """Add every route of the HTTP API to ``app``."""
    router = app.router
    router.add_get(api.HEALTH, handlers.health, name="health")
    router.add_post(api.PROCESS_CSV, uploads.process_csv)
    router.add_post(api.UPLOAD, uploads.upload)
    router.add_post(api.EXECUTE_BATCH, handlers.execute_batch)
    router.add_post(api.RESULTS, handlers.results)
    router.add_post(api.RESULTS + "/", handlers.results)
    router.add_get(api.DOWNLOAD, downloads.download, name="download")
    router.add_get(api.MODELS, handlers.models)
    router.add_get(api.EVENTS, handlers.events)
    router.add_post(api.CANCEL, handlers.cancel)
    router.add_post(api.RETRY, handlers.retry)
    router.add_get(api.BATCHES, handlers.batches)
    router.add_get(api.METRICS, metrics.metrics, name="metrics")
