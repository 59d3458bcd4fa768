"""``python -m benchmarks.with_settings NAME=VALUE ... -- ARGS``: batchexec, some settings changed.

``Server`` puts the harness's limits in the server's environment (at most
10,000 rows a batch, among others). A scenario that needs other values
passes this launcher as the server's ``command``; the values named here are
set over the harness's before ``python -m batchexec ARGS`` runs.
"""

from __future__ import annotations

import os
import sys

from benchmarks.server import setting_names


def settings_of(items: list[str]) -> dict[str, str]:
    """``NAME=VALUE`` items as a mapping; a name batchexec does not read stops the launch."""
    known = setting_names()
    settings: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or name.upper() not in known:
            raise SystemExit(f"with_settings: {item!r} is not NAME=VALUE of a batchexec setting")
        settings[name] = value
    return settings


def main(argv: list[str]) -> int:
    if "--" not in argv:
        raise SystemExit("usage: python -m benchmarks.with_settings NAME=VALUE ... -- ARGS")
    split = argv.index("--")
    os.environ.update(settings_of(argv[:split]))
    from batchexec.cli import main as batchexec_main

    return batchexec_main(argv[split + 1 :])


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
