"""The web page's server side: ``/`` and its files without a key, and the routes it calls
that are its own (``validate``, and the upload's ``model`` field)."""

from __future__ import annotations

import io
import re
from html.parser import HTMLParser
from importlib import resources
from typing import Any
from urllib.parse import urljoin

import aiohttp
import openpyxl
import pytest
from aiohttp import web
from yarl import URL

from batchexec import create_app
from batchexec.api import (
    API_KEY_HEADER,
    BATCHES,
    PAGE,
    PROCESS_CSV,
    RETRY,
    UPLOAD,
    VALIDATE,
    page_path,
)
from batchexec.web.keys import REGISTRY, SETTINGS
from batchexec.web.middlewares import OPEN_ROUTES
from tests.fakes import GatedProvider
from tests.helpers import AUTH, finished, gated, owner_of

#: What every answer of the page's routes carries.
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
#: What the built-in watsonx.ai models need, when nothing is set.
WATSONX = (
    "cannot be called as configured: watsonx.ai is not configured: "
    "set WATSONX_URL, WATSONX_APIKEY, WATSONX_PROJECT_ID."
)


def page_file(name: str) -> bytes:
    """A file of the page's folder as the package holds it."""
    return (resources.files("batchexec") / "web" / "static" / name).read_bytes()


def has_page_headers(response: aiohttp.ClientResponse) -> bool:
    return all(response.headers.get(name) == value for name, value in PAGE_HEADERS.items())


def form(data: bytes, filename: str = "prompts.csv", **fields: str) -> aiohttp.FormData:
    body = aiohttp.FormData()
    body.add_field("file", io.BytesIO(data), filename=filename)
    for name, value in fields.items():
        body.add_field(name, value)
    return body


def workbook(rows: list[list[Any]]) -> bytes:
    book = openpyxl.Workbook()
    sheet = book.active
    sheet.title = "Results"
    for row in rows:
        sheet.append(row)
    buffer = io.BytesIO()
    book.save(buffer)
    return buffer.getvalue()


async def nothing_kept(client: Any) -> None:
    """No template, batch or workbook was recorded or written for the caller."""
    registry = client.app[REGISTRY]
    assert await registry.templates_of(owner_of(client.app)) == []
    assert await registry.owned_by(owner_of(client.app), limit=10) == []
    listed = await client.get(BATCHES, headers=AUTH)
    assert (await listed.json())["batches"] == []
    results_dir = client.app[SETTINGS].results_dir
    assert not results_dir.exists() or list(results_dir.iterdir()) == []


class _Assets(HTMLParser):
    """The ``src`` and ``href`` of a page's scripts and stylesheets."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "script" and values.get("src"):
            self.found.append(values["src"] or "")
        if tag == "link" and values.get("rel") == "stylesheet" and values.get("href"):
            self.found.append(values["href"] or "")


def assets_of(html: str) -> list[str]:
    parser = _Assets()
    parser.feed(html)
    return parser.found


# The page


async def test_the_page_needs_no_key_and_carries_its_headers(make_client):
    client = await make_client()
    response = await client.get(PAGE)
    assert response.status == 200
    assert response.headers["Content-Type"] == "text/html; charset=utf-8"
    assert has_page_headers(response), dict(response.headers)
    assert await response.read() == page_file("index.html")


@pytest.mark.parametrize(
    ("name", "content_type"),
    [("app.js", "text/javascript; charset=utf-8"), ("style.css", "text/css; charset=utf-8")],
)
async def test_the_pages_files_need_no_key_and_have_their_types(make_client, name, content_type):
    client = await make_client()
    response = await client.get(page_path(name))
    assert response.status == 200
    assert response.headers["Content-Type"] == content_type
    assert has_page_headers(response)
    assert await response.read() == page_file(name)


async def test_the_page_refers_to_its_files_relatively(make_client):
    client = await make_client()
    html = await (await client.get(PAGE)).text()
    assets = assets_of(html)
    assert assets, "the page loads no script or stylesheet"
    for asset in assets:
        # Relative: no scheme, host or leading slash, so a mount prefix is kept.
        assert re.match(r"^page/[^/]+$", asset), asset


@pytest.mark.parametrize(
    "url",
    [
        page_path("missing.js"),
        page_path("index.html"),  # the page is at /, not a file of /page/
        page_path(".hidden.js"),
        URL("/page/..%2Fpyproject.toml", encoded=True),
        URL("/page/..%2F..%2Fpage.py", encoded=True),
        URL("/page/app.js%00.css", encoded=True),
    ],
)
async def test_any_other_name_is_404_never_a_file_elsewhere(make_client, url):
    client = await make_client()
    response = await client.get(url)
    assert response.status == 404
    assert await response.json() == {"detail": "File not found"}
    assert has_page_headers(response)


async def test_dot_segments_are_no_way_out_of_the_folder(make_client):
    client = await make_client()
    # The URL is normalised to /x, which no route serves (and, as every route but the
    # open ones, asks for a key first).
    assert (await client.get("/page/../x")).status == 401
    response = await client.get("/page/../x", headers=AUTH)
    assert response.status == 404
    assert "Content-Security-Policy" not in response.headers


async def test_every_other_route_still_needs_a_key(make_client):
    client = await make_client()
    assert {"page", "page_file"} <= OPEN_ROUTES
    checked = 0
    for route in client.app.router.routes():
        resource = route.resource
        if resource is None or route.method == "HEAD" or resource.name in OPEN_ROUTES:
            continue
        url = re.sub(r"\{[^}]+\}", "x", resource.canonical)
        response = await client.request(route.method, url)
        assert response.status == 401, (route.method, url)
        assert "Content-Security-Policy" not in response.headers
        checked += 1
    assert checked >= 20


async def test_under_a_mount_prefix_the_page_and_its_files_are_found(make_settings, aiohttp_client):
    parent = web.Application()
    parent.add_subapp("/batch", create_app(make_settings(), extra_providers=(GatedProvider,)))
    client = await aiohttp_client(parent)
    response = await client.get("/batch/")
    assert response.status == 200
    assert has_page_headers(response)
    html = await response.text()
    for asset in assets_of(html):
        # Where a browser that loaded /batch/ fetches it from.
        loaded = await client.get(urljoin("/batch/", asset))
        assert loaded.status == 200, asset
        assert has_page_headers(loaded)
    for name in ("app.js", "style.css"):
        assert (await client.get("/batch" + page_path(name))).status == 200
    assert (await client.get("/batch" + page_path("missing.js"))).status == 404
    # The routes it calls are under the prefix too, and need the key there.
    csv_form = {"csv_content": "prompt,model\nhi,echo\n"}
    assert (await client.post("/batch" + VALIDATE, json=csv_form)).status == 401
    checked = await client.post("/batch" + VALIDATE, json=csv_form, headers=AUTH)
    assert checked.status == 200, await checked.text()
    assert "Content-Security-Policy" not in checked.headers


# validate


async def test_a_valid_csv_is_ready_and_nothing_is_kept(make_client):
    client = await make_client()
    content = b"prompt,model,topic\nName a colour,echo,art\nA poem on ${output.1},gated,art\n"
    response = await client.post(VALIDATE, data=form(content), headers=AUTH)
    assert response.status == 200, await response.text()
    assert await response.json() == {
        "rows": 2,
        "columns": ["prompt", "model", "topic"],
        "models": ["echo", "gated"],
        "message": "2 rows are ready to run.",
    }
    assert "Content-Security-Policy" not in response.headers
    await nothing_kept(client)


async def test_one_row_is_said_so(make_client):
    client = await make_client()
    response = await client.post(VALIDATE, data=form(b"prompt,model\nhi,echo\n"), headers=AUTH)
    assert (await response.json())["message"] == "1 row is ready to run."


async def test_every_bad_row_is_listed_by_its_line_and_nothing_is_kept(make_client):
    client = await make_client()
    content = (
        b'prompt,model\nfine,echo\n,echo\nwho,nope\n"two\nlines ${output.7}",echo\nalso fine,echo\n'
    )
    response = await client.post(VALIDATE, data=form(content), headers=AUTH)
    assert response.status == 422
    body = await response.json()
    assert body["detail"] == "3 executions are invalid."
    assert [(error["index"], error["field"]) for error in body["errors"]] == [
        (2, "prompt"),
        (3, "model"),
        (4, "prompt"),
    ]
    messages = [error["message"] for error in body["errors"]]
    assert messages[0] == "line 3: must not be empty"
    assert messages[1].startswith("line 4: Unknown model 'nope'. Known models: ")
    # A row is placed at the line it starts on.
    assert messages[2] == "line 5: ${output.7} must name an earlier execution (1 to 3)"
    await nothing_kept(client)


async def test_an_xlsx_is_checked_and_its_problems_named_by_sheet_row(make_client):
    client = await make_client()
    rows: list[list[Any]] = [["id", "prompt", "model"], [1, "hi", "echo"], [2, "then", "gated"]]
    response = await client.post(VALIDATE, data=form(workbook(rows), "p.xlsx"), headers=AUTH)
    assert response.status == 200, await response.text()
    body = await response.json()
    assert body["rows"] == 2
    assert body["columns"] == ["id", "prompt", "model"]
    assert body["models"] == ["echo", "gated"]

    bad = workbook([["prompt", "model"], ["ok", "echo"], [None, None], ["bad", "nope"]])
    response = await client.post(VALIDATE, data=form(bad, "p.xlsx"), headers=AUTH)
    assert response.status == 422
    errors = (await response.json())["errors"]
    assert [error["index"] for error in errors] == [2]
    assert errors[0]["message"].startswith("row 4: Unknown model 'nope'")
    await nothing_kept(client)


async def test_a_json_body_is_checked_like_process_csv(make_client):
    client = await make_client()
    response = await client.post(
        VALIDATE, json={"csv_content": "prompt,model\nhi,echo\nbye,echo\n"}, headers=AUTH
    )
    assert response.status == 200, await response.text()
    assert await response.json() == {
        "rows": 2,
        "columns": ["prompt", "model"],
        "models": ["echo"],
        "message": "2 rows are ready to run.",
    }
    response = await client.post(
        VALIDATE, json={"csv_content": "prompt,model\nhi,echo\n,echo\n"}, headers=AUTH
    )
    assert response.status == 422
    assert (await response.json())["errors"][0]["message"] == "line 3: must not be empty"
    response = await client.post(VALIDATE, json={"csv": "prompt\nhi\n"}, headers=AUTH)
    assert response.status == 422
    assert (await response.json())["errors"][0]["field"] == "csv_content"
    response = await client.post(
        VALIDATE, data=b"{not json", headers={**AUTH, "Content-Type": "application/json"}
    )
    assert response.status == 400
    await nothing_kept(client)


async def test_the_other_upload_errors_are_the_uploads(make_client):
    client = await make_client()
    response = await client.post(VALIDATE, data=form(b"model\necho\n"), headers=AUTH)
    assert response.status == 422
    assert "no 'prompt' column" in (await response.json())["detail"]
    body = aiohttp.FormData(default_to_multipart=True)
    body.add_field("model", "echo")
    response = await client.post(VALIDATE, data=body, headers=AUTH)
    assert (await response.json())["errors"] == [
        {"index": None, "field": "file", "message": "attach a CSV or XLSX file"}
    ]


async def test_a_body_over_the_limit_is_413(make_client):
    client = await make_client(max_body_bytes=4096)
    big = b"prompt\n" + b"x" * 5000 + b"\n"
    assert (await client.post(VALIDATE, data=form(big), headers=AUTH)).status == 413
    response = await client.post(VALIDATE, json={"csv_content": big.decode()}, headers=AUTH)
    assert response.status == 413


async def test_validate_needs_the_key(make_client):
    client = await make_client()
    response = await client.post(VALIDATE, data=form(b"prompt,model\nhi,echo\n"))
    assert response.status == 401


async def test_a_model_that_cannot_be_called_is_refused_naming_its_lines(make_client):
    client = await make_client()
    content = b"prompt,model\nno model,\nnamed,echo\nagain,\n"
    response = await client.post(VALIDATE, data=form(content), headers=AUTH)
    assert response.status == 422
    detail = f"Lines 2, 4 use 'Llama3.1 70b Instruct', which {WATSONX}"
    assert await response.json() == {
        "detail": detail,
        "errors": [{"index": None, "field": "model", "message": detail}],
    }
    response = await client.post(
        VALIDATE, json={"csv_content": "prompt,model\na,Granite 13B V2.1\n"}, headers=AUTH
    )
    assert response.status == 422
    assert (await response.json())["detail"] == f"Line 2 uses 'Granite 13B V2.1', which {WATSONX}"
    await nothing_kept(client)


# The model field


async def test_the_model_field_is_the_model_of_rows_that_name_none(make_client):
    client = await make_client()
    content = b"prompt,model\nno model,\nnamed,gated\n"
    response = await client.post(VALIDATE, data=form(content, model="echo"), headers=AUTH)
    assert response.status == 200, await response.text()
    assert (await response.json())["models"] == ["echo", "gated"]
    # By an alias or another spelling too; blank is the server's default.
    response = await client.post(
        VALIDATE, json={"csv_content": "prompt\nhi\n", "model": " Slow_Echo "}, headers=AUTH
    )
    assert (await response.json())["models"] == ["slow-echo"]
    response = await client.post(VALIDATE, data=form(b"prompt\nhi\n", model=""), headers=AUTH)
    assert response.status == 422
    assert "'Llama3.1 70b Instruct'" in (await response.json())["detail"]


async def test_the_model_field_is_checked_for_being_callable(make_client):
    client = await make_client()
    response = await client.post(
        VALIDATE, data=form(b"prompt\nhi\n", model="Granite 13B V2.1"), headers=AUTH
    )
    assert response.status == 422
    assert (await response.json())["detail"] == f"Line 2 uses 'Granite 13B V2.1', which {WATSONX}"


@pytest.mark.parametrize("route", [VALIDATE, UPLOAD])
async def test_an_unknown_model_field_is_422_naming_the_field(make_client, route):
    client = await make_client()
    response = await client.post(route, data=form(b"prompt\nhi\n", model="gpt-9"), headers=AUTH)
    assert response.status == 422
    body = await response.json()
    assert body["detail"] == "The model field names no model of the catalog."
    [error] = body["errors"]
    assert error["index"] is None
    assert error["field"] == "model"
    assert error["message"].startswith("Unknown model 'gpt-9'. Known models: ")
    assert "echo" in error["message"]
    await nothing_kept(client)


async def test_an_unknown_model_in_a_json_body_is_422_too(make_client):
    client = await make_client()
    response = await client.post(
        VALIDATE, json={"csv_content": "prompt\nhi\n", "model": "gpt-9"}, headers=AUTH
    )
    assert response.status == 422
    assert (await response.json())["errors"][0]["field"] == "model"


async def test_an_uploaded_batch_runs_its_unnamed_rows_on_the_model_field(make_client):
    client = await make_client()
    gated(client).open()
    content = b"prompt,model\nfirst,\nsecond,echo\nthird ${output.1},\n"
    response = await client.post(
        UPLOAD, data=form(content, model="gated", execute="true"), headers=AUTH
    )
    assert response.status == 200, await response.text()
    results = await finished(client, (await response.json())["invocationId"])
    assert results["status"] == "completed"
    assert [execution["model"] for execution in results["executions"]] == [
        "gated",
        "echo",
        "gated",
    ]
    assert gated(client).started == ["first", "third answer(first)"]


async def test_a_retry_reruns_them_on_the_model_field_too(make_client):
    client = await make_client()
    gated(client).open()
    content = b"prompt,model\nflaky:first,\nsecond,echo\n"
    response = await client.post(
        UPLOAD, data=form(content, model="gated", execute="true"), headers=AUTH
    )
    invocation_id = (await response.json())["invocationId"]
    ran = await finished(client, invocation_id)
    assert [execution["status"] for execution in ran["executions"]] == ["failed", "succeeded"]
    # Not on the server's default model, which cannot be called here.
    response = await client.post(RETRY, json={"invocation_id": invocation_id}, headers=AUTH)
    assert response.status == 200, await response.text()
    retried = await finished(client, (await response.json())["invocationId"])
    assert [(e["status"], e["model"]) for e in retried["executions"]] == [
        ("succeeded", "gated"),
        ("succeeded", "echo"),
    ]


async def test_an_upload_to_run_is_refused_when_the_model_field_cannot_be_called(make_client):
    client = await make_client()
    response = await client.post(
        UPLOAD,
        data=form(b"prompt\nhi\n", model="Granite 13B V2.1", execute="true"),
        headers=AUTH,
    )
    assert response.status == 422
    assert (await response.json())["errors"][0]["field"] == "model"
    await nothing_kept(client)


async def test_a_template_upload_checks_the_model_field_too(make_client):
    # A template holds the input's cells only, so the field shows in what it refuses.
    client = await make_client()
    headers = {API_KEY_HEADER: "dev-only-token"}
    refused = await client.post(UPLOAD, data=form(b"prompt\nhi\n", model="gpt-9"), headers=headers)
    assert refused.status == 422, await refused.text()
    assert (await refused.json())["errors"][0]["field"] == "model"
    response = await client.post(UPLOAD, data=form(b"prompt\nhi\n", model="echo"), headers=headers)
    assert response.status == 200, await response.text()
    assert "nothing was run" in (await response.json())["response"][0]["message"]


async def test_process_csv_takes_the_model_field_as_validate_does(make_client):
    client = await make_client()
    headers = {API_KEY_HEADER: "dev-only-token"}
    body = {"csv_content": "prompt\nhi\n", "model": "echo"}
    checked = await client.post(VALIDATE, json=body, headers=headers)
    assert checked.status == 200, await checked.text()
    started = await client.post(PROCESS_CSV, json={**body, "execute": True}, headers=headers)
    assert started.status == 200, await started.text()
    invocation_id = (await started.json())["invocationId"]
    results = await finished(client, invocation_id)
    assert [e["model"] for e in results["executions"]] == ["echo"]
