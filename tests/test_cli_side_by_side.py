"""Spreadsheet-native prompts on the command line: ``{{column}}`` variables and per-row
parameters through ``run`` and ``validate``, ``--models`` side by side and ``--schema``.

The commands run in-process through ``main`` (on a worker thread, with its own event
loop, as a terminal would start it) against a loopback server that speaks OpenAI's chat
completions.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from batchexec.cli import main
from tests.helpers import column, sheet_rows, write_csv

MODELS = ("m-a", "m-b", "m-c")
SCHEMA = {
    "type": "object",
    "properties": {
        "sentiment": {"type": "string", "enum": ["positive", "negative"]},
        "score": {"type": "integer"},
        "sure": {"type": "boolean"},
    },
    "required": ["sentiment", "score", "sure"],
}


class Upstream:
    """Answers ``<model>(<prompt>)``; for a json_schema request, a rating of the prompt;
    ``m-b`` refuses a prompt holding ``fail``."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []

    async def chat(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.bodies.append(body)
        prompt = body["messages"][-1]["content"]
        if "fail" in prompt and body["model"] == "m-b":
            error = {"message": "Refused.", "type": "invalid_request_error"}
            return web.json_response({"error": error}, status=400)
        if (body.get("response_format") or {}).get("type") == "json_schema":
            sentiment = "positive" if "good" in prompt else "negative"
            text = json.dumps({"sentiment": sentiment, "score": len(prompt), "sure": True})
        else:
            text = f"{body['model']}({prompt})"
        message = {"role": "assistant", "content": text}
        return web.json_response(
            {
                "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 3, "completion_tokens": 4},
            }
        )

    def prompts(self, model: str) -> list[str]:
        return [b["messages"][-1]["content"] for b in self.bodies if b["model"] == model]


@pytest.fixture
async def upstream(aiohttp_server: Any, tmp_path: Path) -> Upstream:
    """The fake server, and ``side.toml`` naming its models ``m-a``, ``m-b``, ``m-c``."""
    fake = Upstream()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", fake.chat)
    server = await aiohttp_server(app)
    base_url = server.make_url("/v1")
    (tmp_path / "side.toml").write_text(
        "".join(
            f'[models."{name}"]\nprovider = "openai"\nbase_url = "{base_url}"\n\n'
            for name in MODELS
        )
    )
    return fake


async def command(*args: str) -> int:
    """``python -m batchexec *args`` in this process, its loop apart from the test's."""
    code: int = await asyncio.to_thread(main, list(args))
    return code


async def test_run_models_side_by_side_each_chain_on_its_own_answers(
    upstream, tmp_path, capsys
) -> None:
    rows = [["1", "Start"], *([str(n), f"Continue ${{output.{n - 1}}}"] for n in range(2, 5))]
    write_csv(tmp_path / "chain.csv", ["id", "prompt"], rows)
    code = await command(
        "run", "chain.csv", "-o", "out.xlsx", "--csv", "out.csv", "--catalog", "side.toml",
        "--models", "m-a, m-b,m-c", "--progress-every", "0.05",
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 0, err
    assert len(upstream.bodies) == 12
    for model in MODELS:
        # Each model's row 2 continues that model's own row 1, and so on down the chain.
        assert upstream.prompts(model) == [
            "Start",
            f"Continue {model}(Start)",
            f"Continue {model}(Continue {model}(Start))",
            f"Continue {model}(Continue {model}(Continue {model}(Start)))",
        ]
    sheet = sheet_rows(tmp_path / "out.xlsx")
    assert sheet[0][:5] == ["id", "prompt", "result [m-a]", "status [m-a]", "error [m-a]"]
    assert [name for name in sheet[0] if name.startswith("result")] == [
        f"result [{model}]" for model in MODELS
    ]
    assert "model" not in sheet[0]
    assert len(sheet) == 5  # one row an input row
    assert column(sheet, "result [m-b]")[1] == "m-b(Continue m-b(Start))"
    assert column(sheet, "status [m-c]") == ["succeeded"] * 4
    csv_header = (tmp_path / "out.csv").read_text().splitlines()[0]
    assert csv_header == "id,prompt,result [m-a],result [m-b],result [m-c]"
    # The progress and the summary count every row x model.
    assert "progress: 0/12 done" in err
    assert "rows: 4 on 3 models, 12 executions (12 succeeded, 0 failed" in err
    assert not (tmp_path / "out.xlsx.journal").exists()


async def test_a_failed_row_side_by_side_is_named_by_its_line_and_model(
    upstream, tmp_path, capsys
) -> None:
    write_csv(tmp_path / "p.csv", ["prompt"], [["fine"], ["fail here"], ["fine ${output.2}"]])
    code = await command(
        "run", "p.csv", "-o", "out.xlsx", "--catalog", "side.toml", "--models", "m-a,m-b"
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1
    assert (
        "rows: 3 on 2 models, 6 executions (4 succeeded, 1 failed, 1 skipped, 0 cancelled)" in err
    )
    assert "line 3 [m-b] (failed): OpenAI-compatible server: Refused. (HTTP 400)" in err
    assert "line 4 [m-b] (skipped): " in err
    sheet = sheet_rows(tmp_path / "out.xlsx")
    assert column(sheet, "status [m-a]") == ["succeeded"] * 3
    assert column(sheet, "status [m-b]") == ["succeeded", "failed", "skipped"]


@pytest.mark.parametrize("inline", [False, True])
async def test_run_schema_spreads_typed_result_fields(upstream, tmp_path, inline) -> None:
    (tmp_path / "rating.json").write_text(json.dumps(SCHEMA))
    schema = json.dumps(SCHEMA) if inline else "rating.json"
    rows = [["1", "a good day"], ["2", "rain again"]]
    write_csv(tmp_path / "reviews.csv", ["id", "prompt"], rows)
    code = await command(
        "run", "reviews.csv", "-o", "rated.xlsx", "--csv", "rated.csv",
        "--catalog", "side.toml", "--model", "m-a", "--schema", schema,
    )  # fmt: skip
    assert code == 0
    sent = upstream.bodies[0]["response_format"]
    assert sent["type"] == "json_schema" and sent["json_schema"]["schema"] == SCHEMA
    sheet = sheet_rows(tmp_path / "rated.xlsx")
    fields = ["result.sentiment", "result.score", "result.sure"]
    assert sheet[0][:6] == ["id", "prompt", "result", *fields]
    assert column(sheet, "result.sentiment") == ["positive", "negative"]
    # Typed cells: a number is a number, a boolean a boolean.
    assert column(sheet, "result.score") == [len("a good day"), len("rain again")]
    assert column(sheet, "result.sure") == [True, True]
    header = (tmp_path / "rated.csv").read_text().splitlines()[0]
    assert header == "id,prompt,result,result.sentiment,result.score,result.sure"


async def test_run_with_models_and_a_schema_spreads_each_models_fields(upstream, tmp_path) -> None:
    write_csv(tmp_path / "p.csv", ["prompt"], [["good"]])
    code = await command(
        "run", "p.csv", "-o", "out.xlsx", "--catalog", "side.toml",
        "--models", "m-a,m-b", "--schema", json.dumps(SCHEMA),
    )  # fmt: skip
    assert code == 0
    header = sheet_rows(tmp_path / "out.xlsx")[0]
    assert [name for name in header if name.startswith("result")] == [
        f"{name} [{model}]"
        for model in ("m-a", "m-b")
        for name in ("result", "result.sentiment", "result.score", "result.sure")
    ]


async def test_run_fills_column_variables_and_sends_row_parameters(upstream, tmp_path) -> None:
    write_csv(
        tmp_path / "t.csv",
        ["id", "text", "lang", "prompt", "system", "max_tokens", "temperature"],
        [
            ["1", "Good morning", "French", "Translate {{text}} into {{lang}}", "", "", ""],
            ["2", "Thank you", "German", "Translate {{text}} into {{Lang}}", "Be {{lang}}.", "9",
             "0.2"],
        ],
    )  # fmt: skip
    code = await command(
        "run", "t.csv", "-o", "out.xlsx", "--catalog", "side.toml", "--model", "m-a"
    )
    assert code == 0
    first, second = upstream.bodies
    assert first["messages"] == [{"role": "user", "content": "Translate Good morning into French"}]
    assert {"max_tokens", "temperature"}.isdisjoint(first)
    assert second["messages"] == [
        {"role": "system", "content": "Be German."},
        {"role": "user", "content": "Translate Thank you into German"},
    ]
    assert (second["max_tokens"], second["temperature"]) == (9, 0.2)
    sheet = sheet_rows(tmp_path / "out.xlsx")
    assert column(sheet, "prompt") == [
        "Translate Good morning into French",
        "Translate Thank you into German",
    ]


def test_validate_names_the_line_of_an_unknown_variable(tmp_path, capsys) -> None:
    write_csv(
        tmp_path / "p.csv",
        ["id", "text", "prompt"],
        [["1", "a", "Say {{text}}"], ["2", "b", "Say {{missing}}"], ["3", "c", "temp"]],
    )
    assert main(["validate", "p.csv", "--model", "echo"]) == 2
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "batchexec: p.csv: 1 execution is invalid."
    assert out[1].startswith("  line 3: prompt: {{missing}} names no column; the columns are ")
    assert "id, text, prompt" in out[1]
    assert len(out) == 2


def test_validate_with_models_counts_each_models_rows(tmp_path, capsys) -> None:
    write_csv(tmp_path / "p.csv", ["prompt"], [["a"], ["b ${output.1}"], ["c"]])
    args = ["validate", "p.csv", "--models", "echo,slow-echo", "--schema", json.dumps(SCHEMA)]
    assert main(args) == 0
    assert capsys.readouterr().out == (
        "p.csv: 3 rows are valid (CSV; columns: prompt; uses: echo (3), slow-echo (3) "
        "side by side, 6 executions; answer fields: sentiment, score, sure)\n"
    )


def test_validate_side_by_side_refuses_rows_naming_a_model_and_unknown_models(
    tmp_path, capsys
) -> None:
    write_csv(tmp_path / "p.csv", ["prompt", "model"], [["a", ""], ["b", "echo"]])
    assert main(["validate", "p.csv", "--models", "echo,slow-echo"]) == 2
    assert capsys.readouterr().out.splitlines() == [
        "batchexec: p.csv: 1 execution is invalid.",
        "  line 3: model: the batch names its models; a row cannot name its own",
    ]
    write_csv(tmp_path / "p.csv", ["prompt"], [["a"]])
    assert main(["validate", "p.csv", "--models", "echo,gpt-9"]) == 2
    [line] = capsys.readouterr().out.splitlines()
    assert line.startswith("batchexec: --models: Unknown model 'gpt-9'. Known models: echo,")


def test_side_by_side_counts_against_the_execution_limit(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("MAX_EXECUTIONS_PER_BATCH", "5")
    write_csv(tmp_path / "p.csv", ["prompt"], [["a"], ["b"], ["c"]])
    assert main(["run", "p.csv", "-o", "out.xlsx", "--models", "echo,slow-echo"]) == 2
    err = capsys.readouterr().err
    assert "6 executions; the limit is 5" in err
    assert not (tmp_path / "out.xlsx").exists()


@pytest.mark.parametrize(
    ("schema", "message"),
    [
        ("missing.json", "--schema missing.json: cannot read it: No such file or directory."),
        ("bad.json", "--schema bad.json: is not JSON: Expecting value at line 1 column 7."),
        ('{"type": "wrong"}', "--schema: The response schema is not a valid JSON Schema"),
        ("list.json", "--schema list.json: The response schema must be a JSON object, not"),
        ('{"oops"', "--schema: is not JSON: Expecting ':' delimiter at line 1 column 8."),
    ],
)
@pytest.mark.parametrize("command_name", ["run", "validate", "submit"])
def test_a_bad_schema_is_one_line_and_exit_2(tmp_path, capsys, schema, message, command_name):
    (tmp_path / "bad.json").write_text('{"a": }')
    (tmp_path / "list.json").write_text("[1]")
    write_csv(tmp_path / "p.csv", ["prompt"], [["a"]])
    where = {
        "run": ["-o", "out.xlsx"],
        "validate": [],
        # Nothing listens there: the refusal comes before anything is sent.
        "submit": ["--url", "http://127.0.0.1:9"],
    }[command_name]
    assert main([command_name, "p.csv", *where, "--schema", schema]) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith(f"batchexec: {message}")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["bad.json", "list.json", "p.csv"]


@pytest.mark.parametrize("models", ["", "a,,b", ",".join(f"m{n}" for n in range(11))])
def test_bad_model_names_are_usage_errors(tmp_path, capsys, models) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "p.csv", "-o", "out.xlsx", "--models", models])
    assert exit_info.value.code == 2
    assert "error: argument --models: give 1 to 10 model names" in capsys.readouterr().err


def test_models_ending_in_toml_is_still_the_catalog(tmp_path, capsys) -> None:
    (tmp_path / "extra.toml").write_text('[models."local"]\nprovider = "echo"\n')
    write_csv(tmp_path / "p.csv", ["prompt", "model"], [["a", "local"]])
    for option in ("--models", "--catalog"):
        assert main(["validate", "p.csv", option, "extra.toml"]) == 0
        assert "uses: local (1))" in capsys.readouterr().out
        assert main(["models", option, "extra.toml"]) == 0
        assert "\nlocal " in capsys.readouterr().out
