"""Crafted requests get a clear 4xx, or fail their own row, and cost little."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import json
import logging
import socket
import threading
from collections.abc import Sequence
from typing import Any

import pytest
from aiohttp import FormData

from batchexec import slices
from batchexec.api import CANCEL, EXECUTE_BATCH, PROCESS_CSV, RESULTS, RETRY, UPLOAD, download_path
from batchexec.exports import write_xlsx
from batchexec.records import BatchStatus
from batchexec.store.base import Change, ExecutionEnded
from batchexec.store.sqlite import SQLiteStore
from batchexec.web.keys import ENGINE, REGISTRY
from tests.helpers import (
    API_KEY,
    AUTH,
    batch_of,
    finished,
    gated,
    owner_of,
    results,
    submit,
)

JSON_ROUTES = [EXECUTE_BATCH, PROCESS_CSV, RESULTS, CANCEL, RETRY]


async def error_of(response: Any, status: int) -> str:
    assert response.status == status, await response.text()
    assert response.content_type == "application/json"
    body = await response.json()
    detail: str = body["detail"]
    assert detail
    return detail


# 1. ${output.n} amplification


async def test_a_prompt_that_grows_past_the_bound_when_filled_in_is_not_sent(make_client):
    client = await make_client(max_sent_prompt_length=5_000)
    # The request: 4 KB that asked for gigabytes.
    executions = [{"prompt": "x" * 1000, "model": "echo"}]
    for row in range(2, 5):
        executions.append({"prompt": f"${{output.{row - 1}}}" * 90, "model": "gated"})
    invocation_id = await submit(client, executions)
    body = await finished(client, invocation_id)
    statuses = [execution["status"] for execution in body["executions"]]
    assert statuses == ["succeeded", "failed", "skipped", "skipped"]
    assert body["executions"][1]["error"] == (
        "Not sent: with ${output.n} filled in the prompt is 90000 characters; "
        "the limit (MAX_SENT_PROMPT_LENGTH) is 5000."
    )
    assert body["executions"][1]["attempts"] == 0
    assert gated(client).started == []
    assert batch_of(client, invocation_id).executions[1].prompt_sent is None
    assert len(body["csv_content"]) < 10_000


async def test_a_prompt_exactly_at_the_bound_is_sent(make_client):
    client = await make_client(max_sent_prompt_length=20)
    invocation_id = await submit(
        client,
        [{"prompt": "0123456789", "model": "echo"}, {"prompt": "${output.1}" * 2, "model": "echo"}],
    )
    body = await finished(client, invocation_id)
    assert [e["result"] for e in body["executions"]] == ["0123456789", "01234567890123456789"]


async def test_an_answer_longer_than_the_bound_fails_its_row(make_client):
    client = await make_client(max_result_length=10)
    invocation_id = await submit(
        client, [{"prompt": "short", "model": "echo"}, {"prompt": "x" * 11, "model": "echo"}]
    )
    body = await finished(client, invocation_id)
    first, second = body["executions"]
    assert first["status"] == "succeeded"
    assert second["status"] == "failed"
    assert second["result"] is None
    assert second["error"] == "The answer is 11 characters; the limit (MAX_RESULT_LENGTH) is 10."
    assert body["message"] == "Execution completed with 1 error."


# 5. csv_content round-trips whatever the text


TRICKY_TEXTS = [
    "lone\rcr",
    "x\r",
    "crlf\r\nhere",
    'say "hi", ok',
    "nul\x00byte",
    "=1+2",
    "y\n\r\n\r",
]


async def test_csv_content_reads_back_the_same_rows_and_cells(make_client):
    client = await make_client()
    executions = [{"prompt": text, "model": "echo", "note": text} for text in TRICKY_TEXTS]
    body = await finished(client, await submit(client, executions))
    rows = list(csv.DictReader(io.StringIO(body["csv_content"], newline="")))
    assert len(rows) == len(TRICKY_TEXTS)
    for row, text in zip(rows, TRICKY_TEXTS, strict=True):
        assert row == {"prompt": text, "model": "echo", "note": text, "result": text}


# 6. 500s that must be 4xx


@pytest.mark.parametrize("route", JSON_ROUTES)
@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (b'{"invocation_id": ' + b"9" * 5000 + b"}", "more than 4300 digits"),
        (b'{"executions": [{"prompt": "p", "n": ' + b"1" * 5000 + b"}]}", "4300 digits"),
    ],
)
async def test_json_that_python_cannot_hold_is_400(make_client, route, raw, fragment):
    client = await make_client()
    response = await client.post(
        route, data=raw, headers={**AUTH, "Content-Type": "application/json"}
    )
    assert fragment in await error_of(response, 400)


async def test_json_just_under_the_nesting_limit_is_still_a_4xx(make_client):
    client = await make_client()
    deep = "[" * 900 + "]" * 900
    raw = f'{{"executions": [{{"prompt": "p", "model": "echo", "deep": {deep}}}]}}'
    response = await client.post(
        EXECUTE_BATCH, data=raw.encode(), headers={**AUTH, "Content-Type": "application/json"}
    )
    assert response.status in (200, 400), await response.text()


async def test_a_reference_with_thousands_of_digits_is_422(make_client):
    client = await make_client(max_prompt_length=10_000)
    response = await client.post(
        EXECUTE_BATCH,
        json={"executions": [{"prompt": "${output." + "9" * 5000 + "}", "model": "echo"}]},
        headers=AUTH,
    )
    await error_of(response, 422)
    errors = (await response.json())["errors"]
    assert "is not a reference of the form ${output.n}" in errors[0]["message"]


def multipart(part_headers: bytes) -> tuple[bytes, dict[str, str]]:
    body = b"--XX\r\n" + part_headers + b"\r\n\r\nprompt\nhi\n\r\n--XX--\r\n"
    return body, {**AUTH, "Content-Type": "multipart/form-data; boundary=XX"}


@pytest.mark.parametrize(
    ("part_headers", "fragment"),
    [
        (b"this is not a header", "Invalid HTTP header"),
        (b'Content-Disposition: form-data; name="file"; filename="' + b"a" * 9000 + b'"', "8190"),
        (b'Content-Disposition: form-data; name="f\x00"', "Invalid HTTP header"),
    ],
)
async def test_a_multipart_part_with_bad_headers_is_422(make_client, part_headers, fragment):
    client = await make_client()
    body, headers = multipart(part_headers)
    response = await client.post(UPLOAD, data=body, headers=headers)
    detail = await error_of(response, 422)
    assert detail.startswith("The multipart body cannot be read: ")
    assert fragment in detail


@pytest.mark.parametrize("route", [PROCESS_CSV, UPLOAD])
async def test_a_workbook_that_cannot_be_written_is_a_clear_503(make_client, tmp_path, route):
    blocker = tmp_path / "a-file"
    blocker.write_text("where the results folder should be")
    client = await make_client(public_dir=blocker)
    if route == PROCESS_CSV:
        response = await client.post(route, json={"csv_content": "prompt\nhi\n"}, headers=AUTH)
    else:
        form = FormData()
        form.add_field("file", b"prompt\nhi\n", filename="p.csv")
        response = await client.post(route, data=form, headers=AUTH)
    detail = await error_of(response, 503)
    assert detail == "The server cannot write the workbook: Not a directory. Try again later."
    assert await client.app[REGISTRY].templates_of(owner_of(client.app)) == []


# 7. template workbooks are bounded


async def test_one_template_kept_is_said_in_the_singular(make_client):
    client = await make_client(max_templates=1)
    body = {"csv_content": "prompt\nhi\n"}
    assert (await client.post(PROCESS_CSV, json=body, headers=AUTH)).status == 200
    refused = await client.post(PROCESS_CSV, json=body, headers=AUTH)
    detail = await error_of(refused, 429)
    assert detail.startswith(
        "This API key keeps 1 template workbook; the limit (MAX_TEMPLATES) is 1."
    )


async def test_template_workbooks_are_bounded_per_key(make_client):
    client = await make_client(max_templates=2, integrations_api_keys=f"{API_KEY},other")
    body = {"csv_content": "prompt\nhi\n"}
    for _ in range(2):
        response = await client.post(PROCESS_CSV, json=body, headers=AUTH)
        assert response.status == 200
    refused = await client.post(PROCESS_CSV, json=body, headers=AUTH)
    detail = await error_of(refused, 429)
    assert "the limit (MAX_TEMPLATES) is 2" in detail
    # Until the oldest expires: a week, not the few seconds of a full queue.
    assert int(refused.headers["Retry-After"]) > 600_000
    other = await client.post(PROCESS_CSV, json=body, headers={"Integrations-API-Key": "other"})
    assert other.status == 200
    runnable = {"csv_content": "prompt,model\nhi,echo\n", "execute": True}
    run = await client.post(PROCESS_CSV, json=runnable, headers=AUTH)
    assert run.status == 200, "a batch that runs is bounded by the queue, not by templates"


# 8. too many columns


async def test_a_csv_with_more_columns_than_the_limit_is_422(make_client):
    client = await make_client(max_columns=10)
    header = ",".join(["prompt", *(f"c{n}" for n in range(20_001))])
    response = await client.post(
        PROCESS_CSV, json={"csv_content": f"{header}\n{',' * 20_001}\n"}, headers=AUTH
    )
    detail = await error_of(response, 422)
    assert detail == "CSV line 1: the header has 20002 columns; the limit (MAX_COLUMNS) is 10."


async def test_executions_with_more_keys_than_the_column_limit_are_422(make_client):
    client = await make_client(max_columns=5)
    extra = {f"k{n}": "v" for n in range(10)}
    response = await client.post(
        EXECUTE_BATCH,
        json={"executions": [{"prompt": "p", "model": "echo", **extra}]},
        headers=AUTH,
    )
    detail = await error_of(response, 422)
    assert detail == "The input has 12 columns; the limit (MAX_COLUMNS) is 5."


async def test_an_oversized_executions_list_is_refused_before_validation(make_client):
    client = await make_client(max_executions_per_batch=3)
    # Invalid items past the limit: refused for the count, not validated one by one.
    response = await client.post(
        EXECUTE_BATCH, json={"executions": [{"prompt": 1}] * 1000}, headers=AUTH
    )
    detail = await error_of(response, 422)
    assert detail == "The batch has 1000 executions; the limit is 3."


# 9. a failed workbook keeps the CSV


async def test_a_batch_whose_workbook_fails_still_answers_its_csv(make_client, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("where the results folder should be")
    client = await make_client(public_dir=blocker)
    body = await finished(client, await submit(client, [{"prompt": "hi", "model": "echo"}]))
    assert body["status"] == "completed"
    assert body["message"] == "Execution completed successfully."
    assert body["csv_content"] == "prompt,model,result\nhi,echo,hi\n"
    # The workbook is written after the batch ends; asking for it says why it is not there.
    name = body["xlsx_url"].rsplit("/", 1)[1]
    response = await client.get(download_path(name), headers=AUTH)
    assert response.status == 503
    detail = (await response.json())["detail"]
    assert "The workbook could not be written (Not a directory)" in detail


# 11. processing while writing outputs


async def test_a_batch_ends_without_waiting_for_its_workbook(make_client, monkeypatch):
    """``done`` and the next batch's slot wait for no file; a download waits for the write."""
    client = await make_client(max_concurrent_batches=1)
    writing = threading.Event()
    release = threading.Event()

    def slow_write(*args: Any) -> None:
        writing.set()
        release.wait(timeout=30)
        write_xlsx(*args)

    monkeypatch.setattr("batchexec.exports.write_xlsx", slow_write)
    first = await submit(client, [{"prompt": "a", "model": "echo"}])
    second = await submit(client, [{"prompt": "b", "model": "echo"}])
    await client.app[ENGINE].join(second)
    assert writing.is_set()
    statuses = [batch_of(client, id_).status for id_ in (first, second)]
    assert statuses == [BatchStatus.COMPLETED, BatchStatus.COMPLETED]
    body = await results(client, first)
    name = body["xlsx_url"].rsplit("/", 1)[1]
    download = asyncio.ensure_future(client.get(download_path(name), headers=AUTH))
    for _ in range(100):
        await asyncio.sleep(0)
    assert not download.done()
    release.set()
    response = await download
    assert response.status == 200
    assert (await response.read()).startswith(b"PK")


# 4. what a client that never reads can pin


async def test_a_client_that_does_not_read_its_answer_is_disconnected(
    make_client, monkeypatch, caplog
):
    monkeypatch.setattr("batchexec.web.presenting._WRITE_TIMEOUT_S", 0.2)
    caplog.set_level(logging.INFO, logger="batchexec.web.presenting")
    client = await make_client(max_executions_per_batch=300)
    rows = [{"prompt": "x" * 1000, "model": "echo"}]
    rows += [{"prompt": "${output.1}" * 30, "model": "echo"} for _ in range(299)]
    invocation_id = await submit(client, rows)
    await client.app[ENGINE].join(invocation_id)

    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (client.host, client.port))
    reader, writer = await asyncio.open_connection(sock=sock)
    body = json.dumps({"invocation_id": invocation_id}).encode()
    writer.write(
        b"POST " + RESULTS.encode() + b" HTTP/1.1\r\nHost: x\r\n"
        b"Integrations-API-Key: " + API_KEY.encode() + b"\r\n"
        b"Content-Type: application/json\r\nContent-Length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body
    )
    await writer.drain()
    # Not reading: the server's writes stall once the socket buffers fill.
    await until_logged(caplog, "the client read too slowly")
    received = 0
    with contextlib.suppress(ConnectionError):
        while chunk := await reader.read(1 << 20):
            received += len(chunk)
    writer.close()
    assert 0 < received < 27 * 1024 * 1024  # the whole answer is about 27 MB
    # The server goes on serving others.
    assert (await results(client, invocation_id))["status"] == "completed"


async def until_logged(caplog, text: str, *, rounds: int = 600) -> None:
    for _ in range(rounds):
        if any(text in record.getMessage() for record in caplog.records):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"never logged {text!r}")


# Nothing holds the event loop (#11)


async def test_instant_rows_hand_the_loop_back_every_few_hundred_rows(make_client):
    client = await make_client(database_url="memory://", max_executions_per_batch=4000)
    turns = 0
    running = True

    async def probe() -> None:
        nonlocal turns
        while running:
            turns += 1
            await asyncio.sleep(0)

    prober = asyncio.ensure_future(probe())
    invocation_id = await submit(
        client, [{"prompt": f"p{n}", "model": "echo"} for n in range(4000)]
    )
    await client.app[ENGINE].join(invocation_id)
    running = False
    await prober
    # 4,000 rows that never wait on I/O: the engine yields at least every 200 of them.
    assert turns >= 4000 // 200


async def test_instant_rows_on_sqlite_commit_a_wave_of_workers_in_one_group(
    make_client, monkeypatch
):
    ends: list[int] = []
    real_apply = SQLiteStore.apply

    async def apply(self: SQLiteStore, changes: Sequence[Change]) -> frozenset[str]:
        if count := sum(isinstance(change, ExecutionEnded) for change in changes):
            ends.append(count)
        return await real_apply(self, changes)

    monkeypatch.setattr(SQLiteStore, "apply", apply)
    # The loop's slice for bulk work out of the way (on a loaded machine 50 rows
    # take longer than one; test_slices tests it): the grouping alone is tested.
    monkeypatch.setattr(slices, "SLICE_S", 60.0)
    client = await make_client(max_threads=50, max_executions_per_batch=1000)
    invocation_id = await submit(
        client, [{"prompt": f"p{n}", "model": "echo"} for n in range(1000)]
    )
    await client.app[ENGINE].join(invocation_id)
    # Each worker waits for its row's end to be durable, which hands the loop back:
    # no pause of its own splits a wave of 50 ends into two commits.
    assert ends == [50] * 20


async def test_a_large_batch_is_validated_and_planned_off_the_loop(make_client, monkeypatch):
    from batchexec.inputs import plan_rows as real_plan_rows
    from batchexec.web.requests import validated as real_validated

    threads: list[str] = []

    def plan_rows(*args: Any) -> Any:
        threads.append(threading.current_thread().name)
        return real_plan_rows(*args)

    def validated(*args: Any) -> Any:
        threads.append(threading.current_thread().name)
        return real_validated(*args)

    monkeypatch.setattr("batchexec.web.requests.plan_rows", plan_rows)
    monkeypatch.setattr("batchexec.web.requests.validated", validated)
    client = await make_client(max_executions_per_batch=3000)
    rows = [{"prompt": f"row {n} " + "x" * 40, "model": "echo"} for n in range(3000)]
    await submit(client, rows)
    # The body's validation, then its plan, each on the input pool's threads.
    assert len(threads) == 2
    assert all(name.startswith("input") for name in threads), threads
