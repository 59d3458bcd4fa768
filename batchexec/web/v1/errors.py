"""``/v1`` errors in OpenAI's envelope, with the statuses and types its clients expect.

The official client raises by status (400 ``BadRequestError``, 401
``AuthenticationError``, 404 ``NotFoundError``, 409 ``ConflictError``, 429
``RateLimitError``, 5xx ``InternalServerError``), and shows ``message``. A
request batchexec refuses as invalid (422 elsewhere) is a 400 here, as at
OpenAI.
"""

from __future__ import annotations

from aiohttp import web

from batchexec.web.v1.schemas import ErrorBody, ErrorEnvelope

#: The status of an invalid request on ``/v1``.
INVALID = 400


def openai_error(
    status: int, message: str, *, param: str | None = None, code: str | None = None
) -> web.Response:
    """An error answer in OpenAI's envelope."""
    if status == 401:
        kind, code = "invalid_request_error", code or "invalid_api_key"
    elif status == 429:
        kind = "rate_limit_error"
    elif status >= 500:
        kind = "server_error"
    else:
        kind = "invalid_request_error"
    body = ErrorEnvelope(error=ErrorBody(message=message, type=kind, param=param, code=code))
    return web.json_response(body.model_dump(mode="json"), status=status)


def is_v1(request: web.Request) -> bool:
    """Whether ``request`` is for ``/v1``: one of its routes, or a path below it none matched."""
    resource = request.match_info.route.resource
    if resource is None:
        return "/v1/" in request.path + "/"
    return (resource.name or "").startswith("v1_")
