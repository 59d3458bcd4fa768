"""What the server and the command line share at run time: catalog, client session, providers.

Both build them here, so a batch run from a terminal meets the same catalog,
the same models discovered at ``OPENAI_BASE_URL`` and the same providers as
one sent to the server.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace

import aiohttp

from batchexec.catalog import Catalog, UnknownNameError
from batchexec.config import Settings
from batchexec.errors import ConfigError, ProviderError
from batchexec.inputs import Rows, plan_rows
from batchexec.openai_requests import OPENAI, row_of_cells
from batchexec.planning import BatchPlan, Limits, RowInput
from batchexec.providers import BUILTIN_PROVIDERS, Provider, build_providers
from batchexec.providers.openai import discover_models
from batchexec.records import Batch
from batchexec.wording import counted

log = logging.getLogger(__name__)

#: Outbound connections in all. No cap per host: calls in flight are already
#: bounded by the batch limits and each model's ``max_concurrency``, and a cap
#: here would silently undercut a DEFAULT_MAX_THREADS above it.
_CONNECTOR_LIMIT = 1000
#: How long start-up waits for OPENAI_BASE_URL to list its models.
_DISCOVERY_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Runtime:
    """The long-lived objects batches run with, alive while ``open_runtime`` is."""

    session: aiohttp.ClientSession
    providers: dict[str, Provider]
    #: The catalog plus the models ``OPENAI_BASE_URL`` lists.
    catalog: Catalog


def provider_classes(extra: Sequence[type[Provider]] = ()) -> dict[str, type[Provider]]:
    """Provider classes by name: the built-in ones, then ``extra`` (which may replace one)."""
    return {cls.name: cls for cls in (*BUILTIN_PROVIDERS, *extra)}


def load_catalog(settings: Settings, classes: Mapping[str, type[Provider]]) -> Catalog:
    """The catalog ``settings`` names; ``ConfigError`` if invalid or naming an unknown provider."""
    catalog = Catalog.load(settings.models_path)
    try:
        catalog.model(settings.default_model)
    except UnknownNameError as exc:
        raise ConfigError(f"ASSISTANTS_DEFAULT_MODEL_ID_OR_NAME: {exc}") from None
    for model in catalog.models:
        if model.provider not in classes:
            known = ", ".join(sorted(classes))
            raise ConfigError(
                f"model {model.name!r}: unknown provider {model.provider!r} (known: {known})"
            )
    return catalog


@asynccontextmanager
async def open_runtime(
    settings: Settings, catalog: Catalog, extra_providers: Sequence[type[Provider]] = ()
) -> AsyncIterator[Runtime]:
    """A client session, the providers sharing it and the catalog with discovered models."""
    connector = aiohttp.TCPConnector(limit=_CONNECTOR_LIMIT, limit_per_host=0)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        providers = build_providers(settings, session)
        providers.update({cls.name: cls(settings, session) for cls in extra_providers})
        discovered = await _with_discovered_models(catalog, settings, session)
        yield Runtime(session=session, providers=providers, catalog=discovered)


async def _with_discovered_models(
    catalog: Catalog, settings: Settings, session: aiohttp.ClientSession
) -> Catalog:
    """The catalog plus the models ``OPENAI_BASE_URL`` lists; a failed listing only warns."""
    try:
        # Bounded: a server that accepts the connection and never answers (a
        # vLLM still loading its weights) must not keep batchexec from starting.
        async with asyncio.timeout(_DISCOVERY_TIMEOUT_S):
            models = await discover_models(settings, session)
    except ProviderError as exc:
        log.warning("OPENAI_BASE_URL: could not list its models: %s", exc)
        return catalog
    except TimeoutError:
        log.warning(
            "OPENAI_BASE_URL: could not list its models: no answer in %g s", _DISCOVERY_TIMEOUT_S
        )
        return catalog
    if models:
        log.info("OPENAI_BASE_URL lists %s", counted(len(models), "model"))
    try:
        return catalog.with_models(models)
    except ConfigError as exc:
        log.warning("OPENAI_BASE_URL: its models could not join the catalog: %s", exc)
        return catalog


def plan_again(batch: Batch, catalog: Catalog, settings: Settings) -> BatchPlan:
    """The plan of a batch read back from the store, to resume it as it was submitted.

    Each row runs on the model it was planned with (not today's default);
    the limits it passed then are not applied again. ``InputError`` when the
    catalog no longer has a model or assistant it names.
    """
    if batch.api == OPENAI:
        # Requests of the OpenAI Batch API: their cells hold the request as sent.
        rows = [
            replace(row_of_cells(execution.cells), model=execution.model)
            for execution in batch.executions
        ]
    elif batch.options.models:
        rows = input_rows(batch)
    else:
        rows = [
            replace(execution.row_input, model=execution.model)
            if not execution.by_assistant
            else execution.row_input
            for execution in batch.executions
        ]
    limits = Limits(
        max_executions=max(len(batch.executions), 1),
        # The prompts passed with their variables filled in, which may be longer.
        max_prompt_length=sys.maxsize,
        default_model=settings.default_model,
        max_columns=max(len(batch.columns), 1),
    )
    return plan_rows(Rows.of(batch.columns, rows), catalog, limits, batch.options)


def input_rows(batch: Batch) -> list[RowInput]:
    """The rows of a batch of models side by side as they were submitted: its first
    model's executions, which hold each input row's cells."""
    width = len(batch.options.models)
    return [execution.row_input for execution in batch.executions[::width]]


def limits_from(settings: Settings) -> Limits:
    """The submission limits ``settings`` set."""
    return Limits(
        max_executions=settings.max_executions_per_batch,
        max_prompt_length=settings.max_prompt_length,
        default_model=settings.default_model,
        max_columns=settings.max_columns,
    )
