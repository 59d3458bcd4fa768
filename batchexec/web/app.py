"""The application factory and the lifetimes of its long-lived objects."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import aiohttp
from aiohttp import web

from batchexec.catalog import Catalog
from batchexec.config import Settings
from batchexec.engine import Engine
from batchexec.errors import ConfigError, ProviderError
from batchexec.providers import BUILTIN_PROVIDERS, Provider, build_providers
from batchexec.providers.openai import discover_models
from batchexec.registry import Registry
from batchexec.web.keys import CATALOG, CLIENT_SESSION, ENGINE, PROVIDERS, REGISTRY, SETTINGS
from batchexec.web.middlewares import auth_middleware, error_middleware
from batchexec.web.routes import setup_routes

log = logging.getLogger(__name__)

#: Outbound HTTP: connections per host stay modest so one provider can't take them all.
_CONNECTOR_LIMIT = 200
_MAX_SWEEP_PERIOD_S = 60.0
_CONNECTOR_LIMIT_PER_HOST = 64


def create_app(
    settings: Settings | None = None, *, extra_providers: Sequence[type[Provider]] = ()
) -> web.Application:
    """The batchexec aiohttp application, ready to run or to mount with ``add_subapp``.

    ``extra_providers`` adds provider classes beside the built-in ones (or
    replaces one of the same ``name``). Raises ``ConfigError`` when the model
    catalog is invalid or names a provider that does not exist.
    """
    settings = settings or Settings()
    catalog = Catalog.load(settings.models_path)
    provider_classes = {cls.name: cls for cls in (*BUILTIN_PROVIDERS, *extra_providers)}
    for model in catalog.models:
        if model.provider not in provider_classes:
            known = ", ".join(sorted(provider_classes))
            raise ConfigError(
                f"model {model.name!r}: unknown provider {model.provider!r} (known: {known})"
            )

    app = web.Application(
        client_max_size=settings.max_body_bytes,
        middlewares=[error_middleware, auth_middleware],
    )
    app[SETTINGS] = settings
    app[CATALOG] = catalog
    app[REGISTRY] = Registry()

    async def client_session(app: web.Application) -> AsyncIterator[None]:
        connector = aiohttp.TCPConnector(
            limit=_CONNECTOR_LIMIT, limit_per_host=_CONNECTOR_LIMIT_PER_HOST
        )
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=30)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            app[CLIENT_SESSION] = session
            providers = build_providers(settings, session)
            providers.update({cls.name: cls(settings, session) for cls in extra_providers})
            app[PROVIDERS] = providers
            app[CATALOG] = await _with_discovered_models(catalog, settings, session)
            yield

    async def engine(app: web.Application) -> AsyncIterator[None]:
        providers: dict[str, Provider] = app[PROVIDERS]
        runner = app[ENGINE] = Engine(settings, app[REGISTRY], providers)
        yield
        await runner.close()

    async def drain(app: web.Application) -> None:
        # on_shutdown runs before the server waits for open requests, so event
        # streams see their batches end instead of being cut off.
        await app[ENGINE].drain(settings.shutdown_grace_s)

    app.cleanup_ctx.append(client_session)
    app.cleanup_ctx.append(engine)
    app.cleanup_ctx.append(_sweeper)
    app.on_shutdown.append(drain)
    setup_routes(app)
    return app


async def _with_discovered_models(
    catalog: Catalog, settings: Settings, session: aiohttp.ClientSession
) -> Catalog:
    """The catalog plus the models ``OPENAI_BASE_URL`` lists; a failed listing only warns."""
    try:
        models = await discover_models(settings, session)
    except ProviderError as exc:
        log.warning("OPENAI_BASE_URL: could not list its models: %s", exc)
        return catalog
    if models:
        log.info("OPENAI_BASE_URL lists %d models", len(models))
    return catalog.with_models(models)


async def _sweeper(app: web.Application) -> AsyncIterator[None]:
    """Removes finished batches and their workbooks once ``RESULTS_TTL_HOURS`` have passed."""
    settings = app[SETTINGS]
    task = asyncio.create_task(_sweep_forever(app[REGISTRY], settings), name="results-sweeper")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _sweep_forever(registry: Registry, settings: Settings) -> None:
    ttl_s = settings.results_ttl_s
    # Often enough that nothing outlives its TTL by more than a quarter of it.
    period_s = min(max(ttl_s / 4, 0.05), _MAX_SWEEP_PERIOD_S)
    while True:
        await asyncio.sleep(period_s)
        try:
            expired = registry.expire(older_than=time.time() - ttl_s)
            if expired:
                await asyncio.to_thread(_delete, settings.results_dir, expired)
                log.info("removed %d expired result files", len(expired))
        except Exception:
            log.exception("results sweeper failed; trying again next round")


def _delete(folder: Path, names: list[str]) -> None:
    for name in names:
        (folder / name).unlink(missing_ok=True)
