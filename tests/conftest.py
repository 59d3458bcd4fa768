"""Shared fixtures: settings isolated from the machine, and the real app under a test client."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from batchexec import Settings, create_app
from batchexec.providers import Provider
from batchexec.records import Batch
from batchexec.web.keys import ENGINE, PROVIDERS, REGISTRY
from tests.fakes import GATED_CATALOG, GatedProvider

API_KEY = "dev-only-token"
AUTH = {"Integrations-API-Key": API_KEY}
EXECUTE = "/experience/batch_execution/execute_batch/invoke"
PROCESS_CSV = "/system/batch_execution/process_csv/invoke"
RESULTS = "/system/batch_execution/results"

SettingsFactory = Callable[..., Settings]
ClientFactory = Callable[..., Awaitable[TestClient[Any, Any]]]


@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No setting or .env of the machine running the tests leaks into them."""
    for field in Settings.model_fields.values():
        alias = field.validation_alias
        for name in getattr(alias, "choices", ()):
            monkeypatch.delenv(str(name), raising=False)
    for name in list(os.environ):
        if name.endswith(("_API_KEY", "_APIKEY")):
            monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def make_settings(tmp_path: Path) -> SettingsFactory:
    """Settings with results under ``tmp_path`` and the gated test models in the catalog."""
    catalog = tmp_path / "models.toml"
    catalog.write_text(GATED_CATALOG)

    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "public_dir": tmp_path / "public",
            "models_path": catalog,
            # Tests that stop an app with work in flight want it cancelled at once.
            "shutdown_grace_s": 0,
        }
        values.update(overrides)
        return Settings(_env_file=None, **values)

    return make


@pytest.fixture
def make_client(aiohttp_client: Any, make_settings: SettingsFactory) -> ClientFactory:
    """A test client of the real app; ``extra_providers`` adds provider classes."""

    async def make(
        settings: Settings | None = None,
        extra_providers: Sequence[type[Provider]] = (GatedProvider,),
        **overrides: Any,
    ) -> TestClient[Any, Any]:
        app = create_app(settings or make_settings(**overrides), extra_providers=extra_providers)
        client: TestClient[Any, Any] = await aiohttp_client(app)
        return client

    return make


def gated(client: TestClient[Any, Any]) -> GatedProvider:
    """The app's instance of the gated test provider."""
    provider = client.app[PROVIDERS]["gated"]
    assert isinstance(provider, GatedProvider)
    return provider


async def submit(
    client: TestClient[Any, Any], executions: list[dict[str, Any]], key: str = API_KEY
) -> str:
    """Submit a batch and return its invocation id."""
    response = await client.post(
        EXECUTE, json={"executions": executions}, headers={"Integrations-API-Key": key}
    )
    assert response.status == 200, await response.text()
    body = await response.json()
    invocation_id: str = body["invocationId"]
    return invocation_id


async def results(
    client: TestClient[Any, Any], invocation_id: str, key: str = API_KEY
) -> dict[str, Any]:
    """The results route's answer, which must be 200."""
    response = await client.post(
        RESULTS, json={"invocation_id": invocation_id}, headers={"Integrations-API-Key": key}
    )
    assert response.status == 200, await response.text()
    body: dict[str, Any] = await response.json()
    return body


def batch_of(client: TestClient[Any, Any], invocation_id: str) -> Batch:
    """The registry's record of a batch in memory (running, or finished and cached)."""
    batch: Batch | None = client.app[REGISTRY].cached(invocation_id)
    assert batch is not None, f"batch {invocation_id} is not in memory"
    return batch


def owner_of(app: Any, key: str = API_KEY) -> str:
    """The owner a key's batches are recorded under in ``app``: its keyed fingerprint."""
    owner: str = app[REGISTRY].store.fingerprint(key)
    return owner


async def until(condition: Callable[[], bool], *, rounds: int = 10_000) -> None:
    """Let the event loop run until ``condition()`` holds; fail if it never does.

    Counts loop iterations rather than seconds, so a slow machine cannot make
    it flaky.
    """
    for _ in range(rounds):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition never became true")


async def finished(client: TestClient[Any, Any], invocation_id: str) -> dict[str, Any]:
    """Wait for the batch to end, then return its results."""
    await client.app[ENGINE].join(invocation_id)
    return await results(client, invocation_id)
