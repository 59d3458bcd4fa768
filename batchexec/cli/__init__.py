"""``python -m batchexec``, or the ``batchexec`` script: the command line, one module a command."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from batchexec.cli import models, run, serve, submit, validate
from batchexec.cli.exits import EXIT_FAILED
from batchexec.cli.options import PROG

__all__ = ["main"]

_EPILOG = f"""\
examples:
  {PROG}                                           start the server
  {PROG} run prompts.csv -o results.xlsx --model echo
  {PROG} submit prompts.csv --url http://127.0.0.1:8080 --wait -o results.xlsx
  {PROG} validate prompts.xlsx
  {PROG} models

'{PROG} COMMAND --help' tells more about each command.
"""


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run the command; returns the exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        return serve.serve()
    try:
        code: int = args.handler(args)
    except BrokenPipeError:
        # The reader went away (`... | head`): stop quietly, as Unix tools do,
        # and keep the interpreter from failing again when it flushes stdout.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED
    return code


def _prog() -> str:
    """How the command line was started: the ``batchexec`` script, else ``python -m batchexec``."""
    name = os.path.basename(sys.argv[0]) if sys.argv else ""
    return "batchexec" if name == "batchexec" else PROG


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=_prog(),
        description="Run batches of LLM prompts; with no command, start the server.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in (serve, run, submit, validate, models):
        module.register(commands)
    return parser
