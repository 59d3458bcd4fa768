"""What ``test_browser.py`` drives Chromium with: where it is, how it starts, what a page
must not do.

Chromium is the system's (Debian's ``chromium`` package); Playwright's own browser
download is never used. ``BATCHEXEC_CHROMIUM`` names another executable.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from playwright.async_api import (
    ConsoleMessage,
    Page,
    Request,
    ViewportSize,
)

#: The Chromium the tests drive; they are skipped when it is not there.
CHROMIUM = Path(os.environ.get("BATCHEXEC_CHROMIUM", "/usr/bin/chromium"))
#: Nothing but the page under test: no updates, no first-run pages, no sandbox (as root).
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-dev-shm-usage",
]
#: The README's screenshot's size, and every test's window.
VIEWPORT: ViewportSize = {"width": 1280, "height": 800}
#: An init script that keeps the field names of each form the page posts, by path, in
#: ``window.sentForms``: Chromium shows Playwright no multipart body that holds a file.
RECORD_FORMS = """
const send = window.fetch;
window.sentForms = [];
window.fetch = (resource, options = {}) => {
  if (options.body instanceof FormData) {
    const path = new URL(resource, document.baseURI).pathname;
    window.sentForms.push({ path, fields: [...options.body.keys()] });
  }
  return send(resource, options);
};
"""
#: Chromium's console line for an answer with an error status, which is not a script error.
_FAILED_LOAD = "Failed to load resource: the server responded with a status of "


@dataclass
class Watch:
    """What a page did that a user would not want: script errors and requests elsewhere.

    Console lines for answers with an error status are allowed for the statuses
    a test expects (``expect_status``): the page shows those, they are no bug.
    """

    origin: str
    allowed_statuses: set[int] = field(default_factory=set)
    requests: list[str] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)
    foreign_requests: list[str] = field(default_factory=list)

    def attach(self, page: Page) -> None:
        """Record what ``page`` does from now on."""
        page.on("console", self._on_console)
        page.on("pageerror", lambda error: self.page_errors.append(str(error)))
        page.on("request", self._on_request)

    def expect_status(self, *statuses: int) -> None:
        """Let the page receive answers of ``statuses`` without that counting as an error."""
        self.allowed_statuses.update(statuses)

    def problems(self) -> list[str]:
        """Each thing recorded that a user would not want, one line each."""
        return [
            *(f"console error: {text}" for text in self.console_errors),
            *(f"uncaught error: {text}" for text in self.page_errors),
            *(f"request off the server: {url}" for url in self.foreign_requests),
        ]

    def _on_console(self, message: ConsoleMessage) -> None:
        if message.type != "error":
            return
        text = message.text
        if text.startswith(_FAILED_LOAD):
            status = text.removeprefix(_FAILED_LOAD).split(" ", 1)[0]
            if status.isdigit() and int(status) in self.allowed_statuses:
                return
        self.console_errors.append(f"{text} ({message.location.get('url', '')})")

    def _on_request(self, request: Request) -> None:
        self.requests.append(request.url)
        if _origin_of(request.url) not in (self.origin, None):
            self.foreign_requests.append(request.url)


def _origin_of(url: str) -> str | None:
    """A URL's ``scheme://host:port``; a blob's is its creator's; ``data:`` has none."""
    parts = urlsplit(url)
    if parts.scheme == "data":
        return None
    if parts.scheme == "blob":
        return _origin_of(parts.path)
    return f"{parts.scheme}://{parts.netloc}"
