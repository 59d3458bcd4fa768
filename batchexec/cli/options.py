"""What the commands share on their command lines: argument types, options, settings."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeAlias

from batchexec.catalog import Catalog
from batchexec.config import Settings, load_settings
from batchexec.planning import MAX_MODELS, BatchOptions
from batchexec.runtime import load_catalog, provider_classes
from batchexec.structured import check_schema

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


def add_catalog_options(parser: argparse.ArgumentParser, *, side_by_side: bool = False) -> None:
    """``--catalog`` and ``--model``: which catalog, and the model of rows that name none.

    ``--models CATALOG.toml`` was the catalog's option before ``--models``
    named models side by side, and is still read as ``--catalog``: by the
    ``--models`` of ``side_by_side`` (``add_batch_options``, for a name ending
    in ``.toml``), else by a hidden ``--models`` of its own.
    """
    parser.add_argument(
        "--catalog",
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
    if side_by_side:
        add_batch_options(parser, reads_catalog=True)
    else:
        parser.add_argument("--models", dest="catalog", type=Path, help=argparse.SUPPRESS)


def add_batch_options(parser: argparse.ArgumentParser, *, reads_catalog: bool = False) -> None:
    """``--models A,B,C``, ``--schema SCHEMA`` and ``--max-cost AMOUNT``: what the batch
    asks of every row.

    ``reads_catalog``: the command takes a catalog, and ``--models`` with a name
    ending in ``.toml`` is read as ``--catalog``, as it was before.
    """
    parser.add_argument(
        "--models",
        metavar="A,B,C",
        dest="side_by_side",
        action=_ModelNamesOrCatalog if reads_catalog else _ModelNames,
        default=(),
        help=f"run every row on each of these models (1 to {MAX_MODELS} names or assistants, "
        "separated by commas), side by side: one group of result columns a model"
        + ("; a name ending in .toml is read as --catalog, as before" if reads_catalog else ""),
    )
    parser.add_argument(
        "--schema",
        metavar="SCHEMA",
        help="a JSON Schema every answer must match, its top-level fields spread into "
        "result.<field> columns: a JSON file, or the JSON itself (text starting with '{')",
    )
    parser.add_argument(
        "--max-cost",
        metavar="AMOUNT",
        type=float,
        help="the batch's budget, in the catalog's currency: once its rows have cost this "
        "much no other row is sent, and those left end cancelled (DEFAULT_MAX_COST without it)",
    )
    cache = parser.add_mutually_exclusive_group()
    cache.add_argument(
        "--cache",
        dest="cache",
        action="store_const",
        const=True,
        help="answer a request this key asked before from the answer cache, without a call",
    )
    cache.add_argument(
        "--no-cache",
        dest="cache",
        action="store_const",
        const=False,
        help="bypass the answer cache, whatever the model or CACHE_ANSWERS say",
    )


class _ModelNames(argparse.Action):
    """``--models A,B,C``: the models each row runs on, as a tuple of names."""

    #: Whether a name ending in ``.toml`` is the catalog, as ``--models`` meant before.
    reads_catalog = False

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        text = str(values)
        if text.strip().lower().endswith(".toml"):
            if not self.reads_catalog:
                raise argparse.ArgumentError(
                    self, f"{text!r} is a catalog; give model names the server knows"
                )
            namespace.catalog = Path(text)
            return
        try:
            setattr(namespace, self.dest, model_names(text))
        except ValueError as exc:
            raise argparse.ArgumentError(self, str(exc)) from None


class _ModelNamesOrCatalog(_ModelNames):
    reads_catalog = True


def model_names(text: str) -> tuple[str, ...]:
    """``--models``' names, separated by commas; ``ValueError`` unless 1 to ``MAX_MODELS``,
    none empty."""
    names = tuple(name.strip() for name in text.split(","))
    if not 1 <= len(names) <= MAX_MODELS or not all(names):
        raise ValueError(
            f"give 1 to {MAX_MODELS} model names separated by commas, none empty, not {text!r}"
        )
    return names


def batch_options(args: argparse.Namespace) -> BatchOptions:
    """The batch's options from ``--models`` and ``--schema``; ``ValueError`` says, in one
    line naming the option, why a schema is not one."""
    schema_text: str | None = getattr(args, "schema", None)
    schema = None if schema_text is None else read_schema(schema_text)
    return BatchOptions(
        models=tuple(getattr(args, "side_by_side", ())),
        response_schema=schema,
        max_cost=getattr(args, "max_cost", None),
        cache=getattr(args, "cache", None),
    )


def read_schema(text: str) -> dict[str, Any]:
    """``--schema``: the JSON itself (text starting with ``{``), else the path of a JSON file;
    checked as the server checks a batch's ``response_schema``."""
    inline = text.lstrip().startswith("{")
    where = "--schema" if inline else f"--schema {text}"
    data = text
    if not inline:
        try:
            data = Path(text).read_bytes().decode("utf-8-sig")
        except OSError as exc:
            raise ValueError(f"{where}: cannot read it: {exc.strerror or exc}.") from None
        except UnicodeDecodeError:
            raise ValueError(f"{where}: is not UTF-8 text.") from None
    try:
        document = json.loads(data)
    except json.JSONDecodeError as exc:
        raise ValueError(
            f"{where}: is not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}."
        ) from None
    except RecursionError:
        raise ValueError(f"{where}: is nested too deeply.") from None
    except ValueError as exc:  # a number too long for Python to read
        raise ValueError(f"{where}: is not JSON: {exc}.") from None
    try:
        return check_schema(document)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None


def settings_from(args: argparse.Namespace) -> Settings:
    """Settings from the environment and ``.env``, with the options ``args`` carry over them.

    Unless MAX_EXECUTIONS_PER_BATCH is set, a batch may hold ``LOCAL_MAX_EXECUTIONS``.
    Raises ``ConfigError`` naming the variable of a bad value.
    """
    options = {
        "default_model": getattr(args, "model", None),
        "models_path": getattr(args, "catalog", None),
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
