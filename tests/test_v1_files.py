"""``/v1/files`` through the real app, driven by the official ``openai`` client.

Where that client cannot send what a test needs (no purpose, no file part, a
body that is not multipart), the test client sends it raw.
"""

from __future__ import annotations

import asyncio
import io
import random
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal

import aiohttp
import openai
import pytest
from aiohttp.test_utils import TestClient

from batchexec.api import API_KEY_HEADER, V1_FILES
from batchexec.store import FILE_CHUNK_BYTES as CHUNK_BYTES
from batchexec.store import BatchStore
from batchexec.web.keys import REGISTRY
from tests.helpers import API_KEY, AUTH, owner_of

#: A few request lines of a batch input file, with bytes no text decoding keeps as they are.
CONTENT = (
    b'{"custom_id": "r1", "method": "POST", "url": "/v1/chat/completions", "body": {}}\n'
    b'{"custom_id": "r\xc3\xa9 \\u0000", "body": {"note": "\x00\xff\xfe"}}\r\n'
)
BEARER = {"Authorization": f"Bearer {API_KEY}"}

MakeApi = Callable[..., openai.AsyncOpenAI]


@pytest.fixture
async def make_api() -> AsyncIterator[MakeApi]:
    """Makes ``openai`` clients of a test client's ``/v1``; every one is closed after."""
    made: list[openai.AsyncOpenAI] = []

    def make(client: TestClient[Any, Any], api_key: str = API_KEY) -> openai.AsyncOpenAI:
        api = openai.AsyncOpenAI(
            base_url=str(client.make_url("/v1")), api_key=api_key, max_retries=0
        )
        made.append(api)
        return api

    yield make
    for api in made:
        await api.close()


def store_of(client: TestClient[Any, Any]) -> BatchStore:
    store: BatchStore = client.app[REGISTRY].store
    return store


async def chunks_of(client: TestClient[Any, Any], file_id: str) -> list[bytes]:
    """The chunks the store holds of ``file_id``, in order."""
    found: list[bytes] = []
    while (data := await store_of(client).chunk(file_id, len(found))) is not None:
        found.append(data)
    return found


async def until_kept(client: TestClient[Any, Any], count: int, *, rounds: int = 10_000) -> None:
    """Let the app run until its key keeps ``count`` files, complete or not."""
    store, owner = store_of(client), owner_of(client.app)
    for _ in range(rounds):
        if await store.count_stored_files(owner) == count:
            return
        await asyncio.sleep(0)
    raise AssertionError(f"the key never kept {count} files")


def form(
    content: bytes | None = CONTENT, purpose: str | None = "batch", *, file_first: bool = False
) -> aiohttp.FormData:
    """A ``POST /v1/files`` body as a client of its own would write it."""
    body = aiohttp.FormData()
    fields: list[Callable[[], None]] = []
    if content is not None:
        fields.append(
            lambda: body.add_field(
                "file",
                io.BytesIO(content),
                filename="requests.jsonl",
                content_type="application/jsonl",
            )
        )
    if purpose is not None:
        fields.append(lambda: body.add_field("purpose", purpose))
    for add in fields if file_first else fields[::-1]:
        add()
    return body


def envelope_of(body: Any, *, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """``body`` checked as OpenAI's error envelope; its ``error``."""
    assert set(body) == {"error"}
    error: dict[str, Any] = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert (error["param"], error["code"]) == (param, code)
    return error


# A file's life


async def test_a_file_is_created_retrieved_listed_read_and_deleted(make_client, make_api):
    client = await make_client()
    api = make_api(client)

    created = await api.files.create(file=("requests.jsonl", CONTENT), purpose="batch")

    assert created.id.startswith("file-")
    assert (created.object, created.bytes, created.filename, created.purpose) == (
        "file",
        len(CONTENT),
        "requests.jsonl",
        "batch",
    )
    assert created.status == "processed"
    assert created.expires_at == created.created_at + 168 * 3600
    assert await api.files.retrieve(created.id) == created
    listed = await api.files.list()
    assert listed.data == [created]
    assert listed.has_more is False

    content = await api.files.content(created.id)
    assert content.content == CONTENT
    assert content.response.headers["Content-Type"] == "application/octet-stream"
    assert content.response.headers["Content-Disposition"] == (
        'attachment; filename="requests.jsonl"'
    )

    deleted = await api.files.delete(created.id)
    assert (deleted.id, deleted.object, deleted.deleted) == (created.id, "file", True)
    with pytest.raises(openai.NotFoundError) as missing:
        await api.files.retrieve(created.id)
    envelope_of(missing.value.response.json())
    assert created.id in missing.value.message
    with pytest.raises(openai.NotFoundError):
        await api.files.content(created.id)
    with pytest.raises(openai.NotFoundError):
        await api.files.delete(created.id)
    assert (await api.files.list()).data == []
    assert await store_of(client).count_stored_files(owner_of(client.app)) == 0


async def test_an_upload_of_several_chunks_reads_back_exactly(make_client, make_api):
    client = await make_client()
    api = make_api(client)
    data = random.Random(20240601).randbytes(3 * CHUNK_BYTES + 12_345)

    created = await api.files.create(file=("big.jsonl", data), purpose="batch")

    assert created.bytes == len(data)
    chunks = await chunks_of(client, created.id)
    assert len(chunks) >= 3
    assert all(len(chunk) >= CHUNK_BYTES for chunk in chunks[:-1])
    assert b"".join(chunks) == data
    content = await api.files.content(created.id)
    assert content.content == data
    assert content.response.headers["Content-Length"] == str(len(data))


async def test_an_empty_file_is_kept_and_reads_back_empty(make_client, make_api):
    client = await make_client()
    api = make_api(client)

    created = await api.files.create(file=("empty.jsonl", b""), purpose="batch")

    assert created.bytes == 0
    assert (await api.files.content(created.id)).content == b""


# Refused uploads


@pytest.mark.parametrize("over_by", [1, 1024 * 1024], ids=["just over", "far over"])
async def test_a_file_over_max_file_bytes_is_413_and_leaves_nothing_stored(
    make_client, make_api, over_by
):
    limit = 64 * 1024
    client = await make_client(max_file_bytes=limit)
    api = make_api(client)

    with pytest.raises(openai.APIStatusError) as refused:
        await api.files.create(file=("big.jsonl", b"x" * (limit + over_by)), purpose="batch")

    assert refused.value.status_code == 413
    envelope_of(refused.value.response.json())
    store = store_of(client)
    assert await store.count_stored_files(owner_of(client.app)) == 0
    assert (await api.files.list()).data == []
    # A file of exactly the limit is taken.
    created = await api.files.create(file=("fits.jsonl", b"y" * limit), purpose="batch")
    assert created.bytes == limit


async def test_an_upload_cut_off_midway_is_never_seen_and_leaves_nothing_stored(
    make_client, make_api
):
    client = await make_client()
    api = make_api(client)
    boundary = "cut-off-boundary"
    head = (
        f"--{boundary}\r\n"
        'Content-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
        f"--{boundary}\r\n"
        'Content-Disposition: form-data; name="file"; filename="cut.jsonl"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    _, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(
        (
            "POST /v1/files HTTP/1.1\r\n"
            f"Host: {client.host}:{client.port}\r\n"
            f"Authorization: Bearer {API_KEY}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
            f"Content-Length: {len(head) + 8 * CHUNK_BYTES}\r\n\r\n"
        ).encode()
        + head
        + b"\x00" * (2 * CHUNK_BYTES + 1)
    )
    await writer.drain()
    try:
        # Half written: kept (and counted) as it arrives, but seen by no one.
        await until_kept(client, 1)
        assert (await api.files.list()).data == []
    finally:
        writer.transport.abort()

    await until_kept(client, 0)
    assert (await api.files.list()).data == []


async def test_a_purpose_other_than_batch_is_400_naming_purpose(make_client, make_api):
    client = await make_client()
    api = make_api(client)

    with pytest.raises(openai.BadRequestError) as refused:
        await api.files.create(file=("requests.jsonl", CONTENT), purpose="fine-tune")

    error = envelope_of(refused.value.response.json(), param="purpose")
    assert error["type"] == "invalid_request_error"
    assert "fine-tune" in error["message"]
    assert refused.value.param == "purpose"
    assert await store_of(client).count_stored_files(owner_of(client.app)) == 0


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"purpose": None}, "purpose"),
        ({"purpose": "assistants", "file_first": True}, "purpose"),
        ({"content": None}, "file"),
    ],
    ids=["no purpose", "wrong purpose after the file", "no file"],
)
async def test_an_upload_missing_a_field_is_400_naming_it_and_leaves_nothing_stored(
    make_client, fields, param
):
    client = await make_client()

    response = await client.post(V1_FILES, data=form(**fields), headers=BEARER)

    assert response.status == 400
    envelope_of(await response.json(), param=param)
    assert await store_of(client).count_stored_files(owner_of(client.app)) == 0


async def test_a_body_that_is_not_multipart_is_400(make_client):
    client = await make_client()

    response = await client.post(
        V1_FILES, json={"file": "requests.jsonl", "purpose": "batch"}, headers=BEARER
    )

    assert response.status == 400
    error = envelope_of(await response.json(), param="file")
    assert "multipart/form-data" in error["message"]


# Keys


async def test_a_bad_key_is_401_in_openais_envelope(make_client, make_api):
    client = await make_client()
    api = make_api(client, api_key="not-a-key")

    with pytest.raises(openai.AuthenticationError) as refused:
        await api.files.list()

    assert refused.value.status_code == 401
    assert refused.value.code == "invalid_api_key"
    error = envelope_of(refused.value.response.json(), code="invalid_api_key")
    assert error["type"] == "invalid_request_error"
    # No key at all is refused alike.
    response = await client.get(V1_FILES)
    assert response.status == 401
    envelope_of(await response.json(), code="invalid_api_key")


async def test_the_integrations_api_key_header_works_too(make_client, make_api):
    client = await make_client()

    response = await client.post(V1_FILES, data=form(), headers=AUTH)
    assert response.status == 200, await response.text()
    created = await response.json()

    listed = await client.get(V1_FILES, headers=AUTH)
    assert [file["id"] for file in (await listed.json())["data"]] == [created["id"]]
    # The same key as a bearer token owns the same file.
    content = await make_api(client).files.content(created["id"])
    assert content.content == CONTENT


async def test_another_keys_files_are_not_found_nor_listed(make_client, make_api):
    client = await make_client(integrations_api_keys=f"{API_KEY},key-b")
    mine = make_api(client)
    theirs = make_api(client, api_key="key-b")
    created = await mine.files.create(file=("requests.jsonl", CONTENT), purpose="batch")

    for call in (theirs.files.retrieve, theirs.files.content, theirs.files.delete):
        with pytest.raises(openai.NotFoundError):
            await call(created.id)
    assert (await theirs.files.list()).data == []
    assert (await theirs.files.list(after=created.id)).data == []
    response = await client.get(V1_FILES, headers={API_KEY_HEADER: "key-b"})
    assert await response.json() == {
        "object": "list",
        "data": [],
        "first_id": None,
        "last_id": None,
        "has_more": False,
    }
    assert await mine.files.retrieve(created.id) == created  # not deleted by the other key


# Listing


async def test_files_are_paged_after_the_last_id_in_either_order(make_client, make_api):
    client = await make_client()
    api = make_api(client)
    ids = [
        (await api.files.create(file=(f"f{n}.jsonl", CONTENT), purpose="batch")).id
        for n in range(5)
    ]
    # Files created in the same instant are in the order of their ids.
    stored = [await store_of(client).stored_file(file_id, owner_of(client.app)) for file_id in ids]
    by_age = sorted(filter(None, stored), key=lambda file: (file.created_at, file.id))
    oldest_first = [file.id for file in by_age]
    assert sorted(oldest_first) == sorted(ids)

    orders: list[tuple[Literal["asc", "desc"], list[str]]] = [
        ("asc", oldest_first),
        ("desc", oldest_first[::-1]),
    ]
    for order, expected in orders:
        pages: list[dict[str, Any]] = []
        query: dict[str, Any] = {"limit": 2, "order": order}
        while True:
            response = await client.get(V1_FILES, params=query, headers=BEARER)
            assert response.status == 200, await response.text()
            pages.append(await response.json())
            if not pages[-1]["has_more"]:
                break
            query["after"] = pages[-1]["last_id"]
        assert [[file["id"] for file in page["data"]] for page in pages] == [
            expected[0:2],
            expected[2:4],
            expected[4:],
        ]
        assert [(page["first_id"], page["last_id"], page["has_more"]) for page in pages] == [
            (expected[0], expected[1], True),
            (expected[2], expected[3], True),
            (expected[4], expected[4], False),
        ]
        # The client's own paging walks the same pages.
        walked = [file.id async for file in api.files.list(limit=2, order=order)]
        assert walked == expected
    assert [file.id for file in (await api.files.list()).data] == oldest_first[::-1]
    page = await api.files.list(after=oldest_first[-1], order="asc")
    assert (page.data, page.has_more) == ([], False)
    assert (await api.files.list(purpose="batch_output")).data == []
    assert len((await api.files.list(purpose="batch")).data) == 5


async def test_an_unknown_after_is_an_empty_page(make_client, make_api):
    client = await make_client()
    api = make_api(client)
    await api.files.create(file=("requests.jsonl", CONTENT), purpose="batch")

    page = await api.files.list(after="file-000000000000000000000000")

    assert (page.data, page.has_more) == ([], False)


@pytest.mark.parametrize(
    ("query", "param"),
    [
        ({"limit": "0"}, "limit"),
        ({"limit": "10001"}, "limit"),
        ({"order": "sideways"}, "order"),
        ({"purpose": "fine-tune"}, "purpose"),
    ],
)
async def test_a_bad_list_query_is_400_naming_its_parameter(make_client, query, param):
    client = await make_client()

    response = await client.get(V1_FILES, params=query, headers=BEARER)

    assert response.status == 400
    envelope_of(await response.json(), param=param)


# Limits and unknown paths


async def test_a_key_keeping_max_stored_files_is_429_until_it_deletes_one(make_client, make_api):
    client = await make_client(max_stored_files=2)
    api = make_api(client)
    kept = [
        await api.files.create(file=(f"f{n}.jsonl", CONTENT), purpose="batch") for n in range(2)
    ]

    with pytest.raises(openai.RateLimitError) as refused:
        await api.files.create(file=("one-too-many.jsonl", CONTENT), purpose="batch")

    error = envelope_of(refused.value.response.json())
    assert error["type"] == "rate_limit_error"
    assert "MAX_STORED_FILES" in error["message"]
    assert int(refused.value.response.headers["Retry-After"]) >= 1
    assert len((await api.files.list()).data) == 2

    await api.files.delete(kept[0].id)
    await api.files.create(file=("room-again.jsonl", CONTENT), purpose="batch")


async def test_an_unknown_path_under_v1_is_404_in_openais_envelope(make_client):
    client = await make_client()

    for path in ("/v1/nothing-here", "/v1/files/file-1/elsewhere"):
        response = await client.get(path, headers=BEARER)
        assert response.status == 404, path
        envelope_of(await response.json())
