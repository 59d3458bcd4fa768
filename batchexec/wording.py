"""How counts read in messages: ``1 row``, ``2 rows``; a leaf every layer may use."""

from __future__ import annotations


def counted(count: int, noun: str, plural: str | None = None) -> str:
    """``count`` and ``noun``, the noun plural unless the count is one: ``1 row``, ``2 rows``.

    ``plural`` is the noun's plural where adding ``s`` does not make it.
    """
    return f"{count} {noun if count == 1 else plural or noun + 's'}"
