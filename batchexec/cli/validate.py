"""``python -m batchexec validate``: check an input as ``run`` would, without running it."""

from __future__ import annotations

import argparse
import asyncio
import math
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
from batchexec.estimates import Estimate, TokenEstimate, estimate
from batchexec.inputs import plan_rows
from batchexec.planning import NO_BATCH_OPTIONS, BatchOptions
from batchexec.runtime import limits_from, open_runtime
from batchexec.wording import counted

_EPILOG = f"""\
examples:
  {PROG} validate prompts.csv
  {PROG} validate prompts.xlsx --catalog my-models.toml --model local-llama
  {PROG} validate prompts.csv --models gpt-4o-mini,local-llama --schema rating.schema.json
  {PROG} validate --estimate prompts.csv --catalog priced-models.toml
  cat batch.jsonl | {PROG} validate -

Every problem is listed, each with the line (CSV, JSONL), sheet row (XLSX) or
execution (JSON) it is on. A model that is in the catalog but cannot be called
as configured here (a missing key, say) is a warning, naming its rows and what
to set: the file is valid (a server configured otherwise takes it), but 'run'
on this machine refuses it until the variables are set.

With --models and --schema the rows are checked as 'run' with the same options
checks them: each row on each model, every {{{{column}}}} a column, the schema a
usable JSON Schema; the verdict counts the rows each model runs.

With --estimate the verdict is followed by each model's estimated input tokens,
its output tokens at most (each row's max_tokens, else the catalog's limit) and
the cost range at the catalog's prices (low: the input alone; high: the input
and the whole output bound), then the total. Tokens are estimated offline from
the text, not counted by the model's tokenizer: expect the input to be within
about 25% for English text.

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
    parser.add_argument(
        "--estimate",
        action="store_true",
        help="also print each model's estimated tokens and cost range, and the total",
    )
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
    return asyncio.run(
        validate(source, settings, catalog, sys.stdout, options, with_estimate=args.estimate)
    )


async def validate(
    source: Source,
    settings: Settings,
    catalog: Catalog,
    stream: TextIO,
    options: BatchOptions = NO_BATCH_OPTIONS,
    *,
    with_estimate: bool = False,
) -> int:
    """Check ``source`` against the catalog and limits, with the batch's ``options``; print
    the verdict and, ``with_estimate``, the run's estimated tokens and cost; the exit code."""
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
    if with_estimate:
        print_estimate(estimate(plan, runtime.catalog.currency), stream)
    return EXIT_OK


def print_estimate(found: Estimate, stream: TextIO) -> None:
    """One line a model, then the total: input tokens, the output bound, the cost range."""
    print("estimate:", file=stream)
    for model in found.models:
        line = _estimate_line(model, found.currency, "no price in the catalog")
        print(f"  {model.model}: {line}", file=stream)
    # A model's costs are unknown only when it has no price (its input is always counted).
    unpriced = ", ".join(model.model for model in found.models if model.cost_low is None)
    line = _estimate_line(found.total, found.currency, f"no price for {unpriced}")
    print(f"  total: {line}", file=stream)
    print(f"  (tokens estimated offline: {found.method})", file=stream)


def _estimate_line(tokens: TokenEstimate, currency: str, unpriced: str) -> str:
    """Executions, input tokens, output tokens and cost; ``unpriced`` says why a cost is
    unknown when there is no price."""
    chained = tokens.chained_executions
    if tokens.input_tokens_max == tokens.input_tokens:
        input_text = f"{tokens.input_tokens:,}"
    elif tokens.input_tokens_max is None:
        input_text = f"at least {tokens.input_tokens:,}"
    else:
        input_text = f"{tokens.input_tokens:,} to {tokens.input_tokens_max:,}"
    if chained:
        input_text += f" ({counted(chained, 'execution')} taking an earlier output)"
    if tokens.output_tokens_max is None:
        unbounded = counted(tokens.unbounded_executions, "execution")
        output_text = f"unbounded ({unbounded} with no max_tokens)"
    else:
        output_text = f"at most {tokens.output_tokens_max:,}"
    if tokens.cost_low is None:
        cost_text = f"unknown ({unpriced})"
    elif tokens.cost_high is None:
        cost_text = f"{currency} {_money(tokens.cost_low)} or more (output unbounded)"
    else:
        cost_text = f"{currency} {_money(tokens.cost_low)} to {_money(tokens.cost_high)}"
    return (
        f"{counted(tokens.executions, 'execution')}; input tokens {input_text}; "
        f"output tokens {output_text}; cost {cost_text}"
    )


def _money(value: float) -> str:
    """A cost as people read one: cents from 1 up, else two significant digits (and no
    more than 8 decimals)."""
    if value >= 1 or value == 0:
        return f"{value:,.2f}"
    decimals = min(8, max(2, 1 - math.floor(math.log10(value))))
    return f"{value:.{decimals}f}"
