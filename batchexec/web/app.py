"""The application factory and the lifetimes of its long-lived objects."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from aiohttp import web

from batchexec.catalog import Catalog
from batchexec.cluster import Replica, replica_name
from batchexec.config import Settings
from batchexec.engine import Engine
from batchexec.exports import ResultWorkbooks
from batchexec.openai_batches import Finalizer
from batchexec.prometheus import PrometheusMetrics
from batchexec.providers import Provider
from batchexec.registry import Registry
from batchexec.runtime import load_catalog, open_runtime, plan_again, provider_classes
from batchexec.store import SharedStore, store_for
from batchexec.web import page
from batchexec.web.cache import RenderedResults
from batchexec.web.keys import (
    CATALOG,
    CLIENT_SESSION,
    ENGINE,
    INPUT_POOL,
    METRICS,
    PROVIDERS,
    REGISTRY,
    REPLICA,
    RESULT_WORKBOOKS,
    RESULTS_CACHE,
    SETTINGS,
    V1_INTAKE,
    WORKBOOKS,
)
from batchexec.web.middlewares import auth_middleware, error_middleware
from batchexec.web.readers import WorkbookReader
from batchexec.web.routes import setup_routes
from batchexec.webhooks import Webhooks
from batchexec.wording import counted

log = logging.getLogger(__name__)

_MAX_SWEEP_PERIOD_S = 60.0
#: Seconds a model call's slot outlives EXECUTION_TIMEOUT when its replica dies holding it.
_SLOT_MARGIN_S = 30.0
_INPUT_THREADS = 2


def create_app(
    settings: Settings | None = None, *, extra_providers: Sequence[type[Provider]] = ()
) -> web.Application:
    """The batchexec aiohttp application, ready to run or to mount with ``add_subapp``.

    ``extra_providers`` adds provider classes beside the built-in ones (or
    replaces one of the same ``name``). Raises ``ConfigError`` when the model
    catalog is invalid or names a provider that does not exist.
    """
    settings = settings or Settings()
    catalog = load_catalog(settings, provider_classes(extra_providers))

    app = web.Application(
        client_max_size=settings.max_body_bytes,
        middlewares=[error_middleware, auth_middleware],
    )
    app[SETTINGS] = settings
    app[CATALOG] = catalog
    store = store_for(
        settings.database_url, replica=replica_name(), pool_size=settings.database_pool_size
    )
    metrics = app[METRICS] = PrometheusMetrics()
    registry = app[REGISTRY] = Registry(
        store, cache_bytes=settings.batch_cache_bytes, metrics=metrics
    )
    app[RESULTS_CACHE] = RenderedResults(settings.results_cache_bytes)

    async def open_store(app: web.Application) -> AsyncIterator[None]:
        # Raises StoreError, naming DATABASE_URL, for a file that cannot be used.
        await registry.store.open()
        await registry.start()
        yield
        await registry.close()
        await registry.store.close()

    async def client_session(app: web.Application) -> AsyncIterator[None]:
        async with open_runtime(settings, catalog, extra_providers) as runtime:
            app[CLIENT_SESSION] = runtime.session
            app[PROVIDERS] = runtime.providers
            app[CATALOG] = runtime.catalog
            yield

    async def engine(app: web.Application) -> AsyncIterator[None]:
        providers: dict[str, Provider] = app[PROVIDERS]
        workbooks = app[RESULT_WORKBOOKS] = ResultWorkbooks(
            settings.results_dir, registry.get, app[CATALOG].currency
        )
        limits = None
        tokens = None
        if isinstance(store, SharedStore):
            # A call never outlasts EXECUTION_TIMEOUT: a dead replica's slots free after it.
            hold_s = settings.execution_timeout_s + _SLOT_MARGIN_S
            limits = store.call_limits(hold_s=hold_s)
            await limits.start()
            tokens = store.token_limits(window_s=settings.tpm_window_s, hold_s=hold_s)
        registry.batch_ended_listeners.append(workbooks.batch_ended)
        runner = app[ENGINE] = Engine(
            settings,
            registry,
            providers,
            outputs=workbooks.writer(),
            limits=limits,
            tokens=tokens,
            log_failed_rows=True,
        )
        metrics.watch(registry.active_counts, runner.queued)
        catalog = app[CATALOG]
        replica = None
        if isinstance(store, SharedStore):
            # Batches are claimed from the shared store, by this replica or another.
            replica = app[REPLICA] = Replica(
                store,
                registry,
                runner,
                lambda batch: plan_again(batch, catalog, settings),
                lease_s=settings.lease_s,
            )
            await replica.start()
        else:
            await _resume(registry, runner, catalog, settings)
        yield
        await runner.close()
        if replica is not None:
            await registry.flush()
            await replica.close()  # what is left here, others take over at once
        if limits is not None:
            await limits.close()
        # Written before the store closes; a process killed first has them made on download.
        # The ends recorded by the engine's close are shown first: each starts its write.
        await registry.flush()
        await workbooks.idle()
        registry.batch_ended_listeners.remove(workbooks.batch_ended)

    async def drain(app: web.Application) -> None:
        # on_shutdown runs before the server waits for open requests, so event
        # streams see their batches end instead of being cut off.
        replica = app.get(REPLICA)
        if replica is not None:
            await replica.stop_claiming()
        await app[ENGINE].drain(settings.shutdown_grace_s)

    app.cleanup_ctx.append(_input_pool)
    app.cleanup_ctx.append(open_store)
    app.cleanup_ctx.append(client_session)
    app.cleanup_ctx.append(engine)
    app.cleanup_ctx.append(_sweeper)
    app.cleanup_ctx.append(_webhooks)
    app.cleanup_ctx.append(_openai_files)
    app.on_shutdown.append(drain)
    setup_routes(app)
    page.setup(app)
    return app


async def _resume(registry: Registry, engine: Engine, catalog: Catalog, settings: Settings) -> None:
    """Run to their end the batches a previous process left queued or running."""
    for batch in await registry.resumable():
        engine.resume_stored(batch, lambda batch: plan_again(batch, catalog, settings))


async def _input_pool(app: web.Application) -> AsyncIterator[None]:
    """The threads that read uploaded files.

    Their own pool, of ``_INPUT_THREADS``: however many uploads arrive, the
    default pool's threads stay free to write batches' outputs. Each read is
    bounded by ``PARSE_TIMEOUT_S``, so a queue here drains.
    """
    pool = app[INPUT_POOL] = ThreadPoolExecutor(_INPUT_THREADS, thread_name_prefix="input")
    app[V1_INTAKE] = asyncio.Semaphore(_INPUT_THREADS)
    workbooks = app[WORKBOOKS] = WorkbookReader(app[SETTINGS])
    yield
    pool.shutdown(wait=False, cancel_futures=True)
    workbooks.close()


async def _sweeper(app: web.Application) -> AsyncIterator[None]:
    """Removes finished batches and their workbooks once ``RESULTS_TTL_HOURS`` have passed."""
    settings = app[SETTINGS]
    task = asyncio.create_task(_sweep_forever(app[REGISTRY], settings), name="results-sweeper")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _webhooks(app: web.Application) -> AsyncIterator[None]:
    """Sends the completion webhooks of ended batches, when ``CALLBACK_ALLOW`` turns them on."""
    settings = app[SETTINGS]
    if not settings.callbacks:
        yield
        return
    registry = app[REGISTRY]
    webhooks = Webhooks(registry.store, app[CLIENT_SESSION], settings, metrics=app[METRICS])
    registry.batch_ended_listeners.append(webhooks.batch_ended)
    await webhooks.start()
    yield
    registry.batch_ended_listeners.remove(webhooks.batch_ended)
    await webhooks.close()


async def _openai_files(app: web.Application) -> AsyncIterator[None]:
    """Writes the output and error files of the OpenAI Batch API's ended batches."""
    registry = app[REGISTRY]
    finalizer = Finalizer(registry, app[ENGINE].cancel)
    registry.batch_ended_listeners.append(finalizer.batch_ended)
    await finalizer.start()
    yield
    registry.batch_ended_listeners.remove(finalizer.batch_ended)
    await finalizer.close()


async def _sweep_forever(registry: Registry, settings: Settings) -> None:
    ttl_s = settings.results_ttl_s
    # Often enough that nothing outlives its TTL by more than a quarter of it.
    period_s = min(max(ttl_s / 4, 0.05), _MAX_SWEEP_PERIOD_S)
    while True:
        await asyncio.sleep(period_s)
        try:
            older_than = time.time() - ttl_s
            expired = await registry.expire(older_than=older_than)
            if expired:
                await asyncio.to_thread(_delete, settings.results_dir, expired)
                log.info("removed %s", counted(len(expired), "expired result file"))
            if registry.shared:
                # The store names an expired file to one replica only; a workbook made
                # again on another replica's disk goes by its age.
                await asyncio.to_thread(_delete_older, settings.results_dir, older_than)
        except Exception:
            log.exception("results sweeper failed; trying again next round")


def _delete(folder: Path, names: list[str]) -> None:
    for name in names:
        (folder / name).unlink(missing_ok=True)


def _delete_older(folder: Path, older_than: float) -> None:
    """Remove the workbooks in ``folder`` last written before ``older_than`` (epoch seconds)."""
    if not folder.is_dir():
        return
    for path in folder.glob("*.xlsx"):
        with contextlib.suppress(OSError):
            if path.stat().st_mtime < older_than:
                path.unlink()
