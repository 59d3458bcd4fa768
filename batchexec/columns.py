"""The names of the columns batchexec reads and writes, and what an input cell holds.

A leaf module: the input readers, the planner, the records and the outputs all use it.
"""

from __future__ import annotations

import re
from typing import TypeAlias

#: An input cell: text, or the number or boolean a workbook cell (or a JSON value)
#: held. ``prompt``, ``model`` and ``assistant`` cells are always text; a CSV's
#: cells are always text; text never becomes a number.
Cell: TypeAlias = str | int | float | bool

#: A row's own parameters (``parameters.py``) and answer schema, as columns.
PARAMETER_COLUMNS = (
    "system",
    "temperature",
    "max_tokens",
    "top_p",
    "stop",
    "seed",
    "response_schema",
)
#: Columns with a meaning to batchexec; matched case-insensitively.
KNOWN_COLUMNS = ("prompt", "model", "assistant", *PARAMETER_COLUMNS)
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
#: The columns of a workbook's sheet, at most (Excel's, and xlsxwriter's, limit).
SHEET_MAX_COLUMNS = 16_384
#: Input columns of these names (a results file fed back in) are dropped rather
#: than duplicated; ``model`` is an input column too, so it stays.
RESERVED_COLUMNS = frozenset(OUTPUT_COLUMNS) - {"model"}
#: The outputs' other columns: an answer's fields (``result.score``) and, for models side
#: by side, each model's group (``result [gpt-4o]``, ``result.score [gpt-4o]``), and
#: ``cost``. An input may have columns of such names too: only those after a result
#: column are taken for the outputs' (``csvinput.header_columns``).
_ADDED_COLUMN = re.compile(
    rf"(?:result\.[^\[]*(?: \[.*\])?|(?:{'|'.join(OUTPUT_COLUMNS)}|cost|cached) \[.*\]"
    r"|model|cost|cached)",
    re.DOTALL,
)
_RESULT_GROUP = re.compile(r"result \[.*\]", re.DOTALL)


def is_result_column(name: str) -> bool:
    """Whether ``name`` is the outputs' ``result``, or a model's side by side."""
    return name == "result" or _RESULT_GROUP.fullmatch(name) is not None


def is_added_column(name: str) -> bool:
    """Whether ``name`` may be a column the outputs add after ``result``: ``model``,
    ``cost``, ``result.score``, ``status [gpt-4o]``, ..."""
    return _ADDED_COLUMN.fullmatch(name) is not None


def field_column(field: str) -> str:
    """The column an answer's top-level ``field`` is spread into."""
    return f"result.{field}"


def group_column(column: str, model: str) -> str:
    """``column`` of ``model``'s group, for models side by side."""
    return f"{column} [{model}]"


def cell_text(cell: Cell) -> str:
    """A cell as the text it shows: numbers as Python writes them (``7``, ``0.5``,
    ``1e+20``, ``nan``), booleans ``TRUE`` or ``FALSE`` as spreadsheets write them."""
    if isinstance(cell, str):
        return cell
    if isinstance(cell, bool):
        return "TRUE" if cell else "FALSE"
    return str(cell)
