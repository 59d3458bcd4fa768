"""What batches cost: prices in the catalog, the cost of each row and of the batch, in the
results, the events, the workbook and the command line's summary."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import openpyxl
import pytest
from aiohttp import web

from batchexec.api import BATCHES, EXECUTE_BATCH, RETRY, VALIDATE, download_path, events_path
from batchexec.catalog import Catalog
from batchexec.cli import main
from batchexec.errors import ConfigError
from tests.helpers import AUTH, chat_completion, column, finished, sheet_rows, write_csv

#: Prices per million tokens: prompt 2.50, completion 10.00 (gpt-4o's, in USD).
PRICED = {"input_per_mtok": 2.5, "output_per_mtok": 10.0}


class Upstream:
    """An OpenAI-compatible server reporting usage: prompt tokens = words of the prompt,
    completion tokens = 3; ``no usage`` in a prompt leaves usage out."""

    def __init__(self) -> None:
        self.calls = 0

    async def chat(self, request: web.Request) -> web.Response:
        self.calls += 1
        body = await request.json()
        prompt = body["messages"][-1]["content"]
        usage = None if "no usage" in prompt else (len(prompt.split()), 3)
        answer = chat_completion(body["model"], "one two three", usage)
        return web.json_response(answer)


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
    path = tmp_path / "priced.toml"
    path.write_text(
        f"""
currency = "EUR"

[models."priced"]
provider = "openai"
base_url = "{base_url}"
input_per_mtok = {PRICED["input_per_mtok"]}
output_per_mtok = {PRICED["output_per_mtok"]}

[models."free"]
provider = "openai"
base_url = "{base_url}"
"""
    )
    return path


@pytest.fixture
async def client(make_client: Any, make_settings: Any, catalog: Path) -> Any:
    return await make_client(make_settings(models_path=catalog, default_model="priced"))


def price(prompt_tokens: int, completion_tokens: int) -> float:
    return (
        prompt_tokens * PRICED["input_per_mtok"] + completion_tokens * PRICED["output_per_mtok"]
    ) / 1_000_000


async def test_each_row_and_the_batch_cost_their_usage_at_the_models_prices(client) -> None:
    executions = [
        {"prompt": "one two three four", "model": "priced"},
        {"prompt": "five six", "model": "priced"},
        {"prompt": "no usage here", "model": "priced"},
        {"prompt": "free words", "model": "free"},
    ]
    response = await client.post(EXECUTE_BATCH, json={"executions": executions}, headers=AUTH)
    assert response.status == 200, await response.text()
    body = await finished(client, (await response.json())["invocationId"])
    costs = [e["cost"] for e in body["executions"]]
    assert costs == [price(4, 3), price(2, 3), None, None]
    assert body["usage"]["cost"] == price(4, 3) + price(2, 3)
    assert body["usage"]["currency"] == "EUR"
    # The row with no usage and the unpriced one are not counted as free.
    assert body["usage"]["uncosted"] == 2
    assert body["usage"]["models"] == {
        "priced": {
            "prompt_tokens": 6,
            "completion_tokens": 6,
            "cost": price(4, 3) + price(2, 3),
            "uncosted": 1,
        },
        "free": {"prompt_tokens": 2, "completion_tokens": 3, "cost": None, "uncosted": 1},
    }

    name = body["xlsx_url"].rsplit("/", 1)[1]
    workbook = await client.get(download_path(name), headers=AUTH)
    sheet = sheet_rows(await workbook.read())
    assert sheet[0][-2:] == ["completion_tokens", "cost"]
    assert column(sheet, "cost") == [price(4, 3), price(2, 3), None, None]

    events = await client.get(events_path(body["invocationId"]), headers=AUTH)
    text = await events.text()
    data = [
        json.loads(line.removeprefix("data: "))
        for line in text.splitlines()
        if line.startswith("data: ")
    ]
    assert sorted(d["cost"] for d in data if "index" in d and d.get("cost")) == sorted(
        [price(4, 3), price(2, 3)]
    )
    done = data[-1]
    assert (done["cost"], done["uncosted"]) == (price(4, 3) + price(2, 3), 2)


async def test_a_batch_of_unpriced_models_keeps_its_workbook_as_it_was(client) -> None:
    response = await client.post(
        EXECUTE_BATCH, json={"executions": [{"prompt": "x", "model": "free"}]}, headers=AUTH
    )
    body = await finished(client, (await response.json())["invocationId"])
    name = body["xlsx_url"].rsplit("/", 1)[1]
    workbook = await client.get(download_path(name), headers=AUTH)
    assert "cost" not in sheet_rows(await workbook.read())[0]
    # Nothing known, not nothing spent.
    assert body["usage"]["cost"] is None and body["usage"]["uncosted"] == 1


def test_a_model_costs_only_what_its_prices_and_usage_say(tmp_path: Path) -> None:
    path = tmp_path / "m.toml"
    path.write_text(
        '[models."in-only"]\nprovider = "echo"\ninput_per_mtok = 1.0\n'
        '[models."unpriced"]\nprovider = "echo"\n'
    )
    catalog = Catalog.load(path)
    assert catalog.currency == "USD"
    assert catalog.model("in-only").cost(1_000_000, None) == 1.0
    assert catalog.model("in-only").cost(None, 5) is None
    assert catalog.model("unpriced").cost(10, 10) is None
    path.write_text('[models."bad"]\nprovider = "echo"\ninput_per_mtok = -1\n')
    with pytest.raises(ConfigError, match="input_per_mtok"):
        Catalog.load(path)
    path.write_text('currency = ""\n')
    with pytest.raises(ConfigError, match="currency"):
        Catalog.load(path)


async def test_the_command_lines_summary_gives_the_cost(upstream, catalog, tmp_path, capsys):
    write_csv(tmp_path / "p.csv", ["prompt"], [["one two three four"], ["no usage"]])
    code = await asyncio.to_thread(
        main, ["run", "p.csv", "-o", "out.xlsx", "--catalog", str(catalog), "--model", "priced"]
    )
    err = capsys.readouterr().err
    assert code == 0, err
    assert f"  cost: {price(4, 3):.6g} EUR (1 execution without a cost" in err
    assert column(sheet_rows(tmp_path / "out.xlsx"), "cost") == [price(4, 3), None]


# Budgets


async def test_a_batch_stops_sending_at_its_budget_and_a_retry_continues_with_a_new_one(
    make_client, make_settings, catalog, upstream
) -> None:
    _, fake = upstream
    client = await make_client(
        make_settings(models_path=catalog, default_model="priced", max_threads=1)
    )
    row = price(4, 3)  # each prompt below is four words
    executions = [{"prompt": f"row {n} of many"} for n in range(1, 21)]
    response = await client.post(
        EXECUTE_BATCH, json={"executions": executions, "max_cost": 4.5 * row}, headers=AUTH
    )
    assert response.status == 200, await response.text()
    body = await finished(client, (await response.json())["invocationId"])
    statuses = [e["status"] for e in body["executions"]]
    # One row in flight at a time: the fifth takes the spend past the budget, then none.
    assert statuses == ["succeeded"] * 5 + ["cancelled"] * 15
    assert fake.calls == 5
    assert body["usage"]["cost"] <= 4.5 * row + 1 * row
    assert body["status"] == "cancelled"
    assert "budget reached" in body["message"]
    assert all("budget reached" in e["error"] for e in body["executions"][5:])
    name = body["xlsx_url"].rsplit("/", 1)[1]
    workbook = await client.get(download_path(name), headers=AUTH)
    assert column(sheet_rows(await workbook.read()), "status")[5:] == ["cancelled"] * 15

    response = await client.post(
        RETRY, json={"invocation_id": body["invocationId"], "max_cost": 1.0}, headers=AUTH
    )
    assert response.status == 200, await response.text()
    again = await finished(client, (await response.json())["invocationId"])
    assert [e["status"] for e in again["executions"]] == ["succeeded"] * 20
    assert fake.calls == 20
    assert again["usage"]["cost"] == pytest.approx(20 * row)


async def test_the_servers_default_and_ceiling_bound_every_batchs_budget(
    make_client, make_settings, catalog, upstream
) -> None:
    client = await make_client(
        make_settings(
            models_path=catalog,
            default_model="priced",
            max_threads=1,
            default_max_cost=price(4, 3) / 2,
            max_cost=1.0,
        )
    )
    executions = [{"prompt": f"row {n} of many"} for n in range(1, 4)]
    response = await client.post(EXECUTE_BATCH, json={"executions": executions}, headers=AUTH)
    body = await finished(client, (await response.json())["invocationId"])
    assert [e["status"] for e in body["executions"]] == ["succeeded", "cancelled", "cancelled"]
    response = await client.post(
        EXECUTE_BATCH, json={"executions": executions, "max_cost": 2.0}, headers=AUTH
    )
    assert response.status == 422
    [error] = (await response.json())["errors"]
    assert error["field"] == "max_cost"
    assert "the most a batch may set (MAX_COST) is 1" in error["message"]
    response = await client.post(
        EXECUTE_BATCH, json={"executions": executions, "max_cost": -1}, headers=AUTH
    )
    assert response.status == 422


async def test_run_stops_at_its_max_cost(upstream, catalog, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DEFAULT_MAX_THREADS", "1")  # one row in flight: the stop is exact
    write_csv(tmp_path / "p.csv", ["prompt"], [[f"row {n} of many"] for n in range(1, 11)])
    args = ["run", "p.csv", "-o", "out.xlsx", "--catalog", str(catalog), "--model", "priced"]
    code = await asyncio.to_thread(main, [*args, "--max-cost", str(2.5 * price(4, 3))])
    err = capsys.readouterr().err
    assert code == 1, err
    statuses = column(sheet_rows(tmp_path / "out.xlsx"), "status")
    assert statuses == ["succeeded"] * 3 + ["cancelled"] * 7
    assert "budget reached" in err
    assert await asyncio.to_thread(main, [*args, "--max-cost", "-1"]) == 2
    assert "--max-cost must be a number, 0 or more" in capsys.readouterr().err


async def test_the_list_shows_each_batchs_cost(client) -> None:
    executions = [{"prompt": "one two three four", "model": "priced"}, {"prompt": "x y"}]
    response = await client.post(EXECUTE_BATCH, json={"executions": executions}, headers=AUTH)
    invocation_id = (await response.json())["invocationId"]
    await finished(client, invocation_id)
    response = await client.post(
        EXECUTE_BATCH, json={"executions": [{"prompt": "a", "model": "free"}]}, headers=AUTH
    )
    free_id = (await response.json())["invocationId"]
    await finished(client, free_id)
    listed = await client.get(BATCHES, headers=AUTH)
    costs = {b["invocationId"]: b["cost"] for b in (await listed.json())["batches"]}
    assert costs == {invocation_id: price(4, 3) + price(2, 3), free_id: None}


async def test_the_workbook_and_summary_give_each_models_cost_and_the_total(
    upstream, catalog, tmp_path, capsys
) -> None:
    write_csv(tmp_path / "p.csv", ["prompt"], [["one two three four"], ["five six"]])
    args = ["run", "p.csv", "-o", "out.xlsx", "--catalog", str(catalog)]
    code = await asyncio.to_thread(main, [*args, "--models", "priced,free"])
    err = capsys.readouterr().err
    assert code == 0, err
    total = price(4, 3) + price(2, 3)
    assert f"    priced: {total:.6g} EUR" in err and "    free: no cost known" in err
    book = openpyxl.load_workbook(tmp_path / "out.xlsx", read_only=True)
    try:
        usage = [list(row) for row in book["Usage"].iter_rows(values_only=True)]
    finally:
        book.close()
    assert usage == [
        ["model", "prompt_tokens", "completion_tokens", "cost", "uncosted", "currency"],
        ["priced", 6, 6, total, 0, "EUR"],
        ["free", 6, 6, None, 2, "EUR"],
        ["total", 12, 12, total, 2, "EUR"],
    ]


async def test_a_form_amount_is_a_plain_decimal_and_json_true_is_no_amount(client) -> None:
    for bad in ("1_0", "1e3", "inf", "abc"):
        form = aiohttp.FormData()
        form.add_field("file", b"prompt\nx\n", filename="p.csv")
        form.add_field("max_cost", bad)
        response = await client.post(VALIDATE, data=form, headers=AUTH)
        assert response.status == 422, bad
    response = await client.post(
        EXECUTE_BATCH, json={"executions": [{"prompt": "x"}], "max_cost": True}, headers=AUTH
    )
    assert response.status == 422
