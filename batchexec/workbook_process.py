"""A large workbook written by a process of its own, fed its rows a slice at a time.

xlsxwriter writes every cell in Python (about 50 µs a row of 15 cells): a
100,000-row workbook is five seconds of holding the interpreter lock, which
in a worker thread would stall the event loop again and again. Here the
server's loop makes the rows in ``slices.in_slices`` and sends them through
a pipe to ``python -m batchexec.workbook_process``, which runs at a lower
scheduling priority and writes them with ``xlsx.write_sheet``: the server
does the cheap part, a slice at a time, and never waits on the writer.

The pipe carries lines of JSON (ASCII, so a lone surrogate survives the
trip and no line holds a line break): a start (the path, the sheet's name,
header and widths, and the small sheets that follow it), lists of rows, and
``null`` at the end. A writer that ends without seeing ``null`` leaves its
file unfinished; the caller removes it.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from batchexec.slices import excused, in_slices
from batchexec.xlsx import Cell, MoreSheet, write_sheet

#: How much lower than the server's the writer's scheduling priority is.
_NICENESS = 10
#: Bytes of the writer's error output kept for the message.
_ERROR_BYTES = 4096
#: Where the writer finds batchexec: the host application may have found it by a path
#: of its own.
_PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent)


async def write_sheet_apart(
    path: Path,
    sheet_name: str,
    header: Sequence[str],
    rows: Iterable[Sequence[Cell]],
    widths: Sequence[float],
    more: Sequence[MoreSheet] = (),
) -> None:
    """``xlsx.write_sheet`` in a process of its own; ``rows`` are taken on the loop, in slices.

    A failure raises ``OSError`` with the writer's reason; cancelled, the
    writer is stopped. Either way ``path`` may hold a partial file.
    """
    inherited = os.environ.get("PYTHONPATH")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([_PACKAGE_ROOT, *([inherited] if inherited else [])]),
    }
    writer = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        __name__,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    assert writer.stdin is not None and writer.stderr is not None
    errors = asyncio.ensure_future(writer.stderr.read())
    try:
        try:
            writer.stdin.write(_line([str(path), sheet_name, header, widths, more]))
            async for chunk in in_slices(rows):
                writer.stdin.write(_line(chunk))
                await excused(writer.stdin.drain())
            writer.stdin.write(_line(None))
            await writer.stdin.drain()
            writer.stdin.close()
        except (BrokenPipeError, ConnectionResetError):
            pass  # it stopped early: its exit status and error output say why
        status = await writer.wait()
        reason = (await errors)[-_ERROR_BYTES:].decode(errors="replace").strip()
    finally:
        if writer.returncode is None:
            writer.kill()
            await writer.wait()
        errors.cancel()
    if status != 0:
        last = reason.splitlines()[-1] if reason else ""
        raise OSError(last or f"the workbook's writer stopped (exit status {status})")


def _line(value: object) -> bytes:
    return json.dumps(value).encode() + b"\n"


def _main() -> None:
    """The writer: a start, lists of rows, then null, a line each on standard input."""
    os.nice(_NICENESS)
    lines = iter(sys.stdin.buffer)

    def read() -> Any:  # our own JSON: the start, a list of rows, or null
        line = next(lines, None)
        if line is None:
            raise EOFError("the server stopped sending rows before the end")
        return json.loads(line)

    def rows() -> Iterable[Sequence[Cell]]:
        while (chunk := read()) is not None:
            yield from chunk

    try:
        path, sheet_name, header, widths, more = read()
        write_sheet(path, sheet_name, header, rows(), widths, more)
    except OSError as exc:
        sys.exit(exc.strerror or str(exc))
    except (ValueError, EOFError) as exc:
        sys.exit(str(exc) or type(exc).__name__)


if __name__ == "__main__":
    _main()
