"""The shared HTTP plumbing: status and connection mapping, Retry-After, body helpers."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from aiohttp import web
from multidict import CIMultiDict

from batchexec.errors import FatalProviderError, RetryableProviderError
from batchexec.providers.base import ChatRequest, Turn
from batchexec.providers.http import (
    ErrorDetail,
    Wire,
    chat_messages,
    conversation,
    dig,
    fetch_json,
    malformed,
    require_str,
    retry_after_s,
    token_count,
)

pytest_plugins = ["tests.providerfakes"]

KEY = "sk-test-0123456789abcdef"
NOW = datetime(2025, 1, 1, 12, 0, 0, tzinfo=UTC)
MAX_BYTES = 4096


def _read_error(body: object) -> ErrorDetail:
    message = dig(body, "message")
    return ErrorDetail(message if isinstance(message, str) else None)


WIRE = Wire("Test server", _read_error)


async def fetch(fake, http_session, path="/x"):
    return await fetch_json(
        http_session,
        "POST",
        fake.url(path),
        WIRE,
        payload={"q": 1},
        secrets=(KEY, None),
        max_bytes=MAX_BYTES,
    )


@pytest.mark.parametrize(
    ("headers", "expected_s"),
    [
        ({"Retry-After": "7"}, 7.0),
        ({"Retry-After": "1.5"}, 1.5),
        ({"retry-after-ms": "644"}, 0.644),
        ({"retry-after-ms": "250", "Retry-After": "9"}, 0.25),
        ({"retry-after-ms": "soon", "Retry-After": "9"}, 9.0),
        ({"Retry-After": "Wed, 01 Jan 2025 12:00:30 GMT"}, 30.0),
        ({"Retry-After": "Wed, 01 Jan 2025 11:59:00 GMT"}, 0.0),
        ({"Retry-After": "-3"}, 0.0),
        ({"Retry-After": "tomorrow-ish"}, None),
        ({"Retry-After": "inf"}, None),
        ({}, None),
    ],
)
def test_retry_after(headers, expected_s):
    assert retry_after_s(CIMultiDict(headers), now=NOW) == expected_s


def test_dig_and_require_str():
    body = {"choices": [{"message": {"content": "hi"}}], "n": 3}
    assert dig(body, "choices", 0, "message", "content") == "hi"
    assert dig(body, "choices", 1, "message") is None
    assert dig(body, "n", "deeper") is None
    assert dig(None, "x") is None
    assert require_str(body, WIRE, "choices", 0, "message", "content") == "hi"
    with pytest.raises(RetryableProviderError, match=r"has no choices\[0\]\.message\.text"):
        require_str(body, WIRE, "choices", 0, "message", "text")
    assert str(malformed(WIRE, "data")) == "Test server: the response has no data"


@pytest.mark.parametrize(
    ("value", "count"), [(12, 12), (0, 0), (None, None), (-1, None), (True, None), ("5", None)]
)
def test_token_count(value, count):
    assert token_count(value) == count


def test_chat_messages():
    assert chat_messages(ChatRequest("hi")) == [{"role": "user", "content": "hi"}]
    assert chat_messages(ChatRequest("hi", system_prompt="be brief")) == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
    ]


def test_chat_messages_put_the_history_between_the_system_prompt_and_the_prompt():
    history = (Turn("user", "one"), Turn("assistant", "two"), Turn("assistant", "three"))
    request = ChatRequest("four", system_prompt="be brief", history=history)
    turns = [
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "two"},
        {"role": "assistant", "content": "three"},
        {"role": "user", "content": "four"},
    ]
    assert conversation(request) == turns
    assert chat_messages(request) == [{"role": "system", "content": "be brief"}, *turns]


async def test_returns_parsed_json_and_sends_the_payload(fake, http_session):
    fake.on("/x", fake.reply({"ok": True}))
    assert await fetch(fake, http_session) == {"ok": True}
    (seen,) = fake.seen("/x")
    assert seen.method == "POST"
    assert seen.json() == {"q": 1}
    assert seen.headers["Content-Type"] == "application/json"


@pytest.mark.parametrize("status", [408, 409, 429, 500, 502, 503, 504, 529])
async def test_retryable_statuses(fake, http_session, status):
    fake.on("/x", fake.reply({"message": "try later"}, status=status, headers={"Retry-After": "2"}))
    with pytest.raises(RetryableProviderError) as caught:
        await fetch(fake, http_session)
    assert caught.value.status == status
    assert caught.value.retry_after_s == 2.0
    assert str(caught.value) == f"Test server: try later (HTTP {status})"


@pytest.mark.parametrize("status", [400, 401, 403, 404, 413, 422])
async def test_fatal_statuses(fake, http_session, status):
    fake.on("/x", fake.reply({"message": "no good"}, status=status))
    with pytest.raises(FatalProviderError) as caught:
        await fetch(fake, http_session)
    assert str(caught.value) == f"Test server: no good (HTTP {status})"
    assert caught.value.retry_after_s is None


async def test_error_body_can_override_the_status(fake, http_session):
    wire = Wire("Test server", lambda body: ErrorDetail("quota gone", retryable=False))
    fake.on("/x", fake.reply({}, status=429))
    with pytest.raises(FatalProviderError, match="quota gone"):
        await fetch_json(http_session, "GET", fake.url("/x"), wire, max_bytes=MAX_BYTES)


async def test_unreadable_error_bodies_fall_back_to_the_reason(fake, http_session):
    fake.on("/plain", fake.reply_raw("upstream exploded", status=502, content_type="text/plain"))
    fake.on("/html", fake.reply_raw("<html>" + "x" * 5000, status=502, content_type="text/html"))
    fake.on("/long", fake.reply({"message": "y" * 5000}, status=400))
    with pytest.raises(RetryableProviderError) as plain:
        await fetch(fake, http_session, "/plain")
    assert str(plain.value) == "Test server: upstream exploded (HTTP 502)"
    with pytest.raises(RetryableProviderError) as html:
        await fetch(fake, http_session, "/html")
    assert str(html.value) == "Test server: Bad Gateway (HTTP 502)"
    with pytest.raises(FatalProviderError) as long:
        await fetch(fake, http_session, "/long")
    assert len(long.value.message) < 600
    assert long.value.message.endswith("…")


async def test_secrets_are_masked_in_messages(fake, http_session):
    fake.on("/x", fake.reply({"message": f"Incorrect API key provided: {KEY}."}, status=401))
    with pytest.raises(FatalProviderError) as caught:
        await fetch(fake, http_session)
    assert KEY not in str(caught.value)
    assert str(caught.value) == "Test server: Incorrect API key provided: ***. (HTTP 401)"


async def test_redirects_are_not_followed(fake, http_session):
    fake.on("/x", fake.reply({}, status=307, headers={"Location": "https://elsewhere.invalid/x"}))
    with pytest.raises(FatalProviderError, match=r"redirected to https://elsewhere\.invalid/x"):
        await fetch(fake, http_session)
    assert len(fake.requests) == 1


async def test_invalid_json_on_success_is_retryable(fake, http_session):
    fake.on("/x", fake.reply_raw('{"choices": [{"mess'))
    with pytest.raises(RetryableProviderError, match="not valid JSON"):
        await fetch(fake, http_session)


async def test_dropped_connection_is_retryable(fake, http_session):
    fake.on("/x", fake.drop_midway())
    with pytest.raises(RetryableProviderError) as caught:
        await fetch(fake, http_session)
    assert str(caught.value) == (
        "Test server: the connection broke while the response was being read"
    )


async def test_refused_connection_is_retryable(http_session, unused_tcp_port):
    url = f"http://127.0.0.1:{unused_tcp_port}/x"
    with pytest.raises(RetryableProviderError) as caught:
        await fetch_json(http_session, "POST", url, WIRE, payload={}, max_bytes=MAX_BYTES)
    assert str(caught.value) == f"Test server: cannot connect to 127.0.0.1:{unused_tcp_port}"


async def test_invalid_url_is_fatal(http_session):
    with pytest.raises(FatalProviderError, match="invalid URL"):
        await fetch_json(http_session, "POST", "http://", WIRE, payload={}, max_bytes=MAX_BYTES)


async def test_a_server_that_never_answers_leaves_the_call_pending(fake, http_session):
    fake.on("/x", fake.hang)
    await fake.assert_never_answered(fetch(fake, http_session))


async def test_a_body_announced_larger_than_the_limit_is_refused_unread(fake, http_session):
    fake.on("/x", fake.reply({"text": "x" * 10_000}))
    with pytest.raises(FatalProviderError) as caught:
        await fetch(fake, http_session)
    assert str(caught.value) == (
        "Test server: the response is larger than 4096 bytes, "
        "the limit (MAX_RESPONSE_BYTES) (HTTP 200)"
    )


async def test_a_streamed_body_is_cut_off_at_the_limit(fake, http_session):
    async def endless(request):
        response = web.StreamResponse()  # chunked: no Content-Length to go by
        await response.prepare(request)
        await response.write(b'{"text": "')
        for _ in range(1_000):
            await response.write(b"x" * 1024)
        await response.write(b'"}')
        return response

    fake.on("/x", endless)
    with pytest.raises(FatalProviderError, match="larger than 4096 bytes"):
        await fetch(fake, http_session)


async def test_a_body_at_the_limit_is_read(fake, http_session):
    body = {"text": "x" * (MAX_BYTES - len('{"text": ""}'))}
    fake.on("/x", fake.reply(body))
    assert await fetch(fake, http_session) == body


async def test_a_huge_error_body_is_read_only_as_far_as_its_message(fake, http_session):
    fake.on("/x", fake.reply_raw("boom " * 1_000_000, status=503, content_type="text/plain"))
    with pytest.raises(RetryableProviderError) as caught:
        await fetch(fake, http_session)
    message = str(caught.value)
    assert message.startswith("Test server: boom boom")
    assert len(message) < 600
