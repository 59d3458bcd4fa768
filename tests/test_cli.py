"""``python -m batchexec`` as a user runs it: a real process."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

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


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def test_serve_answers_and_stops_on_sigint(tmp_path):
    port = free_port()
    with subprocess.Popen(
        [sys.executable, "-m", "batchexec", "serve", "--port", str(port)],
        env={**os.environ, "PUBLIC_DIR": str(tmp_path / "public")},
        cwd=tmp_path,
        stderr=subprocess.PIPE,
        text=True,
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
