"""Precompute throughput: ``clipcond precompute`` against the naive loop of the diffusers training scripts.

The naive loop is diffusers' ``examples/text_to_image/train_text_to_image_sdxl.py`` ``encode_prompt``
(SDXL; SD 1.x/2.x: ``text_encoder(ids)[0]`` as ``train_text_to_image.py``): transformers'
``CLIPTokenizer`` and ``CLIPTextModel(WithProjection)(..., output_hidden_states=True)`` batch by
batch, each batch's tensors moved to the CPU and saved (``torch.save``). Both run on the same
weights, device, dtype, batch size and captions, in one run; the table prints naive / clipcond.
clipcond's time includes reading the input, dedup, the index, checksums and fsynced atomic writes.

    python bench/bench_precompute.py          # CPU, tiny random towers saved like tests/conftest.py

For real sizes set WEIGHTS to a diffusers pipeline folder (e.g. stable-diffusion-xl-base-1.0) and
ENCODER to its name; on a GPU set DEVICE and DTYPE.
"""

from __future__ import annotations

import json
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

ENCODER = "sdxl"  # the semantics (layers, pooled, null): "sdxl", "sd15" or "sd2"
WEIGHTS: str | None = None  # a diffusers pipeline folder; None: tiny random towers of tiny-<ENCODER>
N_CAPTIONS = 10_000  # the issue: 10k varied captions
# Rows repeating an earlier caption (web caption sets repeat): clipcond encodes them once, the naive loop again.
DUPLICATE_FRACTION = 0.3
BATCH_SIZE = 64
DEVICE = "cpu"  # "cuda" for a GPU
DTYPE = torch.float32  # torch.float16 on a GPU
SHARD_SIZE: int | None = None  # None: clipcond's default (about 256 MiB a shard)
SEED = 0
REPEATS = 3  # alternating runs of each; the table shows medians
# torch intra-op threads. 1 by default: on a shared CPU, OpenMP threads spin-waiting for a busy core slow
# a plain batch loop 10x or more (OMP_WAIT_POLICY=PASSIVE avoids it), which is not what this measures.
# None (torch's default) on a quiet machine or a GPU.
THREADS: int | None = 1
JSON_PATH = Path(__file__).parent / "results" / "precompute.json"

WORDS = ("a photo of the cat dog running astronaut horse mars portrait oil painting by greg rutkowski trending "
         "on artstation highly detailed 4k 8k hdr masterpiece best quality street city night rain neon forest "
         "river mountain sunset beach woman man child old young red blue green golden light shadow").split()


def captions() -> list[str]:
    rng = random.Random(SEED)
    rows = [" ".join(rng.choices(WORDS, k=rng.randint(5, 40))) + f" {i}" for i in range(N_CAPTIONS)]
    for i in range(1, N_CAPTIONS):
        if rng.random() < DUPLICATE_FRACTION:
            rows[i] = rows[rng.randrange(i)]
    return rows


def tiny_pipeline(root: Path) -> Path:
    """A diffusers-layout folder of random transformers towers with tiny-<ENCODER> sizes and SD tokenizers."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    import clipcond
    from clipcond.tokenizer import write_hf_tokenizer

    spec = clipcond.get_spec(f"tiny-{ENCODER}")
    for i, tower in enumerate(spec.towers):
        config = CLIPTextConfig(
            vocab_size=tower.vocab_size, hidden_size=tower.width, intermediate_size=tower.mlp_width,
            num_hidden_layers=tower.layers - tower.hf_dropped_layers, num_attention_heads=tower.heads,
            hidden_act=tower.activation, projection_dim=tower.projection_dim or tower.width)
        torch.manual_seed(SEED + i)
        model = (CLIPTextModelWithProjection if tower.pooled == "projected" else CLIPTextModel)(config)
        model.save_pretrained(root / tower.hub_subfolder)
        # As the SD repos: SD 1.x pads with <|endoftext|>, SD 2.x and SDXL's second tokenizer with "!" (id 0).
        write_hf_tokenizer(root / tower.hub_subfolder.replace("text_encoder", "tokenizer"),
                           pad_token="<|endoftext|>" if tower.pad_id == 49407 else "!")
    return root


def naive(folder: Path, rows: list[str], out: Path) -> float:
    """The diffusers training scripts' loop: tokenize, encode with hidden states, save each batch."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    subs = [s for s in ("text_encoder", "text_encoder_2") if (folder / s).is_dir()]
    encoders = [(CLIPTextModelWithProjection if s.endswith("_2") else CLIPTextModel).from_pretrained(folder / s)
                .to(DEVICE, DTYPE).eval().requires_grad_(False) for s in subs]
    tokenizers = [CLIPTokenizer.from_pretrained(folder / s.replace("text_encoder", "tokenizer")) for s in subs]
    out.mkdir()
    start = time.perf_counter()
    with torch.no_grad():
        for b, i in enumerate(range(0, len(rows), BATCH_SIZE)):
            batch, sequences, pooled = rows[i : i + BATCH_SIZE], [], None
            for tokenizer, encoder in zip(tokenizers, encoders, strict=True):
                ids = tokenizer(batch, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                                return_tensors="pt").input_ids
                output = encoder(ids.to(DEVICE), output_hidden_states=True, return_dict=False)
                pooled = output[0] if len(subs) == 2 else output[1]  # SDXL: text_embeds; SD1/2: pooler_output
                sequences.append(output[-1][-2] if len(subs) == 2 else output[0])  # SDXL: penultimate, no LN
            embeds = {"prompt_embeds": torch.cat(sequences, dim=-1).cpu(), "pooled_prompt_embeds": pooled.cpu()}
            torch.save(embeds, out / f"batch-{b:06d}.pt")
    return time.perf_counter() - start


def clipcond_run(tc: object, input_path: Path, out: Path) -> float:
    from clipcond.precompute import PrecomputeJob, precompute

    job = PrecomputeJob(input=input_path, out=out, batch_size=BATCH_SIZE, shard_size=SHARD_SIZE, progress=False)
    start = time.perf_counter()
    precompute(tc, job)
    return time.perf_counter() - start


def disk(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir())


def check_equal(store_dir: Path, naive_dir: Path, rows: list[str]) -> float:
    """Largest |difference| between the store and the naive loop on the first batch (they must agree)."""
    from clipcond import EmbeddingStore

    store, ref = EmbeddingStore(store_dir), torch.load(naive_dir / "batch-000000.pt")
    n = min(BATCH_SIZE, len(rows))
    sequence = torch.stack([store[i]["sequence"] for i in range(n)]).float()
    pooled = torch.stack([store[i]["pooled"] for i in range(n)]).float()
    return max((sequence - ref["prompt_embeds"].float()).abs().max().item(),
               (pooled - ref["pooled_prompt_embeds"].float()).abs().max().item())


def measure(root: Path) -> dict:
    import clipcond

    rows = captions()
    folder = Path(WEIGHTS) if WEIGHTS else tiny_pipeline(root / "pipeline")
    input_path = root / "captions.txt"
    input_path.write_text("".join(r + "\n" for r in rows))
    tc = clipcond.TextConditioner.from_pretrained(ENCODER, weights=folder, device=DEVICE, dtype=DTYPE)
    tc(rows[:BATCH_SIZE])  # warm-up, both sides
    naive(folder, rows[:BATCH_SIZE], root / "warm")
    times: dict[str, list[float]] = {"naive": [], "clipcond": []}
    for _ in range(REPEATS):  # alternating, so that a busy neighbour slows both alike
        for folder_name in ("naive", "store"):
            shutil.rmtree(root / folder_name, ignore_errors=True)
        times["naive"].append(naive(folder, rows, root / "naive"))
        times["clipcond"].append(clipcond_run(tc, input_path, root / "store"))
    manifest = json.loads((root / "store" / "manifest.json").read_text())
    t_naive, t_clip = statistics.median(times["naive"]), statistics.median(times["clipcond"])
    return {"encoder": ENCODER, "weights": WEIGHTS or f"tiny-{ENCODER} random", "device": DEVICE,
            "dtype": str(DTYPE).removeprefix("torch."), "threads": torch.get_num_threads(), "batch_size": BATCH_SIZE,
            "rows": len(rows), "unique": manifest["unique"], "times": times, "naive_s": t_naive, "clipcond_s": t_clip,
            "speedup": t_naive / t_clip, "naive_bytes": disk(root / "naive"), "clipcond_bytes": disk(root / "store"),
            "max_abs_diff": check_equal(root / "store", root / "naive", rows)}


def print_table(r: dict) -> None:
    print(f"{r['encoder']} ({r['weights']}), {r['device']} {r['dtype']}, {r['threads']} threads, batch "
          f"{r['batch_size']}, {r['rows']} captions ({r['unique']} unique), median of {REPEATS}; "
          f"max |store - naive| {r['max_abs_diff']:.1e}\n")
    print("| | naive diffusers loop | clipcond precompute | naive / clipcond |\n|---|---:|---:|---:|")
    print(f"| time (s) | {r['naive_s']:.2f} | {r['clipcond_s']:.2f} | {r['speedup']:.2f}x |")
    print(f"| captions/s | {r['rows'] / r['naive_s']:.0f} | {r['rows'] / r['clipcond_s']:.0f} | |")
    print(f"| embeddings encoded | {r['rows']} | {r['unique']} | |")
    print(f"| disk (MB) | {r['naive_bytes'] / 1e6:.1f} | {r['clipcond_bytes'] / 1e6:.1f} | "
          f"{r['naive_bytes'] / r['clipcond_bytes']:.2f}x |")


def main() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one table, no loading bars
    if THREADS is not None:
        torch.set_num_threads(THREADS)
    with tempfile.TemporaryDirectory() as tmp:
        result = measure(Path(tmp))
    JSON_PATH.parent.mkdir(parents=True, exist_ok=True)
    JSON_PATH.write_text(json.dumps(result, indent=1))
    print_table(result)
    print(f"\nwrote {JSON_PATH}")


if __name__ == "__main__":
    main()
