"""The HTTP API's names, written once: route paths and the key header.

Used by the routes, the Python client and the tests; it imports nothing, so
any layer (the command line included) can use it without loading the server.
Paths with ``{name}`` take that part of the URL as a parameter.
"""

from __future__ import annotations

#: The header that carries the caller's API key.
API_KEY_HEADER = "Integrations-API-Key"

HEALTH = "/health"
#: The web page, and the files it loads by name (``web/static/``); no key needed.
PAGE = "/"
PAGE_FILE = "/page/{name}"
#: The OpenAPI document of this API, and the page that shows it.
OPENAPI = "/openapi.json"
DOCS = "/docs"
EXECUTE_BATCH = "/experience/batch_execution/execute_batch/invoke"
PROCESS_CSV = "/system/batch_execution/process_csv/invoke"
UPLOAD = "/system/batch_execution/upload/invoke"
#: Checks a spreadsheet as ``UPLOAD`` would, running and storing nothing.
VALIDATE = "/system/batch_execution/validate"
RESULTS = "/system/batch_execution/results"
CANCEL = "/system/batch_execution/cancel"
RETRY = "/system/batch_execution/retry"
BATCHES = "/system/batch_execution/batches"
MODELS = "/system/batch_execution/models"
#: Followed by the invocation id.
EVENTS = "/system/batch_execution/events/{invocation_id}"
#: A workbook, by its file name.
DOWNLOAD = "/public/batch_execution_results/{file_name}"
#: The app's Prometheus metrics.
METRICS = "/metrics"

#: The OpenAI Batch API (``web/v1``): OpenAI's paths, ``Authorization: Bearer`` keys.
V1_FILES = "/v1/files"
V1_FILE = "/v1/files/{file_id}"
V1_FILE_CONTENT = "/v1/files/{file_id}/content"
V1_BATCHES = "/v1/batches"
V1_BATCH = "/v1/batches/{batch_id}"
V1_BATCH_CANCEL = "/v1/batches/{batch_id}/cancel"


def events_path(invocation_id: str) -> str:
    """The events route of one batch."""
    return EVENTS.format(invocation_id=invocation_id)


def page_path(name: str) -> str:
    """The route of one file of the web page."""
    return PAGE_FILE.format(name=name)


def download_path(file_name: str) -> str:
    """The download route of one workbook (``file_name`` quoted by the caller if needed)."""
    return DOWNLOAD.format(file_name=file_name)
