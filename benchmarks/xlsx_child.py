"""One XLSX write in a fresh process: ``python -m benchmarks.xlsx_child WRITER ROWS PATH``.

Builds ROWS rows of 6 cells of 200 characters of seeded random words, resets
the process's peak-memory mark, writes them with WRITER (``batchexec`` or
``pandas``) and prints JSON: the engine that wrote the file, the seconds the
write took and how far the peak resident memory rose above the resident
memory with the data built.
"""

from __future__ import annotations

import gc
import json
import random
import sys
import time
from pathlib import Path

COLUMNS = 6
CELL_CHARS = 200
SEED = 5
_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def make_rows(count: int, seed: int = SEED) -> list[list[str]]:
    """``count`` rows of ``COLUMNS`` distinct-looking cells of exactly ``CELL_CHARS`` characters."""
    rng = random.Random(seed)
    words = ["".join(rng.choices(_LETTERS, k=rng.randint(2, 10))) for _ in range(5_000)]
    # 40 words of 6 letters and a space on average make ~280 characters; cut to 200.
    return [
        [" ".join(rng.choices(words, k=40))[:CELL_CHARS] for _ in range(COLUMNS)]
        for _ in range(count)
    ]


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> bool:
    """Set the peak-RSS mark (VmHWM) to the current RSS; Linux 4.0 and later."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def write_batchexec(path: Path, header: list[str], rows: list[list[str]]) -> str:
    from batchexec.exports import Sheet, write_xlsx

    write_xlsx(path, Sheet(header, list(rows)))  # type: ignore[arg-type]
    return "xlsxwriter"


def write_pandas(path: Path, header: list[str], rows: list[list[str]]) -> str:
    """What ``DataFrame.to_excel(path)`` does, with the engine it chose kept to report."""
    import pandas

    with pandas.ExcelWriter(path) as excel:
        pandas.DataFrame(rows, columns=header).to_excel(excel, index=False)
    engine: str = excel.engine
    return engine


WRITERS = {"batchexec": write_batchexec, "pandas": write_pandas}


def main(argv: list[str]) -> None:
    writer_name, count, path = argv[0], int(argv[1]), Path(argv[2])
    writer = WRITERS[writer_name]
    header = [f"column {n}" for n in range(1, COLUMNS + 1)]
    rows = make_rows(count)
    # Import the writer's modules before the baseline, so their code is not counted.
    if writer_name == "pandas":
        import openpyxl  # noqa: F401
        import pandas  # noqa: F401
        import xlsxwriter  # noqa: F401 - pandas' default engine where it is installed
    else:
        import batchexec.exports  # noqa: F401
    gc.collect()
    reset = _reset_peak()
    baseline_kb = _status_kb("VmRSS")
    started = time.perf_counter()
    engine = writer(path, header, rows)
    seconds = time.perf_counter() - started
    peak_kb = _status_kb("VmHWM")
    result = {
        "writer": writer_name,
        "engine": engine,
        "rows": count,
        "seconds": seconds,
        "baseline_mb": baseline_kb / 1024,
        "peak_mb": peak_kb / 1024,
        "growth_mb": max(peak_kb - baseline_kb, 0) / 1024,
        "peak_reset": reset,
        "file_mb": path.stat().st_size / 1024 / 1024,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
