"""Shared fixtures: settings isolated from the machine, and the real app under a test client."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from batchexec import Settings, create_app
from batchexec.providers import Provider
from tests.fakes import GATED_CATALOG, GatedProvider
from tests.helpers import ClientFactory, SettingsFactory

pytest_plugins = ["tests.postgres"]


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
