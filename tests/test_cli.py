"""``python -m batchexec`` as a user runs it: a real process."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import openpyxl
import pytest

from batchexec.cli import main

START_TIMEOUT_S = 30


def run(
    *args: str, env: dict[str, str] | None = None, cwd: Path
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "batchexec", *args],
        env={**os.environ, **(env or {})},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT_S,
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
    result = run(env={name: value}, cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"batchexec: {name}: ")


def test_bad_setting_in_dotenv_is_named_too(tmp_path):
    (tmp_path / ".env").write_text("MAX_CONCURRENT_BATCHES=-3\n")
    result = run(cwd=tmp_path)
    assert result.returncode == 2
    assert "MAX_CONCURRENT_BATCHES" in result.stderr


def test_dev_key_on_a_public_host_is_refused(tmp_path):
    result = run("serve", "--host", "0.0.0.0", cwd=tmp_path)
    assert result.returncode == 2
    assert "INTEGRATIONS_API_KEYS" in result.stderr


def test_help_lists_the_serve_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "serve" in capsys.readouterr().out


@contextlib.contextmanager
def server(args: list[str], env: dict[str, str], cwd: Path) -> Iterator[subprocess.Popen[str]]:
    """A ``python -m batchexec`` process, killed if the test fails before it exits."""
    with subprocess.Popen(
        [sys.executable, "-m", "batchexec", *args],
        env={**os.environ, **env},
        cwd=cwd,
        stderr=subprocess.PIPE,
        text=True,
    ) as process:
        try:
            yield process
        finally:
            if process.poll() is None:
                process.kill()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def test_serve_answers_and_stops_on_sigint(tmp_path):
    port = free_port()
    with server(
        ["serve", "--port", str(port)], {"PUBLIC_DIR": str(tmp_path / "public")}, tmp_path
    ) as process:
        assert process.stderr is not None
        first = process.stderr.readline()
        assert f"listening on http://127.0.0.1:{port}" in first
        assert "models in the catalog" in first
        assert "development API key" in process.stderr.readline()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as response:
            assert json.load(response) == {"status": "ok"}
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=START_TIMEOUT_S) == 0
        rest = process.stderr.read()
        assert "Traceback" not in rest


def post_json(url: str, body: dict[str, object]) -> dict[str, object]:
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"Integrations-API-Key": "dev-only-token", "Content-Type": "application/json"},
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
    }
    base = f"http://127.0.0.1:{port}"
    with server(["serve", "--port", str(port)], env, tmp_path) as process:
        assert process.stderr is not None
        assert "listening" in process.stderr.readline()
        started = post_json(
            f"{base}/experience/batch_execution/execute_batch/invoke",
            {"executions": [{"prompt": f"row {n}", "model": "one-second"} for n in range(6)]},
        )
        invocation_id = str(started["invocationId"])
        body = post_json(f"{base}/system/batch_execution/results", {"invocation_id": invocation_id})
        assert body["status"] in ("queued", "processing")
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=START_TIMEOUT_S) == 0
        log = process.stderr.read()
    assert "Traceback" not in log
    assert "Task was destroyed" not in log
    workbook = openpyxl.load_workbook(
        tmp_path / "public" / "batch_execution_results" / f"batch_execution_{invocation_id}.xlsx"
    )
    statuses = [row[3] for row in workbook["Results"].iter_rows(min_row=2, values_only=True)]
    assert statuses == ["succeeded", "succeeded"] + ["cancelled"] * 4
