"""``python -m batchexec run``: a batch run in this process, with the server's engine."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TextIO

from batchexec.catalog import Catalog
from batchexec.cli.exits import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE
from batchexec.cli.files import Output, output_problem
from batchexec.cli.inputfile import (
    INPUT_HELP,
    Source,
    execution_place,
    label_of,
    print_problems,
    read_source,
)
from batchexec.cli.journal import as_stopped, end_journal, journal_store, journaled_run
from batchexec.cli.journal import journal_for as journal_for  # re-exported: tests import it here
from batchexec.cli.options import (
    PROG,
    Commands,
    add_catalog_options,
    batch_options,
    configuration,
    positive_float,
    positive_int,
)
from batchexec.cli.progress import (
    DEFAULT_EVERY_S,
    ProgressDisplay,
    Summary,
    add_progress_option,
    showing,
)
from batchexec.config import Settings
from batchexec.engine import Engine
from batchexec.errors import ConfigError, ConflictError, InputError
from batchexec.events import Event
from batchexec.exports import csv_sheet, render_csv, streamed_results, usage_sheet, write_xlsx
from batchexec.files import write_atomically
from batchexec.inputs import plan_rows
from batchexec.planning import NO_BATCH_OPTIONS, BatchOptions
from batchexec.providers import Provider
from batchexec.readiness import require_ready
from batchexec.records import Batch, ExecutionStatus, progress_counts
from batchexec.registry import Registry
from batchexec.runtime import limits_from, open_runtime
from batchexec.store import StoreError

_PROBLEMS_SHOWN = 5

_EPILOG = f"""\
examples:
  {PROG} run prompts.csv -o results.xlsx --model echo
  {PROG} run prompts.xlsx -o results.xlsx --csv results.csv --threads 8 --timeout 60
  {PROG} run batch.json -o results.xlsx --catalog my-models.toml
  {PROG} run prompts.csv -o compared.xlsx --models gpt-4o-mini,local-llama
  {PROG} run reviews.csv -o rated.xlsx --schema rating.schema.json
  cat batch.jsonl | {PROG} run - -o results.xlsx

INPUT holds one execution a row:
  CSV    a 'prompt' column; 'model' and 'assistant' optional; other columns are kept
  JSON   {{"executions": [{{"prompt": "...", "model": "..."}}, ...]}}
  JSONL  one {{"prompt": ..., "model": ...}} object a line
  XLSX   the 'Results' sheet, else the first, laid out like the CSV (the workbook
         process_csv writes, filled in, works; its output columns are ignored)

A prompt's {{{{column}}}} is filled from the row's cell; columns system,
temperature, max_tokens, top_p, stop, seed and response_schema set the row's
own parameters, as on the server.

--models A,B,C runs every row on each model: the outputs have one row an
input row and a group of result columns a model ('result [A]', 'status [A]',
...), ${{output.n}} is row n's answer from the same model, and each row x model
is one execution (counted by the progress and against
MAX_EXECUTIONS_PER_BATCH). --schema makes every answer JSON that matches the
schema, its top-level fields spread into 'result.<field>' columns.

The rows are checked first, against the same limits and catalog as the server
(MAX_EXECUTIONS_PER_BATCH, MAX_PROMPT_LENGTH, BATCHEXEC_MODELS, ...), and
every model they name must be callable as configured (its keys and address
set); nothing is sent to a model unless every row is valid. Progress goes to standard error:
a live bar on a terminal, otherwise a line every --progress-every seconds.

The run is journaled to OUT.xlsx.journal (--journal to choose the file): if
it is killed, or stopped with Ctrl-C, running the same command again continues
it, without sending a finished row again (rows that were running are sent
again); --fresh starts over instead. A journal of other rows, or of the same
rows with other --models or --schema, is refused. The journal is removed once
the run ends.

Ctrl-C once stops the batch and writes the outputs with the rows that
finished (the others show as cancelled); Ctrl-C again quits at once.

The outputs are checked before anything runs: -o must end in .xlsx and --csv
in .csv (the formats written there), each in a folder that exists (none is
made), none of them the input file or the same file as another; anything
else stops the run with exit status 2.

exit status: 0 every row succeeded, 1 some rows did not, 2 bad input or
configuration (nothing was run), 130 interrupted.
"""


def register(commands: Commands) -> None:
    """Add the ``run`` command."""
    parser = commands.add_parser(
        "run",
        help="run a batch here, without a server, and write its results",
        description="Run a batch of prompts in this process, with the same validation, "
        "limits, catalog, providers, retries and outputs as the server.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("input", metavar="INPUT", help=INPUT_HELP)
    parser.add_argument(
        "-o",
        "--output",
        metavar="OUT.xlsx",
        type=Path,
        required=True,
        help="where to write the results workbook: a name ending in .xlsx, in a folder that exists",
    )
    parser.add_argument(
        "--csv",
        metavar="OUT.csv",
        type=Path,
        help="also write the results as CSV here: a name ending in .csv, in a folder that exists",
    )
    add_catalog_options(parser, side_by_side=True)
    parser.add_argument(
        "--threads",
        metavar="N",
        type=positive_int,
        help="executions in flight at once (overrides DEFAULT_MAX_THREADS)",
    )
    parser.add_argument(
        "--timeout",
        metavar="S",
        type=positive_float,
        help="seconds for one execution, retries included (overrides EXECUTION_TIMEOUT)",
    )
    parser.add_argument(
        "--journal",
        metavar="PATH",
        type=Path,
        help="where the run is journaled, to be continued, in a folder that exists "
        "(default: OUT.xlsx.journal)",
    )
    parser.add_argument(
        "--fresh",
        action="store_true",
        help="discard the journal of an earlier run of this command and start over",
    )
    add_progress_option(parser)
    parser.set_defaults(handler=command)


def command(args: argparse.Namespace) -> int:
    """Run ``run`` with parsed ``args``."""
    stream = sys.stderr
    outputs = [Output("-o", args.output, ".xlsx", "an XLSX workbook")]
    if args.csv is not None:
        outputs.append(Output("--csv", args.csv, ".csv", "CSV"))
    problem = output_problem(outputs, args.input)
    if problem is None:
        # Once -o is known to be a file's name: the default journal is named after it.
        journal = args.journal or journal_for(args.output)
        problem = output_problem([*outputs, Output("--journal", journal)], args.input)
    if problem:
        print(f"batchexec: {problem}", file=stream)
        return EXIT_USAGE
    try:
        settings, catalog = configuration(args)
    except ConfigError as exc:
        print(f"batchexec: {exc}", file=stream)
        return EXIT_USAGE
    try:
        options = batch_options(args)
    except ValueError as exc:
        print(f"batchexec: {exc}", file=stream)
        return EXIT_USAGE
    try:
        options = replace(options, max_cost=settings.budget(options.max_cost))
    except ValueError as exc:
        print(f"batchexec: --max-cost {exc}.", file=stream)
        return EXIT_USAGE
    try:
        source = read_source(args.input, max_rows=settings.max_executions_per_batch)
    except InputError as exc:
        print_problems(exc, label_of(args.input), None, stream)
        return EXIT_USAGE
    try:
        return asyncio.run(
            run_batch(
                source,
                settings,
                catalog,
                output=args.output,
                csv_output=args.csv,
                options=options,
                journal=journal,
                fresh=args.fresh,
                stream=stream,
                every_s=args.progress_every,
            )
        )
    except InputError as exc:
        print_problems(exc, source.label, source.rows, stream)
        return EXIT_USAGE
    except StoreError as exc:
        print(f"batchexec: {exc}", file=stream)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("\nbatchexec: interrupted before the batch started.", file=stream)
        return EXIT_INTERRUPTED


async def run_batch(
    source: Source,
    settings: Settings,
    catalog: Catalog,
    *,
    output: Path,
    csv_output: Path | None = None,
    options: BatchOptions = NO_BATCH_OPTIONS,
    journal: Path | None = None,
    fresh: bool = False,
    stream: TextIO,
    live: bool | None = None,
    every_s: float = DEFAULT_EVERY_S,
    extra_providers: Sequence[type[Provider]] = (),
    exit_now: Callable[[int], object] = os._exit,
) -> int:
    """Validate, run and write the outputs of ``source``; returns the exit code.

    ``options`` are the batch's: its models side by side, its answers' schema.
    Raises ``InputError`` listing every problem before any model is called
    (a model that cannot be called as configured among them), and
    ``StoreError`` when the journal cannot be used. With a ``journal``
    (None keeps nothing), an earlier run of the same rows and options that did
    not end is continued (``fresh`` discards it). ``exit_now`` ends the process
    on a second Ctrl-C.
    """
    loop = asyncio.get_running_loop()
    async with open_runtime(settings, catalog, extra_providers) as runtime:
        plan = plan_rows(source.rows, runtime.catalog, limits_from(settings), options)
        # Refused before the journal is opened: a run its models cannot make leaves nothing.
        require_ready(plan, runtime.providers, source.rows)
        store = journal_store(journal)
        await store.open()
        registry = Registry(store)
        await registry.start()
        # The server keeps its own copy of each workbook; a run from the terminal
        # writes only the files it was asked for.
        engine = Engine(settings, registry, runtime.providers)
        started_s = loop.time()
        try:
            batch = await journaled_run(
                engine,
                registry,
                plan,
                journal,
                stream,
                fresh=fresh,
                catalog=runtime.catalog,
                settings=settings,
            )
            stopped = asyncio.Event()

            async def stop() -> None:
                # Left in the journal, not cancelled: the next run continues it.
                await engine.close()
                stopped.set()

            interrupts = Interrupts(stop, stream, exit_now=exit_now)
            display = ProgressDisplay(stream, total=len(plan.rows), live=live, every_s=every_s)
            with interrupts.installed(loop):
                if not batch.status.finished:
                    with registry.events.watch(batch.id) as events:
                        async with showing(display):
                            await _follow(events, batch, display, stopped)
                await interrupts.settled()
                # Rows whose end was recorded before the stop are shown as ended.
                await registry.flush()
                elapsed_s = loop.time() - started_s
                stopped_early = not batch.status.finished
                shown = as_stopped(batch) if stopped_early else batch
                written, failures = await asyncio.to_thread(
                    _write_outputs, shown, output, csv_output, catalog.currency
                )
        finally:
            await engine.close()
            await registry.close()
            await store.close()
    if journal is not None:
        end_journal(journal, stream, stopped_early=stopped_early, failed=bool(failures))
    summary = replace(_summary(shown, source, elapsed_s, written), currency=catalog.currency)
    print(summary.render(), file=stream)
    for failure in failures:
        print(f"batchexec: {failure}", file=stream)
    if interrupts.count:
        return EXIT_INTERRUPTED
    return EXIT_OK if summary.all_succeeded and not failures else EXIT_FAILED


class Interrupts:
    """Ctrl-C: the first press cancels the batch and keeps what finished; the second quits."""

    def __init__(
        self,
        cancel: Callable[[], Awaitable[None]],
        stream: TextIO,
        *,
        exit_now: Callable[[int], object] = os._exit,
    ) -> None:
        self.count = 0
        self._cancel = cancel
        self._stream = stream
        self._exit_now = exit_now
        self._cancelling: asyncio.Task[None] | None = None

    def __call__(self) -> None:
        """Handle one SIGINT."""
        self.count += 1
        if self.count == 1:
            print(
                "\nbatchexec: cancelling; the rows that finished are kept "
                "(Ctrl-C again to quit at once)",
                file=self._stream,
            )
            self._cancelling = asyncio.get_running_loop().create_task(self._cancel_quietly())
            return
        print("\nbatchexec: interrupted again; quitting now", file=self._stream)
        self._stream.flush()
        # Quitting at once is the point: nothing may wait, not even cleanup.
        self._exit_now(EXIT_INTERRUPTED)

    @contextlib.contextmanager
    def installed(self, loop: asyncio.AbstractEventLoop) -> Iterator[None]:
        """Handle SIGINT while the block runs, where the platform lets the loop do so."""
        try:
            loop.add_signal_handler(signal.SIGINT, self)
        except (NotImplementedError, RuntimeError, ValueError):
            # No loop signal handlers here (Windows, or not the main thread):
            # Ctrl-C stays Python's KeyboardInterrupt.
            yield
            return
        try:
            yield
        finally:
            loop.remove_signal_handler(signal.SIGINT)

    async def settled(self) -> None:
        """Wait until a cancel the first Ctrl-C started has finished."""
        if self._cancelling is not None:
            await self._cancelling

    async def _cancel_quietly(self) -> None:
        # The batch may have ended on its own just before the key was pressed.
        with contextlib.suppress(ConflictError):
            await self._cancel()


async def _follow(
    events: asyncio.Queue[Event], batch: Batch, display: ProgressDisplay, stopped: asyncio.Event
) -> None:
    """Feed the display the batch's progress until it is done, or stopped."""
    while not stopped.is_set():
        getting = asyncio.ensure_future(events.get())
        stopping = asyncio.ensure_future(stopped.wait())
        await asyncio.wait({getting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if not getting.done():
            getting.cancel()
            break
        event = getting.result()
        if event.name == "done":
            break
        if event.name == "progress":
            display.update(event.data)
    display.update(progress_counts(batch.counts))


def _write_outputs(
    batch: Batch, output: Path, csv_output: Path | None, currency: str
) -> tuple[list[tuple[str, str]], list[str]]:
    """Write the workbook and the CSV: ``(what, path)`` of each written, why the others were not."""
    written: list[tuple[str, str]] = []
    failures: list[str] = []
    writers: list[tuple[str, Path | None, Callable[[Path], None]]] = [
        (
            "workbook",
            output,
            lambda path: write_xlsx(path, streamed_results(batch), usage_sheet(batch, currency)),
        ),
        ("csv", csv_output, lambda path: write_atomically(path, _csv_bytes(batch))),
    ]
    for what, path, write in writers:
        if path is None:
            continue
        try:
            write(path)
        except OSError as exc:
            # The batch has run: say what could not be saved, keep what could.
            failures.append(f"cannot write {path}: {exc.strerror or exc}")
            continue
        written.append((what, str(path)))
    return written, failures


def _csv_bytes(batch: Batch) -> bytes:
    # "replace": a lone surrogate (JSON input may hold one) cannot be UTF-8.
    return render_csv(csv_sheet(batch)).encode("utf-8", "replace")


def _summary(
    batch: Batch, source: Source, elapsed_s: float, outputs: list[tuple[str, str]]
) -> Summary:
    unsuccessful = [
        execution
        for execution in batch.executions
        if execution.status not in (ExecutionStatus.SUCCEEDED, ExecutionStatus.CANCELLED)
    ]
    models = batch.options.models
    problems = [
        f"{execution_place(source.rows, execution.index, models)} "
        f"({execution.status.value}): {execution.error}"
        for execution in unsuccessful[:_PROBLEMS_SHOWN]
    ]
    if len(unsuccessful) > _PROBLEMS_SHOWN:
        problems.append(f"... and {len(unsuccessful) - _PROBLEMS_SHOWN} more; see the workbook")
    prompt_tokens, completion_tokens = batch.tokens()
    cost, uncosted = batch.cost()
    return Summary(
        cost=cost,
        model_costs=[(name, usage[0]) for name, usage in batch.usage_by_model().items()],
        uncosted=uncosted,
        status=batch.status.value,
        message=batch.message,
        counts=progress_counts(batch.counts),
        elapsed_s=elapsed_s,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        outputs=outputs,
        problems=problems,
        models=models,
    )
