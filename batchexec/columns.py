"""The names of the columns batchexec reads and writes, for inputs and outputs alike.

A leaf module: the input readers, the planner and the outputs all use it.
"""

from __future__ import annotations

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
