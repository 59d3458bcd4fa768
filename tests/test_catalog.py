"""Tests for batchexec/catalog.py: names, aliases, merging, assistants and resolution."""

from __future__ import annotations

from pathlib import Path

import pytest

from batchexec.catalog import AssistantSpec, Catalog, ModelSpec, UnknownNameError, fold
from batchexec.errors import ConfigError

BUILTIN_MODELS = {
    "echo",
    "slow-echo",
    "Llama3.1 70b Instruct",
    "Llama3 8B Instruct",
    "Granite 13B V2.1",
    "Llama3.3 70b Instruct",
    "Granite 3 8B Instruct",
}

CUSTOM = """
[models."Granite 13B V2.1"]
provider = "openai"
model_id = "granite-on-vllm"
base_url = "http://127.0.0.1:8000/v1"

[models."local-llama"]
provider = "openai"
base_url = "http://127.0.0.1:11434/v1"
model_id = "llama3.1:8b"
api_key_env = "OLLAMA_KEY"
max_concurrency = 8
aliases = ["llama-local"]
system_prompt = "You are terse."
params = { temperature = 0.2, max_tokens = 512 }

[assistants."Summarizer"]
model = "LOCAL_llama"
system_prompt = "Summarise the text in three bullet points."
params = { temperature = 0.1 }
aliases = ["summary bot"]

[assistants."Plain"]
model = "echo"
"""


def write_toml(tmp_path: Path, text: str, name: str = "models.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def load_error(tmp_path: Path, text: str) -> ConfigError:
    path = write_toml(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        Catalog.load(path)
    return caught.value


@pytest.mark.parametrize(
    ("left", "right"),
    [
        ("Llama3.1 70b Instruct", "llama3.1-70b_instruct"),
        ("Granite 13B V2.1", "  granite__13b -- v2.1 "),
        ("fast-echo", "FAST ECHO"),
        ("a\tb", "a b"),
    ],
)
def test_fold_matches_case_spaces_dashes_and_underscores(left: str, right: str) -> None:
    assert fold(left) == fold(right)


@pytest.mark.parametrize(("left", "right"), [("gpt4", "gpt-4"), ("v2.1", "v2-1"), ("ab", "a b")])
def test_fold_keeps_other_differences(left: str, right: str) -> None:
    assert fold(left) != fold(right)


def test_builtin_catalog_holds_echo_and_the_original_model_names() -> None:
    catalog = Catalog.load()
    assert {model.name for model in catalog.models} == BUILTIN_MODELS
    assert catalog.assistants == []
    echo = catalog.model("echo")
    assert echo.provider == "echo"
    assert echo.wire_id == "echo"
    assert catalog.model("slow-echo").latency_s == pytest.approx(0.4)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("granite-13b", "Granite 13B V2.1"),
        ("GRANITE_13B_CHAT_V2", "Granite 13B V2.1"),
        ("llama3.1_70b-instruct", "Llama3.1 70b Instruct"),
        ("llama-3-1-70b-instruct", "Llama3.1 70b Instruct"),
        ("Slow Echo", "slow-echo"),
    ],
)
def test_models_are_found_by_folded_name_or_alias(name: str, expected: str) -> None:
    assert Catalog.load().model(name).name == expected


def test_wire_id_is_model_id_when_set() -> None:
    assert Catalog.load().model("granite-13b").wire_id == "ibm/granite-13b-chat-v2"


def test_unknown_model_lists_known_names_sorted() -> None:
    catalog = Catalog.load()
    with pytest.raises(UnknownNameError) as caught:
        catalog.model("gpt-5")
    error = caught.value
    assert isinstance(error, LookupError)
    assert error.kind == "model"
    assert error.name == "gpt-5"
    message = str(error)
    assert message.startswith("Unknown model 'gpt-5'. Known models: ")
    listed = message.split("Known models: ", 1)[1].split(", ")
    assert set(listed) == BUILTIN_MODELS
    assert listed == sorted(listed, key=str.casefold)


def test_unknown_name_error_lists_names_not_aliases() -> None:
    with pytest.raises(UnknownNameError) as caught:
        Catalog.load().model("nope")
    assert "granite-13b" not in str(caught.value)


def test_unknown_assistant_in_a_catalog_without_assistants_says_none() -> None:
    with pytest.raises(UnknownNameError, match=r"Known assistants: none$"):
        Catalog.load().assistant("Summarizer")


def test_file_is_merged_over_builtin(tmp_path: Path) -> None:
    catalog = Catalog.load(write_toml(tmp_path, CUSTOM))
    names = [model.name for model in catalog.models]
    assert set(names) == BUILTIN_MODELS | {"local-llama"}
    assert len(names) == len(BUILTIN_MODELS) + 1
    local = catalog.model("llama-local")
    assert local.name == "local-llama"
    assert local.base_url == "http://127.0.0.1:11434/v1"
    assert local.api_key_env == "OLLAMA_KEY"
    assert local.max_concurrency == 8
    assert local.params == {"temperature": 0.2, "max_tokens": 512}
    assert {assistant.name for assistant in catalog.assistants} == {"Summarizer", "Plain"}


def test_entry_of_the_same_name_replaces_the_builtin_whole(tmp_path: Path) -> None:
    catalog = Catalog.load(write_toml(tmp_path, CUSTOM))
    granite = catalog.model("granite 13b v2.1")
    assert granite.provider == "openai"
    assert granite.wire_id == "granite-on-vllm"
    # The built-in entry's aliases went with it.
    with pytest.raises(UnknownNameError):
        catalog.model("granite-13b")


def test_replacement_matches_builtin_by_folded_name(tmp_path: Path) -> None:
    catalog = Catalog.load(write_toml(tmp_path, '[models."ECHO"]\nprovider = "echo"\n'))
    assert [model.name for model in catalog.models].count("ECHO") == 1
    assert "echo" not in [model.name for model in catalog.models]
    assert catalog.model("echo").name == "ECHO"


def test_assistant_resolves_with_its_model_and_merged_params(tmp_path: Path) -> None:
    catalog = Catalog.load(write_toml(tmp_path, CUSTOM))
    assert catalog.assistant("SUMMARY-BOT").name == "Summarizer"
    target = catalog.resolve(model=None, assistant="summarizer", default_model="echo")
    assert target.assistant == "Summarizer"
    assert target.model.name == "local-llama"
    assert target.system_prompt == "Summarise the text in three bullet points."
    assert target.params == {"temperature": 0.1, "max_tokens": 512}


def test_assistant_without_system_prompt_uses_its_models(tmp_path: Path) -> None:
    path = write_toml(
        tmp_path,
        '[models."m"]\nprovider = "echo"\nsystem_prompt = "model says"\n'
        '[assistants."a"]\nmodel = "m"\n',
    )
    target = Catalog.load(path).resolve(model=None, assistant="a", default_model="echo")
    assert target.system_prompt == "model says"


def test_resolve_model_by_name_or_default() -> None:
    catalog = Catalog.load()
    named = catalog.resolve(model="granite-13b", assistant=None, default_model="echo")
    assert named.model.name == "Granite 13B V2.1"
    assert named.assistant is None
    default = catalog.resolve(model=None, assistant=None, default_model="llama-3-8b-instruct")
    assert default.model.name == "Llama3 8B Instruct"
    assert default.assistant is None
    assert default.system_prompt is None


def test_resolve_unknown_assistant_lists_known_assistants(tmp_path: Path) -> None:
    catalog = Catalog.load(write_toml(tmp_path, CUSTOM))
    with pytest.raises(UnknownNameError) as caught:
        catalog.resolve(model=None, assistant="Translator", default_model="echo")
    assert caught.value.kind == "assistant"
    assert str(caught.value).endswith("Known assistants: Plain, Summarizer")


def test_catalog_built_in_code_sorts_known_names_case_insensitively() -> None:
    catalog = Catalog([ModelSpec(name="b", provider="echo"), ModelSpec(name="A", provider="echo")])
    with pytest.raises(UnknownNameError, match=r"Known models: A, b$"):
        catalog.model("c")


def test_with_models_adds_new_names_and_keeps_existing_entries() -> None:
    catalog = Catalog.load()
    extended = catalog.with_models(
        [ModelSpec(name="extra", provider="echo"), ModelSpec(name="ECHO", provider="openai")]
    )
    assert extended.model("extra").provider == "echo"
    assert extended.model("echo").provider == "echo"
    with pytest.raises(UnknownNameError):
        catalog.model("extra")


def test_missing_file_is_a_config_error_naming_the_variable(tmp_path: Path) -> None:
    path = tmp_path / "missing.toml"
    with pytest.raises(ConfigError) as caught:
        Catalog.load(path)
    assert str(caught.value).startswith("BATCHEXEC_MODELS: cannot read")
    assert str(path) in str(caught.value)


@pytest.mark.parametrize("content", [b'[models."x"\nprovider = "echo"\n', b"\xff\xfe\x00"])
def test_invalid_toml_is_a_config_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.toml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=r"BATCHEXEC_MODELS: .* is not valid TOML"):
        Catalog.load(path)


def test_duplicate_alias_across_models(tmp_path: Path) -> None:
    error = load_error(tmp_path, '[models."mine"]\nprovider = "echo"\naliases = ["Granite_13B"]\n')
    message = str(error)
    assert "'Granite_13B'" in message
    assert "'mine'" in message
    assert "'Granite 13B V2.1'" in message


def test_alias_clashing_with_another_models_name(tmp_path: Path) -> None:
    error = load_error(tmp_path, '[models."mine"]\nprovider = "echo"\naliases = ["Echo"]\n')
    assert "'Echo'" in str(error)


def test_duplicate_alias_across_assistants(tmp_path: Path) -> None:
    text = (
        '[assistants."a"]\nmodel = "echo"\naliases = ["helper"]\n'
        '[assistants."b"]\nmodel = "echo"\naliases = ["HELPER"]\n'
    )
    assert "assistant name" in str(load_error(tmp_path, text))


def test_assistant_naming_an_unknown_model(tmp_path: Path) -> None:
    error = load_error(tmp_path, '[assistants."Helper"]\nmodel = "gpt-9"\n')
    message = str(error)
    assert "assistant 'Helper'" in message
    assert "Unknown model 'gpt-9'" in message
    assert "echo" in message


def test_assistant_in_code_naming_an_unknown_model() -> None:
    with pytest.raises(ConfigError, match="assistant 'x'"):
        Catalog([ModelSpec(name="m", provider="echo")], [AssistantSpec(name="x", model="n")])


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ('[models."x"]\nprovider = "echo"\ntemperature = 1\n', "models.'x': temperature"),
        ('[assistants."a"]\nmodel = "echo"\nprovider = "echo"\n', "assistants.'a': provider"),
        ('[model."x"]\nprovider = "echo"\n', "unknown table(s) model"),
        ('[models."x"]\nmodel_id = "m"\n', "models.'x': provider"),
        ('[models."x"]\nprovider = ""\n', "models.'x': provider"),
        ('[models."x"]\nprovider = "echo"\nlatency_s = -1\n', "models.'x': latency_s"),
        ('[models."x"]\nprovider = "echo"\nmax_concurrency = 0\n', "max_concurrency"),
        ('[models."x"]\nprovider = "echo"\naliases = "x2"\n', "aliases"),
        ('[assistants."a"]\nsystem_prompt = "hi"\n', "assistants.'a': model"),
        ("[models]\nx = 1\n", "models.'x' must be a table"),
        ("models = 1\n", "[models] must be a table"),
        ('[models." "]\nprovider = "echo"\n', "empty name"),
    ],
)
def test_bad_entries_are_config_errors_naming_file_and_entry(
    tmp_path: Path, text: str, fragment: str
) -> None:
    message = str(load_error(tmp_path, text))
    assert fragment in message
    assert str(tmp_path / "models.toml") in message
    assert "\n" not in message


def test_name_key_inside_an_entry_is_a_config_error(tmp_path: Path) -> None:
    error = load_error(tmp_path, '[models."x"]\nprovider = "echo"\nname = "y"\n')
    assert "models.'x'" in str(error)
    assert "name" in str(error)


def test_discovered_ids_that_are_aliases_keep_the_catalog_entry():
    catalog = Catalog.load()
    merged = catalog.with_models(
        [ModelSpec(name="granite-13b", provider="openai"), ModelSpec(name="new", provider="openai")]
    )
    assert merged.model("granite-13b").name == "Granite 13B V2.1"
    assert merged.model("new").provider == "openai"


def test_a_model_id_finds_its_model():
    assert Catalog.load().model("meta-llama/llama-3-1-70b-instruct").name == "Llama3.1 70b Instruct"


@pytest.mark.parametrize(
    ("entry", "fragment"),
    [
        ('base_url = "localhost:8000/v1"', "http:// or https://"),
        ("params = { when = 1979-05-27 }", "JSON values"),
    ],
)
def test_catalog_entries_that_cannot_work_are_refused_at_load(tmp_path, entry, fragment):
    path = tmp_path / "models.toml"
    path.write_text(f'[models."m"]\nprovider = "openai"\n{entry}\n')
    with pytest.raises(ConfigError, match=fragment):
        Catalog.load(path)


RATER = """
[assistants."Rater"]
model = "echo"
system_prompt = "Rate the sentiment of the review."

[assistants."Rater".response_schema]
type = "object"
required = ["sentiment", "score"]
properties.sentiment = { enum = ["positive", "neutral", "negative"] }
properties.score = { type = "number" }
"""


def test_an_assistants_response_schema_reaches_its_target(tmp_path):
    catalog = Catalog.load(write_toml(tmp_path, RATER))
    target = catalog.resolve(model=None, assistant="rater", default_model="echo")
    assert target.response_schema == {
        "type": "object",
        "required": ["sentiment", "score"],
        "properties": {
            "sentiment": {"enum": ["positive", "neutral", "negative"]},
            "score": {"type": "number"},
        },
    }


def test_targets_without_a_response_schema_have_none(tmp_path):
    catalog = Catalog.load(write_toml(tmp_path, CUSTOM))
    assert (
        catalog.resolve(model=None, assistant="Plain", default_model="echo").response_schema is None
    )
    assert (
        catalog.resolve(model="echo", assistant=None, default_model="echo").response_schema is None
    )


@pytest.mark.parametrize(
    ("schema", "fragment"),
    [
        ("[1]", "must be a JSON object, not an array"),
        ('{ type = "numeric" }', "not a valid JSON Schema (draft 2020-12)"),
        ('{ "$ref" = "https://example.com/s.json" }', "refers outside itself"),
        ("{ default = 1979-05-27 }", "must hold only JSON values"),
    ],
)
def test_an_unusable_response_schema_stops_the_catalog_naming_the_assistant(
    tmp_path, schema, fragment
):
    text = f'[assistants."Rater"]\nmodel = "echo"\nresponse_schema = {schema}\n'
    message = str(load_error(tmp_path, text))
    assert f"{tmp_path / 'models.toml'}: assistants.'Rater': response_schema: " in message
    assert fragment in message
    assert "Value error" not in message
