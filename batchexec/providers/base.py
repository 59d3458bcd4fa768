"""The provider interface: one async call that turns a conversation into a completion."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import aiohttp

from batchexec.catalog import ModelSpec
from batchexec.errors import FatalProviderError

if TYPE_CHECKING:
    from batchexec.config import Settings


@dataclass(frozen=True)
class Turn:
    """One earlier message of the conversation, before the request's prompt."""

    role: Literal["user", "assistant"]
    content: str


@dataclass(frozen=True)
class ChatOptions:
    """Generation settings under OpenAI's chat completion names; None leaves one unset.

    Each provider maps them to its own wire format. A set option wins over the
    same setting in the catalog's provider-native ``params``.
    """

    temperature: float | None = None
    max_tokens: int | None = None
    top_p: float | None = None
    stop: tuple[str, ...] | None = None
    seed: int | None = None
    #: ``{"type": "text"}``, ``{"type": "json_object"}`` or ``{"type": "json_schema",
    #: "json_schema": {"name": ..., "schema": {...}, "strict": ...}}``, as OpenAI takes it.
    response_format: Mapping[str, Any] | None = None
    #: The name the request gave ``max_tokens`` (OpenAI's reasoning models take only
    #: ``max_completion_tokens``): where a provider has both, it sends this one. No option.
    max_tokens_as: Literal["max_tokens", "max_completion_tokens"] = field(
        default="max_tokens", metadata={"option": False}
    )

    def given(self) -> dict[str, Any]:
        """The options that are set, by name, in the order the class declares them."""
        values = {
            option.name: getattr(self, option.name)
            for option in fields(self)
            if option.metadata.get("option", True)
        }
        return {name: value for name, value in values.items() if value is not None}


#: No option set: every setting comes from the catalog's params or the model's defaults.
NO_OPTIONS = ChatOptions()


@dataclass(frozen=True)
class ChatRequest:
    """What one execution asks of a model, after ``${output.n}`` substitution.

    The conversation sent is the system prompt (if any), then ``history`` in
    order, then ``prompt`` as the final user message.
    """

    prompt: str
    system_prompt: str | None = None
    #: The catalog's provider-native params, merged into the wire body as they are.
    params: Mapping[str, Any] = field(default_factory=dict)
    history: tuple[Turn, ...] = ()
    options: ChatOptions = NO_OPTIONS


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

    def unsupported(self, options: ChatOptions) -> list[str]:
        """One message per set option this provider cannot honour; empty when it honours all.

        Asked before anything runs, so a batch is refused rather than run with
        an option quietly dropped. The default honours none: a provider that
        maps no option must say so, and each built-in one overrides it.
        """
        return [f"{name}: the {self.name} provider does not pass it on" for name in options.given()]

    def refuse_unsupported(self, options: ChatOptions) -> None:
        """Raise ``FatalProviderError`` where ``unsupported`` objects: no call drops an option."""
        problems = self.unsupported(options)
        if problems:
            raise FatalProviderError(f"Not sent: {'; '.join(problems)}.")

    @abstractmethod
    async def complete(self, model: ModelSpec, request: ChatRequest) -> Completion:
        """One call to the model; the caller applies timeouts and retries."""
