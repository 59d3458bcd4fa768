"""The route table."""

from __future__ import annotations

from aiohttp import web

from batchexec.web import handlers


def setup_routes(app: web.Application) -> None:
    """Add every route of the HTTP API to ``app``."""
    router = app.router
    router.add_get("/health", handlers.health, name="health")
    router.add_post("/system/batch_execution/process_csv/invoke", handlers.process_csv)
    router.add_post("/system/batch_execution/upload/invoke", handlers.upload)
    router.add_post("/experience/batch_execution/execute_batch/invoke", handlers.execute_batch)
    router.add_post("/system/batch_execution/results", handlers.results)
    router.add_post("/system/batch_execution/results/", handlers.results)
    router.add_get(
        "/public/batch_execution_results/{file_name}", handlers.download, name="download"
    )
    router.add_get("/system/batch_execution/models", handlers.models)
    router.add_get("/system/batch_execution/events/{invocation_id}", handlers.events)
    router.add_post("/system/batch_execution/cancel", handlers.cancel)
    router.add_post("/system/batch_execution/retry", handlers.retry)
    router.add_get("/system/batch_execution/batches", handlers.batches)
