"""Issue 11's "done when", timed: img2dataset tars with two captions a sample, precomputed in 4 parts,
grown by 1 %, updated; the update's time against a fresh run of the grown dataset.

The tars hold what img2dataset writes per sample: ``<key>.jpg`` (random bytes, skipped unread),
``<key>.txt`` (a short caption, repeated across samples as web captions are) and ``<key>.json``
(a long caption in ``caption``); the two variants are ``--column txt --column json:caption``. All
runs are in this process with one loaded encoder (tiny-sdxl: random weights, real tokenizer), so
the seconds are precompute's own: scan, plan, encode, write, publish. The update is expected to
cost the scan of the whole input (every row is read) plus encoding the new captions only; a rerun
with nothing new shows that floor.

    python bench/bench_incremental.py                # 20,000 samples in 8 tars, + 1 %
    python bench/bench_incremental.py --samples 100000 --encoder sdxl --device cuda --dtype float16
"""

from __future__ import annotations

import argparse
import io
import json
import tarfile
import tempfile
import time
from pathlib import Path

SAMPLES = 20_000
TARS = 8
GROWTH = 0.01
PARTS = 4
ENCODER = "tiny-sdxl"
BATCH = 64
IMAGE_BYTES = 4096
JSON_PATH = Path(__file__).parent / "results" / "incremental.json"
WORDS = ("a photo of the cat dog running astronaut horse mars portrait oil painting by greg rutkowski trending "
         "on artstation highly detailed 4k 8k hdr masterpiece best quality street city night rain").split()


def write_tar(path: Path, keys: range) -> None:
    """One img2dataset-style shard: jpg, txt and json members per sample, consecutive."""
    import os

    with tarfile.open(path, "w") as tar:
        for i in keys:
            key = f"{i:09d}"
            short = f"{WORDS[i % 29]} {WORDS[i % 23]} {WORDS[(i // 7) % 19]}"  # repeats: ~8.7k distinct
            long = f"{short}, {WORDS[i % 17]} in the {WORDS[i % 13]} at {WORDS[i % 11]}, sample {i}"
            meta = json.dumps({"caption": long, "url": f"https://example.com/{key}.jpg", "key": key})
            for ext, data in (("jpg", os.urandom(IMAGE_BYTES)), ("txt", short.encode()), ("json", meta.encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=SAMPLES)
    parser.add_argument("--encoder", default=ENCODER)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch-size", type=int, default=BATCH)
    parser.add_argument("--out", type=Path, default=JSON_PATH)
    a = parser.parse_args()

    import torch

    import clipcond
    from clipcond.precompute.job import PrecomputeJob, precompute

    tc = clipcond.TextConditioner.from_pretrained(a.encoder, device=a.device, dtype=getattr(torch, a.dtype))
    columns = ["txt", "json:caption"]
    results = []
    with tempfile.TemporaryDirectory(dir=Path.cwd()) as tmp:
        root = Path(tmp)
        per_tar = -(-a.samples // TARS)
        for t in range(TARS):
            write_tar(root / f"{t:05d}.tar", range(t * per_tar, min((t + 1) * per_tar, a.samples)))
        grown = int(a.samples * GROWTH)
        tars = str(root / "*.tar")

        def run(label: str, out: Path, part: tuple[int, int] | None = None) -> dict:
            started = time.perf_counter()
            manifest = precompute(tc, PrecomputeJob(input=tars, out=out, column=columns, part=part,
                                                    batch_size=a.batch_size, progress=False))
            seconds = time.perf_counter() - started
            row = {"run": label, "rows": manifest["rows"], **manifest["run"], "seconds": seconds}
            results.append(row)
            return row

        parts = [run(f"part {i}/{PARTS}", root / "store", (i, PARTS)) for i in range(PARTS)]
        # Each part reports its plan's counts (the captions new to the store, of which it encodes its shards);
        # a part that starts after the store is complete finds nothing new.
        first = {"run": f"first: {PARTS} parts, one after another", "rows": parts[-1]["rows"],
                 "encoded": max(p["encoded"] for p in parts), "reused": 0, "seconds": sum(p["seconds"] for p in parts)}
        results.append(first)
        write_tar(root / f"{TARS:05d}.tar", range(a.samples, a.samples + grown))  # + 1 %: a new shard
        update = run(f"update: + {grown} samples", root / "store")
        floor = run("rerun, nothing new", root / "store")
        fresh = run("fresh run of the grown input", root / "fresh")
        store, reference = clipcond.EmbeddingStore(root / "store"), clipcond.EmbeddingStore(root / "fresh")
        for key in (f"{0:09d}", f"{a.samples + grown - 1:09d}"):  # the first sample and the newest
            for variant in (0, 1):
                mine, theirs = store.get(store.row_of(key), variant), reference.get(reference.row_of(key), variant)
                assert torch.equal(mine["sequence"], theirs["sequence"]), (key, variant)

    print(f"{a.samples:,} samples in {TARS} tars, 2 captions each ({a.encoder}, {a.device}, {a.dtype}); "
          f"grown by {grown} samples ({GROWTH:.0%})\n")
    print("| run | rows | captions encoded | reused | seconds | × fresh run |")
    print("|---|---:|---:|---:|---:|---:|")
    for row in [*results[PARTS:]]:
        print(f"| {row['run']} | {row['rows']:,} | {row['encoded']:,} | {row['reused']:,} | {row['seconds']:.2f} | "
              f"{row['seconds'] / fresh['seconds']:.3f} |")
    share = {k: row[k] / fresh[k] for row, k in ((update, "encoded"), (update, "seconds"))}
    print(f"\nthe update encoded {share['encoded']:.1%} of the fresh run's captions in {share['seconds']:.1%} of its "
          f"time; the floor (scan and plan, nothing to encode) is {floor['seconds'] / fresh['seconds']:.1%}")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(a).items()}, "runs": results}, indent=1))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
