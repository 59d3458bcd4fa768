"""The web page (``GET /``) driven as a user would, in a real headless Chromium.

Each test serves a fresh app on a loopback port and opens it in a new browser
profile. Every wait is one of Playwright's auto-waiting assertions, or a wait
on the gated test model: no sleeps. Every test fails if the page logs a script
error or asks anything of a host but the server (the ``page`` fixture).
"""

from __future__ import annotations

import os
import struct
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

pytest.importorskip("playwright.async_api", reason="playwright is not installed")

import pytest_asyncio
from aiohttp import FormData, web
from aiohttp.test_utils import TestClient, TestServer
from playwright.async_api import Browser, BrowserContext, Locator, Page, async_playwright, expect

from batchexec import create_app
from batchexec.api import API_KEY_HEADER, BATCHES, MODELS, PAGE, UPLOAD, VALIDATE
from tests.browser import CHROMIUM, CHROMIUM_ARGS, RECORD_FORMS, VIEWPORT, Watch
from tests.fakes import GATED_CATALOG, GatedProvider
from tests.helpers import (
    API_KEY,
    AUTH,
    SettingsFactory,
    batch_of,
    column,
    free_port,
    gated,
    sheet_rows,
    write_csv,
)

#: Set by .ci/run, which installs Chromium (and the dev extra, playwright): there these
#: tests must run, never be skipped.
REQUIRED = os.environ.get("BATCHEXEC_REQUIRE_BROWSER") == "1"
if REQUIRED and not CHROMIUM.exists():
    raise RuntimeError(f"BATCHEXEC_REQUIRE_BROWSER=1, and there is no Chromium at {CHROMIUM}")
pytestmark = [
    pytest.mark.skipif(not CHROMIUM.exists(), reason=f"no Chromium at {CHROMIUM}"),
    # One event loop for the module, so that one Chromium serves every test.
    pytest.mark.asyncio(loop_scope="module"),
]

SCREENSHOT = Path(__file__).parent.parent / "docs" / "page.png"
#: The gated test models, and two to run side by side that answer differently: ``a`` with
#: its prompt, ``b`` with ``answer(<prompt>)`` once the gated provider lets it.
CATALOG = (
    GATED_CATALOG
    + """
[models."a"]
provider = "echo"

[models."b"]
provider = "gated"
"""
)


# Fixtures


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def browser() -> AsyncIterator[Browser]:
    """One headless Chromium for the module; each test gets a profile of its own."""
    async with async_playwright() as playwright:
        chromium = await playwright.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True
        )
        # A loaded CI machine can take longer than Playwright's 5 s to show a change.
        expect.set_options(timeout=10_000)
        yield chromium
        await chromium.close()


@pytest_asyncio.fixture(loop_scope="module")
async def client(
    make_settings: SettingsFactory, tmp_path: Path
) -> AsyncIterator[TestClient[Any, Any]]:
    """A fresh app (its own store and results folder, ``CATALOG``) on a loopback port."""
    catalog = tmp_path / "browser-models.toml"
    catalog.write_text(CATALOG)
    app = create_app(make_settings(models_path=catalog), extra_providers=(GatedProvider,))
    test_client: TestClient[Any, Any] = TestClient(TestServer(app, host="127.0.0.1"))
    await test_client.start_server()
    yield test_client
    gated(test_client).open()  # whatever a test left waiting ends, so the app stops at once
    await test_client.close()


@pytest_asyncio.fixture(loop_scope="module")
async def context(browser: Browser) -> AsyncIterator[BrowserContext]:
    """A fresh profile: no storage, no cookies."""
    profile = await browser.new_context(viewport=VIEWPORT, accept_downloads=True)
    profile.set_default_timeout(10_000)
    yield profile
    await profile.close()


@pytest.fixture
def watch(client: TestClient[Any, Any]) -> Watch:
    """What the test's page did wrong; checked when the test ends by ``page``."""
    return Watch(str(client.make_url("")).rstrip("/"))


@pytest_asyncio.fixture(loop_scope="module")
async def page(context: BrowserContext, watch: Watch) -> AsyncIterator[Page]:
    """A tab, watched: the test fails on a script error or a request off the server."""
    tab = await context.new_page()
    watch.attach(tab)
    yield tab
    if problems := watch.problems():
        pytest.fail("the page misbehaved:\n" + "\n".join(problems), pytrace=False)


# Steps, as a user takes them


async def give_key(page: Page, key: str) -> None:
    """Type ``key`` into the key's field and use it."""
    await page.get_by_label("API key", exact=True).fill(key)
    await page.get_by_role("button", name="Use this key").click()


async def open_with_key(page: Page, client: TestClient[Any, Any]) -> None:
    """Load the page and give it the test key, which it accepts."""
    await page.goto(str(client.make_url(PAGE)))
    await give_key(page, API_KEY)
    await expect(page.get_by_test_id("key-status")).to_contain_text("Key accepted")


async def choose_model(page: Page, model: str) -> None:
    await page.get_by_label("Model for the rows that name none").select_option(model)


async def choose_side_by_side(page: Page, *models: str) -> None:
    """Tick ``models`` to run every row on each of them."""
    group = page.get_by_role("group", name="Or run every row on several models, side by side")
    for model in models:
        await group.get_by_role("checkbox", name=model, exact=True).check()


async def choose_file(page: Page, path: Path) -> None:
    await page.get_by_label("Choose a CSV or XLSX file").set_input_files(path)


async def start(page: Page, count: int) -> str:
    """Wait for the chosen input's ``count`` rows to pass their check, start them; the
    batch's id."""
    ready = "1 row is ready" if count == 1 else f"{count} rows are ready"
    await expect(page.get_by_test_id("validation-status")).to_contain_text(ready)
    await page.get_by_role("button", name="Start the batch").click()
    batch_id = page.get_by_test_id("batch-id")
    await expect(batch_id).not_to_be_empty()
    return await batch_id.inner_text()


def row(page: Page, index: int) -> Locator:
    """The table's line of row ``index`` (1-based)."""
    return page.get_by_test_id("rows").locator(f'tbody tr[data-index="{index}"]')


def cells(page: Page, position: int) -> Locator:
    """Column ``position`` (1-based: row, status, model, result or error, time) of every row."""
    return page.get_by_test_id("rows").locator(f"tbody tr td:nth-child({position})")


async def batch_is(page: Page, status: str) -> None:
    """Wait until the batch on show has ``status``."""
    await expect(page.get_by_test_id("batch")).to_have_attribute("data-status", status)


# The tests


async def test_a_chained_csv_runs_to_the_end_and_downloads_whole(
    page: Page, client: TestClient[Any, Any], tmp_path: Path
):
    # Row n uses row n-1's output: a chain through all 20 rows.
    prompts = [
        "Name a colour: teal",
        *(f"Step {n} after ${{output.{n - 1}}}" for n in range(2, 21)),
    ]
    answers = [prompts[0]]
    for n in range(2, 21):
        answers.append(f"Step {n} after {answers[-1]}")
    path = write_csv(tmp_path / "chain.csv", ["prompt", "model"], [[p, "echo"] for p in prompts])

    await open_with_key(page, client)
    await choose_file(page, path)
    batch_id = await start(page, count=20)

    await batch_is(page, "completed")
    await expect(page.get_by_test_id("batch-status")).to_contain_text(
        "Execution completed successfully."
    )
    await expect(cells(page, 1)).to_have_text([str(n) for n in range(1, 21)])
    await expect(cells(page, 2)).to_have_text(["succeeded"] * 20)
    await expect(cells(page, 4)).to_have_text(answers)
    await expect(page.get_by_test_id("count-succeeded")).to_have_text("20")

    async with page.expect_download() as download_info:
        await page.get_by_role("button", name="Download XLSX").click()
    download = await download_info.value
    assert download.suggested_filename == f"batch_execution_{batch_id}.xlsx"
    saved = tmp_path / download.suggested_filename
    await download.save_as(saved)
    sheet = sheet_rows(saved)
    assert column(sheet, "prompt") == answers  # as sent, ${output.n} filled in
    assert column(sheet, "result") == answers
    assert column(sheet, "status") == ["succeeded"] * 20


async def test_a_file_with_bad_rows_shows_each_problem_and_starts_nothing(
    page: Page, client: TestClient[Any, Any], watch: Watch, tmp_path: Path
):
    watch.expect_status(422)
    path = write_csv(
        tmp_path / "bad.csv",
        ["prompt", "model"],
        [["Fine", "echo"], ["${output.5}", "echo"], ["Hello", "gpt-9"]],
    )
    await open_with_key(page, client)
    await choose_file(page, path)

    problems = page.get_by_test_id("problems").locator("li")
    await expect(problems).to_have_count(2)
    await expect(problems.nth(0)).to_have_attribute("data-index", "2")
    await expect(problems.nth(0)).to_contain_text("${output.5} must name an earlier execution")
    await expect(problems.nth(1)).to_have_attribute("data-index", "3")
    await expect(problems.nth(1)).to_contain_text("Unknown model 'gpt-9'")
    await expect(page.get_by_test_id("validation-status")).to_contain_text("cannot run yet")
    await expect(page.get_by_role("button", name="Start the batch")).to_be_disabled()

    listed = await client.get(BATCHES, headers=AUTH)
    assert (await listed.json())["batches"] == []


async def test_two_models_side_by_side_run_each_row_on_each_and_download_in_groups(
    page: Page, client: TestClient[Any, Any], tmp_path: Path
):
    gated(client).open()  # model b answers at once
    prompts = ["Name a colour: teal", "Then ${output.1}", "And ${output.2}"]
    # Each model's chain runs on its own earlier answers.
    by_a = [
        "Name a colour: teal",
        "Then Name a colour: teal",
        "And Then Name a colour: teal",
    ]
    by_b = [
        "answer(Name a colour: teal)",
        "answer(Then answer(Name a colour: teal))",
        "answer(And answer(Then answer(Name a colour: teal)))",
    ]
    path = write_csv(tmp_path / "side.csv", ["prompt"], [[p] for p in prompts])
    await page.add_init_script(RECORD_FORMS)
    await open_with_key(page, client)
    await choose_side_by_side(page, "a", "b")
    await expect(page.get_by_test_id("side-by-side-status")).to_have_text(
        "Every row runs on a, b: 2 results a row."
    )
    await expect(page.get_by_label("Model for the rows that name none")).to_be_disabled()
    await choose_file(page, path)
    await expect(page.get_by_test_id("validation-status")).to_contain_text(
        "Side by side: 6 runs, each row once on each model."
    )
    batch_id = await start(page, count=3)
    [started] = [form for form in await page.evaluate("sentForms") if form["path"] == UPLOAD]
    assert started["fields"] == ["file", "models", "execute"]  # the models, and no model

    await batch_is(page, "completed")
    assert batch_of(client, batch_id).options.models == ("a", "b")
    await expect(page.get_by_test_id("count-succeeded")).to_have_text("6")
    await expect(page.get_by_test_id("progress-text")).to_have_text(
        "6 of 6 ended (each row once on each of 2 models)."
    )
    # A line a row x model: the input row, its model, its answer.
    await expect(cells(page, 1)).to_have_text(["1", "1", "2", "2", "3", "3"])
    await expect(cells(page, 3)).to_have_text(["a", "b"] * 3)
    await expect(cells(page, 4)).to_have_text(
        [by_a[0], by_b[0], by_a[1], by_b[1], by_a[2], by_b[2]]
    )

    async with page.expect_download() as download_info:
        await page.get_by_role("button", name="Download XLSX").click()
    saved = tmp_path / "side.xlsx"
    await (await download_info.value).save_as(saved)
    sheet = sheet_rows(saved)
    assert len(sheet) == 1 + 3
    assert sheet[0][:3] == ["prompt", "result [a]", "status [a]"]
    assert "result [b]" in sheet[0]
    assert column(sheet, "prompt") == prompts  # as written: each model was sent its own
    assert column(sheet, "result [a]") == by_a
    assert column(sheet, "result [b]") == by_b
    assert column(sheet, "status [b]") == ["succeeded"] * 3

    # Reloaded, the tab still reads the batch's lines as rows x models.
    await page.reload()
    await expect(page.get_by_test_id("batch-id")).to_have_text(batch_id)
    await expect(cells(page, 1)).to_have_text(["1", "1", "2", "2", "3", "3"])
    await expect(cells(page, 3)).to_have_text(["a", "b"] * 3)


async def test_a_bad_answer_schema_shows_the_servers_error_and_starts_nothing(
    page: Page, client: TestClient[Any, Any], watch: Watch
):
    watch.expect_status(422)
    schema = '{"type": "object", "properties": {"score": {"type": "nonsense"}}}'
    text = "prompt\nRate: I love it\n"
    form = FormData()
    form.add_field("file", text.encode(), filename="pasted.csv", content_type="text/csv")
    form.add_field("response_schema", schema)
    refused = await client.post(VALIDATE, data=form, headers=AUTH)
    assert refused.status == 422
    body = await refused.json()
    [error] = body["errors"]
    assert error["field"] == "response_schema"

    await open_with_key(page, client)
    await page.get_by_text("Answer schema (optional)").click()
    await page.get_by_label("JSON Schema every answer must match").fill(schema)
    await page.get_by_label("Or paste CSV").fill(text)

    await expect(page.get_by_test_id("validation-status")).to_have_text(
        f"The pasted CSV cannot run yet. {body['detail']}"
    )
    problems = page.get_by_test_id("problems").locator("li")
    await expect(problems).to_have_count(1)
    await expect(problems).to_have_text(f"All rows (response_schema): {error['message']}")
    await expect(page.get_by_role("button", name="Start the batch")).to_be_disabled()
    listed = await client.get(BATCHES, headers=AUTH)
    assert (await listed.json())["batches"] == []

    # Mended, the same rows are ready, with the schema.
    await page.get_by_label("JSON Schema every answer must match").fill(
        schema.replace("nonsense", "number")
    )
    await expect(page.get_by_test_id("validation-status")).to_contain_text(
        "1 row is ready to run. Columns: prompt. Model: echo. Each answer must match the "
        "answer schema."
    )
    await expect(page.get_by_test_id("problems")).to_be_hidden()
    await expect(page.get_by_role("button", name="Start the batch")).to_be_enabled()


async def test_a_cancelled_batch_is_retried_to_completion(
    page: Page, client: TestClient[Any, Any], tmp_path: Path
):
    model = gated(client)
    prompts = ["first", "fail: second", "third"]
    path = write_csv(tmp_path / "slow.csv", ["prompt"], [[p] for p in prompts])
    await open_with_key(page, client)
    # The rows name no model: the page's choice is theirs, the retry's too.
    await choose_model(page, "gated")
    await choose_file(page, path)
    first_id = await start(page, count=3)

    await model.wait_started(3)
    model.open("first", "fail: second")
    await expect(row(page, 2)).to_have_attribute("data-status", "failed")
    await page.get_by_role("button", name="Cancel").click()
    await batch_is(page, "cancelled")
    await expect(cells(page, 2)).to_have_text(["succeeded", "failed", "cancelled"])

    await page.get_by_role("button", name="Retry the rows that did not succeed").click()
    await expect(page.get_by_test_id("batch-id")).not_to_have_text(first_id)
    retried_id = await page.get_by_test_id("batch-id").inner_text()
    await model.wait_started(5)
    await batch_is(page, "processing")
    model.open()
    await batch_is(page, "completed")
    await expect(cells(page, 2)).to_have_text(["succeeded", "failed", "succeeded"])
    await expect(cells(page, 4)).to_have_text(
        ["answer(first)", "the model refused (HTTP 400)", "answer(third)"]
    )
    # Only the rows that had not succeeded were sent again.
    assert sorted(model.started) == sorted([*prompts, "fail: second", "third"])
    listed = page.get_by_test_id("batches").locator("li")
    await expect(listed).to_have_count(2)
    await expect(listed.nth(0)).to_have_attribute("data-invocation-id", retried_id)
    await expect(listed.nth(0)).to_contain_text(f"retry of {first_id}")


async def test_a_reload_during_a_run_follows_the_batch_to_its_end(
    page: Page, client: TestClient[Any, Any], tmp_path: Path
):
    model = gated(client)
    path = write_csv(tmp_path / "slow.csv", ["prompt"], [["alpha"], ["beta"]])
    await open_with_key(page, client)
    await choose_model(page, "gated")
    await choose_file(page, path)
    batch_id = await start(page, count=2)
    await model.wait_started(2)
    model.open("alpha")
    await expect(row(page, 1)).to_have_attribute("data-status", "succeeded")

    await page.reload()
    await expect(page.get_by_test_id("batch-id")).to_have_text(batch_id)
    await expect(row(page, 1)).to_contain_text("answer(alpha)")
    await expect(page.get_by_test_id("count-succeeded")).to_have_text("1")
    await expect(page.get_by_test_id("count-running")).to_have_text("1")
    model.open("beta")
    await batch_is(page, "completed")
    await expect(cells(page, 4)).to_have_text(["answer(alpha)", "answer(beta)"])


async def test_a_wrong_key_is_refused_in_the_servers_words(
    page: Page, client: TestClient[Any, Any], watch: Watch
):
    watch.expect_status(401)
    refused = await client.get(MODELS, headers={API_KEY_HEADER: "not-the-key"})
    detail = (await refused.json())["detail"]
    await page.goto(str(client.make_url(PAGE)))
    await give_key(page, "not-the-key")
    await expect(page.get_by_test_id("key-status")).to_have_text(
        f"{detail} Enter the API key again."
    )
    await expect(page.get_by_label("API key", exact=True)).to_be_focused()
    await expect(page.get_by_label("API key", exact=True)).to_be_empty()
    # Once the right key is given, the page goes on.
    await give_key(page, API_KEY)
    await expect(page.get_by_test_id("key-status")).to_contain_text("Key accepted")


async def test_a_run_calls_only_the_server_and_logs_no_error(
    page: Page, client: TestClient[Any, Any], watch: Watch
):
    await open_with_key(page, client)
    await page.get_by_label("Or paste CSV").fill(
        "prompt,model\nSay hi,echo\nAgain: ${output.1},echo\n"
    )
    await page.get_by_role("button", name="Check the pasted CSV").click()
    await start(page, count=2)
    await batch_is(page, "completed")
    await expect(cells(page, 4)).to_have_text(["Say hi", "Again: Say hi"])
    async with page.expect_download() as download_info:
        await page.get_by_role("button", name="Download CSV").click()
    csv_text = Path(await (await download_info.value).path()).read_text(encoding="utf-8")
    assert csv_text.splitlines()[1:] == ["Say hi,echo,Say hi", "Again: Say hi,echo,Again: Say hi"]

    # Every request (the page, its files, the API calls) went to the server, and was seen.
    assert {urlsplit(url).netloc for url in watch.requests} == {f"127.0.0.1:{client.port}"}
    assert watch.problems() == []


async def test_the_page_loads_without_a_key_under_its_content_security_policy(
    page: Page, client: TestClient[Any, Any]
):
    response = await client.get(PAGE)
    assert response.status == 200
    assert response.content_type == "text/html"
    assert "default-src 'none'" in response.headers["Content-Security-Policy"]

    # Under that policy (a violation would be a console error) the page asks for the key.
    await page.goto(str(client.make_url(PAGE)))
    await expect(page.get_by_label("API key", exact=True)).to_be_editable()
    await expect(page.get_by_test_id("batches-status")).to_have_text(
        "Enter your API key to see your batches."
    )


async def test_a_screenshot_of_a_batch_half_way(
    page: Page, client: TestClient[Any, Any], tmp_path: Path
):
    """The README's picture, ``docs/page.png``, rewritten with BATCHEXEC_UPDATE_SCREENSHOT=1."""
    model = gated(client)
    prompts = [
        "Name a primary colour.",
        "Write a haiku about ${output.1}",
        "Translate ${output.2} to French",
        "Summarise ${output.3} in five words",
        "Name a secondary colour.",
        "Write a limerick about ${output.5}",
    ]
    path = write_csv(tmp_path / "prompts.csv", ["prompt"], [[p] for p in prompts])
    await open_with_key(page, client)
    await choose_model(page, "gated")
    await choose_file(page, path)
    await start(page, count=len(prompts))
    await model.wait_started(2)
    model.open(prompts[0], prompts[4])
    await model.wait_started(4)
    await expect(cells(page, 2)).to_have_text(
        # Rows 2 and 6 are sent (their inputs, rows 1 and 5, answered); 3 and 4 wait on 2.
        ["succeeded", "running", "waiting or running", "waiting or running", "succeeded", "running"]
    )
    await expect(page.get_by_test_id("count-running")).to_have_text("2")

    image = await page.screenshot()
    assert image.startswith(b"\x89PNG\r\n\x1a\n")
    assert struct.unpack(">II", image[16:24]) == (VIEWPORT["width"], VIEWPORT["height"])
    if os.environ.get("BATCHEXEC_UPDATE_SCREENSHOT"):
        SCREENSHOT.parent.mkdir(exist_ok=True)
        SCREENSHOT.write_bytes(image)


async def test_mounted_under_a_prefix_the_workbook_comes_from_the_pages_own_server(
    browser: Browser, make_settings: SettingsFactory, tmp_path: Path
):
    # xlsx_url names a path this server does not serve (a SERVER_NAME, a proxy that strips
    # a prefix): the page must fetch the workbook, with its key, from beside itself.
    port = free_port()
    origin = f"http://127.0.0.1:{port}"
    settings = make_settings(server_name=f"{origin}/somewhere-else")
    parent = web.Application()
    parent.add_subapp("/batch/", create_app(settings, extra_providers=(GatedProvider,)))
    server = TestServer(parent, host="127.0.0.1", port=port)
    await server.start_server()
    profile = await browser.new_context(viewport=VIEWPORT, accept_downloads=True)
    tab = await profile.new_page()
    watch = Watch(origin)
    watch.attach(tab)
    fetched: list[str] = []
    tab.on("request", lambda request: fetched.append(urlsplit(request.url).path))
    try:
        await tab.goto(f"{origin}/batch/")
        await give_key(tab, API_KEY)
        await expect(tab.get_by_test_id("key-status")).to_contain_text("Key accepted")
        path = write_csv(tmp_path / "one.csv", ["prompt", "model"], [["Say hi", "echo"]])
        await choose_file(tab, path)
        await start(tab, count=1)
        await batch_is(tab, "completed")
        async with tab.expect_download() as download_info:
            await tab.get_by_test_id("download-xlsx").click()
        saved = tmp_path / "workbook.xlsx"
        await (await download_info.value).save_as(saved)
        assert column(sheet_rows(saved), "result") == ["Say hi"]
        workbooks = [path for path in fetched if path.endswith(".xlsx")]
        assert workbooks and all(p.startswith("/batch/public/") for p in workbooks), fetched
        assert watch.problems() == []
    finally:
        await profile.close()
        await server.close()
