"""The download route: a caller's workbook by its plain file name, made again if it is gone."""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from batchexec.errors import NotFoundError
from batchexec.web.keys import OWNER, REGISTRY, RESULT_WORKBOOKS, SETTINGS

XLSX_CONTENT_TYPE = "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"


async def download(request: web.Request) -> web.StreamResponse:
    """A workbook of the caller's, by its plain file name; anything else is 404."""
    name = request.match_info["file_name"]
    registry = request.app[REGISTRY]
    entry = await registry.check_file(name, request[OWNER])
    folder = request.app[SETTINGS].results_dir
    if not entry.template and _plain_name(name):
        workbooks = request.app[RESULT_WORKBOOKS]
        await workbooks.written(name)
        if not (folder / name).is_file():
            # Gone (a new disk, a cleaned folder, a crash mid-write): made from the records.
            batch = await registry.get(entry.batch_id, request[OWNER])
            if batch.status.finished and batch.file_name == name:
                await workbooks.ensure(batch)
    return web.FileResponse(
        _inside(folder, name),
        headers={
            "Content-Type": XLSX_CONTENT_TYPE,
            "Content-Disposition": f'attachment; filename="{name}"',
        },
    )


def _plain_name(name: str) -> bool:
    """Whether ``name`` is a plain file name: no folder, not hidden, nothing odd in it."""
    return (
        bool(name)
        and name == Path(name).name
        and not name.startswith(".")
        and not any(char in name for char in "\\\x00")
    )


def _inside(folder: Path, name: str) -> Path:
    """``folder / name`` if ``name`` is a plain file name of a regular file there, else 404."""
    if not _plain_name(name):
        raise NotFoundError("File not found")
    path = folder / name
    try:
        if path.is_symlink() or not path.is_file():
            raise NotFoundError("File not found")
        if path.resolve().parent != folder.resolve():
            raise NotFoundError("File not found")
    except OSError:
        raise NotFoundError("File not found") from None
    return path
