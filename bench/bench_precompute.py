"""Precompute throughput: ``clipcond precompute`` against the naive loop of the diffusers training scripts.

The naive loop is diffusers' ``examples/text_to_image/train_text_to_image_sdxl.py`` ``encode_prompt``
(SDXL; SD 1.x/2.x: ``text_encoder(ids)[0]`` as ``train_text_to_image.py``): transformers'
``CLIPTokenizer`` and ``CLIPTextModel(WithProjection)(..., output_hidden_states=True)`` batch by
batch, each batch's tensors moved to the CPU and saved (``torch.save``). Both run on the same
weights, device, dtype, batch size and captions, in one run; the table prints naive / clipcond.
clipcond's time includes reading the input, dedup, the index, checksums and fsynced atomic writes.

Besides time, both sides get a "device busy" share: clipcond's from the pipeline's own accounting
(``PipelineStats``: the encoder loop's waits on the tokenizer and writer thread during which the
device had no queued work), the naive loop's as its forward time over its loop time (it tokenizes
and saves in between, with the device idle).

    python bench/bench_precompute.py                          # CPU, tiny random towers, float32
    python bench/bench_precompute.py --device cuda --dtype float16 --size real --batch-size 256
    python bench/bench_precompute.py --weights /models/stable-diffusion-xl-base-1.0 --device cuda

``--size real`` saves random towers at the real sizes (CLIP ViT-L + bigG for sdxl: 1.6 GB in
float16) in the diffusers layout; ``--weights`` takes a real diffusers pipeline folder instead.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

ENCODER = "sdxl"  # the semantics (layers, pooled, null): "sdxl", "sd15" or "sd2"
WEIGHTS: str | None = None  # a diffusers pipeline folder; None: random towers (SIZE)
SIZE = "tiny"  # random towers of tiny-<ENCODER> ("tiny") or of <ENCODER> itself ("real")
N_CAPTIONS = 10_000  # the issue: 10k varied captions
# Rows repeating an earlier caption (web caption sets repeat): clipcond encodes them once, the naive loop again.
DUPLICATE_FRACTION = 0.3
BATCH_SIZE = 64
DEVICE = "cpu"  # "cuda" for a GPU
DTYPE = "float32"  # float16 on a GPU
COMPILE: str | None = None  # tc.compile(mode=COMPILE) for clipcond
SHARD_SIZE: int | None = None  # None: clipcond's default (about 256 MiB a shard)
SEED = 0
REPEATS = 3  # alternating runs of each; the table shows medians
# torch intra-op threads. 1 by default: on a shared CPU, OpenMP threads spin-waiting for a busy core slow
# a plain batch loop 10x or more (OMP_WAIT_POLICY=PASSIVE avoids it), which is not what this measures.
# 0 (torch's default) on a quiet machine or a GPU.
THREADS = 1
JSON_PATH = Path(__file__).parent / "results" / "precompute.json"

WORDS = ("a photo of the cat dog running astronaut horse mars portrait oil painting by greg rutkowski trending "
         "on artstation highly detailed 4k 8k hdr masterpiece best quality street city night rain neon forest "
         "river mountain sunset beach woman man child old young red blue green golden light shadow").split()


def captions(n: int, duplicates: float) -> list[str]:
    rng = random.Random(SEED)
    rows = [" ".join(rng.choices(WORDS, k=rng.randint(5, 40))) + f" {i}" for i in range(n)]
    for i in range(1, n):
        if rng.random() < duplicates:
            rows[i] = rows[rng.randrange(i)]
    return rows


def random_pipeline(root: Path, encoder: str, dtype: torch.dtype) -> Path:
    """A diffusers-layout folder of random transformers towers with ``encoder``'s sizes and SD tokenizers."""
    from bench_encode import diffusers_dropped
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    import clipcond
    from clipcond.text.tokenizer import write_hf_tokenizer

    spec = clipcond.get_spec(encoder)
    for i, tower in enumerate(spec.towers):
        config = CLIPTextConfig(
            vocab_size=tower.vocab_size, hidden_size=tower.width, intermediate_size=tower.mlp_width,
            num_hidden_layers=tower.layers - diffusers_dropped(tower), num_attention_heads=tower.heads,
            hidden_act=tower.activation, projection_dim=tower.projection_dim or tower.width)
        torch.manual_seed(SEED + i)
        model = (CLIPTextModelWithProjection if tower.pooled == "projected" else CLIPTextModel)._from_config(
            config, dtype=dtype)
        model.save_pretrained(root / tower.hub_subfolder)
        # As the SD repos: SD 1.x pads with <|endoftext|>, SD 2.x and SDXL's second tokenizer with "!" (id 0).
        write_hf_tokenizer(root / tower.hub_subfolder.replace("text_encoder", "tokenizer"),
                           pad_token="<|endoftext|>" if tower.pad_id == 49407 else "!")
    return root


def naive(folder: Path, rows: list[str], out: Path, a: argparse.Namespace) -> dict[str, float]:
    """The diffusers training scripts' loop: tokenize, encode with hidden states, save each batch."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    dtype = getattr(torch, a.dtype)
    subs = [s for s in ("text_encoder", "text_encoder_2") if (folder / s).is_dir()]
    encoders = [(CLIPTextModelWithProjection if s.endswith("_2") else CLIPTextModel).from_pretrained(folder / s)
                .to(a.device, dtype).eval().requires_grad_(False) for s in subs]
    tokenizers = [CLIPTokenizer.from_pretrained(folder / s.replace("text_encoder", "tokenizer")) for s in subs]
    out.mkdir()
    forward = 0.0  # tokenizer calls and saving happen between forwards, with the device idle
    start = time.perf_counter()
    with torch.no_grad():
        for b, i in enumerate(range(0, len(rows), a.batch_size)):
            batch, sequences, pooled = rows[i : i + a.batch_size], [], None
            ids = [tokenizer(batch, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                             return_tensors="pt").input_ids for tokenizer in tokenizers]
            t0 = time.perf_counter()
            for tower_ids, encoder in zip(ids, encoders, strict=True):
                output = encoder(tower_ids.to(a.device), output_hidden_states=True, return_dict=False)
                pooled = output[0] if len(subs) == 2 else output[1]  # SDXL: text_embeds; SD1/2: pooler_output
                sequences.append(output[-1][-2] if len(subs) == 2 else output[0])  # SDXL: penultimate, no LN
            embeds = {"prompt_embeds": torch.cat(sequences, dim=-1).cpu(), "pooled_prompt_embeds": pooled.cpu()}
            forward += time.perf_counter() - t0  # .cpu() waits for the device: its time is in here
            torch.save(embeds, out / f"batch-{b:06d}.pt")
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "busy": forward / seconds}


class _Stats(logging.Handler):
    """Keeps the ``PipelineStats`` that precompute logs."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.stats: list[object] = []

    def emit(self, record: logging.LogRecord) -> None:
        if hasattr(record, "pipeline_stats"):
            self.stats.append(record.pipeline_stats)


def clipcond_run(tc: object, input_path: Path, out: Path, a: argparse.Namespace) -> dict[str, float]:
    from clipcond.precompute.job import PrecomputeJob, precompute

    job = PrecomputeJob(input=input_path, out=out, batch_size=a.batch_size, shard_size=SHARD_SIZE, progress=False)
    handler, log = _Stats(), logging.getLogger("clipcond.precompute.job")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        start = time.perf_counter()
        precompute(tc, job)
        seconds = time.perf_counter() - start
    finally:
        log.removeHandler(handler)
    [stats] = handler.stats
    return {"seconds": seconds, "busy": stats.busy, "loop_s": stats.seconds, "idle_s": stats.device_idle,
            "waiting_tokens_s": stats.waiting_tokens, "waiting_writer_s": stats.waiting_writer}


def disk(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir())


def check_equal(store_dir: Path, naive_dir: Path, rows: list[str], batch_size: int) -> float:
    """Largest |difference| between the store and the naive loop on the first batch (they must agree)."""
    from clipcond import EmbeddingStore

    store, ref = EmbeddingStore(store_dir), torch.load(naive_dir / "batch-000000.pt")
    n = min(batch_size, len(rows))
    sequence = torch.stack([store[i]["sequence"] for i in range(n)]).float()
    pooled = torch.stack([store[i]["pooled"] for i in range(n)]).float()
    return max((sequence - ref["prompt_embeds"].float()).abs().max().item(),
               (pooled - ref["pooled_prompt_embeds"].float()).abs().max().item())


def measure(root: Path, a: argparse.Namespace) -> dict:
    import clipcond

    rows = captions(a.captions, a.duplicates)
    dtype = getattr(torch, a.dtype)
    encoder = a.encoder if a.size == "real" or a.weights else f"tiny-{a.encoder}"
    folder = Path(a.weights) if a.weights else random_pipeline(root / "pipeline", encoder, dtype)
    input_path = root / "captions.txt"
    input_path.write_text("".join(r + "\n" for r in rows))
    tc = clipcond.TextConditioner.from_pretrained(a.encoder, weights=folder, device=a.device, dtype=dtype)
    if a.compile:
        tc.compile(mode=a.compile)
    tc(rows[: a.batch_size])  # warm-up, both sides (compilation included)
    tc(rows[: len(set(rows)) % a.batch_size or a.batch_size])  # precompute's last, short batch
    naive(folder, rows[: a.batch_size], root / "warm", a)
    runs: dict[str, list[dict[str, float]]] = {"naive": [], "clipcond": []}
    for _ in range(a.repeats):  # alternating, so that a busy neighbour slows both alike
        for folder_name in ("naive", "store"):
            shutil.rmtree(root / folder_name, ignore_errors=True)
        runs["naive"].append(naive(folder, rows, root / "naive", a))
        runs["clipcond"].append(clipcond_run(tc, input_path, root / "store", a))
    manifest = json.loads((root / "store" / "manifest.json").read_text())
    median = {side: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for side, rs in runs.items()}
    return {"encoder": encoder, "weights": a.weights or f"random {encoder}", "device": a.device, "dtype": a.dtype,
            "compile": a.compile, "threads": torch.get_num_threads(), "batch_size": a.batch_size, "rows": len(rows),
            "unique": manifest["unique"], "runs": runs, "naive": median["naive"], "clipcond": median["clipcond"],
            "speedup": median["naive"]["seconds"] / median["clipcond"]["seconds"],
            "naive_bytes": disk(root / "naive"), "clipcond_bytes": disk(root / "store"),
            "max_abs_diff": check_equal(root / "store", root / "naive", rows, a.batch_size)}


def print_table(r: dict, repeats: int) -> None:
    n, c = r["naive"], r["clipcond"]
    print(f"{r['encoder']} ({r['weights']}), {r['device']} {r['dtype']}"
          f"{', compiled (' + r['compile'] + ')' if r['compile'] else ''}, {r['threads']} threads, batch "
          f"{r['batch_size']}, {r['rows']} captions ({r['unique']} unique), median of {repeats}; "
          f"max |store - naive| {r['max_abs_diff']:.1e}\n")
    print("| | naive diffusers loop | clipcond precompute | naive / clipcond |\n|---|---:|---:|---:|")
    print(f"| time (s) | {n['seconds']:.2f} | {c['seconds']:.2f} | {r['speedup']:.2f}x |")
    print(f"| captions/s | {r['rows'] / n['seconds']:.0f} | {r['rows'] / c['seconds']:.0f} | |")
    print(f"| embeddings encoded | {r['rows']} | {r['unique']} | |")
    print(f"| device busy in the encode loop | {n['busy']:.1%} | {c['busy']:.1%} | |")
    print(f"| disk (MB) | {r['naive_bytes'] / 1e6:.1f} | {r['clipcond_bytes'] / 1e6:.1f} | "
          f"{r['naive_bytes'] / r['clipcond_bytes']:.2f}x |")
    print(f"\nclipcond's encode loop: {c['loop_s']:.2f} s of {c['seconds']:.2f} s (the rest: reading the input, "
          f"dedup, index, manifest); device idle {c['idle_s']:.2f} s; waited {c['waiting_tokens_s']:.2f} s for "
          f"tokens, {c['waiting_writer_s']:.2f} s for the writer")


def main() -> None:
    from transformers.utils import logging as hf_logging

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--encoder", default=ENCODER, choices=("sdxl", "sd15", "sd2"))
    parser.add_argument("--weights", default=WEIGHTS, help="a diffusers pipeline folder (default: random towers)")
    parser.add_argument("--size", default=SIZE, choices=("tiny", "real"), help="random towers' size")
    parser.add_argument("--device", default=DEVICE)
    parser.add_argument("--dtype", default=DTYPE, choices=("float32", "float16", "bfloat16"))
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    parser.add_argument("--captions", type=int, default=N_CAPTIONS)
    parser.add_argument("--duplicates", type=float, default=DUPLICATE_FRACTION, help="share of repeated rows")
    parser.add_argument("--repeats", type=int, default=REPEATS)
    parser.add_argument("--threads", type=int, default=THREADS, help="torch threads (0: torch's default)")
    parser.add_argument("--compile", nargs="?", const="default", default=COMPILE, metavar="MODE")
    parser.add_argument("--out", type=Path, default=JSON_PATH)
    a = parser.parse_args()
    hf_logging.disable_progress_bar()  # one table, no loading bars
    if a.threads:
        torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        result = measure(Path(tmp), a)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1))
    print_table(result, a.repeats)
    print(f"\nwrote {a.out}")


if __name__ == "__main__":
    main()
