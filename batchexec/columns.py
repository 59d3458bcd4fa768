"""The names of the columns batchexec reads and writes, and what an input cell holds.

A leaf module: the input readers, the planner, the records and the outputs all use it.
"""

from __future__ import annotations

from typing import TypeAlias

#: An input cell: text, or the number or boolean a workbook cell (or a JSON value)
#: held. ``prompt``, ``model`` and ``assistant`` cells are always text; a CSV's
#: cells are always text; text never becomes a number.
Cell: TypeAlias = str | int | float | bool

#: Columns with a meaning to batchexec; matched case-insensitively.
KNOWN_COLUMNS = ("prompt", "model", "assistant")
#: Columns the results workbook adds after the input columns, in order.
OUTPUT_COLUMNS = (
    "result",
    "status",
    "error",
    "model",
    "latency_ms",
    "attempts",
    "prompt_tokens",
    "completion_tokens",
)
#: Input columns of these names (a results file fed back in) are dropped rather
#: than duplicated; ``model`` is an input column too, so it stays.
RESERVED_COLUMNS = frozenset(OUTPUT_COLUMNS) - {"model"}


def cell_text(cell: Cell) -> str:
    """A cell as the text it shows: numbers as Python writes them (``7``, ``0.5``,
    ``1e+20``, ``nan``), booleans ``TRUE`` or ``FALSE`` as spreadsheets write them."""
    if isinstance(cell, str):
        return cell
    if isinstance(cell, bool):
        return "TRUE" if cell else "FALSE"
    return str(cell)
