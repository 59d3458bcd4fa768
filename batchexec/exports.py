"""The batch's outputs: CSV content and the XLSX workbook, built from its records alone."""

from __future__ import annotations

import asyncio
import csv
import functools
import io
import itertools
import logging
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from batchexec.catalog import DEFAULT_CURRENCY
from batchexec.columns import OUTPUT_COLUMNS, Cell, cell_text, field_column, group_column
from batchexec.errors import StorageError
from batchexec.files import atomic_path
from batchexec.planning import BatchOptions, BatchPlan
from batchexec.records import Batch, Execution, ExecutionStatus
from batchexec.schemas import execution_fields
from batchexec.slices import in_slices
from batchexec.structured import field_cells
from batchexec.workbook_process import write_sheet_apart
from batchexec.xlsx import MoreSheet, write_sheet

log = logging.getLogger(__name__)

_MAX_WIDTH = 80
_SHEET = "Results"
_USAGE = "Usage"


@dataclass(frozen=True)
class Sheet:
    """A header and rows of cells: strings are text, numbers and booleans are the input's
    (a workbook's number cells) or ours (``latency_ms``, ...); None is empty."""

    header: list[str]
    rows: list[list[Cell | None]]


def result_text(execution: Execution) -> str:
    """The ``result`` cell: the answer, ``Error: <message>`` for a row that failed, else empty."""
    if execution.status is ExecutionStatus.SUCCEEDED:
        return execution.result or ""
    if execution.error:
        return f"Error: {execution.error}"
    return ""


def _input_cells(batch: Batch, execution: Execution) -> list[Cell]:
    """A row's input cells as run, numbers and booleans as they were.

    ``prompt`` shows the prompt as sent, with its variables and ``${output.n}``
    filled in; a blank ``model`` shows the model that ran, unless an assistant
    did. Side by side, the models sent different prompts: ``prompt`` shows it
    as written, and ``model`` as it was.
    """
    side_by_side = bool(batch.options.models)
    sent = None if side_by_side else execution.prompt_sent
    cells = []
    for column in batch.columns:
        value = execution.cells.get(column, "")
        if column == "prompt" and sent is not None:
            value = sent
        elif (
            column == "model"
            and not side_by_side
            and not cell_text(value).strip()
            and not execution.by_assistant
        ):
            value = execution.model
        cells.append(value)
    return cells


def _rows(batch: Batch) -> Iterator[list[Execution]]:
    """The batch's executions by input row, one at a time: one each, or one a model
    side by side."""
    width = max(len(batch.options.models), 1)
    executions = batch.executions
    for start in range(0, len(executions), width):
        yield executions[start : start + width]


def _outcome_cells(
    execution: Execution, columns: Sequence[str], fields: Sequence[str]
) -> list[Cell | None]:
    """``columns`` of one execution's outcome, ``result`` followed by its answer's fields."""
    # The results route's fields, but an empty cell for no error.
    values = execution_fields(execution)
    values["error"] = execution.error or ""
    cells: list[Cell | None] = []
    for column in columns:
        if column == "result":
            cells.append(result_text(execution))
            if fields:
                succeeded = execution.status is ExecutionStatus.SUCCEEDED
                cells += field_cells(execution.result if succeeded else None, fields)
        else:
            cells.append(values[column])
    return cells


def _header(
    batch_columns: Sequence[str], options: BatchOptions, columns: Sequence[str]
) -> list[str]:
    """The header: the input columns, then ``columns`` (``result`` followed by the answer's
    fields), once or once a model side by side."""
    outcome: list[str] = []
    for column in columns:
        outcome.append(column)
        if column == "result":
            outcome += [field_column(field) for field in options.fields]
    if not options.models:
        return [*batch_columns, *outcome]
    groups = [group_column(column, model) for model in options.models for column in outcome]
    return [*batch_columns, *groups]


@dataclass(frozen=True)
class StreamedSheet:
    """A sheet whose rows are made as they are written, read once (``write_xlsx``).

    A 100,000-row batch's cells are a million objects: built as one list
    they all outlive the collector's youngest generation, and its middle
    one walks them again and again (10-33 ms each time, holding the
    interpreter, measured while ``make bench``'s responsive-health wrote a
    workbook). Made a row at a time, each is gone once written.
    """

    header: list[str]
    rows: Iterator[list[Cell | None]]
    #: How many rows ``rows`` makes.
    length: int

    def whole(self) -> Sheet:
        """The same table, its rows in a list."""
        return Sheet(self.header, list(self.rows))


def _streamed(batch: Batch, columns: Sequence[str]) -> StreamedSheet:
    fields = batch.options.fields

    def rows() -> Iterator[list[Cell | None]]:
        for executions in _rows(batch):
            row: list[Cell | None] = [*_input_cells(batch, executions[0])]
            for execution in executions:
                row += _outcome_cells(execution, columns, fields)
            yield row

    length = len(batch.executions) // max(len(batch.options.models), 1)
    return StreamedSheet(_header(batch.columns, batch.options, columns), rows(), length)


def csv_sheet(batch: Batch) -> Sheet:
    """The ``csv_content`` table: the input columns, then ``result`` and the answer's fields
    (``result.<field>``); side by side, these once a model (``result [model]``)."""
    return streamed_csv(batch).whole()


def streamed_csv(batch: Batch) -> StreamedSheet:
    """The ``csv_content`` table (``csv_sheet``), its rows made as they are read."""
    return _streamed(batch, ["result"])


def results_sheet(batch: Batch) -> Sheet:
    """The workbook's table (``streamed_results``, its rows in a list)."""
    return streamed_results(batch).whole()


def streamed_results(batch: Batch) -> StreamedSheet:
    """The workbook's table: the input columns, then ``OUTPUT_COLUMNS``, with the answer's
    fields after ``result``; side by side, these once a model.

    ``model`` is added only when the input has no such column (the input's own
    ``model`` cells already show the model that ran), and never side by side,
    where each group's header names its model. ``cost`` follows
    ``completion_tokens`` when any row has one (a priced model's).
    """
    extra = [
        name
        for name in OUTPUT_COLUMNS
        if name != "model" or (name not in batch.columns and not batch.options.models)
    ]
    # Added when some row has one, and not where the input has a column of the name;
    # from the batch's sums, kept as rows end (a scan of 100,000 rows holds the loop).
    if "cost" not in batch.columns and batch.cost()[0] is not None:
        extra.append("cost")
    if "cached" not in batch.columns and batch.cached():
        extra.append("cached")
    return _streamed(batch, extra)


def template_sheet(plan: BatchPlan) -> Sheet:
    """The workbook ``process_csv`` writes before running: the input rows, and the columns
    ``csv_content`` will add, empty."""
    header = _header(plan.columns, plan.options, ["result"])
    width = max(len(plan.options.models), 1)
    empty = [""] * (len(header) - len(plan.columns))
    rows: list[list[Cell | None]] = [
        [*(row.cells.get(column, "") for column in plan.columns), *empty]
        for row in plan.rows[::width]
    ]
    return Sheet(header, rows)


def render_csv(sheet: Sheet) -> str:
    """``sheet`` as CSV text that round-trips through ``csv.DictReader``, whatever the text.

    Lines end in ``\n``. Python 3.11's writer quotes a field holding ``\n``
    (the line terminator) but not one holding a lone ``\r``, which a reader
    then takes for a line end; a row with a ``\r`` anywhere is therefore
    written with every field quoted (3.12 and later quote it themselves).

    Cells are written exactly as they are, including those that start with
    ``=``, ``+``, ``-`` or ``@``: ``csv_content`` is data for programs and must
    read back unchanged. A spreadsheet application may take such a cell for
    a formula, so people should open the XLSX workbook, where every text cell
    is text, or import the CSV with its columns as text. Numbers (a
    workbook's number cells) are written as the number (``7``, ``0.5``),
    booleans as ``TRUE`` or ``FALSE``, as spreadsheets write them.
    """
    buffer, write = _csv_writer()
    write(sheet.header)
    for row in sheet.rows:
        write(row)
    return buffer.getvalue()


async def render_csv_in_slices(sheet: Sheet | StreamedSheet) -> str:
    """``render_csv(sheet)``, made on the event loop a slice of rows at a time."""
    buffer, write = _csv_writer()
    write(sheet.header)
    async for rows in in_slices(sheet.rows):
        for row in rows:
            write(row)
    return buffer.getvalue()


def _csv_writer() -> tuple[io.StringIO, Callable[[Sequence[Cell | None]], None]]:
    """A buffer, and what writes a row of cells to it as ``render_csv`` says."""
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer, lineterminator="\n")
    quoting_all = csv.writer(buffer, lineterminator="\n", quoting=csv.QUOTE_ALL)

    def write(row: Sequence[Cell | None]) -> None:
        cells = ["" if cell is None else cell_text(cell) for cell in row]
        if any("\r" in cell for cell in cells):
            quoting_all.writerow(cells)
        else:
            writer.writerow(cells)

    return buffer, write


def write_xlsx(path: Path, sheet: Sheet | StreamedSheet, usage: Sheet | None = None) -> None:
    """Write ``sheet`` to ``path`` atomically: to a temporary name in the same folder, then renamed.

    Blocking: for the command line. The server writes through ``write_workbook``.
    Every string is written as a string cell, never as a formula, link or
    number. ``usage`` (``usage_sheet``) follows as a second sheet; the first,
    ``Results``, is what is read back.
    """
    rows, widths = _with_widths(sheet)
    with atomic_path(path) as temporary:
        write_sheet(str(temporary), _SHEET, sheet.header, rows, widths, _more(usage))


#: A workbook of more rows than this is written by a process of its own
#: (``workbook_process``); a smaller one in a worker thread, sooner than a
#: process starts (about 0.1 s) and too soon to stall anything.
_APART_ROWS = 2_000


async def write_workbook(
    path: Path, sheet: Sheet | StreamedSheet, usage: Sheet | None = None
) -> None:
    """``write_xlsx`` without holding up the event loop.

    A large sheet's rows are made on the loop a slice at a time and written
    by a process of its own, at a lower priority; a small one is written in
    a worker thread.
    """
    length = sheet.length if isinstance(sheet, StreamedSheet) else len(sheet.rows)
    if length <= _APART_ROWS:
        await asyncio.to_thread(write_xlsx, path, sheet, usage)
        return
    rows, widths = _with_widths(sheet)
    with atomic_path(path) as temporary:
        await write_sheet_apart(temporary, _SHEET, sheet.header, rows, widths, _more(usage))


def _with_widths(
    sheet: Sheet | StreamedSheet,
) -> tuple[Iterator[list[Cell | None]], list[float]]:
    """``sheet``'s rows and its column widths, from the first rows: a streamed sheet's are
    read ahead, then given first."""
    rest = iter(sheet.rows)
    first = list(itertools.islice(rest, _SAMPLE))
    return itertools.chain(first, rest), _widths(sheet.header, first)


def _more(usage: Sheet | None) -> list[MoreSheet]:
    """The sheets after ``Results``: ``Usage``, if there is one."""
    if usage is None:
        return []
    return [(_USAGE, usage.header, usage.rows, _widths(usage.header, usage.rows[:_SAMPLE]))]


def usage_sheet(batch: Batch, currency: str) -> Sheet | None:
    """The workbook's ``Usage`` sheet: each model's tokens and cost, then the batch's total;
    None for a batch no row of which has a cost (no model priced)."""
    total, uncosted = batch.cost()
    if total is None:
        return None
    header = ["model", "prompt_tokens", "completion_tokens", "cost", "uncosted", "currency"]
    rows: list[list[Cell | None]] = [
        [name, prompt, completion, cost, missing, currency]
        for name, (cost, missing, prompt, completion) in batch.usage_by_model().items()
    ]
    prompt_tokens, completion_tokens = batch.tokens()
    rows.append(["total", prompt_tokens, completion_tokens, total, uncosted, currency])
    return Sheet(header, rows)


#: The rows that set a sheet's column widths.
_SAMPLE = 200


def _widths(header: Sequence[str], first: Sequence[Sequence[Cell | None]]) -> list[float]:
    """Column widths from the header and the first rows: enough to read, capped."""
    widths = [float(max(len(name), 8)) for name in header]
    for row in first:
        for column, cell in enumerate(row):
            if cell is not None:
                longest = max((len(line) for line in str(cell).splitlines()), default=0)
                widths[column] = max(widths[column], float(min(longest, _MAX_WIDTH)))
    return [width + 2 for width in widths]


@dataclass(frozen=True)
class Outputs:
    """What writing a finished batch's outputs gave.

    The CSV content is not among them: it is rendered from the records when
    asked (``render_csv(csv_sheet(batch))``), and kept rendered only with the
    results answer, so a finished batch's record stays small.
    """

    #: The workbook's file name in the results folder, if the batch has one.
    xlsx_name: str | None


#: Writes a finished batch's outputs; the engine is given one.
OutputWriter = Callable[[Batch], Awaitable[Outputs]]
#: Results workbooks written at once, at most: each holds one sheet's rows in memory.
_CONCURRENT_WRITES = 2


class ResultWorkbooks:
    """The server's results workbooks: each written once (``write_workbook``), a few at a time.

    A finished batch's workbook is written after the batch has ended, not
    before: ``done`` and ``xlsx_url`` do not wait for it. ``ensure`` gives a
    workbook's path once it is there, waiting for a write under way or making
    it again from the records when its file is gone (a new disk, a cleaned
    folder, a crash mid-write). A write that fails is logged; the download
    tries again and says why it cannot.
    """

    def __init__(
        self,
        folder: Path,
        load: Callable[[str, str], Awaitable[Batch]],
        currency: str = DEFAULT_CURRENCY,
    ) -> None:
        """``load(batch_id, owner)`` reads a batch back: a write waiting its turn holds
        only the batch's id, not its rows. ``currency`` is the catalog's, for the
        ``Usage`` sheet."""
        self.currency = currency
        self.folder = folder
        self._load = load
        self._writing: dict[str, asyncio.Task[Path]] = {}
        self._slots = asyncio.Semaphore(_CONCURRENT_WRITES)

    def writer(self) -> OutputWriter:
        """The engine's writer: names the workbook at once; ``batch_ended`` writes it."""

        async def write(batch: Batch) -> Outputs:
            return Outputs(batch.file_name)

        return write

    def batch_ended(self, batch: Batch) -> None:
        """Start writing the workbook of a batch that has ended here (a registry's listener).

        Only once the end is shown: making a workbook's rows competes with the
        end's own work (the store's writer records it, the loop shows it), and
        would make ``done`` itself late.
        """
        if batch.xlsx_name == batch.file_name:
            self._start(batch)

    async def ensure(self, batch: Batch) -> Path:
        """The path of ``batch``'s workbook, written (again) first if it is not there."""
        path = self.folder / batch.file_name
        task = self._writing.get(batch.file_name)
        if task is None:
            if path.is_file():
                return path
            task = self._start(batch)
        return await asyncio.shield(task)

    async def written(self, name: str) -> None:
        """Wait for the write of workbook ``name``, if one is under way."""
        task = self._writing.get(name)
        if task is not None:
            await asyncio.shield(task)

    async def idle(self) -> None:
        """Wait for every write under way (at shutdown, and in tests)."""
        while self._writing:
            await asyncio.gather(*self._writing.values(), return_exceptions=True)

    def _start(self, batch: Batch) -> asyncio.Task[Path]:
        """The write of ``batch``'s workbook: the one under way, or a new one."""
        name = batch.file_name
        task = self._writing.get(name)
        if task is not None:
            return task
        # A write that can start now takes the batch as it is: read back from the
        # store it would be a second copy of every row. One that waits for a slot
        # holds only its id meanwhile. Counted from the writes started, not from the
        # slots: several batches ending in one turn start their writes before any
        # of them has taken a slot.
        held = batch if len(self._writing) < _CONCURRENT_WRITES else None
        task = asyncio.create_task(
            self._write(batch.id, batch.owner, held), name=f"workbook {name}"
        )
        self._writing[name] = task
        task.add_done_callback(functools.partial(self._written, name))
        return task

    def _written(self, name: str, task: asyncio.Task[Path]) -> None:
        self._writing.pop(name, None)
        if not task.cancelled():
            task.exception()  # logged by _write; retrieved so asyncio does not log it again

    async def _write(self, batch_id: str, owner: str, batch: Batch | None = None) -> Path:
        async with self._slots:
            if batch is None:
                batch = await self._load(batch_id, owner)
            path = self.folder / batch.file_name
            try:
                await write_workbook(
                    path, streamed_results(batch), usage_sheet(batch, self.currency)
                )
            except Exception as exc:
                reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
                log.error("batch %s: could not write its workbook: %s", batch.id, reason)
                raise StorageError(
                    f"The workbook could not be written ({reason}); the CSV content of the "
                    "results route is complete."
                ) from exc
        return path
