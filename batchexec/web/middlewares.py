"""The two middlewares: errors as JSON, and the API key check."""

from __future__ import annotations

import hmac
import logging
import math

from aiohttp import web
from aiohttp.typedefs import Handler
from pydantic import ValidationError

from batchexec import api
from batchexec.api import API_KEY_HEADER
from batchexec.errors import (
    ConflictError,
    InputError,
    NotFoundError,
    QueueFullError,
    ShuttingDownError,
    StorageError,
)
from batchexec.store import StoreError
from batchexec.web.keys import OWNER, REGISTRY, SETTINGS

log = logging.getLogger(__name__)

#: Routes anyone may call.
_OPEN_PATHS = frozenset({api.HEALTH})
#: Seconds a client refused by a stopping server is told to wait (for another replica
#: or the restart).
_SHUTDOWN_RETRY_AFTER_S = 5


def json_error(status: int, detail: str, **extra: object) -> web.Response:
    """An error answer: ``{"detail": ...}`` plus ``extra`` fields."""
    return web.json_response({"detail": detail, **extra}, status=status)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error becomes JSON with ``detail``; no HTML pages, no tracebacks."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = json_error(exc.status, _http_detail(exc))
        for name in ("Allow", "Retry-After", "WWW-Authenticate"):
            if name in exc.headers:
                response.headers[name] = exc.headers[name]
        return response
    except InputError as exc:
        errors = [
            {"index": error.index, "field": error.field, "message": error.message}
            for error in exc.errors
        ]
        return json_error(422, exc.detail, errors=errors)
    except ValidationError as exc:
        return json_error(422, "The request body is invalid.", errors=_pydantic_errors(exc))
    except RecursionError:
        # JSON a thousand levels deep parses, then fails whatever walks it.
        return json_error(400, "The request body is nested too deeply.")
    except NotFoundError as exc:
        return json_error(404, str(exc))
    except ConflictError as exc:
        return json_error(409, str(exc))
    except QueueFullError as exc:
        response = json_error(429, str(exc))
        response.headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after_s)))
        return response
    except ShuttingDownError as exc:
        response = json_error(503, str(exc))
        response.headers["Retry-After"] = str(_SHUTDOWN_RETRY_AFTER_S)
        return response
    except (StorageError, StoreError) as exc:
        # A full or read-only disk, a locked database: the server's trouble, said plainly.
        log.warning("%s %s: %s", request.method, request.path, exc)
        return json_error(503, str(exc))
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return json_error(500, "Internal server error.")


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Checks ``Integrations-API-Key`` in constant time and records the caller's identity."""
    if request.path in _OPEN_PATHS or _is_open(request):
        return await handler(request)
    offered = request.headers.get(API_KEY_HEADER, "")
    try:
        offered_bytes = offered.encode("ascii")
    except UnicodeEncodeError:
        offered_bytes = b""
    matched: str | None = None
    for key in request.app[SETTINGS].api_keys:
        # Compare with every key, so timing says nothing of which one is close.
        if hmac.compare_digest(offered_bytes, key.encode("ascii")) and offered_bytes:
            matched = key
    if matched is None:
        raise web.HTTPUnauthorized(
            text=f"Missing or invalid {API_KEY_HEADER} header.",
            headers={"WWW-Authenticate": API_KEY_HEADER},
        )
    request[OWNER] = request.app[REGISTRY].store.fingerprint(matched)
    return await handler(request)


def _is_open(request: web.Request) -> bool:
    """``/health`` under whatever prefix the app is mounted at."""
    resource = request.match_info.route.resource
    return resource is not None and resource.name == "health"


def _http_detail(exc: web.HTTPException) -> str:
    text = exc.text or ""
    if not text or text.startswith(f"{exc.status}:"):
        return exc.reason
    return text


def _pydantic_errors(exc: ValidationError) -> list[dict[str, object]]:
    """pydantic's errors as ``index`` (1-based execution), ``field`` and ``message``."""
    errors: list[dict[str, object]] = []
    for error in exc.errors(include_url=False):
        loc = list(error["loc"])
        index: int | None = None
        if len(loc) >= 2 and loc[0] == "executions" and isinstance(loc[1], int):
            index = loc[1] + 1
            loc = loc[2:]
        field = ".".join(str(part) for part in loc) or None
        errors.append({"index": index, "field": field, "message": error["msg"]})
    return errors
