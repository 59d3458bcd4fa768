"""Model providers, one module each, behind the ``Provider`` interface."""

from __future__ import annotations

from collections.abc import Mapping

import aiohttp

from batchexec.catalog import ModelSpec
from batchexec.config import Settings
from batchexec.providers.anthropic import AnthropicProvider
from batchexec.providers.base import (
    NO_OPTIONS,
    ChatOptions,
    ChatRequest,
    Completion,
    Provider,
    Turn,
)
from batchexec.providers.echo import EchoProvider
from batchexec.providers.ollama import OllamaProvider
from batchexec.providers.openai import OpenAIProvider
from batchexec.providers.watsonx import WatsonxProvider

__all__ = [
    "BUILTIN_PROVIDERS",
    "NO_OPTIONS",
    "ChatOptions",
    "ChatRequest",
    "Completion",
    "Provider",
    "Turn",
    "build_providers",
    "unconfigured",
]

#: Every built-in provider class; its ``name`` is the catalog's ``provider`` value.
BUILTIN_PROVIDERS: tuple[type[Provider], ...] = (
    EchoProvider,
    OpenAIProvider,
    WatsonxProvider,
    AnthropicProvider,
    OllamaProvider,
)


def build_providers(settings: Settings, session: aiohttp.ClientSession) -> dict[str, Provider]:
    """One instance of each built-in provider, sharing the app's client session."""
    return {cls.name: cls(settings, session) for cls in BUILTIN_PROVIDERS}


def unconfigured(providers: Mapping[str, Provider], model: ModelSpec) -> str | None:
    """Why ``model`` cannot be called with ``providers`` as configured; None when it can.

    The one answer to "is this model configured?", for the engine, the
    catalog route and the command line alike.
    """
    provider = providers.get(model.provider)
    if provider is None:
        return f"No provider named {model.provider!r}."
    return provider.missing_configuration(model)
