"""``python -m batchexec run``: as a user runs it (a process), and in-process."""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import signal
import sys
from pathlib import Path
from typing import Any

import openpyxl
import pytest
from aiohttp import web

from batchexec.api import PROCESS_CSV
from batchexec.cli import main
from batchexec.cli.inputfile import read_source
from batchexec.cli.run import Interrupts, run_batch
from batchexec.errors import InputError
from batchexec.runtime import load_catalog, provider_classes
from batchexec.web.keys import SETTINGS
from tests.helpers import (
    AUTH,
    PROCESS_TIMEOUT_S,
    cli_process,
    column,
    run_cli,
    sheet_rows,
    write_csv,
)

#: What a results workbook adds after the input columns; ``model`` stays one of those.
OUTPUT_COLUMNS = [
    "result",
    "status",
    "error",
    "latency_ms",
    "attempts",
    "prompt_tokens",
    "completion_tokens",
]


def test_a_200_row_csv_runs_to_a_workbook_and_a_summary(tmp_path):
    rows = [[str(n), f"Say {n}, please", "" if n % 2 else "echo"] for n in range(200)]
    write_csv(tmp_path / "prompts.csv", ["id", "prompt", "model"], rows)
    result = run_cli("run", "prompts.csv", "-o", "out.xlsx", "--model", "echo", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    workbook = sheet_rows(tmp_path / "out.xlsx")
    assert workbook[0] == ["id", "prompt", "model", *OUTPUT_COLUMNS]
    assert len(workbook) == 201
    assert column(workbook, "result") == [f"Say {n}, please" for n in range(200)]
    assert set(column(workbook, "status")) == {"succeeded"}
    assert set(column(workbook, "model")) == {"echo"}
    assert "batch completed in" in result.stderr
    assert "rows: 200 (200 succeeded, 0 failed, 0 skipped, 0 cancelled)" in result.stderr
    assert "workbook: out.xlsx" in result.stderr
    assert result.stdout == ""
    # The engine's own copy goes to a scratch folder, not to ./public.
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out.xlsx", "prompts.csv"]


def test_a_row_naming_an_unknown_model_stops_everything_naming_its_line(tmp_path):
    rows = [["first", "echo"], ["second\nspans two lines", "echo"], ["third", "gpt-9"]]
    write_csv(tmp_path / "prompts.csv", ["prompt", "model"], rows)
    result = run_cli("run", "prompts.csv", "-o", "out.xlsx", "--csv", "out.csv", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("batchexec: prompts.csv: 1 execution is invalid.\n")
    assert "  line 5: model: Unknown model 'gpt-9'. Known models: echo," in result.stderr
    assert "progress" not in result.stderr
    assert not (tmp_path / "out.xlsx").exists()
    assert not (tmp_path / "out.csv").exists()


def test_ctrl_c_cancels_keeps_the_finished_rows_and_exits_130(tmp_path):
    (tmp_path / "slow.toml").write_text('[models."slow"]\nprovider = "echo"\nlatency_s = 0.5\n')
    write_csv(
        tmp_path / "prompts.csv", ["prompt", "model"], [[f"row {n}", "slow"] for n in range(20)]
    )
    args = ["run", "prompts.csv", "-o", "out.xlsx", "--models", "slow.toml", "--threads", "2"]
    with cli_process(*args, "--progress-every", "0.1", cwd=tmp_path) as process:
        assert process.stderr is not None
        for line in process.stderr:
            done = re.match(r"progress: (\d+)/20 done", line)
            if done and int(done[1]) >= 2:
                break
        else:
            pytest.fail("the run ended before any progress was shown")
        process.send_signal(signal.SIGINT)
        rest = process.stderr.read()
        assert process.wait(timeout=PROCESS_TIMEOUT_S) == 130
    assert "cancelling; the rows that finished are kept" in rest
    assert "batch cancelled in" in rest
    assert "Traceback" not in rest
    statuses = column(sheet_rows(tmp_path / "out.xlsx"), "status")
    succeeded = statuses.count("succeeded")
    assert 2 <= succeeded < 20
    assert statuses == ["succeeded"] * succeeded + ["cancelled"] * (20 - succeeded)
    errors = column(sheet_rows(tmp_path / "out.xlsx"), "error")
    assert errors[-1] == "Cancelled by request."


def test_json_input(tmp_path, capsys):
    document = {
        "executions": [
            {"prompt": "Name a colour.", "model": "echo", "id": 1},
            {"prompt": "Rhyme with ${output.1}", "model": "echo", "id": 2},
        ]
    }
    (tmp_path / "batch.JSON").write_text(json.dumps(document))
    assert main(["run", "batch.JSON", "-o", "out.xlsx"]) == 0
    rows = sheet_rows(tmp_path / "out.xlsx")
    assert rows[0][:3] == ["prompt", "model", "id"]
    assert column(rows, "result") == ["Name a colour.", "Rhyme with Name a colour."]
    assert column(rows, "id") == [1, 2]  # JSON numbers stay numbers
    assert "2 succeeded" in capsys.readouterr().err


def test_jsonl_input_with_a_csv_output(tmp_path):
    lines = ['{"prompt": "a", "tag": "x"}', "", '{"prompt": "b ${output.1}", "tag": "y"}']
    (tmp_path / "batch.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "out").mkdir()
    code = main(
        [
            "run",
            "batch.jsonl",
            "-o",
            "out/results.xlsx",
            "--csv",
            "out/results.csv",
            "--model",
            "echo",
        ]
    )
    assert code == 0
    assert (tmp_path / "out" / "results.csv").read_text() == (
        "prompt,model,tag,result\na,echo,x,a\nb a,echo,y,b a\n"
    )
    assert len(sheet_rows(tmp_path / "out" / "results.xlsx")) == 3
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == [
        "results.csv",
        "results.xlsx",
    ]


def test_xlsx_input_keeps_every_column(tmp_path):
    book = openpyxl.Workbook()
    sheet = book.active
    sheet.title = "Prompts"
    sheet.append(["Prompt", "Ticket", "Model", "Due"])
    sheet.append(["Summarise ticket 7", 7, "echo", None])
    sheet.append(["And 8", 8.0, None, "soon"])
    book.save(tmp_path / "prompts.xlsx")
    assert main(["run", "prompts.xlsx", "-o", "out.xlsx", "--model", "echo"]) == 0
    rows = sheet_rows(tmp_path / "out.xlsx")
    assert rows[0] == ["prompt", "Ticket", "model", "Due", *OUTPUT_COLUMNS]
    # Number cells stay numbers (8.0 is 8, as the sheet shows it).
    assert [row[:4] for row in rows[1:]] == [
        ["Summarise ticket 7", 7, "echo", None],
        ["And 8", 8, "echo", "soon"],
    ]


@pytest.mark.parametrize(
    "data",
    [
        b'{"executions": [{"prompt": "from stdin"}]}',
        b'{"prompt": "from stdin"}\n',
        b"prompt\nfrom stdin\n",
    ],
    ids=["json", "jsonl", "csv"],
)
def test_standard_input(tmp_path, monkeypatch, data):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))
    assert main(["run", "-", "-o", "out.xlsx", "--model", "echo"]) == 0
    assert column(sheet_rows(tmp_path / "out.xlsx"), "result") == ["from stdin"]


def test_standard_input_errors_name_the_line(tmp_path, monkeypatch, capsys):
    stdin = io.TextIOWrapper(io.BytesIO(b'{"prompt": "ok"}\n{"prompt": ""}\n'))
    monkeypatch.setattr(sys, "stdin", stdin)
    assert main(["run", "-", "-o", "out.xlsx", "--model", "echo"]) == 2
    assert (
        "<stdin>: 1 execution is invalid.\n  line 2: prompt: must not be empty"
        in capsys.readouterr().err
    )


def test_rows_that_fail_make_exit_code_1(tmp_path, monkeypatch, capsys):
    # The second row, with the first's answer filled in twice, is too long to send.
    write_csv(
        tmp_path / "p.csv",
        ["prompt", "model"],
        [["ten chars!", "echo"], ["${output.1}" * 2, "echo"]],
    )
    monkeypatch.setenv("MAX_SENT_PROMPT_LENGTH", "15")
    assert main(["run", "p.csv", "-o", "out.xlsx"]) == 1
    err = capsys.readouterr().err
    assert "line 3 (failed): Not sent: with ${output.n} filled in the prompt is 20" in err
    assert column(sheet_rows(tmp_path / "out.xlsx"), "status") == ["succeeded", "failed"]


def test_a_model_that_cannot_be_called_is_refused_before_anything_runs(tmp_path, capsys):
    # The default model is on watsonx.ai, and no credentials are set.
    rows = [["no keys", ""], ["fine", "echo"], ["again", ""], ["more", "Llama3.1 70b Instruct"]]
    write_csv(tmp_path / "p.csv", ["prompt", "model"], rows)
    assert main(["run", "p.csv", "-o", "out.xlsx", "--csv", "out.csv"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [
        "batchexec: p.csv: Lines 2, 4-5 use 'Llama3.1 70b Instruct', which cannot be called "
        "as configured: watsonx.ai is not configured: set WATSONX_URL, WATSONX_APIKEY, "
        "WATSONX_PROJECT_ID."
    ]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["p.csv"]  # nor a journal


def test_bad_setting_is_exit_2_naming_the_variable(tmp_path, monkeypatch, capsys):
    write_csv(tmp_path / "p.csv", ["prompt"], [["hi"]])
    monkeypatch.setenv("EXECUTION_TIMEOUT", "soon")
    assert main(["run", "p.csv", "-o", "out.xlsx"]) == 2
    assert capsys.readouterr().err.startswith("batchexec: EXECUTION_TIMEOUT: ")


def test_bad_catalog_is_exit_2(tmp_path, capsys):
    write_csv(tmp_path / "p.csv", ["prompt"], [["hi"]])
    assert main(["run", "p.csv", "-o", "out.xlsx", "--models", "missing.toml"]) == 2
    assert "BATCHEXEC_MODELS: cannot read missing.toml" in capsys.readouterr().err


def test_limits_come_from_the_settings(tmp_path, monkeypatch, capsys):
    write_csv(tmp_path / "p.csv", ["prompt"], [["x" * 20], ["ok"], ["y" * 30]])
    monkeypatch.setenv("MAX_PROMPT_LENGTH", "25")
    assert main(["run", "p.csv", "-o", "out.xlsx", "--model", "echo"]) == 2
    err = capsys.readouterr().err
    assert "  line 4: prompt: is 30 characters; the limit is 25 (set by MAX_PROMPT_LENGTH)" in err
    monkeypatch.setenv("MAX_EXECUTIONS_PER_BATCH", "2")
    assert main(["run", "p.csv", "-o", "out.xlsx", "--model", "echo"]) == 2
    assert "the limit is 2. (set by MAX_EXECUTIONS_PER_BATCH)" in capsys.readouterr().err
    assert not (tmp_path / "out.xlsx").exists()


@pytest.mark.parametrize("args", [["-o", "."], ["-o", "out.xlsx", "--csv", "."]])
def test_an_output_that_is_a_folder_is_refused_before_running(tmp_path, capsys, args):
    write_csv(tmp_path / "p.csv", ["prompt"], [["hi"]])
    assert main(["run", "p.csv", *args, "--model", "echo"]) == 2
    assert "is a folder" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["-o", "no/such/dir/out.xlsx"],
            "-o no/such/dir/out.xlsx: the folder no/such/dir does not exist; create it first.",
        ),
        (
            ["-o", "out.csv"],
            "-o out.csv: -o writes an XLSX workbook; give a file name ending in .xlsx.",
        ),
        (["-o", "out"], "-o out: -o writes an XLSX workbook; give a file name ending in .xlsx."),
        (
            ["-o", "out.xlsx", "--csv", "out.xlsx.txt"],
            "--csv out.xlsx.txt: --csv writes CSV; give a file name ending in .csv.",
        ),
        (
            ["-o", "out.xlsx", "--csv", "p.csv"],
            "--csv p.csv: that is the input file; write to another file.",
        ),
        (
            ["-o", "out.xlsx", "--journal", "gone/run.journal"],
            "--journal gone/run.journal: the folder gone does not exist; create it first.",
        ),
        (
            ["-o", "out.xlsx", "--journal", "out.xlsx"],
            "--journal out.xlsx: -o names that file too; give each its own.",
        ),
    ],
)
def test_an_output_a_user_would_not_mean_is_refused_before_anything(
    tmp_path, capsys, args, message
):
    write_csv(tmp_path / "p.csv", ["prompt"], [["hi"]])
    assert main(["run", "p.csv", *args, "--model", "echo"]) == 2
    assert capsys.readouterr().err == f"batchexec: {message}\n"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["p.csv"]  # nothing made


def test_output_names_are_matched_in_any_case_and_said_in_help(tmp_path, capsys):
    write_csv(tmp_path / "p.csv", ["prompt"], [["hi"]])
    assert main(["run", "p.csv", "-o", "OUT.XLSX", "--csv", "Out.CSV", "--model", "echo"]) == 0
    assert {"OUT.XLSX", "Out.CSV"} <= {path.name for path in tmp_path.iterdir()}
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "a name ending in .xlsx, in a folder that exists" in text
    assert "-o must end in .xlsx and --csv in .csv" in text


def test_a_missing_input_file_is_exit_2(tmp_path, capsys):
    assert main(["run", "nope.csv", "-o", "out.xlsx"]) == 2
    assert (
        capsys.readouterr().err
        == "batchexec: nope.csv: cannot read it: No such file or directory.\n"
    )


@pytest.mark.parametrize("args", [["--threads", "0"], ["--timeout", "-1"], ["--threads", "two"]])
def test_bad_options_are_usage_errors(tmp_path, capsys, args):
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "p.csv", "-o", "out.xlsx", *args])
    assert exit_info.value.code == 2
    assert "error: argument" in capsys.readouterr().err


@pytest.fixture
async def upstream(aiohttp_server, tmp_path):
    """An OpenAI-compatible loopback server that records each prompt; ``fail...`` gets a 400."""
    prompts: list[str] = []

    async def chat(request: web.Request) -> web.Response:
        prompt = (await request.json())["messages"][-1]["content"]
        prompts.append(prompt)
        if prompt.startswith("fail"):
            error = {"message": "This prompt is refused.", "type": "invalid_request_error"}
            return web.json_response({"error": error}, status=400)
        answer = {"role": "assistant", "content": f"ANSWER[{prompt}]"}
        return web.json_response(
            {
                "choices": [{"index": 0, "message": answer, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 2, "completion_tokens": 3},
            }
        )

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    server = await aiohttp_server(app)
    catalog = tmp_path / "local.toml"
    catalog.write_text(
        f'[models."local"]\nprovider = "openai"\nbase_url = "{server.make_url("/v1")}"\n'
        'model_id = "m"\n'
    )
    return catalog, prompts


async def run_here(
    make_settings, catalog: Path | None, source: Path, output: Path, **overrides: Any
):
    settings = make_settings(models_path=catalog, **overrides)
    stream = io.StringIO()
    code = await run_batch(
        read_source(str(source), max_rows=settings.max_executions_per_batch),
        settings,
        load_catalog(settings, provider_classes()),
        output=output,
        stream=stream,
        every_s=0.05,
    )
    return code, stream.getvalue()


async def test_invalid_input_calls_no_model(upstream, make_settings, tmp_path):
    catalog, prompts = upstream
    source = write_csv(tmp_path / "p.csv", ["prompt", "model"], [["a", "local"], ["b", "nope"]])
    with pytest.raises(InputError) as caught:
        await run_here(make_settings, catalog, source, tmp_path / "out.xlsx")
    assert caught.value.errors[0].index == 2
    assert prompts == []
    assert not (tmp_path / "out.xlsx").exists()


async def test_a_provider_refusal_fails_its_row_and_exits_1(upstream, make_settings, tmp_path):
    catalog, prompts = upstream
    source = write_csv(
        tmp_path / "p.csv", ["prompt", "model"], [["hello", "local"], ["fail this", "local"]]
    )
    code, err = await run_here(make_settings, catalog, source, tmp_path / "out.xlsx")
    assert code == 1
    assert sorted(prompts) == ["fail this", "hello"]
    assert "tokens: 2 prompt + 3 completion" in err
    assert "line 3 (failed): OpenAI-compatible server: This prompt is refused. (HTTP 400)" in err
    rows = sheet_rows(tmp_path / "out.xlsx")
    assert column(rows, "result") == [
        "ANSWER[hello]",
        "Error: OpenAI-compatible server: This prompt is refused. (HTTP 400)",
    ]


async def test_the_process_csv_template_filled_in_by_hand_round_trips(
    make_client, make_settings, tmp_path
):
    client = await make_client()
    content = 'id,prompt,model,Topic\n1,"Name a colour, please",echo,art\n'
    response = await client.post(PROCESS_CSV, json={"csv_content": content}, headers=AUTH)
    assert response.status == 200
    name = f"batch_execution_{(await response.json())['invocationId']}.xlsx"
    book = openpyxl.load_workbook(client.app[SETTINGS].results_dir / name)
    sheet = book["Results"]
    assert [cell.value for cell in sheet[1]] == ["id", "prompt", "model", "Topic", "result"]
    sheet.append([2, "Describe ${output.1}", None, "design", None])
    sheet.append(["3", "Rhyme with ${output.2}", "echo", None, "ignored: an output column"])
    filled = tmp_path / "filled.xlsx"
    book.save(filled)

    code, err = await run_here(
        make_settings, None, filled, tmp_path / "out.xlsx", default_model="echo"
    )
    assert code == 0, err
    rows = sheet_rows(tmp_path / "out.xlsx")
    assert rows[0] == ["id", "prompt", "model", "Topic", *OUTPUT_COLUMNS]
    assert [row[:5] for row in rows[1:]] == [
        ["1", "Name a colour, please", "echo", "art", "Name a colour, please"],
        # A number typed by hand stays a number; the CSV's and the typed text stay text.
        [2, "Describe Name a colour, please", "echo", "design", "Describe Name a colour, please"],
        [
            "3",
            "Rhyme with Describe Name a colour, please",
            "echo",
            None,
            "Rhyme with Describe Name a colour, please",
        ],
    ]


async def test_first_ctrl_c_cancels_and_a_second_quits_at_once():
    cancelled = asyncio.Event()
    exits: list[int] = []
    stream = io.StringIO()

    async def cancel() -> None:
        cancelled.set()

    interrupts = Interrupts(cancel, stream, exit_now=exits.append)
    interrupts()
    await interrupts.settled()
    assert cancelled.is_set()
    assert exits == []
    assert "Ctrl-C again to quit at once" in stream.getvalue()
    interrupts()
    assert exits == [130]
    assert "quitting now" in stream.getvalue()


async def test_a_sigint_reaches_the_handler_while_installed():
    async def cancel() -> None:
        pass

    interrupts = Interrupts(cancel, io.StringIO(), exit_now=lambda code: None)
    loop = asyncio.get_running_loop()
    with interrupts.installed(loop):
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(1000):
            if interrupts.count:
                break
            await asyncio.sleep(0.001)
        await interrupts.settled()
    assert interrupts.count == 1
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
