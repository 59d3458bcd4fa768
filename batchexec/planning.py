"""Submitted rows to a validated batch plan, or every problem with them at once.

A row's prompt is checked and compiled here, once: its ``{{column}}``
variables filled from its cells (``templating``), its parameters read
(``parameters``), its model resolved. A batch of several models side by side
(``BatchOptions.models``) plans each input row once and then runs it on each
model: input row ``i`` on model ``k`` (both from 1) is execution
``(i - 1) * len(models) + k``, and its ``${output.n}`` names input row ``n``
on the same model.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from batchexec.catalog import Catalog, Target, UnknownNameError
from batchexec.columns import (
    OUTPUT_COLUMNS,
    RESERVED_COLUMNS,
    SHEET_MAX_COLUMNS,
    Cell,
    cell_text,
)
from batchexec.errors import FieldError, InputError
from batchexec.parameters import NO_PARAMETERS, RowParameters, read_parameters
from batchexec.providers.base import NO_OPTIONS, ChatOptions, Turn
from batchexec.structured import check_schema, fields_of, response_format
from batchexec.templating import (
    Template,
    TemplateError,
    compile_template,
    filled_length,
    references,
    substitute,
    substituted_length,
    uses_variables,
)
from batchexec.wording import counted

#: Models a batch may run side by side, at most.
MAX_MODELS = 10


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
    #: The prompt as submitted: a template, unless ``verbatim``.
    prompt: str
    target: Target
    depends_on: frozenset[int]
    cells: Mapping[str, Cell]
    #: The system prompt, earlier turns and options the row sends besides its prompt.
    chat: ChatInput | None = None
    #: The prompt compiled, where it has variables (or runs beside other models); None
    #: for a prompt whose only references are ``${output.n}``, filled in as it is.
    template: Template | None = None
    #: A chat request of the OpenAI Batch API: sent as written, never templated.
    verbatim: bool = False
    #: Side by side, how many models each input row runs on: execution ``n`` is then
    #: input row ``(n - 1) // side_by_side + 1``, as its prompt names it.
    side_by_side: int = 1

    def written(self, index: int) -> int:
        """The row number the prompt names for execution ``index`` (its input row's)."""
        return (index - 1) // self.side_by_side + 1

    def sent_length(self, outputs: Mapping[int, str]) -> int:
        """The length of the prompt as it would be sent, given the earlier rows' outputs."""
        if self.verbatim:
            return len(self.prompt)
        if self.template is not None:
            return self.template.length(outputs)
        return substituted_length(self.prompt, outputs)

    def sent_prompt(self, outputs: Mapping[int, str]) -> str:
        """The prompt as sent: variables and ``${output.n}`` filled in."""
        if self.verbatim:
            return self.prompt
        if self.template is not None:
            return self.template.render(outputs)
        return substitute(self.prompt, outputs)


@dataclass(frozen=True)
class BatchOptions:
    """What a batch asks of every row: the models it runs side by side, the answer's schema.

    Kept with the batch (as JSON), so that a restart or a retry plans it again
    the same way and its outputs are laid out the same way.
    """

    #: The models (or assistants) each row runs on, in their column groups' order;
    #: empty for a batch whose rows name their own.
    models: tuple[str, ...] = ()
    #: The JSON Schema every row's answer must match, unless the row gives its own.
    response_schema: Mapping[str, Any] | None = None
    #: The answer fields the outputs spread into columns (``result.<field>``): the
    #: top-level properties of every schema the batch's rows have, in order.
    fields: tuple[str, ...] = ()
    #: The batch's budget, in the catalog's currency: once its rows' cost (those it
    #: keeps from a batch it retries included) reaches it, no other row is sent
    #: (``engine``). None for no budget.
    max_cost: float | None = None
    #: Whether its rows use the answer cache (``answer_cache``): None leaves it to each
    #: model's ``cache``, else the server's ``CACHE_ANSWERS``; False bypasses it.
    cache: bool | None = None

    def to_json(self) -> str | None:
        """The options as stored; None for a batch with none."""
        if self == NO_BATCH_OPTIONS:
            return None
        document: dict[str, Any] = {}
        if self.models:
            document["models"] = list(self.models)
        if self.response_schema is not None:
            document["response_schema"] = self.response_schema
        if self.fields:
            document["fields"] = list(self.fields)
        if self.max_cost is not None:
            document["max_cost"] = self.max_cost
        if self.cache is not None:
            document["cache"] = self.cache
        return json.dumps(document, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str | None) -> BatchOptions:
        """Options as ``to_json`` stored them."""
        if not text:
            return NO_BATCH_OPTIONS
        document = json.loads(text)
        return cls(
            models=tuple(document.get("models", ())),
            response_schema=document.get("response_schema"),
            fields=tuple(document.get("fields", ())),
            max_cost=document.get("max_cost"),
            cache=document.get("cache"),
        )


#: A batch with no options: each row names its model, no answer schema.
NO_BATCH_OPTIONS = BatchOptions()


@dataclass(frozen=True)
class BatchPlan:
    """A validated batch: its input columns and rows, ready to run."""

    columns: tuple[str, ...]
    rows: tuple[PlannedRow, ...]
    options: BatchOptions = NO_BATCH_OPTIONS

    @property
    def input_rows(self) -> int:
        """How many rows the input had: the executions, over the models side by side."""
        return len(self.rows) // max(len(self.options.models), 1)

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
    rows: Sequence[RowInput],
    columns: Sequence[str],
    catalog: Catalog,
    limits: Limits,
    options: BatchOptions = NO_BATCH_OPTIONS,
) -> BatchPlan:
    """Validate ``rows`` before any model is called; raises ``InputError`` listing each problem.

    With ``options.models``, each row runs on each of them (see the module's
    docstring), and counts against ``max_executions`` once a model.
    """
    if not rows:
        raise InputError(
            "The batch has no executions.", [FieldError(None, "executions", "must not be empty")]
        )
    models = options.models
    limits.check_count(len(rows) * max(len(models), 1))
    limits.check_columns(len(columns))
    errors: list[FieldError] = []
    planned: list[PlannedRow] = []
    # Batches name few distinct models: resolve each (model, assistant) once.
    resolve = functools.cache(
        lambda model, assistant: catalog.resolve(
            model=model, assistant=assistant, default_model=limits.default_model
        )
    )
    targets = _side_by_side(models, catalog) if models else None
    variables = _Variables(columns)
    schemas = _Schemas(options.response_schema)
    for index, row in enumerate(rows, start=1):
        problems = _check_row(
            index,
            row,
            resolve,
            limits,
            variables,
            schemas,
            side_by_side=targets[0] if targets else None,
        )
        if isinstance(problems, list):
            errors.extend(problems)
        else:
            planned.append(problems)
    if errors:
        count = len({e.index for e in errors})
        raise InputError(
            f"{counted(count, 'execution')} {'is' if count == 1 else 'are'} invalid.", errors
        )
    kept = tuple(
        name
        for name in columns
        # Side by side, no row names a model or an assistant: each group's header does.
        if name not in RESERVED_COLUMNS and not (models and name in ("model", "assistant"))
    )
    if targets is not None:
        planned = _expanded(planned, targets)
    planned = [schemas.of_assistant(row) for row in planned]
    fields = schemas.fields()
    _check_width(len(kept), len(fields), max(len(models), 1))
    return BatchPlan(columns=kept, rows=tuple(planned), options=replace(options, fields=fields))


def _check_width(columns: int, fields: int, groups: int) -> None:
    """Raise ``InputError`` when the outputs would be wider than a workbook's sheet."""
    # Every output column (cost and cached too) and each answer field, once a model.
    width = columns + groups * (len(OUTPUT_COLUMNS) + 2 + fields)
    if width > SHEET_MAX_COLUMNS:
        message = (
            f"the outputs would have {width:,} columns ({fields:,} answer fields, "
            f"{counted(groups, 'model')}); a workbook's sheet holds {SHEET_MAX_COLUMNS:,}"
        )
        raise InputError(
            f"The batch is too wide: {message}.", [FieldError(None, "response_schema", message)]
        )


class _Schemas:
    """The answer schemas of a batch's rows: each row's own (a ``response_schema`` cell,
    JSON text), else the batch's, else its assistant's; each text checked once."""

    def __init__(self, batch_schema: Mapping[str, Any] | None) -> None:
        self.batch = dict(batch_schema) if batch_schema is not None else None
        self._by_text: dict[str, dict[str, Any] | str] = {}
        self._used: dict[int, dict[str, Any]] = {}
        if self.batch is not None:
            self._used[id(self.batch)] = self.batch

    def of_row(self, cells: Mapping[str, Cell]) -> dict[str, Any] | None:
        """The row's schema; ``ValueError`` for a cell that holds none."""
        cell = cells.get("response_schema")
        if cell is None or not cell_text(cell).strip():
            return self.batch
        text = cell_text(cell)
        found = self._by_text.get(text)
        if found is None:
            try:
                found = check_schema(json.loads(text))
            except (ValueError, RecursionError) as exc:
                found = str(exc) if isinstance(exc, ValueError) else "is nested too deeply"
                if isinstance(exc, json.JSONDecodeError):
                    found = f"is not JSON: {exc.msg} at column {exc.colno}"
            self._by_text[text] = found
        if isinstance(found, str):
            raise ValueError(found)
        self._used[id(found)] = found
        return found

    def of_assistant(self, row: PlannedRow) -> PlannedRow:
        """``row`` asking for its assistant's schema, when it has none of its own."""
        schema = row.target.response_schema
        if schema is None or row.verbatim:
            return row
        chat = row.chat or ChatInput()
        if chat.options.response_format is not None:
            return row
        self._used.setdefault(id(schema), dict(schema))
        options = replace(chat.options, response_format=response_format(dict(schema)))
        return replace(row, chat=replace(chat, options=options))

    def fields(self) -> tuple[str, ...]:
        """The top-level fields of every schema a row uses, in the order first seen."""
        names: dict[str, None] = {}
        for schema in self._used.values():
            names.update(dict.fromkeys(fields_of(schema)))
        return tuple(names)


def _side_by_side(models: Sequence[str], catalog: Catalog) -> list[Target]:
    """The targets of a batch's ``models``: each a model's name, else an assistant's."""
    if not 1 <= len(models) <= MAX_MODELS:
        message = f"names {len(models)} models; give 1 to {MAX_MODELS}"
        raise InputError(f"models: {message}.", [FieldError(None, "models", message)])
    targets: list[Target] = []
    errors: list[FieldError] = []
    for name in models:
        try:
            targets.append(catalog.resolve(model=name, assistant=None, default_model=name))
        except UnknownNameError as exc:
            try:
                targets.append(catalog.resolve(model=None, assistant=name, default_model=name))
            except UnknownNameError:
                errors.append(FieldError(None, "models", str(exc)))
    names = [(t.assistant or t.model.name) for t in targets]
    if not errors and len(set(names)) < len(names):
        errors.append(FieldError(None, "models", "names the same model twice"))
    if errors:
        raise InputError(f"models: {errors[0].message}", errors)
    return targets


def _expanded(rows: Sequence[PlannedRow], targets: Sequence[Target]) -> list[PlannedRow]:
    """Each row once a model, numbered as the module's docstring says."""
    count = len(targets)
    expanded: list[PlannedRow] = []
    for row in rows:
        template = row.template
        assert template is not None  # side by side, every prompt is compiled
        for k, target in enumerate(targets, start=1):

            def number(n: int, k: int = k) -> int:
                return (n - 1) * count + k

            expanded.append(
                replace(
                    row,
                    index=number(row.index),
                    target=target,
                    depends_on=frozenset(number(n) for n in row.depends_on),
                    template=template.renumbered(number),
                    side_by_side=count,
                )
            )
    return expanded


class _Variables:
    """What ``{{name}}`` finds in a row: its cell of that name, else of the one column that
    name matches case-insensitively; an empty cell where the row has none of a column."""

    def __init__(self, columns: Sequence[str]) -> None:
        self.columns = [name for name in columns if name]
        self._folded: dict[str, str] = {}
        for name in self.columns:
            self._folded.setdefault(name.casefold(), name)

    def lookup(self, cells: Mapping[str, Cell]) -> Callable[[str], str | None]:
        def find(name: str) -> str | None:
            cell = cells.get(name)
            if cell is None:
                column = self._folded.get(name.casefold())
                if column is None:
                    return None
                cell = cells.get(column, "")
            return cell_text(cell)

        return find


def _check_row(
    index: int,
    row: RowInput,
    resolve: Callable[[str | None, str | None], Target],
    limits: Limits,
    variables: _Variables,
    schemas: _Schemas,
    *,
    side_by_side: Target | None = None,
) -> PlannedRow | list[FieldError]:
    """One row planned, or its problems. ``side_by_side`` is the first of the batch's
    models, which the row stands on until ``_expanded`` makes it one row a model."""
    errors: list[FieldError] = []
    prompt = row.prompt
    verbatim = row.chat is not None
    cells = row.cells if row.cells is not None else {}
    lookup = variables.lookup(cells)
    compiles = not verbatim and (side_by_side is not None or uses_variables(prompt))
    length = filled_length(prompt, lookup) if compiles else len(prompt)
    if not prompt.strip():
        errors.append(FieldError(index, "prompt", "must not be empty"))
    elif length > limits.max_prompt_length:
        filled = " with its variables filled in" if length != len(prompt) else ""
        errors.append(
            FieldError(
                index,
                "prompt",
                f"is {length} characters{filled}; the limit is {limits.max_prompt_length}",
            )
        )
    depends_on: frozenset[int] = frozenset()
    template: Template | None = None
    try:
        if compiles and not errors:
            template = compile_template(prompt, lookup, lambda: variables.columns)
            depends_on = template.references
        elif not verbatim and not compiles:
            depends_on = references(prompt)
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
    chat = row.chat
    if not verbatim:
        parameters, problems = read_parameters(cells)
        errors += [FieldError(index, problem.field, str(problem)) for problem in problems]
        system = _system_prompt(index, parameters, limits, lookup, variables, errors)
        schema: dict[str, Any] | None = None
        try:
            schema = schemas.of_row(cells)
        except ValueError as exc:
            errors.append(FieldError(index, "response_schema", str(exc)))
        if system is not None or parameters != NO_PARAMETERS or schema is not None:
            options = _options(parameters)
            if schema is not None:
                options = replace(options, response_format=response_format(schema))
            chat = ChatInput(system=system, options=options)
    model = (row.model or "").strip() or None
    assistant = (row.assistant or "").strip() or None
    target: Target | None = None
    if side_by_side is not None and (model or assistant):
        field = "assistant" if assistant else "model"
        errors.append(
            FieldError(index, field, "the batch names its models; a row cannot name its own")
        )
    elif model and assistant:
        errors.append(FieldError(index, "assistant", "set either model or assistant, not both"))
    else:
        try:
            target = side_by_side or resolve(model, assistant)
        except UnknownNameError as exc:
            field = "assistant" if assistant else "model"
            errors.append(FieldError(index, field, str(exc)))
    if errors or target is None:
        return errors
    return PlannedRow(
        index=index,
        prompt=prompt,
        target=target,
        depends_on=depends_on,
        cells=dict(cells),
        chat=chat,
        template=template,
        verbatim=verbatim,
    )


def _system_prompt(
    index: int,
    parameters: RowParameters,
    limits: Limits,
    lookup: Callable[[str], str | None],
    variables: _Variables,
    errors: list[FieldError],
) -> str | None:
    """A row's own system prompt with its variables filled in; it takes no ``${output.n}``."""
    system = parameters.system
    if system is None:
        return None
    templated = uses_variables(system)
    # Counted before it is built, as a prompt's is: a cell named a thousand times.
    length = filled_length(system, lookup) if templated else len(system)
    if length > limits.max_prompt_length:
        filled = " with its variables filled in" if length != len(system) else ""
        errors.append(
            FieldError(
                index,
                "system",
                f"is {length} characters{filled}; the limit is {limits.max_prompt_length}",
            )
        )
        return None
    try:
        template = compile_template(system, lookup, lambda: variables.columns)
    except TemplateError as exc:
        errors.append(FieldError(index, "system", str(exc)))
        return None
    if template.references:
        errors.append(FieldError(index, "system", "cannot use ${output.n}; the prompt can"))
        return None
    return template.render({}) if templated else system


def _options(parameters: RowParameters) -> ChatOptions:
    return ChatOptions(
        temperature=parameters.temperature,
        max_tokens=parameters.max_tokens,
        top_p=parameters.top_p,
        stop=parameters.stop,
        seed=parameters.seed,
    )
