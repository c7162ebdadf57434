"""Encoder forward throughput against the measured matmul peak, clipcond against the naive diffusers loop.

For each encoder at its real size (seeded random weights: speed does not depend on their values), dtype and
batch: prompts/s and ms per batch of ``tc(prompts)`` (tokenization included), the achieved GFLOP/s over the
blocks the spec runs, that as a share of a large ``torch.matmul`` timed in the same dtype on the same device
in the same worker, and the peak RSS (CPU) or peak CUDA memory. The naive reference is what diffusers'
training scripts do: transformers' CLIPTokenizer, then a full ``CLIPTextModel`` (``...WithProjection`` for
bigG) called with ``output_hidden_states=True`` and the layer picked from ``hidden_states``, same prompts,
device, dtype and batch; "× naive" is clipcond's prompts/s over its.

Every (encoder, dtype, implementation) runs in its own worker process, so that peak RSS belongs to one
model; batches run in ascending order and the RSS after a batch is the peak up to it, i.e. its own.

    python bench/bench_encode.py                                   # CPU defaults: ~5-10 min on 2 cores
    python bench/bench_encode.py --batches 1 16 64 256             # the issue's full CPU grid (hours)
    python bench/bench_encode.py --device cuda                     # full grid on a GPU, minutes
    python bench/bench_encode.py --encoders sdxl --dtypes float32 --out /tmp/sdxl.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from clipcond import EncoderSpec, TowerSpec

# --- knobs ---------------------------------------------------------------------------------
DEVICE = "auto"  # "auto": cuda when available, else cpu
THREADS = None  # torch.set_num_threads in each worker; None: torch's default (one per core)
ENCODERS = ("clip-vit-l-14", "openclip-vit-h-14", "openclip-vit-bigg-14", "sdxl")
DTYPES = {"cpu": ("float32", "bfloat16"), "cuda": ("float16", "bfloat16")}
# The grid is 1/16/64/256. On a 2-core CPU one SDXL batch of 256 is ~28 TFLOP (minutes per
# iteration, per implementation), so the CPU default stops at 16; --batches widens it.
BATCHES = {"cpu": (1, 16), "cuda": (1, 16, 64, 256)}
WARMUP = 1  # untimed iterations at the same shape (allocator, oneDNN/cuBLAS plans, autotuning)
MIN_ITERS = {"cpu": 1, "cuda": 5}  # timed iterations at least ...
MIN_SECONDS = {"cpu": 3.0, "cuda": 2.0}  # ... and until this much time is timed ...
MAX_ITERS = {"cpu": 10, "cuda": 200}  # ... but no more than this
PEAK_N = {"cpu": 3072, "cuda": 8192}  # square matmul for the peak; 3072 is on the CPU plateau, < 1 s
PEAK_REPEATS = {"cpu": 5, "cuda": 20}  # the peak is the best of these (a peak, not a typical figure)
PROFILE = False  # --profile: one profiled clipcond forward per row, time split by op kind (second table)
NAIVE = True  # also time the naive diffusers-style loop (--no-naive to skip)
TARGET = 0.70  # the target: CPU float32 forward >= 70% of the matmul peak at batch >= 16
GPU_TARGET = 0.40  # ... and on a GPU: SDXL float16 >= 40% of the float16 matmul peak at large batch (>= 64)
COMPILE = None  # --compile MODE: tc.compile(mode=MODE) for clipcond (compilation happens in the warm-up)
SEED = 0
OUT = "bench/results/encode.json"

logger = logging.getLogger("bench_encode")


# --- what is counted -----------------------------------------------------------------------
def block_flops(width: int, mlp_width: int, tokens: int) -> int:
    """FLOPs (2 per multiply-add) of one pre-LN block on one sequence of ``tokens`` tokens.

    Weights, per token: fused qkv 3W², out W², fc1 + fc2 2·W·M. Attention: QKᵀ and AV are T·T·W
    multiply-adds each, counted in full although the causal half is masked (the usual MFU convention).
    LayerNorm, GELU, residuals and the pooled projection are O(T·W): left out.
    """
    return 2 * tokens * (4 * width * width + 2 * width * mlp_width) + 2 * 2 * tokens * tokens * width


def diffusers_dropped(tower: TowerSpec) -> int:
    """Blocks diffusers' pipeline folder of ``tower`` leaves out: SD 2.x's ViT-H copy holds 23 of 24
    (its spec says None: decided from the weights on load), every other tower all of them."""
    return 1 if tower.hf_dropped_layers is None else tower.hf_dropped_layers


def encoder_flops(spec: EncoderSpec, batch: int, *, naive: bool = False) -> int:
    """FLOPs of one batch: the blocks clipcond runs, or (``naive``) every block the HF model holds."""
    total = 0
    for tower in spec.towers:
        blocks = tower.layers - diffusers_dropped(tower) if naive else tower.blocks_needed
        total += blocks * block_flops(tower.width, tower.mlp_width, spec.max_length)
    return total * batch


def linear_flops(spec: EncoderSpec, batch: int) -> int:
    """The weight-matmul part of ``encoder_flops`` (no attention), to rate the GEMMs on their own."""
    return batch * sum(t.blocks_needed * 2 * spec.max_length * (4 * t.width**2 + 2 * t.width * t.mlp_width)
                       for t in spec.towers)


# Op kinds by (lower-cased) aten op or CUDA kernel name; the first match wins, the rest is "other".
OP_KINDS = (
    ("matmul", ("addmm", "aten::mm", "bmm", "gemm", "cutlass", "xmma", "cublas", "matmul")),
    ("attention", ("scaled_dot_product", "flash", "fmha", "attention", "softmax")),
    ("layernorm", ("layer_norm",)),
    ("activation", ("gelu", "sigmoid", "silu", "aten::mul", "mul_", "mulfunctor")),
    ("copy", ("copy", "contiguous", "clone", "aten::cat", "cat_", "index")),
    ("add", ("aten::add", "add_", "addfunctor", "functor_add")),
)


def profile_split(fn: Callable[[], object], device: str) -> dict[str, float]:
    """Seconds of self time per op kind in one call (device time on CUDA), from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
        synchronize(device)
    split = dict.fromkeys([kind for kind, _ in OP_KINDS] + ["other"], 0.0)
    for event in prof.key_averages():
        us = event.self_device_time_total if device == "cuda" else event.self_cpu_time_total
        if us <= 0 or (device == "cuda" and event.device_type.name != "CUDA"):
            continue
        name = event.key.lower()
        kind = next((kind for kind, needles in OP_KINDS if any(n in name for n in needles)), "other")
        split[kind] += us / 1e6
    return split


# --- worker: one encoder, dtype and implementation -----------------------------------------
@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Build parameters directly in ``dtype``: no float32 copy inflates the peak RSS of a bfloat16 run."""
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def synchronize(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device: str, dtype: torch.dtype) -> float:
    """Best FLOP/s of an N×N×N torch.matmul in this dtype on this device, measured now."""
    import torch

    n = PEAK_N[device]
    generator = torch.Generator(device).manual_seed(SEED)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=generator)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=generator)
    times = time_calls(lambda: torch.matmul(a, b), device, iters=PEAK_REPEATS[device])
    return 2 * n**3 / min(times)


def time_calls(fn: Callable[[], object], device: str, *, iters: int | None = None) -> list[float]:
    """Seconds per call after WARMUP calls: ``iters`` calls, or MIN_ITERS..MAX_ITERS until MIN_SECONDS."""
    for _ in range(WARMUP):
        fn()
    synchronize(device)
    times: list[float] = []
    while True:
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
        if iters is not None:
            if len(times) >= iters:
                return times
        elif len(times) >= MAX_ITERS[device]:
            return times
        elif len(times) >= MIN_ITERS[device] and sum(times) >= MIN_SECONDS[device]:
            return times


def peak_memory(device: str) -> int:
    """Bytes: peak CUDA memory since the last reset, or this process's peak RSS so far."""
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # macOS reports bytes, Linux KiB


def build_clipcond(spec: EncoderSpec, device: str, dtype: torch.dtype,
                   compile_mode: str | None = None) -> Callable[[list[str]], object]:
    """``TextConditioner(spec, towers)`` over seeded random towers, built in ``dtype``, no hub."""
    from clipcond import TextConditioner
    from clipcond.encoders.model import random_tower

    with default_dtype(dtype):
        towers = [random_tower(tower, seed=i) for i, tower in enumerate(spec.towers)]
    tc = TextConditioner(spec, towers).to(device)
    return tc.compile(mode=compile_mode) if compile_mode else tc


def build_naive(spec: EncoderSpec, device: str, dtype: torch.dtype, folder: Path) -> Callable[[list[str]], object]:
    """diffusers' training-script ``encode_prompt`` over random transformers models of the same sizes."""
    import torch
    from bench_tokenizer import hf_tokenizer
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    parts = []
    for i, tower in enumerate(spec.towers):
        config = CLIPTextConfig(
            vocab_size=tower.vocab_size, hidden_size=tower.width, intermediate_size=tower.mlp_width,
            # diffusers' SD2 folders hold 23 of ViT-H's 24 blocks; everything else the full tower.
            num_hidden_layers=tower.layers - diffusers_dropped(tower), num_attention_heads=tower.heads,
            max_position_embeddings=tower.context_length, hidden_act=tower.activation,
            projection_dim=tower.projection_dim or tower.width,
        )
        cls = CLIPTextModelWithProjection if tower.pooled == "projected" else CLIPTextModel
        torch.manual_seed(SEED + i)
        model = cls._from_config(config, dtype=dtype).to(device).eval().requires_grad_(False)
        # The SD repos' tokenizers: SD 1.x pads with <|endoftext|>, SD 2.x and SDXL's second with "!".
        pad = "<|endoftext|>" if tower.pad_id == 49407 else "!"
        (folder / str(i)).mkdir()
        parts.append((hf_tokenizer(folder / str(i), pad), model, tower))

    @torch.no_grad()
    def encode(prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        sequences, pooled = [], []
        for i, (tokenizer, model, tower) in enumerate(parts):
            ids = tokenizer(prompts, padding="max_length", max_length=spec.max_length, truncation=True,
                            return_tensors="pt").input_ids
            out = model(ids.to(device), output_hidden_states=True)
            sequence = out.hidden_states[tower.hidden_layer + diffusers_dropped(tower)]  # [B, 77, W]
            if tower.final_norm:
                sequence = getattr(model, "text_model", model).final_layer_norm(sequence)  # transformers 5: flat
            sequences.append(sequence)
            if i in spec.pooled_towers:
                pooled.append(out[0] if tower.pooled == "projected" else out.pooler_output)  # [B, P_i]
        return torch.cat(sequences, dim=-1), torch.cat(pooled, dim=-1)

    return encode


def worker(job: dict) -> dict:
    """Time one (encoder, dtype, implementation) over the batches; the result is one JSON line."""
    import torch
    from bench_tokenizer import captions

    import clipcond

    logging.getLogger("clipcond").setLevel(logging.ERROR)  # it warns on each truncated caption: not timed
    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    device, dtype, spec = job["device"], getattr(torch, job["dtype"]), clipcond.get_spec(job["encoder"])
    peaks = [matmul_peak(device, dtype)]  # again after the last batch: the best of both is the peak
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        if job["impl"] == "naive":
            encode = build_naive(spec, device, dtype, Path(tmp))
        else:
            encode = build_clipcond(spec, device, dtype, job.get("compile"))
    build_s = time.perf_counter() - start
    texts = captions(max(job["batches"]))
    rows = []
    for batch in sorted(job["batches"]):
        prompts = texts[:batch]
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times = time_calls(lambda prompts=prompts: encode(prompts), device)
        seconds = statistics.median(times)
        flops = encoder_flops(spec, batch, naive=job["impl"] == "naive")
        rows.append({**job, "batch": batch, "seconds": times, "prompts_per_s": batch / seconds,
                     "ms_per_batch": 1e3 * seconds, "flops": flops, "flop_per_s": flops / seconds,
                     "peak_memory_bytes": peak_memory(device), "build_s": build_s})
        if job.get("profile") and job["impl"] == "clipcond":
            rows[-1]["profile_s"] = profile_split(lambda prompts=prompts: encode(prompts), device)
            rows[-1]["linear_flops"] = linear_flops(spec, batch)
        logger.info("  %s %s %s batch %d: %.2f prompts/s, %.0f GFLOP/s", job["encoder"], job["dtype"],
                    job["impl"], batch, batch / seconds, flops / seconds / 1e9)
    # Measured after the last batch's peak memory is read, so the matrices do not inflate it.
    peaks.append(matmul_peak(device, dtype))
    for row in rows:
        row["matmul_peaks_flop_per_s"] = peaks
        row["matmul_peak_flop_per_s"] = max(peaks)
        row["fraction_of_peak"] = row["flop_per_s"] / max(peaks)
    return {"rows": rows}


# libkineto's own log lines around each torch.profiler run (no knob silences them all).
KINETO_NOISE = re.compile(r"(STAGE|USDT|ERROR|WARNING|INFO):\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \d+:\d+ \S+\.cpp:\d+\]")


def run_worker(job: dict) -> list[dict]:
    """Run ``worker(job)`` in a fresh interpreter (own peak RSS, memory returned afterwards)."""
    cmd = [sys.executable, __file__, "--worker", json.dumps(job)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    sys.stderr.writelines(line for line in done.stderr.splitlines(keepends=True) if not KINETO_NOISE.match(line))
    if done.returncode != 0:
        logger.error("worker %s failed (exit %d)", job, done.returncode)
        return [{**job, "error": f"exit {done.returncode}"}]
    return json.loads(done.stdout.strip().splitlines()[-1])["rows"]


# --- table ---------------------------------------------------------------------------------
def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def table(rows: list[dict], device: str) -> str:
    mem = "peak CUDA mem" if device == "cuda" else "peak RSS"
    lines = [f"| encoder | device | dtype | batch | prompts/s | ms/batch | GFLOP/s | % of peak | {mem} "
             f"| naive prompts/s | naive GFLOP/s | naive {mem} | × naive |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    naive = {(r["encoder"], r["dtype"], r["batch"]): r for r in rows if r["impl"] == "naive" and "error" not in r}
    for r in rows:
        if r["impl"] != "clipcond":
            continue
        if "error" in r:
            lines.append(f"| {r['encoder']} | {device} | {r['dtype']} | - | {r['error']} |" + " |" * 8)
            continue
        n = naive.get((r["encoder"], r["dtype"], r["batch"]))
        ref = (f"{n['prompts_per_s']:.2f} | {n['flop_per_s'] / 1e9:.0f} | {gib(n['peak_memory_bytes'])} "
               f"| {r['prompts_per_s'] / n['prompts_per_s']:.2f}") if n else "- | - | - | -"
        lines.append(f"| {r['encoder']} | {device} | {r['dtype']} | {r['batch']} | {r['prompts_per_s']:.2f} "
                     f"| {r['ms_per_batch']:.0f} | {r['flop_per_s'] / 1e9:.0f} | {100 * r['fraction_of_peak']:.0f}% "
                     f"| {gib(r['peak_memory_bytes'])} | {ref} |")
    return "\n".join(lines)


def profile_table(rows: list[dict]) -> str:
    """Where one clipcond forward's time goes, and the GEMMs' own rate against the matmul peak."""
    kinds = [kind for kind, _ in OP_KINDS] + ["other"]
    lines = [f"| encoder | dtype | batch | {' | '.join(kinds)} | GEMM GFLOP/s | GEMM % of peak |",
             "|---|---|---:|" + "---:|" * (len(kinds) + 2)]
    for r in rows:
        if "profile_s" not in r:
            continue
        split, total = r["profile_s"], sum(r["profile_s"].values())
        gemm = r["linear_flops"] / split["matmul"] if split["matmul"] else 0.0
        shares = " | ".join(f"{100 * split[k] / total:.0f}%" for k in kinds)
        lines.append(f"| {r['encoder']} | {r['dtype']} | {r['batch']} | {shares} | {gemm / 1e9:.0f} "
                     f"| {100 * gemm / r['matmul_peak_flop_per_s']:.0f}% |")
    return "\n".join(lines)


def peaks_line(rows: list[dict]) -> str:
    by_dtype: dict[str, list[float]] = {}
    for r in rows:
        if "matmul_peak_flop_per_s" in r:
            by_dtype.setdefault(r["dtype"], []).append(r["matmul_peak_flop_per_s"] / 1e9)
    return "; ".join(f"{d} {statistics.median(v):.0f} GFLOP/s (workers: {min(v):.0f}-{max(v):.0f})"
                     for d, v in by_dtype.items())


def target_lines(rows: list[dict], device: str) -> list[str]:
    """The issue's targets: CPU float32 per encoder over batches >= 16; GPU SDXL float16 over batches >= 64."""
    dtype, least, target = ("float32", 16, TARGET) if device == "cpu" else ("float16", 64, GPU_TARGET)
    out = []
    for encoder in dict.fromkeys(r["encoder"] for r in rows):
        if device != "cpu" and encoder != "sdxl":
            continue
        hits = [r for r in rows if r["encoder"] == encoder and r.get("device") == device and r["impl"] == "clipcond"
                and r["dtype"] == dtype and r.get("batch", 0) >= least and "error" not in r]
        if hits:
            # CPU: every batch >= 16 must reach it; GPU: "at large batch", the best of them.
            judged = (min if device == "cpu" else max)(hits, key=lambda r: r["fraction_of_peak"])
            verdict = "met" if judged["fraction_of_peak"] >= target else "NOT met"
            out.append(f"- {encoder}: {100 * judged['fraction_of_peak']:.0f}% of the {dtype} matmul peak at batch "
                       f"{judged['batch']} (target {100 * target:.0f}% at batch >= {least}): {verdict}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default=DEVICE, choices=("auto", "cpu", "cuda"))
    parser.add_argument("--encoders", nargs="+", default=None, help=f"default {' '.join(ENCODERS)}")
    parser.add_argument("--dtypes", nargs="+", default=None, help="default: float32 bfloat16 (cpu), float16 "
                        "bfloat16 (cuda)")
    parser.add_argument("--batches", nargs="+", type=int, default=None, help="default: 1 16 (cpu), 1 16 64 256")
    parser.add_argument("--no-naive", action="store_true", help="skip the naive diffusers-style reference")
    parser.add_argument("--profile", action="store_true", default=PROFILE,
                        help="also split one clipcond forward per row by op kind (torch.profiler)")
    parser.add_argument("--threads", type=int, default=THREADS, help="torch threads per worker (default: torch's)")
    parser.add_argument("--compile", nargs="?", const="default", default=COMPILE, metavar="MODE",
                        help="tc.compile(mode=MODE) for clipcond (reduce-overhead: CUDA graphs)")
    parser.add_argument("--out", default=OUT)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    import torch

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    encoders, dtypes = args.encoders or ENCODERS, args.dtypes or DTYPES[device]
    batches = args.batches or BATCHES[device]
    impls = ("clipcond", "naive") if NAIVE and not args.no_naive else ("clipcond",)
    start, rows, load = time.perf_counter(), [], [os.getloadavg()[0]]
    for encoder in encoders:
        for dtype in dtypes:
            for impl in impls:  # adjacent in time: a noisy neighbour hits both alike
                logger.info("[%.0fs] %s %s %s", time.perf_counter() - start, encoder, dtype, impl)
                rows += run_worker({"encoder": encoder, "dtype": dtype, "impl": impl, "device": device,
                                    "batches": list(batches), "profile": args.profile,
                                    "threads": args.threads, "compile": args.compile})
    wall = time.perf_counter() - start
    load.append(os.getloadavg()[0])

    name = torch.cuda.get_device_name() if device == "cuda" else (platform.processor() or platform.machine())
    threads = args.threads or torch.get_num_threads()
    print(f"\nclipcond encoder forward, {name}, torch {torch.__version__}, {threads} threads, "
          f"median of >= {MIN_ITERS[device]} timed iterations after {WARMUP} warm-up; "
          f"clipcond {'compiled (' + args.compile + ')' if args.compile else 'eager'}; {wall:.0f} s in all; "
          f"load average {load[0]:.1f} at start, {load[1]:.1f} at end (other processes skew CPU figures)")
    print(f"matmul peak ({PEAK_N[device]}³, best of {PEAK_REPEATS[device]} before and {PEAK_REPEATS[device]} after "
          f"each worker's batches): {peaks_line(rows)}\n")
    print(table(rows, device))
    if args.profile:
        print("\nwhere the time goes (share of profiled self time; GEMM = the weight matmuls alone)\n")
        print(profile_table(rows))
    print("\n" + "\n".join(target_lines(rows, device)))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"device": device, "device_name": name, "torch": torch.__version__, "threads": threads,
            "cpu_count": os.cpu_count(), "python": platform.python_version(), "wall_s": wall, "load_average": load,
            "knobs": {"warmup": WARMUP, "min_iters": MIN_ITERS[device], "min_seconds": MIN_SECONDS[device],
                      "max_iters": MAX_ITERS[device], "peak_n": PEAK_N[device], "peak_repeats": PEAK_REPEATS[device],
                      "seed": SEED, "target": TARGET, "gpu_target": GPU_TARGET, "compile": args.compile}}
    out.write_text(json.dumps({"meta": meta, "results": rows}, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
