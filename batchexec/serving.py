"""The server process: the app of ``create_app`` on a socket until a signal stops it.

What ``python -m batchexec serve`` runs; it sits beside the command line
(``batchexec.cli``) rather than in it, so that no command but this one loads
the web layer. SIGTERM or SIGINT drain the engine with the socket still
open; a second signal cancels what is left.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import logging
import os
import signal
import sys

from aiohttp import web

from batchexec import logs
from batchexec.catalog import Catalog
from batchexec.cli.exits import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from batchexec.config import DEV_API_KEY, Settings, load_settings
from batchexec.engine import Engine
from batchexec.errors import ConfigError
from batchexec.providers import anthropic, openai, watsonx
from batchexec.store import StoreError
from batchexec.web.app import create_app
from batchexec.web.keys import CATALOG, ENGINE
from batchexec.web.server import JSONErrorAppRunner

log = logging.getLogger("batchexec")

_REQUEST_DRAIN_S = 5.0
#: How long an idle keep-alive connection stays open (``web.run_app``'s default).
_KEEPALIVE_S = 75.0
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_SWITCH_INTERVAL_S = 0.0005
#: The cyclic collector's thresholds (CPython's are 700, 10, 10). A batch of
#: 100,000 rows makes millions of objects that live as long as it does; at
#: CPython's, the collector went through every one of them several times a
#: second, holding the interpreter lock 40-200 ms each time (measured with
#: ``gc.callbacks`` during ``make bench``'s responsive-health). With these, the
#: youngest generation is collected every 10,000 net allocations (about a
#: millisecond), the middle one holds at most 30,000 objects (2-3 ms; at 10
#: rather than 2 it held 110,000, 6-10 ms each time a large request was
#: validated), and a full collection waits for about 15,000,000 allocations
#: (501 middle-generation collections of 3 young ones of 10,001). Each
#: object is walked as often either way: once young, once in the middle.
_GC_THRESHOLDS = (10_000, 2, 500)
#: glibc's ``M_ARENA_MAX`` (``malloc.h``), and the arenas the server's threads share.
_M_ARENA_MAX = -8
_MALLOC_ARENAS = 2


def share_malloc_arenas() -> bool:
    """Cap glibc's malloc at ``_MALLOC_ARENAS`` arenas, unless ``MALLOC_ARENA_MAX`` says
    otherwise; whether the cap was set. Call before any thread starts.

    glibc gives each new thread an arena of its own, up to eight a core, and
    keeps what a thread freed there for that arena. A workbook or a results
    answer built on a worker thread of ``asyncio.to_thread`` then leaves
    memory that the next one, on another thread, does not reuse. Measured
    with ``make bench``'s store-memory, 10,000-row batches run back to back,
    each one's workbook written while the next ran: the server's RSS went
    from 79 MB after 1 batch to 95-98 after 50 (1.20-1.24 x, three runs);
    capped, to 92.5-93.5 (1.18-1.20 x), as ``MALLOC_ARENA_MAX=2`` does.
    Python's own small objects do not use these arenas, so the threads
    rarely wait for each other's. Elsewhere (musl, macOS) nothing is done.
    """
    if "MALLOC_ARENA_MAX" in os.environ or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return bool(mallopt(_M_ARENA_MAX, _MALLOC_ARENAS))


def serve(*, host: str | None = None, port: int | None = None) -> int:
    """Start the server and block until it is stopped by SIGINT or SIGTERM."""
    # Workbooks, results and uploads are made in worker threads; while one
    # runs Python, the event loop waits for the interpreter lock up to this
    # long each time (CPython's default is 5 ms, which a request needing a
    # few turns of the lock feels as tens of milliseconds).
    sys.setswitchinterval(_SWITCH_INTERVAL_S)
    gc.set_threshold(*_GC_THRESHOLDS)
    share_malloc_arenas()
    overrides = {
        name: value for name, value in (("host", host), ("port", port)) if value is not None
    }
    try:
        settings = load_settings(**overrides)
        app = create_app(settings)
    except ConfigError as exc:
        print(f"batchexec: {exc}", file=sys.stderr)
        return EXIT_USAGE
    # Once the app is made (it logs nothing before it starts): its catalog names the keys.
    logs.configure(settings.log_format, log_secrets(settings, app[CATALOG]))
    refusal = _refuse_dev_key(settings)
    if refusal:
        print(f"batchexec: {refusal}", file=sys.stderr)
        return EXIT_USAGE

    try:
        return asyncio.run(_serve(app, settings))
    except KeyboardInterrupt:
        # Ctrl-C before the signal handlers were in place: stopped, quietly.
        return EXIT_OK


async def _serve(app: web.Application, settings: Settings) -> int:
    """Serve ``app`` until a signal, keeping the socket open while batches drain.

    ``web.run_app`` closes the socket before ``on_shutdown`` drains the
    engine, so during the grace period clients would get "connection refused"
    instead of 503 with ``Retry-After``. Here the drain comes first, with the
    site still listening; the app's own ``on_shutdown`` drain then finds
    nothing left to do. A second signal cuts the grace period short.
    """
    stopping = asyncio.Event()
    hurrying = asyncio.Event()

    def on_signal() -> None:
        (hurrying if stopping.is_set() else stopping).set()

    loop = asyncio.get_running_loop()
    # Before start-up, so a signal during it is not lost (nor a KeyboardInterrupt).
    for signum in _STOP_SIGNALS:
        loop.add_signal_handler(signum, on_signal)
    runner = JSONErrorAppRunner(
        app,
        # Batches are drained before this; what is left is short requests.
        shutdown_timeout=_REQUEST_DRAIN_S,
        keepalive_timeout=_KEEPALIVE_S,
    )
    try:
        await runner.setup()
    except StoreError as exc:
        # A database file that cannot be used: corrupt, locked, read-only, too new.
        print(f"batchexec: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        site = web.TCPSite(runner, settings.host, settings.port)
        try:
            await site.start()
        except OSError as exc:
            print(
                f"batchexec: cannot listen on {settings.host}:{settings.port}: {exc.strerror}",
                file=sys.stderr,
            )
            return EXIT_FAILED
        _announce(app, settings)
        # What start-up made (modules, the catalog, the app) lives as long as the
        # process: out of the collector's sight, no full collection walks it again.
        gc.collect()
        gc.freeze()
        await stopping.wait()
        log.info(
            "batchexec stopping: new batches get 503; running executions have %g s to finish "
            "(send the signal again to cancel them now)",
            settings.shutdown_grace_s,
        )
        await _drain(app[ENGINE], settings.shutdown_grace_s, hurrying)
    finally:
        await runner.cleanup()
    return EXIT_OK


async def _drain(engine: Engine, grace_s: float, hurrying: asyncio.Event) -> None:
    """``engine.drain(grace_s)``, or ``engine.close()`` as soon as ``hurrying`` is set."""
    draining = asyncio.create_task(engine.drain(grace_s), name="drain")
    hurry = asyncio.create_task(hurrying.wait(), name="hurry")
    try:
        await asyncio.wait({draining, hurry}, return_when=asyncio.FIRST_COMPLETED)
        if not draining.done():
            log.warning("batchexec stopping now: cancelling running executions")
            # Cancels what drain waits for; drain then finishes at once.
            await engine.close()
        await draining
    finally:
        hurry.cancel()


def _announce(app: web.Application, settings: Settings) -> None:
    # Called once the socket is bound, so the line is a promise kept.
    log.info(
        "batchexec listening on http://%s:%d with %d models in the catalog",
        settings.host,
        settings.port,
        len(app[CATALOG].models),
    )
    if settings.uses_dev_key:
        log.warning(
            "accepting the development API key %r: set INTEGRATIONS_API_KEYS before "
            "exposing this server",
            DEV_API_KEY,
        )


def log_secrets(settings: Settings, catalog: Catalog) -> list[str]:
    """What no log line may show: the accepted API keys, and every provider key set."""
    names = {openai.KEY_ENV, watsonx.KEY_ENV, anthropic.KEY_ENV}
    names.update(model.api_key_env for model in catalog.models if model.api_key_env)
    provider_keys = [settings.secret(name) for name in sorted(names)]
    # The development key is no secret: the README prints it, and a warning names it.
    api_keys = [key for key in settings.api_keys if key != DEV_API_KEY]
    return api_keys + [key for key in provider_keys if key]


def _refuse_dev_key(settings: Settings) -> str | None:
    if settings.uses_dev_key and not settings.host_is_loopback:
        return (
            f"refusing to listen on {settings.host} with the development key {DEV_API_KEY!r}: "
            "set INTEGRATIONS_API_KEYS to your own comma-separated keys "
            "(for example INTEGRATIONS_API_KEYS=$(openssl rand -hex 24))"
        )
    return None
