"""Whether the models a plan names can be called as configured, before any row is sent.

A batch whose model or assistant cannot be called (a key or an address not
set) is refused at submission, whole, by every path that starts rows: the
HTTP routes (nothing is stored or queued) and ``run`` (nothing is sent);
``validate`` warns with the same words. Only configuration is checked here,
never the network: a model whose key is set but wrong still fails per row.
Rows are named by where they came from, compactly (``lines 2-4, 8``).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass

from batchexec.errors import FieldError, InputError
from batchexec.execution import unsupported_options
from batchexec.inputs import Rows
from batchexec.planning import BatchPlan
from batchexec.providers import Provider, unconfigured
from batchexec.wording import counted

#: No places of their own: rows are named ``execution N``, as a JSON body numbers them.
_EXECUTIONS = Rows((), (), ())


@dataclass(frozen=True)
class Unready:
    """The rows that name one model or assistant that cannot be called, and why."""

    #: The model's name, or the assistant's.
    name: str
    #: ``model`` or ``assistant``: the field the rows name it in.
    field: str
    #: The model an assistant runs on; None for a model.
    model: str | None
    #: What must be set, in the provider's words.
    reason: str
    #: The rows (1-based) that name it.
    indexes: tuple[int, ...]

    def describe(self, rows: Rows | None = None) -> str:
        """One sentence: which rows (by their places in ``rows``; else as executions), which
        model, and what to set."""
        places = (rows or _EXECUTIONS).places_of(self.indexes)
        verb = "uses" if len(self.indexes) == 1 else "use"
        if self.model is None:
            what = f"{self.name!r}, which"
        else:
            what = f"the assistant {self.name!r}, whose model {self.model!r}"
        return f"{places} {verb} {what} cannot be called as configured: {self.reason}"


def unready(
    plan: BatchPlan, providers: Mapping[str, Provider], *, only: Collection[int] | None = None
) -> list[Unready]:
    """The models and assistants of ``plan`` that cannot be called, in the order rows name them.

    ``only`` limits the check to the rows (1-based) that would run: a retry's.
    """
    reasons: dict[str, str | None] = {}
    found: dict[tuple[str, str], tuple[str | None, str, list[int]]] = {}
    width = max(len(plan.options.models), 1)
    for row in plan.rows:
        if only is not None and row.index not in only:
            continue
        model = row.target.model
        if model.name not in reasons:
            reasons[model.name] = unconfigured(providers, model)
        reason = reasons[model.name]
        if reason is None:
            continue
        assistant = row.target.assistant
        key = ("assistant", assistant) if assistant else ("model", model.name)
        indexes = found.setdefault(key, (model.name if assistant else None, reason, []))[2]
        # Side by side, a row runs once a model: it is named by its input row.
        index = (row.index - 1) // width + 1
        if not indexes or indexes[-1] != index:
            indexes.append(index)
    return [
        Unready(name=name, field=field, model=model, reason=reason, indexes=tuple(indexes))
        for (field, name), (model, reason, indexes) in found.items()
    ]


def require_ready(
    plan: BatchPlan,
    providers: Mapping[str, Provider],
    rows: Rows | None = None,
    *,
    only: Collection[int] | None = None,
) -> None:
    """Raise ``InputError`` when any row that would run names a model that cannot be called.

    One problem a model or assistant, naming its rows in the message by their
    places in ``rows`` (a file's lines or sheet rows; else ``execution N``).
    Its ``index`` is None: what is wrong is the configuration, not one row.
    With a single problem, ``detail`` is that problem.
    """
    found = unready(plan, providers, only=only)
    if not found:
        _require_supported(plan, providers, only)
        return
    errors = [FieldError(None, group.field, _sentence(group.describe(rows))) for group in found]
    if len(errors) == 1:
        raise InputError(errors[0].message, errors)
    names = ", ".join(repr(group.name) for group in found)
    kinds = "models" if all(group.model is None for group in found) else "models and assistants"
    raise InputError(
        f"The batch names {len(found)} {kinds} that cannot be called as configured: {names}.",
        errors,
    )


def _require_supported(
    plan: BatchPlan, providers: Mapping[str, Provider], only: Collection[int] | None
) -> None:
    """Raise ``InputError`` naming each row that sets a parameter its model's provider cannot
    send (Anthropic takes no ``seed``, say): no row runs with one quietly dropped."""
    errors: list[FieldError] = []
    width = max(len(plan.options.models), 1)
    for row in plan.rows:
        if row.chat is None or row.verbatim or (only is not None and row.index not in only):
            continue
        provider = providers.get(row.target.model.provider)
        if provider is None:
            continue
        for message in unsupported_options(provider, row.chat.options):
            field, _, why = message.partition(": ")
            errors.append(
                FieldError(
                    (row.index - 1) // width + 1,
                    field,
                    f"{why} (model {row.target.model.name!r})",
                )
            )
    if errors:
        count = len({error.index for error in errors})
        raise InputError(
            f"{counted(count, 'execution')} {'sets' if count == 1 else 'set'} "
            "a parameter its model cannot take.",
            errors,
        )


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:]
