"""The model and assistant catalog: names, aliases and each model's provider settings."""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from batchexec.errors import ConfigError
from batchexec.structured import check_schema

_FOLD = re.compile(r"[\s_\-]+")
#: The currency of the models' prices when the catalog names none.
DEFAULT_CURRENCY = "USD"


def fold(name: str) -> str:
    """The form names are matched in: case-insensitive, runs of spaces, ``-`` and ``_`` alike."""
    return _FOLD.sub(" ", name.strip()).casefold()


class Entry(BaseModel):
    """What models and assistants have in common: a name, aliases and a description."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    aliases: tuple[str, ...] = ()
    description: str | None = None


class ModelSpec(Entry):
    """One model entry: which provider serves it and with what settings."""

    provider: Annotated[str, Field(min_length=1)]
    model_id: str | None = None
    base_url: str | None = None
    #: Name of the environment variable holding the key; never the key itself.
    api_key_env: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    system_prompt: str | None = None
    #: echo only: simulated latency.
    latency_s: Annotated[float, Field(ge=0)] = 0.0
    #: Calls in flight to this model across all batches.
    max_concurrency: Annotated[int | None, Field(ge=1)] = None
    #: Requests per minute across all batches.
    rpm: Annotated[float | None, Field(gt=0)] = None
    #: Tokens per minute across all batches of a process (``token_limits``).
    tpm: Annotated[int | None, Field(gt=0)] = None
    #: Whether its answers are cached and given again (``answer_cache``) unless a batch
    #: says otherwise.
    cache: bool = False
    #: Prices per million prompt (input) and completion (output) tokens, in the
    #: catalog's ``currency``; unset, its rows cost nothing known.
    input_per_mtok: Annotated[float | None, Field(ge=0, allow_inf_nan=False)] = None
    output_per_mtok: Annotated[float | None, Field(ge=0, allow_inf_nan=False)] = None

    @field_validator("base_url")
    @classmethod
    def _check_base_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        return value

    @field_validator("params")
    @classmethod
    def _check_params(cls, value: dict[str, Any]) -> dict[str, Any]:
        try:
            json.dumps(value)
        except (TypeError, ValueError) as exc:
            raise ValueError(
                f"must hold only JSON values (strings, numbers, lists, tables): {exc}"
            ) from None
        return value

    @property
    def priced(self) -> bool:
        """Whether the catalog gives this model a price."""
        return self.input_per_mtok is not None or self.output_per_mtok is not None

    def cost(self, prompt_tokens: int | None, completion_tokens: int | None) -> float | None:
        """What a call that used these tokens cost; None when the model has no price or
        the provider did not report the tokens a price applies to."""
        if not self.priced:
            return None
        per_million = 0.0
        for price, tokens in (
            (self.input_per_mtok, prompt_tokens),
            (self.output_per_mtok, completion_tokens),
        ):
            if price is None:
                continue
            if tokens is None:
                return None
            per_million += price * tokens
        # One division: the cost is exactly (prompt x in + completion x out) / 10**6.
        return per_million / 1_000_000

    @property
    def wire_id(self) -> str:
        """The id sent to the provider: ``model_id``, or the entry's name."""
        return self.model_id or self.name


class AssistantSpec(Entry):
    """An assistant: a model with its own system prompt and parameters."""

    model: Annotated[str, Field(min_length=1)]
    system_prompt: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    #: The JSON Schema its answers must match (``structured``); None for free text.
    response_schema: dict[str, Any] | None = None

    @field_validator("response_schema", mode="before")
    @classmethod
    def _check_response_schema(cls, value: object) -> dict[str, Any] | None:
        return None if value is None else check_schema(value)


@dataclass(frozen=True)
class Target:
    """What one execution runs against, after its model or assistant is resolved."""

    model: ModelSpec
    system_prompt: str | None
    params: Mapping[str, Any]
    assistant: str | None = None
    #: The assistant's JSON Schema for the answer, already checked; None for free text.
    response_schema: Mapping[str, Any] | None = None


_Entry = TypeVar("_Entry", bound=Entry)


class UnknownNameError(LookupError):
    """A model or assistant name that the catalog does not hold."""

    def __init__(self, kind: str, name: str, known: Iterable[str]) -> None:
        self.kind = kind
        self.name = name
        names = ", ".join(sorted(known, key=str.casefold)) or "none"
        super().__init__(f"Unknown {kind} {name!r}. Known {kind}s: {names}")


class _Names(Generic[_Entry]):
    """Entries by folded name and alias."""

    def __init__(self, kind: str, entries: Iterable[_Entry]) -> None:
        self.kind = kind
        self.entries: dict[str, _Entry] = {}
        self._index: dict[str, _Entry] = {}
        for entry in entries:
            self.entries[fold(entry.name)] = entry
        for entry in self.entries.values():
            for name in (entry.name, *entry.aliases):
                other = self._index.setdefault(fold(name), entry)
                if other is not entry:
                    raise ConfigError(
                        f"{kind} name {name!r} of {entry.name!r} is also used by {other.name!r}"
                    )

    def __contains__(self, name: str) -> bool:
        return fold(name) in self._index

    def get(self, name: str) -> _Entry:
        try:
            return self._index[fold(name)]
        except KeyError:
            known = [entry.name for entry in self.entries.values()]
            raise UnknownNameError(self.kind, name, known) from None


class Catalog:
    """Models and assistants by name; names fold case, spaces, ``-`` and ``_``."""

    def __init__(
        self,
        models: Iterable[ModelSpec],
        assistants: Iterable[AssistantSpec] = (),
        *,
        currency: str = DEFAULT_CURRENCY,
    ):
        #: What the models' prices are in, named once for the whole catalog.
        self.currency = currency
        self._models = _Names("model", models)
        self._assistants = _Names("assistant", assistants)
        for assistant in self._assistants.entries.values():
            try:
                self._models.get(assistant.model)
            except UnknownNameError as exc:
                raise ConfigError(f"assistant {assistant.name!r}: {exc}") from None

    @classmethod
    def load(cls, path: Path | None = None) -> Catalog:
        """The built-in catalog, with the TOML file at ``path`` merged over it."""
        builtin = resources.files("batchexec").joinpath("builtin_models.toml").read_text("utf-8")
        models, assistants = _parse(tomllib.loads(builtin), "built-in catalog")
        currency = DEFAULT_CURRENCY
        if path is not None:
            try:
                document = tomllib.loads(path.read_text("utf-8"))
            except OSError as exc:
                raise ConfigError(f"BATCHEXEC_MODELS: cannot read {path}: {exc.strerror}") from exc
            except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
                raise ConfigError(f"BATCHEXEC_MODELS: {path} is not valid TOML: {exc}") from exc
            extra_models, extra_assistants = _parse(document, str(path))
            models.update(extra_models)
            assistants.update(extra_assistants)
            currency = _currency(document, str(path))
        return cls(models.values(), assistants.values(), currency=currency)

    def with_models(self, models: Iterable[ModelSpec]) -> Catalog:
        """A catalog with ``models`` added; a name already taken (by a name or an alias)
        keeps its entry."""
        added = [model for model in models if model.name not in self._models]
        return Catalog(
            [*self._models.entries.values(), *added],
            self._assistants.entries.values(),
            currency=self.currency,
        )

    @property
    def models(self) -> list[ModelSpec]:
        """Every model entry, in catalog order."""
        return list(self._models.entries.values())

    @property
    def assistants(self) -> list[AssistantSpec]:
        """Every assistant entry, in catalog order."""
        return list(self._assistants.entries.values())

    def model(self, name: str) -> ModelSpec:
        """The model called ``name``, or else the one model whose ``model_id`` it is.

        Raises ``UnknownNameError``.
        """
        try:
            return self._models.get(name)
        except UnknownNameError:
            matches = [m for m in self._models.entries.values() if fold(m.wire_id) == fold(name)]
            if len(matches) == 1:
                return matches[0]
            raise

    def assistant(self, name: str) -> AssistantSpec:
        """The assistant called ``name``; raises ``UnknownNameError``."""
        return self._assistants.get(name)

    def resolve(self, *, model: str | None, assistant: str | None, default_model: str) -> Target:
        """The target of an execution naming ``model``, ``assistant`` or neither."""
        if assistant:
            spec = self.assistant(assistant)
            chosen = self.model(spec.model)
            return Target(
                model=chosen,
                system_prompt=spec.system_prompt or chosen.system_prompt,
                params={**chosen.params, **spec.params},
                assistant=spec.name,
                response_schema=spec.response_schema,
            )
        chosen = self.model(model or default_model)
        return Target(model=chosen, system_prompt=chosen.system_prompt, params=chosen.params)


def _parse(
    document: Mapping[str, Any], source: str
) -> tuple[dict[str, ModelSpec], dict[str, AssistantSpec]]:
    unknown = set(document) - {"models", "assistants", "currency"}
    if unknown:
        raise ConfigError(f"{source}: unknown table(s) {', '.join(sorted(unknown))}")
    models = {
        fold(name): _entry(ModelSpec, name, body, source, "models")
        for name, body in _table(document, "models", source).items()
    }
    assistants = {
        fold(name): _entry(AssistantSpec, name, body, source, "assistants")
        for name, body in _table(document, "assistants", source).items()
    }
    return models, assistants


def _currency(document: Mapping[str, Any], source: str) -> str:
    currency = document.get("currency", DEFAULT_CURRENCY)
    if not isinstance(currency, str) or not 1 <= len(currency.strip()) <= 10:
        raise ConfigError(f'{source}: currency must be a short name, such as "USD"')
    return currency.strip()


def _table(document: Mapping[str, Any], key: str, source: str) -> dict[str, Any]:
    table = document.get(key, {})
    if not isinstance(table, dict):
        raise ConfigError(f"{source}: [{key}] must be a table")
    return table


def _entry(kind: type[_Entry], name: str, body: Any, source: str, table: str) -> _Entry:
    if not isinstance(body, dict):
        raise ConfigError(f"{source}: {table}.{name!r} must be a table")
    if not name.strip():
        raise ConfigError(f"{source}: {table} entry with an empty name")
    if "name" in body:
        raise ConfigError(f"{source}: {table}.{name!r}: name: an entry's name is its table key")
    try:
        return kind(name=name, **body)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"])
        message = str(error["msg"]).removeprefix("Value error, ")
        raise ConfigError(f"{source}: {table}.{name!r}: {where}: {message}") from exc
