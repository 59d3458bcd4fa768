"""``${output.n}``: finding the rows a prompt names, and filling in their results."""

from __future__ import annotations

import re
from collections.abc import Mapping

# Anything shaped like a reference is captured, so that a typo such as
# ``${output.one}`` is reported instead of being sent to a model verbatim.
_REFERENCE = re.compile(r"\$\{\s*output\.([^}]*)\}")


_NONE: frozenset[int] = frozenset()
#: Digits of the longest row number a reference may hold.
_MAX_DIGITS = 18


class TemplateError(ValueError):
    """A prompt holds a reference that is not ``${output.n}`` with n a positive integer."""


def references(prompt: str) -> frozenset[int]:
    """The 1-based row numbers that ``prompt`` names with ``${output.n}``."""
    if "${" not in prompt:
        return _NONE
    found: set[int] = set()
    for match in _REFERENCE.finditer(prompt):
        raw = match.group(1).strip()
        # Length first: int() of thousands of digits raises, and no batch has that many rows.
        if len(raw) > _MAX_DIGITS or not raw.isdigit() or not raw.isascii() or int(raw) < 1:
            raise TemplateError(f"{match.group(0)} is not a reference of the form ${{output.n}}")
        found.add(int(raw))
    return frozenset(found)


def substituted_length(prompt: str, outputs: Mapping[int, str]) -> int:
    """The length ``substitute(prompt, outputs)`` would have, without building it.

    A prompt of a thousand characters can name one output a hundred times, so
    the length is checked before the text is made.
    """
    if "${" not in prompt:
        return len(prompt)
    length = len(prompt)
    for match in _REFERENCE.finditer(prompt):
        length += len(outputs[int(match.group(1).strip())]) - len(match.group(0))
    return length


def substitute(prompt: str, outputs: Mapping[int, str]) -> str:
    """``prompt`` with each ``${output.n}`` replaced by ``outputs[n]``.

    One pass over the prompt: text coming from an output is never scanned for
    references again, so a model cannot inject ``${output.n}`` of its own.
    """
    return _REFERENCE.sub(lambda match: outputs[int(match.group(1).strip())], prompt)
