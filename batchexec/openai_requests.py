"""The OpenAI Batch API's input: JSONL request lines as batchexec rows, each problem by line.

A line is ``{"custom_id": "...", "method": "POST", "url": "/v1/chat/completions",
"body": {...}}``. Of the body, batchexec reads ``model`` (through the catalog:
names, aliases, discovered models), ``messages`` (``system`` or
``developer`` turns first, then ``user`` and ``assistant`` turns, the last a
``user`` one; content as text or text parts), and the options
``temperature``, ``top_p``, ``max_tokens`` (or ``max_completion_tokens``),
``stop``, ``seed`` and ``response_format``, which each provider sends in
its own wire format. ``n`` may be 1, ``stream`` false, and ``user``,
``store`` and ``metadata`` are ignored; any other field is refused, rather
than silently not honoured.

A row keeps the line's ``custom_id``, ``model``, ``prompt`` (the last user
turn) and ``request`` (the body as JSON) as its cells, so a restart plans it
again from what the store holds (``row_of_cells``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from batchexec.columns import Cell
from batchexec.config import Settings
from batchexec.planning import ChatInput, Limits, RowInput
from batchexec.providers.base import ChatOptions, Turn

#: The batch's ``api`` (``records.Batch.api``) and the endpoint every line calls.
OPENAI = "openai"
CHAT_COMPLETIONS = "/v1/chat/completions"
#: A row's cells, in order: the columns of a batch of the OpenAI Batch API.
COLUMNS = ("custom_id", "model", "prompt", "request")
_IGNORED = frozenset({"user", "store", "metadata"})
_OPTIONS = frozenset(
    {"temperature", "top_p", "max_tokens", "max_completion_tokens", "stop", "seed"}
)
_BODY_FIELDS = frozenset({"model", "messages", "n", "stream", "response_format"})
_MAX_CUSTOM_ID_CHARS = 512
#: The problems of one file listed at most; reading stops after them.
MAX_ERRORS = 1000


def limits_of(settings: Settings) -> Limits:
    """What a batch of requests may hold: ``MAX_FILE_LINES`` of them (in place of
    ``MAX_EXECUTIONS_PER_BATCH``), each of ``MAX_SENT_PROMPT_LENGTH`` characters."""
    return Limits(
        max_executions=settings.max_file_lines,
        max_prompt_length=settings.max_sent_prompt_length,
        default_model=settings.default_model,
        max_columns=len(COLUMNS),
    )


@dataclass(frozen=True)
class LineError:
    """One problem of the input file: OpenAI's ``BatchError``."""

    code: str
    line: int | None
    message: str
    param: str | None = None

    def as_json(self) -> dict[str, object]:
        return {"code": self.code, "line": self.line, "message": self.message, "param": self.param}


class _Refused(ValueError):
    def __init__(self, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.param = param


@dataclass(frozen=True)
class ParsedLines:
    """The rows of an input file, the line each came from, and every problem found."""

    rows: list[RowInput]
    lines: list[int]
    errors: list[LineError]


def parse_lines(
    data: bytes, *, max_lines: int, max_chars: int, max_line_bytes: int | None = None
) -> ParsedLines:
    """Every line of ``data`` (a JSONL file) as a row, or its problems; blank lines skipped.

    ``max_chars`` bounds the characters of all of a request's messages,
    ``max_line_bytes`` a line's UTF-8 bytes (it is not parsed when longer).
    """
    rows: list[RowInput] = []
    lines: list[int] = []
    errors: list[LineError] = []
    seen: dict[str, int] = {}
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        return ParsedLines(
            [], [], [LineError("invalid_file", None, f"The file is not UTF-8: {exc}.")]
        )
    requests = 0
    # Lines end at "\n" alone (a "\r" before it is JSON whitespace): ``splitlines`` would
    # also break at U+2028, U+0085 and others, which JSON text may hold unescaped.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        requests += 1
        if len(errors) >= MAX_ERRORS:
            # What a bad file costs stays bounded, however many of its lines are bad.
            errors.append(
                LineError(
                    "too_many_errors",
                    number,
                    f"The first {MAX_ERRORS} problems are listed; the lines from here on "
                    "were not read.",
                )
            )
            break
        if requests > max_lines:
            errors.append(
                LineError(
                    "too_many_requests",
                    number,
                    f"The file has more than {max_lines} requests, the limit (MAX_FILE_LINES).",
                )
            )
            break
        if (
            max_line_bytes is not None
            and len(line) > max_line_bytes // 4
            and (size := len(line.encode("utf-8", "surrogatepass"))) > max_line_bytes
        ):
            errors.append(
                LineError(
                    "invalid_request",
                    number,
                    f"The line is {size} bytes; the limit (MAX_BODY_BYTES) is {max_line_bytes}.",
                )
            )
            continue
        try:
            row = _row(line, max_chars)
        except _Refused as exc:
            errors.append(LineError(exc.code, number, str(exc), exc.param))
            continue
        custom_id = str((row.cells or {})["custom_id"])
        if custom_id in seen:
            errors.append(
                LineError(
                    "duplicate_custom_id",
                    number,
                    f"custom_id {custom_id!r} is also on line {seen[custom_id]}; each must be "
                    "unique.",
                    "custom_id",
                )
            )
            continue
        seen[custom_id] = number
        rows.append(row)
        lines.append(number)
    if not rows and not errors:
        errors.append(LineError("empty_file", None, "The file has no requests."))
    return ParsedLines(rows, lines, errors)


def row_of_cells(cells: Mapping[str, Cell]) -> RowInput:
    """The row of a stored request (``COLUMNS``), to plan it again after a restart."""
    body = json.loads(str(cells["request"]))
    return _row_of_body(str(cells["custom_id"]), body, max_chars=None)


def _row(line: str, max_chars: int) -> RowInput:
    try:
        request = json.loads(line)
    except (ValueError, RecursionError) as exc:
        raise _Refused("invalid_json_line", f"The line is not JSON: {exc}.") from None
    if not isinstance(request, dict):
        raise _Refused("invalid_request", "The line must be a JSON object.")
    custom_id = request.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        raise _Refused(
            "missing_required_parameter", "custom_id must be a non-empty string.", "custom_id"
        )
    if len(custom_id) > _MAX_CUSTOM_ID_CHARS:
        raise _Refused(
            "invalid_request",
            f"custom_id is over {_MAX_CUSTOM_ID_CHARS} characters.",
            "custom_id",
        )
    if request.get("method") != "POST":
        raise _Refused("invalid_request", "method must be POST.", "method")
    if request.get("url") != CHAT_COMPLETIONS:
        raise _Refused(
            "invalid_url",
            f"url must be {CHAT_COMPLETIONS}, the batch's endpoint (got {request.get('url')!r}).",
            "url",
        )
    body = request.get("body")
    if not isinstance(body, dict):
        raise _Refused("missing_required_parameter", "body must be a JSON object.", "body")
    return _row_of_body(custom_id, body, max_chars=max_chars)


def _row_of_body(custom_id: str, body: dict[str, Any], *, max_chars: int | None) -> RowInput:
    unknown = sorted(set(body) - _BODY_FIELDS - _OPTIONS - _IGNORED)
    if unknown:
        raise _Refused(
            "invalid_request",
            f"body.{unknown[0]} is not supported by batchexec; leave it out.",
            f"body.{unknown[0]}",
        )
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise _Refused("missing_required_parameter", "body.model must name a model.", "body.model")
    if body.get("n", 1) != 1:
        raise _Refused("invalid_request", "body.n must be 1.", "body.n")
    if body.get("stream", False) is not False:
        raise _Refused("invalid_request", "body.stream must be false in a batch.", "body.stream")
    system, history, prompt = _messages(body.get("messages"))
    if max_chars is not None:
        length = sum(len(text) for text in (system or "", prompt, *(t.content for t in history)))
        if length > max_chars:
            raise _Refused(
                "invalid_request",
                f"The messages are {length} characters; the limit (MAX_SENT_PROMPT_LENGTH) is "
                f"{max_chars}.",
                "body.messages",
            )
    chat = ChatInput(system=system, history=history, options=_options(body))
    request = json.dumps(body, ensure_ascii=False, separators=(",", ":"))
    cells: dict[str, Cell] = {
        "custom_id": custom_id,
        "model": model,
        "prompt": prompt,
        "request": request,
    }
    return RowInput(prompt=prompt, model=model, cells=cells, chat=chat)


def _messages(messages: object) -> tuple[str | None, tuple[Turn, ...], str]:
    """The system prompt, the turns before the last, and the last user turn's text."""
    if not isinstance(messages, list) or not messages:
        raise _Refused(
            "missing_required_parameter",
            "body.messages must be a non-empty list.",
            "body.messages",
        )
    system: list[str] = []
    turns: list[Turn] = []
    for position, message in enumerate(messages):
        param = f"body.messages[{position}]"
        if not isinstance(message, dict):
            raise _Refused("invalid_request", f"{param} must be an object.", param)
        role = message.get("role")
        text = _text(message.get("content"), param)
        if role in ("system", "developer"):
            if turns:
                raise _Refused(
                    "invalid_request",
                    f"{param}: system messages must come before the others.",
                    param,
                )
            system.append(text)
        elif role in ("user", "assistant"):
            turns.append(Turn(role=role, content=text))
        else:
            raise _Refused(
                "invalid_request",
                f"{param}.role must be system, developer, user or assistant (got {role!r}).",
                f"{param}.role",
            )
    if not turns or turns[-1].role != "user":
        raise _Refused("invalid_request", "The last message must be the user's.", "body.messages")
    if not turns[-1].content.strip():
        raise _Refused("invalid_request", "The last user message is empty.", "body.messages")
    return "\n\n".join(system) or None, tuple(turns[:-1]), turns[-1].content


def _text(content: object, param: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(
        isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
        for part in content
    ):
        return "".join(part["text"] for part in content)
    raise _Refused(
        "invalid_request",
        f"{param}.content must be text, or a list of text parts (images and audio are not "
        "supported).",
        f"{param}.content",
    )


def _options(body: Mapping[str, Any]) -> ChatOptions:
    if body.get("max_tokens") is not None and body.get("max_completion_tokens") is not None:
        raise _Refused(
            "invalid_request",
            "Send body.max_tokens or body.max_completion_tokens, not both.",
            "body.max_tokens",
        )
    named = body.get("max_completion_tokens") is not None
    max_tokens = body.get("max_completion_tokens") if named else body.get("max_tokens")
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    checks: Iterable[tuple[str, object, type | tuple[type, ...]]] = (
        ("temperature", body.get("temperature"), (int, float)),
        ("top_p", body.get("top_p"), (int, float)),
        ("max_tokens", max_tokens, int),
        ("seed", body.get("seed"), int),
        ("response_format", body.get("response_format"), dict),
    )
    for name, value, kind in checks:
        if value is not None and (isinstance(value, bool) or not isinstance(value, kind)):
            raise _Refused("invalid_request", f"body.{name} has the wrong type.", f"body.{name}")
    if stop is not None and (
        not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) for s in stop)
    ):
        raise _Refused(
            "invalid_request", "body.stop must be a string or up to 4 strings.", "body.stop"
        )
    if max_tokens is not None and max_tokens < 1:
        raise _Refused("invalid_request", "body.max_tokens must be at least 1.", "body.max_tokens")
    return ChatOptions(
        temperature=body.get("temperature"),
        max_tokens=max_tokens,
        top_p=body.get("top_p"),
        stop=tuple(stop) if stop is not None else None,
        seed=body.get("seed"),
        response_format=body.get("response_format"),
        max_tokens_as="max_completion_tokens" if named else "max_tokens",
    )
