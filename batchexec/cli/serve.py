"""``python -m batchexec serve``: the HTTP server in the foreground."""

from __future__ import annotations

import argparse
import logging
import sys

from aiohttp import web

from batchexec.cli.exits import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from batchexec.cli.options import Commands
from batchexec.config import DEV_API_KEY, Settings, load_settings
from batchexec.errors import ConfigError
from batchexec.web.app import create_app
from batchexec.web.keys import CATALOG

log = logging.getLogger("batchexec")

_REQUEST_DRAIN_S = 5.0


def register(commands: Commands) -> None:
    """Add the ``serve`` command."""
    parser = commands.add_parser(
        "serve",
        help="start the HTTP server (the default)",
        description="Start the HTTP server. HOST and PORT come from the environment or "
        ".env unless given here.",
        epilog="example:\n  python -m batchexec serve --host 127.0.0.1 --port 8080",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--host", help="address to listen on (overrides HOST)")
    parser.add_argument("--port", type=int, help="port to listen on (overrides PORT)")
    parser.set_defaults(handler=command)


def command(args: argparse.Namespace) -> int:
    """Run ``serve`` with parsed ``args``."""
    return serve(host=getattr(args, "host", None), port=getattr(args, "port", None))


def serve(*, host: str | None = None, port: int | None = None) -> int:
    """Start the server and block until it is stopped by SIGINT or SIGTERM."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    overrides = {
        name: value for name, value in (("host", host), ("port", port)) if value is not None
    }
    try:
        settings = load_settings(**overrides)
        app = create_app(settings)
    except ConfigError as exc:
        print(f"batchexec: {exc}", file=sys.stderr)
        return EXIT_USAGE
    refusal = _refuse_dev_key(settings)
    if refusal:
        print(f"batchexec: {refusal}", file=sys.stderr)
        return EXIT_USAGE

    def announce(_: str) -> None:
        # run_app calls this once the socket is bound, so the line is a promise kept.
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

    try:
        web.run_app(
            app,
            host=settings.host,
            port=settings.port,
            print=announce,
            # Batches are drained in on_shutdown before this; what is left is short requests.
            shutdown_timeout=_REQUEST_DRAIN_S,
        )
    except OSError as exc:
        print(
            f"batchexec: cannot listen on {settings.host}:{settings.port}: {exc.strerror}",
            file=sys.stderr,
        )
        return EXIT_FAILED
    return EXIT_OK


def _refuse_dev_key(settings: Settings) -> str | None:
    if settings.uses_dev_key and not settings.host_is_loopback:
        return (
            f"refusing to listen on {settings.host} with the development key {DEV_API_KEY!r}: "
            "set INTEGRATIONS_API_KEYS to your own comma-separated keys "
            "(for example INTEGRATIONS_API_KEYS=$(openssl rand -hex 24))"
        )
    return None
