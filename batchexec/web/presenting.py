"""A batch as the results route answers it: rendered once when finished, streamed.

The answer is built from the batch's records by the response models
(``ResultsResponse.of``, ``schemas.execution_fields``), on the event loop a
slice at a time (``slices``), so a 100,000-row answer never holds up
another request. A finished batch's answer, without its per-request head,
is rendered once and kept in ``RESULTS_CACHE``; it is written to the client
a chunk at a time.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Iterator, Sequence

from aiohttp import web

from batchexec.exports import render_csv_in_slices, streamed_csv
from batchexec.records import Batch, Execution
from batchexec.schemas import ResultsQuery, ResultsResponse, execution_fields
from batchexec.slices import in_slices, pause
from batchexec.web.cache import Head, Pieces
from batchexec.web.keys import CATALOG, RESULTS_CACHE, SETTINGS
from batchexec.web.requests import xlsx_url

log = logging.getLogger(__name__)

#: Bytes of an answer written at a time, so a client that reads slowly holds a
#: chunk in the server's buffers, not a copy of the whole answer.
_WRITE_CHUNK_BYTES = 64 * 1024
#: Seconds a client may take to read one chunk before its connection is closed.
_WRITE_TIMEOUT_S = 30.0
#: Fields of the results answer rendered per request, ahead of the cached rest.
_HEAD_FIELDS = ("status", "invocationId", "message", "xlsx_url")


async def answer_results(
    request: web.Request, batch: Batch, query: ResultsQuery | None = None
) -> web.StreamResponse:
    """The results answer of ``batch``: a finished one's rendered once, then kept.

    With ``query.since`` only the executions ended after that cursor are in
    it, and with ``query.progress_only`` none: such answers cost what changed
    and are never cached. Every answer is made on the loop a slice at a time
    (``slices``); a running batch's is the batch as it stood when asked, rows
    that end meanwhile left for the next poll.
    """
    currency = request.app[CATALOG].currency
    kept = Head.of(batch)
    head = _head(request, batch.id, kept)
    if query is not None and (query.progress_only or query.since is not None):
        if query.progress_only:
            executions: list[Execution] = []
            cursor = batch.cursor if query.since is None else query.since
        else:
            executions, cursor = batch.ended_since(query.since or 0)
        rest = await _render(batch, executions, cursor, currency=currency)
    elif batch.status.finished:

        async def render() -> Pieces:
            csv_content = await render_csv_in_slices(streamed_csv(batch))
            return await _render(
                batch, batch.executions, batch.cursor, csv_content, currency=currency
            )

        rest = await request.app[RESULTS_CACHE].get(batch.id, render, kept)
    else:
        rest = await _render(batch, batch.executions, batch.cursor, currency=currency)
    return await _joined(request, head, rest)


async def answer_kept(request: web.Request, batch_id: str, owner: str) -> web.StreamResponse | None:
    """The whole results answer of ``owner``'s finished batch ``batch_id`` as kept in
    ``RESULTS_CACHE``, made without the batch; None when none is kept for it (or it is
    another owner's, or past ``RESULTS_TTL_S``): ask the registry then.

    A finished batch too large for ``BATCH_CACHE_BYTES`` is read back from the
    store whenever it is asked for (100,000 rows: a second of work and as much
    memory again as its rows); a client polling its results costs that once.
    """
    expired_before = time.time() - request.app[SETTINGS].results_ttl_s
    found = request.app[RESULTS_CACHE].kept(batch_id, owner, expired_before)
    if found is None:
        return None
    head, rest = found
    return await _joined(request, _head(request, batch_id, head), rest)


async def _joined(request: web.Request, head: bytes, rest: Pieces) -> web.StreamResponse:
    # The head's closing brace gives way to the rest's fields (its pieces after its
    # opening brace): the cached rest, which may be tens of megabytes, is not copied.
    return await _stream(request, [head[:-1], b",", *rest[1:]])


def dumps(value: object) -> bytes:
    """``value`` as UTF-8 JSON: a third of the bytes of ``\\u`` escapes for most non-ASCII text.

    A lone surrogate (JSON input can carry one) has no UTF-8 form; a body
    holding one is written with escapes instead.
    """
    try:
        return json.dumps(value, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        return json.dumps(value).encode()


def _head(request: web.Request, batch_id: str, head: Head) -> bytes:
    """The fields of a results answer that come first, as JSON: from the record, costing
    no row.

    ``xlsx_url`` follows the request, so it is never part of the cached rest.
    """
    url = xlsx_url(request, head.xlsx_name) if head.xlsx_name else None
    return dumps(
        {
            "status": head.status.value,
            "invocationId": batch_id,
            "message": head.message,
            "xlsx_url": url if head.status.finished else None,
        }
    )


async def _render(
    batch: Batch,
    executions: Sequence[Execution],
    cursor: int,
    csv_content: str | None = None,
    *,
    currency: str,
) -> Pieces:
    """The fields of a results answer after the head, as JSON in pieces (the first
    ``{``), listing by row those of ``executions`` that had ended by ``cursor``.

    The same bytes as ``dumps`` of the answer's fields, made a slice at a
    time: the C encoder holds the loop for the whole of one call, which over
    100,000 rows is a second.
    """
    answer = ResultsResponse.of(
        batch, csv_content=csv_content, executions=[], cursor=cursor, currency=currency
    )
    fields = answer.model_dump(mode="json", exclude=set(_HEAD_FIELDS))
    chunks = [b"{"]
    for position, (name, value) in enumerate(fields.items()):
        if position:
            chunks.append(b", ")
        chunks.append(dumps(name) + b": ")
        if name == "executions":
            chunks += [b"[", *await _listed(executions, cursor), b"]"]
        elif isinstance(value, str):
            chunks += await _string(value)
        else:
            chunks.append(dumps(value))
    chunks.append(b"}")
    return tuple(chunks)


async def _listed(executions: Sequence[Execution], cursor: int) -> list[bytes]:
    """The JSON list items (``ExecutionOut``) of those of ``executions`` ended by ``cursor``,
    comma-separated: rows that end later are not in it, so a running batch's answer
    is one moment's. A row that has ended never changes again."""
    pieces: list[bytes] = []
    async for some in in_slices(executions):
        listed = [
            execution_fields(execution)
            for execution in some
            if execution.outcome.status.finished and execution.outcome.seq <= cursor
        ]
        if listed:
            if pieces:
                pieces.append(b", ")
            pieces.append(dumps(listed)[1:-1])
    return pieces


#: Characters of a long string field (``csv_content``) encoded at a time.
_STRING_PIECE = 256 * 1024


async def _string(value: str) -> list[bytes]:
    """``dumps(value)`` of a string, in pieces: JSON escapes a character at a time, so the
    pieces' escapes end to end are the whole's."""
    if len(value) <= _STRING_PIECE:
        return [dumps(value)]
    pieces = [b'"']
    for start in range(0, len(value), _STRING_PIECE):
        pieces.append(dumps(value[start : start + _STRING_PIECE])[1:-1])
        await pause()
    pieces.append(b'"')
    return pieces


def _chunks(parts: Sequence[bytes | memoryview]) -> Iterator[bytes | memoryview]:
    """``parts`` end to end in writes of about ``_WRITE_CHUNK_BYTES``: small pieces
    gathered (each write costs more than the copy), large ones cut."""
    gathered: list[bytes | memoryview] = []
    size = 0
    for part in parts:
        view = memoryview(part)
        if len(view) >= _WRITE_CHUNK_BYTES:
            if gathered:
                yield b"".join(gathered)
                gathered, size = [], 0
            for start in range(0, len(view), _WRITE_CHUNK_BYTES):
                yield view[start : start + _WRITE_CHUNK_BYTES]
            continue
        gathered.append(view)
        size += len(view)
        if size >= _WRITE_CHUNK_BYTES:
            yield b"".join(gathered)
            gathered, size = [], 0
    if gathered:
        yield b"".join(gathered)


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
        for chunk in _chunks(parts):
            async with asyncio.timeout(_WRITE_TIMEOUT_S):
                await response.write(chunk)
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
