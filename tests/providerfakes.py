"""In-process fake model servers for the provider tests.

Each test scripts what the fake answers on which path, then reads back what
the client sent. Test modules load the fixtures below with
``pytest_plugins = ["tests.providerfakes"]`` and reach everything else through
the ``fake`` fixture, since importing this module themselves would keep pytest
from rewriting its asserts.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from multidict import CIMultiDict

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

#: Every variable a provider reads a key or address from; tests start with none set.
PROVIDER_ENV = (
    "OPENAI_API_KEY",
    "OPENAI_BASE_URL",
    "WATSONX_APIKEY",
    "WATSONX_URL",
    "WATSONX_PROJECT_ID",
    "WATSONX_IAM_URL",
    "ANTHROPIC_API_KEY",
    "OLLAMA_HOST",
)


@dataclass(frozen=True)
class Seen:
    """One request the fake received."""

    method: str
    path: str
    query: dict[str, str]
    headers: CIMultiDict[str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def form(self) -> dict[str, str]:
        return dict(parse_qsl(self.body.decode()))


class FakeServer:
    """A loopback HTTP server answering each path with the handler a test gave it."""

    def __init__(self) -> None:
        self.requests: list[Seen] = []
        self.routes: dict[str, Handler] = {}
        #: Set at teardown, so handlers that never answer can finish.
        self.release = asyncio.Event()
        #: Set when a request reaches ``hang``.
        self.hung = asyncio.Event()
        self.app = web.Application()
        self.app.router.add_route("*", "/{tail:.*}", self._dispatch)
        self.server: TestServer | None = None

    def url(self, path: str = "") -> str:
        assert self.server is not None
        return str(self.server.make_url(path))

    def on(self, path: str, *handlers: Handler) -> None:
        """Answer ``path`` with ``handlers`` in turn, the last one for good."""
        queue = list(handlers)

        async def next_handler(request: web.Request) -> web.StreamResponse:
            handler = queue.pop(0) if len(queue) > 1 else queue[0]
            return await handler(request)

        self.routes[path] = next_handler

    def seen(self, path: str) -> list[Seen]:
        return [request for request in self.requests if request.path == path]

    async def hang(self, request: web.Request) -> web.StreamResponse:
        """A handler that never answers while the test runs."""
        self.hung.set()
        await self.release.wait()
        return web.Response(status=503)

    async def assert_never_answered(self, call: Awaitable[object]) -> None:
        """Assert ``call`` is still waiting a while after its request reached ``hang``."""
        task = asyncio.ensure_future(call)
        try:
            async with asyncio.timeout(5):
                await self.hung.wait()
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.05):
                    await asyncio.shield(task)
            assert not task.done()
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    @staticmethod
    def reply(body: object, status: int = 200, headers: dict[str, str] | None = None) -> Handler:
        """A handler answering ``body`` as JSON."""

        async def handler(request: web.Request) -> web.StreamResponse:
            return web.json_response(body, status=status, headers=headers)

        return handler

    @staticmethod
    def reply_raw(text: str, status: int = 200, content_type: str = "application/json") -> Handler:
        """A handler answering ``text`` as is, valid JSON or not."""

        async def handler(request: web.Request) -> web.StreamResponse:
            return web.Response(text=text, status=status, content_type=content_type)

        return handler

    @staticmethod
    def drop_midway(partial: bytes = b'{"id": "cut-') -> Handler:
        """A handler that promises a longer body than it sends, then closes the connection."""

        async def handler(request: web.Request) -> web.StreamResponse:
            response = web.StreamResponse(
                headers={
                    "Content-Type": "application/json",
                    "Content-Length": str(len(partial) * 10),
                }
            )
            await response.prepare(request)
            await response.write(partial)
            assert request.transport is not None
            request.transport.close()
            return response

        return handler

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.requests.append(
            Seen(
                request.method,
                request.path,
                dict(request.query),
                CIMultiDict(request.headers),
                body,
            )
        )
        handler = self.routes.get(request.path)
        if handler is None:
            return web.json_response({"error": f"no fake route {request.path}"}, status=404)
        return await handler(request)


@pytest.fixture
async def fake(aiohttp_server: Callable[..., Awaitable[TestServer]]) -> AsyncIterator[FakeServer]:
    """A started fake server; releases its hanging handlers before it stops."""
    server = FakeServer()
    server.server = await aiohttp_server(server.app)
    yield server
    server.release.set()


@pytest.fixture
async def http_session() -> AsyncIterator[aiohttp.ClientSession]:
    """The client session providers get from the app, closed after the test."""
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
def no_provider_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No provider variables from the environment, nor from a ``.env`` in the working folder."""
    for name in PROVIDER_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
