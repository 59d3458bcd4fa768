"""Prompts as templates: ``${output.n}`` (and ``{{output.n}}``) name earlier rows' results,
``{{column}}`` the row's own cells; finding them, and filling them in.

A prompt without ``{{`` keeps the original one-pass ``${output.n}`` path
(``references``, ``substitute``); one with it is compiled once, when the batch is
planned, into a ``Template``. Templates are logic-free: nothing in them runs.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence

# Anything shaped like a reference is captured, so that a typo such as
# ``${output.one}`` is reported instead of being sent to a model verbatim.
# A reference ends at its ``}``, or is cut short by a ``$`` (``${output.1$}``): not a
# reference then, and refused, as one whose number is not one. Stopping at a ``$``
# keeps many unclosed ``${output.`` from each scanning to the prompt's end.
_REFERENCE = re.compile(r"\$\{\s*output\.([^}$]*)([}$])")


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
        if match.group(2) != "}":
            raise TemplateError(f"{match.group(0)} is not a reference of the form ${{output.n}}")
        found.add(_reference_number(match.group(1), match.group(0)))
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


# ``{{name}}`` fills in the row's ``name`` cell; ``{{output.n}}`` is ``${output.n}``
# spelled the other way; ``\{{`` is a literal ``{{``. Between the braces, only a name
# (a letter or ``_``, then letters, digits, ``_``, ``-``, ``.`` and spaces) is a
# variable: anything else (``{{"a": 1}}``, ``{{ x | upper }}``) is text, sent as written.
# Linear: no two parts of a token can match the same characters (so no backtracking
# beyond the token); the spaces around a name are stripped afterwards.
_TOKEN = re.compile(r"\\\{\{|\$\{\s*output\.([^}$]*)([}$])|\{\{([^{}\n]*)\}\}")
#: How a literal ``{{`` is written.
_ESCAPE = "\\{{"
_NAME = re.compile(r"[^\W\d][\w .\-]*")
_OUTPUT_NAME = re.compile(r"output\.(.*)", re.DOTALL)
#: Names listed, at most, when a variable names no column.
_KNOWN_SHOWN = 20

#: A part of a prompt: text as it is sent, or the row number whose output goes there.
Part = str | int


class Template:
    """A prompt with its ``{{column}}`` variables filled in and its ``${output.n}`` left to fill.

    Made once, when the batch is planned; the cells are never scanned for
    references, so a cell holding ``${output.1}`` is sent as that text.
    """

    __slots__ = ("parts",)

    def __init__(self, parts: tuple[Part, ...]) -> None:
        self.parts = parts

    @property
    def references(self) -> frozenset[int]:
        """The row numbers whose outputs the prompt takes."""
        return frozenset(part for part in self.parts if isinstance(part, int))

    def length(self, outputs: Mapping[int, str]) -> int:
        """The length ``render(outputs)`` would have, without building it."""
        return sum(
            len(part) if isinstance(part, str) else len(outputs[part]) for part in self.parts
        )

    def render(self, outputs: Mapping[int, str]) -> str:
        """The prompt as sent, with the outputs filled in."""
        return "".join(part if isinstance(part, str) else outputs[part] for part in self.parts)

    def renumbered(self, number: Callable[[int], int]) -> Template:
        """The same prompt taking the output of row ``number(n)`` where it took row ``n``'s."""
        return Template(
            tuple(part if isinstance(part, str) else number(part) for part in self.parts)
        )


def uses_variables(text: str) -> bool:
    """Whether ``text`` may hold ``{{...}}`` (or ``\\{{``) and so needs ``compile_template``."""
    return "{{" in text


def compile_template(
    text: str, lookup: Callable[[str], str | None], known: Callable[[], Sequence[str]]
) -> Template:
    """``text`` as a ``Template``, each ``{{name}}`` replaced by ``lookup(name)``.

    ``lookup`` gives a cell's text, or None when no column has that name; the
    ``TemplateError`` then lists ``known()``. ``${output.n}`` and
    ``{{output.n}}`` become references.
    """
    parts: list[Part] = []
    # The text since the last reference, in pieces: joined once (adding to a string a
    # piece at a time would copy it each time).
    pieces: list[str] = []
    text_since = 0

    def literal(piece: str) -> None:
        pieces.append(piece)

    def reference(number: int) -> None:
        if any(pieces):
            parts.append("".join(pieces))
        pieces.clear()
        parts.append(number)

    for match in _TOKEN.finditer(text):
        token = match.group(0)
        literal(text[text_since : match.start()])
        text_since = match.end()
        if token == _ESCAPE:
            literal("{{")
            continue
        dollar, inner = match.group(1), match.group(3)
        inner = inner.strip() if inner is not None else None
        if dollar is not None:
            if match.group(2) != "}":
                raise TemplateError(f"{token} is not a reference of the form ${{output.n}}")
            reference(_reference_number(dollar, token))
            continue
        assert inner is not None
        if output := _OUTPUT_NAME.fullmatch(inner):
            reference(_reference_number(output.group(1), token))
        elif _NAME.fullmatch(inner):
            value = lookup(inner)
            if value is None:
                names = list(known())
                shown = ", ".join(names[:_KNOWN_SHOWN]) or "none"
                more = f" and {len(names) - _KNOWN_SHOWN} more" if len(names) > _KNOWN_SHOWN else ""
                raise TemplateError(
                    f"{token} names no column; the columns are {shown}{more} "
                    "(write \\{{ for a literal {{)"
                )
            literal(value)
        else:
            literal(token)
    literal(text[text_since:])
    if any(pieces):
        parts.append("".join(pieces))
    return Template(tuple(parts))


def filled_length(text: str, lookup: Callable[[str], str | None]) -> int:
    """The length of ``text`` with its variables filled in and its references as written.

    Counted before the prompt is built: a short prompt can name a long cell
    a thousand times. Unknown names count as written (``compile_template``
    reports them).
    """
    length = len(text)
    for match in _TOKEN.finditer(text):
        token, inner = match.group(0), match.group(3)
        inner = inner.strip() if inner is not None else None
        if token == _ESCAPE:
            length -= 1
        elif inner is not None and not _OUTPUT_NAME.fullmatch(inner) and _NAME.fullmatch(inner):
            value = lookup(inner)
            if value is not None:
                length += len(value) - len(token)
    return length


def _reference_number(raw: str, token: str) -> int:
    raw = raw.strip()
    # Length first: int() of thousands of digits raises, and no batch has that many rows.
    if len(raw) > _MAX_DIGITS or not raw.isdigit() or not raw.isascii() or int(raw) < 1:
        raise TemplateError(f"{token} is not a reference of the form ${{output.n}}")
    return int(raw)
