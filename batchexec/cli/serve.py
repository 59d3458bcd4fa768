"""``python -m batchexec serve``: the HTTP server in the foreground (``batchexec.serving``)."""

from __future__ import annotations

import argparse

from batchexec.cli.options import Commands


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
    # Imported here: the other commands never load the web layer.
    from batchexec import serving

    return serving.serve(host=host, port=port)
