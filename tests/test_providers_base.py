"""The provider interface: requests, options, and what a provider refuses by default."""

from __future__ import annotations

import pytest

from batchexec.catalog import ModelSpec
from batchexec.config import Settings
from batchexec.errors import FatalProviderError
from batchexec.providers import BUILTIN_PROVIDERS
from batchexec.providers.base import (
    NO_OPTIONS,
    ChatOptions,
    ChatRequest,
    Completion,
    Provider,
    Turn,
)
from batchexec.providers.echo import EchoProvider

pytest_plugins = ["tests.providerfakes"]

EVERY_OPTION = ChatOptions(
    temperature=0.3,
    max_tokens=50,
    top_p=0.9,
    stop=("\n\n",),
    seed=7,
    response_format={"type": "json_object"},
)


class Unmapped(Provider):
    """A provider that knows nothing of options."""

    name = "unmapped"

    async def complete(self, model: ModelSpec, request: ChatRequest) -> Completion:
        return Completion(request.prompt)


def test_a_request_keeps_every_existing_caller_working():
    request = ChatRequest("hi")
    assert request.history == ()
    assert request.options is NO_OPTIONS


def test_given_lists_the_set_options_falsy_ones_too():
    assert NO_OPTIONS.given() == {}
    assert ChatOptions(seed=0, temperature=0.0, stop=()).given() == {
        "temperature": 0.0,
        "stop": (),
        "seed": 0,
    }
    assert list(EVERY_OPTION.given()) == [
        "temperature",
        "max_tokens",
        "top_p",
        "stop",
        "seed",
        "response_format",
    ]


def test_the_default_refuses_every_set_option(http_session):
    provider = Unmapped(Settings(), http_session)
    assert provider.unsupported(NO_OPTIONS) == []
    assert provider.unsupported(ChatOptions(temperature=0.0, seed=1)) == [
        "temperature: the unmapped provider does not pass it on",
        "seed: the unmapped provider does not pass it on",
    ]
    provider.refuse_unsupported(NO_OPTIONS)
    with pytest.raises(FatalProviderError) as caught:
        provider.refuse_unsupported(ChatOptions(seed=1))
    assert str(caught.value) == "Not sent: seed: the unmapped provider does not pass it on."


@pytest.mark.parametrize("cls", BUILTIN_PROVIDERS, ids=lambda cls: cls.name)
def test_every_builtin_provider_decides_for_itself(cls):
    assert cls.unsupported is not Provider.unsupported


async def test_echo_takes_history_and_every_option_and_answers_the_prompt(
    http_session, no_provider_env
):
    provider = EchoProvider(Settings(), http_session)
    assert provider.unsupported(EVERY_OPTION) == []
    request = ChatRequest(
        "And you?",
        system_prompt="Be brief.",
        history=(Turn("user", "Hello."), Turn("assistant", "Hi.")),
        options=EVERY_OPTION,
    )
    model = ModelSpec(name="echo", provider="echo")
    assert await provider.complete(model, request) == Completion("And you?")
