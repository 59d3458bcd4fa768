"""Tests for batchexec/config.py: Settings from the environment and ``.env``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from pydantic import AliasChoices, ValidationError

from batchexec.config import DEV_API_KEY, Settings, load_settings
from batchexec.errors import ConfigError

SECRET_NAMES = ("OPENAI_API_KEY", "WATSONX_APIKEY", "ANTHROPIC_API_KEY", "BATCHEXEC_TEST_SECRET")


def _setting_names() -> set[str]:
    """Every name, environment or field, that Settings reads (compared case-insensitively)."""
    names = {name.lower() for name in SECRET_NAMES}
    for field_name, field in Settings.model_fields.items():
        names.add(field_name.lower())
        if isinstance(field.validation_alias, AliasChoices):
            names.update(str(choice).lower() for choice in field.validation_alias.choices)
    return names


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No setting from the outer environment, and a cwd without a stray ``.env``."""
    names = _setting_names()
    for key in list(os.environ):
        if key.lower() in names:
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write_dotenv(directory: Path, **values: str) -> None:
    lines = [f"{name}={value}" for name, value in values.items()]
    (directory / ".env").write_text("\n".join(lines) + "\n", encoding="utf-8")


def config_error(**overrides: Any) -> str:
    with pytest.raises(ConfigError) as caught:
        load_settings(**overrides)
    message = str(caught.value)
    assert "\n" not in message
    assert isinstance(caught.value.__cause__, ValidationError)
    return message


def test_defaults_match_the_design() -> None:
    settings = load_settings()
    assert settings.default_model == "Llama3.1 70b Instruct"
    assert settings.max_threads == 4
    assert settings.max_executions_per_batch == 100
    assert settings.max_prompt_length == 1000
    assert settings.max_concurrent_batches == 5
    assert settings.execution_timeout_s == 300
    assert settings.max_queued_batches == 100
    assert settings.host == "127.0.0.1"
    assert settings.port == 8080
    assert settings.server_name is None
    assert settings.public_dir == Path("public")
    assert settings.results_dir == Path("public") / "batch_execution_results"
    assert settings.models_path is None
    assert settings.results_ttl_hours == 168
    assert settings.results_ttl_s == 168 * 3600
    assert settings.api_keys == (DEV_API_KEY,)
    assert settings.uses_dev_key
    assert settings.host_is_loopback


@pytest.mark.parametrize(
    ("variable", "raw", "attribute", "expected"),
    [
        ("ASSISTANTS_DEFAULT_MODEL_ID_OR_NAME", " echo ", "default_model", "echo"),
        ("DEFAULT_MAX_THREADS", "8", "max_threads", 8),
        ("MAX_EXECUTIONS_PER_BATCH", "250", "max_executions_per_batch", 250),
        ("MAX_PROMPT_LENGTH", "4000", "max_prompt_length", 4000),
        ("MAX_CONCURRENT_BATCHES", "2", "max_concurrent_batches", 2),
        ("EXECUTION_TIMEOUT", "12.5", "execution_timeout_s", 12.5),
        ("MAX_QUEUED_BATCHES", "0", "max_queued_batches", 0),
        ("HOST", "0.0.0.0", "host", "0.0.0.0"),
        ("PORT", "9000", "port", 9000),
        ("SERVER_NAME", "https://batch.example.com/", "server_name", "https://batch.example.com"),
        ("PUBLIC_DIR", "/srv/out", "public_dir", Path("/srv/out")),
        ("BATCHEXEC_MODELS", "models.toml", "models_path", Path("models.toml")),
        ("RESULTS_TTL_HOURS", "1.5", "results_ttl_hours", 1.5),
        (
            "OPENAI_BASE_URL",
            "http://127.0.0.1:8000/v1/",
            "openai_base_url",
            "http://127.0.0.1:8000/v1",
        ),
        (
            "WATSONX_URL",
            "https://eu-de.ml.cloud.ibm.com",
            "watsonx_url",
            "https://eu-de.ml.cloud.ibm.com",
        ),
        ("WATSONX_PROJECT_ID", "p-123", "watsonx_project_id", "p-123"),
        ("OLLAMA_HOST", "http://127.0.0.1:11434", "ollama_host", "http://127.0.0.1:11434"),
    ],
)
def test_each_variable_is_read_by_its_documented_name(
    monkeypatch: pytest.MonkeyPatch, variable: str, raw: str, attribute: str, expected: Any
) -> None:
    monkeypatch.setenv(variable, raw)
    assert getattr(load_settings(), attribute) == expected


def test_keyword_arguments_win_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEFAULT_MAX_THREADS", "8")
    assert load_settings(max_threads=2).max_threads == 2


def test_dotenv_in_the_working_directory_is_read(clean_env: Path) -> None:
    write_dotenv(clean_env, DEFAULT_MAX_THREADS="7", HOST="localhost", PORT="9001")
    settings = load_settings()
    assert settings.max_threads == 7
    assert settings.host == "localhost"
    assert settings.port == 9001


def test_environment_wins_over_dotenv(monkeypatch: pytest.MonkeyPatch, clean_env: Path) -> None:
    write_dotenv(clean_env, DEFAULT_MAX_THREADS="7", PORT="9001")
    monkeypatch.setenv("PORT", "9100")
    settings = load_settings()
    assert settings.port == 9100
    assert settings.max_threads == 7


def test_dotenv_elsewhere_is_not_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    other = tmp_path / "other"
    other.mkdir()
    write_dotenv(other, DEFAULT_MAX_THREADS="7")
    assert load_settings().max_threads == 4
    monkeypatch.chdir(other)
    assert load_settings().max_threads == 7


@pytest.mark.parametrize(
    ("variable", "raw"),
    [
        ("DEFAULT_MAX_THREADS", "abc"),
        ("DEFAULT_MAX_THREADS", "0"),
        ("MAX_EXECUTIONS_PER_BATCH", "-5"),
        ("MAX_PROMPT_LENGTH", "1.5"),
        ("MAX_CONCURRENT_BATCHES", "0"),
        ("MAX_QUEUED_BATCHES", "-1"),
        ("EXECUTION_TIMEOUT", "0"),
        ("EXECUTION_TIMEOUT", "soon"),
        ("PORT", "99999"),
        ("PORT", "http"),
        ("HOST", ""),
        ("SERVER_NAME", "ftp://example.com"),
        ("SERVER_NAME", "example.com"),
        ("OPENAI_BASE_URL", "127.0.0.1:8000"),
        ("WATSONX_URL", "us-south.ml.cloud.ibm.com"),
        ("RESULTS_TTL_HOURS", "0"),
        ("ASSISTANTS_DEFAULT_MODEL_ID_OR_NAME", "   "),
    ],
)
def test_bad_value_is_one_line_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, raw: str
) -> None:
    monkeypatch.setenv(variable, raw)
    message = config_error()
    assert message.startswith(f"{variable}: ")
    assert "Value error" not in message


def test_bad_value_message_shows_what_was_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEFAULT_MAX_THREADS", "lots")
    message = config_error()
    assert message.startswith("DEFAULT_MAX_THREADS: ")
    assert "'lots'" in message


def test_bad_value_in_dotenv_names_the_variable(clean_env: Path) -> None:
    write_dotenv(clean_env, MAX_PROMPT_LENGTH="long")
    assert config_error().startswith("MAX_PROMPT_LENGTH: ")


def test_bad_keyword_override_names_the_environment_variable() -> None:
    assert config_error(max_threads=0).startswith("DEFAULT_MAX_THREADS: ")


def test_bad_url_says_what_is_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SERVER_NAME", "ftp://example.com")
    assert config_error() == (
        "SERVER_NAME: must be an http:// or https:// URL (got 'ftp://example.com')"
    )


@pytest.mark.parametrize("raw", [" , ,", "good,bad\x01hunter2-secret"])
def test_bad_api_keys_are_refused_without_echoing_them(
    monkeypatch: pytest.MonkeyPatch, raw: str
) -> None:
    monkeypatch.setenv("INTEGRATIONS_API_KEYS", raw)
    message = config_error()
    assert message.startswith("INTEGRATIONS_API_KEYS: ")
    assert "hunter2" not in message
    assert "got" not in message


def test_api_keys_are_split_trimmed_and_blanks_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INTEGRATIONS_API_KEYS", " alpha , beta,, gamma ,")
    settings = load_settings()
    assert settings.api_keys == ("alpha", "beta", "gamma")
    assert not settings.uses_dev_key


def test_dev_key_among_others_is_detected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INTEGRATIONS_API_KEYS", f"alpha,{DEV_API_KEY}")
    assert load_settings().uses_dev_key


def test_api_keys_never_appear_in_repr(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INTEGRATIONS_API_KEYS", "s3cr3t-key-one,s3cr3t-key-two")
    settings = load_settings()
    assert "s3cr3t" not in repr(settings)
    assert "s3cr3t" not in str(settings)
    assert "s3cr3t" not in str(settings.model_dump())


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("localhost", True),
        ("127.0.0.1", True),
        ("127.3.4.5", True),
        ("::1", True),
        ("0.0.0.0", False),
        ("::", False),
        ("192.168.1.20", False),
        ("batch.example.com", False),
    ],
)
def test_host_is_loopback(host: str, loopback: bool) -> None:
    assert load_settings(host=host).host_is_loopback is loopback


def test_secret_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BATCHEXEC_TEST_SECRET", "from-env")
    assert load_settings().secret("BATCHEXEC_TEST_SECRET") == "from-env"


def test_secret_reads_dotenv_and_the_environment_wins(
    monkeypatch: pytest.MonkeyPatch, clean_env: Path
) -> None:
    write_dotenv(clean_env, OPENAI_API_KEY="from-dotenv", WATSONX_APIKEY="dotenv-only")
    monkeypatch.setenv("OPENAI_API_KEY", "from-env")
    settings = load_settings()
    assert settings.secret("OPENAI_API_KEY") == "from-env"
    assert settings.secret("WATSONX_APIKEY") == "dotenv-only"
    assert "from-dotenv" not in repr(settings)


def test_secret_unset_or_empty_is_none(monkeypatch: pytest.MonkeyPatch, clean_env: Path) -> None:
    write_dotenv(clean_env, ANTHROPIC_API_KEY="")
    settings = load_settings()
    assert settings.secret("ANTHROPIC_API_KEY") is None
    assert settings.secret("BATCHEXEC_TEST_SECRET") is None
    monkeypatch.setenv("BATCHEXEC_TEST_SECRET", "")
    assert settings.secret("BATCHEXEC_TEST_SECRET") is None


def test_settings_are_frozen() -> None:
    settings = load_settings()
    with pytest.raises(ValidationError):
        settings.max_threads = 9  # type: ignore[misc]


def test_a_dotenv_that_is_not_utf8_is_a_config_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_bytes(b"SERVER_NAME=caf\xe9\n")
    with pytest.raises(ConfigError, match=r"^\.env: not UTF-8"):
        load_settings()
