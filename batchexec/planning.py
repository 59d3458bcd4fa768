"""Submitted rows to a validated batch plan, or every problem with them at once."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from batchexec.catalog import Catalog, Target, UnknownNameError
from batchexec.columns import RESERVED_COLUMNS, Cell
from batchexec.errors import FieldError, InputError
from batchexec.providers.base import NO_OPTIONS, ChatOptions, Turn
from batchexec.templating import TemplateError, references
from batchexec.wording import counted


@dataclass(frozen=True)
class ChatInput:
    """What a row that is a chat request (one of the OpenAI Batch API's) sends besides its
    prompt, the last user turn: a system prompt, the turns before, and options.

    Such a row is sent as written: ``${output.n}`` in it is text, not a reference.
    """

    system: str | None = None
    history: tuple[Turn, ...] = ()
    options: ChatOptions = NO_OPTIONS


@dataclass(frozen=True)
class RowInput:
    """One execution as submitted: its prompt, model or assistant, and every input cell."""

    prompt: str
    model: str | None = None
    assistant: str | None = None
    cells: Mapping[str, Cell] | None = None
    #: A chat request's other parts; None for a prompt, which may use ``${output.n}``.
    chat: ChatInput | None = None


@dataclass(frozen=True)
class PlannedRow:
    """One validated execution."""

    index: int
    prompt: str
    target: Target
    depends_on: frozenset[int]
    cells: Mapping[str, Cell]
    chat: ChatInput | None = None


@dataclass(frozen=True)
class BatchPlan:
    """A validated batch: its input columns and rows, ready to run."""

    columns: tuple[str, ...]
    rows: tuple[PlannedRow, ...]

    def chain_lengths(self) -> dict[int, int]:
        """For each row, how many rows the longest chain starting at it holds (itself included).

        Rows only use earlier rows, so one pass from the last row back is enough.
        """
        lengths = {row.index: 1 for row in self.rows}
        for row in reversed(self.rows):
            for index in row.depends_on:
                lengths[index] = max(lengths[index], lengths[row.index] + 1)
        return lengths


@dataclass(frozen=True)
class Limits:
    """The submission limits a plan is checked against."""

    max_executions: int
    max_prompt_length: int
    default_model: str
    max_columns: int = 256

    def check_count(self, count: int) -> None:
        """Raise ``InputError`` when a batch of ``count`` executions is over the limit.

        Called before the rows are read in full where that is costly, and by
        ``plan_batch`` in any case.
        """
        if count > self.max_executions:
            message = f"The batch has {count} executions; the limit is {self.max_executions}."
            raise InputError(message, [FieldError(None, "executions", message)])

    def check_columns(self, count: int) -> None:
        """Raise ``InputError`` when an input has more than ``max_columns`` columns."""
        if count > self.max_columns:
            message = (
                f"The input has {count} columns; the limit (MAX_COLUMNS) is {self.max_columns}."
            )
            raise InputError(message, [FieldError(None, "columns", message)])


def plan_batch(
    rows: Sequence[RowInput], columns: Sequence[str], catalog: Catalog, limits: Limits
) -> BatchPlan:
    """Validate ``rows`` before any model is called; raises ``InputError`` listing each problem."""
    if not rows:
        raise InputError(
            "The batch has no executions.", [FieldError(None, "executions", "must not be empty")]
        )
    limits.check_count(len(rows))
    limits.check_columns(len(columns))
    errors: list[FieldError] = []
    planned: list[PlannedRow] = []
    # Batches name few distinct models: resolve each (model, assistant) once.
    resolve = functools.cache(
        lambda model, assistant: catalog.resolve(
            model=model, assistant=assistant, default_model=limits.default_model
        )
    )
    for index, row in enumerate(rows, start=1):
        problems = _check_row(index, row, resolve, limits)
        if isinstance(problems, list):
            errors.extend(problems)
        else:
            planned.append(problems)
    if errors:
        count = len({e.index for e in errors})
        raise InputError(
            f"{counted(count, 'execution')} {'is' if count == 1 else 'are'} invalid.", errors
        )
    kept = tuple(name for name in columns if name not in RESERVED_COLUMNS)
    return BatchPlan(columns=kept, rows=tuple(planned))


def _check_row(
    index: int, row: RowInput, resolve: Callable[[str | None, str | None], Target], limits: Limits
) -> PlannedRow | list[FieldError]:
    errors: list[FieldError] = []
    prompt = row.prompt
    if not prompt.strip():
        errors.append(FieldError(index, "prompt", "must not be empty"))
    elif len(prompt) > limits.max_prompt_length:
        errors.append(
            FieldError(
                index,
                "prompt",
                f"is {len(prompt)} characters; the limit is {limits.max_prompt_length}",
            )
        )
    depends_on: frozenset[int] = frozenset()
    try:
        depends_on = references(prompt) if row.chat is None else frozenset()
    except TemplateError as exc:
        errors.append(FieldError(index, "prompt", str(exc)))
    for ref in sorted(depends_on):
        if ref >= index:
            errors.append(
                FieldError(
                    index,
                    "prompt",
                    f"${{output.{ref}}} must name an earlier execution (1 to {index - 1})"
                    if index > 1
                    else f"${{output.{ref}}}: the first execution cannot use an earlier output",
                )
            )
    model = (row.model or "").strip() or None
    assistant = (row.assistant or "").strip() or None
    target: Target | None = None
    if model and assistant:
        errors.append(FieldError(index, "assistant", "set either model or assistant, not both"))
    else:
        try:
            target = resolve(model, assistant)
        except UnknownNameError as exc:
            field = "assistant" if assistant else "model"
            errors.append(FieldError(index, field, str(exc)))
    if errors or target is None:
        return errors
    cells = dict(row.cells) if row.cells is not None else {}
    return PlannedRow(
        index=index,
        prompt=prompt,
        target=target,
        depends_on=depends_on,
        cells=cells,
        chat=row.chat,
    )
