"""``python -m batchexec submit``: send a batch to a server, follow it, fetch its workbook."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any, TextIO
from urllib.parse import unquote, urlsplit

from batchexec.cli.exits import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE
from batchexec.cli.files import Output, output_problem
from batchexec.cli.inputfile import (
    INPUT_HELP,
    Source,
    execution_place,
    label_of,
    print_problems,
    read_source,
)
from batchexec.cli.options import PROG, Commands, add_batch_options, batch_options, positive_float
from batchexec.cli.progress import (
    DEFAULT_EVERY_S,
    ProgressDisplay,
    Summary,
    add_progress_option,
    showing,
)
from batchexec.client import AuthError, BadAnswer, Client, ClientError, ConnectionFailed
from batchexec.columns import Cell
from batchexec.config import DEV_API_KEY, read_dotenv
from batchexec.errors import FieldError, InputError
from batchexec.inputs import Rows
from batchexec.planning import NO_BATCH_OPTIONS, BatchOptions
from batchexec.records import Batch

#: The key ``submit`` sends, unless ``--key`` gives one.
KEY_ENV = "INTEGRATIONS_API_KEY"
#: The server's accepted keys; ``submit`` sends the first when nothing else names one.
KEYS_ENV = "INTEGRATIONS_API_KEYS"
DEFAULT_POLL_S = 1.0
_CONNECT_S = 30.0
#: The events route sends a keep-alive comment every 15 s; a longer silence is a dead link.
_READ_S = 60.0
_PROBLEMS_SHOWN = 5
_NAMED = frozenset({"prompt", "model", "assistant"})
_RUNNING = frozenset({"queued", "processing"})
#: The statuses of a server without an events route: it is polled instead.
_NO_EVENTS = frozenset({404, 405})

_EPILOG = f"""\
examples:
  {PROG} submit prompts.csv --url http://127.0.0.1:8080
  {PROG} submit prompts.xlsx --url http://127.0.0.1:8080 --wait -o results.xlsx
  INTEGRATIONS_API_KEY=... {PROG} submit batch.jsonl --url https://batch.example.com --wait
  {PROG} submit reviews.csv --url http://127.0.0.1:8080 --models a,b --schema rating.json

The rows are read as 'run' reads them and sent to execute_batch; the server
checks them against its own catalog and limits; --models and --schema go as
its "models" and "response_schema" (the schema is checked here first, the
model names by the server). The invocation id is printed on standard output.
With --wait (implied by -o) the batch is followed through the server's events
route, or by polling the results route where the server has no events route,
with the same progress display as 'run' (counting every row x model).

The key is --key, else INTEGRATIONS_API_KEY, else the first of
INTEGRATIONS_API_KEYS (from the environment, then .env), else the
development key.

Ctrl-C stops following; the batch keeps running on the server.

exit status: 0 accepted (with --wait: every row succeeded), 1 some rows did not
succeed, or the server could not be reached or was busy, 2 bad input or a
request the server refused (401, 404, 413, 422), 130 interrupted.
"""


def register(commands: Commands) -> None:
    """Add the ``submit`` command."""
    parser = commands.add_parser(
        "submit",
        help="send a batch to a running server, optionally wait and download its workbook",
        description="Send a batch of prompts to a running batchexec server.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("input", metavar="INPUT", help=INPUT_HELP)
    parser.add_argument(
        "--url", required=True, help="the server's base URL, with its mount prefix if any"
    )
    parser.add_argument(
        "--key", help=f"API key to send (default: {KEY_ENV}, else the first of {KEYS_ENV})"
    )
    parser.add_argument(
        "--wait", action="store_true", help="follow the batch until it ends, showing progress"
    )
    parser.add_argument(
        "-o",
        "--output",
        metavar="OUT.xlsx",
        type=Path,
        help="download the results workbook here once the batch ends (implies --wait): "
        "a name ending in .xlsx, in a folder that exists",
    )
    add_batch_options(parser)
    add_progress_option(parser)
    parser.add_argument(
        "--poll-every",
        metavar="S",
        type=positive_float,
        default=DEFAULT_POLL_S,
        help="seconds between polls where the server has no events route "
        f"(default {DEFAULT_POLL_S:g})",
    )
    parser.set_defaults(handler=command)


def command(args: argparse.Namespace) -> int:
    """Run ``submit`` with parsed ``args``."""
    stream = sys.stderr
    url = str(args.url).rstrip("/")
    if urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).netloc:
        print(f"batchexec: --url must be an http:// or https:// URL, not {args.url!r}", file=stream)
        return EXIT_USAGE
    key = resolve_key(args.key, os.environ, read_dotenv())
    if not (key.isascii() and key.isprintable()):
        print("batchexec: the API key must be printable ASCII", file=stream)
        return EXIT_USAGE
    if args.output is not None and (
        problem := output_problem(
            [Output("-o", args.output, ".xlsx", "an XLSX workbook")], args.input
        )
    ):
        print(f"batchexec: {problem}", file=stream)
        return EXIT_USAGE
    try:
        options = batch_options(args)
    except ValueError as exc:
        print(f"batchexec: {exc}", file=stream)
        return EXIT_USAGE
    try:
        source = read_source(args.input, max_rows=None)
    except InputError as exc:
        print_problems(exc, label_of(args.input), None, stream)
        return EXIT_USAGE
    try:
        source.rows.check_readable()
    except InputError as exc:
        print_problems(exc, source.label, source.rows, stream)
        return EXIT_USAGE
    try:
        return asyncio.run(
            submit_batch(
                source,
                url=url,
                key=key,
                wait=args.wait or args.output is not None,
                output=args.output,
                options=options,
                stream=stream,
                out=sys.stdout,
                every_s=args.progress_every,
                poll_s=args.poll_every,
            )
        )
    except KeyboardInterrupt:
        print("\nbatchexec: stopped following; the batch keeps running on the server.", file=stream)
        return EXIT_INTERRUPTED


def resolve_key(
    given: str | None, environ: Mapping[str, str], dotenv: Mapping[str, str | None]
) -> str:
    """The key to send: ``given``, else ``INTEGRATIONS_API_KEY``, else the first server key."""
    if given:
        return given.strip()
    for values in (environ, dotenv):
        if key := (values.get(KEY_ENV) or "").strip():
            return key
        listed = [key.strip() for key in (values.get(KEYS_ENV) or "").split(",")]
        if first := next((key for key in listed if key), None):
            return first
    return DEV_API_KEY


async def submit_batch(
    source: Source,
    *,
    url: str,
    key: str,
    wait: bool,
    output: Path | None,
    options: BatchOptions = NO_BATCH_OPTIONS,
    stream: TextIO,
    out: TextIO,
    live: bool | None = None,
    every_s: float = DEFAULT_EVERY_S,
    poll_s: float = DEFAULT_POLL_S,
) -> int:
    """Send ``source`` to the server at ``url``, with the batch's ``options``; with ``wait``,
    follow it and fetch ``output``.

    Returns the exit code; every refusal and failure is printed to ``stream``.
    """
    loop = asyncio.get_running_loop()
    async with Client(url, key, connect_timeout_s=_CONNECT_S, read_timeout_s=_READ_S) as client:
        try:
            invocation_id = await _start(client, source.rows, options)
            print(invocation_id, file=out, flush=True)
            if not wait:
                return EXIT_OK
            started_s = loop.time()
            # Side by side, every row runs once a model.
            total = len(source.rows.rows) * max(len(options.models), 1)
            display = ProgressDisplay(stream, total=total, live=live, every_s=every_s)
            async with showing(display):
                body = await _follow(client, invocation_id, display, poll_s)
            elapsed_s = loop.time() - started_s
            outputs: list[tuple[str, str]] = []
            xlsx_url = body.get("xlsx_url")
            if output is not None and isinstance(xlsx_url, str):
                await client.download_to(_file_name(xlsx_url, invocation_id), output)
                outputs.append(("workbook", str(output)))
            if isinstance(xlsx_url, str):
                outputs.append(("on the server", xlsx_url))
            elif output is not None:
                print("batchexec: the server wrote no workbook for this batch", file=stream)
        except (ConnectionFailed, BadAnswer) as exc:
            print(f"batchexec: no usable answer from {url}: {exc.detail}", file=stream)
            return EXIT_FAILED
        except ClientError as exc:
            _explain(exc, source.rows, stream)
            return _exit_code(exc)
    summary = _summary(body, source.rows, elapsed_s, outputs, options.models)
    print(summary.render(), file=stream)
    succeeded = summary.all_succeeded and body.get("status") == "completed"
    return EXIT_OK if succeeded and (output is None or outputs) else EXIT_FAILED


async def _start(client: Client, rows: Rows, options: BatchOptions) -> str:
    """Start the batch on the server; its invocation id.

    The input's columns go too: the outputs keep its order, as run's do. The
    batch's options go as ``execute_batch``'s ``models`` and ``response_schema``.
    """
    return await client.submit(
        executions_of(rows),
        columns=rows.columns,
        models=options.models,
        response_schema=options.response_schema,
        max_cost=options.max_cost,
        cache=options.cache,
    )


def _exit_code(refusal: ClientError) -> int:
    """2 for a request the server will never accept; 1 for one worth trying again."""
    status = refusal.status or 0
    return EXIT_FAILED if status == 429 or status >= 500 else EXIT_USAGE


def _explain(refusal: ClientError, rows: Rows, stream: TextIO) -> None:
    """Print the refusal, each row's problem named by where it is in the input."""
    what = _REFUSALS.get(refusal.status or 0, "the server refused the request")
    print(f"batchexec: {what} (HTTP {refusal.status}): {refusal.detail}", file=stream)
    for error in refusal.errors:
        if not _is_whole(error, refusal.detail):
            print(f"  {rows.describe(error)}", file=stream)
    if isinstance(refusal, AuthError):
        print(f"  pass --key, or set {KEY_ENV}", file=stream)
    if refusal.retry_after_s is not None:
        print(f"  try again in {refusal.retry_after_s:g} s", file=stream)


def _is_whole(error: FieldError, detail: str) -> bool:
    """Whether ``error`` is the whole answer (``models: ...``, say), which is said once."""
    said = (error.message, f"{error.field}: {error.message}")
    return detail.rstrip(".") in {text.rstrip(".") for text in said}


_REFUSALS = {
    401: "the server did not accept the API key",
    404: "the server does not know this batch or route",
    413: "the batch is too large for the server",
    422: "the server found problems with the batch",
    429: "the server is busy",
    503: "the server is shutting down",
}


async def _follow(
    client: Client, invocation_id: str, display: ProgressDisplay, poll_s: float
) -> dict[str, Any]:
    """Follow the batch until it ends, by its events where the server has them; its results."""
    try:
        async with contextlib.aclosing(client.follow(invocation_id)) as events:
            async for event in events:
                if event.name == "progress":
                    display.update(event.data)
    except ConnectionFailed:
        pass  # the stream broke off; the results route still tells how it ends
    except ClientError as exc:
        if exc.status not in _NO_EVENTS:
            raise
    # Asked once after the events, to learn how the batch ended; polled without them.
    while True:
        body = await client.results(invocation_id)
        progress = body.get("progress")
        if isinstance(progress, dict):
            display.update(progress)
        if body.get("status") not in _RUNNING:
            return body
        await asyncio.sleep(poll_s)


def executions_of(rows: Rows) -> list[dict[str, Cell]]:
    """The rows as ``execute_batch`` executions; other columns go as extra keys.

    A workbook's numbers and booleans go as JSON numbers and booleans, which
    the server keeps as such, as ``run`` does.
    """
    executions = []
    for row in rows.rows:
        execution: dict[str, Cell] = {"prompt": row.prompt}
        if row.model and row.model.strip():
            execution["model"] = row.model
        if row.assistant and row.assistant.strip():
            execution["assistant"] = row.assistant
        cells = row.cells or {}
        execution.update({name: value for name, value in cells.items() if name not in _NAMED})
        executions.append(execution)
    return executions


def _file_name(xlsx_url: str, invocation_id: str) -> str:
    """The workbook's file name, from its URL; the server's naming rule if the URL has none."""
    name = unquote(PurePosixPath(urlsplit(xlsx_url).path).name)
    return name or Batch.file_name_for(invocation_id)


def _summary(
    body: Mapping[str, Any],
    rows: Rows,
    elapsed_s: float,
    outputs: list[tuple[str, str]],
    models: tuple[str, ...] = (),
) -> Summary:
    executions = [e for e in body.get("executions") or [] if isinstance(e, dict)]
    unsuccessful = [e for e in executions if e.get("status") not in ("succeeded", "cancelled")]
    problems = [
        f"{execution_place(rows, e.get('index'), models)} ({e.get('status')}): {e.get('error')}"
        for e in unsuccessful[:_PROBLEMS_SHOWN]
    ]
    if len(unsuccessful) > _PROBLEMS_SHOWN:
        problems.append(f"... and {len(unsuccessful) - _PROBLEMS_SHOWN} more; see the workbook")
    usage = _mapping(body.get("usage"))
    progress = {name: int(count) for name, count in _mapping(body.get("progress")).items()}
    cost = usage.get("cost")
    by_model = _mapping(usage.get("models"))
    return Summary(
        cost=float(cost) if isinstance(cost, int | float) else None,
        model_costs=[
            (str(name), spent if isinstance(spent := _mapping(part).get("cost"), float) else None)
            for name, part in by_model.items()
        ],
        currency=str(usage.get("currency") or "USD"),
        uncosted=int(usage.get("uncosted") or 0),
        status=str(body.get("status")),
        message=str(body.get("message", "")),
        counts=progress,
        elapsed_s=elapsed_s,
        prompt_tokens=int(usage.get("prompt_tokens") or 0),
        completion_tokens=int(usage.get("completion_tokens") or 0),
        outputs=outputs,
        problems=problems,
        models=models,
    )


def _mapping(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}
