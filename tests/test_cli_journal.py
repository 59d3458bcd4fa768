"""``run`` journals its batch: killed or stopped, the same command continues it."""

from __future__ import annotations

import asyncio
import errno
import io
import re
import signal
import sys
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from batchexec.catalog import Catalog
from batchexec.cli.inputfile import read_source
from batchexec.cli.run import run_batch
from batchexec.config import Settings
from batchexec.records import ExecutionStatus
from batchexec.store.sqlite import SQLiteStore
from tests.helpers import PROCESS_TIMEOUT_S, column, sheet_rows, write_csv

ROWS = 40


class CountingModel:
    """An OpenAI-compatible server that answers each prompt after a pause and counts calls."""

    def __init__(self, latency_s: float) -> None:
        self.latency_s = latency_s
        self.calls: Counter[str] = Counter()
        self.app = web.Application()
        self.app.router.add_post("/v1/chat/completions", self._complete)

    async def _complete(self, request: web.Request) -> web.Response:
        prompt = (await request.json())["messages"][-1]["content"]
        self.calls[prompt] += 1
        await asyncio.sleep(self.latency_s)
        return web.json_response(
            {"choices": [{"message": {"role": "assistant", "content": f"<{prompt}>"}}]}
        )


@pytest.fixture
async def model() -> AsyncIterator[tuple[CountingModel, str]]:
    counting = CountingModel(latency_s=0.05)
    server = TestServer(counting.app, host="127.0.0.1")
    await server.start_server()
    try:
        yield counting, str(server.make_url("/v1"))
    finally:
        await server.close()


def prepare(tmp_path: Path, base_url: str) -> list[str]:
    (tmp_path / "models.toml").write_text(
        f'[models."counted"]\nprovider = "openai"\nbase_url = "{base_url}"\nmodel_id = "m"\n'
    )
    write_csv(
        tmp_path / "prompts.csv",
        ["prompt", "model"],
        [[f"row {n}", "counted"] for n in range(ROWS)],
    )
    return ["run", "prompts.csv", "-o", "out.xlsx", "--models", "models.toml", "--threads", "2"]


async def run(
    tmp_path: Path,
    args: list[str],
    *,
    stop_after: int | None = None,
    how: signal.Signals = signal.SIGKILL,
) -> tuple[int, str]:
    """Run the command; with ``stop_after``, send ``how`` once that many rows are done."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "batchexec",
        *args,
        "--progress-every",
        "0.05",
        cwd=tmp_path,
        stderr=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL,
    )
    assert process.stderr is not None
    lines: list[str] = []
    async with asyncio.timeout(PROCESS_TIMEOUT_S):
        while raw := await process.stderr.readline():
            line = raw.decode()
            lines.append(line)
            done = re.match(r"progress: (\d+)/\d+ done", line)
            if stop_after is not None and done and int(done[1]) >= stop_after:
                process.send_signal(how)
                stop_after = None
        code = await process.wait()
    return code, "".join(lines)


async def journaled(path: Path) -> dict[int, ExecutionStatus]:
    """The rows' statuses in a journal, read as the next run would."""
    store = SQLiteStore(path)
    await store.open()
    try:
        (batch,) = await store.unfinished()
        return {execution.index: execution.status for execution in batch.executions}
    finally:
        await store.close()


async def test_a_killed_run_continues_without_sending_a_finished_row_again(tmp_path, model):
    counting, base_url = model
    args = prepare(tmp_path, base_url)
    code, _ = await run(tmp_path, args, stop_after=6)
    assert code == -signal.SIGKILL
    journal = tmp_path / "out.xlsx.journal"
    statuses = await journaled(journal)
    finished = {index for index, status in statuses.items() if status.finished}
    assert 6 <= len(finished) < ROWS
    before = counting.calls.copy()

    code, text = await run(tmp_path, args)
    assert code == 0, text
    assert f"continuing the run in {journal.name}: {len(finished)} of {ROWS}" in text
    again = counting.calls - before
    for index in finished:
        assert again[f"row {index - 1}"] == 0, f"row {index} was sent again"
    # Rows in flight when it was killed (2 threads) may be sent twice, no others.
    assert sum(counting.calls.values()) <= ROWS + 2
    assert set(counting.calls) == {f"row {n}" for n in range(ROWS)}
    rows = sheet_rows(tmp_path / "out.xlsx")
    assert column(rows, "status") == ["succeeded"] * ROWS
    assert column(rows, "result") == [f"<row {n}>" for n in range(ROWS)]
    assert not journal.exists(), "the journal goes once the run has ended"


async def test_ctrl_c_keeps_the_journal_and_the_same_command_continues(tmp_path, model):
    counting, base_url = model
    args = prepare(tmp_path, base_url)
    code, text = await run(tmp_path, args, stop_after=4, how=signal.SIGINT)
    assert code == 130, text
    assert "run the same command again to continue it" in text
    statuses = column(sheet_rows(tmp_path / "out.xlsx"), "status")
    done = statuses.count("succeeded")
    assert statuses == ["succeeded"] * done + ["cancelled"] * (ROWS - done)
    before = counting.calls.copy()

    code, text = await run(tmp_path, args)
    assert code == 0, text
    assert f"{done} of {ROWS} rows had finished" in text
    assert column(sheet_rows(tmp_path / "out.xlsx"), "status") == ["succeeded"] * ROWS
    again = counting.calls - before
    assert all(again[f"row {n}"] == 0 for n in range(done))


async def test_fresh_starts_over_and_other_rows_are_refused(tmp_path, model):
    counting, base_url = model
    args = prepare(tmp_path, base_url)
    code, _ = await run(tmp_path, args, stop_after=3)
    assert code == -signal.SIGKILL
    write_csv(tmp_path / "prompts.csv", ["prompt", "model"], [["another", "counted"]])
    code, text = await run(tmp_path, args)
    assert code == 2
    assert "holds an unfinished run of other rows" in text
    assert "--fresh" in text
    counting.calls.clear()
    code, text = await run(tmp_path, [*args, "--fresh"])
    assert code == 0, text
    assert counting.calls == Counter({"another": 1})
    assert column(sheet_rows(tmp_path / "out.xlsx"), "result") == ["<another>"]


def test_journal_for_sits_beside_the_output() -> None:
    from batchexec.cli.run import journal_for

    assert journal_for(Path("out/results.xlsx")) == Path("out/results.xlsx.journal")


async def test_a_run_whose_outputs_could_not_be_written_writes_them_next_time(
    tmp_path, model, monkeypatch
):
    counting, base_url = model
    prepare(tmp_path, base_url)
    settings = Settings(_env_file=None, models_path=tmp_path / "models.toml", max_threads=2)
    catalog = Catalog.load(settings.models_path)

    async def run_in_process() -> tuple[int, str]:
        source = read_source(str(tmp_path / "prompts.csv"), max_rows=ROWS)
        stream = io.StringIO()
        code = await run_batch(
            source,
            settings,
            catalog,
            output=tmp_path / "out.xlsx",
            journal=tmp_path / "out.xlsx.journal",
            stream=stream,
            live=False,
        )
        return code, stream.getvalue()

    def full_disk(path: Path, sheet: object, usage: object = None) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("batchexec.cli.run.write_xlsx", full_disk)
    code, text = await run_in_process()
    assert code == 1
    assert "the finished run is kept in" in text
    assert "No space left on device" in text
    monkeypatch.undo()
    counting.calls.clear()
    code, text = await run_in_process()
    assert code == 0, text
    assert "had ended; writing its outputs" in text
    assert counting.calls == Counter(), "no row is sent again"
    assert column(sheet_rows(tmp_path / "out.xlsx"), "status") == ["succeeded"] * ROWS
    assert not (tmp_path / "out.xlsx.journal").exists()


async def test_fresh_does_not_take_a_journal_another_run_holds(tmp_path, model):
    _, base_url = model
    args = prepare(tmp_path, base_url)
    holder = SQLiteStore(tmp_path / "out.xlsx.journal", setting="--journal")
    await holder.open()
    try:
        code, text = await run(tmp_path, [*args, "--fresh"])
    finally:
        await holder.close()
    assert code == 2
    assert "is in use by another batchexec process" in text


async def test_a_run_continues_only_with_the_same_models_and_schema(tmp_path, model):
    counting, base_url = model
    (tmp_path / "models.toml").write_text(
        "".join(
            f'[models."{name}"]\nprovider = "openai"\nbase_url = "{base_url}"\nmodel_id = "m"\n'
            for name in ("counted", "second")
        )
    )
    write_csv(tmp_path / "prompts.csv", ["prompt"], [[f"row {n}"] for n in range(12)])
    args = ["run", "prompts.csv", "-o", "out.xlsx", "--catalog", "models.toml", "--threads", "2"]
    args += ["--model", "counted"]
    side_by_side = [*args, "--models", "counted,second"]
    code, _ = await run(tmp_path, side_by_side, stop_after=4)
    assert code == -signal.SIGKILL
    journal = tmp_path / "out.xlsx.journal"
    finished = [index for index, status in (await journaled(journal)).items() if status.finished]
    assert 4 <= len(finished) < 24

    for other, asked in [
        (args, "no --models and no --schema"),
        ([*args, "--models", "second,counted"], "--models second,counted and no --schema"),
        ([*side_by_side, "--schema", '{"type": "object"}'], "--models counted,second and --schema"),
    ]:
        code, text = await run(tmp_path, other)
        assert code == 2, text
        assert (
            f"{journal.name} holds an unfinished run of these rows with --models counted,second "
            f"and no --schema, not {asked}; run it with the same --models and --schema"
        ) in text
        assert "--fresh" in text

    before = sum(counting.calls.values())
    code, text = await run(tmp_path, side_by_side)
    assert code == 0, text
    assert f"continuing the run in {journal.name}: {len(finished)} of 24 rows had finished" in text
    # Rows in flight when it was killed (2 threads) may be sent twice, no others.
    assert sum(counting.calls.values()) - before <= 24 - len(finished) + 2
    rows = sheet_rows(tmp_path / "out.xlsx")
    assert column(rows, "status [counted]") == ["succeeded"] * 12
    assert column(rows, "result [second]") == [f"<row {n}>" for n in range(12)]
    assert not journal.exists()
