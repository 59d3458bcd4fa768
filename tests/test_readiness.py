"""A batch whose model cannot be called as configured is refused at submission, on every path."""

from __future__ import annotations

import io
from typing import Any

import aiohttp
import openpyxl
import pytest

from batchexec import Settings
from batchexec.api import BATCHES, EXECUTE_BATCH, PROCESS_CSV, RETRY, UPLOAD
from batchexec.catalog import Catalog, ModelSpec
from batchexec.cli import main
from batchexec.errors import InputError
from batchexec.planning import Limits, RowInput, plan_batch
from batchexec.providers.echo import EchoProvider
from batchexec.readiness import require_ready, unready
from batchexec.web.keys import ENGINE, REGISTRY, SETTINGS
from tests.helpers import AUTH, finished, free_port, gated, owner_of, submit, write_csv

#: What the built-in watsonx.ai models need, when nothing is set.
WATSONX = (
    "cannot be called as configured: watsonx.ai is not configured: "
    "set WATSONX_URL, WATSONX_APIKEY, WATSONX_PROJECT_ID."
)
#: The original integration's own example: its default model and two of its names.
ORIGINAL_EXAMPLE = [
    {"prompt": "Summarise the report."},
    {"prompt": "Translate ${output.1} to French.", "model": "Granite 13B V2.1"},
    {"prompt": "Name a colour.", "model": "echo"},
    {"prompt": "A haiku about ${output.3}.", "model": "Llama3 8B Instruct"},
    {"prompt": "And another.", "model": "Granite 13B V2.1"},
    {"prompt": "One more.", "model": "Granite 13B V2.1"},
]


async def nothing_kept(client: Any) -> None:
    """Nothing was stored, queued or written for a refused batch."""
    listed = await client.get(BATCHES, headers=AUTH)
    assert (await listed.json())["batches"] == []
    results_dir = client.app[SETTINGS].results_dir
    assert not results_dir.exists() or list(results_dir.iterdir()) == []


async def test_the_original_examples_are_refused_naming_rows_models_and_variables(make_client):
    client = await make_client()
    response = await client.post(EXECUTE_BATCH, json={"executions": ORIGINAL_EXAMPLE}, headers=AUTH)
    assert response.status == 422
    body = await response.json()
    assert body == {
        "detail": "The batch names 3 models that cannot be called as configured: "
        "'Llama3.1 70b Instruct', 'Granite 13B V2.1', 'Llama3 8B Instruct'.",
        "errors": [
            {
                "index": None,
                "field": "model",
                "message": f"Execution 1 uses 'Llama3.1 70b Instruct', which {WATSONX}",
            },
            {
                "index": None,
                "field": "model",
                "message": f"Executions 2, 5-6 use 'Granite 13B V2.1', which {WATSONX}",
            },
            {
                "index": None,
                "field": "model",
                "message": f"Execution 4 uses 'Llama3 8B Instruct', which {WATSONX}",
            },
        ],
    }
    await nothing_kept(client)


async def test_one_model_is_the_detail_itself(make_client):
    client = await make_client()
    rows = [{"prompt": f"row {n}", "model": "Granite 13B V2.1"} for n in range(3)]
    response = await client.post(EXECUTE_BATCH, json={"executions": rows}, headers=AUTH)
    assert response.status == 422
    body = await response.json()
    assert body["detail"] == f"Executions 1-3 use 'Granite 13B V2.1', which {WATSONX}"
    assert [error["message"] for error in body["errors"]] == [body["detail"]]


async def test_an_assistant_is_named_with_its_model(make_client, tmp_path):
    catalog = tmp_path / "assistants.toml"
    catalog.write_text('[assistants."Summarizer"]\nmodel = "Llama3.1 70b Instruct"\n')
    client = await make_client(models_path=catalog)
    rows = [{"prompt": "a", "model": "echo"}, {"prompt": "b", "assistant": "summarizer"}]
    response = await client.post(EXECUTE_BATCH, json={"executions": rows}, headers=AUTH)
    body = await response.json()
    assert body["errors"] == [
        {
            "index": None,
            "field": "assistant",
            "message": "Execution 2 uses the assistant 'Summarizer', whose model "
            f"'Llama3.1 70b Instruct' {WATSONX}",
        }
    ]


async def test_a_configured_model_is_accepted(make_client, monkeypatch):
    nowhere = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("WATSONX_URL", nowhere)
    monkeypatch.setenv("WATSONX_IAM_URL", f"{nowhere}/token")
    monkeypatch.setenv("WATSONX_APIKEY", "k")
    monkeypatch.setenv("WATSONX_PROJECT_ID", "p")
    client = await make_client(max_retries=0)
    # Accepted: whether the call then works is the row's business (nothing listens there).
    invocation_id = await submit(client, [{"prompt": "hi", "model": "Granite 13B V2.1"}])
    assert [e["status"] for e in (await finished(client, invocation_id))["executions"]] == [
        "failed"
    ]


async def test_process_csv_to_execute_is_refused_naming_its_lines(make_client):
    client = await make_client()
    content = "prompt,model\nfine,echo\nno keys,\nagain,\n"
    response = await client.post(
        PROCESS_CSV, json={"csv_content": content, "execute": True}, headers=AUTH
    )
    assert response.status == 422
    assert (await response.json())["detail"] == (
        f"Lines 3-4 use 'Llama3.1 70b Instruct', which {WATSONX}"
    )
    await nothing_kept(client)
    # A template is not run here: it is written whatever the models.
    template = await client.post(PROCESS_CSV, json={"csv_content": content}, headers=AUTH)
    assert template.status == 200


async def test_an_upload_to_execute_is_refused_naming_its_sheet_rows(make_client):
    client = await make_client()
    book = openpyxl.Workbook()
    for row in [["prompt", "model"], ["a", "echo"], ["b", "Granite 13B V2.1"]]:
        book.active.append(row)
    buffer = io.BytesIO()
    book.save(buffer)
    form = aiohttp.FormData()
    form.add_field("file", buffer.getvalue(), filename="prompts.xlsx")
    form.add_field("execute", "true")
    response = await client.post(UPLOAD, data=form, headers=AUTH)
    assert response.status == 422
    assert (await response.json())["detail"] == f"Row 3 uses 'Granite 13B V2.1', which {WATSONX}"
    await nothing_kept(client)


async def test_a_retry_checks_only_the_rows_it_reruns(make_client, monkeypatch):
    client = await make_client()
    gated(client).open()
    rows = [{"prompt": "fine", "model": "gated"}, {"prompt": "flaky:x", "model": "gated-b"}]
    original = await submit(client, rows)
    assert (await finished(client, original))["progress"]["failed"] == 1
    unset: set[str] = set()

    def missing(model: Any) -> str | None:
        return f"set {model.name.upper()}_KEY." if model.name in unset else None

    monkeypatch.setattr(gated(client), "missing_configuration", missing)
    unset.add("gated-b")  # the row to rerun: refused, nothing started
    refused = await client.post(RETRY, json={"invocation_id": original}, headers=AUTH)
    assert refused.status == 422
    assert (await refused.json())["detail"] == (
        "Execution 2 uses 'gated-b', which cannot be called as configured: set GATED-B_KEY."
    )
    assert len(await client.app[REGISTRY].owned_by(owner_of(client.app), limit=10)) == 1
    unset.clear()
    unset.add("gated")  # the row that keeps its result: not checked
    started = await client.post(RETRY, json={"invocation_id": original}, headers=AUTH)
    assert started.status == 200, await started.text()
    await client.app[ENGINE].join((await started.json())["invocationId"])


def test_each_model_is_asked_once_and_only_the_rows_that_run_are_checked():
    asked: list[str] = []

    class Unset(EchoProvider):
        name = "watsonx"

        def missing_configuration(self, model: ModelSpec) -> str | None:
            asked.append(model.name)
            return "set KEY."

    no_session: Any = None  # never called
    providers = {
        "echo": EchoProvider(Settings(), no_session),
        "watsonx": Unset(Settings(), no_session),
    }
    rows = [RowInput(str(n), model="Granite 13B V2.1" if n % 2 else "echo") for n in range(1, 10)]
    limits = Limits(max_executions=10, max_prompt_length=10, default_model="echo")
    plan = plan_batch(rows, ["prompt", "model"], Catalog.load(), limits)
    (group,) = unready(plan, providers)
    assert group.indexes == (1, 3, 5, 7, 9)
    assert asked == ["Granite 13B V2.1"]
    assert unready(plan, providers, only={2, 4}) == []
    with pytest.raises(InputError, match=r"^Execution 3 uses 'Granite 13B V2.1', which"):
        require_ready(plan, providers, only={2, 3})


def test_run_refuses_and_validate_warns_with_the_same_words(tmp_path, capsys):
    write_csv(tmp_path / "p.csv", ["prompt", "model"], [["a", "echo"], ["b", ""], ["c", ""]])
    said = f"lines 3-4 use 'Llama3.1 70b Instruct', which {WATSONX}"
    assert main(["validate", "p.csv"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == f"batchexec: warning: {said}"
    assert main(["run", "p.csv", "-o", "out.xlsx"]) == 2
    assert capsys.readouterr().err == f"batchexec: p.csv: L{said[1:]}\n"
    assert not (tmp_path / "out.xlsx").exists()
