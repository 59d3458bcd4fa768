"""The HTTP server ``serve`` runs: aiohttp's, with its own error answers as JSON.

aiohttp answers malformed HTTP (a bad request line, an over-long or invalid
header) itself, before any middleware runs: as ``text/plain``, logged with a
traceback at ERROR. Every other error of this API is JSON ``{"detail": ...}``
from ``error_middleware``, so these are made JSON too, and a client's mistake
is logged in one line.

aiohttp has no public hook for this. What it leans on, as of aiohttp 3.14:
``RequestHandler.handle_error`` (its signature and contract: return a response
or raise ``ConnectionError`` once bytes were sent), ``Server.__call__`` as the
factory of one ``RequestHandler`` per connection with the ``Server``'s private
``_loop`` and ``_kwargs``, and ``AppRunner._make_server``, the abstract hook of
``BaseRunner`` that builds the ``Server``.
"""

from __future__ import annotations

from http import HTTPStatus

from aiohttp import web
from aiohttp.http_exceptions import LineTooLong
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

#: Longest part of aiohttp's reason that is repeated to the client (it may quote the request).
_MAX_REASON_CHARS = 200


class JSONErrorRequestHandler(RequestHandler):
    """aiohttp's connection handler, answering the errors it handles itself as JSON."""

    __slots__ = ()

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """``{"detail": ...}`` with ``status``; a 4xx logs one line, a 5xx a traceback."""
        detail = error_detail(status, exc, message)
        if status >= 500:
            self.log_exception("Error handling request from %s", request.remote, exc_info=exc)
        else:
            self.logger.info("rejected a request from %s: %d %s", request.remote, status, detail)
        if request.writer.output_size > 0:
            # As aiohttp does: the answer has begun, so no other can be sent.
            raise ConnectionError("Response is sent already, cannot send the error message")
        response = web.json_response({"detail": detail}, status=status)
        # The request could not be read, so the rest of the connection cannot be either.
        response.force_close()
        return response


class JSONErrorServer(web.Server):
    """aiohttp's low-level server, with ``JSONErrorRequestHandler`` for each connection."""

    def __call__(self) -> RequestHandler:
        return JSONErrorRequestHandler(self, loop=self._loop, **self._kwargs)


class JSONErrorAppRunner(web.AppRunner):
    """``web.AppRunner`` serving its app through a ``JSONErrorServer``."""

    async def _make_server(self) -> web.Server:
        # aiohttp's own server does the app's start-up and carries its settings
        # (handler, request factory, access log, timeouts); only the handler class differs.
        server = await super()._make_server()
        return JSONErrorServer(
            server.request_handler,
            request_factory=server.request_factory,
            handler_cancellation=server.handler_cancellation,
            loop=server._loop,
            **server._kwargs,
        )


def error_detail(status: int, exc: BaseException | None, message: str | None) -> str:
    """The ``detail`` of an error aiohttp answers itself: its reason, never a traceback."""
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Error"
    if status == HTTPStatus.INTERNAL_SERVER_ERROR:
        # The same words as error_middleware's: what went wrong is for the log only.
        return "Internal server error."
    if status >= 500:
        return phrase
    if isinstance(exc, LineTooLong):
        # Its message quotes a hundred bytes of the line; the limit is what matters.
        return f"{phrase}: request line or header line too long"
    # aiohttp's parser reasons run over several lines, quoting the request with a caret.
    lines = (message or "").strip().splitlines()
    reason = lines[0].rstrip(":").strip() if lines else ""
    if not reason:
        return phrase
    if len(reason) > _MAX_REASON_CHARS:
        reason = reason[:_MAX_REASON_CHARS] + "..."
    return f"{phrase}: {reason}"
