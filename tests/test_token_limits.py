"""Tokens per minute: a model's tpm holds across batches, against a provider counting tokens."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from batchexec.api import EXECUTE_BATCH, RESULTS
from batchexec.catalog import ModelSpec, Target
from batchexec.config import Settings
from batchexec.estimates import request_tokens
from batchexec.execution import Executor
from batchexec.planning import PlannedRow
from batchexec.providers import ChatOptions, ChatRequest, Completion, Provider
from batchexec.records import ExecutionStatus
from batchexec.token_limits import Reservation, TokenLimits
from tests.helpers import AUTH, chat_completion, finished

#: The test's "minute": short, so that a dozen calls need a few of them.
WINDOW_S = 0.3
TPM = 6000


class Upstream:
    """An OpenAI-compatible server reporting usage as 4 characters a token (prompt) plus the
    answer's ``max_tokens``; it notes when each request arrived and what it used."""

    def __init__(self) -> None:
        self.seen: list[tuple[float, int]] = []

    async def chat(self, request: web.Request) -> web.Response:
        body = await request.json()
        prompt_tokens = sum(len(m["content"]) for m in body["messages"]) // 4
        completion_tokens = body.get("max_tokens", 0)
        self.seen.append((asyncio.get_running_loop().time(), prompt_tokens + completion_tokens))
        usage = (prompt_tokens, completion_tokens)
        return web.json_response(chat_completion(body["model"], "ok", usage))

    def most_in_a_window(self) -> int:
        """The most tokens the requests arriving within any one window used."""
        return max(
            sum(tokens for at, tokens in self.seen if start <= at < start + WINDOW_S)
            for start, _ in self.seen
        )


@pytest.fixture
async def upstream(aiohttp_server: Any) -> tuple[str, Upstream]:
    fake = Upstream()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", fake.chat)
    server = await aiohttp_server(app)
    return str(server.make_url("/v1")), fake


async def test_a_provider_never_sees_more_than_tpm_tokens_in_any_window(
    make_client, make_settings, tmp_path: Path, upstream
) -> None:
    base_url, fake = upstream
    catalog = tmp_path / "tpm.toml"
    catalog.write_text(f'[models."limited"]\nprovider = "openai"\nbase_url = "{base_url}"\n')
    catalog.write_text(catalog.read_text() + f"tpm = {TPM}\n")
    client = await make_client(
        make_settings(
            models_path=catalog,
            default_model="limited",
            tpm_window_s=WINDOW_S,
            max_prompt_length=10_000,
            max_sent_prompt_length=10_000,
        )
    )
    # About 1,000 tokens a row, in two batches at once: the limit is the model's, not a batch's.
    rows = [{"prompt": f"{n:04d} " + "word " * 790, "max_tokens": 10} for n in range(6)]
    ids = []
    for _ in range(2):
        response = await client.post(EXECUTE_BATCH, json={"executions": rows}, headers=AUTH)
        assert response.status == 200, await response.text()
        ids.append((await response.json())["invocationId"])
    for invocation_id in ids:
        body = await finished(client, invocation_id)
        assert body["status"] == "completed"
    used = sum(tokens for _, tokens in fake.seen)
    assert len(fake.seen) == 12 and used > 1.9 * TPM
    assert fake.most_in_a_window() <= TPM


async def test_a_call_over_the_whole_limit_goes_alone_and_calls_in_flight_count() -> None:
    limits = TokenLimits(window_s=3600)  # nothing leaves the window during the test
    model = ModelSpec(name="m", provider="echo", tpm=100)
    async with limits.reserve(model, 500) as big:
        big.used(500)
        waiting = asyncio.ensure_future(_reserve(limits, model, 10))
        for _ in range(20):
            await asyncio.sleep(0)
        # The big call is in flight: nothing else fits in the window.
        assert not waiting.done()
    waiting.cancel()
    unlimited = ModelSpec(name="u", provider="echo")
    async with limits.reserve(unlimited, 10**9):
        pass


async def _reserve(limits: TokenLimits, model: ModelSpec, tokens: int) -> None:
    async with limits.reserve(model, tokens):
        pass


async def test_replicas_on_one_database_share_the_models_tpm(
    postgres_url, make_client, make_settings, tmp_path: Path, upstream
) -> None:
    base_url, fake = upstream
    catalog = tmp_path / "tpm.toml"
    catalog.write_text(
        f'[models."limited"]\nprovider = "openai"\nbase_url = "{base_url}"\ntpm = {TPM}\n'
    )
    replicas = []
    for n in range(2):
        replicas.append(
            await make_client(
                make_settings(
                    models_path=catalog,
                    default_model="limited",
                    tpm_window_s=WINDOW_S,
                    max_prompt_length=10_000,
                    max_sent_prompt_length=10_000,
                    database_url=postgres_url,
                    public_dir=tmp_path / f"replica-{n}",
                )
            )
        )
    rows = [{"prompt": f"{n:04d} " + "word " * 790, "max_tokens": 10} for n in range(6)]
    ids = []
    for client in replicas:
        response = await client.post(EXECUTE_BATCH, json={"executions": rows}, headers=AUTH)
        assert response.status == 200, await response.text()
        ids.append((client, (await response.json())["invocationId"]))
    for client, invocation_id in ids:
        for _ in range(500):
            body = await (
                await client.post(RESULTS, json={"invocation_id": invocation_id}, headers=AUTH)
            ).json()
            if body["status"] not in ("queued", "processing"):
                break
            await asyncio.sleep(0.02)
        assert body["status"] == "completed", body
    assert len(fake.seen) == 12
    assert fake.most_in_a_window() <= TPM


class _Doubling(Provider):
    """Reports twice the prompt tokens batchexec estimates: a tokenizer that counts more."""

    name = "doubling"

    def unsupported(self, options: ChatOptions) -> list[str]:
        return []

    async def complete(self, model: ModelSpec, request: ChatRequest) -> Completion:
        return Completion("ok", prompt_tokens=2 * request_tokens(request), completion_tokens=0)


class _Recorder:
    """A tpm account that lets everything through and notes what each call reserved."""

    def __init__(self) -> None:
        self.reserved: list[int] = []

    @contextlib.asynccontextmanager
    async def reserve(self, model: ModelSpec, tokens: int) -> AsyncIterator[Reservation]:
        self.reserved.append(tokens)
        yield Reservation(tokens)


async def test_reservations_grow_once_the_provider_counts_more_than_the_estimate() -> None:
    recorder = _Recorder()
    settings = Settings(_env_file=None)
    executor = Executor(
        settings,
        {"doubling": _Doubling(settings, None)},  # type: ignore[arg-type]  # no session used
        rng=random.Random(0),
        tokens=recorder,
    )
    model = ModelSpec(name="m", provider="doubling", tpm=10_000)
    row = PlannedRow(
        index=1,
        prompt="word " * 400,
        target=Target(model=model, system_prompt=None, params={}),
        depends_on=frozenset(),
        cells={},
    )
    for _ in range(2):
        outcome = await executor.run(row, row.prompt)
        assert outcome.status is ExecutionStatus.SUCCEEDED
    first, second = recorder.reserved
    estimate = request_tokens(ChatRequest(prompt=row.prompt))
    assert first == estimate
    assert second == 2 * estimate
