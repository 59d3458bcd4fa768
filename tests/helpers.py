"""Plain helpers the tests share: the key, calls to the app, waits, files and processes.

Fixtures live in ``conftest.py``; everything here is imported by name.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import os
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import openpyxl
from aiohttp.test_utils import TestClient

from batchexec import Settings
from batchexec.api import API_KEY_HEADER, EXECUTE_BATCH, RESULTS
from batchexec.records import Batch
from batchexec.web.keys import ENGINE, PROVIDERS, REGISTRY, RESULT_WORKBOOKS
from tests.fakes import GatedProvider

#: The development key, which the test settings accept.
API_KEY = "dev-only-token"
AUTH = {API_KEY_HEADER: API_KEY}
#: How long a ``python -m batchexec`` process may take to start, or to run to its end.
PROCESS_TIMEOUT_S = 30

SettingsFactory = Callable[..., Settings]
ClientFactory = Callable[..., Awaitable[TestClient[Any, Any]]]


# The app under a test client


def gated(client: TestClient[Any, Any]) -> GatedProvider:
    """The app's instance of the gated test provider."""
    provider = client.app[PROVIDERS]["gated"]
    assert isinstance(provider, GatedProvider)
    return provider


async def submit(
    client: TestClient[Any, Any], executions: list[dict[str, Any]], key: str = API_KEY
) -> str:
    """Submit a batch and return its invocation id."""
    response = await client.post(
        EXECUTE_BATCH, json={"executions": executions}, headers={API_KEY_HEADER: key}
    )
    assert response.status == 200, await response.text()
    body = await response.json()
    invocation_id: str = body["invocationId"]
    return invocation_id


async def results(
    client: TestClient[Any, Any], invocation_id: str, key: str = API_KEY
) -> dict[str, Any]:
    """The results route's answer, which must be 200."""
    response = await client.post(
        RESULTS, json={"invocation_id": invocation_id}, headers={API_KEY_HEADER: key}
    )
    assert response.status == 200, await response.text()
    body: dict[str, Any] = await response.json()
    return body


def batch_of(client: TestClient[Any, Any], invocation_id: str) -> Batch:
    """The registry's record of a batch in memory (running, or finished and cached)."""
    batch: Batch | None = client.app[REGISTRY].cached(invocation_id)
    assert batch is not None, f"batch {invocation_id} is not in memory"
    return batch


def owner_of(app: Any, key: str = API_KEY) -> str:
    """The owner a key's batches are recorded under in ``app``: its keyed fingerprint."""
    owner: str = app[REGISTRY].store.fingerprint(key)
    return owner


async def until(condition: Callable[[], bool], *, rounds: int = 10_000) -> None:
    """Let the event loop run until ``condition()`` holds; fail if it never does.

    Counts loop iterations rather than seconds, so a slow machine cannot make
    it flaky.
    """
    for _ in range(rounds):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition never became true")


async def finished(client: TestClient[Any, Any], invocation_id: str) -> dict[str, Any]:
    """Wait for the batch to end and its workbook to be written, then return its results."""
    await client.app[ENGINE].join(invocation_id)
    await client.app[RESULT_WORKBOOKS].idle()
    return await results(client, invocation_id)


# Files


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    """Write ``header`` and ``rows`` to ``path`` as CSV; return ``path``."""
    with path.open("w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def sheet_rows(workbook: Path | bytes, *, padded: bool = False) -> list[list[Any]]:
    """The values of a workbook's ``Results`` sheet (a file, or its bytes), the header first.

    Read as stored: a row ends at its last cell. ``padded`` reads it as openpyxl's
    full mode does instead, every row as wide as the sheet's widest.
    """
    book = openpyxl.load_workbook(
        io.BytesIO(workbook) if isinstance(workbook, bytes) else workbook, read_only=not padded
    )
    try:
        return [list(row) for row in book["Results"].iter_rows(values_only=True)]
    finally:
        book.close()


def column(rows: list[list[Any]], name: str) -> list[Any]:
    """The values under the header ``name`` of ``rows``, the header row first."""
    position = rows[0].index(name)
    return [row[position] for row in rows[1:]]


def workbook_statuses(tmp_path: Path, invocation_id: str) -> list[Any]:
    """The status cells of the workbook a server run in ``tmp_path`` wrote for a batch."""
    path = tmp_path / "public" / "batch_execution_results" / f"batch_execution_{invocation_id}.xlsx"
    return [row[3] for row in sheet_rows(path, padded=True)[1:]]


# Processes


def free_port() -> int:
    """A loopback port nothing listens on (at the time of asking)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def run_cli(
    *args: str, cwd: Path, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m batchexec *args`` to its end, its output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "batchexec", *args],
        env={**os.environ, **(env or {})},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=PROCESS_TIMEOUT_S,
    )


@contextlib.contextmanager
def cli_process(
    *args: str, cwd: Path, env: Mapping[str, str] | None = None
) -> Iterator[subprocess.Popen[str]]:
    """A ``python -m batchexec *args`` process, stderr piped, killed if the test fails first."""
    with subprocess.Popen(
        [sys.executable, "-m", "batchexec", *args],
        env={**os.environ, **(env or {})},
        cwd=cwd,
        stderr=subprocess.PIPE,
        text=True,
    ) as process:
        try:
            yield process
        finally:
            if process.poll() is None:
                process.kill()


# Fake providers


def chat_completion(
    model: str, content: str, usage: tuple[int, int] | None = None
) -> dict[str, Any]:
    """An OpenAI chat completion's body answering ``content``; ``usage`` is
    ``(prompt_tokens, completion_tokens)``, left out when None."""
    body: dict[str, Any] = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": "stop",
            }
        ],
    }
    if usage is not None:
        prompt, completion = usage
        body["usage"] = {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }
    return body
