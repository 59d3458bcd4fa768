"""An OpenAI-compatible echo that counts its calls: ``python -m benchmarks.counting_provider``.

``python -m benchmarks.counting_provider --port PORT --latency-s S --log PATH``
answers every ``POST /v1/chat/completions`` after ``S`` seconds with the last
user message echoed back as the assistant's ``content`` (usage included).
Each call is appended to ``PATH`` as one JSON object a line, ``{"at": epoch
seconds, "prompt": the user message}``, flushed, as the request arrives and
before the answer is sent: a script reading the file counts every call made,
including those whose caller died before the answer came. Once the wait is
over, just before the answer is sent (or when the request is dropped
midway), the call's end is appended too, ``{"at": ..., "prompt": ...,
"end": true}``: the lines are in the order things happened, so counting up
at each arrival and down at each end gives the calls in flight
(``most_in_flight``). ``read_calls`` reads the arrivals only. ``GET
/health`` answers 200, and ``GET /v1/models`` an empty list (a batchexec
with ``OPENAI_BASE_URL`` pointing here discovers no models, and does not
warn). It runs in its own process, so the server under test can be killed
and restarted while the log keeps counting.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import IO, Any

from aiohttp import web

LATENCY_S = web.AppKey("latency_s", float)
LOG_PATH = web.AppKey("log_path", Path)
LOG = web.AppKey("log", IO[str])


def user_message(body: Any) -> str:
    """The content of the last ``user`` message of a chat completion request."""
    messages = body.get("messages") if isinstance(body, dict) else None
    for message in reversed(messages if isinstance(messages, list) else []):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            return content if isinstance(content, str) else json.dumps(content)
    raise web.HTTPBadRequest(text="no user message")


def completion(prompt: str, model: str) -> dict[str, Any]:
    """A chat completion whose answer is ``prompt``."""
    words = len(prompt.split())
    return {
        "id": "chatcmpl-counting",
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": prompt},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": words, "completion_tokens": words, "total_tokens": 2 * words},
    }


async def chat_completions(request: web.Request) -> web.Response:
    """Record the call, wait ``latency_s``, answer with the prompt."""
    try:
        body = await request.json()
    except ValueError:
        raise web.HTTPBadRequest(text="not JSON") from None
    prompt = user_message(body)
    log = request.app[LOG]
    # Written and flushed before the wait: the call counts even if the caller dies now.
    log.write(json.dumps({"at": time.time(), "prompt": prompt}) + "\n")
    log.flush()
    try:
        await asyncio.sleep(request.app[LATENCY_S])
    finally:
        # Before the answer leaves: a caller told of the end has always been logged first.
        log.write(json.dumps({"at": time.time(), "prompt": prompt, "end": True}) + "\n")
        log.flush()
    model = body.get("model") if isinstance(body.get("model"), str) else "counted"
    return web.json_response(completion(prompt, model))


async def models(request: web.Request) -> web.Response:
    """No models listed: a catalog names the model it calls here."""
    return web.json_response({"object": "list", "data": []})


async def health(request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def call_log(app: web.Application) -> AsyncIterator[None]:
    """The call log, opened for appending (a restarted provider adds to it), then closed."""
    with app[LOG_PATH].open("a", encoding="utf-8") as log:
        app[LOG] = log
        yield


def create_app(latency_s: float, log_path: Path) -> web.Application:
    app = web.Application()
    app[LATENCY_S] = latency_s
    app[LOG_PATH] = log_path
    app.cleanup_ctx.append(call_log)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    return app


def read_log(log_path: Path) -> list[tuple[float, str, bool]]:
    """Every line so far, in order, as (epoch seconds, prompt, whether it is a call's end).

    A torn last line is left out.
    """
    if not log_path.exists():
        return []
    records: list[tuple[float, str, bool]] = []
    for line in log_path.read_text(encoding="utf-8").splitlines(keepends=True):
        if line.endswith("\n"):
            record = json.loads(line)
            records.append((record["at"], record["prompt"], bool(record.get("end", False))))
    return records


def read_calls(log_path: Path) -> list[tuple[float, str]]:
    """The calls made so far, in order, as (epoch seconds of arrival, prompt); ends left out."""
    return [(at, prompt) for at, prompt, end in read_log(log_path) if not end]


def most_in_flight(log_path: Path) -> int:
    """The most calls the provider held at once: arrivals less ends, in the log's order."""
    in_flight = most = 0
    for _, _, end in read_log(log_path):
        in_flight += -1 if end else 1
        most = max(most, in_flight)
    return most


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--latency-s", type=float, default=0.0)
    parser.add_argument("--log", type=Path, required=True, help="file the calls are appended to")
    args = parser.parse_args()
    web.run_app(
        create_app(args.latency_s, args.log),
        host="127.0.0.1",
        port=args.port,
        access_log=None,
        print=None,
    )


if __name__ == "__main__":
    main()
