"""Answers of the results route for finished batches, rendered once and served many times."""

from __future__ import annotations

from collections import OrderedDict


class RenderedResults:
    """The JSON bodies of finished batches' results, by batch id and public URL, LRU-bounded.

    A finished batch never changes, and clients poll it: rendering a
    1,000-row answer costs milliseconds, serving it again microseconds. The
    URL is part of the key because ``xlsx_url`` follows the request's host.
    """

    def __init__(self, max_entries: int = 256) -> None:
        self._max_entries = max_entries
        self._bodies: OrderedDict[tuple[str, str], bytes] = OrderedDict()

    def get(self, batch_id: str, base_url: str) -> bytes | None:
        """The body rendered for this batch and URL, if any."""
        key = (batch_id, base_url)
        body = self._bodies.get(key)
        if body is not None:
            self._bodies.move_to_end(key)
        return body

    def put(self, batch_id: str, base_url: str, body: bytes) -> None:
        """Keep ``body``, dropping the least recently used answer when full."""
        self._bodies[(batch_id, base_url)] = body
        self._bodies.move_to_end((batch_id, base_url))
        while len(self._bodies) > self._max_entries:
            self._bodies.popitem(last=False)
