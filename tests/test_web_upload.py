"""The spreadsheet upload route: a multipart CSV or XLSX answered like ``process_csv``."""

from __future__ import annotations

import asyncio
import csv
import io
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import openpyxl
import pytest

from batchexec.api import (
    API_KEY_HEADER,
    CANCEL,
    PROCESS_CSV,
    RESULTS,
    RETRY,
    UPLOAD,
    events_path,
)
from batchexec.web.keys import RESULT_WORKBOOKS, SETTINGS
from tests.helpers import API_KEY, AUTH, finished, results, sheet_rows


def form(
    data: bytes, filename: str | None = "prompts.csv", execute: str | None = None
) -> aiohttp.FormData:
    body = aiohttp.FormData()
    # A stream rather than bytes, so that a part with no filename is still a file part.
    body.add_field(
        "file", io.BytesIO(data), filename=filename, content_type="application/octet-stream"
    )
    if execute is not None:
        body.add_field("execute", execute)
    return body


def workbook(rows: list[list[Any]], title: str = "Results") -> bytes:
    book = openpyxl.Workbook()
    sheet = book.active
    sheet.title = title
    for row in rows:
        sheet.append(row)
    buffer = io.BytesIO()
    book.save(buffer)
    return buffer.getvalue()


def template_rows(client: Any, body: dict[str, Any]) -> list[list[Any]]:
    path = client.app[SETTINGS].results_dir / body["xlsx_url"].rsplit("/", 1)[1]
    return sheet_rows(path, padded=True)


async def test_csv_upload_answers_exactly_like_process_csv(make_client):
    client = await make_client()
    content = 'prompt,model,topic\n"Hello, world",echo,greeting\n'
    uploaded = await client.post(UPLOAD, data=form(content.encode()), headers=AUTH)
    posted = await client.post(PROCESS_CSV, json={"csv_content": content}, headers=AUTH)
    assert uploaded.status == posted.status == 200
    upload_body, csv_body = await uploaded.json(), await posted.json()
    assert upload_body.keys() == csv_body.keys()
    # Each says how to run the rows through its own route.
    assert upload_body["response"][0]["message"] == (
        "CSV processed: 1 row written to the XLSX template; nothing was run. "
        "To run it, upload the file again with execute=true."
    )
    assert csv_body["response"][0]["message"] == (
        "CSV processed: 1 row written to the XLSX template; nothing was run. "
        'To run it, send the CSV again with "execute": true.'
    )
    assert template_rows(client, upload_body) == template_rows(client, csv_body)


async def test_xlsx_upload_with_execute_runs_and_keeps_every_column(make_client):
    client = await make_client()
    data = workbook(
        [
            ["id", "Prompt", "model", "result"],
            [1, "first", "echo", None],
            [2, "then ${output.1}", "echo", "old"],
        ]
    )
    response = await client.post(
        UPLOAD, data=form(data, "batch.XLSX", execute="true"), headers=AUTH
    )
    assert response.status == 200, await response.text()
    body = await response.json()
    assert body["response"][0]["message"].startswith(
        "XLSX processed: 2 rows. Batch execution started."
    )
    results = await finished(client, body["invocationId"])
    assert results["status"] == "completed"
    assert list(csv.DictReader(io.StringIO(results["csv_content"]))) == [
        {"id": "1", "prompt": "first", "model": "echo", "result": "first"},
        {"id": "2", "prompt": "then first", "model": "echo", "result": "then first"},
    ]


@pytest.mark.parametrize("filename", [None, "upload", "upload.bin", "wrongly-named.csv"])
async def test_a_workbook_is_recognised_by_its_content(make_client, filename):
    client = await make_client()
    data = workbook([["prompt"], ["hi"]], title="Sheet1")
    response = await client.post(UPLOAD, data=form(data, filename), headers=AUTH)
    assert response.status == 200, await response.text()
    assert (await response.json())["response"][0]["message"].startswith("XLSX processed: 1 row")


@pytest.mark.parametrize(("flag", "runs"), [("1", True), ("TRUE", True), ("0", False), ("", False)])
async def test_execute_field_accepts_true_1_false_0(make_client, flag, runs):
    client = await make_client()
    response = await client.post(
        UPLOAD, data=form(b"prompt,model\nhi,echo\n", execute=flag), headers=AUTH
    )
    body = await response.json()
    assert ("Batch execution started" in body["response"][0]["message"]) is runs


async def test_xlsx_row_errors_name_their_sheet_row(make_client):
    client = await make_client()
    data = workbook([["prompt", "model"], ["ok", "echo"], [None, None], ["bad", "nope"]])
    response = await client.post(UPLOAD, data=form(data, "p.xlsx"), headers=AUTH)
    assert response.status == 422
    body = await response.json()
    assert body["detail"] == "1 execution is invalid."
    assert body["errors"][0]["index"] == 2
    assert body["errors"][0]["field"] == "model"
    assert body["errors"][0]["message"].startswith("row 4: Unknown model 'nope'")


async def test_csv_row_errors_name_their_line(make_client):
    client = await make_client()
    response = await client.post(
        UPLOAD, data=form(b"prompt,model\nok,echo\n\nbad,nope\n"), headers=AUTH
    )
    assert response.status == 422
    assert (await response.json())["errors"][0]["message"].startswith("line 4: Unknown model")


@pytest.mark.parametrize(
    ("data", "filename", "fragment"),
    [
        (b"model\necho\n", "p.csv", "no 'prompt' column"),
        (b"prompt\ncaf\xe9\n", "p.csv", "not UTF-8"),
        (b"PK\x03\x04 broken", "p.xlsx", "The XLSX file cannot be read"),
        (b"not a zip", "p.xlsx", "The XLSX file cannot be read"),
        (b'{"executions": []}', "p.json", "Upload a CSV or XLSX file"),
        (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + b"\0" * 64, "old.xls", ".xls"),
    ],
)
async def test_bad_content_is_422(make_client, data, filename, fragment):
    client = await make_client()
    response = await client.post(UPLOAD, data=form(data, filename), headers=AUTH)
    assert response.status == 422
    assert fragment in (await response.json())["detail"]


async def test_no_file_field_is_422(make_client):
    client = await make_client()
    body = aiohttp.FormData()
    body.add_field("execute", "true")
    body.add_field("other", b"x", filename="x.csv")
    response = await client.post(UPLOAD, data=body, headers=AUTH)
    assert response.status == 422
    assert (await response.json())["errors"] == [
        {"index": None, "field": "file", "message": "attach a CSV or XLSX file"}
    ]


async def test_bad_execute_value_is_422(make_client):
    client = await make_client()
    response = await client.post(UPLOAD, data=form(b"prompt\nhi\n", execute="maybe"), headers=AUTH)
    assert response.status == 422
    assert (await response.json())["errors"][0]["field"] == "execute"


async def test_a_body_that_is_not_multipart_is_422(make_client):
    client = await make_client()
    response = await client.post(UPLOAD, json={"csv_content": "prompt\nhi\n"}, headers=AUTH)
    assert response.status == 422
    assert "multipart/form-data" in (await response.json())["detail"]


async def test_a_body_over_the_limit_is_413(make_client):
    client = await make_client(max_body_bytes=4096)
    big = b"prompt\n" + b"x" * 5000 + b"\n"
    response = await client.post(UPLOAD, data=form(big), headers=AUTH)
    assert response.status == 413
    assert "detail" in await response.json()


async def test_a_chunked_body_over_the_limit_is_413_too(make_client):
    client = await make_client(max_body_bytes=4096)

    async def chunks():
        yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="p.csv"\r\n\r\n'
        yield b"prompt\n"
        for _ in range(10):
            yield b"y" * 1000
        yield b"\r\n--b--\r\n"

    headers = {**AUTH, "Content-Type": "multipart/form-data; boundary=b"}
    response = await client.post(UPLOAD, data=chunks(), headers=headers)
    assert "Content-Length" not in response.request_info.headers
    assert response.status == 413


async def test_upload_needs_the_key(make_client):
    client = await make_client()
    response = await client.post(UPLOAD, data=form(b"prompt\nhi\n"))
    assert response.status == 401


async def test_a_malformed_multipart_body_is_422(make_client):
    client = await make_client()
    for content_type, body in [
        ("multipart/form-data", b"xx"),
        ("multipart/form-data; boundary=abc", b"garbage"),
    ]:
        response = await client.post(
            UPLOAD,
            data=body,
            headers={**AUTH, "Content-Type": content_type},
        )
        assert response.status == 422, await response.text()
        assert "multipart" in (await response.json())["detail"]


# A template's id


async def test_a_templates_id_says_what_it_is_and_how_to_run_it(make_client):
    client = await make_client(integrations_api_keys="dev-only-token,other")
    content = "prompt,model\nName a colour,echo\nWhy ${output.1}?,echo\n"
    written = await (
        await client.post(PROCESS_CSV, json={"csv_content": content}, headers=AUTH)
    ).json()
    template_id = written["invocationId"]
    for path, body in [
        (RESULTS, {"invocation_id": template_id}),
        (CANCEL, {"invocation_id": template_id}),
        (RETRY, {"invocation_id": template_id}),
    ]:
        response = await client.post(path, json=body, headers=AUTH)
        assert response.status == 404, path
        answer = await response.json()
        assert answer["detail"].startswith(
            f"Invocation ID {template_id} names a template workbook (written by process_csv "
            'or upload without "execute"): its rows have not run, so it has no results. '
            'To run them, send the CSV again with "execute": true, or upload the workbook'
        )
        assert answer["xlsx_url"] == written["xlsx_url"]
    events = await client.get(events_path(template_id), headers=AUTH)
    assert events.status == 404
    assert (await events.json())["xlsx_url"] == written["xlsx_url"]
    # To another key, and for an id that names nothing, it is the contract's plain 404.
    for key, invocation_id in [("other", template_id), (API_KEY, "no-such-id")]:
        response = await client.post(
            RESULTS, json={"invocation_id": invocation_id}, headers={API_KEY_HEADER: key}
        )
        assert response.status == 404
        assert await response.json() == {"detail": "Invocation ID not found"}


async def test_a_template_runs_when_its_workbook_is_uploaded_with_execute(make_client):
    client = await make_client()
    content = "id,prompt,model\n7,Name a colour,echo\n8,Why ${output.1}?,echo\n"
    written = await (
        await client.post(PROCESS_CSV, json={"csv_content": content}, headers=AUTH)
    ).json()
    download = await client.get(urlsplit(written["xlsx_url"]).path, headers=AUTH)
    template = await download.read()
    started = await client.post(
        UPLOAD, data=form(template, "template.xlsx", execute="true"), headers=AUTH
    )
    assert started.status == 200, await started.text()
    body = await finished(client, (await started.json())["invocationId"])
    assert body["invocationId"] != written["invocationId"]
    assert [e["result"] for e in body["executions"]] == ["Name a colour", "Why Name a colour?"]


# A workbook's numbers and booleans

TYPED_SHEET: list[list[Any]] = [
    ["prompt", "model", "n", "ratio", "ok", "code", "formula"],
    ["Say hi", "echo", 7, 0.5, True, "007", "+1"],
    ["Say bye", "echo", -3, 1e20, False, "1e3", "@x"],
]


async def run_typed_sheet(client: Any) -> str:
    """Upload ``TYPED_SHEET`` to run, wait for it; its invocation id."""
    started = await client.post(
        UPLOAD, data=form(workbook(TYPED_SHEET), "typed.xlsx", execute="true"), headers=AUTH
    )
    assert started.status == 200, await started.text()
    invocation_id: str = (await started.json())["invocationId"]
    await ended(client, invocation_id)
    return invocation_id


async def ended(client: Any, invocation_id: str) -> dict[str, Any]:
    """The batch's results once it has ended, and its workbook is written.

    Polled: with PostgreSQL a replica claims the batch from the store, so the
    engine may not hold it yet when asked.
    """
    for _ in range(1000):
        body = await results(client, invocation_id)
        if body["status"] not in ("queued", "processing"):
            await client.app[RESULT_WORKBOOKS].idle()
            return body
        await asyncio.sleep(0.01)
    raise AssertionError(f"batch {invocation_id} never ended")


async def assert_types_kept(client: Any, invocation_id: str) -> None:
    """The outputs hold the sheet's numbers and booleans as such, and its texts as text."""
    body = await ended(client, invocation_id)
    assert body["csv_content"] == (
        "prompt,model,n,ratio,ok,code,formula,result\n"
        "Say hi,echo,7,0.5,TRUE,007,+1,Say hi\n"
        "Say bye,echo,-3,1e+20,FALSE,1e3,@x,Say bye\n"
    )
    # The workbook is made again from the store's records.
    path = client.app[SETTINGS].results_dir / f"batch_execution_{invocation_id}.xlsx"
    path.unlink(missing_ok=True)
    download = await client.get(urlsplit(body["xlsx_url"]).path, headers=AUTH)
    assert download.status == 200
    sheet = openpyxl.load_workbook(io.BytesIO(await download.read()))["Results"]
    cells = [[(cell.value, cell.data_type) for cell in row[:7]] for row in sheet.iter_rows(2)]
    assert cells == [
        [
            ("Say hi", "s"),
            ("echo", "s"),
            (7, "n"),
            (0.5, "n"),
            (True, "b"),
            ("007", "s"),
            ("+1", "s"),
        ],
        [
            ("Say bye", "s"),
            ("echo", "s"),
            (-3, "n"),
            (1e20, "n"),
            (False, "b"),
            ("1e3", "s"),
            ("@x", "s"),
        ],
    ]


async def test_a_workbooks_numbers_and_booleans_stay_so_in_the_outputs(make_client):
    client = await make_client(database_url="memory://")
    await assert_types_kept(client, await run_typed_sheet(client))


async def test_numbers_and_booleans_survive_the_sqlite_store_and_a_restart(make_client):
    client = await make_client()  # the default store: batchexec.db in the test's folder
    invocation_id = await run_typed_sheet(client)
    await client.close()
    await assert_types_kept(await make_client(), invocation_id)


async def test_numbers_and_booleans_survive_the_postgresql_store_and_a_restart(
    make_client, postgres_url
):
    client = await make_client(database_url=postgres_url)
    invocation_id = await run_typed_sheet(client)
    await client.close()
    await assert_types_kept(await make_client(database_url=postgres_url), invocation_id)
