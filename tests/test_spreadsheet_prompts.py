"""Spreadsheet-native prompts through the real app and the real ``openai`` provider:
``{{column}}`` variables, per-row parameters, structured answers and models side by side,
against a loopback server that speaks OpenAI's chat completions."""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from batchexec.api import EXECUTE_BATCH, PROCESS_CSV, RETRY, UPLOAD, VALIDATE, download_path
from batchexec.runtime import plan_again
from batchexec.web.keys import CATALOG, SETTINGS
from tests.helpers import AUTH, batch_of, chat_completion, column, finished, sheet_rows

MODELS = ("m-a", "m-b", "m-c")
SCHEMA = {
    "type": "object",
    "properties": {
        "sentiment": {"type": "string", "enum": ["positive", "negative"]},
        "score": {"type": "number"},
    },
    "required": ["sentiment", "score"],
}


class Upstream:
    """An OpenAI-compatible server: answers ``<model>(<prompt>)``, or for a json_schema
    request a JSON answer, which is broken on the first try for prompts holding ``flaky``."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self._tries: Counter[str] = Counter()

    async def chat(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.bodies.append(body)
        prompt = body["messages"][-1]["content"]
        if body["model"] == "broken":
            return web.json_response(
                {"error": {"message": "no such model", "type": "invalid_request_error"}},
                status=400,
            )
        if (body.get("response_format") or {}).get("type") == "json_schema":
            self._tries[prompt] += 1
            if "flaky" in prompt and self._tries[prompt] == 1:
                text = 'Sure! {"sentiment": "positive", '
            else:
                score = len(prompt) / 4
                text = json.dumps({"sentiment": "positive", "score": score})
        else:
            text = f"{body['model']}({prompt})"
        return web.json_response(chat_completion(body["model"], text, (5, 2)))

    def prompts(self, model: str | None = None) -> list[str]:
        return [
            body["messages"][-1]["content"]
            for body in self.bodies
            if model is None or body["model"] == model
        ]


@pytest.fixture
async def upstream(aiohttp_server: Any) -> tuple[str, Upstream]:
    fake = Upstream()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", fake.chat)
    server = await aiohttp_server(app)
    return str(server.make_url("/v1")), fake


@pytest.fixture
def catalog(tmp_path: Path, upstream: Any) -> Path:
    base_url, _ = upstream
    catalog = tmp_path / "spreadsheet.toml"
    entries = "".join(
        f'[models."{name}"]\nprovider = "openai"\nbase_url = "{base_url}"\n\n'
        for name in (*MODELS, "broken")
    )
    catalog.write_text(
        entries
        + """
[assistants."rater"]
model = "m-a"
system_prompt = "Rate it."

[assistants."rater".response_schema]
type = "object"
required = ["sentiment", "score"]
properties.sentiment = { type = "string", enum = ["positive", "negative"] }
properties.score = { type = "number" }
"""
    )
    return catalog


@pytest.fixture
async def client(make_client: Any, make_settings: Any, catalog: Path) -> Any:
    return await make_client(
        make_settings(
            models_path=catalog,
            default_model="m-a",
            max_retries=2,
            execution_timeout_s=30,
        )
    )


def _csv(header: list[str], rows: list[list[str]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


async def _run_csv(client: Any, text: str, **fields: Any) -> dict[str, Any]:
    response = await client.post(
        PROCESS_CSV, json={"csv_content": text, "execute": True, **fields}, headers=AUTH
    )
    assert response.status == 200, await response.text()
    return await finished(client, (await response.json())["invocationId"])


def _table(csv_content: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(csv_content)))


async def _workbook(client: Any, body: dict[str, Any]) -> list[list[Any]]:
    name = body["xlsx_url"].rsplit("/", 1)[1]
    response = await client.get(download_path(name), headers=AUTH)
    assert response.status == 200, await response.text()
    return sheet_rows(await response.read())


# Column variables


async def test_column_variables_fill_each_prompt_with_its_row_cells(client, upstream) -> None:
    _, fake = upstream
    text = _csv(
        ["id", "text", "lang", "prompt"],
        [
            ["1", "Good morning", "French", "Translate {{text}} into {{lang}}"],
            ["2", "Thank you", "German", "Translate {{ text }} into {{LANG}}"],
            ["3", "${output.1}", "Dutch", "Translate {{text}} into {{lang}}: {{output.1}}"],
        ],
    )
    body = await _run_csv(client, text)
    assert body["status"] == "completed", body
    assert fake.prompts() == [
        "Translate Good morning into French",
        "Translate Thank you into German",
        # A cell's text is never read as a reference; {{output.1}} is one.
        "Translate ${output.1} into Dutch: m-a(Translate Good morning into French)",
    ]
    table = _table(body["csv_content"])
    assert table[0]["prompt"] == "Translate Good morning into French"
    assert table[0]["result"] == "m-a(Translate Good morning into French)"


async def test_an_unknown_variable_is_refused_naming_the_row_and_the_columns(client) -> None:
    text = _csv(
        ["id", "text", "prompt"], [["1", "a", "Say {{text}}"], ["2", "b", "Say {{missing}}"]]
    )
    response = await client.post(
        PROCESS_CSV, json={"csv_content": text, "execute": True}, headers=AUTH
    )
    assert response.status == 422
    body = await response.json()
    [error] = body["errors"]
    assert error["index"] == 2
    assert error["message"].startswith("line 3:")
    assert "{{missing}}" in error["message"]
    assert "id, text, prompt" in error["message"]


async def test_a_literal_double_brace_is_written_with_a_backslash(client, upstream) -> None:
    _, fake = upstream
    executions = [
        {"prompt": "Explain \\{{name}} in Jinja, and {{ x | upper }}", "model": "m-a"},
        {"prompt": 'Parse {{"a": 1}} as JSON', "model": "m-a"},
    ]
    response = await client.post(EXECUTE_BATCH, json={"executions": executions}, headers=AUTH)
    assert response.status == 200, await response.text()
    await finished(client, (await response.json())["invocationId"])
    assert fake.prompts() == [
        "Explain {{name}} in Jinja, and {{ x | upper }}",
        'Parse {{"a": 1}} as JSON',
    ]


async def test_json_executions_take_vars_and_extra_keys_as_variables(client, upstream) -> None:
    _, fake = upstream
    executions = [
        {
            "prompt": "Describe {{product}} for {{audience}}",
            "vars": {"product": "a lamp"},
            "audience": "kids",
        },
    ]
    response = await client.post(EXECUTE_BATCH, json={"executions": executions}, headers=AUTH)
    assert response.status == 200, await response.text()
    body = await finished(client, (await response.json())["invocationId"])
    assert fake.prompts() == ["Describe a lamp for kids"]
    response = await client.post(
        EXECUTE_BATCH, json={"executions": executions, "models": ["m-a", "m-b"]}, headers=AUTH
    )
    side = await finished(client, (await response.json())["invocationId"])
    # No row names a model side by side: the outputs have no empty model column.
    assert "model" not in _table(side["csv_content"])[0]
    assert _table(body["csv_content"])[0]["product"] == "a lamp"


async def test_the_prompt_limit_counts_the_prompt_with_its_variables_filled_in(
    make_client, make_settings, catalog
) -> None:
    small = await make_client(
        make_settings(models_path=catalog, default_model="m-a", max_prompt_length=50)
    )
    text = _csv(["text", "prompt"], [["x" * 60, "Say {{text}}"]])
    response = await small.post(PROCESS_CSV, json={"csv_content": text}, headers=AUTH)
    assert response.status == 422
    [error] = (await response.json())["errors"]
    assert "64 characters with its variables filled in" in error["message"]


# Per-row parameters


async def test_a_bad_parameter_is_refused_naming_the_row_and_the_field(client) -> None:
    text = _csv(
        ["prompt", "temperature", "max_tokens"],
        [["fine", "0.5", "10"], ["too hot", "7", ""], ["odd", "", "many"]],
    )
    response = await client.post(PROCESS_CSV, json={"csv_content": text}, headers=AUTH)
    assert response.status == 422
    errors = (await response.json())["errors"]
    assert [(e["index"], e["field"]) for e in errors] == [(2, "temperature"), (3, "max_tokens")]
    assert errors[0]["message"] == "line 3: is 7; it must be from 0 to 2"


async def test_row_parameters_reach_the_provider_as_exactly_those_fields(client, upstream) -> None:
    _, fake = upstream
    text = _csv(
        ["prompt", "system", "max_tokens", "stop", "seed", "temperature", "top_p"],
        [
            ["Hello", "You are {{prompt}}-bot.", "64", "", "", "", ""],
            ["Bye", "", "", '["\\n", "END"]', "7", "0.3", "0.9"],
            ["Plain", "", "", "", "", "", ""],
        ],
    )
    body = await _run_csv(client, text)
    assert body["status"] == "completed", body
    first, second, third = fake.bodies
    assert first["messages"] == [
        {"role": "system", "content": "You are Hello-bot."},
        {"role": "user", "content": "Hello"},
    ]
    assert first["max_tokens"] == 64
    assert {"temperature", "top_p", "stop", "seed"}.isdisjoint(first)
    assert (second["stop"], second["seed"], second["temperature"], second["top_p"]) == (
        ["\n", "END"],
        7,
        0.3,
        0.9,
    )
    assert set(third) == {"model", "messages"}


async def test_a_row_system_prompt_wins_over_an_assistants(client, upstream) -> None:
    _, fake = upstream
    executions = [
        {"prompt": "one", "assistant": "rater"},
        {"prompt": "two", "assistant": "rater", "system": "Be terse."},
    ]
    response = await client.post(EXECUTE_BATCH, json={"executions": executions}, headers=AUTH)
    assert response.status == 200, await response.text()
    await finished(client, (await response.json())["invocationId"])
    systems = [body["messages"][0]["content"] for body in fake.bodies]
    assert systems == ["Rate it.", "Be terse."]


async def test_json_parameters_are_checked_as_fields(client) -> None:
    for executions, expected in [
        ([{"prompt": "x", "top_p": 3}, {"prompt": "y", "seed": 1.5}], [(1, "top_p"), (2, "seed")]),
        ([{"prompt": "x"}, {"prompt": "y", "stop": ["a"] * 5}], [(2, "stop")]),
    ]:
        response = await client.post(EXECUTE_BATCH, json={"executions": executions}, headers=AUTH)
        assert response.status == 422
        fields = [(e["index"], e["field"]) for e in (await response.json())["errors"]]
        assert fields == expected


# Structured answers


async def test_answers_follow_the_schema_after_a_retry_and_spread_into_typed_columns(
    client, upstream
) -> None:
    _, fake = upstream
    rows = [[str(n), f"review {n}" + (" flaky" if n % 3 == 0 else "")] for n in range(1, 21)]
    text = _csv(["id", "prompt"], rows)
    body = await _run_csv(client, text, response_schema=SCHEMA)
    assert body["status"] == "completed", body["message"]
    executions = body["executions"]
    assert all(e["status"] == "succeeded" for e in executions)
    assert [e["attempts"] for e in executions] == [2 if n % 3 == 0 else 1 for n in range(1, 21)]
    assert all(json.loads(e["result"])["sentiment"] == "positive" for e in executions)
    sent = fake.bodies[0]["response_format"]
    assert sent["type"] == "json_schema" and sent["json_schema"]["schema"] == SCHEMA
    table = _table(body["csv_content"])
    assert list(table[0]) == ["id", "prompt", "result", "result.sentiment", "result.score"]
    sheet = await _workbook(client, body)
    header = sheet[0]
    assert header[:5] == ["id", "prompt", "result", "result.sentiment", "result.score"]
    assert column(sheet, "result.sentiment") == ["positive"] * 20
    scores = column(sheet, "result.score")
    assert all(isinstance(score, int | float) for score in scores)
    assert scores[0] == len("review 1") / 4


async def test_an_assistant_schema_applies_to_its_rows(client, upstream) -> None:
    executions = [{"prompt": "great", "assistant": "rater"}, {"prompt": "plain", "model": "m-b"}]
    response = await client.post(EXECUTE_BATCH, json={"executions": executions}, headers=AUTH)
    assert response.status == 200, await response.text()
    body = await finished(client, (await response.json())["invocationId"])
    table = _table(body["csv_content"])
    assert table[0]["result.sentiment"] == "positive"
    assert table[1]["result"] == "m-b(plain)" and table[1]["result.sentiment"] == ""


async def test_a_bad_schema_is_refused_before_anything_runs(client, upstream) -> None:
    _, fake = upstream
    text = _csv(["prompt", "response_schema"], [["a", '{"type": "wrong"}'], ["b", "{oops"]])
    response = await client.post(PROCESS_CSV, json={"csv_content": text}, headers=AUTH)
    assert response.status == 422
    errors = (await response.json())["errors"]
    assert [(e["index"], e["field"]) for e in errors] == [(1, "response_schema")] * 1 + [
        (2, "response_schema")
    ]
    response = await client.post(
        EXECUTE_BATCH,
        json={"executions": [{"prompt": "x"}], "response_schema": {"$ref": "https://x.test/s"}},
        headers=AUTH,
    )
    assert response.status == 422
    assert (await response.json())["errors"][0]["field"] == "response_schema"
    assert fake.bodies == []


# Models side by side


async def test_three_models_side_by_side_each_chain_on_its_own_answers(client, upstream) -> None:
    _, fake = upstream
    rows = [["Start"], *([f"Continue ${{output.{n}}}"] for n in range(1, 10))]
    text = _csv(["prompt"], rows)
    body = await _run_csv(client, text, models=list(MODELS))
    assert body["status"] == "completed", body["message"]
    assert len(fake.bodies) == 30
    assert body["progress"]["total"] == 30
    assert body["models"] == list(MODELS)
    for model in MODELS:
        prompts = fake.prompts(model)
        assert len(prompts) == 10
        # Row 2 of each model continues that model's own row 1.
        assert prompts[1] == f"Continue {model}(Start)"
        assert prompts[9].count(f"{model}(") == 9
    table = _table(body["csv_content"])
    assert list(table[0]) == ["prompt", *(f"result [{model}]" for model in MODELS)]
    assert len(table) == 10
    assert table[0]["result [m-b]"] == "m-b(Start)"
    sheet = await _workbook(client, body)
    assert sheet[0][:4] == ["prompt", "result [m-a]", "status [m-a]", "error [m-a]"]
    assert "result [m-c]" in sheet[0] and "model" not in sheet[0]
    assert column(sheet, "status [m-c]") == ["succeeded"] * 10


async def test_models_side_by_side_with_a_schema_spread_each_models_fields(client) -> None:
    text = _csv(["prompt"], [["one"], ["two"]])
    body = await _run_csv(client, text, models=["m-a", "m-b"], response_schema=SCHEMA)
    header = list(_table(body["csv_content"])[0])
    assert header == [
        "prompt",
        "result [m-a]",
        "result.sentiment [m-a]",
        "result.score [m-a]",
        "result [m-b]",
        "result.sentiment [m-b]",
        "result.score [m-b]",
    ]


async def test_side_by_side_rows_cannot_name_their_own_model(client) -> None:
    text = _csv(["prompt", "model"], [["a", ""], ["b", "m-b"]])
    response = await client.post(
        PROCESS_CSV, json={"csv_content": text, "models": ["m-a", "m-c"]}, headers=AUTH
    )
    assert response.status == 422
    [error] = (await response.json())["errors"]
    assert (error["index"], error["field"]) == (2, "model")
    response = await client.post(
        PROCESS_CSV, json={"csv_content": text, "models": ["m-a", "nope"]}, headers=AUTH
    )
    assert response.status == 422
    assert "nope" in (await response.json())["detail"]


async def test_side_by_side_counts_each_model_against_the_execution_limit(
    make_client, make_settings, catalog
) -> None:
    small = await make_client(
        make_settings(models_path=catalog, default_model="m-a", max_executions_per_batch=5)
    )
    text = _csv(["prompt"], [["a"], ["b"], ["c"]])
    response = await small.post(
        PROCESS_CSV, json={"csv_content": text, "models": ["m-a", "m-b"]}, headers=AUTH
    )
    assert response.status == 422
    assert "6 executions; the limit is 5" in (await response.json())["detail"]


async def test_a_side_by_side_batch_plans_again_as_it_ran_and_retries_its_failures(
    client, upstream
) -> None:
    _, fake = upstream
    text = _csv(["prompt"], [["Start"], ["Go on from ${output.1}"]])
    body = await _run_csv(client, text, models=["m-a", "broken"])
    assert body["status"] == "completed"
    assert [e["status"] for e in body["executions"]] == ["succeeded", "failed"] * 1 + [
        "succeeded",
        "skipped",
    ]
    # Named as the prompt names it: row 1 (of the broken model), not execution 2.
    assert body["executions"][3]["error"] == "Skipped: ${output.1} did not succeed."
    batch = batch_of(client, body["invocationId"])
    plan = plan_again(batch, client.app[CATALOG], client.app[SETTINGS])
    assert [(row.index, row.target.model.name, sorted(row.depends_on)) for row in plan.rows] == [
        (1, "m-a", []),
        (2, "broken", []),
        (3, "m-a", [1]),
        (4, "broken", [2]),
    ]
    calls = len(fake.bodies)
    response = await client.post(RETRY, json={"invocation_id": body["invocationId"]}, headers=AUTH)
    assert response.status == 200, await response.text()
    again = await finished(client, (await response.json())["invocationId"])
    # Only the broken model's rows run again; m-a's answers are kept.
    assert [body["model"] for body in fake.bodies[calls:]] == ["broken"]
    assert [e["status"] for e in again["executions"]] == ["succeeded", "failed"] * 1 + [
        "succeeded",
        "skipped",
    ]


async def test_the_template_shows_the_columns_a_run_will_add(client) -> None:
    text = _csv(["prompt"], [["a"], ["b"]])
    response = await client.post(
        PROCESS_CSV,
        json={"csv_content": text, "models": ["m-a", "m-b"], "response_schema": SCHEMA},
        headers=AUTH,
    )
    assert response.status == 200, await response.text()
    body = await response.json()
    sheet = await _workbook(client, body)
    assert sheet[0] == [
        "prompt",
        "result [m-a]",
        "result.sentiment [m-a]",
        "result.score [m-a]",
        "result [m-b]",
        "result.sentiment [m-b]",
        "result.score [m-b]",
    ]
    assert len(sheet) == 3
    assert "2 rows" in body["response"][0]["message"]


async def test_the_upload_and_validate_forms_take_models_and_a_schema(client, upstream) -> None:
    _, fake = upstream

    def form(**fields: str) -> aiohttp.FormData:
        data = aiohttp.FormData()
        data.add_field("file", _csv(["prompt"], [["x"]]).encode(), filename="rows.csv")
        for name, value in fields.items():
            data.add_field(name, value)
        return data

    fields = {"models": "m-a, m-b", "response_schema": json.dumps(SCHEMA)}
    response = await client.post(VALIDATE, data=form(**fields), headers=AUTH)
    assert response.status == 200, await response.text()
    assert (await response.json())["rows"] == 1
    response = await client.post(UPLOAD, data=form(execute="true", **fields), headers=AUTH)
    assert response.status == 200, await response.text()
    body = await finished(client, (await response.json())["invocationId"])
    assert len(body["executions"]) == 2
    assert {b["model"] for b in fake.bodies} == {"m-a", "m-b"}
    response = await client.post(VALIDATE, data=form(response_schema="{not json"), headers=AUTH)
    assert response.status == 422
    assert (await response.json())["errors"][0]["field"] == "response_schema"


async def test_a_results_workbook_fed_back_in_drops_the_columns_a_run_added(client) -> None:
    text = _csv(["id", "prompt"], [["1", "one"], ["2", "two"]])
    body = await _run_csv(client, text, models=["m-a", "m-b"], response_schema=SCHEMA)
    workbook = await client.get(download_path(body["xlsx_url"].rsplit("/", 1)[1]), headers=AUTH)
    data = aiohttp.FormData()
    data.add_field("file", await workbook.read(), filename="results.xlsx")
    data.add_field("models", "m-c")
    response = await client.post(VALIDATE, data=data, headers=AUTH)
    assert response.status == 200, await response.text()
    assert (await response.json())["columns"] == ["id", "prompt"]


# Found by review: each a hostile or earlier input


async def test_a_system_prompt_is_bounded_with_its_variables_filled_in(
    make_client, make_settings, catalog
) -> None:
    small = await make_client(
        make_settings(models_path=catalog, default_model="m-a", max_prompt_length=1000)
    )
    executions = [
        {"prompt": "x", "t": "y" * 900, "system": "{{t}}" * 200},
        {"prompt": "x", "system": "Use ${output.1}"},
    ]
    response = await small.post(EXECUTE_BATCH, json={"executions": executions}, headers=AUTH)
    assert response.status == 422
    errors = (await response.json())["errors"]
    assert [(e["index"], e["field"]) for e in errors] == [(1, "system"), (2, "system")]
    assert "180000 characters with its variables filled in" in errors[0]["message"]
    assert "cannot use ${output.n}" in errors[1]["message"]


async def test_outputs_wider_than_a_sheet_are_refused_before_anything_runs(client) -> None:
    # 5,500 fields a model, three models: 16,500 answer columns.
    schema = {"type": "object", "properties": {f"p{n}": {} for n in range(5500)}}
    text = _csv(["prompt"], [["a"]])
    response = await client.post(
        PROCESS_CSV,
        json={"csv_content": text, "models": list(MODELS), "response_schema": schema},
        headers=AUTH,
    )
    assert response.status == 422
    assert "a workbook's sheet holds 16,384" in (await response.json())["detail"]


async def test_columns_named_like_outputs_before_result_are_the_inputs_own(
    client, upstream
) -> None:
    _, fake = upstream
    text = _csv(
        ["prompt", "result.notes", "status [draft]", "cost"],
        [["Say {{result.notes}} for {{cost}}", "hello", "d", "3"]],
    )
    body = await _run_csv(client, text)
    assert fake.prompts() == ["Say hello for 3"]
    assert list(_table(body["csv_content"])[0]) == [
        "prompt",
        "result.notes",
        "status [draft]",
        "cost",
        "result",
    ]


async def test_a_vars_key_that_is_no_object_is_a_column_as_before(client, upstream) -> None:
    executions = [{"prompt": "x", "vars": "abc"}]
    response = await client.post(EXECUTE_BATCH, json={"executions": executions}, headers=AUTH)
    assert response.status == 200, await response.text()
    body = await finished(client, (await response.json())["invocationId"])
    assert _table(body["csv_content"])[0]["vars"] == "abc"
