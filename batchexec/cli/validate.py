"""``python -m batchexec validate``: check an input as ``run`` would, without running it."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections import Counter
from typing import TextIO

from batchexec.catalog import Catalog
from batchexec.cli.exits import EXIT_OK, EXIT_USAGE
from batchexec.cli.inputfile import (
    INPUT_HELP,
    Source,
    label_of,
    print_problems,
    read_source,
    warn_unconfigured,
)
from batchexec.cli.options import (
    PROG,
    Commands,
    add_catalog_options,
    batch_options,
    configuration,
)
from batchexec.config import Settings
from batchexec.errors import ConfigError, InputError
from batchexec.inputs import plan_rows
from batchexec.planning import NO_BATCH_OPTIONS, BatchOptions
from batchexec.runtime import limits_from, open_runtime
from batchexec.wording import counted

_EPILOG = f"""\
examples:
  {PROG} validate prompts.csv
  {PROG} validate prompts.xlsx --catalog my-models.toml --model local-llama
  {PROG} validate prompts.csv --models gpt-4o-mini,local-llama --schema rating.schema.json
  cat batch.jsonl | {PROG} validate -

Every problem is listed, each with the line (CSV, JSONL), sheet row (XLSX) or
execution (JSON) it is on. A model that is in the catalog but cannot be called
as configured here (a missing key, say) is a warning, naming its rows and what
to set: the file is valid (a server configured otherwise takes it), but 'run'
on this machine refuses it until the variables are set.

With --models and --schema the rows are checked as 'run' with the same options
checks them: each row on each model, every {{{{column}}}} a column, the schema a
usable JSON Schema; the verdict counts the rows each model runs.

exit status: 0 valid, 2 invalid (or bad configuration).
"""


def register(commands: Commands) -> None:
    """Add the ``validate`` command."""
    parser = commands.add_parser(
        "validate",
        help="check an input file without running it, listing every problem",
        description="Check an input file against the catalog and limits, as run and the "
        "server do, without calling any model.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("input", metavar="INPUT", help=INPUT_HELP)
    add_catalog_options(parser, side_by_side=True)
    parser.set_defaults(handler=command)


def command(args: argparse.Namespace) -> int:
    """Run ``validate`` with parsed ``args``."""
    try:
        settings, catalog = configuration(args)
    except ConfigError as exc:
        print(f"batchexec: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        options = batch_options(args)
    except ValueError as exc:
        print(f"batchexec: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        source = read_source(args.input, max_rows=settings.max_executions_per_batch)
    except InputError as exc:
        print_problems(exc, label_of(args.input), None, sys.stdout)
        return EXIT_USAGE
    return asyncio.run(validate(source, settings, catalog, sys.stdout, options))


async def validate(
    source: Source,
    settings: Settings,
    catalog: Catalog,
    stream: TextIO,
    options: BatchOptions = NO_BATCH_OPTIONS,
) -> int:
    """Check ``source`` against the catalog and limits, with the batch's ``options``; print
    the verdict; the exit code."""
    async with open_runtime(settings, catalog) as runtime:
        try:
            plan = plan_rows(source.rows, runtime.catalog, limits_from(settings), options)
        except InputError as exc:
            print_problems(exc, source.label, source.rows, stream)
            return EXIT_USAGE
        warn_unconfigured(plan, runtime.providers, source.rows, stream)
    # Side by side, a model's count is the rows it runs: every one.
    models = Counter(row.target.assistant or row.target.model.name for row in plan.rows)
    uses = ", ".join(f"{name} ({count})" for name, count in models.most_common())
    if plan.options.models:
        uses += f" side by side, {counted(len(plan.rows), 'execution')}"
    fields = plan.options.fields
    answers = f"; answer fields: {', '.join(fields)}" if fields else ""
    noun = "row is" if plan.input_rows == 1 else "rows are"
    print(
        f"{source.label}: {plan.input_rows} {noun} valid ({source.fmt.value.upper()}; "
        f"columns: {', '.join(plan.columns)}; uses: {uses}{answers})",
        file=stream,
    )
    return EXIT_OK
