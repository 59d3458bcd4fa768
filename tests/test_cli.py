"""``python -m batchexec`` as a user runs it: a real process."""

from __future__ import annotations

import asyncio
import io
import json
import signal
import subprocess
import sys
import urllib.request
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from batchexec.api import EXECUTE_BATCH, HEALTH, RESULTS
from batchexec.cli import main
from batchexec.cli.progress import LIVE_PERIOD_S, ProgressDisplay, Summary, seconds_text, showing
from tests.helpers import (
    AUTH,
    PROCESS_TIMEOUT_S,
    cli_process,
    free_port,
    run_cli,
    workbook_statuses,
    write_csv,
)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("DEFAULT_MAX_THREADS", "abc"),
        ("DEFAULT_MAX_THREADS", "0"),
        ("EXECUTION_TIMEOUT", "soon"),
        ("PORT", "99999"),
    ],
)
def test_bad_setting_stops_start_up_naming_it(tmp_path, name, value):
    result = run_cli(env={name: value}, cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"batchexec: {name}: ")


def test_bad_setting_in_dotenv_is_named_too(tmp_path):
    (tmp_path / ".env").write_text("MAX_CONCURRENT_BATCHES=-3\n")
    result = run_cli(cwd=tmp_path)
    assert result.returncode == 2
    assert "MAX_CONCURRENT_BATCHES" in result.stderr


def test_dev_key_on_a_public_host_is_refused(tmp_path):
    result = run_cli("serve", "--host", "0.0.0.0", cwd=tmp_path)
    assert result.returncode == 2
    assert "INTEGRATIONS_API_KEYS" in result.stderr


def test_help_lists_the_serve_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "serve" in capsys.readouterr().out


def test_serve_answers_and_stops_on_sigint(tmp_path):
    port = free_port()
    with cli_process(
        "serve", "--port", str(port), cwd=tmp_path, env={"PUBLIC_DIR": str(tmp_path / "public")}
    ) as process:
        assert process.stderr is not None
        first = process.stderr.readline()
        assert f"listening on http://127.0.0.1:{port}" in first
        assert "models in the catalog" in first
        assert "development API key" in process.stderr.readline()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{HEALTH}", timeout=10) as response:
            assert json.load(response) == {"status": "ok"}
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=PROCESS_TIMEOUT_S) == 0
        rest = process.stderr.read()
        assert "Traceback" not in rest


def post_json(url: str, body: dict[str, object]) -> dict[str, object]:
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={**AUTH, "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        answer: dict[str, object] = json.load(response)
        return answer


def test_sigterm_lets_running_rows_finish_and_writes_the_rest_cancelled(tmp_path):
    (tmp_path / "models.toml").write_text(
        '[models."one-second"]\nprovider = "echo"\nlatency_s = 1\n'
    )
    port = free_port()
    env = {
        "PUBLIC_DIR": str(tmp_path / "public"),
        "BATCHEXEC_MODELS": "models.toml",
        "DEFAULT_MAX_THREADS": "2",
        "SHUTDOWN_GRACE_S": "20",
        # What a store that keeps nothing does; a durable one leaves the rest to resume.
        "DATABASE_URL": "memory://",
    }
    base = f"http://127.0.0.1:{port}"
    with cli_process("serve", "--port", str(port), cwd=tmp_path, env=env) as process:
        assert process.stderr is not None
        assert "listening" in process.stderr.readline()
        started = post_json(
            base + EXECUTE_BATCH,
            {"executions": [{"prompt": f"row {n}", "model": "one-second"} for n in range(6)]},
        )
        invocation_id = str(started["invocationId"])
        body = post_json(base + RESULTS, {"invocation_id": invocation_id})
        assert body["status"] in ("queued", "processing")
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=PROCESS_TIMEOUT_S) == 0
        log = process.stderr.read()
    assert "Traceback" not in log
    assert "Task was destroyed" not in log
    statuses = workbook_statuses(tmp_path, invocation_id)
    assert statuses == ["succeeded", "succeeded"] + ["cancelled"] * 4


@pytest.mark.parametrize("command", ["serve", "run", "submit", "validate", "models"])
def test_every_command_has_help_with_examples(capsys, command):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: python -m batchexec {command}")
    assert "example" in out
    assert f"python -m batchexec {command}" in out.split("example", 1)[1]


def test_top_level_help_lists_every_command(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for command in ("serve", "run", "submit", "validate", "models"):
        assert f"    {command} " in out


def test_models_prints_the_catalog_as_an_aligned_table(tmp_path, capsys):
    (tmp_path / "extra.toml").write_text(
        '[models."local llama"]\nprovider = "openai"\nbase_url = "http://127.0.0.1:9/v1"\n'
        'model_id = "llama3.1:8b"\naliases = ["ll", "llama-local"]\n'
        '[assistants."Summarizer"]\nmodel = "echo"\n'
    )
    assert main(["models", "--models", "extra.toml", "--model", "LL"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["NAME", "PROVIDER", "MODEL", "ID", "CONFIGURED", "ALIASES"]
    rows = {line.split("  ")[0].strip(): line for line in lines[1:9]}
    assert rows["echo"].split() == ["echo", "echo", "echo", "yes"]
    assert rows["local llama *"].split() == [
        "local",
        "llama",
        "*",
        "openai",
        "llama3.1:8b",
        "yes",
        "ll,",
        "llama-local",
    ]
    assert rows["Llama3.1 70b Instruct"].split()[-3:] == [
        "meta-llama/llama-3-1-70b-instruct",
        "no",
        "llama-3-1-70b-instruct",
    ]
    provider_column = lines[0].index("PROVIDER")
    assert all(line[provider_column - 2 : provider_column] == "  " for line in lines[1:9])
    assert all(line == line.rstrip() for line in lines)
    assert lines[9] == ""
    assert lines[10].split() == ["ASSISTANT", "MODEL", "CONFIGURED", "ALIASES"]
    assert lines[11].split() == ["Summarizer", "echo", "yes"]
    assert lines[-1] == "* default model (LL)"


def test_validate_lists_every_problem_with_its_place(tmp_path, capsys):
    (tmp_path / "p.csv").write_text(
        'prompt,model,assistant\nok,echo,\n"",echo,\nx ${output.7},echo,\ny,nope,\nz,echo,Helper\n'
    )
    assert main(["validate", "p.csv"]) == 2
    assert capsys.readouterr().out.splitlines() == [
        "batchexec: p.csv: 4 executions are invalid.",
        "  line 3: prompt: must not be empty",
        "  line 4: prompt: ${output.7} must name an earlier execution (1 to 2)",
        "  line 5: model: Unknown model 'nope'. Known models: echo, Granite 13B V2.1, "
        "Granite 3 8B Instruct, Llama3 8B Instruct, Llama3.1 70b Instruct, "
        "Llama3.3 70b Instruct, slow-echo",
        "  line 6: assistant: set either model or assistant, not both",
    ]


def test_validate_of_a_valid_file_says_what_it_holds(tmp_path, capsys):
    (tmp_path / "b.jsonl").write_text('{"prompt": "a", "model": "echo"}\n{"prompt": "b"}\n')
    assert main(["validate", "b.jsonl"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == (
        "batchexec: warning: line 2 uses 'Llama3.1 70b Instruct', which cannot be called as "
        "configured: watsonx.ai is not configured: set WATSONX_URL, WATSONX_APIKEY, "
        "WATSONX_PROJECT_ID."
    )
    assert out[1] == (
        "b.jsonl: 2 rows are valid (JSONL; columns: prompt, model; "
        "uses: echo (1), Llama3.1 70b Instruct (1))"
    )


def test_validate_estimate_prints_each_models_tokens_and_cost(tmp_path, capsys):
    (tmp_path / "priced.toml").write_text(
        'currency = "EUR"\n'
        '[models."cheap"]\nprovider = "echo"\ninput_per_mtok = 1.0\noutput_per_mtok = 2.0\n'
    )
    (tmp_path / "p.csv").write_text("prompt,model\nSay hello,cheap\n${output.1} again,echo\n")
    assert main(["validate", "--estimate", "p.csv", "--catalog", "priced.toml"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1:5] == [
        "estimate:",
        "  cheap: 1 execution; input tokens 9; output tokens at most 3; "
        "cost EUR 0.0000090 to 0.000015",
        "  echo: 1 execution; input tokens 8 to 11 (1 execution taking an earlier output); "
        "output tokens at most 5; cost unknown (no price in the catalog)",
        "  total: 2 executions; input tokens 17 to 20 (1 execution taking an earlier output); "
        "output tokens at most 8; cost unknown (no price for echo)",
    ]
    assert out[5].startswith("  (tokens estimated offline: 4 bytes of UTF-8 a token")


def test_validate_of_an_unreadable_file_is_exit_2(tmp_path, capsys):
    (tmp_path / "p.xlsx").write_bytes(b"not a workbook")
    assert main(["validate", "p.xlsx"]) == 2
    assert capsys.readouterr().out.startswith("batchexec: p.xlsx: The XLSX file cannot be read:")


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def counts(**values: int) -> dict[str, int]:
    base = {"total": 20, "succeeded": 0, "failed": 0, "skipped": 0, "cancelled": 0}
    base.update(values)
    ended = sum(base[name] for name in ("succeeded", "failed", "skipped", "cancelled"))
    return {**base, "running": 0, "pending": base["total"] - ended}


def test_the_live_bar_redraws_in_place():
    clock, stream = FakeClock(), Terminal()
    display = ProgressDisplay(stream, total=20, clock=clock)
    assert display.live
    assert display.period_s == LIVE_PERIOD_S
    display.draw()
    clock.now += 2
    display.update(counts(succeeded=9, failed=1))
    display.draw()
    clock.now += 1
    display.update(counts(succeeded=19, failed=1, skipped=0))
    display.close()
    frames = stream.getvalue().split("\r")[1:]
    assert frames[0].startswith(
        "[------------------------]   0/20    0%  failed 0  0.0/s  ETA --:--"
    )
    # A frame shorter than the one before is padded with spaces to cover it.
    assert frames[1] == "[############------------]  10/20   50%  failed 1  5.0/s  ETA 0:02 "
    assert frames[2] == "[########################]  20/20  100%  failed 1  6.7/s  ETA 0:00\n"


def test_a_shorter_frame_covers_the_longer_one_before_it():
    clock, stream = FakeClock(), Terminal()
    display = ProgressDisplay(stream, total=20, clock=clock)
    display.update(counts(succeeded=2, failed=1, skipped=3, cancelled=4))
    display.draw()
    longer = len(stream.getvalue()) - 1
    display.update(counts(succeeded=2))
    display.draw()
    assert len(stream.getvalue().split("\r")[2]) == longer


def test_progress_lines_for_a_log():
    clock, stream = FakeClock(), io.StringIO()
    display = ProgressDisplay(stream, total=20, every_s=3, clock=clock)
    assert not display.live
    assert display.period_s == 3
    clock.now += 4
    display.update(counts(succeeded=6, skipped=2))
    display.draw()
    display.close()
    assert stream.getvalue() == ("progress: 8/20 done, 0 failed, 2 skipped, 2.0 rows/s, ETA 0:06\n")


async def test_showing_draws_every_period_and_closes():
    stream = Terminal()
    display = ProgressDisplay(stream, total=1)
    display.period_s = 0.01
    async with showing(display):
        await asyncio.sleep(0.055)
        display.update(counts(total=1, succeeded=1))
    frames = stream.getvalue().split("\r")[1:]
    assert 3 <= len(frames) <= 10
    assert frames[-1].startswith("[########################]  1/1  100%")
    assert stream.getvalue().endswith("\n")


@pytest.mark.parametrize(
    ("seconds", "text"), [(0.421, "0.42 s"), (12.34, "12.3 s"), (75, "1:15"), (3725, "1:02:05")]
)
def test_durations_read_naturally(seconds, text):
    assert seconds_text(seconds) == text


def test_the_summary_names_counts_time_tokens_problems_and_outputs():
    summary = Summary(
        status="completed",
        message="Execution completed with 1 error.",
        counts=counts(total=3, succeeded=2, failed=1),
        elapsed_s=1.5,
        prompt_tokens=10,
        completion_tokens=20,
        outputs=[("workbook", "out.xlsx"), ("csv", "out.csv")],
        problems=["line 3 (failed): refused"],
    )
    assert not summary.all_succeeded
    assert summary.render() == (
        "batch completed in 1.50 s: Execution completed with 1 error.\n"
        "  rows: 3 (2 succeeded, 1 failed, 0 skipped, 0 cancelled)\n"
        "  tokens: 10 prompt + 20 completion\n"
        "  the row that did not succeed:\n"
        "    line 3 (failed): refused\n"
        "  workbook: out.xlsx\n"
        "  csv: out.csv"
    )


def test_the_batchexec_script_is_installed_and_runs_the_command_line(tmp_path):
    (script,) = entry_points(group="console_scripts", name="batchexec")
    assert script.load() is main
    # Beside the interpreter, as pip installs it: .venv/bin/batchexec.
    path = Path(sys.executable).parent / "batchexec"
    write_csv(tmp_path / "p.csv", ["prompt", "model"], [["hi", "echo"]])
    result = subprocess.run(
        [str(path), "run", "p.csv", "-o", "out.xlsx"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=PROCESS_TIMEOUT_S,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out.xlsx").is_file()
    usage = subprocess.run(
        [str(path), "--help"], capture_output=True, text=True, timeout=PROCESS_TIMEOUT_S
    )
    assert usage.stdout.startswith("usage: batchexec ")
