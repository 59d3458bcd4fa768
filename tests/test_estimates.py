"""Estimates before a run: ``batchexec.estimates`` on plans, the validate route's
``estimate``, and ``validate --estimate`` set against what a batch really uses.

The acceptance test runs a 100-row spreadsheet on two priced models of a loopback
OpenAI-compatible server that reports usage by a tokenizer of its own (``fake_tokens``:
a BPE-like split that counts within about 10% of ``cl100k_base`` on this text), and
holds the estimate's input tokens within the documented 25% of that usage.
"""

from __future__ import annotations

import asyncio
import math
import random
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from batchexec.api import PROCESS_CSV, VALIDATE
from batchexec.catalog import AssistantSpec, Catalog, ModelSpec
from batchexec.cli import main
from batchexec.csvinput import parse_csv
from batchexec.estimates import (
    _PIECE,
    BYTES_PER_TOKEN,
    MESSAGE_OVERHEAD_TOKENS,
    METHOD,
    REQUEST_OVERHEAD_TOKENS,
    estimate,
    request_tokens,
    text_tokens,
)
from batchexec.inputs import from_table, plan_rows
from batchexec.planning import BatchOptions, BatchPlan, Limits, PlannedRow
from batchexec.providers.base import ChatRequest, Turn
from batchexec.templating import Template
from tests.helpers import AUTH, finished, write_csv

#: Framing of a request of one message: the request's and the message's.
ONE_MESSAGE = REQUEST_OVERHEAD_TOKENS + MESSAGE_OVERHEAD_TOKENS
#: How far the estimate's input may be from the usage reported: the documented bound.
INPUT_BOUND = 0.25

CATALOG = Catalog(
    [
        ModelSpec(
            name="cheap",
            provider="openai",
            input_per_mtok=1.0,
            output_per_mtok=4.0,
            params={"max_tokens": 100},
        ),
        ModelSpec(name="pricey", provider="openai", input_per_mtok=10.0, output_per_mtok=30.0),
        ModelSpec(name="input-only", provider="openai", input_per_mtok=2.0),
        ModelSpec(name="free", provider="openai", params={"max_completion_tokens": 50}),
        ModelSpec(name="claude", provider="anthropic"),
        ModelSpec(name="local", provider="ollama", params={"num_predict": 64}),
        ModelSpec(name="local-unbounded", provider="ollama", params={"num_predict": -1}),
        ModelSpec(name="granite", provider="watsonx", params={"max_new_tokens": 300}),
        ModelSpec(name="echo", provider="echo"),
    ],
    [AssistantSpec(name="helper", model="cheap", system_prompt="You help, briefly.")],
    currency="EUR",
)


def plan_of(text: str, *, models: tuple[str, ...] = (), default_model: str = "cheap") -> BatchPlan:
    """The plan of CSV ``text``, as the routes and the command line make it."""
    rows = from_table(parse_csv(text, max_field_chars=100_000))
    limits = Limits(max_executions=1_000, max_prompt_length=100_000, default_model=default_model)
    return plan_rows(rows, CATALOG, limits, BatchOptions(models=models))


def model_of(plan: BatchPlan, name: str) -> Any:
    [found] = [m for m in estimate(plan, CATALOG.currency).models if m.model == name]
    return found


# How a text's tokens are estimated


def test_a_text_is_4_bytes_a_token_but_never_fewer_than_its_pieces() -> None:
    assert text_tokens("") == 0
    assert text_tokens("Translate this sentence into French") == math.ceil(35 / BYTES_PER_TOKEN)
    # Words, punctuation and 3 digits at a time are never merged by a tokenizer.
    assert text_tokens("a, b, c.") == 6
    assert text_tokens("1234567") == 3
    assert text_tokens('{"a":1}') == 5  # {" a ": 1 }
    # Other scripts are counted by their UTF-8 bytes: 3 a character for Japanese.
    assert text_tokens("日本語の文章です") == math.ceil(24 / BYTES_PER_TOKEN)


def test_ascii_text_is_counted_as_the_pattern_counts_it() -> None:
    rng = random.Random(17)
    alphabet = "ab Z9_,.\n-"
    for _ in range(2_000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 40)))
        expected = max(math.ceil(len(text) / BYTES_PER_TOKEN), len(_PIECE.findall(text)))
        assert text_tokens(text) == expected, repr(text)


def test_a_request_counts_each_message_and_the_answers_start() -> None:
    request = ChatRequest(
        prompt="And now?",
        system_prompt="Be brief.",
        history=(Turn("user", "Hi there"), Turn("assistant", "Hello!")),
    )
    texts = ["And now?", "Be brief.", "Hi there", "Hello!"]
    assert request_tokens(request) == REQUEST_OVERHEAD_TOKENS + sum(
        MESSAGE_OVERHEAD_TOKENS + text_tokens(t) for t in texts
    )


# Input tokens


def test_the_input_is_the_prompt_with_its_variables_and_the_system_prompt() -> None:
    plan = plan_of(
        "text,system,prompt\n"
        "Good morning,,Translate {{text}} into French\n"
        "Thank you,Answer in one word.,Translate {{text}} into German\n"
        "x,,${output.1} again\n"
    )
    found = model_of(plan, "cheap")
    first = ONE_MESSAGE + text_tokens("Translate Good morning into French")
    second = (
        ONE_MESSAGE
        + text_tokens("Translate Thank you into German")
        + MESSAGE_OVERHEAD_TOKENS
        + text_tokens("Answer in one word.")
    )
    third = ONE_MESSAGE + text_tokens(" again")
    assert found.input_tokens == first + second + third
    assert found.executions == 3


def test_an_assistants_system_prompt_counts_and_a_rows_own_replaces_it() -> None:
    plan = plan_of(
        "assistant,system,prompt\nhelper,,Hello\nhelper,Say no.,Hello\n", default_model="cheap"
    )
    found = model_of(plan, "cheap")
    assistants = MESSAGE_OVERHEAD_TOKENS + text_tokens("You help, briefly.")
    own = MESSAGE_OVERHEAD_TOKENS + text_tokens("Say no.")
    assert found.input_tokens == 2 * (ONE_MESSAGE + text_tokens("Hello")) + assistants + own


# Output bounds


@pytest.mark.parametrize(
    ("model", "max_tokens", "bound"),
    [
        ("cheap", "", 100),  # the catalog's params
        ("cheap", "7", 7),  # the row's max_tokens wins
        ("pricey", "", None),  # nothing bounds it
        ("pricey", "20", 20),
        ("free", "", 50),  # max_completion_tokens
        ("claude", "", 1024),  # Anthropic's default, always sent
        ("local", "", 64),  # Ollama's num_predict
        ("local-unbounded", "", None),  # -1: no limit
        ("granite", "", None),  # the chat API does not read max_new_tokens
        ("granite", "30", 30),
    ],
)
def test_the_output_is_bounded_by_max_tokens_else_the_catalogs_limit(
    model: str, max_tokens: str, bound: int | None
) -> None:
    found = model_of(plan_of(f"prompt,model,max_tokens\nHello,{model},{max_tokens}\n"), model)
    assert found.output_tokens_max == bound
    assert found.unbounded_executions == (bound is None)


def test_the_echo_models_answer_is_its_prompt() -> None:
    plan = plan_of(
        "prompt,max_tokens\nSay hello to everyone,3\n${output.1} twice,\n", default_model="echo"
    )
    found = model_of(plan, "echo")
    first = text_tokens("Say hello to everyone")
    # echo takes no notice of max_tokens: the second prompt holds the whole first answer.
    assert found.output_tokens_max == first + first + text_tokens(" twice")


# Costs


def test_the_cost_ranges_from_the_input_alone_to_the_input_and_the_whole_output() -> None:
    plan = plan_of("prompt\nWrite a haiku about the sea\n")
    found = model_of(plan, "cheap")
    assert found.output_tokens_max == 100
    assert found.cost_low == pytest.approx(found.input_tokens * 1.0 / 1e6)
    assert found.cost_high == pytest.approx((found.input_tokens * 1.0 + 100 * 4.0) / 1e6)
    assert (found.input_per_mtok, found.output_per_mtok) == (1.0, 4.0)


def test_unpriced_and_unbounded_models_have_no_cost_and_the_total_none_either() -> None:
    plan = plan_of("prompt,model\nHello,cheap\nHello,free\nHello,pricey\nHello,input-only\n")
    found = estimate(plan, CATALOG.currency)
    by_name = {m.model: m for m in found.models}
    assert [m.model for m in found.models] == ["cheap", "free", "pricey", "input-only"]
    assert by_name["free"].cost_low is None and by_name["free"].cost_high is None
    # Priced, but its output has no bound: the low end only.
    assert by_name["pricey"].cost_low is not None and by_name["pricey"].cost_high is None
    # No output price: an unbounded output costs nothing known, and nothing.
    only = by_name["input-only"]
    assert only.cost_high == only.cost_low == pytest.approx(only.input_tokens * 2.0 / 1e6)
    assert found.total.cost_low is None and found.total.cost_high is None
    assert found.total.output_tokens_max is None
    assert found.total.input_tokens == sum(m.input_tokens for m in found.models)
    assert found.total.executions == 4
    assert found.currency == "EUR"
    assert found.method == METHOD


# Side by side and chains


def test_side_by_side_each_model_counts_every_row() -> None:
    plan = plan_of("id,prompt\n1,Hello there\n2,Good night\n3,Bye\n", models=("cheap", "pricey"))
    found = estimate(plan, CATALOG.currency)
    cheap, pricey = found.models
    assert (cheap.model, pricey.model) == ("cheap", "pricey")
    assert cheap.executions == pricey.executions == 3
    assert cheap.input_tokens == pricey.input_tokens
    assert found.total.executions == 6
    assert found.total.input_tokens == 2 * cheap.input_tokens
    assert cheap.output_tokens_max == 300 and pricey.output_tokens_max is None


def test_an_earlier_output_counts_as_empty_up_to_its_rows_output_bound() -> None:
    text = (
        "prompt,max_tokens\n"
        "Name a colour,10\n"
        "Describe ${output.1} and ${output.1} again,\n"  # one reference twice
        "Sum up ${output.2},\n"
    )
    found = model_of(plan_of(text), "cheap")
    known = (
        ONE_MESSAGE * 3
        + text_tokens("Name a colour")
        + text_tokens("Describe  and  again")
        + text_tokens("Sum up ")
    )
    assert found.input_tokens == known
    # Row 2 takes row 1's 10 tokens twice; row 3 takes row 2's 100 (the catalog's limit).
    assert found.input_tokens_max == known + 2 * 10 + 100
    assert found.chained_executions == 2


def test_an_output_with_no_bound_leaves_the_input_range_open() -> None:
    found = model_of(
        plan_of("prompt\nStart\nGo on from ${output.1}\n", default_model="pricey"), "pricey"
    )
    assert found.input_tokens_max is None
    assert found.cost_high is None and found.cost_low is not None


def test_side_by_side_a_chain_takes_its_own_models_output() -> None:
    plan = plan_of("prompt\nStart\nGo on from ${output.1}\n", models=("cheap", "free"))
    cheap, free = estimate(plan, CATALOG.currency).models
    assert cheap.input_tokens_max == cheap.input_tokens + 100
    assert free.input_tokens_max == free.input_tokens + 50


def test_a_large_plan_is_estimated_row_by_row() -> None:
    # How long 100,000 rows take is the benchmark's to say; here, that every row counts.
    [row] = plan_of("id,review,prompt\n1,It was fine.,Summarize this review: {{review}}\n").rows
    review = "The lamp is bright and cheap, though its switch broke after a week. " * 3
    rows = tuple(
        PlannedRow(
            index=n,
            prompt=row.prompt,
            target=row.target,
            depends_on=frozenset(),
            cells={},
            template=Template((f"Summarize this review {n}: {review}",)),
        )
        for n in range(1, 2_001)
    )
    found = estimate(BatchPlan(columns=("prompt",), rows=rows), CATALOG.currency)
    assert found.total.executions == 2_000
    one = estimate(BatchPlan(columns=("prompt",), rows=rows[:1]), CATALOG.currency)
    assert found.total.input_tokens >= 2_000 * one.total.input_tokens


# The acceptance: the estimate against a run's real usage

PRODUCTS = (
    "desk lamp",
    "espresso machine",
    "pair of hiking boots",
    "wireless headset",
    "standing desk",
    "rice cooker",
    "mechanical keyboard",
    "garden hose",
    "winter jacket",
    "electric toothbrush",
)
SENTENCES = (
    "I bought this for my small apartment and it fits perfectly.",
    "The build quality is much better than I expected for the price.",
    "Shipping took almost three weeks, which was frustrating.",
    "After two months of daily use, it still works like new.",
    "The instructions were confusing, but customer support answered within an hour.",
    "It's heavier than it looks, so think twice before carrying it around.",
    "My only complaint is the noise: it hums loudly at night.",
    "Honestly, I would buy it again without hesitation.",
    "The color is slightly different from the photos on the website.",
    "Battery life is around 9 hours, not the 12 hours advertised.",
    "It stopped working after 45 days and the refund took ages.",
    "Great value; my whole family uses it every day.",
    "Setting it up took ten minutes, including unpacking.",
    "For $89.99 I expected a sturdier handle and a longer cable.",
)
TEMPLATES = (
    "Summarize this customer review of a {{product}} in one sentence:\n\n{{review}}",
    "Translate the following review into {{lang}}, keeping its tone.\n\nReview: {{review}}",
    "Is this review of the {{product}} positive, negative or mixed? Answer with one word, "
    'then give the main reason.\n\n"{{review}}"',
    "Write a short, polite reply from the shop to this customer, who bought a {{product}}: "
    "{{review}}",
)
SYSTEM = "You are a concise assistant for an online shop's customer support team."
PRICES = {"m-a": (0.15, 0.60), "m-b": (2.50, 10.00)}


def review_rows() -> list[list[str]]:
    """100 rows of customer reviews: four kinds of prompt, a system prompt on every
    fourth row, a max_tokens on four rows of five."""
    rows = []
    for n in range(1, 101):
        review = " ".join(SENTENCES[(n * 7 + k * 5) % len(SENTENCES)] for k in range(2 + n % 4))
        language = ("French", "German", "Spanish", "Italian")[n % 4]
        max_tokens = str((40, 80, 120)[n % 3]) if n % 5 else ""
        system = SYSTEM if n % 4 == 0 else ""
        product = PRODUCTS[n % len(PRODUCTS)]
        rows.append([str(n), product, language, review, TEMPLATES[n % 4], system, max_tokens])
    return rows


REVIEW_COLUMNS = ["id", "product", "lang", "review", "prompt", "system", "max_tokens"]
_FAKE_PIECE = re.compile(r"[A-Za-z]+|\d+|\S")


def fake_tokens(text: str) -> int:
    """The fake server's tokenizer: a word is a token a 7 letters begun, digits go three
    to a token, any other mark is one; spaces join the word after them, as in BPE."""
    count = 0
    for piece in _FAKE_PIECE.findall(text):
        if piece[0].isalpha():
            count += 1 + (len(piece) - 1) // 7
        elif piece[0].isdigit():
            count += (len(piece) + 2) // 3
        else:
            count += 1
    return count


class Tokenizing:
    """An OpenAI-compatible server whose usage is its own tokenizer's count: 3 tokens a
    message and 3 a request as OpenAI frames them; it answers with the prompt's words, as
    many as fit in the request's limit (40 without one)."""

    def __init__(self) -> None:
        self.usage: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])

    async def chat(self, request: web.Request) -> web.Response:
        body = await request.json()
        messages = body["messages"]
        prompt_tokens = 3 + sum(3 + fake_tokens(m["content"]) for m in messages)
        limit = body.get("max_completion_tokens") or body.get("max_tokens") or 40
        words: list[str] = []
        for word in messages[-1]["content"].split():
            if fake_tokens(" ".join([*words, word])) > limit:
                break
            words.append(word)
        text = " ".join(words)
        completion_tokens = fake_tokens(text)
        used = self.usage[body["model"]]
        used[0] += 1
        used[1] += prompt_tokens
        used[2] += completion_tokens
        return web.json_response(
            {
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}}],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens},
            }
        )


@pytest.fixture
async def tokenizing(aiohttp_server: Any, tmp_path: Path) -> Tokenizing:
    """The fake server, ``priced.toml`` naming its models ``m-a`` (whose params limit an
    answer to 64 tokens) and ``m-b`` (200), and ``reviews.csv``."""
    fake = Tokenizing()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", fake.chat)
    server = await aiohttp_server(app)
    base_url = server.make_url("/v1")
    limits = {"m-a": "max_tokens = 64", "m-b": "max_completion_tokens = 200"}
    (tmp_path / "priced.toml").write_text(
        'currency = "USD"\n\n'
        + "".join(
            f'[models."{name}"]\nprovider = "openai"\nbase_url = "{base_url}"\n'
            f"input_per_mtok = {inp}\noutput_per_mtok = {out}\nparams = {{ {limits[name]} }}\n\n"
            for name, (inp, out) in PRICES.items()
        )
    )
    write_csv(tmp_path / "reviews.csv", REVIEW_COLUMNS, review_rows())
    return fake


async def command(*args: str) -> int:
    """``python -m batchexec *args`` in this process, its loop apart from the test's."""
    code: int = await asyncio.to_thread(main, list(args))
    return code


_ESTIMATE_LINE = re.compile(
    r"^  (?P<name>[\w-]+): (?P<executions>\d+) executions; input tokens (?P<input>[\d,]+); "
    r"output tokens at most (?P<output>[\d,]+); cost USD (?P<low>[\d.]+) to (?P<high>[\d.]+)$",
    re.MULTILINE,
)


async def test_validate_estimate_is_within_its_bound_of_the_runs_usage(
    tokenizing: Tokenizing, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    options = ("--catalog", "priced.toml", "--models", "m-a,m-b")
    assert await command("validate", "--estimate", "reviews.csv", *options) == 0
    printed = capsys.readouterr().out
    print(printed)
    lines = {match["name"]: match for match in _ESTIMATE_LINE.finditer(printed)}
    assert set(lines) == {"m-a", "m-b", "total"}, printed
    assert tokenizing.usage == {}  # validate calls no model

    code = await command("run", "reviews.csv", "-o", "out.xlsx", *options)
    assert code == 0, capsys.readouterr().err
    for name, (input_price, output_price) in PRICES.items():
        line = lines[name]
        calls, prompt_tokens, completion_tokens = tokenizing.usage[name]
        assert calls == int(line["executions"]) == 100
        estimated = int(line["input"].replace(",", ""))
        error = (estimated - prompt_tokens) / prompt_tokens
        cost = (prompt_tokens * input_price + completion_tokens * output_price) / 1e6
        print(
            f"{name}: input estimated {estimated:,}, reported {prompt_tokens:,}: "
            f"{error:+.1%}; output at most {line['output']}, reported {completion_tokens:,}; "
            f"cost USD {line['low']} to {line['high']}, reported {cost:.6f}"
        )
        assert abs(error) <= INPUT_BOUND
        assert completion_tokens <= int(line["output"].replace(",", ""))
        assert cost <= float(line["high"])


async def test_the_validate_route_answers_an_estimate_when_asked(
    tokenizing: Tokenizing, tmp_path: Path, make_client: Any, make_settings: Any
) -> None:
    client = await make_client(
        make_settings(models_path=tmp_path / "priced.toml", max_executions_per_batch=200)
    )
    text = (tmp_path / "reviews.csv").read_text()
    body = {"csv_content": text, "models": ["m-a", "m-b"]}
    response = await client.post(VALIDATE, json={**body, "estimate": True}, headers=AUTH)
    assert response.status == 200, await response.text()
    found = (await response.json())["estimate"]
    assert found["currency"] == "USD" and found["method"] == METHOD
    assert [m["model"] for m in found["models"]] == ["m-a", "m-b"]
    assert found["total"]["executions"] == 200
    assert found["models"][0]["input_per_mtok"] == 0.15

    response = await client.post(PROCESS_CSV, json={**body, "execute": True}, headers=AUTH)
    assert response.status == 200, await response.text()
    result = await finished(client, (await response.json())["invocationId"])
    assert result["status"] == "completed", result
    reported = sum(used[1] for used in tokenizing.usage.values())
    error = (found["total"]["input_tokens"] - reported) / reported
    print(f"total input: estimated {found['total']['input_tokens']:,}, reported {reported:,}")
    assert abs(error) <= INPUT_BOUND


async def test_without_estimate_the_validate_answer_is_as_it_was(
    make_client: Any, tmp_path: Path
) -> None:
    client = await make_client()
    response = await client.post(
        VALIDATE, json={"csv_content": "prompt\nHi\n", "model": "echo"}, headers=AUTH
    )
    assert response.status == 200
    assert set(await response.json()) == {"rows", "columns", "models", "message"}


async def test_the_validate_form_takes_estimate_true(make_client: Any) -> None:
    client = await make_client()

    def form(estimate: str) -> Any:
        data = aiohttp.FormData()
        data.add_field("file", b"prompt\nHello there\n", filename="p.csv")
        data.add_field("model", "echo")
        data.add_field("estimate", estimate)
        return data

    response = await client.post(VALIDATE, data=form("true"), headers=AUTH)
    assert response.status == 200, await response.text()
    [echo] = (await response.json())["estimate"]["models"]
    assert echo["model"] == "echo"
    assert echo["input_tokens"] == ONE_MESSAGE + text_tokens("Hello there")
    assert echo["cost_low"] is None

    response = await client.post(VALIDATE, data=form("false"), headers=AUTH)
    assert "estimate" not in await response.json()

    response = await client.post(VALIDATE, data=form("maybe"), headers=AUTH)
    assert response.status == 422
    [error] = (await response.json())["errors"]
    assert error["field"] == "estimate"
