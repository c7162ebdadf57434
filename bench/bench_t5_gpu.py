"""T5 on a GPU: encode throughput of a T5-XL-size random encoder in float16 and bfloat16, and that it stays finite.

The GPU check's T5 section (bench/gpu_check.sh). A random T5 v1.1 encoder of T5-XL's sizes (d_model 2048, 24 blocks,
32 heads, d_ff 5120: AuraFlow's pile-T5-XL, PixArt's and Flux's T5-XXL at half width) is built by clipcond
(``random_t5``: outputs ~1, as a trained T5's) inside two recipes:

- ``masked`` (PixArt-Sigma's: the mask into T5, run to the batch's longest prompt), LAION-like token counts
  (``bench_tokenizer.captions`` lengths' shape: mostly 10-40, a tail to 120), batches grouped by length as
  precompute groups them, and the same captions in input order (random lengths a batch);
- ``unmasked`` (Flux's: every caption padded to 512, T5 attends to the padding).

Token ids are drawn at random (the vocabulary plays no part in the arithmetic), so nothing needs the T5 tokenizer
files, which a GPU machine without the network cannot fetch. Each row: captions/s and real tokens/s (median of
``--repeats`` timed passes after a warm-up), TFLOP/s of the tokens computed (2 x matmul parameters x rows
run, padding included, the embedding lookup and attention left out), peak CUDA memory, and whether every output
is finite and close to the float32 encoder's on the first batch (max |difference| / max |float32|). float16 must
stay finite: T5 v1.1 overflows in float16 unless its ``wo`` projections stay float32, which clipcond keeps.

    python bench/bench_t5_gpu.py --device cuda                 # ~1 min on an H100
    python bench/bench_t5_gpu.py --device cpu --size tiny      # the script itself, on a CPU (seconds)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from clipcond import TextConditioner
from clipcond.encoders.names import get_spec
from clipcond.encoders.t5 import random_t5
from clipcond.text.t5_tokens import T5Prompts
from clipcond.text.tokenizer import Tokens

SIZES = {"xl": {"d_model": 2048, "layers": 24, "heads": 32, "d_kv": 64, "d_ff": 5120},
         "tiny": {"d_model": 96, "layers": 3, "heads": 4, "d_kv": 16, "d_ff": 128}}
OUT = Path(__file__).parent / "results" / "t5_gpu.json"


def conditioner(recipe: str, size: str, dtype: torch.dtype, device: str) -> TextConditioner:
    """A ``pixart-sigma`` (masked) or ``flux`` (unmasked, T5 only) recipe around a random T5 of ``size``."""
    base = get_spec("pixart-sigma" if recipe == "masked" else "t5-xxl")
    tower = base.t5.replace(name=f"random-t5-{size}", **SIZES[size])
    spec = base.replace(name=f"{base.name}-random-{size}", t5=tower, hub_repo=None)
    tokenizer = SimpleNamespace(pad_token_id=tower.pad_id, eos_token_id=tower.eos_id)  # ids are drawn, not tokenized
    t5 = random_t5(tower, seed=0).to(dtype)
    return TextConditioner(spec, [], t5=(t5, T5Prompts(tokenizer, spec))).to(device)


def lengths(n: int, seed: int = 0) -> torch.Tensor:
    """[n] LAION-like T5 token counts (EOS included): mostly 10-40, one in ten 40-120."""
    g = torch.Generator().manual_seed(seed)
    short = torch.randint(8, 41, (n,), generator=g)
    long = torch.randint(40, 121, (n,), generator=g)
    return torch.where(torch.rand(n, generator=g) < 0.1, long, short)


def batches(tc: TextConditioner, counts: torch.Tensor, batch: int, *, grouped: bool) -> list[list[Tokens]]:
    """Token batches of random ids with these lengths (EOS last, padding after), padded to the recipe's length."""
    spec, g = tc.spec, torch.Generator().manual_seed(1)
    order = torch.argsort(counts, stable=True) if grouped else torch.arange(len(counts))
    out = []
    for a in range(0, len(counts), batch):
        k = counts[order[a : a + batch]]  # [b]
        ids = torch.randint(3, spec.t5.vocab_size, (len(k), spec.t5_max_length), generator=g)
        ids[torch.arange(spec.t5_max_length) >= k[:, None]] = spec.t5.pad_id
        ids[torch.arange(len(k)), k - 1] = spec.t5.eos_id
        out.append([Tokens(ids, k - 1, ())])
    return out


def run(recipe: str, size: str, dtype: torch.dtype, device: str, captions: int, batch: int, repeats: int,
        grouped: bool) -> dict:
    tc = conditioner(recipe, size, dtype, device)
    counts = lengths(captions)
    work = batches(tc, counts, batch, grouped=grouped)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    finite, rows_run, times = True, 0, []
    for repeat in range(repeats + 1):  # the first pass warms up (kernels, allocator), untimed
        sync()
        start = time.perf_counter()
        for tokens in work:
            c = tc.encode_tokens(tokens)
            if repeat == 0:
                finite &= bool(torch.isfinite(c.sequence).all())
                rows_run += c.sequence.shape[0] * c.sequence.shape[1]
        sync()
        if repeat:
            times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    reference = conditioner(recipe, size, torch.float32, device).encode_tokens(work[0]).sequence
    got = tc.encode_tokens(work[0]).sequence.float()
    error = float((got - reference).abs().max() / reference.abs().max())
    params = sum(p.numel() for name, p in tc.t5.named_parameters() if "shared" not in name and "embed" not in name)
    return {"recipe": recipe, "grouped": grouped, "size": size, "dtype": str(dtype).removeprefix("torch."),
            "device": device, "captions": captions, "batch": batch, "seconds": seconds,
            "captions_per_s": captions / seconds, "tokens_per_s": float(counts.sum()) / seconds,
            "tflops": 2 * params * rows_run / seconds / 1e12, "finite": finite, "rel_error_vs_fp32": error,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", choices=SIZES, default="xl")
    parser.add_argument("--dtypes", nargs="+", default=["float16", "bfloat16"])
    parser.add_argument("--captions", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    rows = []
    print("| recipe | order | dtype | captions/s | tokens/s | TFLOP/s | finite | rel. err vs fp32 | peak GiB |\n"
          "|---|---|---|---:|---:|---:|---|---:|---:|")
    for dtype in args.dtypes:
        for recipe, grouped in (("masked", True), ("masked", False), ("unmasked", False)):
            row = run(recipe, args.size, getattr(torch, dtype), args.device, args.captions, args.batch,
                      args.repeats, grouped)
            rows.append(row)
            peak = "-" if row["peak_gib"] is None else f"{row['peak_gib']:.1f}"
            order = "by length" if grouped else "input" if recipe == "masked" else "padded to 512"
            print(f"| {recipe} | {order} | {dtype} | {row['captions_per_s']:,.0f} | {row['tokens_per_s']:,.0f} | "
                  f"{row['tflops']:.1f} | {row['finite']} | {row['rel_error_vs_fp32']:.1e} | {peak} |", flush=True)
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"\n{name}, T5 size {args.size} ({SIZES[args.size]}), batch {args.batch}, {args.captions} captions")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"device": name, "rows": rows}, indent=1))
    if not all(row["finite"] for row in rows):
        raise SystemExit("some outputs were not finite")


if __name__ == "__main__":
    main()
