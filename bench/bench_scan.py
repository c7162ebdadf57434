"""The first pass of ``clipcond precompute`` at dataset scale: peak memory a row, and seconds.

Issue 11, item 5: at most 64 bytes per input row (ids included) beyond the unique captions' text
held once, counting the process's private memory. Each size runs in a fresh subprocess that
imports everything first, then scans a parquet table of LAION-like rows (a caption of ~70 bytes
and img2dataset's 9-digit ``key``) and plans the store's slots (``assign_slots``, an empty store);
the figure is the process's peak resident memory (``VmHWM``) minus its resident memory before the
scan (after a first scan of two rows, so that every library the scan loads is in), over the rows. The table prints it
next to the target and the unique captions' text, which the scan keeps on disk rather than in memory.

    python bench/bench_scan.py                     # 5M and 20M rows, 20% of the captions unique
    python bench/bench_scan.py --rows 1000000 --unique 1.0

The issue's starting point, for comparison: 5M rows with 1M unique captions peaked at 1.49 GB
(~300 bytes a row) when the scan kept a Python dict of the captions.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROWS = (5_000_000, 20_000_000)
UNIQUE = 0.2  # distinct captions / rows (the measurement: 5M rows, 1M unique)
TARGET = 64  # bytes a row beyond the unique captions' text
ROW_GROUP = 1 << 20
WORDS = ("a photo of the cat dog running astronaut horse mars portrait oil painting by greg rutkowski trending "
         "on artstation highly detailed 4k 8k hdr masterpiece best quality street city night rain neon forest").split()


def write_table(path: Path, rows: int, unique: float) -> int:
    """A parquet table of ``rows`` captions (``int(rows * unique)`` distinct ones) and unique keys; its text bytes."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    distinct = max(1, int(rows * unique))
    rng = np.random.default_rng(0)
    text_bytes = 0
    with pq.ParquetWriter(path, pa.schema([("caption", pa.string()), ("key", pa.string())])) as writer:
        for start in range(0, rows, ROW_GROUP):
            stop = min(start + ROW_GROUP, rows)
            # Every distinct caption appears once in order, then repeats at random: rows [0, distinct) are new.
            which = np.where(np.arange(start, stop) < distinct, np.arange(start, stop),
                             rng.integers(0, distinct, stop - start))
            captions = [f"{WORDS[u % 31]} {WORDS[u % 29]} {WORDS[u % 23]} of {WORDS[u % 19]} in the "
                        f"{WORDS[u % 17]} {WORDS[u % 13]}, number {u}" for u in which.tolist()]
            text_bytes += sum(len(c) for c, u in zip(captions, which.tolist(), strict=True) if u >= start)
            writer.write_table(pa.table({"caption": captions, "key": [f"{i:09d}" for i in range(start, stop)]}))
    return text_bytes


def measure(path: str, folder: str) -> None:
    """In a fresh process: scan and plan, then print the memory and times as JSON."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from clipcond.precompute.job import assign_slots
    from clipcond.precompute.scan import scan_captions

    warm = Path(folder) / "warm.parquet"  # a first tiny scan loads every library the scan uses before the baseline
    pq.write_table(pa.table({"caption": ["a", "b"], "key": ["1", "2"]}), warm)
    with scan_captions(warm, id_column="key", folder=Path(folder)) as scan:
        assign_slots(Path(folder), None, scan)

    def status(field: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        raise KeyError(field)

    before = status("VmRSS")
    started = time.perf_counter()
    with scan_captions(path, id_column="key", folder=Path(folder)) as scan:
        scanned = time.perf_counter()
        layout = assign_slots(Path(folder), None, scan)
        print(json.dumps({"rows": len(scan.rows), "unique": scan.unique, "missing": len(layout.missing),
                          "peak": status("VmHWM") - before, "held": status("VmRSS") - before,
                          "scan_s": scanned - started, "plan_s": time.perf_counter() - scanned}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=list(ROWS))
    parser.add_argument("--unique", type=float, default=UNIQUE, help="distinct captions / rows")
    parser.add_argument("--measure", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        measure(*args.measure)
        return
    print(f"{'rows':>11} {'unique':>10} {'text MB':>8} {'peak MB':>8} {'B/row':>6} {'target':>6} {'scan s':>7} "
          f"{'rows/s':>8} {'plan s':>7}")
    for rows in args.rows:
        with tempfile.TemporaryDirectory(dir=Path.cwd()) as tmp:  # on disk: a tmpfs /tmp would hold it in memory
            path = Path(tmp) / "table.parquet"
            text = write_table(path, rows, args.unique)
            out = subprocess.run([sys.executable, __file__, "--measure", str(path), tmp], check=True,
                                 capture_output=True, text=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            per_row = r["peak"] / r["rows"]
            print(f"{r['rows']:>11,} {r['unique']:>10,} {text / 1e6:>8.0f} {r['peak'] / 1e6:>8.0f} {per_row:>6.1f} "
                  f"{'<= ' + str(TARGET):>6} {r['scan_s']:>7.1f} {r['rows'] / r['scan_s']:>8,.0f} {r['plan_s']:>7.1f}",
                  flush=True)


if __name__ == "__main__":
    main()
