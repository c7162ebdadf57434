"""The training read path: precomputed SDXL rows from an ``EmbeddingStore`` against per-sample files.

The same real-size SDXL float16 rows ([77, 2048] + [1280], 318 kB), read in the same shuffled order
through a ``DataLoader``, from: the store (clipcond precompute), kohya sd-scripts' ``.npz`` per
sample (``hidden_state1``, ``hidden_state2``, ``pool2``), SimpleTuner's ``.pt`` per sample
(``torch.save`` of the tensors) and one ``.safetensors`` per sample. Cold: the page cache of every
file of that format dropped (``posix_fadvise(DONTNEED)``) and no mapping left open; warm: a
second pass; the median of 3 of each. The limit is the disk's sequential read rate, measured in the same run. Also:

- single rows: ``store[i]`` and ``store.by_id(key)`` per second, checked and unchecked, on tiny-SDXL float16
  rows (12 kB) and real-size ones (318 kB);
- checked against unchecked reads through a DataLoader (batch 16, workers 0), alone and beside NEIGHBOURS
  processes burning CPU (the unchecked read must never be the slower one);
- the checksum's own cost: the batched copy with and without the sums, the same compiled copy routine;
- the training read path, with 2 DataLoader workers: a user's dataset of VAE latents (one memory-mapped ``.npy``)
  joined with the store (``JoinedDataset``), against one ``.safetensors`` per sample holding latent and text (the
  per-sample cache), and against the same ``.npy`` latents beside one ``.safetensors`` of text per sample (only the
  text's storage differs), and against ``JoinedLoader`` (the same join, each batch in shared memory the workers
  reuse); with the CPU time a batch costs the main process and the workers, and the floor of any fetch that
  makes a fresh shared-memory segment a batch (nothing copied into it).

    python bench/bench_store.py                          # everything: 1,536 rows, batch 16
    python bench/bench_store.py --sections single,load,checksum,joined   # without the per-format table
"""

from __future__ import annotations

import argparse
import json
import math
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
NEIGHBOURS = 2  # processes burning CPU beside the "loaded" reads (this box has 2 cores)
LOAD_PAIRS = 16  # checked / unchecked pairs of passes, alone and beside the neighbours
LATENT = (4, 128, 128)  # an SDXL VAE latent (1024 px), float16: 128 kB a sample
JOIN_WORKERS = 2
JOIN_PASSES = 5  # of each way of the training read path, alternating
SECTIONS = ("formats", "single", "load", "checksum", "joined")
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


def burn() -> None:
    while True:
        pass


class Neighbours:
    """``n`` processes spinning on the CPU while the block runs (another job on a shared host)."""

    def __init__(self, n: int) -> None:
        self.n, self.procs = n, []

    def __enter__(self) -> Neighbours:
        import multiprocessing

        self.procs = [multiprocessing.get_context("fork").Process(target=burn, daemon=True) for _ in range(self.n)]
        for proc in self.procs:
            proc.start()
        time.sleep(0.2)
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in self.procs:
            proc.terminate()
            proc.join()


def build_small_store(root: Path, rows: int) -> Path:
    """tiny-sdxl float16 rows ([77, 80] + [48]: 12 kB), for the per-call overhead of single-row reads."""
    import clipcond
    from clipcond.precompute.job import PrecomputeJob, precompute

    tc = clipcond.TextConditioner.from_pretrained("tiny-sdxl", dtype=torch.float16)
    captions = root / "small.jsonl"
    captions.write_text("".join(json.dumps({"caption": f"caption {i}", "id": f"{i:09d}"}) + "\n" for i in range(rows)))
    precompute(tc, PrecomputeJob(input=captions, out=root / "small", id_column="id", shard_size=512, progress=False))
    return root / "small"


def single_rows(store_dir: Path) -> dict[str, float]:
    """``store[i]`` and ``store.by_id`` per second, checked and unchecked, warm; medians of 3."""
    from clipcond import EmbeddingStore

    pick = random.Random(SEED + 1)
    n = len(EmbeddingStore(store_dir))
    rows = [pick.randrange(n) for _ in range(LOOKUPS)]
    keys = [f"{r:09d}" for r in rows]
    out = {}
    for checked in (True, False):
        store = EmbeddingStore(store_dir, verify_rows=checked)
        [store.by_id(key) for key in keys]  # warm: mapped
        for name, call, args in (("store[i]", store.__getitem__, rows), ("by_id", store.by_id, keys),
                                 ("row_of", store.row_of, keys)):
            rates = []
            for _ in range(3):
                start = time.perf_counter()
                for a in args:
                    call(a)
                rates.append(len(args) / (time.perf_counter() - start))
            out[f"{name}, {'checked' if checked else 'unchecked'}"] = statistics.median(rates)
    return out


def loaded_reads(store_dir: Path, order: list[int]) -> dict[int, dict]:
    """Per number of CPU-burning neighbours (0 and NEIGHBOURS): rows/s of DataLoader passes (batch 16, workers 0),
    checked and unchecked in LOAD_PAIRS alternating pairs, each pair's unchecked / checked, the CPU time a row
    (this process, its copy threads included) and the load average before and after. Both reads run the same
    compiled copy on the same threads (one helper a 5 MB batch), so the pairs' ratios and the CPU a row say whether
    a difference is the sums' or the host's: on a loaded host single passes move 2x from one to the next."""
    from clipcond import EmbeddingStore

    out = {}
    for neighbours in (0, NEIGHBOURS):
        cpu: dict[bool, list[float]] = {True: [], False: []}

        def measure(checked: bool, cpu: dict = cpu) -> float:
            before = cpu_seconds()[0]
            rate = read_all(EmbeddingStore(store_dir, verify_rows=checked), order, 0)
            cpu[checked].append((cpu_seconds()[0] - before) / len(order) * 1e6)
            return rate

        with Neighbours(neighbours):
            load = os.getloadavg()[0]
            rates, ratios = pair_ratios(measure, LOAD_PAIRS)
            out[neighbours] = {"checked": rates[True], "unchecked": rates[False],
                               "unchecked/checked": [1 / r for r in ratios], "load": (load, os.getloadavg()[0]),
                               "cpu_us_per_row": {"checked": cpu[True], "unchecked": cpu[False]}}
    return out


def checksum_cost(store_dir: Path, batches: list[list[int]]) -> tuple[dict[bool, list[float]], list[float]]:
    """The batched copy of each batch's rows with the sums and without them: the same compiled routine
    (``copy_rows(..., checksums=)``), the same sources and destinations; rows/s in alternating pairs."""
    from clipcond import EmbeddingStore
    from clipcond.store.checksums import copy_rows, row_bytes

    store = EmbeddingStore(store_dir)
    work = []
    for batch in batches:
        located = [store._locate(r, 0) for r in batch]
        seq = torch.empty((len(batch), *store._null.sequence.shape[1:]), dtype=store.dtype)
        pooled = torch.empty((len(batch), store._null.pooled.shape[1]), dtype=store.dtype)
        sources = [view.rows[name][local] for name in ("sequence", "pooled") for view, local in located]
        destinations = [row for t in (seq, pooled) for row in row_bytes(t)]
        work.append((sources, destinations))

    def copy_all(checked: bool) -> float:
        start = time.perf_counter()
        for sources, destinations in work:
            copy_rows(sources, destinations, checksums=checked)
        return sum(len(b) for b in batches) / (time.perf_counter() - start)

    copy_all(True)
    return pair_ratios(copy_all, PAIRS)


class Latents(Dataset):
    """A user's map-style dataset of VAE latents, one memory-mapped ``.npy`` of them all (copy-on-write: each item is
    a view, no copy, as a per-sample safetensors file's tensors are), with ``files`` its text conditioning from one
    ``.safetensors`` per sample."""

    def __init__(self, latents: Path, files: list[Path] | None = None) -> None:
        self.latents, self.files = np.load(latents, mmap_mode="c"), files

    def __len__(self) -> int:
        return len(self.latents)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor | int]:
        item: dict[str, torch.Tensor | int] = {"latent": torch.from_numpy(self.latents[i])}  # [4, 128, 128]
        if self.files is not None:
            from safetensors.torch import load_file

            item.update(load_file(self.files[i]))  # sequence [77, 2048], pooled [1280]
        return item


class Segment(Dataset):
    """The floor of any worker-side fetch: each batch only a fresh shared-memory segment of its size (as
    default_collate and the store make a worker's batch), its pages given, nothing copied into it."""

    def __init__(self, n: int, row_bytes: int) -> None:
        self.n, self.row_bytes = n, row_bytes

    def __len__(self) -> int:
        return self.n

    def __getitems__(self, rows: list[int]) -> list[dict[str, torch.Tensor]]:
        from clipcond.store.checksums import populate

        buffer = torch.empty(0, dtype=torch.uint8).new(torch.UntypedStorage._new_shared(len(rows) * self.row_bytes))
        populate(buffer.numpy())
        return [{"latent": buffer.view(len(rows), self.row_bytes)}]  # [B, bytes]: the collate takes it as it is


def write_samples(store, latents: Path, root: Path) -> list[Path]:  # noqa: ANN001
    """One ``.safetensors`` per sample holding its latent and its text conditioning: the per-sample cache."""
    from safetensors.torch import save_file

    (root / "samples").mkdir()
    array = np.load(latents, mmap_mode="r")
    files = [root / "samples" / f"{i:09d}.safetensors" for i in range(len(store))]
    for i, path in enumerate(files):
        row = store[i]
        save_file({"latent": torch.from_numpy(array[i].copy()), "sequence": row["sequence"].clone(),
                   "pooled": row["pooled"].clone()}, path)
    return files


def cpu_seconds() -> tuple[float, float]:
    """CPU seconds (user + system) of this process and of its finished children (DataLoader workers)."""
    import resource

    me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime, children.ru_utime + children.ru_stime


def joined_reads(store_dir: Path, text_files: list[Path], order: list[int], root: Path) -> dict[str, list[tuple]]:
    """(rows/s, main CPU ms a batch, workers' CPU ms a batch) of each way with JOIN_WORKERS workers, warm (a pass of
    each first), JOIN_PASSES passes each, their order alternating."""
    from clipcond import EmbeddingStore
    from clipcond.store.join import JoinedDataset, JoinedLoader

    latents = root / "latents.npy"
    np.save(latents, torch.randn((len(text_files), *LATENT), generator=torch.Generator().manual_seed(SEED))
            .to(torch.float16).numpy())
    samples = write_samples(EmbeddingStore(store_dir), latents, root)
    per_row = sum(math.prod(shape) * 2 for shape in (LATENT, (77, 2048), (1280,)))  # float16 bytes a row

    def rate(dataset: Dataset, collate=None, loader=None) -> tuple:  # noqa: ANN001
        loader = loader or DataLoader(dataset, batch_size=BATCH, sampler=order, num_workers=JOIN_WORKERS,
                                      collate_fn=collate, prefetch_factor=4)
        (main0, workers0), start, n = cpu_seconds(), time.perf_counter(), 0
        for batch in loader:
            n += len(batch["latent"])
        wall = time.perf_counter() - start
        del loader  # its workers end: their CPU time is counted
        (main1, workers1), batches = cpu_seconds(), n / BATCH
        return n / wall, (main1 - main0) / batches * 1e3, (workers1 - workers0) / batches * 1e3

    def joined_loader() -> JoinedLoader:
        store = EmbeddingStore(store_dir)
        return JoinedLoader(Latents(latents), store, batch_size=BATCH, sampler=order, num_workers=JOIN_WORKERS,
                            prefetch_factor=4, collate=store.collate())

    def joined(collate: bool) -> tuple:
        store = EmbeddingStore(store_dir)
        return rate(JoinedDataset(Latents(latents), store), store.collate() if collate else None)

    ways = {"per-sample .safetensors, latent + text (default collate)":
            lambda: rate(PerSample(".safetensors each", samples)),
            "latents .npy + per-sample .safetensors text (default collate)":
            lambda: rate(Latents(latents, text_files)),
            "JoinedDataset(latents .npy, store), store.collate()": lambda: joined(True),
            "JoinedDataset(latents .npy, store), default collate": lambda: joined(False),
            "JoinedLoader(latents .npy, store): a reused shared segment a batch": lambda: rate(
                None, loader=joined_loader()),
            "floor: a fresh shared segment a batch, nothing copied": lambda: rate(Segment(len(order), per_row),
                                                                                   lambda items: items[0])}
    out: dict[str, list[tuple]] = {name: [] for name in ways}
    for measure in ways.values():
        measure()  # warm: every file and shard read once
    for k in range(JOIN_PASSES):
        for name in (list(ways) if k % 2 == 0 else list(ways)[::-1]):
            out[name].append(ways[name]())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=ROWS)
    parser.add_argument("--dir", type=Path, default=None, help="where the files go (default: a temporary folder)")
    parser.add_argument("--out", type=Path, default=JSON_PATH)
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of {SECTIONS}")
    a = parser.parse_args()
    sections = a.sections.split(",")
    from clipcond import EmbeddingStore
    from clipcond.store import checksums as store_format

    compiled = store_format._rows is not None  # the fetch's copy: clipcond._rows, else numpy
    results: dict[str, object] = {"args": {k: str(v) for k, v in vars(a).items()}, "compiled_copy": compiled}
    with tempfile.TemporaryDirectory(dir=a.dir) as tmp:
        root = Path(tmp)
        store_dir = build_store(root, a.rows)
        store = EmbeddingStore(store_dir)
        peers = write_peers(store, root) if {"formats", "joined"} & set(sections) else {}
        shards = sorted(store_dir.glob("shard-*.safetensors"))
        row_bytes = sum(p.stat().st_size for p in shards) / len(store)
        order = list(range(len(store)))
        random.Random(SEED).shuffle(order)
        print(f"{a.rows} SDXL float16 rows ({row_bytes / 1e3:.0f} kB each), shuffled, batch {BATCH}; rows copied by "
              f"{'clipcond._rows' if compiled else 'numpy (clipcond._rows not built)'}; "
              f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}\n")
        if "formats" in sections:
            results.update(formats_table(store_dir, peers, order, row_bytes, shards))
        if "single" in sections:
            small = single_rows(build_small_store(root, a.rows))
            real = single_rows(store_dir)
            print("single rows, warm (per second; medians of 3 passes of 20,000 random rows):")
            print("| call | tiny-SDXL fp16, 12 kB rows | SDXL fp16, 318 kB rows |\n|---|---:|---:|")
            for name in small:
                print(f"| {name} | {small[name]:,.0f} | {real[name]:,.0f} |")
            times = {k: d["store[i], unchecked"] / d["store[i], checked"] for k, d in (("small", small),
                                                                                       ("real", real))}
            print(f"checked / unchecked store[i]: {times['small']:.2f}x the time on 12 kB rows, {times['real']:.2f}x "
                  "on 318 kB\n")
            results["single"] = {"small": small, "real": real}
        if "load" in sections:
            loaded = loaded_reads(store_dir, order)
            print(f"DataLoader, batch {BATCH}, workers 0, warm: medians (quartiles) of {LOAD_PAIRS} alternating "
                  "checked / unchecked pairs of passes; CPU µs a row: this process's, its copy threads included")
            print("| CPU-burning neighbours | load average | checked rows/s | unchecked rows/s | unchecked / checked "
                  "per pair | CPU µs a row, checked | unchecked |")
            print("|---:|---|---:|---:|---:|---:|---:|")
            for neighbours, r in loaded.items():
                cells, cpu = [], r["cpu_us_per_row"]
                for values, form in ((r["checked"], ",.0f"), (r["unchecked"], ",.0f"), (r["unchecked/checked"], ".3f"),
                                     (cpu["checked"], ".1f"), (cpu["unchecked"], ".1f")):
                    q = statistics.quantiles(values, n=4)
                    cells.append(f"{statistics.median(values):{form}} ({q[0]:{form}}-{q[2]:{form}})")
                print(f"| {neighbours} | {r['load'][0]:.1f} -> {r['load'][1]:.1f} | {' | '.join(cells)} |")
            print()
            results["load"] = loaded
        if "checksum" in sections:
            batches = [order[i : i + BATCH] for i in range(0, len(order), BATCH)]
            rates, ratios = checksum_cost(store_dir, batches)
            quartiles = statistics.quantiles(ratios, n=4)
            ratio = statistics.median(ratios)
            with_sums, without = statistics.median(rates[True]), statistics.median(rates[False])
            print(f"the checksum's own cost: the batched copy (clipcond._rows) with sums {with_sums:,.0f} rows/s, "
                  f"the same copy without {without:,.0f}; with / without per pair {ratio:.3f} (quartiles "
                  f"{quartiles[0]:.3f}-{quartiles[2]:.3f}): cost {1 - ratio:.1%}\n")
            results["checksum"] = {"rows_per_s": rates, "ratios": ratios, "cost": 1 - ratio}
        if "joined" in sections:
            load = os.getloadavg()[0]
            joined = joined_reads(store_dir, peers[".safetensors each"], order, root)
            base = statistics.median(r[0] for r in joined["per-sample .safetensors, latent + text (default collate)"])
            print(f"the training read path: latent [4, 128, 128] fp16 + SDXL text, DataLoader batch {BATCH}, "
                  f"{JOIN_WORKERS} workers, warm; medians of {JOIN_PASSES} alternating passes (load average "
                  f"{load:.1f} at start, {os.getloadavg()[0]:.1f} at end):")
            print("| way | rows/s | min-max | × per-sample | CPU ms a batch: main | workers |")
            print("|---|---:|---:|---:|---:|---:|")
            for name, runs in joined.items():
                rates = [r[0] for r in runs]
                print(f"| {name} | {statistics.median(rates):,.0f} | {min(rates):,.0f}-{max(rates):,.0f} | "
                      f"{statistics.median(rates) / base:.2f} | {statistics.median(r[1] for r in runs):.2f} | "
                      f"{statistics.median(r[2] for r in runs):.2f} |")
            results["joined"] = joined
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(results, indent=1))
    print(f"\nwrote {a.out}")


def formats_table(store_dir: Path, peers: dict, order: list[int], row_bytes: float, shards: list[Path]) -> dict:
    """The per-format table: cold and warm rows/s of the store and each per-sample cache."""
    from clipcond import EmbeddingStore

    seq = statistics.median(sequential_rate(shards) for _ in range(3))
    limit = seq / row_bytes
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
    best_peer = {w: max(r["cold"] for r in table if r["workers"] == w and not r["format"].startswith("Embedding"))
                 for w in WORKERS}
    print(f"disk sequential read {seq / 1e6:.0f} MB/s = {limit:,.0f} rows/s\n")
    print("| format | workers | cold rows/s | cold % of sequential | × best per-sample (cold) | warm rows/s |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in table:
        ratio = r["cold"] / best_peer[r["workers"]]
        print(f"| {r['format']} | {r['workers']} | {r['cold']:,.0f} | {100 * r['cold'] / limit:.0f}% | "
              f"{ratio:.2f} | {r['warm']:,.0f} |")
    print()
    return {"sequential_bytes_per_s": seq, "limit_rows_per_s": limit, "row_bytes": row_bytes, "table": table}


if __name__ == "__main__":
    main()
