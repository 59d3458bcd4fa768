"""A large workbook written by a process of its own (``batchexec.workbook_process``).

What it writes is held to the same cells as the thread's writer by
``test_xlsx`` (its ``writer_process`` cases); here, how it fails and stops:
an error names the reason, a writer that dies is reported, and a write
that is cancelled stops its writer and leaves no file behind.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator
from typing import Any

import pytest

from batchexec import exports
from batchexec.exports import Sheet, StreamedSheet, write_workbook
from batchexec.workbook_process import write_sheet_apart
from tests.helpers import sheet_rows, until


class Rows:
    """Endless rows, counting those taken."""

    def __init__(self) -> None:
        self.taken = 0

    def __iter__(self) -> Iterator[list[Any]]:
        for n in itertools.count(1):
            self.taken = n
            yield [n, f"row {n}"]


@pytest.fixture
def writers(monkeypatch: pytest.MonkeyPatch) -> list[asyncio.subprocess.Process]:
    """The writer processes started, as they start."""
    started: list[asyncio.subprocess.Process] = []
    create = asyncio.create_subprocess_exec

    async def recorded(*args: Any, **kwargs: Any) -> asyncio.subprocess.Process:
        process = await create(*args, **kwargs)
        started.append(process)
        return process

    monkeypatch.setattr(asyncio, "create_subprocess_exec", recorded)
    return started


async def test_a_large_workbook_is_written_by_a_process_that_has_ended(tmp_path, writers):
    rows: list[list[Any]] = [[n, f"row {n}", n % 2 == 0] for n in range(exports._APART_ROWS + 5)]
    path = tmp_path / "out" / "book.xlsx"

    await write_workbook(path, Sheet(["n", "text", "even"], rows))

    assert len(writers) == 1 and writers[0].returncode == 0
    assert sheet_rows(path) == [["n", "text", "even"], *rows]
    assert [p.name for p in path.parent.iterdir()] == ["book.xlsx"]


async def test_a_small_workbook_is_written_without_a_process(tmp_path, writers):
    path = tmp_path / "book.xlsx"
    await write_workbook(path, Sheet(["n"], [[1], [2]]))
    assert writers == []
    assert sheet_rows(path) == [["n"], [1], [2]]


async def test_a_streamed_sheet_longer_than_the_bound_goes_to_the_process(tmp_path, writers):
    count = exports._APART_ROWS + 1
    sheet = StreamedSheet(["n"], ([n] for n in range(count)), count)
    await write_workbook(tmp_path / "book.xlsx", sheet)
    assert len(writers) == 1
    assert len(sheet_rows(tmp_path / "book.xlsx")) == count + 1


async def test_a_file_the_writer_cannot_make_raises_os_error_with_its_reason(tmp_path):
    with pytest.raises(OSError, match="No such file or directory"):
        await write_sheet_apart(tmp_path / "missing" / "book.xlsx", "Results", ["n"], [[1]], [8.0])


async def test_a_writer_that_dies_mid_write_is_reported(tmp_path, writers):
    rows = Rows()
    write = asyncio.create_task(
        write_sheet_apart(tmp_path / "book.xlsx", "Results", ["n", "text"], rows, [8.0, 8.0])
    )
    await until(lambda: rows.taken > 1000)
    writers[0].kill()
    with pytest.raises(OSError, match="writer stopped"):
        await write


async def test_a_cancelled_write_stops_its_writer_and_leaves_no_file(tmp_path, writers):
    rows = Rows()
    path = tmp_path / "book.xlsx"
    sheet = StreamedSheet(["n", "text"], iter(rows), exports._APART_ROWS + 1_000_000)
    write = asyncio.create_task(write_workbook(path, sheet))
    await until(lambda: rows.taken > 1000)
    write.cancel()
    with pytest.raises(asyncio.CancelledError):
        await write
    assert writers[0].returncode is not None
    assert list(tmp_path.iterdir()) == []
