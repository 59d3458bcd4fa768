"""A small client of the batchexec HTTP API: submit, wait for the end, fetch the results."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from batchexec import api
from benchmarks.server import API_KEY

EXECUTE = api.EXECUTE_BATCH
RESULTS = api.RESULTS
FINISHED = frozenset({"completed", "failed", "cancelled"})
#: How often the fallback polls the results route when the events route is missing.
_POLL_S = 0.005


class BatchClient:
    """Talks to one server through one ``aiohttp.ClientSession``."""

    def __init__(self, session: aiohttp.ClientSession, base_url: str) -> None:
        self.session = session
        self.base_url = base_url
        self.headers = {"Integrations-API-Key": API_KEY}

    async def submit(self, executions: Sequence[Mapping[str, str]]) -> str:
        """Start a batch; returns its invocation id."""
        body = json.dumps({"executions": list(executions)}).encode()
        async with self.session.post(
            self.base_url + EXECUTE,
            data=body,
            headers={**self.headers, "Content-Type": "application/json"},
        ) as answer:
            payload = await answer.json()
            if answer.status != 200:
                raise RuntimeError(f"submit: HTTP {answer.status}: {str(payload)[:500]}")
        invocation_id: str = payload["invocationId"]
        return invocation_id

    async def wait_done(self, batch_id: str) -> str:
        """Wait for the batch's ``done`` server-sent event; returns its status.

        Falls back to polling the results route every 5 ms where the events
        route does not answer 200.
        """
        async with self.session.get(
            self.base_url + api.events_path(batch_id), headers=self.headers
        ) as stream:
            if stream.status == 200:
                event = ""
                async for raw in stream.content:
                    line = raw.decode().rstrip("\r\n")
                    if line.startswith("event:"):
                        event = line.removeprefix("event:").strip()
                    elif line.startswith("data:") and event == "done":
                        status: str = json.loads(line.removeprefix("data:"))["status"]
                        return status
                raise RuntimeError(f"events of {batch_id} ended without a done event")
        while True:
            payload = await self.results(batch_id)
            if payload["status"] in FINISHED:
                finished: str = payload["status"]
                return finished
            await asyncio.sleep(_POLL_S)

    async def results(self, batch_id: str, **query: object) -> dict[str, Any]:
        """The results route's answer for ``batch_id``; ``query`` adds fields to the request
        (``since``, ``progress_only``)."""
        async with self.session.post(
            self.base_url + RESULTS,
            json={"invocation_id": batch_id, **query},
            headers=self.headers,
        ) as answer:
            payload: dict[str, Any] = await answer.json()
            if answer.status != 200:
                raise RuntimeError(f"results: HTTP {answer.status}: {str(payload)[:500]}")
            return payload

    async def run(self, executions: Sequence[Mapping[str, str]]) -> str:
        """Submit and wait for the end; returns the invocation id."""
        batch_id = await self.submit(executions)
        await self.wait_done(batch_id)
        return batch_id

    async def settle(self, batch_id: str) -> None:
        """Wait until the server has written the finished batch's workbook (it is
        written after ``done``): fetching it waits for that write. A timed run then
        never pays for the workbook of the run before, on this server or another
        one on the machine."""
        xlsx_url = (await self.results(batch_id, progress_only=True)).get("xlsx_url")
        if not xlsx_url:
            raise RuntimeError(f"batch {batch_id}: no xlsx_url to wait for")
        await self.download(xlsx_url)

    async def download(self, xlsx_url: str) -> bytes:
        """The workbook ``xlsx_url`` names, fetched from this server."""
        async with self.session.get(
            self.base_url + urlsplit(xlsx_url).path, headers=self.headers
        ) as answer:
            workbook = await answer.read()
            if answer.status != 200 or not workbook.startswith(b"PK"):
                raise RuntimeError(f"download {xlsx_url}: HTTP {answer.status}: {workbook[:200]!r}")
        return workbook

    async def check_succeeded(self, batch_id: str, total: int) -> dict[str, Any]:
        """The results, after checking the batch completed with every row succeeded."""
        payload = await self.results(batch_id)
        succeeded = payload.get("progress", {}).get("succeeded")
        if payload["status"] != "completed" or succeeded != total:
            raise RuntimeError(
                f"batch {batch_id}: {payload['status']}, {succeeded} of {total} succeeded: "
                f"{payload.get('message')}"
            )
        return payload


def session(connections: int = 100) -> aiohttp.ClientSession:
    """A client session for the harness: no overall timeout, ``connections`` at most."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=connections),
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
    )
