"""What a batch will cost before it runs: tokens in, tokens out at most, and the price.

Tokens are estimated, not counted: a tokenizer that fetches its vocabulary at
run time does not work on a server with no way out, and each provider's
models split text their own way anyway. A text's tokens are taken as OpenAI's
rule of thumb, about 4 characters of English a token (as 4 bytes of UTF-8:
the same for ASCII, nearer the truth for other scripts), but never fewer than
its words, groups of up to 3 digits and runs of punctuation, which tokenizers
do not merge (so numbers and JSON are not undercounted by half). A chat
request adds the framing OpenAI's cookbook counts: 3 tokens a message and 3
for the answer's start. Measured against the ``cl100k_base`` tokenizer over
prompt-sized pieces of text, a batch's estimate is 0% to 25% high for English
prose, about 10% off for Markdown, code and JSON, and 10% to 30% low for other
languages (German, Spanish, Polish, Japanese, Chinese; Russian is about right)
and for long numbers. One prompt's estimate strays further: for English, 80% of
them fall from 10% low to 35% high.

A row's input is its system prompt (the row's, else its assistant's or
model's), its earlier turns and its prompt with the variables filled in. An
``${output.n}`` is an answer not yet written: ``input_tokens`` counts it as
empty and ``input_tokens_max`` as the referenced execution's output bound, so
the range is open (None) where that one has none. A row's output is bounded by
its ``max_tokens``, else by the limit its catalog params give the provider
(``max_tokens`` or ``max_completion_tokens``; Ollama's ``num_predict``), else
by the provider's own default where it sends one (Anthropic's 1,024);
otherwise it is unbounded. watsonx.ai's chat API, the one batchexec calls,
reads OpenAI's names, not the text generation API's ``max_new_tokens``. The
echo model answers with its prompt, so its output is its prompt's size. Each
row is counted once, as if it runs: retries, a structured answer asked for
again and rows skipped after a failure are not foreseen; an answer schema is
not counted (it travels in ``response_format``, which providers bill their
own way).

One pass over the plan, linear in its text: 100,000 rows of 500 characters take
about 2 seconds, as long as planning them does.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

from pydantic import BaseModel, ConfigDict, Field

from batchexec.catalog import ModelSpec, Target
from batchexec.planning import BatchPlan, ChatInput, PlannedRow
from batchexec.providers.anthropic import DEFAULT_MAX_TOKENS as ANTHROPIC_MAX_TOKENS
from batchexec.providers.base import ChatOptions, ChatRequest
from batchexec.templating import compile_template

#: Bytes of UTF-8 text a token stands for, about: OpenAI's 4 characters of English.
BYTES_PER_TOKEN = 4
#: Tokens that frame each message of a chat request (its start, role and end).
MESSAGE_OVERHEAD_TOKENS = 3
#: Tokens that start the answer of every chat request.
REQUEST_OVERHEAD_TOKENS = 3
#: How tokens are estimated, in a line: the answer's ``method``.
METHOD = (
    "4 bytes of UTF-8 a token (OpenAI's rule of thumb: 4 characters of English), at least "
    "one a word, 3 digits or run of punctuation, plus 3 a message and 3 a request; against "
    "cl100k_base, 0 to 25% high for English, 10% to 30% low for other languages"
)
#: What a tokenizer never merges, each one token at least: a word, up to 3 digits (as
#: OpenAI's tokenizers group them), a run of punctuation (``_`` included).
_PIECE = re.compile(r"[^\W\d_]+|\d{1,3}|(?:[^\w\s]|_)+")
#: The same for ASCII text, three times as fast: each table blanks all but one kind of
#: piece, whose runs ``split`` then finds.
_ASCII = [chr(code) for code in range(128)]
_LETTERS_ONLY = str.maketrans({c: " " for c in _ASCII if not c.isalpha()})
_DIGITS_ONLY = str.maketrans({c: " " for c in _ASCII if not c.isdigit()})
_MARKS_ONLY = str.maketrans({c: " " for c in _ASCII if c.isalnum() or c.isspace()})
#: The params that limit the answer, by provider, where a row sets no ``max_tokens``.
_LIMIT_PARAMS: Mapping[str, tuple[str, ...]] = {"ollama": ("num_predict",)}
_DEFAULT_LIMIT_PARAMS = ("max_tokens", "max_completion_tokens")
#: What a provider sends as the limit when nothing else sets one.
_PROVIDER_LIMITS: Mapping[str, int] = {"anthropic": ANTHROPIC_MAX_TOKENS}
#: The provider whose answer is its prompt.
_ECHO = "echo"
_NO_CHAT = ChatInput()
_Number = TypeVar("_Number", int, float)


class TokenEstimate(BaseModel):
    """The estimated tokens and cost of some executions (every one counted once)."""

    model_config = ConfigDict(frozen=True)

    executions: int = Field(description="How many executions run: rows x models side by side.")
    input_tokens: int = Field(
        description="Estimated prompt tokens, system prompts and framing included, each "
        "${output.n} counted as empty: the least the executions send."
    )
    input_tokens_max: int | None = Field(
        description="The same with each ${output.n} counted as its row's output bound; "
        "null when one of those rows has none. Equal to input_tokens without ${output.n}."
    )
    output_tokens_max: int | None = Field(
        description="The most the answers can hold: each execution's max_tokens, else its "
        "model's limit; null when some execution has no bound."
    )
    chained_executions: int = Field(
        description="Executions whose prompt takes an earlier one's output (${output.n})."
    )
    unbounded_executions: int = Field(
        description="Executions whose answer has no bound: no max_tokens and no limit in the "
        "catalog."
    )
    cost_low: float | None = Field(
        description="input_tokens at the input price (no output at all), in currency; "
        "null when a model has no price."
    )
    cost_high: float | None = Field(
        description="input_tokens_max and output_tokens_max at their prices, in currency; "
        "null when a model has no price or a priced bound is unknown."
    )


class ModelEstimate(TokenEstimate):
    """One model's executions (an assistant's count as its model's)."""

    model: str
    input_per_mtok: float | None = Field(
        description="The catalog's price per million input tokens; null when it has none."
    )
    output_per_mtok: float | None = Field(
        description="The catalog's price per million output tokens; null when it has none."
    )


class Estimate(BaseModel):
    """What a batch will use and cost, per model and in total, before it runs."""

    model_config = ConfigDict(frozen=True)

    currency: str = Field(description="What the costs are in: the catalog's currency.")
    method: str = Field(description="How tokens are estimated, and how far off that can be.")
    models: list[ModelEstimate] = Field(
        description="Each model the rows run on, in the order the rows first name them."
    )
    total: TokenEstimate


def text_tokens(text: str) -> int:
    """The estimated tokens of ``text`` alone, with no message framing."""
    return _tokens((text,))


def request_tokens(request: ChatRequest) -> int:
    """The estimated prompt tokens of one chat request as sent: its messages, framed."""
    system = [request.system_prompt] if request.system_prompt else []
    turns = [turn.content for turn in request.history]
    return REQUEST_OVERHEAD_TOKENS + _messages_tokens([*system, *turns, request.prompt])


def output_limit(target: Target, options: ChatOptions) -> int | None:
    """The most tokens an answer of ``target`` with ``options`` can hold; None for no bound.

    The echo model's answer is its prompt: its bound is the prompt's, which
    this cannot know (``estimate`` does).
    """
    if options.max_tokens is not None:
        return options.max_tokens
    provider = target.model.provider
    names = _LIMIT_PARAMS.get(provider, _DEFAULT_LIMIT_PARAMS)
    limits = [value for name in names if (value := _limit(target.params.get(name)))]
    return min(limits) if limits else _PROVIDER_LIMITS.get(provider)


def estimate(plan: BatchPlan, currency: str) -> Estimate:
    """The tokens and cost of every execution of ``plan``, per model and in total."""
    tallies: dict[str, _Tally] = {}
    # The output bound of each execution, for the rows that take its output.
    bounds: dict[int, int | None] = {}
    for row in plan.rows:
        model = row.target.model
        tally = tallies.get(model.name)
        if tally is None:
            tally = tallies[model.name] = _Tally(model)
        bounds[row.index] = tally.add(row, bounds)
    models = [tally.result() for tally in tallies.values()]
    return Estimate(currency=currency, method=METHOD, models=models, total=_total(models))


@dataclass
class _Tally:
    """One model's executions, summed as they are read."""

    model: ModelSpec
    executions: int = 0
    input_tokens: int = 0
    input_tokens_max: int | None = 0
    output_tokens_max: int | None = 0
    chained: int = 0
    unbounded: int = 0

    def add(self, row: PlannedRow, bounds: Mapping[int, int | None]) -> int | None:
        """Count ``row``, whose prompt may take the outputs ``bounds`` bound; its own bound."""
        chat = row.chat or _NO_CHAT
        known, taken = _prompt(row)
        prompt_tokens = _tokens(known)
        prompt_tokens_max: int | None = prompt_tokens
        for index in taken:
            prompt_tokens_max = _plus(prompt_tokens_max, bounds.get(index))
        # As execution sends it: the row's own system prompt wins over an assistant's.
        system = chat.system or row.target.system_prompt
        others = [system] if system else []
        others += [turn.content for turn in chat.history]
        framing = REQUEST_OVERHEAD_TOKENS + MESSAGE_OVERHEAD_TOKENS + _messages_tokens(others)
        if row.target.model.provider == _ECHO:
            bound = prompt_tokens_max
        else:
            bound = output_limit(row.target, chat.options)
        self.executions += 1
        self.chained += bool(taken)
        self.unbounded += bound is None
        self.input_tokens += framing + prompt_tokens
        self.input_tokens_max = _plus(self.input_tokens_max, _plus(framing, prompt_tokens_max))
        self.output_tokens_max = _plus(self.output_tokens_max, bound)
        return bound

    def result(self) -> ModelEstimate:
        model = self.model
        return ModelEstimate(
            model=model.name,
            executions=self.executions,
            input_tokens=self.input_tokens,
            input_tokens_max=self.input_tokens_max,
            output_tokens_max=self.output_tokens_max,
            chained_executions=self.chained,
            unbounded_executions=self.unbounded,
            cost_low=model.cost(self.input_tokens, 0),
            cost_high=model.cost(self.input_tokens_max, self.output_tokens_max),
            input_per_mtok=model.input_per_mtok,
            output_per_mtok=model.output_per_mtok,
        )


def _total(models: list[ModelEstimate]) -> TokenEstimate:
    """The sum of the models' estimates; a bound or cost is known only where every model's is."""
    return TokenEstimate(
        executions=sum(m.executions for m in models),
        input_tokens=sum(m.input_tokens for m in models),
        input_tokens_max=_known_sum([m.input_tokens_max for m in models]),
        output_tokens_max=_known_sum([m.output_tokens_max for m in models]),
        chained_executions=sum(m.chained_executions for m in models),
        unbounded_executions=sum(m.unbounded_executions for m in models),
        cost_low=_known_sum([m.cost_low for m in models]),
        cost_high=_known_sum([m.cost_high for m in models]),
    )


def _prompt(row: PlannedRow) -> tuple[list[str], list[int]]:
    """The text of ``row``'s prompt as sent, but for the outputs it takes, and the
    executions whose outputs it takes (one entry a ``${output.n}``: a repeated one
    counts again)."""
    template = row.template
    if template is None:
        if row.verbatim or not row.depends_on:
            return [row.prompt], []
        # No {{ in it (it would have been compiled): only ${output.n} to find.
        template = compile_template(row.prompt, lambda name: None, tuple)
    known: list[str] = []
    taken: list[int] = []
    for part in template.parts:
        if isinstance(part, str):
            known.append(part)
        else:
            taken.append(part)
    return known, taken


def _messages_tokens(texts: Sequence[str]) -> int:
    """The tokens of messages of these texts, each framed."""
    return sum(MESSAGE_OVERHEAD_TOKENS + _tokens((text,)) for text in texts)


def _tokens(texts: Sequence[str]) -> int:
    """The estimated tokens of ``texts`` one after the other (the module docstring's rule)."""
    size = 0
    pieces = 0
    for text in texts:
        if text.isascii():
            size += len(text)
            pieces += len(text.translate(_LETTERS_ONLY).split())
            pieces += len(text.translate(_MARKS_ONLY).split())
            pieces += sum((len(run) + 2) // 3 for run in text.translate(_DIGITS_ONLY).split())
        else:
            size += len(text.encode("utf-8", "surrogatepass"))
            pieces += len(_PIECE.findall(text))
    return max(math.ceil(size / BYTES_PER_TOKEN), pieces)


def _plus(a: int | None, b: int | None) -> int | None:
    return None if a is None or b is None else a + b


def _limit(value: object) -> int | None:
    """A params value as an answer's limit: a whole number of at least 1 (Ollama's -1 and
    -2 mean none); None for any other."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    return None


def _known_sum(values: Sequence[_Number | None]) -> _Number | None:
    """The sum of ``values``; None when one of them is."""
    known = [value for value in values if value is not None]
    return sum(known) if len(known) == len(values) else None
