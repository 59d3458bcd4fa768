"""What the commands share on their command lines: argument types, options, settings."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TypeAlias

from batchexec.catalog import Catalog
from batchexec.config import Settings, load_settings
from batchexec.runtime import load_catalog, provider_classes

#: The object ``add_subparsers`` returns, that each command module adds its parser to.
Commands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"

PROG = "python -m batchexec"
#: Executions a batch run from the terminal may hold when MAX_EXECUTIONS_PER_BATCH is not
#: set: the server's default of 100 guards a shared service, a local run only its user's time.
LOCAL_MAX_EXECUTIONS = 10_000


def positive_int(text: str) -> int:
    """An argument that must be a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {value}")
    return value


def positive_float(text: str) -> float:
    """An argument that must be a number above 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number above 0, not {text}")
    return value


def add_catalog_options(parser: argparse.ArgumentParser) -> None:
    """``--models`` and ``--model``: which catalog, and the model of rows that name none."""
    parser.add_argument(
        "--models",
        metavar="CATALOG.toml",
        type=Path,
        help="a TOML model catalog merged over the built-in one (overrides BATCHEXEC_MODELS)",
    )
    parser.add_argument(
        "--model",
        metavar="NAME",
        help="model for rows that name no model or assistant "
        "(overrides ASSISTANTS_DEFAULT_MODEL_ID_OR_NAME)",
    )


def settings_from(args: argparse.Namespace) -> Settings:
    """Settings from the environment and ``.env``, with the options ``args`` carry over them.

    Unless MAX_EXECUTIONS_PER_BATCH is set, a batch may hold ``LOCAL_MAX_EXECUTIONS``.
    Raises ``ConfigError`` naming the variable of a bad value.
    """
    options = {
        "default_model": getattr(args, "model", None),
        "models_path": getattr(args, "models", None),
        "max_threads": getattr(args, "threads", None),
        "execution_timeout_s": getattr(args, "timeout", None),
    }
    overrides = {name: value for name, value in options.items() if value is not None}
    settings = load_settings(**overrides)
    if "max_executions_per_batch" not in settings.model_fields_set:
        settings = settings.model_copy(update={"max_executions_per_batch": LOCAL_MAX_EXECUTIONS})
    return settings


def configuration(args: argparse.Namespace) -> tuple[Settings, Catalog]:
    """The settings ``args`` make and the catalog they name; ``ConfigError`` names what is wrong."""
    settings = settings_from(args)
    return settings, load_catalog(settings, provider_classes())
