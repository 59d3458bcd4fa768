"""The built-in ``echo`` provider: answers with the prompt it was sent."""

from __future__ import annotations

import asyncio

from batchexec.catalog import ModelSpec
from batchexec.providers.base import ChatOptions, ChatRequest, Completion, Provider


class EchoProvider(Provider):
    """Needs no network; ``latency_s`` in the catalog entry simulates a slow model.

    The test model: it takes any history and options, and answers the final
    prompt alone, as it always has.
    """

    name = "echo"

    def unsupported(self, options: ChatOptions) -> list[str]:
        return []

    async def complete(self, model: ModelSpec, request: ChatRequest) -> Completion:
        if model.latency_s > 0:
            await asyncio.sleep(model.latency_s)
        return Completion(text=request.prompt)
