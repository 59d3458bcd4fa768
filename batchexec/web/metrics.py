"""``GET /metrics``: the app's Prometheus metrics, for a scraper.

It needs the API key like every other route (``Integrations-API-Key``, or
``Authorization: Bearer <key>``, which Prometheus' scrape configs send).
``METRICS_OPEN=true`` lets requests from a loopback address in without one
(``middlewares.auth_middleware``).
"""

from __future__ import annotations

from aiohttp import web

from batchexec.web.keys import METRICS


async def metrics(request: web.Request) -> web.Response:
    """Every metric of this app, as Prometheus text (or OpenMetrics, if asked for)."""
    body, content_type = request.app[METRICS].exposition(request.headers.get("Accept"))
    return web.Response(body=body, headers={"Content-Type": content_type})
