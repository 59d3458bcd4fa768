"""Settings: read from the environment and ``.env``, validated once at start-up."""

from __future__ import annotations

import ipaddress
import math
import os
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any

from dotenv import dotenv_values
from pydantic import (
    AliasChoices,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from batchexec.errors import ConfigError
from batchexec.logs import LogFormat
from batchexec.webhook_urls import AllowList

DEV_API_KEY = "dev-only-token"
RESULTS_SUBDIR = "batch_execution_results"
#: Excel's longest cell text: the default bound of a prompt as sent and of a result,
#: so that both fit a workbook cell whole.
EXCEL_CELL_CHARS = 32_767
#: Excel's 16,384 columns less the eight that the results workbook adds.
MAX_INPUT_COLUMNS = 16_384 - 8


SQLITE_URL_PREFIX = "sqlite:///"
MEMORY_URL = "memory://"
#: The schemes of a PostgreSQL ``DATABASE_URL`` (libpq's two spellings).
POSTGRES_URL_PREFIXES = ("postgresql://", "postgres://")


def check_database_url(url: str) -> str:
    """``url`` if it names a store batchexec has; ``ValueError`` saying what it accepts."""
    if url == MEMORY_URL:
        return url
    if url.startswith(SQLITE_URL_PREFIX) and url.removeprefix(SQLITE_URL_PREFIX).strip():
        return url
    if url.startswith(POSTGRES_URL_PREFIXES):
        return url
    raise ValueError(
        "must be sqlite:///PATH (a relative path; sqlite:////PATH for an absolute one), "
        "postgresql://USER@HOST/DATABASE or memory://"
    )


def _env(name: str, field_name: str) -> Any:
    """Accept a setting by its environment name or, in code, by its field name."""
    return Field(validation_alias=AliasChoices(name, field_name))


class Settings(BaseSettings):
    """Every knob of batchexec; ``Settings()`` reads the environment, then ``.env``.

    Keyword arguments win over both, which is how tests and embedding
    applications pin values: ``Settings(max_threads=8)``.
    """

    model_config = SettingsConfigDict(
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        populate_by_name=True,
        frozen=True,
    )

    default_model: Annotated[str, _env("ASSISTANTS_DEFAULT_MODEL_ID_OR_NAME", "default_model")] = (
        "Llama3.1 70b Instruct"
    )
    max_threads: Annotated[int, _env("DEFAULT_MAX_THREADS", "max_threads"), Field(ge=1)] = 4
    max_executions_per_batch: Annotated[
        int, _env("MAX_EXECUTIONS_PER_BATCH", "max_executions_per_batch"), Field(ge=1)
    ] = 100
    max_prompt_length: Annotated[
        int, _env("MAX_PROMPT_LENGTH", "max_prompt_length"), Field(ge=1)
    ] = 1000
    max_concurrent_batches: Annotated[
        int, _env("MAX_CONCURRENT_BATCHES", "max_concurrent_batches"), Field(ge=1)
    ] = 5
    max_queued_batches: Annotated[
        int, _env("MAX_QUEUED_BATCHES", "max_queued_batches"), Field(ge=0)
    ] = 100
    execution_timeout_s: Annotated[
        float, _env("EXECUTION_TIMEOUT", "execution_timeout_s"), Field(gt=0)
    ] = 300.0
    max_retries: Annotated[int, _env("MAX_RETRIES", "max_retries"), Field(ge=0, le=20)] = 3
    host: Annotated[str, _env("HOST", "host"), Field(min_length=1)] = "127.0.0.1"
    port: Annotated[int, _env("PORT", "port"), Field(ge=0, le=65535)] = 8080
    server_name: Annotated[str | None, _env("SERVER_NAME", "server_name")] = None
    public_dir: Annotated[Path, _env("PUBLIC_DIR", "public_dir")] = Path("public")
    integrations_api_keys: Annotated[
        SecretStr, _env("INTEGRATIONS_API_KEYS", "integrations_api_keys")
    ] = SecretStr(DEV_API_KEY)
    models_path: Annotated[Path | None, _env("BATCHEXEC_MODELS", "models_path")] = None
    results_ttl_hours: Annotated[
        float, _env("RESULTS_TTL_HOURS", "results_ttl_hours"), Field(gt=0)
    ] = 168.0
    #: Whether batches use the answer cache unless they (or their model) say otherwise.
    cache_answers: Annotated[bool, _env("CACHE_ANSWERS", "cache_answers")] = False
    #: How long a cached answer is given again.
    cache_ttl_hours: Annotated[
        float, _env("CACHE_TTL_HOURS", "cache_ttl_hours"), Field(gt=0, allow_inf_nan=False)
    ] = 24.0
    #: The window a model's tpm counts over: a minute, shorter only in tests and demos.
    tpm_window_s: Annotated[
        float, _env("TPM_WINDOW_S", "tpm_window_s"), Field(gt=0, allow_inf_nan=False)
    ] = 60.0
    #: The budget of a batch that sets no max_cost (in the catalog's currency); unset,
    #: MAX_COST's, else none.
    default_max_cost: Annotated[
        float | None,
        _env("DEFAULT_MAX_COST", "default_max_cost"),
        Field(ge=0, allow_inf_nan=False),
    ] = None
    #: The most any key may give one batch as its max_cost; a batch asking more is refused.
    max_cost: Annotated[
        float | None, _env("MAX_COST", "max_cost"), Field(ge=0, allow_inf_nan=False)
    ] = None
    max_body_bytes: Annotated[int, _env("MAX_BODY_BYTES", "max_body_bytes"), Field(ge=1024)] = (
        4 * 1024 * 1024
    )
    shutdown_grace_s: Annotated[
        float, _env("SHUTDOWN_GRACE_S", "shutdown_grace_s"), Field(ge=0)
    ] = 30.0
    max_sent_prompt_length: Annotated[
        int, _env("MAX_SENT_PROMPT_LENGTH", "max_sent_prompt_length"), Field(ge=1)
    ] = EXCEL_CELL_CHARS
    max_result_length: Annotated[
        int, _env("MAX_RESULT_LENGTH", "max_result_length"), Field(ge=1)
    ] = EXCEL_CELL_CHARS
    max_response_bytes: Annotated[
        int, _env("MAX_RESPONSE_BYTES", "max_response_bytes"), Field(ge=1024)
    ] = 2 * 1024 * 1024
    max_columns: Annotated[
        int, _env("MAX_COLUMNS", "max_columns"), Field(ge=1, le=MAX_INPUT_COLUMNS)
    ] = 256
    max_input_cells: Annotated[int, _env("MAX_INPUT_CELLS", "max_input_cells"), Field(ge=1)] = (
        200_000
    )
    parse_timeout_s: Annotated[float, _env("PARSE_TIMEOUT_S", "parse_timeout_s"), Field(gt=0)] = (
        10.0
    )
    max_templates: Annotated[int, _env("MAX_TEMPLATES", "max_templates"), Field(ge=0)] = 100
    results_cache_bytes: Annotated[
        int, _env("RESULTS_CACHE_BYTES", "results_cache_bytes"), Field(ge=0)
    ] = 64 * 1024 * 1024
    database_url: Annotated[str, _env("DATABASE_URL", "database_url")] = "sqlite:///batchexec.db"
    batch_cache_bytes: Annotated[
        int, _env("BATCH_CACHE_BYTES", "batch_cache_bytes"), Field(ge=0)
    ] = 8 * 1024 * 1024
    #: Connections each process keeps to a PostgreSQL ``DATABASE_URL``.
    database_pool_size: Annotated[
        int, _env("DATABASE_POOL_SIZE", "database_pool_size"), Field(ge=2, le=100)
    ] = 10
    #: Seconds a replica's claim on a batch lasts unless renewed (PostgreSQL only): how
    #: long a dead replica's batches wait before another replica takes them over.
    lease_s: Annotated[float, _env("LEASE_S", "lease_s"), Field(ge=0.5, le=3600)] = 15.0
    #: ``json``: one JSON object a log line (``logs.JSONFormatter``); ``text``: plain lines.
    log_format: Annotated[LogFormat, _env("LOG_FORMAT", "log_format")] = "text"
    #: ``GET /metrics`` without a key, for requests from a loopback address only.
    metrics_open: Annotated[bool, _env("METRICS_OPEN", "metrics_open")] = False

    #: Bytes of one file uploaded to ``/v1/files`` (OpenAI's limit: 200 MB).
    max_file_bytes: Annotated[int, _env("MAX_FILE_BYTES", "max_file_bytes"), Field(ge=1024)] = (
        200 * 1024 * 1024
    )
    #: Request lines of one ``/v1/batches`` input file (OpenAI's limit: 50,000).
    max_file_lines: Annotated[int, _env("MAX_FILE_LINES", "max_file_lines"), Field(ge=1)] = 50_000
    #: Files one API key keeps in ``/v1/files`` (uploads, and its batches' outputs).
    max_stored_files: Annotated[int, _env("MAX_STORED_FILES", "max_stored_files"), Field(ge=1)] = (
        100
    )
    #: The origins completion webhooks may go to (``webhook_urls.AllowList``); empty: off.
    callback_allow: Annotated[str, _env("CALLBACK_ALLOW", "callback_allow")] = ""
    #: The webhook of every batch that names none; empty: none.
    callback_url: Annotated[str, _env("CALLBACK_URL", "callback_url")] = ""
    #: The key webhooks are signed with (``webhooks.py``); required once they are on.
    callback_secret: Annotated[SecretStr, _env("CALLBACK_SECRET", "callback_secret")] = SecretStr(
        ""
    )
    #: Attempts at a webhook before it is given up, the first included.
    callback_attempts: Annotated[
        int, _env("CALLBACK_ATTEMPTS", "callback_attempts"), Field(ge=1, le=30)
    ] = 8
    #: Seconds before the first retry of a webhook; each next one waits twice as long.
    callback_backoff_s: Annotated[
        float, _env("CALLBACK_BACKOFF_S", "callback_backoff_s"), Field(gt=0, le=3600)
    ] = 10.0
    #: Seconds one webhook attempt may take, connection included.
    callback_timeout_s: Annotated[
        float, _env("CALLBACK_TIMEOUT_S", "callback_timeout_s"), Field(gt=0, le=300)
    ] = 10.0

    openai_base_url: Annotated[str | None, _env("OPENAI_BASE_URL", "openai_base_url")] = None
    watsonx_url: Annotated[str | None, _env("WATSONX_URL", "watsonx_url")] = None
    watsonx_project_id: Annotated[str | None, _env("WATSONX_PROJECT_ID", "watsonx_project_id")] = (
        None
    )
    ollama_host: Annotated[str | None, _env("OLLAMA_HOST", "ollama_host")] = None

    @field_validator("server_name", "openai_base_url", "watsonx_url")
    @classmethod
    def _check_url(cls, value: str | None) -> str | None:
        if not value:
            return None
        if not value.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        return value.rstrip("/")

    @field_validator("log_format", mode="before")
    @classmethod
    def _fold_log_format(cls, value: object) -> object:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, value: str) -> str:
        return check_database_url(value.strip())

    @field_validator("integrations_api_keys")
    @classmethod
    def _check_keys(cls, value: SecretStr) -> SecretStr:
        keys = [key.strip() for key in value.get_secret_value().split(",")]
        if not any(keys):
            raise ValueError("must list at least one key, comma-separated")
        if not all(key.isascii() and key.isprintable() for key in keys if key):
            raise ValueError("keys must be printable ASCII")
        return value

    @field_validator("callback_allow")
    @classmethod
    def _check_callback_allow(cls, value: str) -> str:
        AllowList.parse(value)
        return value

    @model_validator(mode="after")
    def _check_callbacks(self) -> Settings:
        if self.callbacks and not self.callback_secret.get_secret_value():
            raise ValueError(
                "CALLBACK_SECRET must be set once CALLBACK_ALLOW turns completion webhooks on"
            )
        if self.callback_url:
            try:
                self.callbacks.check(self.callback_url)
            except ValueError as exc:
                raise ValueError(f"CALLBACK_URL {exc}") from None
        return self

    @model_validator(mode="after")
    def _check_budgets(self) -> Settings:
        if (
            self.default_max_cost is not None
            and self.max_cost is not None
            and self.default_max_cost > self.max_cost
        ):
            raise ValueError(
                f"DEFAULT_MAX_COST ({self.default_max_cost:g}) is over MAX_COST "
                f"({self.max_cost:g}), the most any batch may have"
            )
        return self

    def kept_budget(self, max_cost: float | None) -> float | None:
        """The budget of a batch that keeps ``max_cost`` from another (a retry): what a
        new batch without one would get, and never over ``MAX_COST``."""
        if max_cost is None:
            return self.budget(None)
        return max_cost if self.max_cost is None else min(max_cost, self.max_cost)

    @field_validator("default_model")
    @classmethod
    def _check_default_model(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must name a model")
        return value.strip()

    @cached_property
    def callbacks(self) -> AllowList:
        """Where completion webhooks may go; false when they are off."""
        return AllowList.parse(self.callback_allow)

    @property
    def api_keys(self) -> tuple[str, ...]:
        """The accepted ``Integrations-API-Key`` values."""
        raw = self.integrations_api_keys.get_secret_value()
        return tuple(key.strip() for key in raw.split(",") if key.strip())

    @property
    def uses_dev_key(self) -> bool:
        """Whether the built-in development key is among the accepted keys."""
        return DEV_API_KEY in self.api_keys

    @property
    def host_is_loopback(self) -> bool:
        """Whether ``host`` only accepts connections from this machine."""
        if self.host.lower() == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    @property
    def results_dir(self) -> Path:
        """Folder that holds the XLSX workbooks."""
        return self.public_dir / RESULTS_SUBDIR

    def budget(self, max_cost: float | None) -> float | None:
        """The budget of a batch that asks for ``max_cost`` (None: asks for none).

        ``DEFAULT_MAX_COST``, else ``MAX_COST``, when it asks for none;
        ``ValueError`` when it asks for more than ``MAX_COST``, or for a
        negative or infinite amount.
        """
        if max_cost is None:
            return self.default_max_cost if self.default_max_cost is not None else self.max_cost
        if not math.isfinite(max_cost) or max_cost < 0:
            raise ValueError("must be a number, 0 or more")
        if self.max_cost is not None and max_cost > self.max_cost:
            raise ValueError(
                f"is {max_cost:g}; the most a batch may set (MAX_COST) is {self.max_cost:g}"
            )
        return max_cost

    @property
    def results_ttl_s(self) -> float:
        """``results_ttl_hours`` in seconds."""
        return self.results_ttl_hours * 3600

    def secret(self, name: str) -> str | None:
        """Value of the environment variable ``name`` (then ``.env``); None when unset or empty.

        Provider credentials are looked up by name when needed rather than
        stored here, so no secret ever appears in a ``Settings`` repr.
        """
        value = os.environ[name] if name in os.environ else self._dotenv.get(name)
        return value or None

    @cached_property
    def _dotenv(self) -> dict[str, str | None]:
        env_file = self.model_config.get("env_file")
        return read_dotenv(env_file) if isinstance(env_file, str) else {}


def read_dotenv(path: str = ".env") -> dict[str, str | None]:
    """The variables of the ``.env`` file at ``path``, if there is one: the one reader of it
    besides pydantic-settings' own (settings, provider secrets, the submit command's key)."""
    return dict(dotenv_values(path)) if Path(path).is_file() else {}


def load_settings(**overrides: Any) -> Settings:
    """Build ``Settings``; a bad value raises ``ConfigError`` naming the variable."""
    try:
        return Settings(**overrides)
    except UnicodeDecodeError as exc:
        raise ConfigError(f".env: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except OSError as exc:
        raise ConfigError(f".env: cannot read it: {exc.strerror or exc}") from exc
    except ValidationError as exc:
        error = exc.errors()[0]
        message = str(error["msg"]).removeprefix("Value error, ")
        if not error["loc"]:
            # A check across settings (``_check_callbacks``) names its variables itself.
            raise ConfigError(message) from exc
        name = str(error["loc"][0])
        field = Settings.model_fields.get(name)
        if field is not None and isinstance(field.validation_alias, AliasChoices):
            name = str(field.validation_alias.choices[0])
        value = error.get("input")
        shown = (
            ""
            if isinstance(value, dict) or name in ("INTEGRATIONS_API_KEYS", "CALLBACK_SECRET")
            else f" (got {value!r})"
        )
        raise ConfigError(f"{name}: {message}{shown}") from exc
