"""The benchmarks' subprocesses: the real service and stand-in providers; start, stop.

The service runs with a catalog and settings in a temporary folder; a
PostgreSQL store, on a fresh schema of ``BENCH_POSTGRES_URL``'s server.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType

import asyncpg
from pydantic import AliasChoices

from batchexec.config import Settings
from benchmarks.common import ROOT, mb

API_KEY = "bench-token"
#: Echo models the harness's catalog defines: name -> simulated latency in seconds.
ECHO_MODELS: Mapping[str, float] = {
    "bench-echo-100ms": 0.1,
    "bench-echo-0": 0.0,
    "bench-echo-1ms": 0.001,
}
_START_TIMEOUT_S = 60.0
_STOP_TIMEOUT_S = 60.0
#: Variables that would change what the server does and that the harness does not set.
_CLEARED = ("OPENAI_BASE_URL", "SERVER_NAME", "HOST", "PORT")
#: The package's default store: a SQLite file relative to the server's working directory.
SQLITE_DEFAULT_URL = "sqlite:///batchexec.db"
MEMORY_URL = "memory://"
#: The PostgreSQL server of the PostgreSQL scenarios, without a schema (each makes its own).
POSTGRES_URL = (
    os.environ.get("BENCH_POSTGRES_URL", "").strip() or "postgresql://postgres@127.0.0.1:5432/test"
)
_POSTGRES_REACH_S = 3.0


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This environment, with the repository importable, the given variables set."""
    env = {name: value for name, value in os.environ.items() if name not in _CLEARED}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.update(extra or {})
    return env


def setting_names() -> frozenset[str]:
    """Every environment variable batchexec reads a setting from, upper-cased."""
    names: set[str] = set()
    for spec in Settings.model_fields.values():
        if isinstance(spec.validation_alias, AliasChoices):
            names.update(str(choice).upper() for choice in spec.validation_alias.choices)
    return frozenset(names)


def batchexec_env(settings: Mapping[str, str]) -> dict[str, str]:
    """This environment with every batchexec setting removed, then only ``settings`` set."""
    cleared = setting_names()
    env = {name: value for name, value in child_env().items() if name.upper() not in cleared}
    env.update(settings)
    return env


def spawn(
    command: Sequence[str], log_path: Path, env: Mapping[str, str], cwd: Path | None = None
) -> subprocess.Popen[bytes]:
    """Start ``command``, its stdout and stderr written to ``log_path``."""
    with log_path.open("wb") as log:
        return subprocess.Popen(  # noqa: S603 - our own interpreter and arguments
            command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT
        )


def spawn_serve(
    workdir: Path, port: int, settings: Mapping[str, str], log_path: Path
) -> subprocess.Popen[bytes]:
    """``python -m batchexec serve`` in ``workdir``, with no batchexec setting but ``settings``."""
    command = [sys.executable, "-m", "batchexec", "serve", "--port", str(port)]
    return spawn(command, log_path, batchexec_env(settings), cwd=workdir)


def wait_for_http(url: str, process: subprocess.Popen[bytes], timeout_s: float) -> None:
    """Block until ``url`` answers 200; raise if the process exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args!r} exited with {process.returncode} before {url}")
        try:
            with urllib.request.urlopen(url, timeout=1) as answer:  # noqa: S310 - loopback
                if answer.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{url} did not answer within {timeout_s:g} s")


def stop_process(process: subprocess.Popen[bytes], what: str) -> int:
    """SIGINT, as a person at the terminal would; SIGKILL if it does not exit in time."""
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            print(f"benchmarks: {what} ignored SIGINT; killing it", file=sys.stderr)
            process.kill()
            process.wait()
    return process.returncode


def postgres_where(url: str = POSTGRES_URL) -> str:
    """``url``'s host and port, without its user and password."""
    return url.partition("://")[2].partition("/")[0].rpartition("@")[2] or url


async def _postgres_connect(url: str) -> asyncpg.Connection[asyncpg.Record]:
    return await asyncio.wait_for(
        asyncpg.connect(url, timeout=_POSTGRES_REACH_S), _POSTGRES_REACH_S
    )


def postgres_unreachable(url: str = POSTGRES_URL) -> str | None:
    """Why the PostgreSQL server of ``url`` cannot be used, in one line; None if it answers."""

    async def attempt() -> None:
        conn = await _postgres_connect(url)
        await conn.close()

    try:
        asyncio.run(attempt())
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        reason = " ".join((str(exc) or type(exc).__name__).split())
        return f"PostgreSQL not reachable at {postgres_where(url)} (BENCH_POSTGRES_URL): {reason}"
    return None


def with_schema(url: str, schema: str) -> str:
    """``url`` with ``schema`` as its search path (asyncpg sends it as a setting)."""
    return f"{url}{'&' if '?' in url else '?'}search_path={schema}"


@contextmanager
def postgres_schema(label: str, url: str = POSTGRES_URL) -> Iterator[str]:
    """A fresh schema ``batchexec_bench_<label>_<hex>``: a URL to it, then it is dropped.

    Leave the block only once the servers using it have stopped.
    """
    schema = f"batchexec_bench_{label}_{secrets.token_hex(4)}"

    async def execute(statement: str) -> None:
        conn = await _postgres_connect(url)
        try:
            await conn.execute(statement)
        finally:
            await conn.close()

    asyncio.run(execute(f'CREATE SCHEMA "{schema}"'))
    try:
        yield with_schema(url, schema)
    finally:
        try:
            asyncio.run(execute(f'DROP SCHEMA "{schema}" CASCADE'))
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            # Not to hide what went wrong inside the block (the server gone, often).
            print(f"benchmarks: could not drop schema {schema}: {exc}", file=sys.stderr)


def status_mb(pid: int, field: str) -> float:
    """A memory figure of ``/proc/PID/status`` (``VmHWM``, ``VmRSS``), in MB."""
    status = Path(f"/proc/{pid}/status").read_text()
    for line in status.splitlines():
        if line.startswith(f"{field}:"):
            return mb(float(line.split()[1]))
    raise RuntimeError(f"no {field} in /proc/{pid}/status")


class ModuleProcess:
    """``python -m MODULE --port PORT ARGS...`` on a free port, its output in ``log_path``."""

    def __init__(
        self,
        module: str,
        log_path: Path,
        args: Sequence[str] = (),
        *,
        name: str,
        start_timeout_s: float,
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.name = name
        self.output_path = log_path
        self._command = [sys.executable, "-m", module, "--port", str(self.port), *args]
        self._start_timeout_s = start_timeout_s
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start it and wait for ``/health``."""
        self._process = spawn(self._command, self.output_path, child_env())
        wait_for_http(f"{self.url}/health", self._process, self._start_timeout_s)

    def stop(self) -> None:
        if self._process is not None:
            stop_process(self._process, self.name)
            self._process = None


class Server:
    """``python -m batchexec serve`` with the harness's catalog and limits, in ``workdir``.

    ``command`` replaces ``-m batchexec`` (the profiled launcher uses it). The
    server runs with ``workdir`` as its working directory, so no ``.env`` of the
    repository is read, and writes its log there rather than to a pipe that
    could fill up. ``database_url`` becomes its ``DATABASE_URL``; the default,
    a relative SQLite path, puts the database in ``workdir`` too. ``models``
    (TOML) is appended to the catalog of echo models, and ``settings`` are set
    over the harness's limits.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        max_threads: int = 100,
        command: Sequence[str] = ("-m", "batchexec"),
        name: str = "server",
        database_url: str = SQLITE_DEFAULT_URL,
        models: str = "",
        settings: Mapping[str, str] | None = None,
    ) -> None:
        self.workdir = workdir
        self.name = name
        self.database_url = database_url
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._command = [sys.executable, *command, "serve", "--port", str(self.port)]
        self._max_threads = max_threads
        self._models = models
        self._settings = dict(settings or {})
        self._process: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / f"{name}.log"

    def __enter__(self) -> Server:
        self.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        catalog = self.workdir / "models.toml"
        catalog.write_text(
            "".join(
                f'[models."{model}"]\nprovider = "echo"\nlatency_s = {latency}\n\n'
                for model, latency in ECHO_MODELS.items()
            )
            + self._models
        )
        env = child_env(
            {
                "INTEGRATIONS_API_KEYS": API_KEY,
                "BATCHEXEC_MODELS": str(catalog),
                "PUBLIC_DIR": str(self.workdir / "public"),
                "DEFAULT_MAX_THREADS": str(self._max_threads),
                "MAX_EXECUTIONS_PER_BATCH": "10000",
                "MAX_PROMPT_LENGTH": "100000",
                "MAX_BODY_BYTES": str(64 * 1024 * 1024),
                "SHUTDOWN_GRACE_S": "5",
                "DATABASE_URL": self.database_url,
                **self._settings,
            }
        )
        self._process = spawn(self._command, self.log_path, env, cwd=self.workdir)
        try:
            wait_for_http(f"{self.url}/health", self._process, _START_TIMEOUT_S)
        except RuntimeError as error:
            stop_process(self._process, self.name)  # if it still runs
            self._process = None
            tail = self.log_path.read_text(errors="replace").strip().splitlines()[-1:]
            raise RuntimeError(f"{self.name}: {error}; its log ends: {''.join(tail)}") from None

    @property
    def pid(self) -> int:
        if self._process is None:
            raise RuntimeError("the server is not running")
        return self._process.pid

    def peak_rss_mb(self) -> float:
        """The server's peak resident memory so far (``VmHWM``), in MB."""
        return status_mb(self.pid, "VmHWM")

    def rss_mb(self) -> float:
        """The server's resident memory now (``VmRSS``), in MB."""
        return status_mb(self.pid, "VmRSS")

    def stop(self) -> None:
        if self._process is None:
            return
        code = stop_process(self._process, self.name)
        self._process = None
        if code != 0:
            tail = self.log_path.read_text(errors="replace")[-2000:]
            print(
                f"benchmarks: {self.name} exited with {code}; its log ends:\n{tail}",
                file=sys.stderr,
            )
