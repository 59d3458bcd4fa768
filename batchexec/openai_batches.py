"""The OpenAI Batch API's output and error files, written once a batch has ended.

Each ended request is one line, in the order of the input file: a succeeded one
in the output file as OpenAI writes it (``{"id", "custom_id", "response":
{"status_code": 200, "request_id", "body": <a chat.completion object with
usage>}, "error": null}``), any other in the error file (``"response": null,
"error": {"code", "message"}``; the code is ``request_failed``,
``request_timeout`` or ``batch_cancelled``). A file with no line is not
written (its id stays null), as at OpenAI.

``Finalizer`` writes them for every batch of the API that has ended, woken when
one ends here and every ``POLL_S`` besides. Each round it also cancels the
batches still running past their completion window (``expires_at``): they end
``expired``, their unfinished requests in the error file as ``batch_expired``.
A batch that ended in a process that died before its files were written (it
shows ``finalizing`` meanwhile) is finished by the next process, or by another replica. A claim
in the store gives each batch to one process at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Iterator

from batchexec.errors import ConflictError
from batchexec.records import Batch, Execution, ExecutionStatus
from batchexec.registry import Registry
from batchexec.store import FILE_CHUNK_BYTES, BatchStore, OpenAIBatch, StoredFile

log = logging.getLogger(__name__)

#: How often the store is asked for batches to finalize besides when one ends here.
POLL_S = 30.0
#: How long a claim to write a batch's files holds before another process may.
HOLD_S = 300.0
_ERROR_CODES = {
    ExecutionStatus.FAILED: "request_failed",
    ExecutionStatus.TIMED_OUT: "request_timeout",
    ExecutionStatus.SKIPPED: "request_failed",
    ExecutionStatus.CANCELLED: "batch_cancelled",
}


#: The error of a request not run before its batch's completion window passed.
EXPIRED = "The batch's completion window passed before this request ran."


class Finalizer:
    """Writes the output and error files of the OpenAI Batch API's ended batches, and
    cancels those that run past their completion window."""

    def __init__(self, registry: Registry, cancel: Callable[[str, str], Awaitable[None]]) -> None:
        """``cancel(batch_id, reason)`` cancels a batch wherever it runs (``Engine.cancel``)."""
        self._registry = registry
        self._cancel = cancel
        self._cancelling: set[asyncio.Task[None]] = set()
        self._woken = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="openai-finalizer")

    def batch_ended(self, batch: Batch) -> None:
        """``batch`` ended here: write its files now, if it is one of the API's."""
        if batch.api is not None:
            self._woken.set()

    async def close(self) -> None:
        for task in (self._task, *self._cancelling):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def _run(self) -> None:
        store = self._registry.store
        while True:
            self._woken.clear()
            try:
                for batch_id in await store.overdue_openai_batches():
                    self._expire(batch_id)
                for record in await store.due_finalizations(8, HOLD_S):
                    await self._finalize(record)
            except Exception:
                log.exception("could not write the output files of a batch; trying again later")
            # asyncio.timeout, not wait_for: Python 3.11's wait_for swallows a cancel that
            # arrives as the event is set, and close() then waits for ever.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(POLL_S):
                    await self._woken.wait()

    def _expire(self, batch_id: str) -> None:
        """Cancel ``batch_id``, past its completion window, in the background."""

        async def cancel() -> None:
            with contextlib.suppress(ConflictError):  # it ended meanwhile
                await self._cancel(batch_id, EXPIRED)
            log.info("batch %s: cancelled, its completion window passed", batch_id)

        task = asyncio.create_task(cancel(), name=f"expire-{batch_id}")
        self._cancelling.add(task)
        task.add_done_callback(self._cancelled)

    def _cancelled(self, task: asyncio.Task[None]) -> None:
        self._cancelling.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("could not cancel an expired batch", exc_info=task.exception())

    async def _finalize(self, record: OpenAIBatch) -> None:
        batch = await self._registry.get(record.id, record.owner)
        expired = record.expired_at is not None
        output, errors = await asyncio.to_thread(_render, batch, expired)
        store = self._registry.store
        written: list[str] = []
        try:
            output_id = await self._write(record, "output", output, written)
            error_id = await self._write(record, "error", errors, written)
            recorded = await store.openai_finalized(record.id, output_id, error_id, time.time())
        except BaseException:
            # Cut off (a store error, a shutdown): none of it stays to count against the key.
            await asyncio.shield(_delete(store, written))
            raise
        if not recorded:
            # Another process wrote and recorded the batch's files first (its claim had lapsed).
            await _delete(store, written)
            return
        log.info("batch %s: output and error files written", record.id)

    async def _write(
        self, record: OpenAIBatch, kind: str, chunks: list[bytes], written: list[str]
    ) -> str | None:
        """Write ``chunks`` as the batch's ``kind`` file, its id added to ``written`` first."""
        if not chunks:
            return None
        store = self._registry.store
        file = StoredFile(
            id=f"file-{secrets.token_hex(12)}",
            owner=record.owner,
            purpose="batch_output",
            filename=f"{record.id}_{kind}.jsonl",
            created_at=time.time(),
        )
        written.append(file.id)
        await store.create_stored_file(file)
        for seq, chunk in enumerate(chunks):
            await store.write_chunk(file.id, seq, chunk)
        await store.complete_file(file.id, sum(len(chunk) for chunk in chunks))
        return file.id


async def _delete(store: BatchStore, file_ids: list[str]) -> None:
    for file_id in file_ids:
        await store.delete_stored_file(file_id)


def _render(batch: Batch, expired: bool) -> tuple[list[bytes], list[bytes]]:
    """The output file's and the error file's chunks; ``expired``: cancelled rows expired."""
    finished = int(batch.finished_at or time.time())
    output = _chunks(
        _line(batch, e, finished, expired)
        for e in batch.executions
        if e.status is ExecutionStatus.SUCCEEDED
    )
    errors = _chunks(
        _line(batch, e, finished, expired)
        for e in batch.executions
        if e.status is not ExecutionStatus.SUCCEEDED
    )
    return output, errors


def _line(batch: Batch, execution: Execution, finished: int, expired: bool) -> bytes:
    custom_id = execution.cells.get("custom_id", "")
    request_id = f"{batch.id}-{execution.index}"
    line: dict[str, object] = {
        "id": f"batch_req_{hashlib.sha256(request_id.encode()).hexdigest()[:24]}",
        "custom_id": custom_id,
    }
    if execution.status is ExecutionStatus.SUCCEEDED:
        prompt, completion = execution.prompt_tokens, execution.completion_tokens
        usage = None
        if prompt is not None or completion is not None:
            usage = {
                "prompt_tokens": prompt or 0,
                "completion_tokens": completion or 0,
                "total_tokens": (prompt or 0) + (completion or 0),
            }
        line["response"] = {
            "status_code": 200,
            "request_id": request_id,
            "body": {
                "id": f"chatcmpl-{hashlib.sha256(request_id.encode()).hexdigest()[24:48]}",
                "object": "chat.completion",
                "created": finished,
                "model": execution.model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": execution.result or ""},
                        "finish_reason": "stop",
                        "logprobs": None,
                    }
                ],
                "usage": usage,
            },
        }
        line["error"] = None
    else:
        code = _ERROR_CODES.get(execution.status, "request_failed")
        if expired and execution.status is ExecutionStatus.CANCELLED:
            code = "batch_expired"
        line["response"] = None
        line["error"] = {
            "code": code,
            "message": execution.error or f"The request ended {execution.status.value}.",
        }
    return json.dumps(line, ensure_ascii=False).encode("utf-8", "surrogatepass") + b"\n"


def _chunks(lines: Iterator[bytes]) -> list[bytes]:
    chunks: list[bytes] = []
    pending: list[bytes] = []
    size = 0
    for line in lines:
        pending.append(line)
        size += len(line)
        if size >= FILE_CHUNK_BYTES:
            chunks.append(b"".join(pending))
            pending, size = [], 0
    if pending:
        chunks.append(b"".join(pending))
    return chunks
