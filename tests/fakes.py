"""Test doubles: a provider whose calls the test opens one by one."""

from __future__ import annotations

import asyncio

from batchexec.catalog import ModelSpec
from batchexec.errors import FatalProviderError
from batchexec.providers import ChatRequest, Completion, Provider

#: A catalog with models served by ``GatedProvider``.
GATED_CATALOG = """
[models."gated"]
provider = "gated"

[models."gated-b"]
provider = "gated"
max_concurrency = 2
"""


class GatedProvider(Provider):
    """Each call waits until the test opens its prompt's gate (or all gates).

    Records which prompts started, how many calls were in flight at most, and
    answers ``answer(<prompt>)``. A prompt starting with ``fail:`` always
    fails; one starting with ``flaky:`` fails the first time only.
    """

    name = "gated"

    def __init__(self, *args: object) -> None:
        super().__init__(*args)  # type: ignore[arg-type]
        self.started: list[str] = []
        self.finished: list[str] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._gates: dict[str, asyncio.Event] = {}
        self._all_open = asyncio.Event()
        self._changed = asyncio.Condition()

    def open(self, *prompts: str) -> None:
        """Let the calls for ``prompts`` (or, with none, every call) answer."""
        if not prompts:
            self._all_open.set()
        for prompt in prompts:
            self._gate(prompt).set()

    async def wait_started(self, count: int) -> None:
        """Wait until ``count`` calls have started."""
        async with self._changed:
            await self._changed.wait_for(lambda: len(self.started) >= count)

    async def complete(self, model: ModelSpec, request: ChatRequest) -> Completion:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        async with self._changed:
            self.started.append(request.prompt)
            self._changed.notify_all()
        try:
            gate = asyncio.ensure_future(self._gate(request.prompt).wait())
            everything = asyncio.ensure_future(self._all_open.wait())
            try:
                await asyncio.wait([gate, everything], return_when=asyncio.FIRST_COMPLETED)
            finally:
                gate.cancel()
                everything.cancel()
        finally:
            self.in_flight -= 1
        first_time = request.prompt not in self.finished
        self.finished.append(request.prompt)
        if request.prompt.startswith("fail:") or (
            request.prompt.startswith("flaky:") and first_time
        ):
            raise FatalProviderError("the model refused", status=400)
        return Completion(text=f"answer({request.prompt})", prompt_tokens=3, completion_tokens=5)

    def _gate(self, prompt: str) -> asyncio.Event:
        return self._gates.setdefault(prompt, asyncio.Event())
