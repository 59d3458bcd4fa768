"""``python -m batchexec models``: the model catalog as a table."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from typing import TextIO

from batchexec.catalog import Catalog, fold
from batchexec.cli.exits import EXIT_OK, EXIT_USAGE
from batchexec.cli.options import PROG, Commands, add_catalog_options, configuration
from batchexec.config import Settings
from batchexec.errors import ConfigError
from batchexec.providers import unconfigured
from batchexec.runtime import open_runtime

_EPILOG = f"""\
examples:
  {PROG} models
  {PROG} models --catalog my-models.toml
  OPENAI_BASE_URL=http://127.0.0.1:8000/v1 {PROG} models

'configured' says whether the provider has what it needs (keys, addresses) to
call the model now. The default model, used by rows that name none, is marked *.
"""


def register(commands: Commands) -> None:
    """Add the ``models`` command."""
    parser = commands.add_parser(
        "models",
        help="list the models and assistants of the catalog",
        description="List the catalog's models and assistants: the built-in catalog, the "
        "one BATCHEXEC_MODELS (or --catalog) names, and the models OPENAI_BASE_URL lists.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_catalog_options(parser)
    parser.set_defaults(handler=command)


def command(args: argparse.Namespace) -> int:
    """Run ``models`` with parsed ``args``."""
    try:
        settings, catalog = configuration(args)
    except ConfigError as exc:
        print(f"batchexec: {exc}", file=sys.stderr)
        return EXIT_USAGE
    asyncio.run(show_catalog(settings, catalog, sys.stdout))
    return EXIT_OK


async def show_catalog(settings: Settings, catalog: Catalog, stream: TextIO) -> None:
    """Print the catalog's models, then its assistants, as aligned tables."""
    async with open_runtime(settings, catalog) as runtime:
        catalog, providers = runtime.catalog, runtime.providers
        default = fold(settings.default_model)

        def marked(name: str, aliases: Sequence[str]) -> str:
            is_default = default in {fold(name), *(fold(alias) for alias in aliases)}
            return f"{name} *" if is_default else name

        models = [
            [
                marked(model.name, model.aliases),
                model.provider,
                model.wire_id,
                _yes(unconfigured(providers, model) is None),
                ", ".join(model.aliases),
            ]
            for model in catalog.models
        ]
        assistants = [
            [
                assistant.name,
                catalog.model(assistant.model).name,
                _yes(unconfigured(providers, catalog.model(assistant.model)) is None),
                ", ".join(assistant.aliases),
            ]
            for assistant in catalog.assistants
        ]
    print(table(["NAME", "PROVIDER", "MODEL ID", "CONFIGURED", "ALIASES"], models), file=stream)
    if assistants:
        print(file=stream)
        print(table(["ASSISTANT", "MODEL", "CONFIGURED", "ALIASES"], assistants), file=stream)
    print(f"\n* default model ({settings.default_model})", file=stream)


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns padded to their widest cell, two spaces apart, no trailing spaces."""
    widths = [max(len(row[column]) for row in [header, *rows]) for column in range(len(header))]
    lines = (
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    )
    return "\n".join(lines)


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"
