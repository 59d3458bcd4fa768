"""``python -m benchmarks.health_probe URL OUT.json``: ask ``GET URL/health`` every 20 ms.

A process of its own, so that what it measures is the server's event loop and
not the harness's: the harness is busy encoding, streaming and parsing the
very batch that loads the server. Each probe is kept with its start on
``time.monotonic()`` (the system-wide ``CLOCK_MONOTONIC``, the clock the
harness marks its phases on), its latency and its status or error. SIGINT or
SIGTERM stops it, after the probe under way; then it writes ``OUT.json``.
"""

from __future__ import annotations

import argparse
import http.client
import json
import signal
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import urlsplit

from batchexec import api

EVERY_MS = 20.0
TIMEOUT_S = 2.0
#: How long it probes at most, should its parent die without stopping it.
MAX_S = 900.0


class Probe:
    """Asks ``/health`` of one server, on a new connection each time or on one kept alive."""

    def __init__(self, url: str, *, keep_alive: bool, timeout_s: float) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise SystemExit(f"health_probe: {url!r} is not an http:// URL")
        self.host = parts.hostname
        self.port = parts.port or 80
        self.path = parts.path.rstrip("/") + api.HEALTH
        self.keep_alive = keep_alive
        self.timeout_s = timeout_s
        self._connection: http.client.HTTPConnection | None = None

    def ask(self) -> dict[str, Any]:
        """One probe: when it started, how long it took, what came back."""
        started = time.monotonic()
        status: int | None = None
        error: str | None = None
        connection = self._connection or http.client.HTTPConnection(
            self.host, self.port, timeout=self.timeout_s
        )
        try:
            connection.request("GET", self.path)
            answer = connection.getresponse()
            answer.read()
            status = answer.status
        except (OSError, http.client.HTTPException) as exc:
            error = f"{type(exc).__name__}: {exc}"
        latency_ms = (time.monotonic() - started) * 1000
        if self.keep_alive and error is None:
            self._connection = connection
        else:
            connection.close()
            self._connection = None
        return {"start_s": started, "latency_ms": latency_ms, "status": status, "error": error}

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None


class _Stop:
    """Set by SIGINT or SIGTERM; the loop ends after the probe under way."""

    def __init__(self) -> None:
        self.requested = False
        signal.signal(signal.SIGINT, self._set)
        signal.signal(signal.SIGTERM, self._set)

    def _set(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True


def probe(target: Probe, every_s: float, max_s: float, stop: _Stop) -> list[dict[str, Any]]:
    """Probes ``every_s`` apart, start to start, until stopped; a slow one delays the next."""
    probes: list[dict[str, Any]] = []
    deadline = time.monotonic() + max_s
    while not stop.requested and time.monotonic() < deadline:
        probes.append(target.ask())
        if len(probes) == 1:
            # The harness starts its phases only once the probe is known to be under way.
            print(f"probing {target.host}:{target.port}{target.path}", flush=True)
        pause_s = probes[-1]["start_s"] + every_s - time.monotonic()
        if pause_s > 0:
            time.sleep(pause_s)
    target.close()
    return probes


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.health_probe",
        description="Ask GET URL/health at a steady pace until SIGINT or SIGTERM; "
        "then write every probe's start (time.monotonic), latency and status to OUT.",
    )
    parser.add_argument("url", help="the server's base URL, e.g. http://127.0.0.1:8080")
    parser.add_argument("out", type=Path, help="the JSON file to write")
    parser.add_argument("--every-ms", type=float, default=EVERY_MS)
    parser.add_argument("--timeout-s", type=float, default=TIMEOUT_S)
    parser.add_argument("--max-s", type=float, default=MAX_S)
    parser.add_argument(
        "--keep-alive", action="store_true", help="reuse one connection (default: a new one each)"
    )
    args = parser.parse_args(argv)
    stop = _Stop()
    target = Probe(args.url, keep_alive=args.keep_alive, timeout_s=args.timeout_s)
    probes = probe(target, args.every_ms / 1000, args.max_s, stop)
    document = {
        "url": args.url + api.HEALTH,
        "every_ms": args.every_ms,
        "timeout_s": args.timeout_s,
        "keep_alive": args.keep_alive,
        "clock": "time.monotonic",
        "probes": probes,
    }
    args.out.write_text(json.dumps(document) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
