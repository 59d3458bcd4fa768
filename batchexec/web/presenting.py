"""A batch as the results route answers it: rendered once when finished, streamed.

The answer is built from the batch's records by the response models
(``ResultsResponse.of``). A finished batch's answer, without its per-request
head, is rendered off the loop once and kept in ``RESULTS_CACHE``; it is
written to the client a chunk at a time.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable

from aiohttp import web

from batchexec.exports import csv_sheet, render_csv
from batchexec.records import Batch, Execution
from batchexec.schemas import ExecutionOut, ResultsQuery, ResultsResponse
from batchexec.web.keys import CATALOG, RESULTS_CACHE
from batchexec.web.requests import xlsx_url

log = logging.getLogger(__name__)

#: Bytes of an answer written at a time, so a client that reads slowly holds a
#: chunk in the server's buffers, not a copy of the whole answer.
_WRITE_CHUNK_BYTES = 64 * 1024
#: Seconds a client may take to read one chunk before its connection is closed.
_WRITE_TIMEOUT_S = 30.0
#: An answer listing more rows than this (and not cached) is rendered off the loop.
_INLINE_ROWS = 1000
#: Fields of the results answer rendered per request, ahead of the cached rest.
_HEAD_FIELDS = ("status", "invocationId", "message", "xlsx_url")


async def answer_results(
    request: web.Request, batch: Batch, query: ResultsQuery | None = None
) -> web.StreamResponse:
    """The results answer of ``batch``: a finished one's rendered once, off the loop.

    With ``query.since`` only the executions ended after that cursor are in
    it, and with ``query.progress_only`` none: such answers cost what changed
    and are never cached.
    """
    url = xlsx_url(request, batch.xlsx_name) if batch.xlsx_name else None
    currency = request.app[CATALOG].currency
    if query is not None and (query.progress_only or query.since is not None):
        if query.progress_only:
            executions: list[Execution] = []
            cursor = batch.cursor if query.since is None else query.since
        else:
            executions, cursor = batch.ended_since(query.since or 0)
        rest = await _render(
            lambda: _tail(batch, executions, cursor, currency=currency), len(executions)
        )
    elif batch.status.finished:

        async def render() -> bytes:
            return await asyncio.to_thread(lambda: _dumps_in_pieces(_whole(batch, currency)))

        rest = await request.app[RESULTS_CACHE].get(batch.id, render)
    else:
        # A running batch's answer changes with every row: rendered each time
        # (its rows are read as they are at that moment).
        rest = await _render(lambda: _whole(batch, currency), len(batch.executions))
    # The head's closing brace gives way to the rest's fields; a view, not a copy,
    # of the cached rest, which may be tens of megabytes.
    return await _stream(request, [dumps(_head(batch, url))[:-1], b",", memoryview(rest)[1:]])


def dumps(value: object) -> bytes:
    """``value`` as UTF-8 JSON: a third of the bytes of ``\\u`` escapes for most non-ASCII text.

    A lone surrogate (JSON input can carry one) has no UTF-8 form; a body
    holding one is written with escapes instead.
    """
    try:
        return json.dumps(value, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        return json.dumps(value).encode()


def _head(batch: Batch, url: str | None) -> dict[str, object]:
    """The fields of a results answer that come first: from the record, costing no row.

    ``xlsx_url`` follows the request, so it is never part of the cached rest.
    """
    return {
        "status": batch.status.value,
        "invocationId": batch.id,
        "message": batch.message,
        "xlsx_url": url if batch.status.finished else None,
    }


async def _render(fields: Callable[[], dict[str, object]], rows: int) -> bytes:
    """``fields`` as JSON: in a worker thread, a field and a row at a time, when large."""
    if rows > _INLINE_ROWS:
        return await asyncio.to_thread(lambda: _dumps_in_pieces(fields()))
    return dumps(fields())


def _whole(batch: Batch, currency: str) -> dict[str, object]:
    """The whole answer's fields after the head: every finished row, by row number.

    A finished batch's CSV content is rendered from its records here: the
    results route does it once, off the event loop, and keeps the answer.
    """
    csv_content = render_csv(csv_sheet(batch)) if batch.status.finished else None
    finished = [e for e in batch.executions if e.status.finished]
    return _tail(batch, finished, batch.cursor, csv_content, currency=currency)


def _tail(
    batch: Batch,
    executions: list[Execution],
    cursor: int,
    csv_content: str | None = None,
    *,
    currency: str,
) -> dict[str, object]:
    """The fields of a results answer after the head, listing ``executions``."""
    answer = ResultsResponse.of(
        batch, csv_content=csv_content, executions=[], cursor=cursor, currency=currency
    )
    fields = answer.model_dump(mode="json", exclude=set(_HEAD_FIELDS))
    # A row at a time: one model_dump over 100,000 rows is one long C call that
    # holds the interpreter lock, stalling the event loop even from a thread.
    fields["executions"] = [ExecutionOut.of(e).model_dump(mode="json") for e in executions]
    return fields


def _dumps_in_pieces(fields: dict[str, object]) -> bytes:
    """``dumps(fields)``, made a field and a list item at a time.

    The same bytes; but the C encoder holds the interpreter lock for the whole
    of one call, so one call over a large answer would stall the event loop
    even from another thread.
    """
    chunks = [b"{"]
    for position, (name, value) in enumerate(fields.items()):
        if position:
            chunks.append(b", ")
        chunks.append(dumps(name) + b": ")
        if isinstance(value, list):
            chunks.append(b"[" + b", ".join(dumps(item) for item in value) + b"]")
        else:
            chunks.append(dumps(value))
    chunks.append(b"}")
    return b"".join(chunks)


async def _stream(request: web.Request, parts: list[bytes | memoryview]) -> web.StreamResponse:
    """A JSON answer of ``parts``, written a chunk at a time to the client's pace.

    A client that takes longer than ``_WRITE_TIMEOUT_S`` to read a chunk is
    disconnected, so clients that never read cannot pin answers in memory; one
    that goes away mid-answer is no error of the server's.
    """
    response = web.StreamResponse(headers={"Content-Type": "application/json; charset=utf-8"})
    response.content_length = sum(len(part) for part in parts)
    await response.prepare(request)
    try:
        for part in parts:
            view = memoryview(part)
            for start in range(0, len(view), _WRITE_CHUNK_BYTES):
                async with asyncio.timeout(_WRITE_TIMEOUT_S):
                    await response.write(view[start : start + _WRITE_CHUNK_BYTES])
                # write() yields only when the socket's buffer is full; a client that
                # reads fast would otherwise get megabytes in one turn of the loop.
                await asyncio.sleep(0)
    except TimeoutError:
        log.info("%s: the client read too slowly; connection closed", request.path)
        if request.transport is not None:
            request.transport.abort()
        return response
    except ConnectionError:
        log.info("%s: the client went away before the answer ended", request.path)
        return response
    await response.write_eof()
    return response
