"""The HTTP API through the real app: the original routes' shapes and the acceptance points."""

from __future__ import annotations

import asyncio
import csv
import io
from pathlib import Path

import openpyxl
import pytest

from batchexec.api import (
    API_KEY_HEADER,
    EXECUTE_BATCH,
    HEALTH,
    MODELS,
    PROCESS_CSV,
    RESULTS,
    download_path,
)
from batchexec.records import ExecutionStatus
from batchexec.web.keys import ENGINE, SETTINGS
from tests.helpers import (
    API_KEY,
    AUTH,
    batch_of,
    finished,
    gated,
    results,
    sheet_rows,
    submit,
    until,
)


async def download(client, url: str, key: str = API_KEY) -> tuple[int, bytes]:
    path = url.split(str(client.make_url("")).rstrip("/"), 1)[1]
    response = await client.get(path, headers={API_KEY_HEADER: key})
    return response.status, await response.read()


async def test_health_needs_no_key(make_client):
    client = await make_client()
    response = await client.get(HEALTH)
    assert response.status == 200
    assert await response.json() == {"status": "ok"}


async def test_chained_batch_completes_with_substituted_csv_and_xlsx(make_client):
    client = await make_client()
    executions = [
        {"prompt": "Name a colour.", "model": "echo"},
        {"prompt": "Describe ${output.1} in one word.", "model": "echo"},
    ]
    response = await client.post(EXECUTE_BATCH, json={"executions": executions}, headers=AUTH)
    assert response.status == 200
    started = await response.json()
    invocation_id = started["invocationId"]
    assert started == {
        "status": "success",
        "invocationId": invocation_id,
        "response": [
            {
                "message": f"Batch execution started. Use invocation ID {invocation_id} "
                "to check status and retrieve results.",
                "type": "text",
            }
        ],
    }
    body = await finished(client, invocation_id)
    assert body["status"] == "completed"
    assert body["message"] == "Execution completed successfully."
    assert body["csv_content"] == (
        "prompt,model,result\n"
        "Name a colour.,echo,Name a colour.\n"
        "Describe Name a colour. in one word.,echo,Describe Name a colour. in one word.\n"
    )
    assert body["progress"] == {
        "total": 2,
        "succeeded": 2,
        "failed": 0,
        "skipped": 0,
        "cancelled": 0,
        "running": 0,
        "pending": 0,
    }
    assert [e["status"] for e in body["executions"]] == ["succeeded", "succeeded"]
    assert body["executions"][0]["attempts"] == 1
    status, content = await download(client, body["xlsx_url"])
    assert status == 200
    rows = sheet_rows(content, padded=True)
    assert rows[0][:5] == ["prompt", "model", "result", "status", "error"]
    assert rows[1][:4] == ["Name a colour.", "echo", "Name a colour.", "succeeded"]
    assert rows[2][2] == "Describe Name a colour. in one word."


async def test_download_headers(make_client):
    client = await make_client()
    body = await finished(client, await submit(client, [{"prompt": "x", "model": "echo"}]))
    path = body["xlsx_url"].split(str(client.make_url("")).rstrip("/"), 1)[1]
    response = await client.get(path, headers=AUTH)
    assert response.headers["Content-Type"] == (
        "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"
    )
    name = path.rsplit("/", 1)[1]
    assert response.headers["Content-Disposition"] == f'attachment; filename="{name}"'


async def test_results_while_running_show_progress_and_finished_rows(make_client):
    client = await make_client()
    invocation_id = await submit(
        client, [{"prompt": "a", "model": "gated"}, {"prompt": "b", "model": "gated"}]
    )
    provider = gated(client)
    provider.open("a")
    await provider.wait_started(2)
    await until(lambda: batch_of(client, invocation_id).counts[ExecutionStatus.SUCCEEDED] == 1)
    body = await results(client, invocation_id)
    assert body["status"] == "processing"
    assert body["xlsx_url"] is None and body["csv_content"] is None
    assert body["progress"]["succeeded"] == 1 and body["progress"]["running"] == 1
    assert [e["index"] for e in body["executions"]] == [1]
    provider.open()
    assert (await finished(client, invocation_id))["status"] == "completed"


async def test_timeout_skips_dependents_and_batch_completes(make_client):
    client = await make_client(execution_timeout_s=0.05)
    invocation_id = await submit(
        client,
        [
            {"prompt": "slow", "model": "gated"},
            {"prompt": "needs ${output.1}", "model": "echo"},
            {"prompt": "fine", "model": "echo"},
        ],
    )
    body = await finished(client, invocation_id)
    assert body["status"] == "completed"
    assert body["message"] == "Execution completed with 2 errors."
    assert [e["status"] for e in body["executions"]] == ["timed_out", "skipped", "succeeded"]
    assert body["progress"]["failed"] == 1 and body["progress"]["skipped"] == 1
    rows = list(csv.DictReader(io.StringIO(body["csv_content"])))
    assert rows[0]["result"] == "Error: Timed out after 0.05 s."
    assert rows[1]["result"] == "Error: Skipped: ${output.1} did not succeed."
    assert rows[2]["result"] == "fine"


async def test_second_batch_queues_and_third_is_refused(make_client):
    client = await make_client(max_concurrent_batches=1, max_queued_batches=1)
    first = await submit(client, [{"prompt": "one", "model": "gated"}])
    second = await submit(client, [{"prompt": "two", "model": "gated"}])
    await gated(client).wait_started(1)
    assert (await results(client, first))["status"] == "processing"
    queued = await results(client, second)
    assert queued["status"] == "queued"
    assert queued["progress"]["pending"] == 1
    response = await client.post(
        EXECUTE_BATCH, json={"executions": [{"prompt": "three", "model": "echo"}]}, headers=AUTH
    )
    assert response.status == 429
    assert "Retry-After" in response.headers
    assert "detail" in await response.json()
    gated(client).open()
    assert (await finished(client, second))["status"] == "completed"


async def test_another_key_cannot_read_a_batch_or_its_file(make_client):
    client = await make_client(integrations_api_keys="key-a,key-b")
    invocation_id = await submit(client, [{"prompt": "secret", "model": "echo"}], key="key-a")
    await client.app[ENGINE].join(invocation_id)
    owner_view = await results(client, invocation_id, key="key-a")
    response = await client.post(
        RESULTS, json={"invocation_id": invocation_id}, headers={"Integrations-API-Key": "key-b"}
    )
    assert response.status == 404
    assert await response.json() == {"detail": "Invocation ID not found"}
    assert (await download(client, owner_view["xlsx_url"], key="key-b"))[0] == 404
    assert (await download(client, owner_view["xlsx_url"], key="key-a"))[0] == 200


async def test_results_with_trailing_slash_and_unknown_id(make_client):
    client = await make_client()
    response = await client.post(RESULTS + "/", json={"invocation_id": "nope"}, headers=AUTH)
    assert response.status == 404
    assert await response.json() == {"detail": "Invocation ID not found"}


@pytest.mark.parametrize(
    "headers",
    [{}, {"Integrations-API-Key": ""}, {"Integrations-API-Key": "wrong"}],
)
async def test_missing_or_wrong_key_is_401(make_client, headers):
    client = await make_client()
    response = await client.post(RESULTS, json={"invocation_id": "x"}, headers=headers)
    assert response.status == 401
    assert "detail" in await response.json()


async def test_non_ascii_key_is_401_not_500(make_client):
    client = await make_client()
    reader, writer = await _raw_connection(client)
    writer.write(
        b"GET " + MODELS.encode() + b" HTTP/1.1\r\nHost: x\r\n"
        b"Integrations-API-Key: d\xc3\xa9v\r\nConnection: close\r\n\r\n"
    )
    head = (await reader.read()).split(b"\r\n", 1)[0]
    writer.close()
    assert head == b"HTTP/1.1 401 Unauthorized"


async def _raw_connection(client):
    return await asyncio.open_connection(client.host, client.port)


@pytest.mark.parametrize(
    ("executions", "field", "fragment"),
    [
        ([], "executions", "must not be empty"),
        ([{"prompt": ""}], "prompt", "must not be empty"),
        ([{"prompt": "x" * 1001}], "prompt", "1001 characters; the limit is 1000"),
        ([{"prompt": "x", "model": "echo", "assistant": "a"}], "assistant", "not both"),
        ([{"prompt": "x", "model": "nope"}], "model", "Known models: echo"),
        ([{"prompt": "x", "assistant": "nope"}], "assistant", "Unknown assistant 'nope'"),
        ([{"prompt": "${output.1}", "model": "echo"}], "prompt", "cannot use an earlier output"),
        ([{"prompt": 5}], "prompt", "valid string"),
    ],
)
async def test_invalid_batches_are_422_naming_the_row(make_client, executions, field, fragment):
    client = await make_client()
    response = await client.post(EXECUTE_BATCH, json={"executions": executions}, headers=AUTH)
    assert response.status == 422
    body = await response.json()
    assert body["errors"], body
    error = body["errors"][0]
    assert error["field"] == field
    assert fragment in error["message"]
    if executions:
        assert error["index"] == 1


async def test_every_bad_row_is_listed(make_client):
    client = await make_client()
    executions = [
        {"prompt": "fine", "model": "echo"},
        {"prompt": "uses ${output.3}", "model": "echo"},
        {"prompt": "x", "model": "missing"},
    ]
    response = await client.post(EXECUTE_BATCH, json={"executions": executions}, headers=AUTH)
    assert response.status == 422
    body = await response.json()
    assert body["detail"] == "2 executions are invalid."
    assert [(e["index"], e["field"]) for e in body["errors"]] == [(2, "prompt"), (3, "model")]
    assert "must name an earlier execution (1 to 1)" in body["errors"][0]["message"]


async def test_too_many_executions_is_422(make_client):
    client = await make_client(max_executions_per_batch=3)
    executions = [{"prompt": "x", "model": "echo"}] * 4
    response = await client.post(EXECUTE_BATCH, json={"executions": executions}, headers=AUTH)
    assert response.status == 422
    assert (await response.json())["detail"] == "The batch has 4 executions; the limit is 3."


async def test_malformed_json_is_400_and_a_big_body_413(make_client):
    client = await make_client(max_body_bytes=2048)
    response = await client.post(EXECUTE_BATCH, data=b'{"executions": [', headers=AUTH)
    assert response.status == 400
    assert (await response.json())["detail"].startswith("The request body is not valid JSON")
    big = b'{"executions": [{"prompt": "' + b"x" * 4096 + b'"}]}'
    response = await client.post(EXECUTE_BATCH, data=big, headers=AUTH)
    assert response.status == 413
    assert "detail" in await response.json()


async def test_unknown_route_and_method_are_json(make_client):
    client = await make_client()
    response = await client.get("/nowhere", headers=AUTH)
    assert response.status == 404
    assert await response.json() == {"detail": "Not Found"}
    response = await client.get(RESULTS, headers=AUTH)
    assert response.status == 405
    assert "POST" in response.headers["Allow"]


async def test_process_csv_writes_the_template(make_client):
    client = await make_client()
    content = 'prompt,model,topic\n"Hello, world",echo,greeting\n'
    response = await client.post(PROCESS_CSV, json={"csv_content": content}, headers=AUTH)
    assert response.status == 200
    body = await response.json()
    name = f"batch_execution_{body['invocationId']}.xlsx"
    assert body["status"] == "success"
    # The original contract's relative path, never the server's own folder.
    assert body["xlsx_path"] == f"public/batch_execution_results/{name}"
    assert (client.app[SETTINGS].public_dir / "batch_execution_results" / name).is_file()
    assert body["xlsx_url"].endswith(download_path(name))
    assert body["response"][0]["type"] == "text"
    status, xlsx = await download(client, body["xlsx_url"])
    assert status == 200
    assert sheet_rows(xlsx, padded=True) == [
        ["prompt", "model", "topic", "result"],
        ["Hello, world", "echo", "greeting", None],
    ]


async def test_process_csv_execute_runs_the_batch(make_client):
    client = await make_client()
    content = '\ufeffprompt,model,note\nfirst,echo,a\n"second ${output.1}\nline two",echo,b\n'
    response = await client.post(
        PROCESS_CSV, json={"csv_content": content, "execute": True}, headers=AUTH
    )
    assert response.status == 200
    invocation_id = (await response.json())["invocationId"]
    body = await finished(client, invocation_id)
    rows = list(csv.DictReader(io.StringIO(body["csv_content"])))
    assert rows == [
        {"prompt": "first", "model": "echo", "note": "a", "result": "first"},
        {
            "prompt": "second first\nline two",
            "model": "echo",
            "note": "b",
            "result": "second first\nline two",
        },
    ]


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("", "empty"),
        ("model\necho\n", "no 'prompt' column"),
        ("prompt,model\nhello,echo\nragged\n", "line 3"),
    ],
)
async def test_bad_csv_is_422_naming_the_problem(make_client, content, fragment):
    client = await make_client()
    response = await client.post(PROCESS_CSV, json={"csv_content": content}, headers=AUTH)
    assert response.status == 422
    assert fragment in (await response.json())["detail"]


async def test_csv_row_errors_name_their_line(make_client):
    client = await make_client()
    content = 'prompt,model\nok,echo\n"multi\nline",echo\nbad,nope\n'
    response = await client.post(PROCESS_CSV, json={"csv_content": content}, headers=AUTH)
    assert response.status == 422
    error = (await response.json())["errors"][0]
    assert error["index"] == 3
    assert error["message"].startswith("line 5: Unknown model 'nope'")


async def test_formula_like_prompt_stays_a_string_cell(make_client):
    client = await make_client()
    prompt = '=HYPERLINK("http://example.invalid","click me")'
    body = await finished(client, await submit(client, [{"prompt": prompt, "model": "echo"}]))
    status, content = await download(client, body["xlsx_url"])
    assert status == 200
    cell = openpyxl.load_workbook(io.BytesIO(content))["Results"]["A2"]
    assert cell.data_type == "s"
    assert cell.value == prompt
    assert cell.hyperlink is None


async def test_models_route_lists_the_catalog_without_secrets(make_client, monkeypatch):
    client = await make_client()
    response = await client.get(MODELS, headers=AUTH)
    assert response.status == 200
    body = await response.json()
    by_name = {model["name"]: model for model in body["models"]}
    assert by_name["echo"]["provider"] == "echo"
    assert by_name["echo"]["configured"] is True
    assert by_name["Llama3.1 70b Instruct"]["provider"] == "watsonx"
    assert body["default_model"] == "Llama3.1 70b Instruct"


async def test_json_extras_become_columns(make_client):
    client = await make_client()
    body = await finished(
        client,
        await submit(client, [{"prompt": "p", "model": "echo", "id": 7, "tags": ["a"]}]),
    )
    assert body["csv_content"] == 'prompt,model,id,tags,result\np,echo,7,"[""a""]",p\n'


async def test_a_lone_surrogate_neither_breaks_the_workbook_nor_the_batch(make_client):
    client = await make_client()
    raw = b'{"executions": [{"prompt": "broken \\ud800 emoji", "model": "echo"}]}'
    response = await client.post(EXECUTE_BATCH, data=raw, headers=AUTH)
    assert response.status == 200
    body = await finished(client, (await response.json())["invocationId"])
    assert body["status"] == "completed"
    status, content = await download(client, body["xlsx_url"])
    assert status == 200
    assert sheet_rows(content, padded=True)[1][0] == "broken \ufffd emoji"


async def test_a_refused_process_csv_leaves_no_workbook(make_client, tmp_path):
    client = await make_client(max_concurrent_batches=1, max_queued_batches=0)
    await submit(client, [{"prompt": "busy", "model": "gated"}])
    await gated(client).wait_started(1)
    response = await client.post(
        PROCESS_CSV, json={"csv_content": "prompt,model\nhi,echo\n", "execute": True}, headers=AUTH
    )
    assert response.status == 429
    results_dir = Path(tmp_path / "public" / "batch_execution_results")
    assert [path.name for path in results_dir.glob("*.xlsx")] == []
    gated(client).open()


async def test_execute_batch_keeps_the_column_order_it_is_given(make_client):
    client = await make_client(default_model="echo")
    executions = [
        {"prompt": "a", "model": "echo", "id": "1", "notes": "x"},
        {"prompt": "b", "id": "2", "notes": "", "late": "y"},
    ]
    body = {"executions": executions, "columns": ["id", "prompt", "notes", "model"]}
    response = await client.post(EXECUTE_BATCH, json=body, headers=AUTH)
    assert response.status == 200, await response.text()
    ended = await finished(client, (await response.json())["invocationId"])
    assert ended["csv_content"].splitlines()[0] == "id,prompt,notes,model,late,result"
    # Without it: prompt and model first, then the other keys as they come.
    plain = await finished(client, await submit(client, executions))
    assert plain["csv_content"].splitlines()[0] == "prompt,model,id,notes,late,result"
    twice = await client.post(
        EXECUTE_BATCH, json={**body, "columns": ["id", "prompt", "id"]}, headers=AUTH
    )
    assert twice.status == 422
    assert (await twice.json())["errors"] == [
        {"index": None, "field": "columns", "message": "'id' appears twice"}
    ]
