"""A row's own generation parameters, read from its cells: ``system``, ``temperature``,
``max_tokens``, ``top_p``, ``stop`` and ``seed``.

Every input format gives them the same way: a CSV's or a sheet's columns of
those names, or an execution's fields of ``execute_batch``. An empty cell
leaves a parameter unset: the catalog's ``params`` (or the model's default)
apply. A set one is sent in each provider's own wire format and wins over the
same setting in the catalog's ``params`` (``providers.base.ChatOptions``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass

from batchexec.columns import Cell

#: The bounds each parameter is checked against: OpenAI's, which the others' fall within.
TEMPERATURE_RANGE = (0.0, 2.0)
TOP_P_RANGE = (0.0, 1.0)
MAX_TOKENS_LIMIT = 1_000_000
#: Stop sequences a row may give, and the longest one: OpenAI takes up to four.
MAX_STOP_SEQUENCES = 4
MAX_STOP_CHARS = 256
SEED_RANGE = (-(2**63), 2**63 - 1)


@dataclass(frozen=True)
class RowParameters:
    """A row's parameters; None where the row leaves one unset."""

    system: str | None = None
    temperature: float | None = None
    max_tokens: int | None = None
    top_p: float | None = None
    stop: tuple[str, ...] | None = None
    seed: int | None = None


#: A row that sets none.
NO_PARAMETERS = RowParameters()


class ParameterError(ValueError):
    """A parameter cell that does not hold a value the parameter takes."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def read_parameters(cells: Mapping[str, Cell]) -> tuple[RowParameters, list[ParameterError]]:
    """The parameters ``cells`` set, and one error for each that holds a bad value."""
    if cells.keys().isdisjoint(_READERS):
        return NO_PARAMETERS, []
    values: dict[str, object] = {}
    errors: list[ParameterError] = []
    for name, read in _READERS.items():
        cell = cells.get(name)
        if cell is None or (isinstance(cell, str) and not cell.strip()):
            continue
        try:
            values[name] = read(cell)
        except ParameterError as exc:
            errors.append(exc)
    if errors:
        return NO_PARAMETERS, errors
    return RowParameters(**values), []  # type: ignore[arg-type]


def _system(cell: Cell) -> str:
    if not isinstance(cell, str):
        raise ParameterError("system", "must be text")
    return cell


def _number(field: str, cell: Cell, bounds: tuple[float, float]) -> float:
    value: float
    if isinstance(cell, bool):
        raise ParameterError(field, f"must be a number from {bounds[0]:g} to {bounds[1]:g}")
    if isinstance(cell, int | float):
        value = float(cell)
    else:
        try:
            value = float(cell.strip())
        except ValueError:
            raise ParameterError(
                field, f"{cell[:40]!r} is not a number from {bounds[0]:g} to {bounds[1]:g}"
            ) from None
    if not math.isfinite(value) or not bounds[0] <= value <= bounds[1]:
        raise ParameterError(field, f"is {value:g}; it must be from {bounds[0]:g} to {bounds[1]:g}")
    return value


def _integer(field: str, cell: Cell, low: int, high: int, wanted: str) -> int:
    value: float | int
    if isinstance(cell, bool):
        raise ParameterError(field, f"must be {wanted}")
    if isinstance(cell, int | float):
        value = cell
    else:
        text = cell.strip()
        # A sheet's number cell read back as text may be "100.0"; more digits than any
        # bound has are refused before int() is asked to read them.
        if len(text) > 24:
            raise ParameterError(field, f"must be {wanted}")
        try:
            value = int(text)
        except ValueError:
            try:
                value = float(text)
            except ValueError:
                raise ParameterError(field, f"{text!r} is not {wanted}") from None
    if isinstance(value, float):
        if not value.is_integer():
            raise ParameterError(field, f"{value:g} is not {wanted}")
        value = int(value)
    if not low <= value <= high:
        raise ParameterError(field, f"is {value}; it must be {wanted}")
    return value


def _temperature(cell: Cell) -> float:
    return _number("temperature", cell, TEMPERATURE_RANGE)


def _top_p(cell: Cell) -> float:
    return _number("top_p", cell, TOP_P_RANGE)


def _max_tokens(cell: Cell) -> int:
    return _integer(
        "max_tokens", cell, 1, MAX_TOKENS_LIMIT, f"a whole number from 1 to {MAX_TOKENS_LIMIT:,}"
    )


def _seed(cell: Cell) -> int:
    return _integer("seed", cell, *SEED_RANGE, "a whole number (64-bit)")


def _stop(cell: Cell) -> tuple[str, ...]:
    """One stop sequence as the cell's text, or several as a JSON list of strings."""
    if not isinstance(cell, str):
        raise ParameterError("stop", 'must be text, or a JSON list of texts: ["\\n\\n", "END"]')
    sequences: object = [cell]
    if cell.lstrip().startswith("["):
        try:
            sequences = json.loads(cell)
        except (ValueError, RecursionError):
            raise ParameterError("stop", "starts with [ but is not a JSON list of texts") from None
    if not isinstance(sequences, list) or not all(isinstance(s, str) and s for s in sequences):
        raise ParameterError("stop", "must be a JSON list of texts that are not empty")
    if not 1 <= len(sequences) <= MAX_STOP_SEQUENCES:
        raise ParameterError(
            "stop", f"holds {len(sequences)} sequences; give 1 to {MAX_STOP_SEQUENCES}"
        )
    for sequence in sequences:
        if len(sequence) > MAX_STOP_CHARS:
            raise ParameterError(
                "stop", f"a sequence is {len(sequence)} characters; the limit is {MAX_STOP_CHARS}"
            )
    return tuple(sequences)


_READERS = {
    "system": _system,
    "temperature": _temperature,
    "max_tokens": _max_tokens,
    "top_p": _top_p,
    "stop": _stop,
    "seed": _seed,
}
