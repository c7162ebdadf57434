"""The training read path: precomputed SDXL rows from an ``EmbeddingStore`` against per-sample files.

The same real-size SDXL float16 rows ([77, 2048] + [1280], 318 kB), read in the same shuffled order
through a ``DataLoader``, from: the store (clipcond precompute), kohya sd-scripts' ``.npz`` per
sample (``hidden_state1``, ``hidden_state2``, ``pool2``), SimpleTuner's ``.pt`` per sample
(``torch.save`` of the tensors) and one ``.safetensors`` per sample. Cold: the page cache of every
file of that format dropped (``posix_fadvise(DONTNEED)``) and no mapping left open; warm: a
second pass; the median of 3 of each. The limit is the disk's sequential read rate, measured in the same run. Also:
``store.by_id`` lookups/s (the row included) and the cost of the per-row checksum.

    python bench/bench_store.py                 # 1,536 rows, batch 16, workers 0 and 2
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

ROWS = 1536
BATCH = 16
WORKERS = (0, 2)
LOOKUPS = 20_000
PASSES = 3  # of each format, cold and warm: the table gives their medians
PAIRS = 10  # checked / unchecked batched-fetch passes, for the checksum's cost
SEED = 0
JSON_PATH = Path(__file__).parent / "results" / "store.json"


def build_store(root: Path, rows: int) -> Path:
    """A real store of ``rows`` SDXL float16 rows, written by the real precompute with a free encoder."""
    from bench_pipeline import free_conditioner

    import clipcond
    from clipcond.precompute.job import PrecomputeJob, precompute

    tc = free_conditioner("sdxl", torch.float16, 64).to(torch.float16)
    tc.spec = clipcond.get_spec("sdxl")  # real output sizes in the manifest and the null
    captions = root / "captions.jsonl"
    captions.write_text("".join(json.dumps({"caption": f"caption {i}", "id": f"{i:09d}"}) + "\n" for i in range(rows)))
    precompute(tc, PrecomputeJob(input=captions, out=root / "store", id_column="id", batch_size=64,
                                 shard_size=512, progress=False))
    return root / "store"


def write_peers(store, root: Path) -> dict[str, list[Path]]:
    """Each row as the peers cache it: one file per sample."""
    from safetensors.torch import save_file

    files: dict[str, list[Path]] = {"kohya .npz": [], "SimpleTuner .pt": [], ".safetensors each": []}
    for name in files:
        (root / name.split()[-1].strip(".")).mkdir()
    for i in range(len(store)):
        row = store[i]
        seq, pooled = row["sequence"].clone(), row["pooled"].clone()
        npz = root / "npz" / f"{i:09d}_te_outputs.npz"
        np.savez(npz, hidden_state1=seq[:, :768].numpy(), hidden_state2=seq[:, 768:].numpy(), pool2=pooled.numpy())
        pt = root / "pt" / f"{i:09d}.pt"
        torch.save((seq, pooled), pt)
        st = root / "each" / f"{i:09d}.safetensors"
        save_file({"sequence": seq, "pooled": pooled}, st)
        for name, path in zip(files, (npz, pt, st), strict=True):
            files[name].append(path)
    return files


class PerSample(Dataset):
    def __init__(self, kind: str, files: list[Path]) -> None:
        self.kind, self.files = kind, files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        path = self.files[i]
        if self.kind == "kohya .npz":
            with np.load(path) as z:
                seq = np.concatenate([z["hidden_state1"], z["hidden_state2"]], axis=-1)
                return {"sequence": torch.from_numpy(seq), "pooled": torch.from_numpy(z["pool2"])}
        if self.kind == "SimpleTuner .pt":
            seq, pooled = torch.load(path, weights_only=True)
            return {"sequence": seq, "pooled": pooled}
        from safetensors.torch import load_file

        return load_file(path)


def drop_cache(paths: list[Path]) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def sequential_rate(paths: list[Path]) -> float:
    """Bytes/s of reading ``paths`` cold, front to back, in 8 MiB reads: the disk's limit."""
    drop_cache(paths)
    total, start = 0, time.perf_counter()
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while chunk := f.read(8 << 20):
                total += len(chunk)
    return total / (time.perf_counter() - start)


def read_all(dataset: Dataset, order: list[int], workers: int) -> float:
    """Rows/s of one pass over ``order`` in batches, as a training loop reads (the store with its collate)."""
    collate = dataset.collate() if hasattr(dataset, "collate") else None
    loader = DataLoader(dataset, batch_size=BATCH, sampler=order, num_workers=workers, collate_fn=collate,
                        persistent_workers=False, prefetch_factor=4 if workers else None)
    start, n = time.perf_counter(), 0
    for batch in loader:
        n += len(batch["sequence"])
    return n / (time.perf_counter() - start)


def pair_ratios(measure, pairs: int) -> tuple[dict[bool, list[float]], list[float]]:  # noqa: ANN001
    """``measure(checked)`` in ``pairs`` pairs, the order alternating: the rates, and checked / unchecked per pair."""
    rates: dict[bool, list[float]] = {True: [], False: []}
    for pair in range(pairs):
        for checked in (True, False) if pair % 2 else (False, True):
            rates[checked].append(measure(checked))
    return rates, [a / b for a, b in zip(rates[True], rates[False], strict=True)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=ROWS)
    parser.add_argument("--dir", type=Path, default=None, help="where the files go (default: a temporary folder)")
    parser.add_argument("--out", type=Path, default=JSON_PATH)
    a = parser.parse_args()
    from clipcond import EmbeddingStore
    from clipcond.store import format as store_format

    compiled = store_format._rows is not None  # the checked fetch's copy: clipcond._rows, else numpy

    results: dict[str, object] = {}
    with tempfile.TemporaryDirectory(dir=a.dir) as tmp:
        root = Path(tmp)
        store_dir = build_store(root, a.rows)
        store = EmbeddingStore(store_dir)
        peers = write_peers(store, root)
        shards = sorted(store_dir.glob("shard-*.safetensors"))
        row_bytes = sum(p.stat().st_size for p in shards) / len(store)
        seq = statistics.median(sequential_rate(shards) for _ in range(3))
        limit = seq / row_bytes
        order = list(range(len(store)))
        random.Random(SEED).shuffle(order)
        formats = {"EmbeddingStore": (lambda: EmbeddingStore(store_dir), shards),
                   "EmbeddingStore, rows unchecked": (lambda: EmbeddingStore(store_dir, verify_rows=False), shards)}
        formats.update({name: (lambda n=name, f=files: PerSample(n, f), files) for name, files in peers.items()})
        table = []
        for name, (make, files) in formats.items():
            for workers in WORKERS:
                passes = {"cold": [], "warm": []}
                for _ in range(PASSES):  # each a cold pass (its page cache dropped) and a warm one
                    drop_cache(files)
                    passes["cold"].append(read_all(make(), order, workers))
                    passes["warm"].append(read_all(make(), order, workers))
                table.append({"format": name, "workers": workers, "passes": passes,
                              **{kind: statistics.median(rates) for kind, rates in passes.items()}})
        # by_id, the row included, warm; and what the checksum costs a warm read.
        pick = random.Random(SEED + 1)
        keys = [f"{pick.randrange(len(store)):09d}" for _ in range(LOOKUPS)]
        by_id = {}
        for checked in (True, False):
            lookup = EmbeddingStore(store_dir, verify_rows=checked)
            [lookup.by_id(key) for key in keys]  # warm: mapped, ids loaded
            start = time.perf_counter()
            for key in keys:
                lookup.by_id(key)
            by_id[checked] = LOOKUPS / (time.perf_counter() - start)
        from clipcond.store.format import row_checksums

        row = store[0]
        start = time.perf_counter()
        for _ in range(2000):
            row_checksums(row["sequence"][None], row["pooled"][None])
        check_us = (time.perf_counter() - start) / 2000 * 1e6
        # The checksum's cost, warm: passes checked and unchecked (torch's copy, nothing summed) in pairs, each
        # pair's order alternating; the cost is 1 - the median of the pairs' ratios (this VM's speed drifts
        # between runs, so the table's rows, minutes apart, are a noisy ratio). The batched fetch alone, and
        # the DataLoader with 2 workers.
        batches = [order[i : i + BATCH] for i in range(0, len(order), BATCH)]

        def fetch_all(checked: bool) -> float:
            reader, start = EmbeddingStore(store_dir, verify_rows=checked), time.perf_counter()
            for batch in batches:
                reader.__getitems__(batch)
            return len(order) / (time.perf_counter() - start)

        def loader(checked: bool) -> float:
            return read_all(EmbeddingStore(store_dir, verify_rows=checked), order, 2)

        costs = {"batched fetch": pair_ratios(fetch_all, PAIRS), "DataLoader, 2 workers": pair_ratios(loader, PAIRS)}
    best_peer = {w: max(r["cold"] for r in table if r["workers"] == w and not r["format"].startswith("Embedding"))
                 for w in WORKERS}
    print(f"{a.rows} SDXL float16 rows ({row_bytes / 1e3:.0f} kB each), shuffled, batch {BATCH}; disk sequential "
          f"read {seq / 1e6:.0f} MB/s = {limit:,.0f} rows/s; checked rows copied by "
          f"{'clipcond._rows (copy and checksum in one pass)' if compiled else 'numpy (clipcond._rows not built)'}\n")
    print("| format | workers | cold rows/s | cold % of sequential | × best per-sample (cold) | warm rows/s |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in table:
        ratio = r["cold"] / best_peer[r["workers"]]
        print(f"| {r['format']} | {r['workers']} | {r['cold']:,.0f} | {100 * r['cold'] / limit:.0f}% | "
              f"{ratio:.2f} | {r['warm']:,.0f} |")
    print(f"\nstore.by_id (row included, warm): {by_id[True]:,.0f} lookups/s with the row's checksum verified, "
          f"{by_id[False]:,.0f} without (verify_rows=False); row checksum on a cached row: {check_us:.1f} µs")
    print(f"\nthe row checksum's cost (warm; {PAIRS} pairs of passes, checked and unchecked (torch's copy); "
          "medians; target <= 5%):")
    for name, (rates, ratios) in costs.items():
        quartiles = statistics.quantiles(ratios, n=4)
        checked, unchecked = statistics.median(rates[True]), statistics.median(rates[False])
        ratio = statistics.median(ratios)
        print(f"  {name}: {checked:,.0f} rows/s checked, {unchecked:,.0f} unchecked; checked / unchecked per pair "
              f"{ratio:.3f} (quartiles {quartiles[0]:.3f}-{quartiles[2]:.3f}): cost {1 - ratio:.1%}")
    results = {"args": {k: str(v) for k, v in vars(a).items()}, "sequential_bytes_per_s": seq,
               "limit_rows_per_s": limit, "row_bytes": row_bytes, "table": table, "by_id_per_s": by_id,
               "checksum_us": check_us, "compiled_copy": compiled,
               "checksum_cost": {name: {"rows_per_s": rates, "ratios": ratios, "cost": 1 - statistics.median(ratios)}
                                 for name, (rates, ratios) in costs.items()}}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(results, indent=1))
    print(f"\nwrote {a.out}")


if __name__ == "__main__":
    main()
