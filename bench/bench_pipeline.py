"""The precompute pipeline's own ceiling: how many rows/s tokenization and writing sustain.

An encoder that costs nothing (``encode_tokens`` hands back ready tensors of the real output size)
runs through the real pipeline (clipcond/precompute/encode.py: tokenizer thread, bounded queues, writer
thread streaming safetensors shards with sha256 and fsync) over real captions. Its rows/s is the
fastest any device could be fed on this machine: an encoder slower than that never waits for
tokens or disk. The table also shows which side the zero-cost encoder waited on.

    python bench/bench_pipeline.py                         # SDXL float16 outputs, 20,000 captions
    python bench/bench_pipeline.py --encoder sd15 --dtype float32 --batch-size 128
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from bench_tokenizer import captions

N_CAPTIONS = 20_000
BATCH_SIZE = 256
SHARD_ROWS = 2048  # ~650 MB per SDXL float16 shard: several shards, so fsyncs and renames are in the figure
REPEATS = 3
JSON_PATH = Path(__file__).parent / "results" / "pipeline.json"


def free_conditioner(encoder: str, dtype: torch.dtype, batch_size: int) -> object:
    """A real conditioner (its real tokenizers, ``encoder``'s output sizes) whose forward is free."""
    import clipcond
    from clipcond.conditioning import Conditioning

    spec = clipcond.get_spec(encoder)
    tc = clipcond.TextConditioner.from_pretrained(f"tiny-{encoder}")  # same tokenizers and pad ids
    g = torch.Generator().manual_seed(0)
    ready = Conditioning(torch.randn(batch_size, spec.max_length, spec.sequence_dim, generator=g).to(dtype),
                         torch.randn(batch_size, spec.pooled_dim, generator=g).to(dtype))
    tc.encode_tokens = lambda tokens: ready[: len(tokens[0].ids)]
    return tc


def run(tc: object, texts: list[str], out: Path, batch_size: int) -> dict:
    from clipcond.precompute.encode import encode_shards

    shards = [(k, a, min(a + SHARD_ROWS, len(texts))) for k, a in enumerate(range(0, len(texts), SHARD_ROWS))]
    out.mkdir()
    start = time.perf_counter()
    stats = encode_shards(tc, texts, shards, out, batch_size=batch_size, meta={}, progress=False)
    seconds = time.perf_counter() - start
    size = sum(p.stat().st_size for p in out.iterdir())
    return {"seconds": seconds, "rows_per_s": len(texts) / seconds, "mb_per_s": size / seconds / 1e6,
            "bytes": size, "waiting_tokens_s": stats.waiting_tokens, "waiting_writer_s": stats.waiting_writer}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--encoder", default="sdxl", choices=("sdxl", "sd15", "sd2"))
    parser.add_argument("--dtype", default="float16", choices=("float32", "float16", "bfloat16"))
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    parser.add_argument("--captions", type=int, default=N_CAPTIONS)
    parser.add_argument("--repeats", type=int, default=REPEATS)
    parser.add_argument("--dir", type=Path, default=None, help="where the shards go (default: a temporary folder)")
    parser.add_argument("--out", type=Path, default=JSON_PATH)
    a = parser.parse_args()
    texts = list(dict.fromkeys(captions(int(a.captions * 1.5))))[: a.captions]  # unique: precompute dedups first
    tc = free_conditioner(a.encoder, getattr(torch, a.dtype), a.batch_size)
    with tempfile.TemporaryDirectory(dir=a.dir) as tmp:
        runs = []
        for i in range(a.repeats):
            runs.append(run(tc, texts, Path(tmp) / str(i), a.batch_size))
            shutil.rmtree(Path(tmp) / str(i))
    median = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    row_kb = median["bytes"] / len(texts) / 1e3
    print(f"precompute pipeline with a zero-cost encoder: {a.encoder} {a.dtype} outputs ({row_kb:.0f} kB a row), "
          f"{len(texts)} unique captions, batch {a.batch_size}, shards of {SHARD_ROWS} rows, median of {a.repeats}\n")
    print("| rows/s | MB/s written | seconds | encoder waited for tokens (s) | encoder waited for the writer (s) |")
    print("|---:|---:|---:|---:|---:|")
    print(f"| {median['rows_per_s']:,.0f} | {median['mb_per_s']:,.0f} | {median['seconds']:.2f} "
          f"| {median['waiting_tokens_s']:.2f} | {median['waiting_writer_s']:.2f} |")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(a).items()}, "runs": runs, "median": median},
                                indent=1))
    print(f"\nwrote {a.out}")


if __name__ == "__main__":
    main()
