"""``python -m benchmarks [SCENARIO ...]``: run the scenarios, print the table, write the files.

With no argument every scenario runs, in about six minutes on two cores plus
about six for the two 100,000-row ones (``responsive``) and two for the
replicas' (``cluster``).
Name scenarios to run only those (for profiling one of them), e.g.
``python -m benchmarks xlsx``; ``store`` names the three store scenarios,
``responsive`` the two of a 100,000-row batch, ``cluster`` the replicas'.
Knobs: ``BENCH_RUNS`` (runs per figure, default 3), ``BENCH_FULL=1`` (the
sequential baseline over all 2,000 rows), ``BENCH_POSTGRES_URL`` (the
PostgreSQL server of the PostgreSQL rows; without one they say skipped).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from benchmarks import client as http
from benchmarks import (
    cluster_bench,
    makespan,
    openai_batch,
    overhead,
    polling,
    report,
    responsive,
    store,
)
from benchmarks.common import RESULTS_DIR, RUNS, Figure, Target, progress
from benchmarks.memory import memory
from benchmarks.profiling import profile_overhead
from benchmarks.server import Server
from benchmarks.xlsx import xlsx

#: Scenarios that run against the shared server, in the order they run.
HTTP_SCENARIOS: dict[str, Callable[[http.BatchClient], Awaitable[Figure]]] = {
    "independent": makespan.independent,
    "chains": makespan.chains,
    "floor": makespan.floor,
    "following": makespan.following,
    "overhead": overhead.overhead,
    "polling": polling.polling,
    "openai": openai_batch.openai_batch,
}
#: Scenarios that run against a SQLite, a memory:// and a PostgreSQL server of their own,
#: side by side.
STORE_SERVER_SCENARIOS: dict[str, Callable[[store.Stores], Awaitable[list[Figure]]]] = {
    "store-rows": store.rows_per_s,
    "store-makespan": store.makespan,
}
STORE_SCENARIOS = (*STORE_SERVER_SCENARIOS, "store-memory")
#: Scenarios that run against a server of their own that takes 100,000-row batches.
RESPONSIVE_SCENARIOS: dict[str, Callable[[http.BatchClient], Awaitable[Figure]]] = {
    "responsive-health": responsive.health,
    "responsive-linear": responsive.linear,
}
SCENARIOS = (
    *HTTP_SCENARIOS,
    "sequential",
    "profile",
    "providers",
    "xlsx",
    *STORE_SCENARIOS,
    *RESPONSIVE_SCENARIOS,
    "cluster-replicas",
)
#: Names that stand for several scenarios.
GROUPS = {
    "store": STORE_SCENARIOS,
    "responsive": tuple(RESPONSIVE_SCENARIOS),
    "cluster": ("cluster-replicas",),
}
#: Each scenario's figure (key and title), in the issue's order: the table's. Names that are
#: no scenario's (``memory``, ``store-rows-postgres``, ...) are more figures of one.
FIGURES = {
    "independent": ("makespan_independent", "makespan vs ideal, independent rows"),
    "chains": ("makespan_chains", "makespan vs ideal, chains"),
    "floor": ("makespan_floor", "makespan vs the bare asyncio floor"),
    "following": ("following", "polling with the cursor vs the events route"),
    "sequential": ("vs_sequential", "vs the original integration's algorithm"),
    "overhead": ("overhead", "overhead per row"),
    "providers": ("provider_client", "provider client vs the official SDK"),
    "xlsx": ("xlsx", "XLSX writing"),
    "polling": ("polling", "results polling"),
    "openai": ("openai_batch", "OpenAI Batch API vs the batchexec route"),
    "memory": ("memory", "memory"),
    "store-rows": ("store_rows", "instant rows/s, SQLite vs memory://"),
    "store-rows-postgres": store.ROWS_POSTGRES,
    "store-makespan": ("store_makespan", "makespan vs ideal, SQLite"),
    "store-makespan-postgres": store.MAKESPAN_POSTGRES,
    "store-memory": ("store_memory", "memory after 50 batches vs 1, SQLite"),
    "responsive-health": ("responsive_health", "/health during a 100,000-row batch"),
    "responsive-linear": ("responsive_linear", "100,000 rows vs 10 x 10,000, wall time"),
    "cluster-replicas": cluster_bench.KEYS[1],
    "cluster-replicas-2": cluster_bench.KEYS[2],
    "cluster-replicas-3": cluster_bench.KEYS[3],
}
ORDER = [key for key, _ in FIGURES.values()]
WARM_UP_ROWS = 200


def _failed(scenario: str, error: BaseException) -> Figure:
    """The row of a scenario that could not finish: the error, instead of figures."""
    key, title = FIGURES[scenario]
    progress(scenario, f"FAILED: {type(error).__name__}: {error}")
    traceback.print_exception(error, file=sys.stderr)
    return Figure(
        key=key,
        title=title,
        how="-",
        measured=f"failed: {type(error).__name__}: {str(error)[:200]}",
        reference="-",
        ratio=None,
        target=Target(None, label="-"),
        data={"error": f"{type(error).__name__}: {error}"},
    )


def _arguments(argv: list[str]) -> list[str]:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Run batchexec's benchmarks, print the table, write bench-results/.",
        epilog=f"scenarios: {', '.join(SCENARIOS)} (all by default; store names the "
        f"{len(STORE_SCENARIOS)} store scenarios, responsive the "
        f"{len(RESPONSIVE_SCENARIOS)} of a 100,000-row batch, cluster the replicas'); "
        "memory is reported whenever an HTTP scenario ran. BENCH_RUNS sets the runs a "
        "figure (default 3), BENCH_FULL=1 runs the sequential baseline over all 2,000 "
        "rows, BENCH_POSTGRES_URL the PostgreSQL server (default the local `test`).",
    )
    parser.add_argument("scenarios", nargs="*", metavar="SCENARIO")
    named: list[str] = parser.parse_args(argv).scenarios or list(SCENARIOS)
    chosen = list(dict.fromkeys(n for name in named for n in GROUPS.get(name, (name,))))
    unknown = sorted(set(chosen) - set(SCENARIOS))
    if unknown:
        known = ", ".join([*SCENARIOS, *GROUPS])
        parser.error(f"unknown scenario {', '.join(unknown)} (choose from {known})")
    if "sequential" in chosen and "independent" not in chosen:
        chosen.append("independent")  # its speed-up is over scenario 1's makespan
    return chosen


async def _http_scenarios(
    server: Server,
    chosen: list[str],
    scenarios: Mapping[str, Callable[[http.BatchClient], Awaitable[Figure]]] = HTTP_SCENARIOS,
) -> list[Figure]:
    figures: list[Figure] = []
    async with http.session() as session:
        client = http.BatchClient(session, server.url)
        progress("server", f"warming up with {WARM_UP_ROWS} rows")
        await client.run(overhead.instant_rows(WARM_UP_ROWS))
        for name in chosen:
            progress(name, "starting")
            try:
                figures.append(await scenarios[name](client))
            except Exception as error:
                figures.append(_failed(name, error))
    return figures


def _run_http(workdir: Path, chosen: list[str]) -> list[Figure]:
    """The HTTP scenarios on one server, then its peak memory over all of them."""
    try:
        with Server(workdir / "server") as server:
            progress("server", f"pid {server.pid} on {server.url}")
            figures = asyncio.run(_http_scenarios(server, chosen))
            peak_mb = server.peak_rss_mb()
    except Exception as error:
        return [_failed(name, error) for name in chosen]
    return [*figures, memory(peak_mb, chosen)]


async def _store_server_scenarios(servers: store.StoreServers, chosen: list[str]) -> list[Figure]:
    figures: list[Figure] = []
    async with http.session() as session:
        stores = store.Stores.of(servers, session)
        progress("store", f"warming up {len(stores.clients)} servers with {WARM_UP_ROWS} rows")
        await store.warm_up(stores)
        for name in chosen:
            progress(name, "starting")
            try:
                figures += await STORE_SERVER_SCENARIOS[name](stores)
            except Exception as error:
                figures.append(_failed(name, error))
    return figures


def _run_responsive(workdir: Path, chosen: list[str]) -> list[Figure]:
    """The 100,000-row scenarios, on a server whose limits take such a batch."""
    try:
        with responsive.server(workdir) as server:
            progress("responsive", f"server pid {server.pid} on {server.url}")
            figures = asyncio.run(_http_scenarios(server, chosen, RESPONSIVE_SCENARIOS))
            progress("responsive", f"server peak RSS {server.peak_rss_mb():,.0f} MB")
    except Exception as error:
        return [_failed(name, error) for name in chosen]
    return figures


def _run_store_servers(workdir: Path, chosen: list[str]) -> list[Figure]:
    """The store scenarios that compare SQLite and PostgreSQL servers with a memory:// one."""
    try:
        with store.servers(workdir) as servers:
            return asyncio.run(_store_server_scenarios(servers, chosen))
    except Exception as error:
        return [_failed(name, error) for name in chosen]


def _median(figures: list[Figure], key: str) -> float | None:
    """The median of a figure's samples, if it ran and did not fail."""
    found = next((f for f in figures if f.key == key and "samples" in f.data), None)
    return None if found is None else float(found.data["samples"]["median"])


def main(argv: list[str]) -> int:
    chosen = _arguments(argv)
    started = time.perf_counter()
    revision = report.revision()
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    figures: list[Figure] = []
    extra: dict[str, Any] = {}
    changed = f" + {len(revision['changed'])} changed files" if revision["changed"] else ""
    progress(
        "harness",
        f"measuring {revision['commit']}{changed}; scenarios: {', '.join(chosen)}; "
        f"{RUNS} runs each",
    )
    with tempfile.TemporaryDirectory(prefix="batchexec-bench-") as temporary:
        workdir = Path(temporary)
        http_chosen = [name for name in HTTP_SCENARIOS if name in chosen]
        if http_chosen:
            figures += _run_http(workdir, http_chosen)
        servers_chosen = [name for name in STORE_SERVER_SCENARIOS if name in chosen]
        if servers_chosen:
            figures += _run_store_servers(workdir, servers_chosen)
        responsive_chosen = [name for name in RESPONSIVE_SCENARIOS if name in chosen]
        if responsive_chosen:
            figures += _run_responsive(workdir, responsive_chosen)
        steps: list[tuple[str, Callable[[], Figure | Sequence[Figure] | None]]] = [
            (
                "sequential",
                lambda: asyncio.run(makespan.sequential(_median(figures, "makespan_independent"))),
            ),
            ("profile", lambda: _profile(workdir, figures, extra)),
            ("providers", lambda: _providers(workdir)),
            ("xlsx", lambda: xlsx(workdir)),
            ("store-memory", lambda: store.memory_growth(workdir)),
            ("cluster-replicas", lambda: cluster_bench.replicas(workdir)),
        ]
        for name, step in steps:
            if name not in chosen:
                continue
            progress(name, "starting")
            try:
                figure = step()
            except Exception as error:
                figure = _failed(name, error) if name in FIGURES else None
                extra.setdefault("errors", {})[name] = f"{type(error).__name__}: {error}"
            if isinstance(figure, Figure):
                figures.append(figure)
            elif figure is not None:
                figures += figure
    figures.sort(key=lambda figure: ORDER.index(figure.key))
    elapsed = time.perf_counter() - started
    report.write_json(RESULTS_DIR / "results.json", figures, extra, elapsed, revision)
    plotted = report.plot(RESULTS_DIR / "bench.png", figures)
    rendered = report.table(figures)
    (RESULTS_DIR / "table.md").write_text(rendered + "\n")
    print(rendered)
    wrote = "results.json, bench.png" if plotted else "results.json"
    progress("harness", f"done in {elapsed:.0f} s; wrote {RESULTS_DIR}/{wrote}")
    failed = [f.key for f in figures if "error" in f.data] + list(extra.get("errors", {}))
    return 1 if failed else 0


def _providers(workdir: Path) -> Figure:
    """Scenario 5, imported only when it runs: it needs the ``bench`` extra's ``openai``."""
    from benchmarks.providers import providers

    return providers(workdir)


def _profile(workdir: Path, figures: list[Figure], extra: dict[str, Any]) -> None:
    """The profiled overhead run; its summary goes into ``results.json``, not the table."""
    rows_per_s = _median(figures, "overhead")
    unprofiled_us = 1e6 / rows_per_s if rows_per_s else None
    extra["profile"] = profile_overhead(workdir, unprofiled_us=unprofiled_us)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
