"""``/v1/batches`` through the real app, driven by the official ``openai`` client.

A test waits for a batch as a client would, polling ``batches.retrieve``, but
never on the clock: it first joins the batch on the app's engine, then
polls a bounded number of times while the output files are written in the
background (``openai_batches.Finalizer``).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, Final, Literal

import openai
import pytest
from aiohttp.test_utils import TestClient
from openai.types import Batch

from batchexec.api import BATCHES, RETRY, V1_BATCHES, download_path
from batchexec.openai_batches import Finalizer
from batchexec.records import ExecutionStatus
from batchexec.store import BatchStore
from batchexec.web.keys import ENGINE, REGISTRY
from tests.fakes import GATED_CATALOG
from tests.helpers import (
    API_KEY,
    AUTH,
    batch_of,
    column,
    finished,
    gated,
    owner_of,
    sheet_rows,
    until,
)

pytest_plugins = ["tests.providerfakes"]

Client = TestClient[Any, Any]
MakeApi = Callable[..., openai.AsyncOpenAI]

CHAT: Final[Literal["/v1/chat/completions"]] = "/v1/chat/completions"
BEARER = {"Authorization": f"Bearer {API_KEY}"}
#: The statuses a batch ends in.
ENDED = frozenset({"completed", "cancelled", "failed", "expired"})


@pytest.fixture
async def make_api() -> AsyncIterator[MakeApi]:
    """Makes ``openai`` clients of a test client's ``/v1``; every one is closed after."""
    made: list[openai.AsyncOpenAI] = []

    def make(client: Client, api_key: str = API_KEY) -> openai.AsyncOpenAI:
        api = openai.AsyncOpenAI(
            base_url=str(client.make_url("/v1")), api_key=api_key, max_retries=0
        )
        made.append(api)
        return api

    yield make
    for api in made:
        await api.close()


def request_line(
    custom_id: str, content: str, *, model: str = "echo", **body: Any
) -> dict[str, Any]:
    """One request of a batch input file: a single user message to ``model``."""
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": CHAT,
        "body": {"model": model, "messages": [{"role": "user", "content": content}], **body},
    }


def jsonl(*lines: Any) -> bytes:
    """A JSONL file of ``lines``; a ``str`` is written as it is (bad JSON, a blank line)."""
    return b"".join(
        (line if isinstance(line, str) else json.dumps(line)).encode() + b"\n" for line in lines
    )


async def create_batch(api: openai.AsyncOpenAI, data: bytes, **options: Any) -> Batch:
    """A batch of the requests in ``data``, uploaded as its input file."""
    file = await api.files.create(file=("requests.jsonl", data), purpose="batch")
    return await api.batches.create(
        input_file_id=file.id, endpoint=CHAT, completion_window="24h", **options
    )


async def ended(
    client: Client, api: openai.AsyncOpenAI, batch_id: str, *, rounds: int = 500
) -> Batch:
    """Batch ``batch_id`` once it has ended and its output and error files are written."""
    await client.app[ENGINE].join(batch_id)
    for _ in range(rounds):
        batch = await api.batches.retrieve(batch_id)
        if batch.status in ENDED:
            return batch
        await asyncio.sleep(0)
    raise AssertionError(f"batch {batch_id} never ended; it is {batch.status}")


async def lines_of(api: openai.AsyncOpenAI, file_id: str | None) -> list[Any]:
    """The JSON lines of an output or error file; none when there is no file."""
    if file_id is None:
        return []
    content = await api.files.content(file_id)
    return [json.loads(line) for line in content.content.splitlines()]


def store_of(client: Client) -> BatchStore:
    """The app's store."""
    store: BatchStore = client.app[REGISTRY].store
    return store


def answers(lines: list[Any]) -> dict[str, str]:
    """Each output line's answer, by its ``custom_id``."""
    return {
        line["custom_id"]: line["response"]["body"]["choices"][0]["message"]["content"]
        for line in lines
    }


# A batch's life


async def test_fifty_requests_run_to_completed_with_one_output_line_each(make_client, make_api):
    client = await make_client()
    api = make_api(client)
    data = jsonl(*(request_line(f"request-{n}", f"Question {n}?") for n in range(50)))
    metadata = {"project": "acceptance", "note": "Grüße"}

    batch = await create_batch(api, data, metadata=metadata)

    assert batch.id.startswith("batch_")
    assert batch.object == "batch"
    assert (batch.endpoint, batch.completion_window) == (CHAT, "24h")
    assert batch.status in ("validating", "in_progress", "finalizing", "completed")
    assert batch.expires_at == batch.created_at + 24 * 3600
    assert batch.metadata == metadata
    assert batch.errors is None
    assert batch.request_counts is not None and batch.request_counts.total == 50

    done = await ended(client, api, batch.id)

    assert done.status == "completed"
    assert done.request_counts is not None
    counts = done.request_counts
    assert (counts.completed, counts.failed, counts.total) == (50, 0, 50)
    assert done.metadata == metadata
    assert done.input_file_id == batch.input_file_id
    assert done.error_file_id is None  # no request failed: no error file, as at OpenAI
    assert done.in_progress_at is not None and done.finalizing_at is not None
    assert done.completed_at is not None
    assert batch.created_at <= done.in_progress_at <= done.finalizing_at <= done.completed_at
    assert (done.failed_at, done.cancelling_at, done.cancelled_at, done.expired_at) == (
        None,
        None,
        None,
        None,
    )
    output = await lines_of(api, done.output_file_id)
    assert [line["custom_id"] for line in output] == [f"request-{n}" for n in range(50)]
    assert answers(output) == {f"request-{n}": f"Question {n}?" for n in range(50)}
    first = output[0]
    assert set(first) == {"id", "custom_id", "response", "error"}
    assert first["id"].startswith("batch_req_")
    assert first["error"] is None
    assert first["response"]["status_code"] == 200
    body = first["response"]["body"]
    assert (body["object"], body["model"]) == ("chat.completion", "echo")
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert body["choices"][0]["finish_reason"] == "stop"
    assert len({line["id"] for line in output}) == 50
    # The output file is the caller's, listed among its files.
    assert done.output_file_id is not None
    output_file = await api.files.retrieve(done.output_file_id)
    assert output_file.purpose == "batch_output"
    assert output_file.filename == f"{batch.id}_output.jsonl"
    assert await api.batches.retrieve(batch.id) == done


async def test_a_file_with_bad_lines_fails_at_once_naming_each_line_and_runs_nothing(
    make_client, make_api
):
    client = await make_client(max_file_lines=10)
    api = make_api(client)
    data = jsonl(
        request_line("ok-1", "Fine."),
        '{"custom_id": "broken", "method": ',
        request_line("ok-1", "Again?"),
        {**request_line("wrong-url", "Hi"), "url": "/v1/embeddings"},
        request_line("unsupported", "Hi", logprobs=True),
        {
            **request_line("ends-with-assistant", "Hi"),
            "body": {
                "model": "echo",
                "messages": [
                    {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello."},
                ],
            },
        },
        "",
        request_line("ok-2", "Also fine.", model="gated"),
    )

    batch = await create_batch(api, data, metadata={"run": "bad"})

    assert batch.status == "failed"
    assert batch.errors is not None
    found = [(e.line, e.code, e.param) for e in batch.errors.data or []]
    assert found == [
        (2, "invalid_json_line", None),
        (3, "duplicate_custom_id", "custom_id"),
        (4, "invalid_url", "url"),
        (5, "invalid_request", "body.logprobs"),
        (6, "invalid_request", "body.messages"),
    ]
    assert all(e.message for e in batch.errors.data or [])
    assert batch.failed_at is not None
    assert (batch.output_file_id, batch.error_file_id) == (None, None)
    assert batch.request_counts is not None
    assert (batch.request_counts.completed, batch.request_counts.failed) == (0, 0)
    assert batch.metadata == {"run": "bad"}
    assert await ended(client, api, batch.id) == batch
    # Nothing ran: no batch to run it as, no call to the model.
    assert await store_of(client).load(batch.id) is None
    assert gated(client).started == []
    assert client.app[ENGINE].running() == []


@pytest.mark.parametrize(
    ("line", "code", "param"),
    [
        (request_line("r", "Hi", model="no-such-model"), "model_not_found", "body.model"),
        (request_line("r", "Hi", model="gated", temperature=0.5), "unsupported_parameter", "body"),
    ],
    ids=["unknown model", "option the provider cannot honour"],
)
async def test_a_model_that_cannot_take_a_request_fails_the_batch_naming_its_line(
    make_client, make_api, line, code, param
):
    client = await make_client()
    api = make_api(client)

    batch = await create_batch(api, jsonl(request_line("fine", "Hi"), line))

    assert batch.status == "failed"
    assert batch.errors is not None
    assert [(e.line, e.code, e.param) for e in batch.errors.data or []] == [(2, code, param)]
    assert await store_of(client).load(batch.id) is None
    assert gated(client).started == []


async def test_a_file_of_more_than_max_file_lines_requests_fails_at_the_first_line_over(
    make_client, make_api
):
    client = await make_client(max_file_lines=3)
    api = make_api(client)
    data = jsonl(*(request_line(f"r{n}", "Hi") for n in range(5)))

    batch = await create_batch(api, data)

    assert batch.status == "failed"
    assert batch.errors is not None
    [error] = batch.errors.data or []
    assert (error.line, error.code) == (4, "too_many_requests")
    assert error.message is not None and "MAX_FILE_LINES" in error.message
    assert await store_of(client).load(batch.id) is None
    # Exactly the limit runs.
    fits = await create_batch(api, jsonl(*(request_line(f"r{n}", "Hi") for n in range(3))))
    assert (await ended(client, api, fits.id)).status == "completed"


async def test_a_line_breaks_only_at_newlines_not_at_other_unicode_line_separators(
    make_client, make_api
):
    client = await make_client()
    api = make_api(client)
    # JSON may hold U+2028, U+2029 and U+0085 unescaped; a file may end its lines in CRLF.
    text = "first\u2028second\u2029third\u0085fourth"
    line = json.dumps(request_line("separated", text), ensure_ascii=False)

    done = await ended(client, api, (await create_batch(api, f"{line}\r\n".encode())).id)

    assert done.status == "completed"
    assert answers(await lines_of(api, done.output_file_id)) == {"separated": text}
    # Lines are numbered as a text editor numbers them.
    invalid = await create_batch(api, f"{line}\r\nnot JSON\r\n".encode())
    assert invalid.errors is not None
    assert [(e.line, e.code) for e in invalid.errors.data or []] == [(2, "invalid_json_line")]


async def test_an_unknown_model_does_not_hide_the_problems_of_other_lines(make_client, make_api):
    client = await make_client()
    api = make_api(client)
    data = jsonl(
        request_line("unknown", "Hi", model="no-such-model"),
        request_line("option", "Hi", model="gated", temperature=0.5),
    )

    batch = await create_batch(api, data)

    assert batch.errors is not None
    assert [(e.line, e.code) for e in batch.errors.data or []] == [
        (1, "model_not_found"),
        (2, "unsupported_parameter"),
    ]


# Cancelling


async def test_a_batch_cancelled_mid_way_ends_cancelled_with_what_finished(make_client, make_api):
    client = await make_client()
    api = make_api(client)
    data = jsonl(*(request_line(name, name, model="gated") for name in ("one", "two", "three")))
    batch = await create_batch(api, data)
    provider = gated(client)
    await provider.wait_started(3)
    provider.open("one")
    running = batch_of(client, batch.id)
    await until(lambda: running.counts[ExecutionStatus.SUCCEEDED] == 1)
    assert (await api.batches.retrieve(batch.id)).status == "in_progress"

    cancelling = await api.batches.cancel(batch.id)

    assert cancelling.status in ("cancelling", "cancelled")
    assert cancelling.cancelling_at is not None
    done = await ended(client, api, batch.id)
    assert done.status == "cancelled"
    assert done.cancelling_at == cancelling.cancelling_at
    assert done.cancelling_at is not None and done.cancelled_at is not None
    assert done.cancelled_at >= done.cancelling_at
    assert done.completed_at is None
    assert done.request_counts is not None
    assert (done.request_counts.completed, done.request_counts.total) == (1, 3)
    assert answers(await lines_of(api, done.output_file_id)) == {"one": "answer(one)"}
    errors = await lines_of(api, done.error_file_id)
    assert [(line["custom_id"], line["response"]) for line in errors] == [
        ("two", None),
        ("three", None),
    ]
    assert {line["error"]["code"] for line in errors} == {"batch_cancelled"}
    assert sorted(provider.finished) == ["one"]
    # A cancelled batch cannot be cancelled again.
    with pytest.raises(openai.ConflictError) as refused:
        await api.batches.cancel(batch.id)
    assert refused.value.status_code == 409
    assert (await api.batches.retrieve(batch.id)).status == "cancelled"


async def test_a_batch_cancelled_while_it_waits_for_a_slot_runs_nothing(make_client, make_api):
    client = await make_client(max_concurrent_batches=1)
    api = make_api(client)
    running = await create_batch(api, jsonl(request_line("busy", "busy", model="gated")))
    provider = gated(client)
    await provider.wait_started(1)
    waiting = await create_batch(
        api, jsonl(request_line("one", "one", model="gated"), request_line("two", "Hi"))
    )
    assert waiting.status == "validating"
    assert waiting.in_progress_at is None

    cancelling = await api.batches.cancel(waiting.id)

    assert cancelling.status in ("cancelling", "cancelled")
    done = await ended(client, api, waiting.id)
    assert done.status == "cancelled"
    assert done.request_counts is not None
    assert (done.request_counts.completed, done.request_counts.total) == (0, 2)
    assert done.output_file_id is None
    errors = await lines_of(api, done.error_file_id)
    assert [(line["custom_id"], line["error"]["code"]) for line in errors] == [
        ("one", "batch_cancelled"),
        ("two", "batch_cancelled"),
    ]
    assert provider.started == ["busy"]
    provider.open()
    assert (await ended(client, api, running.id)).status == "completed"


async def test_a_cancel_refused_once_every_request_has_ended_leaves_no_trace(make_client, make_api):
    client = await make_client()
    api = make_api(client)
    batch = await create_batch(api, jsonl(request_line("only", "only", model="gated")))
    provider = gated(client)
    await provider.wait_started(1)
    provider.open()
    running = batch_of(client, batch.id)
    await until(lambda: running.counts[ExecutionStatus.SUCCEEDED] == 1)

    with pytest.raises(openai.ConflictError):
        await api.batches.cancel(batch.id)

    assert (await api.batches.retrieve(batch.id)).status in ("in_progress", "finalizing")
    done = await ended(client, api, batch.id)
    assert (done.status, done.cancelling_at) == ("completed", None)


async def test_a_completed_batch_cannot_be_cancelled(make_client, make_api):
    client = await make_client()
    api = make_api(client)
    batch = await create_batch(api, jsonl(request_line("r", "Hi")))
    done = await ended(client, api, batch.id)

    with pytest.raises(openai.ConflictError) as refused:
        await api.batches.cancel(batch.id)

    assert refused.value.status_code == 409
    assert "completed" in refused.value.message
    assert await api.batches.retrieve(batch.id) == done
    # Neither can one that failed validation.
    invalid = await create_batch(api, jsonl("not JSON"))
    with pytest.raises(openai.ConflictError):
        await api.batches.cancel(invalid.id)


# Listing and keys


async def test_batches_are_listed_newest_first_in_pages(make_client, make_api):
    client = await make_client()
    api = make_api(client)
    ids = [(await create_batch(api, jsonl(request_line("r", f"{n}")))).id for n in range(3)]
    for batch_id in ids:
        await ended(client, api, batch_id)
    # Batches created in the same instant are in the order of their ids.
    records = [await store_of(client).openai_batch(i, owner_of(client.app)) for i in ids]
    newest_first = [
        record.id
        for record in sorted(
            filter(None, records), key=lambda record: (record.created_at, record.id), reverse=True
        )
    ]
    assert sorted(newest_first) == sorted(ids)

    first = await api.batches.list(limit=2)

    assert [batch.id for batch in first.data] == newest_first[:2]
    assert (first.first_id, first.last_id, first.has_more) == (*newest_first[:2], True)
    assert all(batch.status == "completed" for batch in first.data)
    second = await api.batches.list(limit=2, after=first.last_id)
    assert [batch.id for batch in second.data] == newest_first[2:]
    assert (second.first_id, second.last_id, second.has_more) == (
        newest_first[2],
        newest_first[2],
        False,
    )
    assert [batch.id async for batch in api.batches.list(limit=2)] == newest_first
    assert [batch.id for batch in (await api.batches.list()).data] == newest_first
    empty = await api.batches.list(after=newest_first[-1])
    assert (empty.data, empty.has_more, empty.first_id, empty.last_id) == ([], False, None, None)
    unknown = await api.batches.list(after="batch_00000000000000000000000000000000")
    assert (unknown.data, unknown.has_more) == ([], False)


@pytest.mark.parametrize("limit", ["0", "101", "many"])
async def test_a_list_limit_out_of_range_is_400_naming_limit(make_client, limit):
    client = await make_client()

    response = await client.get(V1_BATCHES, params={"limit": limit}, headers=BEARER)

    assert response.status == 400
    assert (await response.json())["error"]["param"] == "limit"


async def test_another_keys_batches_are_not_listed_nor_found(make_client, make_api):
    client = await make_client(integrations_api_keys=f"{API_KEY},key-b")
    mine = make_api(client)
    theirs = make_api(client, api_key="key-b")
    batch = await create_batch(mine, jsonl(request_line("r", "Hi")))
    await ended(client, mine, batch.id)

    assert (await theirs.batches.list()).data == []
    assert (await theirs.batches.list(after=batch.id)).data == []
    for call in (theirs.batches.retrieve, theirs.batches.cancel):
        with pytest.raises(openai.NotFoundError) as missing:
            await call(batch.id)
        assert batch.id in missing.value.message
    # Nor can they run a batch of my file.
    with pytest.raises(openai.NotFoundError):
        await theirs.batches.create(
            input_file_id=batch.input_file_id, endpoint=CHAT, completion_window="24h"
        )
    assert [b.id for b in (await mine.batches.list()).data] == [batch.id]


# Refused creations


async def test_a_missing_input_file_is_404(make_client, make_api):
    client = await make_client()
    api = make_api(client)

    with pytest.raises(openai.NotFoundError) as missing:
        await api.batches.create(
            input_file_id="file-000000000000000000000000", endpoint=CHAT, completion_window="24h"
        )

    assert "file-000000000000000000000000" in missing.value.message
    assert (await api.batches.list()).data == []
    # A batch's output file is no input either.
    done = await ended(client, api, (await create_batch(api, jsonl(request_line("r", "Hi")))).id)
    assert done.output_file_id is not None
    with pytest.raises(openai.NotFoundError):
        await api.batches.create(
            input_file_id=done.output_file_id, endpoint=CHAT, completion_window="24h"
        )


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("endpoint", "/v1/embeddings"),
        ("endpoint", "/v1/responses"),
        ("completion_window", "1h"),
    ],
)
async def test_a_bad_endpoint_or_completion_window_is_400_naming_it(
    make_client, make_api, field, value
):
    client = await make_client()
    api = make_api(client)
    file = await api.files.create(file=("r.jsonl", jsonl(request_line("r", "Hi"))), purpose="batch")
    body: dict[str, Any] = {
        "input_file_id": file.id,
        "endpoint": CHAT,
        "completion_window": "24h",
        field: value,
    }

    with pytest.raises(openai.BadRequestError) as refused:
        await api.batches.create(**body)

    assert refused.value.param == field
    assert (await api.batches.list()).data == []
    # The same body sent raw is refused alike.
    response = await client.post(V1_BATCHES, json=body, headers=BEARER)
    assert response.status == 400
    assert (await response.json())["error"]["param"] == field


# Durability and stores


async def test_a_batch_survives_a_restart_and_completes_under_its_id(make_client, make_api):
    client = await make_client()
    names = ("one", "two", "three")
    batch = await create_batch(
        make_api(client), jsonl(*(request_line(name, name, model="gated") for name in names))
    )
    provider = gated(client)
    await provider.wait_started(3)
    provider.open("one")
    running = batch_of(client, batch.id)
    await until(lambda: running.counts[ExecutionStatus.SUCCEEDED] == 1)
    await client.app[REGISTRY].flush()

    await client.close()
    client = await make_client()

    api = make_api(client)
    provider = gated(client)
    await provider.wait_started(2)
    # What finished is not sent again.
    assert sorted(provider.started) == ["three", "two"]
    assert (await api.batches.retrieve(batch.id)).status == "in_progress"
    provider.open()
    done = await ended(client, api, batch.id)
    assert done.status == "completed"
    assert done.request_counts is not None
    assert (done.request_counts.completed, done.request_counts.total) == (3, 3)
    output = await lines_of(api, done.output_file_id)
    assert [line["custom_id"] for line in output] == list(names)
    assert answers(output) == {name: f"answer({name})" for name in names}
    assert done.error_file_id is None
    assert [b.id for b in (await api.batches.list()).data] == [batch.id]


async def test_a_batch_that_ended_before_its_files_were_written_gets_them_from_the_next_process(
    make_client, make_api
):
    # The first process writes no output files, as if it stopped just after the batch ended.
    async def never_start(finalizer: Finalizer) -> None:
        pass

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Finalizer, "start", never_start)
        client = await make_client()
        api = make_api(client)
        data = jsonl(request_line("one", "One."), request_line("two", "Two."))
        batch = await create_batch(api, data)
        await client.app[ENGINE].join(batch.id)
        stuck = await api.batches.retrieve(batch.id)
        assert stuck.status == "finalizing"
        assert stuck.finalizing_at is not None
        assert (stuck.completed_at, stuck.output_file_id) == (None, None)
        assert stuck.request_counts is not None
        assert (stuck.request_counts.completed, stuck.request_counts.total) == (2, 2)
        await client.close()

    client = await make_client()

    api = make_api(client)
    done = await ended(client, api, batch.id)
    assert done.status == "completed"
    assert answers(await lines_of(api, done.output_file_id)) == {"one": "One.", "two": "Two."}


async def test_a_batch_runs_to_completed_on_postgresql(make_client, make_api, postgres_url):
    client = await make_client(database_url=postgres_url)
    api = make_api(client)
    data = jsonl(*(request_line(f"r{n}", f"Question {n}?") for n in range(5)))

    batch = await create_batch(api, data, metadata={"store": "postgresql"})
    done = await ended(client, api, batch.id)

    assert done.status == "completed"
    assert done.request_counts is not None
    assert (done.request_counts.completed, done.request_counts.total) == (5, 5)
    assert done.metadata == {"store": "postgresql"}
    assert answers(await lines_of(api, done.output_file_id)) == {
        f"r{n}": f"Question {n}?" for n in range(5)
    }
    assert [b.id for b in (await api.batches.list()).data] == [batch.id]


# What reaches the model, and the rest of the server


#: An OpenAI-compatible server's answer to a chat completion.
COMPLETION = {
    "id": "chatcmpl-123",
    "object": "chat.completion",
    "created": 1677652288,
    "model": "gpt-4o-mini",
    "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "Green."}, "finish_reason": "stop"}
    ],
    "usage": {"prompt_tokens": 9, "completion_tokens": 12, "total_tokens": 21},
}
SCHEMA = {
    "type": "json_schema",
    "json_schema": {"name": "colour", "schema": {"type": "object"}, "strict": True},
}
#: A request with a system prompt in two parts, earlier turns and every option.
CONVERSATION = {
    "custom_id": "colours",
    "method": "POST",
    "url": CHAT,
    "body": {
        "model": "wire",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "developer", "content": [{"type": "text", "text": "Say one word."}]},
            {"role": "user", "content": "Name a colour."},
            {"role": "assistant", "content": "Blue."},
            # Sent as written: a chat request is never templated.
            {"role": "user", "content": [{"type": "text", "text": "Not ${output.1}: another?"}]},
        ],
        "temperature": 0.3,
        "top_p": 0.9,
        "max_completion_tokens": 50,
        "stop": "\n\n",
        "seed": 7,
        "response_format": SCHEMA,
        "n": 1,
        "stream": False,
        "user": "someone",
    },
}
#: ``CONVERSATION`` as the server receives it.
WIRE_BODY = {
    "model": "gpt-4o-mini",
    "messages": [
        {"role": "system", "content": "Be brief.\n\nSay one word."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Not ${output.1}: another?"},
    ],
    "temperature": 0.3,
    "top_p": 0.9,
    # As the line named it: OpenAI's reasoning models take only max_completion_tokens.
    "max_completion_tokens": 50,
    "stop": ["\n\n"],
    "seed": 7,
    "response_format": SCHEMA,
}


async def wire_client(make_client: Any, make_settings: Any, fake: Any, tmp_path: Path) -> Client:
    """The app with model ``wire`` in its catalog, served by the fake OpenAI-compatible server."""
    catalog = tmp_path / "wire-models.toml"
    catalog.write_text(
        f'{GATED_CATALOG}\n[models."wire"]\nprovider = "openai"\nmodel_id = "gpt-4o-mini"\n'
        f'base_url = "{fake.url("/v1")}"\n'
    )
    client: Client = await make_client(make_settings(models_path=catalog))
    return client


async def test_messages_and_options_reach_an_openai_compatible_server_as_its_body(
    make_client, make_settings, make_api, fake, tmp_path
):
    fake.on(CHAT, fake.reply(COMPLETION))
    client = await wire_client(make_client, make_settings, fake, tmp_path)
    api = make_api(client)

    done = await ended(client, api, (await create_batch(api, jsonl(CONVERSATION))).id)

    assert done.status == "completed"
    (seen,) = fake.seen(CHAT)
    assert seen.json() == WIRE_BODY
    [output] = await lines_of(api, done.output_file_id)
    assert output["custom_id"] == "colours"
    body = output["response"]["body"]
    assert body["choices"][0]["message"]["content"] == "Green."
    assert body["model"] == "wire"
    assert body["usage"] == {"prompt_tokens": 9, "completion_tokens": 12, "total_tokens": 21}


async def test_a_failed_request_retried_by_the_retry_route_is_sent_again_as_it_was(
    make_client, make_settings, make_api, fake, tmp_path
):
    refused = {"error": {"message": "Try later.", "type": "invalid_request_error"}}
    fake.on(CHAT, fake.reply(refused, status=400), fake.reply(COMPLETION))
    client = await wire_client(make_client, make_settings, fake, tmp_path)
    api = make_api(client)
    failed = await ended(client, api, (await create_batch(api, jsonl(CONVERSATION))).id)
    assert failed.request_counts is not None
    assert (failed.request_counts.completed, failed.request_counts.failed) == (0, 1)
    [error] = await lines_of(api, failed.error_file_id)
    assert (error["custom_id"], error["error"]["code"]) == ("colours", "request_failed")
    assert "Try later." in error["error"]["message"]

    response = await client.post(RETRY, json={"invocation_id": failed.id}, headers=AUTH)
    assert response.status == 200, await response.text()
    body = await finished(client, (await response.json())["invocationId"])

    assert [(e["status"], e["result"]) for e in body["executions"]] == [("succeeded", "Green.")]
    first, again = fake.seen(CHAT)
    assert first.json() == again.json() == WIRE_BODY


async def test_a_v1_batch_is_listed_with_the_others_and_its_workbook_downloads(
    make_client, make_api
):
    client = await make_client()
    api = make_api(client)
    data = jsonl(request_line("first", "Hello."), request_line("second", "Goodbye."))
    batch = await create_batch(api, data)
    await ended(client, api, batch.id)

    response = await client.get(BATCHES, headers=AUTH)
    assert response.status == 200, await response.text()
    listed = (await response.json())["batches"]
    assert [entry["invocationId"] for entry in listed] == [batch.id]
    assert listed[0]["status"] == "completed"

    body = await finished(client, batch.id)
    assert body["status"] == "completed"
    name = body["xlsx_url"].rsplit("/", 1)[1]
    response = await client.get(download_path(name), headers=AUTH)
    assert response.status == 200
    rows = sheet_rows(await response.read())
    assert column(rows, "custom_id") == ["first", "second"]
    assert column(rows, "result") == ["Hello.", "Goodbye."]


async def test_a_retry_of_more_requests_than_max_executions_per_batch_runs(make_client, make_api):
    # A /v1 batch is bounded by MAX_FILE_LINES, its retry too, not by the other routes' limit.
    client = await make_client(max_executions_per_batch=2)
    api = make_api(client)
    lines = [
        request_line(f"r{n}", f"fail: {n}" if n == 3 else f"ok {n}", model="gated")
        for n in range(1, 4)
    ]
    gated(client).open()
    batch = await ended(client, api, (await create_batch(api, jsonl(*lines))).id)
    assert batch.request_counts is not None
    assert (batch.request_counts.completed, batch.request_counts.failed) == (2, 1)

    response = await client.post(RETRY, json={"invocation_id": batch.id}, headers=AUTH)

    assert response.status == 200, await response.text()
    body = await finished(client, (await response.json())["invocationId"])
    assert body["progress"]["total"] == 3


async def test_a_batch_refused_for_room_leaves_no_record(make_client, make_api):
    client = await make_client(max_concurrent_batches=1, max_queued_batches=0)
    api = make_api(client)
    running = await create_batch(api, jsonl(request_line("slow", "slow", model="gated")))
    await gated(client).wait_started(1)

    with pytest.raises(openai.RateLimitError) as refused:
        await create_batch(api, jsonl(request_line("more", "more")))

    assert refused.value.body is not None
    listed = await api.batches.list()
    assert [batch.id for batch in listed.data] == [running.id]
    gated(client).open()


async def test_a_batch_stored_before_its_create_was_cut_off_keeps_its_record(
    make_client, make_api, monkeypatch
):
    """Cut off once its batch was stored (as a cancel at shutdown would), the create fails,
    but the batch runs on, and it stays an OpenAI batch: listed, and ended with its file."""
    client = await make_client()
    api = make_api(client)
    engine = client.app[ENGINE]
    submit = engine.submit

    async def cut_off(*args: Any, **kwargs: Any) -> Any:
        await submit(*args, **kwargs)
        raise RuntimeError("cut off after the batch was stored")

    monkeypatch.setattr(engine, "submit", cut_off)
    with pytest.raises(openai.InternalServerError):
        await create_batch(api, jsonl(request_line("a", "hello")))
    [listed] = (await api.batches.list()).data
    done = await ended(client, api, listed.id)
    assert done.status == "completed"
    assert done.request_counts is not None and done.request_counts.completed == 1


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/v1/files/file-%00", 404),
        ("/v1/files/file-%00/content", 404),
        ("/v1/batches/batch_%00", 404),
        ("/v1/batches?after=batch_%00", 400),
        ("/v1/files?after=%01", 400),
    ],
)
async def test_an_id_with_a_control_character_is_not_found_on_every_store(
    make_client, path, status
):
    client = await make_client()
    response = await client.get(path, headers=BEARER)
    assert response.status == status, await response.text()
    assert set((await response.json())["error"]) == {"message", "type", "param", "code"}


async def test_metadata_is_bounded_as_at_openai(make_client, make_api):
    client = await make_client()
    api = make_api(client)
    with pytest.raises(openai.BadRequestError) as refused:
        await create_batch(api, jsonl(request_line("a", "hi")), metadata={"k" * 65: "v"})
    assert refused.value.body is not None
    assert "metadata" in str(refused.value.body)
