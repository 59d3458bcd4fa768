"""``python -m batchexec submit``: against a real server process, and in-process."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from aiohttp.typedefs import Handler

from batchexec import create_app
from batchexec.api import EXECUTE_BATCH, RESULTS, download_path, events_path
from batchexec.cli import main
from batchexec.cli.inputfile import Source, read_source
from batchexec.cli.run import run_batch
from batchexec.cli.submit import executions_of, resolve_key, submit_batch
from batchexec.config import DEV_API_KEY
from batchexec.inputs import parse_jsonl
from batchexec.runtime import load_catalog, provider_classes
from batchexec.web.keys import SETTINGS
from tests.fakes import GatedProvider
from tests.helpers import (
    API_KEY,
    AUTH,
    PROCESS_TIMEOUT_S,
    cli_process,
    column,
    free_port,
    gated,
    run_cli,
    sheet_rows,
    write_csv,
)


def test_submit_wait_downloads_the_workbook_the_server_holds(tmp_path):
    write_csv(
        tmp_path / "prompts.csv",
        ["prompt", "model", "note"],
        [[f"row {n}", "slow-echo", f"n{n}"] for n in range(6)] + [["then ${output.1}", "", "x"]],
    )
    port = free_port()
    env = {
        "PUBLIC_DIR": str(tmp_path / "public"),
        "DEFAULT_MAX_THREADS": "6",
        "ASSISTANTS_DEFAULT_MODEL_ID_OR_NAME": "echo",
        # The last row, "then row 0" once filled in, is too long to send.
        "MAX_SENT_PROMPT_LENGTH": "8",
    }
    (tmp_path / "out").mkdir()
    with cli_process("serve", "--port", str(port), cwd=tmp_path, env=env) as server:
        try:
            assert server.stderr is not None
            assert "listening" in server.stderr.readline()
            args = ["--url", f"http://127.0.0.1:{port}/", "--wait", "-o", "out/got.xlsx"]
            args += ["--progress-every", "0.1"]
            result = run_cli(
                "submit",
                "prompts.csv",
                *args,
                cwd=tmp_path,
                # The server's default model runs the last row, not submit's.
                env={"ASSISTANTS_DEFAULT_MODEL_ID_OR_NAME": "ignored-by-submit"},
            )
        finally:
            server.terminate()
            server.wait(timeout=PROCESS_TIMEOUT_S)
    assert result.returncode == 1, result.stderr  # the last row failed
    invocation_id = result.stdout.strip()
    held = tmp_path / "public" / "batch_execution_results" / f"batch_execution_{invocation_id}.xlsx"
    assert (tmp_path / "out" / "got.xlsx").read_bytes() == held.read_bytes()
    assert "progress: " in result.stderr
    assert "rows: 7 (6 succeeded, 1 failed, 0 skipped, 0 cancelled)" in result.stderr
    assert "line 8 (failed): Not sent: with ${output.n} filled in the prompt is 10" in result.stderr
    assert "workbook: out/got.xlsx" in result.stderr


def recording(paths: list[str], block_events: int | None = None) -> Any:
    """A middleware that records each request's path, and can answer the events route with
    ``block_events`` as a server without that route would."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        paths.append(request.path)
        if block_events and "/events/" in request.path:
            raise (
                web.HTTPNotFound()
                if block_events == 404
                else web.HTTPMethodNotAllowed("GET", ["POST"])
            )
        return await handler(request)

    return middleware


@pytest.fixture
def make_server(aiohttp_client, make_settings):
    """The real app, recording request paths, with the gated test provider."""

    async def make(block_events: int | None = None, **overrides: Any):
        paths: list[str] = []
        app = create_app(make_settings(**overrides), extra_providers=(GatedProvider,))
        app.middlewares.append(recording(paths, block_events))
        client = await aiohttp_client(app)
        return client, str(client.make_url("")).rstrip("/"), paths

    return make


async def eventually(condition: Callable[[], bool], timeout_s: float = 10) -> None:
    """Wait for ``condition``, which needs real time to pass (polls are spaced in seconds)."""
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.005)


def source_of(path: Path) -> Source:
    return read_source(str(path), max_rows=None)


async def follow(source: Source, url: str, output: Path | None, **kwargs: Any):
    stream, out = io.StringIO(), io.StringIO()
    options: dict[str, Any] = {"key": API_KEY, "wait": True, "every_s": 0.01, "poll_s": 0.01}
    options.update(kwargs)
    code = await submit_batch(source, url=url, output=output, stream=stream, out=out, **options)
    return code, out.getvalue().strip(), stream.getvalue()


def held_file(client: TestClient[Any, Any], invocation_id: str) -> Path:
    path: Path = client.app[SETTINGS].results_dir / f"batch_execution_{invocation_id}.xlsx"
    return path


async def test_events_are_followed_and_the_results_route_asked_once(make_server, tmp_path):
    client, url, paths = await make_server()
    source = source_of(write_csv(tmp_path / "p.csv", ["prompt", "model"], [["a", "echo"]] * 3))
    code, invocation_id, err = await follow(source, url, tmp_path / "out.xlsx")
    assert code == 0, err
    assert paths.count(events_path(invocation_id)) == 1
    assert paths.count(RESULTS) == 1
    assert (tmp_path / "out.xlsx").read_bytes() == held_file(client, invocation_id).read_bytes()
    assert "rows: 3 (3 succeeded, 0 failed, 0 skipped, 0 cancelled)" in err


@pytest.mark.parametrize("status", [404, 405])
async def test_without_an_events_route_the_results_route_is_polled(make_server, tmp_path, status):
    client, url, paths = await make_server(block_events=status)
    rows = [["first", "gated"], ["second ${output.1}", "gated"], ["third", "echo"]]
    source = source_of(write_csv(tmp_path / "p.csv", ["prompt", "model"], rows))
    task = asyncio.ensure_future(follow(source, url, tmp_path / "out.xlsx"))
    await gated(client).wait_started(1)
    # Two polls while the gated row holds the batch: progress is being followed.
    await eventually(lambda: paths.count(RESULTS) >= 2)
    gated(client).open()
    code, invocation_id, err = await task
    assert code == 0, err
    assert paths.count(events_path(invocation_id)) == 1
    assert (tmp_path / "out.xlsx").read_bytes() == held_file(client, invocation_id).read_bytes()
    assert "progress: 1/3 done" in err


async def test_without_wait_only_the_id_is_printed(make_server, tmp_path):
    _, url, paths = await make_server()
    source = source_of(write_csv(tmp_path / "p.csv", ["prompt", "model"], [["a", "echo"]]))
    code, invocation_id, err = await follow(source, url, None, wait=False)
    assert code == 0
    assert err == ""
    assert paths == [EXECUTE_BATCH]
    assert len(invocation_id) == 36


async def test_refused_rows_are_named_by_their_line(make_server, tmp_path):
    _, url, _ = await make_server()
    rows = [["ok", "echo"], ["multi\nline", "echo"], ["bad", "nope"], ["", "echo"]]
    source = source_of(write_csv(tmp_path / "p.csv", ["prompt", "model"], rows))
    code, out, err = await follow(source, url, tmp_path / "out.xlsx")
    assert code == 2
    assert out == ""
    lines = err.splitlines()
    assert lines[0] == (
        "batchexec: the server found problems with the batch (HTTP 422): 2 executions are invalid."
    )
    assert lines[1].startswith("  line 5: model: Unknown model 'nope'. Known models: ")
    assert lines[2] == "  line 6: prompt: must not be empty"
    assert not (tmp_path / "out.xlsx").exists()


async def test_a_model_the_server_cannot_call_is_exit_2_said_once(make_server, tmp_path):
    _, url, paths = await make_server()
    rows = [["ok", "echo"], ["no keys", "Granite 13B V2.1"], ["again", "Granite 13B V2.1"]]
    source = source_of(write_csv(tmp_path / "p.csv", ["prompt", "model"], rows))
    code, out, err = await follow(source, url, tmp_path / "out.xlsx")
    assert (code, out) == (2, "")
    assert err == (
        "batchexec: the server found problems with the batch (HTTP 422): Executions 2-3 use "
        "'Granite 13B V2.1', which cannot be called as configured: watsonx.ai is not "
        "configured: set WATSONX_URL, WATSONX_APIKEY, WATSONX_PROJECT_ID.\n"
    )
    assert paths == [EXECUTE_BATCH]


def test_submit_refuses_an_output_before_sending_anything(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_csv(tmp_path / "p.csv", ["prompt"], [["a"]])
    # Nothing listens at the URL: the refusal comes first.
    args = ["submit", "p.csv", "--url", f"http://127.0.0.1:{free_port()}", "-o", "out.csv"]
    assert main(args) == 2
    assert capsys.readouterr().err == (
        "batchexec: -o out.csv: -o writes an XLSX workbook; give a file name ending in .xlsx.\n"
    )


async def test_a_wrong_key_is_exit_2_with_a_hint(make_server, tmp_path):
    _, url, _ = await make_server()
    source = source_of(write_csv(tmp_path / "p.csv", ["prompt"], [["a"]]))
    code, _, err = await follow(source, url, None, key="wrong")
    assert code == 2
    assert err == (
        "batchexec: the server did not accept the API key (HTTP 401): "
        "Missing or invalid Integrations-API-Key header.\n"
        "  pass --key, or set INTEGRATIONS_API_KEY\n"
    )


@pytest.fixture
async def fake_server(aiohttp_server):
    """A server scripted per route; the workbook route answers ``b"workbook"``."""
    routes: dict[str, Any] = {}

    async def dispatch(request: web.Request) -> web.StreamResponse:
        for prefix, handler in routes.items():
            if request.path.startswith(prefix):
                response: web.StreamResponse = await handler(request)
                return response
        return web.json_response({"detail": "Not Found"}, status=404)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", dispatch)
    server = await aiohttp_server(app)
    return routes, str(server.make_url("")).rstrip("/")


def started(request: web.Request) -> web.Response:
    return web.json_response({"status": "success", "invocationId": "abc", "response": []})


async def test_a_busy_server_is_exit_1_with_its_retry_after(fake_server, tmp_path):
    routes, url = fake_server

    async def busy(request: web.Request) -> web.Response:
        detail = {"detail": "Too many batches are queued; try again later."}
        return web.json_response(detail, status=429, headers={"Retry-After": "5"})

    routes[EXECUTE_BATCH] = busy
    code, _, err = await follow(
        source_of(write_csv(tmp_path / "p.csv", ["prompt"], [["a"]])), url, None
    )
    assert code == 1
    assert "the server is busy (HTTP 429): Too many batches are queued" in err
    assert "try again in 5 s" in err


async def test_an_event_stream_that_breaks_off_falls_back_to_polling(fake_server, tmp_path):
    routes, url = fake_server
    polls: list[int] = []

    async def execute(request: web.Request) -> web.Response:
        return started(request)

    async def events(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        progress = {"total": 1, "succeeded": 0, "failed": 0, "skipped": 0, "cancelled": 0}
        await response.write(
            b": comment\n\nevent: progress\ndata: " + json.dumps(progress).encode()
        )
        await response.write(b'\n\nevent: execution\ndata: {"ind')
        assert request.transport is not None
        request.transport.close()
        return response

    async def results(request: web.Request) -> web.Response:
        polls.append(1)
        counts = {"total": 1, "succeeded": 1, "failed": 0, "skipped": 0, "cancelled": 0}
        return web.json_response(
            {
                "status": "completed",
                "message": "Execution completed successfully.",
                "xlsx_url": "http://elsewhere.invalid" + download_path("b%20x.xlsx"),
                "progress": {**counts, "running": 0, "pending": 0},
                "usage": {"prompt_tokens": 4, "completion_tokens": 6},
                "executions": [],
            }
        )

    downloads: list[str] = []

    async def download(request: web.Request) -> web.Response:
        downloads.append(request.path)
        return web.Response(body=b"workbook")

    routes.update(
        {
            EXECUTE_BATCH: execute,
            events_path(""): events,
            RESULTS: results,
            download_path(""): download,
        }
    )
    source = source_of(write_csv(tmp_path / "p.csv", ["prompt"], [["a"]]))
    code, out, err = await follow(source, url, tmp_path / "out.xlsx")
    assert code == 0, err
    assert out == "abc"
    assert polls == [1]
    # The workbook is fetched from --url, by the name the server gave it.
    assert downloads == [download_path("b x.xlsx")]
    assert (tmp_path / "out.xlsx").read_bytes() == b"workbook"
    assert "tokens: 4 prompt + 6 completion" in err


async def test_an_unreachable_server_is_exit_1(tmp_path):
    source = source_of(write_csv(tmp_path / "p.csv", ["prompt"], [["a"]]))
    code, _, err = await follow(source, f"http://127.0.0.1:{free_port()}", None)
    assert code == 1
    assert err.startswith("batchexec: no usable answer from http://127.0.0.1:")


def test_rows_become_execute_batch_executions():
    rows = parse_jsonl(
        '{"prompt": "a", "model": "echo", "n": 1}\n{"prompt": "b", "assistant": "x"}\n'
    )
    assert executions_of(rows) == [
        {"prompt": "a", "model": "echo", "n": 1},  # a number goes as a number
        {"prompt": "b", "assistant": "x"},
    ]


@pytest.mark.parametrize(
    ("given", "environ", "dotenv", "expected"),
    [
        ("mine", {"INTEGRATIONS_API_KEY": "env"}, {}, "mine"),
        (None, {"INTEGRATIONS_API_KEY": " env ", "INTEGRATIONS_API_KEYS": "a,b"}, {}, "env"),
        (None, {"INTEGRATIONS_API_KEYS": " , first ,second"}, {}, "first"),
        (None, {}, {"INTEGRATIONS_API_KEYS": "from-dotenv"}, "from-dotenv"),
        (
            None,
            {"INTEGRATIONS_API_KEYS": "env-wins"},
            {"INTEGRATIONS_API_KEY": "dotenv"},
            "env-wins",
        ),
        (None, {}, {}, DEV_API_KEY),
    ],
)
def test_the_key_comes_from_the_option_then_the_environment(given, environ, dotenv, expected):
    assert resolve_key(given, environ, dotenv) == expected


def test_a_bad_url_is_exit_2(tmp_path, capsys):
    write_csv(tmp_path / "p.csv", ["prompt"], [["a"]])
    assert main(["submit", "p.csv", "--url", "127.0.0.1:8080"]) == 2
    assert "--url must be an http:// or https:// URL" in capsys.readouterr().err


def test_unreadable_rows_are_exit_2_before_anything_is_sent(tmp_path, capsys):
    (tmp_path / "b.jsonl").write_text('{"prompt": "a"}\n{"prompt": 1}\n')
    # Nothing listens there: reaching out would be exit 1, not 2.
    assert main(["submit", "b.jsonl", "--url", f"http://127.0.0.1:{free_port()}"]) == 2
    assert "  line 2: prompt: Input should be a valid string" in capsys.readouterr().err


async def test_submit_and_run_write_the_inputs_columns_in_its_order(
    make_server, make_settings, tmp_path
):
    _, url, _ = await make_server(default_model="echo")
    rows = [["7", "Name a colour", "echo", "first", ""], ["8", "Why ${output.1}?", "", "", ""]]
    prompts = write_csv(tmp_path / "p.csv", ["id", "prompt", "model", "notes", "assistant"], rows)
    code, _, err = await follow(source_of(prompts), url, tmp_path / "submitted.xlsx")
    assert code == 0, err
    settings = make_settings(default_model="echo")
    code = await run_batch(
        source_of(prompts),
        settings,
        load_catalog(settings, provider_classes([GatedProvider])),
        output=tmp_path / "run.xlsx",
        stream=io.StringIO(),
        extra_providers=[GatedProvider],
    )
    assert code == 0
    submitted, ran = sheet_rows(tmp_path / "submitted.xlsx"), sheet_rows(tmp_path / "run.xlsx")
    assert submitted[0] == ran[0]
    assert submitted[0][:5] == ["id", "prompt", "model", "notes", "assistant"]
    latency = ran[0].index("latency_ms")
    assert [row[:latency] for row in submitted] == [row[:latency] for row in ran]


async def test_a_file_without_a_model_column_has_none_through_submit_either(make_server, tmp_path):
    client, url, _ = await make_server(default_model="echo")
    prompts = write_csv(tmp_path / "p.csv", ["prompt", "id"], [["hi", "1"]])
    code, invocation_id, err = await follow(source_of(prompts), url, tmp_path / "out.xlsx")
    assert code == 0, err
    assert sheet_rows(tmp_path / "out.xlsx")[0][:4] == ["prompt", "id", "result", "status"]
    body = await (
        await client.post(RESULTS, json={"invocation_id": invocation_id}, headers=AUTH)
    ).json()
    assert body["csv_content"] == "prompt,id,result\nhi,1,hi\n"


SCHEMA = {"type": "object", "properties": {"tone": {"type": "string"}}, "required": ["tone"]}


async def test_submit_sends_models_and_the_schema_as_execute_batch_fields(fake_server, tmp_path):
    routes, url = fake_server
    bodies: list[dict[str, Any]] = []

    async def execute(request: web.Request) -> web.Response:
        bodies.append(await request.json())
        return started(request)

    routes[EXECUTE_BATCH] = execute
    (tmp_path / "tone.json").write_text(json.dumps(SCHEMA))
    write_csv(tmp_path / "p.csv", ["id", "prompt"], [["1", "Hi {{id}}"]])
    args = ["submit", "p.csv", "--url", url, "--models", "m-a,m-b", "--schema", "tone.json"]
    assert await asyncio.to_thread(main, args) == 0
    assert bodies == [
        {
            "executions": [{"prompt": "Hi {{id}}", "id": "1"}],
            "columns": ["id", "prompt"],
            "models": ["m-a", "m-b"],
            "response_schema": SCHEMA,
        }
    ]
    # Without the options, the body is as it always was.
    bodies.clear()
    assert await asyncio.to_thread(main, ["submit", "p.csv", "--url", url]) == 0
    assert bodies == [
        {"executions": [{"prompt": "Hi {{id}}", "id": "1"}], "columns": ["id", "prompt"]}
    ]


async def test_submit_models_side_by_side_counts_every_row_and_model(make_server, tmp_path, capsys):
    _, url, _ = await make_server()
    write_csv(tmp_path / "p.csv", ["prompt"], [["one"], ["two ${output.1}"]])
    args = ["submit", "p.csv", "--url", url, "-o", "out.xlsx", "--models", "echo,slow-echo"]
    args += ["--key", API_KEY, "--progress-every", "0.05", "--poll-every", "0.05"]
    code = await asyncio.to_thread(main, args)
    err = capsys.readouterr().err
    assert code == 0, err
    assert "progress: 0/4 done" in err
    assert "rows: 2 on 2 models, 4 executions (4 succeeded, 0 failed" in err
    sheet = sheet_rows(tmp_path / "out.xlsx")
    assert column(sheet, "result [slow-echo]") == ["one", "two one"]
    assert column(sheet, "status [echo]") == ["succeeded"] * 2


async def test_submit_models_the_server_does_not_know_are_said_once(make_server, tmp_path, capsys):
    _, url, paths = await make_server()
    write_csv(tmp_path / "p.csv", ["prompt"], [["one"]])
    args = ["submit", "p.csv", "--url", url, "--key", API_KEY, "--models", "echo,gpt-9"]
    assert await asyncio.to_thread(main, args) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith(
        "batchexec: the server found problems with the batch (HTTP 422): "
        "models: Unknown model 'gpt-9'."
    )
    assert paths == [EXECUTE_BATCH]
