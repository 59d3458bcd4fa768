"""The two middlewares: errors as JSON, and the API key check."""

from __future__ import annotations

import hmac
import ipaddress
import logging
import math

from aiohttp import web
from aiohttp.typedefs import Handler
from pydantic import BaseModel

from batchexec import api
from batchexec.api import API_KEY_HEADER
from batchexec.errors import (
    BatchexecError,
    ConflictError,
    InputError,
    NotFoundError,
    QueueFullError,
    ShuttingDownError,
    StorageError,
    TemplateNotRunError,
)
from batchexec.store import StoreError
from batchexec.web.bodies import (
    ErrorResponse,
    FieldErrorOut,
    InvalidResponse,
    TemplateNotRunResponse,
)
from batchexec.web.keys import OWNER, REGISTRY, SETTINGS
from batchexec.web.v1.errors import INVALID, is_v1, openai_error

log = logging.getLogger(__name__)

#: Routes anyone may call: by path, and by route name under whatever prefix the
#: app is mounted at.
_OPEN_PATHS = frozenset({api.HEALTH, api.OPENAPI, api.DOCS, api.PAGE})
OPEN_ROUTES = frozenset({"health", "openapi", "docs", "page", "page_file"})
#: The status each of the project's errors answers with; a subclass answers as its
#: nearest listed base. Foreign errors are mapped to these where they enter
#: (``requests.parse_body`` for pydantic's), so none is listed here.
_STATUSES: dict[type[BatchexecError], int] = {
    InputError: 422,
    NotFoundError: 404,
    ConflictError: 409,
    QueueFullError: 429,
    ShuttingDownError: 503,
    # A full or read-only disk, a locked database: the server's trouble, said plainly.
    StorageError: 503,
    StoreError: 503,
}
#: Errors worth a line in the log: the server's own trouble, not the client's.
_LOGGED = (StorageError, StoreError)


def json_error(status: int, body: BaseModel) -> web.Response:
    """An error answer: ``body``, one of the error envelope's models, with ``status``."""
    return web.json_response(body.model_dump(mode="json"), status=status)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error becomes JSON with ``detail``; no HTML pages, no tracebacks."""
    v1 = is_v1(request)
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        detail = _http_detail(exc)
        response = (
            openai_error(exc.status, detail)
            if v1
            else json_error(exc.status, ErrorResponse(detail=detail))
        )
        for name in ("Allow", "Retry-After", "WWW-Authenticate"):
            if name in exc.headers:
                response.headers[name] = exc.headers[name]
        return response
    except Exception as exc:
        status = _status_of(exc)
        if status is None:
            log.exception("unhandled error on %s %s", request.method, request.path)
            message = "Internal server error."
            return (
                openai_error(500, message) if v1 else json_error(500, ErrorResponse(detail=message))
            )
        if isinstance(exc, _LOGGED):
            log.warning("%s %s: %s", request.method, request.path, exc)
        return _openai_answer(exc, status) if v1 else _answer(exc, status)


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Checks ``Integrations-API-Key`` in constant time and records the caller's identity."""
    if request.path in _OPEN_PATHS or _is_open(request) or _metrics_open(request):
        return await handler(request)
    offered = request.headers.get(API_KEY_HEADER, "") or _bearer_key(request)
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
        if is_v1(request):
            raise web.HTTPUnauthorized(
                text="Missing or invalid API key: send one of the server's keys as "
                "Authorization: Bearer <key>.",
                headers={"WWW-Authenticate": "Bearer"},
            )
        raise web.HTTPUnauthorized(
            text=f"Missing or invalid {API_KEY_HEADER} header.",
            headers={"WWW-Authenticate": API_KEY_HEADER},
        )
    request[OWNER] = request.app[REGISTRY].store.fingerprint(matched)
    return await handler(request)


def _is_open(request: web.Request) -> bool:
    """One of ``OPEN_ROUTES`` under whatever prefix the app is mounted at."""
    return _route_name(request) in OPEN_ROUTES


def _metrics_open(request: web.Request) -> bool:
    """``/metrics`` asked from a loopback address while ``METRICS_OPEN`` is set."""
    return (
        _route_name(request) == "metrics"
        and request.app[SETTINGS].metrics_open
        and _from_loopback(request)
    )


def _bearer_key(request: web.Request) -> str:
    """The key of ``Authorization: Bearer <key>``, on the routes that take one: ``/metrics``
    (what Prometheus sends) and ``/v1`` (what OpenAI's clients send)."""
    if _route_name(request) != "metrics" and not is_v1(request):
        return ""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def _route_name(request: web.Request) -> str | None:
    resource = request.match_info.route.resource
    return resource.name if resource is not None else None


def _from_loopback(request: web.Request) -> bool:
    """Whether the connection comes from this machine: its socket's peer, never a header."""
    peer = request.transport.get_extra_info("peername") if request.transport else None
    if not isinstance(peer, tuple) or not peer:
        return False  # a Unix socket, or a connection already gone
    try:
        address = ipaddress.ip_address(peer[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # ::ffff:127.0.0.1
    return address.is_loopback


def _http_detail(exc: web.HTTPException) -> str:
    text = exc.text or ""
    if not text or text.startswith(f"{exc.status}:"):
        return exc.reason
    return text


def _status_of(exc: Exception) -> int | None:
    for cls in type(exc).__mro__:
        if cls in _STATUSES:
            return _STATUSES[cls]
    return None


def _openai_answer(exc: Exception, status: int) -> web.Response:
    """``_answer`` in OpenAI's envelope: an invalid request is a 400 naming its first field."""
    if isinstance(exc, InputError):
        first = exc.errors[0] if exc.errors else None
        message = exc.detail
        if first is not None and first.message not in message:
            message = f"{message} {first.field or 'request'}: {first.message}."
        return openai_error(INVALID, message, param=first.field if first else None)
    response = openai_error(status, str(exc))
    retry_after_s: float | None = getattr(exc, "retry_after_s", None)
    if retry_after_s is not None:
        response.headers["Retry-After"] = str(max(1, math.ceil(retry_after_s)))
    return response


def _answer(exc: Exception, status: int) -> web.Response:
    """The JSON answer of one of the project's errors: its message, rows and when to retry."""
    if isinstance(exc, InputError):
        errors = [FieldErrorOut.of(error) for error in exc.errors]
        return json_error(status, InvalidResponse(detail=exc.detail, errors=errors))
    if isinstance(exc, TemplateNotRunError):
        return json_error(status, TemplateNotRunResponse(detail=str(exc), xlsx_url=exc.xlsx_url))
    response = json_error(status, ErrorResponse(detail=str(exc)))
    retry_after_s: float | None = getattr(exc, "retry_after_s", None)
    if retry_after_s is not None:
        response.headers["Retry-After"] = str(max(1, math.ceil(retry_after_s)))
    return response
