"""The OpenAPI document and its page: valid OpenAPI 3.1, true to the routes and their answers.

The last tests run schemathesis against the real server on loopback (as
``serve`` runs it, in a thread of its own, since schemathesis calls it
synchronously): a bounded, derandomized run with no 5xx and every answer
as the document says, in status, content type, headers and body.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
from collections.abc import Iterator, Mapping
from typing import Any

import aiohttp
import hypothesis
import jsonschema
import pytest
import requests
import schemathesis
from aiohttp import web
from aiohttp.test_utils import TestClient
from hypothesis.stateful import run_state_machine_as_test
from openapi_spec_validator import validate as validate_openapi

from batchexec import Settings, api, create_app
from batchexec.api import API_KEY_HEADER
from batchexec.web.apidocs import CONTENT_SECURITY_POLICY
from batchexec.web.openapi import document
from batchexec.web.server import JSONErrorAppRunner
from tests.fakes import GatedProvider
from tests.helpers import AUTH, ClientFactory, SettingsFactory, finished, gated, submit

#: Fuzzed requests per operation (coverage and examples phases come on top).
MAX_EXAMPLES = 12
#: Steps of one stateful scenario, and scenarios: each follows the document's links.
STATEFUL_STEPS = 6
STATEFUL_SCENARIOS = 8
SEED = 14


# The document and the routes


async def document_of(client: TestClient[Any, Any]) -> dict[str, Any]:
    response = await client.get(api.OPENAPI)
    assert response.status == 200, await response.text()
    assert response.content_type == "application/json"
    document: dict[str, Any] = await response.json()
    return document


async def test_the_document_is_openapi_3_1_and_needs_no_key(make_client: ClientFactory) -> None:
    client = await make_client()
    document = await document_of(client)
    assert document["openapi"].startswith("3.1.")
    validate_openapi(document)
    scheme = document["components"]["securitySchemes"]["IntegrationsApiKey"]
    assert scheme == {"type": "apiKey", "in": "header", "name": API_KEY_HEADER}
    assert document["servers"] == [{"url": "/"}]


async def test_every_route_is_documented_and_nothing_else(make_client: ClientFactory) -> None:
    client = await make_client()
    document = await document_of(client)
    registered = {
        (route.method.lower(), route.resource.canonical): route.resource.name
        for route in client.app.router.routes()
        # aiohttp answers HEAD for every GET route; HTTP says it is the same answer.
        if route.method != "HEAD" and route.resource is not None
    }
    documented = {
        (method, path): operation["operationId"]
        for path, operations in document["paths"].items()
        for method, operation in operations.items()
    }
    assert documented == registered


async def test_open_routes_answer_without_a_key_and_the_others_do_not(
    make_client: ClientFactory,
) -> None:
    client = await make_client()
    document = await document_of(client)
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            url = path.replace("{invocation_id}", "x").replace("{file_name}", "x")
            url = url.replace("{name}", "app.js")
            response = await client.request(method, url)
            if operation.get("security") == []:
                assert response.status == 200, (method, path)
            else:
                assert response.status == 401, (method, path)
                check(document, method, path, response.status, response, await response.json())


async def test_mounted_under_a_prefix_the_document_says_where(
    make_settings: SettingsFactory, aiohttp_client: Any
) -> None:
    parent = web.Application()
    parent.add_subapp("/batch", create_app(make_settings(), extra_providers=(GatedProvider,)))
    client: TestClient[Any, Any] = await aiohttp_client(parent)
    response = await client.get("/batch" + api.OPENAPI)
    assert (await response.json())["servers"] == [{"url": "/batch"}]
    page = await client.get("/batch" + api.DOCS)
    assert page.status == 200


async def test_server_name_is_the_documents_server(make_client: ClientFactory) -> None:
    client = await make_client(server_name="https://batches.example.com/api")
    document = await document_of(client)
    assert document["servers"] == [{"url": "https://batches.example.com/api"}]


async def test_the_docs_page_shows_every_route_offline(make_client: ClientFactory) -> None:
    client = await make_client()
    document = await document_of(client)
    response = await client.get(api.DOCS)
    assert response.status == 200
    assert response.content_type == "text/html"
    assert response.headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
    page = await response.text()
    for path, operations in document["paths"].items():
        assert f"<code>{path}</code>" in page
        for operation in operations.values():
            assert f'id="{operation["operationId"]}"' in page
    for name in document["components"]["schemas"]:
        assert f'id="schema-{name}"' in page
    # Nothing to fetch: no script, no stylesheet or image from elsewhere.
    assert "<script" not in page
    assert "src=" not in page
    assert "<link" not in page


# Real answers against the document


def check(
    document: Mapping[str, Any],
    method: str,
    path: str,
    status: int,
    response: aiohttp.ClientResponse,
    body: Any,
) -> None:
    """Fail unless ``status``, the content type and ``body`` are as the document says."""
    answers = document["paths"][path][method]["responses"]
    assert str(status) in answers, f"{method.upper()} {path}: {status} is not documented"
    content = answers[str(status)]["content"]
    assert response.content_type in content, f"{method.upper()} {path}: {response.content_type}"
    if response.content_type == "application/json":
        validator(document, content["application/json"]["schema"]).validate(body)


def validator(document: Mapping[str, Any], schema: Mapping[str, Any]) -> jsonschema.Validator:
    """A JSON Schema 2020-12 validator of ``schema``, whose references point into ``document``."""
    return jsonschema.Draft202012Validator({**schema, "components": document["components"]})


class Caller:
    """Calls the app and checks every answer against its document."""

    def __init__(self, client: TestClient[Any, Any], document: Mapping[str, Any]) -> None:
        self.client = client
        self.document = document

    async def call(
        self, method: str, path: str, expected: int, url: str | None = None, **kwargs: Any
    ) -> Any:
        kwargs.setdefault("headers", AUTH)
        response = await self.client.request(method, url or path, **kwargs)
        raw = await response.read()
        assert response.status == expected, raw[:500]
        body = json.loads(raw) if response.content_type == "application/json" else raw
        check(self.document, method.lower(), path, response.status, response, body)
        return body


def events_of(stream: bytes) -> list[tuple[str, Any]]:
    """The ``(name, data)`` of each server-sent event of ``stream``."""
    events = []
    for block in stream.decode().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines() if not line.startswith(":"))
        if lines:
            events.append((lines["event"], json.loads(lines["data"])))
    return events


async def test_what_the_routes_answer_is_what_the_document_says(
    make_client: ClientFactory,
) -> None:
    client = await make_client()
    document = await document_of(client)
    calls = Caller(client, document)
    await calls.call("GET", api.HEALTH, 200, headers={})
    await calls.call("GET", api.OPENAPI, 200, headers={})
    await calls.call("GET", api.DOCS, 200, headers={})
    await calls.call("GET", api.MODELS, 200)
    await calls.call("GET", api.METRICS, 200)
    await calls.call("GET", api.PAGE, 200, headers={})
    for name in ("app.js", "style.css"):
        await calls.call("GET", api.PAGE_FILE, 200, url=api.page_path(name), headers={})
    await calls.call("GET", api.PAGE_FILE, 404, url=api.page_path("missing.js"), headers={})

    invocation_id = await submit(
        client, [{"prompt": "a", "model": "echo"}, {"prompt": "${output.1}", "model": "echo"}]
    )
    await finished(client, invocation_id)
    by_id = {"invocation_id": invocation_id}
    done = await calls.call("POST", api.RESULTS, 200, json=by_id)
    assert done["status"] == "completed"
    await calls.call("POST", api.RESULTS + "/", 200, json={**by_id, "since": 1})
    await calls.call(
        "POST", api.RESULTS, 200, json={"invocationId": invocation_id, "progress_only": True}
    )
    await calls.call("GET", api.BATCHES, 200, params={"limit": "5", "status": "completed"})
    file_name = done["xlsx_url"].rsplit("/", 1)[1]
    await calls.call("GET", api.DOWNLOAD, 200, url=api.download_path(file_name))
    await calls.call("POST", api.CANCEL, 409, json=by_id)
    await calls.call("POST", api.RETRY, 409, json=by_id)

    stream = await calls.call("GET", api.EVENTS, 200, url=api.events_path(invocation_id))
    events = events_of(stream)
    assert [name for name, _ in events] == ["execution", "execution", "progress", "done"]
    event_schemas = document["paths"][api.EVENTS]["get"]["responses"]["200"]["content"][
        "text/event-stream"
    ]["schema"]["oneOf"]
    data_schemas = {
        schema["properties"]["event"]["const"]: schema["properties"]["data"]["contentSchema"]
        for schema in event_schemas
    }
    for name, data in events:
        validator(document, data_schemas[name]).validate(data)

    # A running batch, cancelled; a failed row, retried.
    running = await submit(
        client, [{"prompt": "fail:x", "model": "gated"}, {"prompt": "wait", "model": "gated"}]
    )
    await gated(client).wait_started(2)
    gated(client).open("fail:x")
    await calls.call("POST", api.RESULTS, 200, json={"invocation_id": running})
    cancelled = await calls.call("POST", api.CANCEL, 200, json={"invocation_id": running})
    assert cancelled["status"] == "cancelled"
    gated(client).open()
    retried = await calls.call("POST", api.RETRY, 200, json={"invocation_id": running})
    assert retried["retry_of"] == running
    await finished(client, retried["invocationId"])

    # A template, and what its id answers.
    template = await calls.call(
        "POST", api.PROCESS_CSV, 200, json={"csv_content": "prompt,model\nhi,echo\n"}
    )
    not_run = await calls.call(
        "POST", api.RESULTS, 404, json={"invocation_id": template["invocationId"]}
    )
    assert not_run["xlsx_url"] == template["xlsx_url"]
    form = aiohttp.FormData()
    form.add_field("file", b"prompt,model\nhi,echo\n", filename="prompts.csv")
    form.add_field("execute", "true")
    uploaded = await calls.call("POST", api.UPLOAD, 200, data=form)
    await finished(client, uploaded["invocationId"])
    checked = aiohttp.FormData()
    checked.add_field("file", b"prompt\nhi\n", filename="prompts.csv")
    checked.add_field("model", "echo")
    await calls.call("POST", api.VALIDATE, 200, data=checked)
    await calls.call("POST", api.VALIDATE, 200, json={"csv_content": "prompt,model\nhi,echo\n"})
    await calls.call("POST", api.VALIDATE, 422, json={"csv_content": "prompt,model\n,echo\n"})

    # The error envelope.
    await calls.call("POST", api.RESULTS, 401, json=by_id, headers={})
    await calls.call(
        "POST",
        api.RESULTS,
        400,
        data=b"{not json",
        headers={**AUTH, "Content-Type": "application/json"},
    )
    await calls.call("POST", api.RESULTS, 404, json={"invocation_id": "no-such-batch"})
    await calls.call("POST", api.EXECUTE_BATCH, 422, json={"executions": [{"prompt": 1}]})
    await calls.call("GET", api.BATCHES, 422, params={"limit": "0"})
    await calls.call("GET", api.EVENTS, 404, url=api.events_path("no-such-batch"))
    await calls.call("GET", api.DOWNLOAD, 404, url=api.download_path("no-such-file.xlsx"))


async def test_too_large_and_too_many_are_documented(make_client: ClientFactory) -> None:
    client = await make_client(max_body_bytes=1024, max_queued_batches=1, max_concurrent_batches=1)
    calls = Caller(client, await document_of(client))
    await calls.call("POST", api.EXECUTE_BATCH, 413, json={"executions": [{"prompt": "x" * 2000}]})
    for _ in range(2):
        await submit(client, [{"prompt": "wait", "model": "gated"}])
    full = {"executions": [{"prompt": "more", "model": "gated"}]}
    await calls.call("POST", api.EXECUTE_BATCH, 429, json=full)
    gated(client).open()


# schemathesis against the running server


@pytest.fixture(scope="module")
def live_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The base URL of the real app, served on loopback as ``serve`` serves it.

    In a thread and event loop of its own, since schemathesis calls it
    synchronously; one server for the module, as the fuzzer's examples share
    it. Rows that name no model run on ``echo``, so fuzzed batches run too.
    """
    folder = tmp_path_factory.mktemp("live")
    with pytest.MonkeyPatch.context() as environment:
        # Module-scoped, so before conftest's isolation: the same, for this server.
        for name in list(os.environ):
            if name.endswith(("_API_KEY", "_APIKEY")) or name.upper() in _SETTINGS_VARIABLES:
                environment.delenv(name)
        settings = Settings(
            _env_file=None,
            public_dir=folder / "public",
            database_url="memory://",
            default_model="echo",
            shutdown_grace_s=0,
        )
    app = create_app(settings)
    loop = asyncio.new_event_loop()
    runner = JSONErrorAppRunner(app)
    started = threading.Event()

    def serve() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(runner.setup())
        loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", 0).start())
        started.set()
        loop.run_forever()
        loop.run_until_complete(runner.cleanup())
        loop.close()

    thread = threading.Thread(target=serve, name="live-server")
    thread.start()
    assert started.wait(30), "the server did not start"
    host, port = runner.addresses[0][:2]
    try:
        yield f"http://{host}:{port}"
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)


@pytest.fixture(scope="module")
def live_session() -> Iterator[requests.Session]:
    """One connection pool for the fuzzer's calls: a new connection each would cost more."""
    with requests.Session() as session:
        yield session


#: The environment variables ``Settings`` reads.
_SETTINGS_VARIABLES = {
    str(name).upper()
    for field in Settings.model_fields.values()
    for name in getattr(field.validation_alias, "choices", ())
}


def fuzzer_config() -> schemathesis.Config:
    """How schemathesis runs here: bounded, derandomized, with the checks of the document."""
    return schemathesis.Config.from_dict(
        {
            "seed": SEED,
            "headers": {API_KEY_HEADER: AUTH[API_KEY_HEADER]},
            "generation": {"max-examples": MAX_EXAMPLES, "deterministic": True, "database": "none"},
            "checks": {
                "enabled": False,
                "not_a_server_error": {"enabled": True},
                "status_code_conformance": {"enabled": True},
                "content_type_conformance": {"enabled": True},
                "response_headers_conformance": {"enabled": True},
                "response_schema_conformance": {"enabled": True},
            },
        }
    )


#: The document as the code makes it (the live server's is the same, with ``servers``).
fuzzed = schemathesis.openapi.from_dict(dict(document()), config=fuzzer_config())


@fuzzed.parametrize()
@hypothesis.settings(deadline=None, derandomize=True, database=None)
def test_schemathesis_finds_no_server_error_and_no_answer_unlike_the_document(
    case: Any, live_url: str, live_session: requests.Session
) -> None:
    case.call_and_validate(base_url=live_url, session=live_session)


def test_schemathesis_follows_the_links_without_a_fault(live_url: str) -> None:
    schema = schemathesis.openapi.from_url(live_url + api.OPENAPI, config=fuzzer_config())
    run_state_machine_as_test(
        schema.as_state_machine(),
        settings=hypothesis.settings(
            max_examples=STATEFUL_SCENARIOS,
            stateful_step_count=STATEFUL_STEPS,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(hypothesis.HealthCheck),
        ),
    )
