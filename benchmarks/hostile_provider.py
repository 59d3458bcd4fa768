"""A hostile OpenAI-compatible server: ``python -m benchmarks.hostile_provider --port PORT``.

Every ``POST /v1/chat/completions`` is answered 200 with a chat completion
whose ``content`` runs to ``--response-mb`` megabytes (50 by default), sent
chunked, with no ``Content-Length``: a client that reads the whole body holds
all of it. ``GET /stats`` counts the calls and the bytes sent; ``GET /health``
answers 200. It runs in its own process, so its memory is not the server's.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from aiohttp import web

_PREFIX = (
    b'{"id": "chatcmpl-hostile", "object": "chat.completion", "created": 1700000000, '
    b'"model": "huge", "choices": [{"index": 0, "message": {"role": "assistant", "content": "'
)
_SUFFIX = b'"}, "finish_reason": "stop"}], "usage": {"prompt_tokens": 1, "completion_tokens": 1}}'
_CHUNK = b"x" * (1024 * 1024)


@dataclass
class Stats:
    """What the server has been asked for and has sent."""

    calls: int = 0
    bytes_sent: int = 0


STATS = web.AppKey("stats", Stats)
RESPONSE_MB = web.AppKey("response_mb", int)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    """A completion of ``RESPONSE_MB`` megabytes, written until the client hangs up."""
    stats = request.app[STATS]
    stats.calls += 1
    await request.read()
    response = web.StreamResponse(headers={"Content-Type": "application/json"})
    response.enable_chunked_encoding()
    await response.prepare(request)
    try:
        for part in (_PREFIX, *([_CHUNK] * request.app[RESPONSE_MB]), _SUFFIX):
            await response.write(part)
            stats.bytes_sent += len(part)
        await response.write_eof()
    except (ConnectionError, RuntimeError):
        # The client stopped reading, as a bounded one should; aiohttp may say
        # so as a reset or as "cannot write to closing transport".
        pass
    return response


async def stats(request: web.Request) -> web.Response:
    counts = request.app[STATS]
    return web.json_response({"calls": counts.calls, "bytes_sent": counts.bytes_sent})


async def health(request: web.Request) -> web.Response:
    return web.Response(text="ok")


def create_app(response_mb: int) -> web.Application:
    app = web.Application()
    app[STATS] = Stats()
    app[RESPONSE_MB] = response_mb
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/stats", stats)
    app.router.add_get("/health", health)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--response-mb", type=int, default=50)
    args = parser.parse_args()
    web.run_app(
        create_app(args.response_mb), host="127.0.0.1", port=args.port, access_log=None, print=None
    )


if __name__ == "__main__":
    main()
