"""The web page: ``GET /`` and the files it loads, ``GET /page/{name}``; no key needed.

The files are the package's ``web/static/`` folder, served as they are: no
build step, nothing fetched from elsewhere, so the page works offline after
``pip install``. Its HTML names its script and stylesheet relatively
(``page/app.js``), so it works under whatever prefix the app is mounted at.
Every API call the page makes sends the key the user gives it.

A file is found by looking its name up in the folder's listing, never by
joining the requested name to a path: ``../x`` or ``a%2Fb`` names nothing.
"""

from __future__ import annotations

import asyncio
import re
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import PurePath

from aiohttp import web

from batchexec.errors import NotFoundError

#: What every answer of the page's routes carries, errors included: scripts, styles
#: and calls to this server only, never framed, nothing leaked to other sites.
HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # Always asked again, so a new version of the page is never mixed with an old one.
    "Cache-Control": "no-cache",
}
#: The files ``/page/{name}`` serves, by suffix: everything else is 404.
CONTENT_TYPES = {".js": "text/javascript", ".css": "text/css"}
#: The names ``/page/{name}`` may serve: plain, not hidden, of a suffix of ``CONTENT_TYPES``.
FILE_NAME_PATTERN = (
    r"^[A-Za-z0-9_-][A-Za-z0-9._-]*\.("
    + "|".join(re.escape(suffix[1:]) for suffix in CONTENT_TYPES)
    + ")$"
)
_INDEX = "index.html"


async def index(request: web.Request) -> web.Response:
    """The page itself."""
    return await _answer(_INDEX, "text/html")


async def page_file(request: web.Request) -> web.Response:
    """A script or stylesheet of the page, by its plain name in the page's folder."""
    name = request.match_info["name"]
    if not re.fullmatch(FILE_NAME_PATTERN, name):
        raise NotFoundError("File not found")
    return await _answer(name, CONTENT_TYPES[PurePath(name).suffix])


def setup(app: web.Application) -> None:
    """Give every answer of the page's routes ``HEADERS``, its errors' too."""
    app.on_response_prepare.append(_add_headers)


async def _add_headers(request: web.Request, response: web.StreamResponse) -> None:
    if request.match_info.handler in (index, page_file):
        response.headers.update(HEADERS)


async def _answer(name: str, content_type: str) -> web.Response:
    body = await asyncio.to_thread(_read, name)
    if body is None:
        raise NotFoundError("File not found")
    return web.Response(body=body, content_type=content_type, charset="utf-8")


def _read(name: str) -> bytes | None:
    """The bytes of the file the page's folder lists as ``name``; None if it lists none."""
    try:
        entry = next((entry for entry in _folder().iterdir() if entry.name == name), None)
        return entry.read_bytes() if entry is not None and entry.is_file() else None
    except OSError:
        return None


def _folder() -> Traversable:
    return resources.files("batchexec") / "web" / "static"
