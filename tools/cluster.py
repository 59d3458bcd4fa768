"""``make cluster``: three replicas of ``python -m batchexec serve`` on one PostgreSQL database.

Each replica listens on its own port (8081, 8082, 8083 unless ``CLUSTER_PORTS``
says otherwise) and keeps its workbooks in a folder of its own, as replicas on
different machines would: nothing but the database is shared. Ctrl-C stops all
three gently (each gives its batches to the others, or to the next start).

    make cluster                                   # the local database `test`
    make cluster DATABASE_URL=postgresql://me@db/batchexec
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/test"


def main() -> int:
    url = os.environ.get("DATABASE_URL") or DEFAULT_URL
    if not url.startswith(("postgresql://", "postgres://")):
        print(f"make cluster needs a PostgreSQL DATABASE_URL, not {url!r}", file=sys.stderr)
        return 2
    ports = [int(port) for port in os.environ.get("CLUSTER_PORTS", "8081,8082,8083").split(",")]
    replicas = []
    for port in ports:
        folder = Path("cluster") / f"replica-{port}"
        folder.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "DATABASE_URL": url, "PUBLIC_DIR": str(folder / "public")}
        replicas.append(
            subprocess.Popen(  # noqa: S603 - our own interpreter and module
                [sys.executable, "-m", "batchexec", "serve", "--port", str(port)], env=env
            )
        )
        print(f"replica on http://127.0.0.1:{port} (results in {folder})", flush=True)
    print(f"{len(replicas)} replicas on {url.split('@')[-1]}; Ctrl-C stops them", flush=True)

    def stop(signum: int, frame: object) -> None:
        for replica in replicas:
            if replica.poll() is None:
                replica.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    while any(replica.poll() is None for replica in replicas):
        time.sleep(0.2)
    return max(replica.returncode or 0 for replica in replicas)


if __name__ == "__main__":
    sys.exit(main())
