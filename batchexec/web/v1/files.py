"""``/v1/files``: upload, list, retrieve, download and delete the Batch API's files.

An upload is read a part at a time and written to the store in chunks of
``store.FILE_CHUNK_BYTES``, so it is never held whole in memory however large
(``MAX_FILE_BYTES``, 200 MB by default, OpenAI's own limit); a download is
streamed back the same way. Only ``purpose=batch`` is taken: batch input
files. A batch's output and error files are ``batch_output``. Each key keeps
at most ``MAX_STORED_FILES``; a file goes after ``RESULTS_TTL_HOURS`` (its
``expires_at``).
"""

from __future__ import annotations

import asyncio
import secrets
import time

from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError

from batchexec.errors import FieldError, InputError, NotFoundError, QueueFullError
from batchexec.store import FILE_CHUNK_BYTES, BatchStore, StoredFile
from batchexec.web.keys import OWNER, REGISTRY, SETTINGS
from batchexec.web.requests import answer, validated
from batchexec.web.v1.schemas import FileDeleted, FileObject, FilesQuery, Page
from batchexec.wording import counted

#: The purposes an upload may have: batch input.
_PURPOSES = ("batch",)
#: The longest file name kept, and the largest form field other than the file.
_MAX_FILENAME_CHARS = 255
_MAX_FIELD_BYTES = 1024


def new_file_id() -> str:
    """A fresh file id, in OpenAI's form: ``file-`` and 24 hex digits."""
    return f"file-{secrets.token_hex(12)}"


async def create_file(request: web.Request) -> web.Response:
    """``POST /v1/files``: a multipart ``file`` with ``purpose=batch``."""
    settings = request.app[SETTINGS]
    store = request.app[REGISTRY].store
    owner = request[OWNER]
    limit = settings.max_file_bytes
    if request.content_length is not None and request.content_length > limit + 64 * 1024:
        raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=request.content_length)
    if request.content_type != "multipart/form-data":
        raise InputError(
            "Send the file as multipart/form-data with 'file' and 'purpose' fields.",
            [FieldError(None, "file", "attach a JSONL file")],
        )
    kept = await store.count_stored_files(owner)
    if kept >= settings.max_stored_files:
        raise QueueFullError(
            f"This API key keeps {counted(kept, 'file')}; the limit (MAX_STORED_FILES) is "
            f"{settings.max_stored_files}. Delete some, or wait for them to expire.",
            retry_after_s=60.0,
        )
    purpose: str | None = None
    stored: StoredFile | None = None
    try:
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader):
                raise InputError("Nested multipart parts are not supported.")
            if part.name == "file" and stored is None:
                stored = await _store_file(store, part, owner, limit)
            else:
                value = await _small_field(part)
                if part.name == "purpose":
                    purpose = value.strip()
    except ValueError as exc:
        await _forget(store, stored)
        raise InputError(f"The multipart body cannot be read: {exc}.") from exc
    except HttpProcessingError as exc:
        await _forget(store, stored)
        reason = " ".join(exc.message.split()) if exc.message else type(exc).__name__
        raise InputError(f"The multipart body cannot be read: {reason}.") from exc
    except BaseException:
        await _forget(store, stored)
        raise
    try:
        _check_purpose(purpose)
        if stored is None:
            raise InputError(
                "The upload has no 'file' field.", [FieldError(None, "file", "attach a file")]
            )
    except InputError:
        await _forget(store, stored)
        raise
    if await store.count_stored_files(owner) > settings.max_stored_files:
        # Uploads of the key that ran at once each passed the first count.
        await _forget(store, stored)
        raise QueueFullError(
            f"This API key keeps {settings.max_stored_files} files, the limit "
            "(MAX_STORED_FILES). Delete some, or wait for them to expire.",
            retry_after_s=60.0,
        )
    return answer(FileObject.of(stored, settings.results_ttl_s))


async def list_files(request: web.Request) -> web.Response:
    """``GET /v1/files``: the caller's files, newest first unless ``order=asc``."""
    query = validated(FilesQuery, dict(request.query), what="query string")
    files = await request.app[REGISTRY].store.stored_files(
        request[OWNER],
        purpose=query.purpose,
        after=query.after,
        limit=query.limit + 1,
        newest_first=query.order == "desc",
    )
    ttl_s = request.app[SETTINGS].results_ttl_s
    objects = [FileObject.of(file, ttl_s) for file in files]
    return answer(Page[FileObject].of(objects, limit=query.limit, ids=[file.id for file in files]))


async def retrieve_file(request: web.Request) -> web.Response:
    """``GET /v1/files/{file_id}``."""
    file = await _file_of(request)
    return answer(FileObject.of(file, request.app[SETTINGS].results_ttl_s))


async def file_content(request: web.Request) -> web.StreamResponse:
    """``GET /v1/files/{file_id}/content``: the bytes as uploaded or written, streamed."""
    file = await _file_of(request)
    store = request.app[REGISTRY].store
    response = web.StreamResponse(
        headers={
            "Content-Type": "application/octet-stream",
            "Content-Disposition": f'attachment; filename="{_header_safe(file.filename)}"',
        }
    )
    response.content_length = file.bytes
    await response.prepare(request)
    async for data in store.chunks(file.id):
        await response.write(data)
    await response.write_eof()
    return response


async def delete_file(request: web.Request) -> web.Response:
    """``DELETE /v1/files/{file_id}``."""
    file = await _file_of(request)
    await request.app[REGISTRY].store.delete_stored_file(file.id)
    return answer(FileDeleted(id=file.id))


async def _file_of(request: web.Request) -> StoredFile:
    file_id = request.match_info["file_id"]
    # No id batchexec makes holds a control character (and PostgreSQL's text holds no NUL).
    file = (
        await request.app[REGISTRY].store.stored_file(file_id, request[OWNER])
        if file_id.isprintable()
        else None
    )
    if file is None:
        raise NotFoundError(f"No such File object: {file_id}")
    return file


async def _store_file(
    store: BatchStore, part: BodyPartReader, owner: str, limit: int
) -> StoredFile:
    """Write the ``file`` part to the store in chunks; a part over ``limit`` bytes is 413."""
    filename = _filename(part.filename)
    file = StoredFile(
        id=new_file_id(), owner=owner, purpose="batch", filename=filename, created_at=time.time()
    )
    await store.create_stored_file(file)
    size, seq = 0, 0
    pending: list[bytes] = []
    pending_bytes = 0
    try:
        while chunk := await part.read_chunk(64 * 1024):
            size += len(chunk)
            if size > limit:
                raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=size)
            pending.append(chunk)
            pending_bytes += len(chunk)
            if pending_bytes >= FILE_CHUNK_BYTES:
                await store.write_chunk(file.id, seq, b"".join(pending))
                seq, pending, pending_bytes = seq + 1, [], 0
        if pending:
            await store.write_chunk(file.id, seq, b"".join(pending))
        await store.complete_file(file.id, size)
    except BaseException:
        await _forget(store, file)
        raise
    return StoredFile(file.id, owner, file.purpose, filename, file.created_at, size)


async def _small_field(part: BodyPartReader) -> str:
    """A form field other than the file, which is short: longer is 413."""
    data = b""
    while chunk := await part.read_chunk(_MAX_FIELD_BYTES):
        data += chunk
        if len(data) > _MAX_FIELD_BYTES:
            raise web.HTTPRequestEntityTooLarge(max_size=_MAX_FIELD_BYTES, actual_size=len(data))
    return data.decode("utf-8", errors="replace")


def _check_purpose(purpose: str | None) -> None:
    if purpose not in _PURPOSES:
        got = "none was sent" if purpose is None else f"not {purpose!r}"
        raise InputError(
            f"purpose must be 'batch' ({got}): batchexec keeps batch input files only.",
            [FieldError(None, "purpose", "must be 'batch'")],
        )


def _filename(name: str | None) -> str:
    """The file's name as kept: printable, at most ``_MAX_FILENAME_CHARS``."""
    cleaned = "".join(char for char in name or "" if char.isprintable())
    return cleaned[-_MAX_FILENAME_CHARS:] or "upload.jsonl"


def _header_safe(name: str) -> str:
    return "".join(char if char.isascii() and char not in '"\\' else "_" for char in name)


async def _forget(store: BatchStore, file: StoredFile | None) -> None:
    """Remove what was stored of a refused or cut-off upload, even while being cancelled."""
    if file is not None:
        await asyncio.shield(store.delete_stored_file(file.id))
