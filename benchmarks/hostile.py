"""The hardening issue's defects, replayed against the server: ``python -m benchmarks.hostile``.

It starts ``python -m batchexec serve`` with the default limits (only the API
keys, a model catalog, ``PUBLIC_DIR`` and ``SHUTDOWN_GRACE_S`` are set; every
other batchexec variable is removed from its environment) and a hostile
OpenAI-compatible server (``benchmarks/hostile_provider.py``), then replays
each numbered defect of the issue in turn while a thread asks ``GET /health``
every 20 ms. After each step it records the answer's status and the first 100
characters of its ``detail`` (or of the row's error), how long the step took,
the server's peak RSS so far (``VmHWM``), the slowest ``/health`` answer during
the step, and whether a small echo batch submitted right after completes.

Each step's row is judged against the issue's acceptance bounds:

- the expected 4xx, or the row's clear error, each within ``ANSWER_BOUND_S``;
- peak RSS under 300 MB;
- every ``/health`` answered 200 within 100 ms;
- the server still serving other batches.

Step 9 (a workbook that cannot be written) needs a failing disk and is
skipped. Step 10 (SIGTERM during a batch) runs last, since it stops the
server: new submissions must get 503 with ``Retry-After`` until the process
exits, and it must exit 0 once the running batch has ended.

Each step's peak RSS is its own: ``VmHWM`` is reset before it (by writing
``5`` to ``/proc/PID/clear_refs``), and the run's peak is kept alongside. A
step that leaves the server holding more than 300 MB fails, and the server is
restarted after it, so that the later steps are judged on what they do. The
server's log lines of each step that say ERROR, or record a 500, fail it too.

It takes under a minute. The exit code is 0 when every step passes, 1 when
any fails.
"""

from __future__ import annotations

import asyncio
import csv
import http.client
import io
import json
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from batchexec import api
from benchmarks.server import (
    ModuleProcess,
    free_port,
    spawn_serve,
    status_mb,
    stop_process,
    wait_for_http,
)

API_KEY = "hostile-token"
#: Step 7's own key: templates are counted per key, and other steps write some too.
TEMPLATES_KEY = "hostile-templates"
SHUTDOWN_GRACE_S = 20.0

#: The acceptance bounds.
MAX_RSS_MB = 300.0
MAX_HEALTH_MS = 100.0
#: "Within a few seconds": the longest any one answer (or a row's error) may take.
ANSWER_BOUND_S = 5.0

#: Hard bounds, so that a server that hangs makes a FAIL rather than a stuck run.
STEP_TIMEOUT_S = 90.0
REQUEST_TIMEOUT_S = 30.0
START_TIMEOUT_S = 60.0
#: Step 10: how long after its last batch ends the server may take to exit.
EXIT_TIMEOUT_S = 15.0
#: Step 10: how long the event stream may take to end once the server stops listening.
EVENTS_END_S = 2.0
PROBE_EVERY_S = 0.02
PROBE_TIMEOUT_S = 2.0
#: An hour of probes: far beyond any run.
MAX_PROBES = int(3600 / PROBE_EVERY_S)
POLL_S = 0.05
#: The most a raw exchange reads of one answer, and how much at a time.
MAX_ANSWER_BYTES = 256 * 1024 * 1024
_READ_BYTES = 256 * 1024
#: Lines of an event stream read at most.
MAX_EVENT_LINES = 10_000
#: Step 4: how close to its earlier level RSS must come once stalled clients go, and how soon.
RELEASE_MB = 20.0
RELEASE_WAIT_S = 10.0

EXECUTE = api.EXECUTE_BATCH
PROCESS_CSV = api.PROCESS_CSV
UPLOAD = api.UPLOAD
RESULTS = api.RESULTS
BATCHES = api.BATCHES
FINISHED = frozenset({"completed", "failed", "cancelled"})

ECHO = "echo"
SLOW_ECHO = "hostile-echo-2s"
FAST_ECHO = "hostile-echo-100ms"
HUGE = "hostile-huge"


# The servers


def _catalog(provider_url: str) -> str:
    return (
        f'[models."{SLOW_ECHO}"]\nprovider = "echo"\nlatency_s = 2.0\n\n'
        f'[models."{FAST_ECHO}"]\nprovider = "echo"\nlatency_s = 0.1\n\n'
        f'[models."{HUGE}"]\nprovider = "openai"\nbase_url = "{provider_url}/v1"\n'
        'model_id = "huge"\n'
    )


class DefaultServer:
    """``python -m batchexec serve`` with the default limits, in ``workdir``; its log there."""

    def __init__(self, workdir: Path, provider_url: str) -> None:
        self.workdir = workdir
        self.port = 0
        self.url = ""
        self.log_path = workdir / "server.log"
        self.starts = 0
        self._provider_url = provider_url
        self._process: subprocess.Popen[bytes] | None = None
        self._step_peak_mb: float | None = None
        self._run_peak_mb: float | None = None
        #: Whether ``VmHWM`` can be reset between steps; if not, each step's peak is the run's.
        self.resets_peak = True

    def start(self) -> None:
        """Start a server on a new port, with a log of its own."""
        self.starts += 1
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.workdir / f"server-{self.starts}.log"
        catalog = self.workdir / "models.toml"
        catalog.write_text(_catalog(self._provider_url))
        settings = {
            "INTEGRATIONS_API_KEYS": f"{API_KEY},{TEMPLATES_KEY}",
            "BATCHEXEC_MODELS": str(catalog),
            "PUBLIC_DIR": str(self.workdir / "public"),
            "SHUTDOWN_GRACE_S": str(SHUTDOWN_GRACE_S),
        }
        self._process = spawn_serve(self.workdir, self.port, settings, self.log_path)
        wait_for_http(f"{self.url}/health", self._process, START_TIMEOUT_S)

    @property
    def process(self) -> subprocess.Popen[bytes]:
        if self._process is None:
            raise RuntimeError("the server was not started")
        return self._process

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def memory_mb(self, field_name: str) -> float:
        """``VmHWM`` (peak resident memory so far) or ``VmRSS`` (now), in MB."""
        return status_mb(self.process.pid, field_name)

    def begin_step(self) -> int:
        """Start a step's figures: reset ``VmHWM`` where Linux lets us; the log's size now."""
        self.peak_rss_mb()
        try:
            # "5" resets the peak RSS (proc(5)); the run's peak is kept here instead.
            Path(f"/proc/{self.process.pid}/clear_refs").write_text("5")
        except OSError:
            self.resets_peak = False
        return self.log_path.stat().st_size

    def peak_rss_mb(self) -> tuple[float | None, float | None]:
        """The peak RSS since the step began, and over the whole run; last read once exited."""
        if self.running:
            step_peak = self.memory_mb("VmHWM")
            self._step_peak_mb = step_peak
            self._run_peak_mb = max(self._run_peak_mb or 0.0, step_peak)
        return self._step_peak_mb, self._run_peak_mb

    def errors_logged(self, offset: int) -> list[str]:
        """Lines since ``offset`` of the log that say ERROR, or that a request got a 500."""
        with self.log_path.open("rb") as log:
            log.seek(offset)
            text = log.read().decode(errors="replace")
        return [line for line in text.splitlines() if " ERROR " in line or '" 500 ' in line]

    def terminate(self) -> None:
        self.process.send_signal(signal.SIGTERM)

    def stop(self) -> None:
        if self._process is not None:
            stop_process(self._process, "batchexec serve")


class ProviderServer(ModuleProcess):
    """``python -m benchmarks.hostile_provider``: 50 MB for every chat completion."""

    def __init__(self, workdir: Path) -> None:
        super().__init__(
            "benchmarks.hostile_provider",
            workdir / "provider.log",
            name="hostile provider",
            start_timeout_s=START_TIMEOUT_S,
        )


# /health, every 20 ms


@dataclass(frozen=True)
class HealthWindow:
    """The /health answers of one stretch of time."""

    answers: int
    failures: int
    slowest_ms: float | None


class HealthProbe:
    """Asks ``GET /health`` every 20 ms in a thread, on a new connection each time.

    Each ask is kept with its start time and duration (None when it failed or
    took over ``PROBE_TIMEOUT_S``), so any stretch of the run can be judged.
    """

    def __init__(self, port: int) -> None:
        #: The server's port; changed when the server is restarted.
        self.port = port
        self._samples: deque[tuple[float, float | None]] = deque(maxlen=200_000)
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="health-probe", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(PROBE_TIMEOUT_S + 1)

    def window(self, start: float, end: float) -> HealthWindow:
        with self._lock:
            samples = [sample for sample in self._samples if start <= sample[0] <= end]
        times = [seconds for _, seconds in samples if seconds is not None]
        return HealthWindow(
            answers=len(samples),
            failures=len(samples) - len(times),
            slowest_ms=max(times) * 1000 if times else None,
        )

    def _run(self) -> None:
        for _ in range(MAX_PROBES):
            if self._stopping.is_set():
                return
            started = time.monotonic()
            seconds = self._ask()
            with self._lock:
                self._samples.append((started, seconds))
            self._stopping.wait(PROBE_EVERY_S)

    def _ask(self) -> float | None:
        started = time.monotonic()
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=PROBE_TIMEOUT_S)
        try:
            connection.request("GET", "/health")
            answer = connection.getresponse()
            answer.read()
            ok = answer.status == 200
        except (OSError, http.client.HTTPException):
            ok = False
        finally:
            connection.close()
        return time.monotonic() - started if ok else None


# Talking to the server


@dataclass(frozen=True)
class Answer:
    """One HTTP answer: status, headers, the parsed JSON body (None if not JSON), its time."""

    status: int
    headers: Mapping[str, str]
    body: Any
    seconds: float

    @property
    def detail(self) -> str:
        if isinstance(self.body, dict) and "detail" in self.body:
            return str(self.body["detail"])
        return ""

    @property
    def summary(self) -> str:
        """The ``detail`` of an error, or the first message of a success."""
        if self.detail or not isinstance(self.body, dict):
            return self.detail
        messages = self.body.get("response") or [{}]
        return str(messages[0].get("message", ""))

    @property
    def is_json_error(self) -> bool:
        return 400 <= self.status < 500 and bool(self.detail)


@dataclass(frozen=True)
class RawAnswer:
    """An answer read off a raw socket: status, headers, the first bytes of the body, its size."""

    status: int
    headers: Mapping[str, str]
    head: bytes
    size: int


class Client:
    """The steps' way to the server: JSON calls, uploads, raw sockets, batches."""

    def __init__(self, session: aiohttp.ClientSession, server: DefaultServer) -> None:
        self.session = session
        self.server = server

    async def call(
        self,
        method: str,
        path: str,
        *,
        payload: object = None,
        data: Any = None,
        headers: Mapping[str, str] | None = None,
        key: str = API_KEY,
    ) -> Answer:
        started = time.monotonic()
        async with self.session.request(
            method,
            self.server.url + path,
            json=payload,
            data=data,
            headers={"Integrations-API-Key": key, **(headers or {})},
        ) as response:
            raw = await response.read()
        try:
            body = None if not raw else json.loads(raw)
        except ValueError:
            body = None
        return Answer(response.status, dict(response.headers), body, time.monotonic() - started)

    async def post_raw(self, path: str, raw: bytes) -> Answer:
        return await self.call("POST", path, data=raw, headers={"Content-Type": "application/json"})

    async def upload(self, data: bytes, file_name: str) -> Answer:
        form = aiohttp.FormData()
        form.add_field("file", data, filename=file_name)
        return await self.call("POST", UPLOAD, data=form)

    async def submit(self, executions: Sequence[Mapping[str, str]]) -> str:
        answer = await self.call("POST", EXECUTE, payload={"executions": list(executions)})
        if answer.status != 200:
            raise RuntimeError(f"submit: HTTP {answer.status}: {answer.detail[:200]}")
        invocation_id: str = answer.body["invocationId"]
        return invocation_id

    async def results(self, invocation_id: str) -> dict[str, Any]:
        answer = await self.call("POST", RESULTS, payload={"invocation_id": invocation_id})
        if answer.status != 200:
            raise RuntimeError(f"results: HTTP {answer.status}: {answer.detail[:200]}")
        body: dict[str, Any] = answer.body
        return body

    async def batches(self) -> list[dict[str, Any]]:
        answer = await self.call("GET", f"{BATCHES}?limit=100")
        if answer.status != 200:
            raise RuntimeError(f"batches: HTTP {answer.status}: {answer.detail[:200]}")
        listed: list[dict[str, Any]] = answer.body["batches"]
        return listed

    async def wait_status(
        self, invocation_id: str, statuses: frozenset[str], timeout_s: float
    ) -> dict[str, Any]:
        """The batch's entry in the list route once its status is one of ``statuses``.

        The list, not the results route: its answer stays small whatever the batch holds.
        """
        async with asyncio.timeout(timeout_s):
            for _ in range(int(timeout_s / POLL_S) + 1):
                for batch in await self.batches():
                    if batch["invocationId"] == invocation_id and batch["status"] in statuses:
                        return batch
                await asyncio.sleep(POLL_S)
        raise TimeoutError(f"batch {invocation_id} did not reach {sorted(statuses)}")

    async def wait_ended(self, invocation_id: str, timeout_s: float) -> dict[str, Any]:
        return await self.wait_status(invocation_id, FINISHED, timeout_s)

    async def run(self, executions: Sequence[Mapping[str, str]], timeout_s: float) -> Any:
        """Submit, wait for the end, return the results (for small batches)."""
        invocation_id = await self.submit(executions)
        await self.wait_ended(invocation_id, timeout_s)
        return await self.results(invocation_id)

    async def raw_exchange(
        self, request: bytes, *, keep_bytes: int = 4096, timeout_s: float = REQUEST_TIMEOUT_S
    ) -> RawAnswer:
        """Send ``request`` as it is and read the answer to the end (it must close)."""
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection("127.0.0.1", self.server.port)
            try:
                writer.write(request)
                await writer.drain()
                head = await reader.readuntil(b"\r\n\r\n")
                status_line, *lines = head.decode("latin-1").split("\r\n")
                headers = dict(line.split(": ", 1) for line in lines if ": " in line)
                kept = b""
                size = 0
                for _ in range(MAX_ANSWER_BYTES // _READ_BYTES):
                    chunk = await reader.read(_READ_BYTES)
                    if not chunk:
                        break
                    size += len(chunk)
                    if len(kept) < keep_bytes:
                        kept += chunk[: keep_bytes - len(kept)]
            finally:
                writer.close()
        return RawAnswer(int(status_line.split()[1]), headers, kept, size)

    def raw_request(
        self, method: str, path: str, body: bytes, *, host: str, extra: str = ""
    ) -> bytes:
        """An HTTP/1.1 request with the API key, ``Connection: close``, as bytes."""
        return (
            f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nIntegrations-API-Key: {API_KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n{extra}"
            "Connection: close\r\n\r\n"
        ).encode("latin-1") + body

    async def other_batch(self) -> tuple[bool, str]:
        """Whether a small echo batch completes, every row succeeded, within the bound."""
        started = time.monotonic()
        try:
            body = await self.run(
                [{"prompt": f"still serving {n}", "model": ECHO} for n in range(3)], ANSWER_BOUND_S
            )
        except (RuntimeError, TimeoutError, aiohttp.ClientError) as exc:
            return False, f"no: {type(exc).__name__}: {exc}"[:60]
        seconds = time.monotonic() - started
        succeeded = body["progress"]["succeeded"]
        if body["status"] != "completed" or succeeded != 3:
            return False, f"no: {body['status']}, {succeeded}/3"
        return True, f"yes {seconds:.2f}s"


# Workbooks written by hand


_CONTENT_TYPES = (
    '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>'
    '<Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types">'
    '<Default Extension="rels" '
    'ContentType="application/vnd.openxmlformats-package.relationships+xml"/>'
    '<Default Extension="xml" ContentType="application/xml"/>'
    '<Override PartName="/xl/workbook.xml" '
    'ContentType="application/vnd.openxmlformats-officedocument.spreadsheetml.sheet.main+xml"/>'
    '<Override PartName="/xl/worksheets/sheet1.xml" '
    'ContentType="application/vnd.openxmlformats-officedocument.spreadsheetml.worksheet+xml"/>'
    "</Types>"
)
_ROOT_RELS = (
    '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>'
    '<Relationships xmlns="http://schemas.openxmlformats.org/package/2006/relationships">'
    '<Relationship Id="rId1" Target="xl/workbook.xml" Type="http://schemas.openxmlformats.org/'
    'officeDocument/2006/relationships/officeDocument"/></Relationships>'
)
_WORKBOOK = (
    '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>'
    '<workbook xmlns="http://schemas.openxmlformats.org/spreadsheetml/2006/main" '
    'xmlns:r="http://schemas.openxmlformats.org/officeDocument/2006/relationships">'
    '<sheets><sheet name="Sheet1" sheetId="1" r:id="rId1"/></sheets></workbook>'
)
_WORKBOOK_RELS = (
    '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>'
    '<Relationships xmlns="http://schemas.openxmlformats.org/package/2006/relationships">'
    '<Relationship Id="rId1" Target="worksheets/sheet1.xml" Type="http://schemas.openxmlformats.org/'
    'officeDocument/2006/relationships/worksheet"/></Relationships>'
)


def workbook(sheet_data: str) -> bytes:
    """A one-sheet XLSX file whose sheet's ``<sheetData>`` holds ``sheet_data``."""
    sheet = (
        '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>'
        '<worksheet xmlns="http://schemas.openxmlformats.org/spreadsheetml/2006/main">'
        f"<sheetData>{sheet_data}</sheetData></worksheet>"
    )
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("[Content_Types].xml", _CONTENT_TYPES)
        archive.writestr("_rels/.rels", _ROOT_RELS)
        archive.writestr("xl/workbook.xml", _WORKBOOK)
        archive.writestr("xl/_rels/workbook.xml.rels", _WORKBOOK_RELS)
        archive.writestr("xl/worksheets/sheet1.xml", sheet)
    return buffer.getvalue()


def text_row(number: int, *texts: str) -> str:
    """A ``<row>`` of inline strings from column A."""
    cells = "".join(
        f'<c r="{letter}{number}" t="inlineStr"><is><t>{text}</t></is></c>'
        for letter, text in zip("ABCDEFGHIJ", texts, strict=False)
    )
    return f'<row r="{number}">{cells}</row>'


def blank_rows_at_xfd(xml_bytes: int) -> str:
    """Rows from 1 on, each holding only an empty cell at XFD, up to ``xml_bytes`` of XML."""
    rows: list[str] = []
    size = 0
    number = 1
    while size < xml_bytes:
        row = f'<row r="{number}"><c r="XFD{number}"/></row>'
        rows.append(row)
        size += len(row)
        number += 1
    return "".join(rows)


# The steps


@dataclass
class Outcome:
    """What one step saw: the answer, the first words of its detail, and what was wrong."""

    answer: str
    detail: str
    problems: list[str] = field(default_factory=list)
    #: The step's own evidence that other batches are served (step 10's); None: ask after it.
    others: tuple[bool, str] | None = None
    #: When /health stops being judged (step 10's: the server then closes its socket).
    health_until: float | None = None

    def expect(self, condition: bool, problem: str) -> None:
        if not condition:
            self.problems.append(problem)


async def step_amplification(client: Client) -> Outcome:
    """1. Rows of ``${output.n}`` repeated 90 times: row 2 fails unsent, rows 3-4 are skipped."""
    executions = [{"prompt": "x" * 1000, "model": ECHO}]
    executions += [{"prompt": f"${{output.{row - 1}}}" * 90, "model": ECHO} for row in range(2, 5)]
    started = time.monotonic()
    body = await client.run(executions, ANSWER_BOUND_S)
    seconds = time.monotonic() - started
    statuses = [execution["status"] for execution in body["executions"]]
    error = (body["executions"][1]["error"] or "") if len(statuses) > 1 else ""
    outcome = Outcome(f"200; rows {'/'.join(statuses)}", error)
    outcome.expect(
        statuses == ["succeeded", "failed", "skipped", "skipped"],
        f"rows ended {statuses}, not succeeded/failed/skipped/skipped",
    )
    outcome.expect(
        "MAX_SENT_PROMPT_LENGTH" in error, "row 2's error names no MAX_SENT_PROMPT_LENGTH"
    )
    outcome.expect(seconds <= ANSWER_BOUND_S, f"the batch took {seconds:.1f} s")
    return outcome


async def step_xlsx(client: Client) -> Outcome:
    """2. Workbooks claiming row 2,000,000,000 and blank rows out to XFD, six uploads each."""
    far_row = workbook(
        text_row(1, "prompt", "model") + text_row(2, "hi", ECHO) + '<row r="2000000000"/>'
    )
    wide = workbook(blank_rows_at_xfd(1_500_000))
    kinds = {"a": far_row, "b": wide}
    uploads = [
        (kind, client.upload(data, f"hostile-{kind}.xlsx"))
        for kind, data in kinds.items()
        for _ in range(6)
    ]
    # A normal batch alongside, as another user's would be.
    answers, (others_ok, others) = await asyncio.gather(
        asyncio.gather(*(upload for _, upload in uploads)), client.other_batch()
    )
    by_kind: dict[str, list[Answer]] = {kind: [] for kind in kinds}
    for (kind, _), answer in zip(uploads, answers, strict=True):
        by_kind[kind].append(answer)
    summary = "; ".join(
        f"{kind}: " + ",".join(sorted({str(a.status) for a in found})) + f"x{len(found)}"
        for kind, found in by_kind.items()
    )
    slowest = max(answer.seconds for answer in answers)
    details = [f"{kind}: {found[0].summary}" for kind, found in by_kind.items()]
    outcome = Outcome(f"{summary}; slowest {slowest:.1f}s", " | ".join(details))
    for kind, found in by_kind.items():
        statuses = {answer.status for answer in found}
        outcome.expect(statuses <= {200, 422}, f"({kind}) answered {sorted(statuses)}")
    outcome.expect(slowest <= ANSWER_BOUND_S, f"the slowest upload took {slowest:.1f} s")
    outcome.expect(others_ok, f"a batch run alongside the uploads: {others}")
    return outcome


async def step_huge_responses(client: Client, provider: ProviderServer) -> Outcome:
    """3. 40 rows on a model answering 50 MB a call: every row fails naming MAX_RESPONSE_BYTES."""
    invocation_id = await client.submit([{"prompt": f"row {n}", "model": HUGE} for n in range(40)])
    await client.wait_ended(invocation_id, STEP_TIMEOUT_S / 2)
    body = await client.results(invocation_id)
    executions = body["executions"]
    errors = [execution["error"] or "" for execution in executions]
    failed = sum(1 for e in executions if e["status"] == "failed")
    named = sum(1 for error in errors if "MAX_RESPONSE_BYTES" in error)
    slowest_s = max((e["latency_ms"] or 0) for e in executions) / 1000 if executions else 0.0
    async with client.session.get(f"{provider.url}/stats") as answer:
        stats = await answer.json()
    outcome = Outcome(
        f"200; {failed}/40 failed, {named} name the limit; {stats['calls']} calls; "
        f"slowest row {slowest_s:.2f}s",
        errors[0] if errors else "",
    )
    outcome.expect(failed == 40 and named == 40, "not every row failed naming MAX_RESPONSE_BYTES")
    outcome.expect(slowest_s <= ANSWER_BOUND_S, f"a row took {slowest_s:.1f} s to fail")
    return outcome


async def step_results_memory(client: Client) -> Outcome:
    """4. A 100-row batch of 30,000-character rows; 80 hosts ask for it; 40 clients never read."""
    executions = [{"prompt": "y" * 1000, "model": ECHO}]
    executions += [{"prompt": "${output.1}" * 30, "model": ECHO} for _ in range(99)]
    invocation_id = await client.submit(executions)
    await client.wait_ended(invocation_id, STEP_TIMEOUT_S / 3)
    body = f'{{"invocation_id": "{invocation_id}"}}'.encode()
    rss_mb = {"before": client.server.memory_mb("VmRSS")}

    answers = await asyncio.gather(
        *(
            client.raw_exchange(
                client.raw_request("POST", RESULTS, body, host=f"h{n}.hostile.test")
            )
            for n in range(80)
        )
    )
    rss_mb["hosts"] = client.server.memory_mb("VmRSS")
    rss_mb["peak"] = client.server.memory_mb("VmHWM")

    stalled = await asyncio.gather(
        *(
            _never_read(client, client.raw_request("POST", RESULTS, body, host="stall.test"))
            for _ in range(40)
        )
    )
    try:
        await asyncio.sleep(3)
        rss_mb["stalled"] = client.server.memory_mb("VmRSS")
    finally:
        for sock in stalled:
            sock.close()
    # "Released": back to what it was before the stalled clients, within RELEASE_MB.
    closed_at = time.monotonic()
    for _ in range(int(RELEASE_WAIT_S / 0.5)):
        await asyncio.sleep(0.5)
        rss_mb["closed"] = client.server.memory_mb("VmRSS")
        if rss_mb["closed"] <= rss_mb["hosts"] + RELEASE_MB:
            break
    released_s = time.monotonic() - closed_at

    statuses = sorted({answer.status for answer in answers})
    size_mb = max(answer.size for answer in answers) / 1024 / 1024
    outcome = Outcome(
        f"{','.join(map(str, statuses))}x80 of {size_mb:.1f} MB; 40 never read",
        "RSS MB before {before:.0f}, after 80 hosts {hosts:.0f} (peak {peak:.0f}), "
        "40 stalled {stalled:.0f}, closed {closed:.0f}".format(**rss_mb)
        + f" ({released_s:.0f}s)",
    )
    outcome.expect(statuses == [200], f"the 80 hosts got {statuses}")
    grown = rss_mb["closed"] - rss_mb["hosts"]
    outcome.expect(
        grown <= RELEASE_MB,
        f"RSS still {grown:.0f} MB above its level before the stalled clients, "
        f"{released_s:.0f} s after they closed",
    )
    return outcome


async def _never_read(client: Client, request: bytes) -> socket.socket:
    """A socket with a tiny receive buffer that sends ``request`` and never reads."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, ("127.0.0.1", client.server.port))
    await loop.sock_sendall(sock, request)
    return sock


TRICKY_TEXTS = [
    "lone\rcr",
    "ends in cr\r",
    "crlf\r\nhere",
    'say "hi", ok',
    "nul\x00byte",
    "=cmd|' /C calc'!A0",
    "y\n\r\n\r",
    '"\r"',
]


async def step_bare_cr(client: Client) -> Outcome:
    """5. Prompts with lone CRs, CRLF, quotes, NUL and a formula read back as the same cells."""
    executions = [{"prompt": text, "model": ECHO, "note": text} for text in TRICKY_TEXTS]
    body = await client.run(executions, ANSWER_BOUND_S)
    rows = list(csv.DictReader(io.StringIO(body["csv_content"] or "", newline="")))
    expected = [{"prompt": t, "model": ECHO, "note": t, "result": t} for t in TRICKY_TEXTS]
    wrong = [
        n for n, (row, want) in enumerate(zip(rows, expected, strict=False), start=1) if row != want
    ]
    outcome = Outcome(
        f"200; {len(rows)} rows read back, {len(wrong)} differ",
        repr(rows[wrong[0] - 1]) if wrong else repr(body["csv_content"]),
    )
    outcome.expect(len(rows) == len(TRICKY_TEXTS), f"{len(rows)} rows, not {len(TRICKY_TEXTS)}")
    outcome.expect(not wrong, f"rows {wrong} read back differently")
    return outcome


def _multipart(part_headers: bytes) -> tuple[bytes, dict[str, str]]:
    body = b"--XX\r\n" + part_headers + b"\r\n\r\nprompt\nhi\n\r\n--XX--\r\n"
    return body, {"Content-Type": "multipart/form-data; boundary=XX"}


async def step_500s(client: Client) -> Outcome:
    """6. Deep JSON, a 5,000-digit number, broken multipart headers, a 9 KB header line."""
    no_header, no_header_type = _multipart(b"this is not a header")
    long_name = b'Content-Disposition: form-data; name="file"; filename="' + b"a" * 8192 + b'"'
    long_header, long_header_type = _multipart(long_name)
    answers: dict[str, Answer] = {
        "deep": await client.post_raw(EXECUTE, b"[" * 100_000 + b"]" * 100_000),
        "digits": await client.post_raw(RESULTS, b'{"invocation_id": ' + b"9" * 5000 + b"}"),
        "part": await client.call("POST", UPLOAD, data=no_header, headers=no_header_type),
        "8KB part": await client.call("POST", UPLOAD, data=long_header, headers=long_header_type),
    }
    started = time.monotonic()
    raw = await client.raw_exchange(
        client.raw_request(
            "GET", BATCHES, b"", host="127.0.0.1", extra=f"X-Padding: {'a' * 9216}\r\n"
        )
    )
    try:
        raw_body = json.loads(raw.head)
    except ValueError:
        raw_body = None
    answers["9KB line"] = Answer(raw.status, raw.headers, raw_body, time.monotonic() - started)
    outcome = Outcome(
        " ".join(f"{name} {answer.status}" for name, answer in answers.items()),
        " | ".join(answer.detail for answer in answers.values()),
    )
    for name, answer in answers.items():
        outcome.expect(
            answer.is_json_error, f"{name}: {answer.status}, not a 4xx with a JSON detail"
        )
        outcome.expect(answer.seconds <= ANSWER_BOUND_S, f"{name} took {answer.seconds:.1f} s")
    return outcome


async def step_templates(client: Client) -> Outcome:
    """7. 101 template workbooks for one key: the 101st is refused with 429."""
    answers = [
        await client.call(
            "POST",
            PROCESS_CSV,
            payload={"csv_content": f"prompt\ntemplate {n}\n"},
            key=TEMPLATES_KEY,
        )
        for n in range(101)
    ]
    last = answers[-1]
    accepted = sum(1 for answer in answers[:-1] if answer.status == 200)
    slowest = max(answer.seconds for answer in answers)
    outcome = Outcome(
        f"200x{accepted}, then {last.status} (Retry-After {last.headers.get('Retry-After')})",
        last.detail,
    )
    outcome.expect(accepted == 100, f"only {accepted} of the first 100 were accepted")
    outcome.expect(last.status == 429 and "Retry-After" in last.headers, "the 101st was not 429")
    outcome.expect(slowest <= ANSWER_BOUND_S, f"the slowest call took {slowest:.1f} s")
    return outcome


async def step_columns(client: Client) -> Outcome:
    """8. A CSV of 20,002 columns is refused with 422."""
    header = ",".join(["prompt", *(f"c{n}" for n in range(20_001))])
    answer = await client.call(
        "POST", PROCESS_CSV, payload={"csv_content": f"{header}\nhi{',' * 20_001}\n"}
    )
    outcome = Outcome(f"{answer.status} in {answer.seconds:.2f}s", answer.detail)
    outcome.expect(answer.status == 422 and answer.is_json_error, f"{answer.status}, not 422")
    outcome.expect(answer.seconds <= ANSWER_BOUND_S, f"it took {answer.seconds:.1f} s")
    return outcome


async def step_processing(client: Client) -> Outcome:
    """11. Seven batches of 20 slow rows: the list never shows more than 5 processing."""
    ids = [
        await client.submit([{"prompt": f"b{b} r{r}", "model": FAST_ECHO} for r in range(20)])
        for b in range(7)
    ]
    most = 0
    ended: set[str] = set()
    polls = 0
    deadline = time.monotonic() + STEP_TIMEOUT_S / 3
    while len(ended) < len(ids) and time.monotonic() < deadline and polls < 2000:
        listed = await client.batches()
        polls += 1
        most = max(most, sum(1 for batch in listed if batch["status"] == "processing"))
        ended.update(
            batch["invocationId"]
            for batch in listed
            if batch["invocationId"] in ids and batch["status"] == "completed"
        )
        await asyncio.sleep(0.02)
    outcome = Outcome(f"at most {most} processing; {len(ended)}/7 completed", f"{polls} polls")
    outcome.expect(most <= 5, f"{most} batches were processing at once")
    outcome.expect(len(ended) == len(ids), f"only {len(ended)} of 7 batches completed")
    return outcome


async def step_sigterm(client: Client) -> Outcome:
    """10. SIGTERM during a batch: 503 with Retry-After until the process exits, with 0."""
    server = client.server
    # Eight rows of 2 s on four threads: four run when the signal comes, four wait.
    invocation_id = await client.submit(
        [{"prompt": f"slow {n}", "model": SLOW_ECHO} for n in range(8)]
    )
    events = asyncio.create_task(_last_events(client, invocation_id))
    late = {"executions": [{"prompt": "late", "model": ECHO}]}
    refusals: list[Answer] = []
    health: list[int] = []
    try:
        await client.wait_status(invocation_id, frozenset({"processing"}), ANSWER_BOUND_S)
        server.terminate()
        await asyncio.sleep(0.2)
        # /health is judged up to its last answer: the server stops listening as it exits.
        listening_until = time.monotonic()
        async with asyncio.timeout(SHUTDOWN_GRACE_S + 10):
            # Every half second until the running batch ends: a submission, and /health.
            while not events.done() and len(refusals) < 100:
                try:
                    refusal = await client.call("POST", EXECUTE, payload=late)
                    health.append((await client.call("GET", "/health")).status)
                except aiohttp.ClientConnectionError:
                    break  # it no longer listens: whether it ended the batch first is below
                listening_until = time.monotonic()
                refusals.append(refusal)
                await asyncio.wait({events}, timeout=0.5)
        progress, done = await _ending(events)
    finally:
        events.cancel()
    ended_at = time.monotonic()
    server.peak_rss_mb()
    try:
        code: int | None = await asyncio.to_thread(server.process.wait, EXIT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        code = None
    exit_s = time.monotonic() - ended_at
    if done.get("status") not in FINISHED and code == 0:
        # The durable store (the default) leaves an unfinished batch to the next
        # start instead of cancelling it: start again and see it finish.
        server.start()
        final = (await client.wait_status(invocation_id, FINISHED, SHUTDOWN_GRACE_S + 20))["status"]
        body = await client.results(invocation_id)
        progress = body.get("progress", {})
        done = {"status": f"{final} after a restart"}
    statuses = sorted({answer.status for answer in refusals})
    retry_after = sorted({answer.headers.get("Retry-After", "none") for answer in refusals})
    outcome = Outcome(
        f"{','.join(map(str, statuses))}x{len(refusals)} (Retry-After {','.join(retry_after)}); "
        f"/health {','.join(map(str, sorted(set(health))))}; exit {code} {exit_s:.1f}s after",
        refusals[0].detail if refusals else "",
        others=(
            str(done.get("status")).split(" ")[0] in FINISHED and progress.get("succeeded", 0) > 0,
            f"running one {done.get('status')}: {progress.get('succeeded')} ok, "
            f"{progress.get('cancelled')} cancelled",
        ),
        health_until=listening_until,
    )
    outcome.expect(bool(refusals) and statuses == [503], f"submissions got {statuses}, not 503")
    outcome.expect("none" not in retry_after, "a 503 came without Retry-After")
    outcome.expect(set(health) == {200}, f"/health answered {sorted(set(health))}")
    outcome.expect(code == 0, f"the server exited with {code}")
    return outcome


async def _ending(
    events: asyncio.Task[tuple[dict[str, Any], dict[str, Any]]],
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The batch's last progress and done event; a done event saying why when there was none."""
    try:
        return await asyncio.wait_for(events, EVENTS_END_S)
    except (RuntimeError, TimeoutError, aiohttp.ClientError) as exc:
        return {}, {"status": f"no done event ({type(exc).__name__})"}


async def _last_events(client: Client, invocation_id: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The last ``progress`` and the ``done`` event of a batch's event stream."""
    progress: dict[str, Any] = {}
    event = ""
    async with client.session.get(
        client.server.url + api.events_path(invocation_id),
        headers={"Integrations-API-Key": API_KEY},
    ) as stream:
        for _ in range(MAX_EVENT_LINES):
            raw = await stream.content.readline()
            if not raw:
                break
            line = raw.decode().rstrip("\r\n")
            if line.startswith("event:"):
                event = line.removeprefix("event:").strip()
            elif line.startswith("data:") and event in ("progress", "done"):
                data: dict[str, Any] = json.loads(line.removeprefix("data:").encode())
                if event == "done":
                    return progress, data
                progress = data
    raise RuntimeError("the event stream ended without a done event")


# Running the steps and judging them


@dataclass
class Row:
    """One line of the table."""

    step: str
    title: str
    outcome: Outcome | None
    seconds: float = 0.0
    #: The server's peak RSS during the step, and over the run so far.
    peak_rss_mb: tuple[float | None, float | None] = (None, None)
    health: HealthWindow | None = None
    others: tuple[bool, str] | None = None
    #: The server's log lines of the step that say ERROR or record a 500.
    errors: list[str] = field(default_factory=list)

    @property
    def problems(self) -> list[str]:
        if self.outcome is None:
            return []
        problems = list(self.outcome.problems)
        step_peak = self.peak_rss_mb[0]
        if step_peak is None or step_peak >= MAX_RSS_MB:
            problems.append(f"peak RSS {step_peak or 0:.0f} MB")
        if self.health is not None:
            if self.health.failures:
                problems.append(f"{self.health.failures} /health asks failed or took over 2 s")
            if self.health.slowest_ms is not None and self.health.slowest_ms >= MAX_HEALTH_MS:
                problems.append(f"/health took {self.health.slowest_ms:.0f} ms")
        if self.others is not None and not self.others[0]:
            problems.append(f"another batch: {self.others[1]}")
        if self.errors:
            problems.append(f"the server logged {len(self.errors)} errors: {self.errors[0][:160]}")
        return problems

    @property
    def verdict(self) -> str:
        if self.outcome is None:
            return "SKIP"
        return "FAIL" if self.problems else "PASS"

    def cells(self) -> list[str]:
        if self.outcome is None:
            skipped = "skipped: needs a disk that fails writes"
            return [self.step, self.title, "-", "-", "-", "-", "-", "-", self.verdict, skipped]
        health = "-"
        if self.health is not None and self.health.slowest_ms is not None:
            health = f"{self.health.slowest_ms:.0f} ({self.health.answers})"
        peaks = "/".join("-" if peak is None else f"{peak:.0f}" for peak in self.peak_rss_mb)
        return [
            self.step,
            self.title,
            self.outcome.answer,
            f"{self.seconds:.1f}",
            peaks,
            health,
            self.others[1] if self.others is not None else "-",
            str(len(self.errors)),
            self.verdict,
            " ".join(self.outcome.detail.split())[:100],
        ]


HEADER = [
    "#",
    "step",
    "answer",
    "s",
    "peak MB step/run",
    "/health ms (n)",
    "other batch",
    "errors",
    "verdict",
    "detail",
]


def print_table(rows: Sequence[Row]) -> None:
    table = [HEADER, *(row.cells() for row in rows)]
    # The detail, last, is left ragged.
    widths = [max(len(line[n]) for line in table) for n in range(len(HEADER) - 1)]
    for line in table:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=False))
            + "  "
            + line[-1]
        )


Step = Callable[[Client], Awaitable[Outcome]]


async def replay(client: Client, probe: HealthProbe, step: str, title: str, run: Step) -> Row:
    """Run one step under its time bound, then take its figures and ask for another batch."""
    log_offset = client.server.begin_step()
    started = time.monotonic()
    try:
        async with asyncio.timeout(STEP_TIMEOUT_S):
            outcome = await run(client)
    except TimeoutError:
        outcome = Outcome("hang", f"no end within {STEP_TIMEOUT_S:g} s", ["the step hung"])
    except Exception as exc:  # a step's failure is its row, not the end of the run
        outcome = Outcome("error", f"{type(exc).__name__}: {exc}", [type(exc).__name__])
    seconds = time.monotonic() - started
    others = outcome.others
    if others is None:
        others = await client.other_batch() if client.server.running else (False, "no: exited")
    health = probe.window(started, outcome.health_until or time.monotonic())
    peaks = client.server.peak_rss_mb()
    errors = client.server.errors_logged(log_offset)
    row = Row(step, title, outcome, seconds, peaks, health, others, errors)
    print(f"step {step}: {row.verdict} in {seconds:.1f} s", file=sys.stderr, flush=True)
    return row


async def replay_all(
    server: DefaultServer, provider: ProviderServer, probe: HealthProbe
) -> tuple[list[Row], list[str]]:
    """Every step, in the issue's order but for SIGTERM, which stops the server and goes last.

    A step that leaves the server holding more than ``MAX_RSS_MB`` fails, and
    the server is restarted after it, so that each later step is judged on
    what it does itself. Returns the rows and a note for each restart.
    """
    steps: list[tuple[str, str, Step | None]] = [
        ("1", "${output.n} amplification", step_amplification),
        ("2", "XLSX far row, XFD rows", step_xlsx),
        ("3", "50 MB provider answers", lambda client: step_huge_responses(client, provider)),
        ("4", "results memory", step_results_memory),
        ("5", "bare CR in CSV content", step_bare_cr),
        ("6", "inputs that were 500s", step_500s),
        ("7", "101 templates", step_templates),
        ("8", "20,002 columns", step_columns),
        ("9", "workbook write fails", None),
        ("11", "processing count", step_processing),
        ("10", "SIGTERM during a batch", step_sigterm),
    ]
    rows: list[Row] = []
    notes: list[str] = []
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        client = Client(session, server)
        for step, title, run in steps:
            if run is None:
                rows.append(Row(step, title, None))
                continue
            if not server.running:
                rows.append(Row(step, title, Outcome("-", "", ["the server had exited"])))
                continue
            rows.append(await replay(client, probe, step, title, run))
            if server.running and (held_mb := server.memory_mb("VmRSS")) >= MAX_RSS_MB:
                notes.append(
                    f"after step {step} the server still held {held_mb:.0f} MB: restarted it, "
                    "so that the next steps start from a fresh server"
                )
                await asyncio.to_thread(server.stop)
                await asyncio.to_thread(server.start)
                probe.port = server.port
    if not server.resets_peak:
        notes.append("VmHWM could not be reset: each step's peak RSS is the run's so far")
    return rows, notes


def main() -> int:
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="batchexec-hostile-") as folder:
        workdir = Path(folder)
        provider = ProviderServer(workdir)
        server = DefaultServer(workdir, provider.url)
        provider.start()
        try:
            server.start()
            probe = HealthProbe(server.port)
            probe.start()
            try:
                rows, notes = asyncio.run(replay_all(server, provider, probe))
            finally:
                probe.stop()
                server.stop()
        finally:
            provider.stop()
    print_table(rows)
    for note in notes:
        print(f"note: {note}")
    failed = [row for row in rows if row.verdict == "FAIL"]
    for row in failed:
        print(f"FAIL {row.step} ({row.title}): " + "; ".join(row.problems))
    passed = sum(1 for row in rows if row.verdict == "PASS")
    print(
        f"{passed} passed, {len(failed)} failed, {len(rows) - passed - len(failed)} skipped "
        f"in {time.monotonic() - started:.0f} s"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
