"""What every handler does with a request: read its JSON body, answer with a model.

Bodies are bounded before they are read (``client_max_size``) and, when
large, parsed on the input pool rather than on the event loop.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
from collections.abc import Callable, Collection
from typing import Any, TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

from batchexec import api
from batchexec.errors import FieldError, InputError
from batchexec.inputs import TOO_MANY_DIGITS, Rows, plan_rows
from batchexec.planning import MAX_MODELS, NO_BATCH_OPTIONS, BatchOptions, BatchPlan, Limits
from batchexec.readiness import require_ready
from batchexec.runtime import limits_from
from batchexec.structured import check_schema
from batchexec.web.keys import CATALOG, INPUT_POOL, PROVIDERS, SETTINGS

_Body = TypeVar("_Body", bound=BaseModel)
_T = TypeVar("_T")
#: JSON bodies above this are parsed off the event loop, two at a time.
_INLINE_JSON_BYTES = 64 * 1024
#: Batches of more rows than this are planned off the event loop.
_INLINE_ROWS = 500


async def parse_body(
    request: web.Request, model: type[_Body], *, count_of: str | None = None
) -> _Body:
    """The JSON body as ``model``: 400 when it is not JSON, 422 when it does not fit.

    A body above ``_INLINE_JSON_BYTES`` is parsed and validated on the input
    pool, never holding the event loop: parsed JSON can take 25 times the
    bytes of its text, and the pool's two threads bound how many such parses
    hold memory at once. With ``count_of``, the
    list under that key is checked against ``MAX_EXECUTIONS_PER_BATCH`` before
    the body is validated, so an oversized batch costs no more than its JSON.
    """
    raw = await request.read()
    if not raw.strip():
        raise InputError("The request body is empty; send a JSON object.")
    bounds = limits(request)

    def parse() -> _Body:
        data = _loads(raw)
        if not isinstance(data, dict):
            raise InputError("The request body must be a JSON object.")
        if count_of is not None and isinstance(items := data.get(count_of), list):
            bounds.check_count(len(items))
        return validated(model, data)

    if len(raw) > _INLINE_JSON_BYTES:
        return await on_input_pool(request, parse)
    return parse()


def validated(model: type[_Body], data: object, *, what: str = "request body") -> _Body:
    """``data`` as ``model``; pydantic's errors become ``InputError``, listed by execution.

    ``what`` is what ``data`` came from, as the answer names it: the request
    body, or the query string.
    """
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise InputError(f"The {what} is invalid.", _field_errors(exc)) from None
    except RecursionError:
        # JSON a thousand levels deep parses, then fails whatever walks it.
        raise web.HTTPBadRequest(text=f"The {what} is nested too deeply.") from None


async def on_input_pool(request: web.Request, work: Callable[[], _T]) -> _T:
    """Run ``work`` on the input pool: threads of its own, so parsing uploads never
    holds up the threads that write batches' outputs."""
    return await asyncio.get_running_loop().run_in_executor(request.app[INPUT_POOL], work)


async def plan_off_loop(
    request: web.Request,
    rows: Rows | Callable[[], Rows],
    bounds: Limits | None = None,
    options: BatchOptions = NO_BATCH_OPTIONS,
) -> BatchPlan:
    """``inputs.plan_rows`` for the app: a large batch is planned on the input pool.

    ``rows`` may be a function making them, run on the pool too: turning a
    body or a stored batch into rows costs what the rows do. ``bounds`` are
    the settings' submission limits unless given.
    """
    catalog, bounds = request.app[CATALOG], bounds or limits(request)
    if callable(rows):
        make = rows
        return await on_input_pool(request, lambda: plan_rows(make(), catalog, bounds, options))
    if len(rows.rows) > _INLINE_ROWS:
        return await on_input_pool(request, lambda: plan_rows(rows, catalog, bounds, options))
    return plan_rows(rows, catalog, bounds, options)


async def require_ready_off_loop(
    request: web.Request,
    plan: BatchPlan,
    rows: Rows | None = None,
    *,
    only: Collection[int] | None = None,
) -> None:
    """``readiness.require_ready`` for the app's providers: for a large batch, on the
    input pool (it reads every row)."""
    providers = request.app[PROVIDERS]
    if len(plan.rows) > _INLINE_ROWS:
        await on_input_pool(request, lambda: require_ready(plan, providers, rows, only=only))
    else:
        require_ready(plan, providers, rows, only=only)


def batch_options(
    request: web.Request,
    models: list[str] | str | None,
    response_schema: dict[str, Any] | str | None = None,
    max_cost: float | str | None = None,
    cache: bool | str | None = None,
) -> BatchOptions:
    """A batch's options from a JSON body's fields, or a form's (``models`` as names
    separated by commas, ``response_schema`` as JSON text, ``max_cost`` as a number);
    422 for a bad one. Its budget is the settings' (``Settings.budget``)."""
    if isinstance(models, str):
        models = [name.strip() for name in models.split(",")] if models.strip() else None
    if models is not None and (
        not 1 <= len(models) <= MAX_MODELS
        or not all(0 < len(name.strip()) <= _MAX_NAME_CHARS for name in models)
    ):
        message = (
            f"give 1 to {MAX_MODELS} model names, none empty or over {_MAX_NAME_CHARS} characters"
        )
        raise InputError(f"models: {message}.", [FieldError(None, "models", message)])
    schema: dict[str, Any] | None = None
    if isinstance(response_schema, str) and response_schema.strip():
        try:
            response_schema = json.loads(response_schema)
        except (ValueError, RecursionError):
            message = "must be a JSON Schema, as JSON text"
            raise InputError(
                f"response_schema: {message}.", [FieldError(None, "response_schema", message)]
            ) from None
    if response_schema is not None and response_schema != "":
        try:
            schema = check_schema(response_schema)
        except ValueError as exc:
            raise InputError(str(exc), [FieldError(None, "response_schema", str(exc))]) from None
    return BatchOptions(
        models=tuple(name.strip() for name in models or ()),
        response_schema=schema,
        max_cost=budget(request, max_cost),
        cache=form_flag(cache, "cache") if isinstance(cache, str) else cache,
    )


def form_flag(value: str | None, field: str) -> bool | None:
    """A form field's boolean: ``true``/``1`` or ``false``/``0``; None when empty or absent."""
    text = (value or "").strip().lower()
    if text in ("true", "1"):
        return True
    if text in ("false", "0"):
        return False
    if not text:
        return None
    raise InputError(
        f"The {field} field must be true or false.",
        [FieldError(None, field, f"must be true, false, 1 or 0, not {(value or '')[:20]!r}")],
    )


#: How a form gives an amount: digits, and a decimal point.
_DECIMAL = re.compile(r"\d+(?:\.\d*)?|\.\d+")
#: Characters of a model's name in ``models``, at most (a JSON body's bound too).
_MAX_NAME_CHARS = 200


def budget(request: web.Request, max_cost: float | str | None) -> float | None:
    """A batch's budget for a body's or a form's ``max_cost``; 422 for a bad one."""
    if isinstance(max_cost, str):
        text = max_cost.strip()
        # A plain decimal: float() would also take "1_0" (10), "1e3" and "inf".
        if not text:
            max_cost = None
        elif _DECIMAL.fullmatch(text):
            max_cost = float(text)
        else:
            max_cost = math.nan  # refused below, as any other bad amount
    try:
        return request.app[SETTINGS].budget(max_cost)
    except ValueError as exc:
        raise InputError(f"max_cost {exc}.", [FieldError(None, "max_cost", str(exc))]) from None


def limits(request: web.Request) -> Limits:
    """The submission limits of the app's settings."""
    return limits_from(request.app[SETTINGS])


def callback_url(request: web.Request, given: str | None) -> str | None:
    """Where the batch's end is to be POSTed: ``given`` if the server allows it (422 if
    not), else ``CALLBACK_URL``; ``""`` asks for no webhook, whatever the default."""
    settings = request.app[SETTINGS]
    if given is None:
        return settings.callback_url or None
    if not given:
        return None
    try:
        return settings.callbacks.check(given)
    except ValueError as exc:
        raise InputError(
            f"The callback_url {exc}.", [FieldError(None, "callback_url", str(exc))]
        ) from None


def answer(body: BaseModel) -> web.Response:
    """``body`` as a JSON response."""
    return web.json_response(body.model_dump(mode="json"))


def xlsx_url(request: web.Request, file_name: str) -> str:
    """Public URL of a workbook: from ``SERVER_NAME``, else the request and the mount prefix."""
    server_name = request.app[SETTINGS].server_name
    if server_name:
        return server_name + api.download_path(file_name)
    path = request.app.router["download"].url_for(file_name=file_name)
    return str(request.url.origin().join(path))


def _loads(raw: bytes) -> Any:
    """``raw`` as JSON; ``HTTPBadRequest`` saying why it cannot be.

    Every object parsed goes through ``_handing_back``: the C parser holds the
    interpreter lock for the whole of one call (40 ms for 100,000 executions),
    but a Python function's entry lets it go to the event loop's thread when
    that one waits. It costs a few per cent of the parse.
    """
    try:
        return json.loads(raw, object_hook=_handing_back)
    except UnicodeDecodeError:
        raise web.HTTPBadRequest(text="The request body is not UTF-8 JSON.") from None
    except json.JSONDecodeError as exc:
        raise web.HTTPBadRequest(
            text=f"The request body is not valid JSON: {exc.msg} at position {exc.pos}."
        ) from None
    except ValueError:
        # Python refuses integers of more than 4,300 digits; nothing else raises this.
        raise web.HTTPBadRequest(
            text=f"The request body cannot be read: {TOO_MANY_DIGITS}."
        ) from None
    except RecursionError:
        raise web.HTTPBadRequest(text="The request body is nested too deeply.") from None


def _field_errors(exc: ValidationError) -> list[FieldError]:
    """pydantic's errors with ``index`` (1-based execution), ``field`` and ``message``."""
    errors = []
    for error in exc.errors(include_url=False):
        loc = list(error["loc"])
        index: int | None = None
        if len(loc) >= 2 and loc[0] == "executions" and isinstance(loc[1], int):
            index = loc[1] + 1
            loc = loc[2:]
        field = ".".join(str(part) for part in loc) or None
        errors.append(FieldError(index, field, error["msg"]))
    return errors


def _handing_back(value: dict[str, Any]) -> dict[str, Any]:
    """The parsed object itself: what calling it does is the point (``_loads``)."""
    return value
