"""The provider interface: one async call that turns a prompt into a completion."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import aiohttp

from batchexec.catalog import ModelSpec

if TYPE_CHECKING:
    from batchexec.config import Settings


@dataclass(frozen=True)
class ChatRequest:
    """What one execution asks of a model, after ``${output.n}`` substitution."""

    prompt: str
    system_prompt: str | None = None
    params: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Completion:
    """A model's answer, with token counts where the provider reports them."""

    text: str
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


class Provider(ABC):
    """A kind of model server.

    Implementations take the app's ``aiohttp.ClientSession`` in their
    constructor, never create their own, and raise only ``ProviderError``
    subclasses: ``RetryableProviderError`` where another try may help,
    ``FatalProviderError`` where it cannot.
    """

    #: The ``provider`` value that selects this class in the catalog.
    name: ClassVar[str]

    def __init__(self, settings: Settings, session: aiohttp.ClientSession) -> None:
        self.settings = settings
        self.session = session

    def missing_configuration(self, model: ModelSpec) -> str | None:
        """What must be set before ``model`` can be called, or None when ready."""
        return None

    @abstractmethod
    async def complete(self, model: ModelSpec, request: ChatRequest) -> Completion:
        """One call to the model; the caller applies timeouts and retries."""
