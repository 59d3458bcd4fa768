"""``python -m batchexec serve`` stopping gently, and aiohttp's own errors as JSON."""

from __future__ import annotations

import json
import logging
import os
import platform
import queue
import signal
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO

import aiohttp
import pytest
from aiohttp import web

from batchexec.api import EXECUTE_BATCH, HEALTH, RESULTS, events_path
from batchexec.web.server import JSONErrorAppRunner
from tests.helpers import AUTH, PROCESS_TIMEOUT_S, cli_process, free_port, workbook_statuses

#: How many log lines a test reads while waiting for one.
MAX_LOG_LINES = 200


class LogLines:
    """A server's stderr, read line by line in a thread so a wait can be bounded."""

    def __init__(self, stream: IO[str] | None) -> None:
        assert stream is not None
        self.seen: list[str] = []
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._reader.start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            self._lines.put(line)
        self._lines.put(None)

    def wait_for(self, text: str) -> str:
        """The first line not read yet that contains ``text``."""
        for _ in range(MAX_LOG_LINES):
            line = self._lines.get(timeout=PROCESS_TIMEOUT_S)
            assert line is not None, f"the server exited without logging {text!r}"
            self.seen.append(line)
            if text in line:
                return line
        raise AssertionError(f"no {text!r} in {MAX_LOG_LINES} lines")

    def rest(self) -> str:
        """Everything logged, once the server has exited."""
        self._reader.join(timeout=PROCESS_TIMEOUT_S)
        while (line := self._lines.get_nowait()) is not None:
            self.seen.append(line)
        return "".join(self.seen)


def call(
    base: str, path: str, body: Mapping[str, object] | None = None
) -> tuple[int, dict[str, str], dict[str, object]]:
    """Status, headers and JSON body of a GET (or, with ``body``, a POST), errors included."""
    request = urllib.request.Request(
        base + path,
        data=None if body is None else json.dumps(body).encode(),
        headers={**AUTH, "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), json.load(response)
    except urllib.error.HTTPError as error:
        with error:
            return error.code, dict(error.headers), json.load(error)


def slow_model_env(tmp_path: Path, latency_s: float, grace_s: float) -> dict[str, str]:
    """Settings for a server whose model ``slow`` takes ``latency_s`` to answer."""
    (tmp_path / "models.toml").write_text(
        f'[models."slow"]\nprovider = "echo"\nlatency_s = {latency_s}\n'
    )
    return {
        "PUBLIC_DIR": str(tmp_path / "public"),
        "BATCHEXEC_MODELS": "models.toml",
        "SHUTDOWN_GRACE_S": str(grace_s),
    }


def event_names(base: str, invocation_id: str) -> Iterator[str]:
    """The names of the events the batch's stream sends, until it ends."""
    request = urllib.request.Request(base + events_path(invocation_id), headers=AUTH)
    with urllib.request.urlopen(request, timeout=10) as response:
        for raw in response:
            line = raw.decode().strip()
            if line.startswith("event:"):
                yield line.removeprefix("event:").strip()


def test_sigterm_keeps_answering_with_503_until_running_batches_end(tmp_path):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = slow_model_env(tmp_path, latency_s=3, grace_s=20)
    batch = {"executions": [{"prompt": "hi", "model": "slow"}]}
    with cli_process("serve", "--port", str(port), cwd=tmp_path, env=env) as process:
        log = LogLines(process.stderr)
        log.wait_for("listening")
        status, _, started = call(base, EXECUTE_BATCH, batch)
        assert status == 200
        invocation_id = str(started["invocationId"])

        process.send_signal(signal.SIGTERM)
        log.wait_for("stopping")
        status, headers, refused = call(base, EXECUTE_BATCH, batch)
        assert status == 503
        assert headers["Content-Type"].startswith("application/json")
        assert int(headers["Retry-After"]) > 0
        assert "shutting down" in str(refused["detail"])
        assert call(base, HEALTH)[:1] == (200,)
        status, _, results = call(base, RESULTS, {"invocation_id": invocation_id})
        assert (status, results["status"]) == (200, "processing")
        # A stream opened during the drain sees the batch to its end.
        assert list(event_names(base, invocation_id))[-1] == "done"

        assert process.wait(timeout=PROCESS_TIMEOUT_S) == 0
    logged = log.rest()
    assert "Traceback" not in logged
    assert workbook_statuses(tmp_path, invocation_id) == ["succeeded"]


def test_a_second_signal_cancels_running_executions_at_once(tmp_path):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    # Neither the model nor the grace period ends before the test's timeout.
    env = slow_model_env(tmp_path, latency_s=600, grace_s=600)
    env["DATABASE_URL"] = "memory://"  # a durable store would leave the rows to resume
    with cli_process("serve", "--port", str(port), cwd=tmp_path, env=env) as process:
        log = LogLines(process.stderr)
        log.wait_for("listening")
        _, _, started = call(
            base, EXECUTE_BATCH, {"executions": [{"prompt": "hi", "model": "slow"}]}
        )
        process.send_signal(signal.SIGTERM)
        log.wait_for("stopping")
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=PROCESS_TIMEOUT_S) == 0
    assert "Traceback" not in log.rest()
    assert workbook_statuses(tmp_path, str(started["invocationId"])) == ["cancelled"]


def raw_exchange(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send ``request`` as is; the status, headers and body of the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
        connection.sendall(request)
        answer = b""
        # The server closes the connection after an error answer.
        while chunk := connection.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, body


#: A well-formed request line and host header, for the malformed rest to follow.
GET_HEALTH = f"GET {HEALTH} HTTP/1.1\r\nHost: x\r\n".encode()
MALFORMED = {
    "an over-long header line": GET_HEALTH + b"X-Long: " + b"a" * 9000 + b"\r\n\r\n",
    "a garbage request line": b"garbage\r\n\r\n",
    "invalid bytes in a header name": GET_HEALTH + b"Bad\x01Name: y\r\n\r\n",
}


def test_malformed_http_is_answered_as_json_and_logged_in_one_line(tmp_path):
    port = free_port()
    env = {"PUBLIC_DIR": str(tmp_path / "public")}
    with cli_process("serve", "--port", str(port), cwd=tmp_path, env=env) as process:
        log = LogLines(process.stderr)
        log.wait_for("listening")
        details = {}
        for name, request in MALFORMED.items():
            status, headers, body = raw_exchange(port, request)
            assert status == 400, name
            assert headers["content-type"] == "application/json; charset=utf-8", name
            assert b"Traceback" not in body
            details[name] = json.loads(body)["detail"]
        assert details["an over-long header line"] == (
            "Bad Request: request line or header line too long"
        )
        assert all(detail.startswith("Bad Request: ") for detail in details.values())
        for _ in MALFORMED:
            assert "INFO aiohttp.server: rejected a request from 127.0.0.1: 400 Bad Request" in (
                log.wait_for("rejected a request")
            )
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=PROCESS_TIMEOUT_S) == 0
    logged = log.rest()
    assert "Traceback" not in logged
    assert " ERROR " not in logged


def test_a_busy_port_is_one_line_and_exit_1(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {"PUBLIC_DIR": str(tmp_path / "public")}
        with cli_process("serve", "--port", str(port), cwd=tmp_path, env=env) as process:
            assert process.wait(timeout=PROCESS_TIMEOUT_S) == 1
            assert process.stderr is not None
            lines = process.stderr.read().splitlines()
    assert lines[-1].startswith(f"batchexec: cannot listen on 127.0.0.1:{port}: ")
    assert "Traceback" not in "\n".join(lines)


async def test_an_error_outside_the_middlewares_is_a_json_500_with_its_traceback_logged(
    caplog: pytest.LogCaptureFixture,
):
    async def broken(request: web.Request) -> web.Response:
        raise RuntimeError("secret internals")

    # No error middleware: the exception reaches aiohttp's handle_error.
    app = web.Application()
    app.router.add_get("/", broken)
    runner = JSONErrorAppRunner(app)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        with caplog.at_level(logging.INFO, logger="aiohttp.server"):
            async with (
                aiohttp.ClientSession() as session,
                session.get(f"http://127.0.0.1:{port}/", headers={"Accept": "text/html"}) as got,
            ):
                assert got.status == 500
                assert got.content_type == "application/json"
                assert await got.json() == {"detail": "Internal server error."}
    finally:
        await runner.cleanup()
    (record,) = [r for r in caplog.records if r.name == "aiohttp.server"]
    assert record.levelno == logging.ERROR
    assert record.exc_info is not None
    assert isinstance(record.exc_info[1], RuntimeError)


_ARENAS_USED = """
import ctypes, re, sys, tempfile, threading
from batchexec.serving import share_malloc_arenas

capped = share_malloc_arenas()
libc = ctypes.CDLL(None)
libc.fopen.restype = ctypes.c_void_p
libc.fopen.argtypes = (ctypes.c_char_p, ctypes.c_char_p)
libc.malloc_info.argtypes = (ctypes.c_int, ctypes.c_void_p)
libc.fclose.argtypes = (ctypes.c_void_p,)
together = threading.Barrier(8)
blocks = []

def allocate():
    blocks.append(bytearray(100_000))  # past Python's small-object allocator: malloc's
    together.wait()  # every thread alive at once, each holding its block

threads = [threading.Thread(target=allocate) for _ in range(8)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
with tempfile.NamedTemporaryFile() as info:
    stream = libc.fopen(info.name.encode(), b"w")
    libc.malloc_info(0, stream)
    libc.fclose(stream)
    heaps = len(re.findall(rb'<heap nr="', info.read()))
print(capped, heaps)
"""


@pytest.mark.skipif(
    platform.libc_ver()[0] != "glibc", reason="malloc arenas are glibc's; this is not glibc"
)
@pytest.mark.parametrize(("setting", "capped"), [(None, True), ("8", False)])
def test_the_server_shares_two_malloc_arenas_unless_malloc_arena_max_is_set(setting, capped):
    env = {name: value for name, value in os.environ.items() if name != "MALLOC_ARENA_MAX"}
    if setting is not None:
        env["MALLOC_ARENA_MAX"] = setting
    done = subprocess.run(
        [sys.executable, "-c", _ARENAS_USED],
        env=env,
        capture_output=True,
        text=True,
        timeout=PROCESS_TIMEOUT_S,
        check=True,
    )
    said_capped, heaps = done.stdout.split()
    assert said_capped == str(capped)
    # Eight threads holding memory at once: two arenas capped, one each (and the main
    # thread's) otherwise.
    assert int(heaps) <= 2 if capped else int(heaps) >= 8
