"""The route table.

Each route's name is its ``operationId`` in the OpenAPI document
(``openapi.OPERATIONS``), which describes every route listed here.
"""

from __future__ import annotations

from aiohttp import web

from batchexec import api
from batchexec.web import apidocs, downloads, handlers, metrics, openapi, page, uploads
from batchexec.web.v1 import batches as v1_batches
from batchexec.web.v1 import files as v1_files


def setup_routes(app: web.Application) -> None:
    """Add every route of the HTTP API to ``app``."""
    router = app.router
    router.add_get(api.HEALTH, handlers.health, name="health")
    router.add_get(api.OPENAPI, openapi.openapi_json, name="openapi")
    router.add_get(api.DOCS, apidocs.docs, name="docs")
    router.add_get(api.PAGE, page.index, name="page")
    router.add_get(api.PAGE_FILE, page.page_file, name="page_file")
    router.add_post(api.PROCESS_CSV, uploads.process_csv, name="process_csv")
    router.add_post(api.UPLOAD, uploads.upload, name="upload")
    router.add_post(api.VALIDATE, uploads.validate, name="validate")
    router.add_post(api.EXECUTE_BATCH, handlers.execute_batch, name="execute_batch")
    router.add_post(api.RESULTS, handlers.results, name="results")
    router.add_post(api.RESULTS + "/", handlers.results, name="results_slash")
    router.add_get(api.DOWNLOAD, downloads.download, name="download")
    router.add_get(api.MODELS, handlers.models, name="models")
    router.add_get(api.EVENTS, handlers.events, name="events")
    router.add_post(api.CANCEL, handlers.cancel, name="cancel")
    router.add_post(api.RETRY, handlers.retry, name="retry")
    router.add_get(api.BATCHES, handlers.batches, name="batches")
    router.add_get(api.METRICS, metrics.metrics, name="metrics")
    # The OpenAI Batch API: each name starts with v1_, which gives it OpenAI's errors.
    router.add_post(api.V1_FILES, v1_files.create_file, name="v1_files_create")
    router.add_get(api.V1_FILES, v1_files.list_files, name="v1_files_list")
    router.add_get(api.V1_FILE, v1_files.retrieve_file, name="v1_files_retrieve")
    router.add_delete(api.V1_FILE, v1_files.delete_file, name="v1_files_delete")
    router.add_get(api.V1_FILE_CONTENT, v1_files.file_content, name="v1_files_content")
    router.add_post(api.V1_BATCHES, v1_batches.create_batch, name="v1_batches_create")
    router.add_get(api.V1_BATCHES, v1_batches.list_batches, name="v1_batches_list")
    router.add_get(api.V1_BATCH, v1_batches.retrieve_batch, name="v1_batches_retrieve")
    router.add_post(api.V1_BATCH_CANCEL, v1_batches.cancel_batch, name="v1_batches_cancel")
