"""What the server and the command line share at start-up."""

from __future__ import annotations

import pytest

from batchexec.config import Settings
from batchexec.errors import ConfigError
from batchexec.runtime import load_catalog, provider_classes


def test_an_unknown_default_model_stops_start_up_naming_the_variable(tmp_path):
    settings = Settings(_env_file=None, default_model="nope", public_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"^ASSISTANTS_DEFAULT_MODEL_ID_OR_NAME: Unknown model"):
        load_catalog(settings, provider_classes())
