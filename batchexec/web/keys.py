"""Every typed key under which the app and its requests keep shared objects."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import aiohttp
from aiohttp import web

from batchexec.catalog import Catalog
from batchexec.cluster import Replica
from batchexec.config import Settings
from batchexec.engine import Engine
from batchexec.exports import ResultWorkbooks
from batchexec.prometheus import PrometheusMetrics
from batchexec.providers import Provider
from batchexec.registry import Registry
from batchexec.web.cache import RenderedResults
from batchexec.web.readers import WorkbookReader

SETTINGS = web.AppKey("settings", Settings)
CATALOG = web.AppKey("catalog", Catalog)
REGISTRY = web.AppKey("registry", Registry)
CLIENT_SESSION = web.AppKey("client_session", aiohttp.ClientSession)
PROVIDERS: web.AppKey[dict[str, Provider]] = web.AppKey("providers")
ENGINE = web.AppKey("engine", Engine)
#: This process's part in a cluster; only with a shared (PostgreSQL) store.
REPLICA = web.AppKey("replica", Replica)
RESULTS_CACHE = web.AppKey("results_cache", RenderedResults)
#: Threads that read uploaded files, apart from those that write outputs.
INPUT_POOL = web.AppKey("input_pool", ThreadPoolExecutor)
#: Held while a ``/v1/batches`` input file is read and checked: a file can be
#: ``MAX_FILE_BYTES``, so only so many are in memory at once.
V1_INTAKE = web.AppKey("v1_intake", asyncio.Semaphore)
#: The worker processes that read uploaded workbooks.
WORKBOOKS = web.AppKey("workbooks", WorkbookReader)

#: The results workbooks: written after their batch ends, or again when gone.
RESULT_WORKBOOKS = web.AppKey("result_workbooks", ResultWorkbooks)

#: The app's metrics, in a Prometheus registry of their own, for ``GET /metrics``.
METRICS = web.AppKey("metrics", PrometheusMetrics)

#: Who is calling: a digest of the API key, so the raw key is never stored.
OWNER = web.RequestKey("owner", str)
