"""T5 rows at dataset scale: PixArt-Sigma precompute against diffusers' ``encode_prompt``, bytes a row, and reads.

``precompute``: one random T5 v1.1 encoder (``T5_SIZE``, the real vocabulary and relative-attention table: only the
widths are smaller) saved as a diffusers PixArt-Sigma folder (text_encoder/, tokenizer/ with the real T5 tokenizer,
tests/t5_fixtures.py ``t5_vocabulary()``), loaded by ``TextConditioner.from_pretrained("pixart-sigma",
weights=folder)`` and by ``PixArtSigmaPipeline`` (the same ``T5EncoderModel`` and ``T5TokenizerFast``). The same
``--captions`` distinct LAION-like captions (``captions()``: T5 token counts mostly 10-40, ~5 % from 40 to 120) are
(a) ``precompute()``d from a .jsonl into a fresh store (scan, length-ordered plan, tokenizer and writer threads,
trimmed shards, index and manifest, fsyncs: all timed), and (b) encoded by diffusers' ``encode_prompt(batch,
do_classifier_free_guidance=False, max_sequence_length=300)`` in batches of the same size under ``torch.no_grad()``
(encode only, nothing written), float32 both. The order is clipcond, diffusers, clipcond (fresh stores); the ratio
is diffusers' seconds over the mean of clipcond's two. Target: clipcond >= 5x diffusers' captions/s. The store's rows
(``store[i]``: padded [300, D] and mask) of the shortest, median and longest captions and row 0 are compared with
diffusers' ``prompt_embeds`` where its mask is 1 (and the masks must be equal).

``bytes``: (a) the precompute store's shard bytes a row against the padded [300, D] row; its share does not depend
on D or the dtype but for the 16 bytes a row of ``lengths`` and ``check`` and the shard headers, and the same
lengths written at the real size (D 4096, float16) by ``ShardWriter`` show it. Target <= 15 %. (b) SD3 at the real
size: ``ShardWriter`` with ``RowLayout.of(get_spec("sd3"))`` (CLIP [77, 2048] and T5 [256, 4096] parts, pooled
2048), float16, ``SHAPE_ROWS`` rows, against the padded [333, 4096] + 2048 row (2.60 MiB). Target <= 2.32 MiB.
(c) Flux-dev, for context: [512, 4096] + 768 kept whole (its transformer attends to the T5 padding rows).

``loader``: reading T5-size rows in training. A PixArt-Sigma store of real width (D 4096, float16) written by the
real ``precompute()`` over ``--loader-rows`` LAION-like captions with the real tokenizer, its lengths those of the
real masks, with a free encoder (``encode_tokens`` hands back random rows of the batch's longest length, as
bench_pipeline.py's ``free_conditioner``): the rows' values do not matter to a read. The store (rows checked, and
``verify_rows=False``) against one ``.safetensors`` per sample holding only the caption's kept rows [len, 4096] (a
collate padding to the batch's longest, with its mask, in shared memory as ``default_collate`` does: the best a
per-sample cache can do) and one holding the padded [300, 4096] row and mask (kohya-like caches, default collate);
the floor of any worker-side fetch (a fresh shared segment of the batch's size a batch, nothing copied, as
bench_store.py's ``joined``); ``JoinedLoader`` (the workers' batches in shared memory they reuse); and the store
and the kept-rows files read in the main process (workers 0).
DataLoader batch 16, 2 persistent workers, warm (an epoch of each first), ``--passes`` epochs of each, alternating,
each epoch a new shuffle (the same for every way); medians. Target: the store >= 2x the best per-sample format, both
with 2 workers.

    python bench/bench_t5_store.py                                # all sections, ~4 min on 2 cores
    python bench/bench_t5_store.py --quick                        # 256 captions and rows, 3 passes: ~1 min
    python bench/bench_t5_store.py --sections bytes loader --dir /data/scratch
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

if TYPE_CHECKING:
    from diffusers import PixArtSigmaPipeline

    from clipcond import EmbeddingStore, TextConditioner
    from clipcond.conditioning import Conditioning
    from clipcond.store.layout import RowLayout
    from clipcond.text.tokenizer import Tokens

sys.path.insert(0, str(Path(__file__).parent))  # bench_tokenizer's caption words
sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))  # t5_fixtures.t5_vocabulary

# --- knobs ---------------------------------------------------------------------------------
SECTIONS = ("precompute", "bytes", "loader")
T5_SIZE = {"d_model": 512, "num_layers": 6, "num_heads": 8, "d_kv": 64, "d_ff": 1024}  # gated-gelu, vocab 32128
LENGTH = 300  # PixArt-Sigma's max_sequence_length
CAPTIONS = 1024  # diffusers encodes each at 300 tokens: ~4.5 s a batch of 32 on one core here
BATCH = 32  # precompute's batch_size and diffusers' batch
# torch intra-op threads, both sides. 1 as bench_precompute.py: on a shared CPU, OpenMP threads spin-waiting for a
# busy core slow a batch loop many times over (the pipeline's tokenizer and writer threads are such neighbours).
THREADS = 1
# T5 tokens a caption aimed at: lognormal (MEDIAN_TOKENS, SIGMA), a TAIL share uniform in 40-120; whole tags and
# clauses overshoot the aim a little: median ~22, mean ~26, 90 % within 10-40
MEDIAN_TOKENS, SIGMA, TAIL = 17, 0.4, 0.05
SHAPE_ROWS = 8  # rows of the SD3 and Flux shards
LOADER_ROWS = 1024  # ~200 kB a stored row, 2.5 MB a padded one
LOADER_BATCH = 16
LOADER_WORKERS = 2
PASSES = 5  # epochs of each way after a warm one, alternating
SPEED_TARGET, SHARE_TARGET, SD3_TARGET_MIB, LOADER_TARGET = 5.0, 0.15, 2.32, 2.0
SEED = 0
OUT = Path(__file__).parent / "results" / "t5_store.json"
MIB = 2**20


def load_average() -> float:
    return os.getloadavg()[0]


# --- captions and the encoder --------------------------------------------------------------
def captions(n: int, count: Callable[[str], int], seed: int = SEED) -> list[str]:
    """``n`` distinct captions whose T5 token counts (``count``, the EOS included) follow LAION's: a target drawn
    from a lognormal around ``MEDIAN_TOKENS`` (6-60), or for a ``TAIL`` share uniform in 40-120; a sentence, then
    tags or more clauses until the caption reaches its target."""
    from bench_tokenizer import ACTIONS, PLACES, SUBJECTS, TAGS

    rng = random.Random(seed)
    out: list[str] = []
    seen: set[str] = set()
    while len(out) < n:
        if rng.random() < TAIL:
            target = rng.randint(40, 120)
        else:
            target = min(60, max(6, round(rng.lognormvariate(math.log(MEDIAN_TOKENS), SIGMA))))
        text = f"{rng.choice(SUBJECTS)} {rng.choice(ACTIONS)} {rng.choice(PLACES)}"
        while count(text) < target:
            text += (f", {rng.choice(TAGS)}" if rng.random() < 0.7 else
                     f" and {rng.choice(SUBJECTS)} {rng.choice(ACTIONS)} {rng.choice(PLACES)}")
        if text not in seen:
            seen.add(text)
            out.append(text)
    return out


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"caption": t}) + "\n" for t in texts))
    return path


def write_pipeline(root: Path, tokenizer: Path) -> Path:
    """A PixArt-Sigma pipeline folder: a random float32 T5 encoder of ``T5_SIZE`` and the real T5 tokenizer."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(SEED)
    t5 = T5EncoderModel(T5Config(vocab_size=32128, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
                                 use_cache=False, pad_token_id=0, eos_token_id=1, **T5_SIZE)).eval()
    with torch.no_grad():  # a final RMSNorm gain near 0.2 as tests/t5_fixtures.py: outputs ~1, as a real T5's
        t5.encoder.final_layer_norm.weight.mul_(0.2)
    folder = root / "pixart"
    t5.save_pretrained(folder / "text_encoder")
    shutil.copytree(tokenizer, folder / "tokenizer")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "PixArtSigmaPipeline",
                                                         "_diffusers_version": "0.42.1"}))
    return folder


def diffusers_pipeline(folder: Path) -> PixArtSigmaPipeline:
    from diffusers import PixArtSigmaPipeline
    from transformers import T5EncoderModel, T5TokenizerFast

    return PixArtSigmaPipeline(tokenizer=T5TokenizerFast.from_pretrained(folder / "tokenizer"),
                               text_encoder=T5EncoderModel.from_pretrained(folder / "text_encoder").eval(),
                               vae=None, transformer=None, scheduler=None)


def store_lengths(store: Path) -> list[list[int]]:
    """Each shard's ``lengths`` (rows kept per slot, in slot order), read with the safetensors library."""
    from safetensors import safe_open

    out = []
    for entry in json.loads((store / "manifest.json").read_text())["shards"]:
        with safe_open(store / entry["file"], "pt") as f:
            out.append(f.get_tensor("lengths").tolist())
    return out


# --- precompute ----------------------------------------------------------------------------
def run_precompute(tc: TextConditioner, jsonl: Path, out: Path, batch: int) -> float:
    from clipcond.precompute.job import PrecomputeJob, precompute

    start = time.perf_counter()
    precompute(tc, PrecomputeJob(input=jsonl, out=out, batch_size=batch, progress=False))
    return time.perf_counter() - start


def precompute_section(a: argparse.Namespace, folder: Path, texts: list[str], root: Path) -> dict:
    """clipcond's precompute, diffusers' encode loop, clipcond's again; the rows compared."""
    import clipcond
    from clipcond import EmbeddingStore

    tc = clipcond.TextConditioner.from_pretrained("pixart-sigma", weights=folder)
    pipe = diffusers_pipeline(folder)
    encode = torch.no_grad()(lambda batch: pipe.encode_prompt(batch, do_classifier_free_guidance=False, device="cpu",
                                                              max_sequence_length=LENGTH, clean_caption=False))
    kept = tc.kept_lengths(tc.tokenize(texts)).tolist()  # T5 rows each caption's mask keeps (its EOS included)
    by_length = sorted(range(len(texts)), key=kept.__getitem__)
    check = sorted({0, by_length[0], by_length[len(texts) // 2], by_length[-1]})
    tc(texts[: a.batch])  # first-call costs (oneDNN, allocator) of both sides, untimed
    encode(texts[: a.batch])
    jsonl = write_jsonl(root / "captions.jsonl", texts)
    load = [load_average()]
    ours = [run_precompute(tc, jsonl, root / "store", a.batch)]
    start, reference = time.perf_counter(), {}
    for first in range(0, len(texts), a.batch):
        embeds, mask, *_ = encode(texts[first : first + a.batch])  # [b, 300, D], [b, 300]
        reference.update({i: (embeds[i - first].clone(), mask[i - first].clone())
                          for i in check if first <= i < first + a.batch})
    theirs = time.perf_counter() - start
    ours.append(run_precompute(tc, jsonl, root / "store-again", a.batch))
    shutil.rmtree(root / "store-again")
    load.append(load_average())
    store = EmbeddingStore(root / "store")
    agree = []
    for i in check:
        embeds, mask = reference[i]
        item = store[i]
        keep = mask.bool()
        agree.append({"row": i, "kept": int(keep.sum()), "mask_equal": torch.equal(item["mask"].bool(), keep),
                      "max_abs_err": float((item["sequence"][keep] - embeds[keep]).abs().max())})
    run = [max(chunk[b : b + a.batch]) for chunk in store_lengths(root / "store")
           for b in range(0, len(chunk), a.batch) for _ in chunk[b : b + a.batch]]  # each caption's batch's longest
    return {"store": str(root / "store"), "captions": len(texts), "batch": a.batch, "clipcond_s": ours,
            "diffusers_s": theirs, "ratio": theirs / statistics.mean(ours), "ratios": [theirs / s for s in ours],
            "kept": kept, "t5_rows_run_mean": statistics.mean(run), "agree": agree, "load": load}


def token_summary(kept: list[int]) -> str:
    q = statistics.quantiles(kept, n=10)
    within = sum(10 <= k <= 40 for k in kept) / len(kept)
    return (f"T5 tokens a caption (EOS included): mean {statistics.mean(kept):.1f}, p10 {q[0]:.0f}, median "
            f"{statistics.median(kept):.0f}, p90 {q[-1]:.0f}, max {max(kept)}; {within:.0%} within 10-40, "
            f"{sum(k > 40 for k in kept) / len(kept):.1%} over 40")


def precompute_table(r: dict) -> str:
    n, ours = r["captions"], statistics.mean(r["clipcond_s"])
    lines = ["| side | what is timed | T5 positions run a caption | seconds | captions/s | × diffusers |",
             "|---|---|---:|---:|---:|---:|",
             f"| clipcond `precompute()` | scan, plan, tokenize, encode, write trimmed shards, index, manifest, fsync "
             f"| {r['t5_rows_run_mean']:.1f} | {ours:.1f} ({', '.join(f'{s:.1f}' for s in r['clipcond_s'])}) "
             f"| {n / ours:.1f} | **{r['ratio']:.2f}** ({min(r['ratios']):.2f}-{max(r['ratios']):.2f}) |",
             f"| diffusers `encode_prompt` loop | tokenize, encode (nothing written) | {LENGTH} "
             f"| {r['diffusers_s']:.1f} | {n / r['diffusers_s']:.1f} | 1.00 |"]
    return "\n".join(lines)


# --- bytes ---------------------------------------------------------------------------------
def write_shard(folder: Path, layout: RowLayout, pooled_dim: int, n: int, lengths: list[int] | None = None) -> int:
    """One published shard of ``n`` random float16 rows of ``layout`` (a masked layout's rows cut to ``lengths``),
    written by ``ShardWriter`` in batches of ``BATCH``; its bytes."""
    from clipcond.store.format import ShardWriter

    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(SEED)
    writer = ShardWriter(folder, 0, n, torch.float16, layout, pooled_dim, {"start": 0, "stop": n}, lengths)
    try:
        for first in range(0, n, BATCH):
            b = min(BATCH, n - first)
            if lengths is None:
                parts = [torch.randn(b, p.length, p.width, generator=g).half() for p in layout.parts]
            else:  # [b, L_b, D]: the batch's longest; rows past each one's length are not stored
                parts = [torch.randn(b, max(lengths[first : first + b]), layout.width, generator=g).half()]
            writer.add(parts, torch.randn(b, pooled_dim, generator=g).half())
        entry = writer.close()
    except BaseException:
        writer.abort()
        raise
    writer.publish()
    return entry.bytes


def bytes_section(store: Path, root: Path) -> list[dict]:
    """Stored bytes a row against the padded row: the precompute store, its lengths at real size, SD3, Flux."""
    import clipcond
    from clipcond.store.layout import RowLayout

    manifest = json.loads((store / "manifest.json").read_text())
    lengths = [k for chunk in store_lengths(store) for k in chunk]  # slot order
    n, (length, width) = len(lengths), manifest["sequence_shape"]
    itemsize = getattr(torch, manifest["dtype"]).itemsize
    shards = sum(e["bytes"] for e in manifest["shards"])
    mean_kept = statistics.mean(lengths)
    rows = [{"name": f"PixArt-Sigma, this run's store ({manifest['dtype']}, D {width})", "rows": n,
             "stored": f"[{mean_kept:.1f} (mean), {width}] + lengths, check", "bytes": shards / n,
             "padded": length * width * itemsize, "padded_shape": f"[{length}, {width}]", "target": SHARE_TARGET}]
    pixart = clipcond.get_spec("pixart-sigma")
    real = write_shard(root / "pixart-real", RowLayout.of(pixart), 0, n, lengths)
    rows.append({"name": "PixArt-Sigma real size, the same lengths (float16, D 4096)", "rows": n,
                 "stored": f"[{mean_kept:.1f} (mean), 4096] + lengths, check", "bytes": real / n,
                 "padded": LENGTH * pixart.sequence_dim * 2, "padded_shape": f"[{LENGTH}, 4096]",
                 "target": SHARE_TARGET})
    for name, spec, target in (("SD3 real size (float16)", "sd3", SD3_TARGET_MIB),
                               ("Flux-dev real size (float16), kept whole", "flux", None)):
        spec = clipcond.get_spec(spec)
        layout = RowLayout.of(spec)
        size = write_shard(root / spec.name, layout, spec.pooled_dim, SHAPE_ROWS)
        parts = " + ".join(f"{p.name} [{p.length}, {p.width}]" for p in layout.parts)
        rows.append({"name": name, "rows": SHAPE_ROWS, "stored": f"{parts} + pooled {spec.pooled_dim}, check",
                     "bytes": size / SHAPE_ROWS, "padded": (layout.length * layout.width + spec.pooled_dim) * 2,
                     "padded_shape": f"[{layout.length}, {layout.width}] + {spec.pooled_dim}", "target_mib": target})
    return rows


def bytes_table(rows: list[dict]) -> str:
    lines = ["| rows of | shard rows | a row as stored | stored bytes a row | padded row | padded bytes | share |",
             "|---|---:|---|---:|---|---:|---:|"]
    for r in rows:
        size = f"{r['bytes'] / MIB:.3f} MiB" if r["bytes"] > MIB else f"{r['bytes'] / 1e3:,.1f} kB"
        padded = f"{r['padded'] / MIB:.3f} MiB" if r["padded"] > MIB else f"{r['padded'] / 1e3:,.1f} kB"
        lines.append(f"| {r['name']} | {r['rows']} | {r['stored']} | {size} | {r['padded_shape']} | {padded} "
                     f"| **{r['bytes'] / r['padded']:.1%}** |")
    return "\n".join(lines)


# --- loader --------------------------------------------------------------------------------
def free_conditioner(folder: Path, batch: int) -> TextConditioner:
    """PixArt-Sigma with its real tokenizer and output size (D 4096, float16) whose encoder is free: each batch is
    random rows of its longest kept length, assembled and masked by the recipe's own ``assemble``."""
    import clipcond
    from clipcond.encoders.recipes import assemble
    from clipcond.text.t5_tokens import token_mask

    tc = clipcond.TextConditioner.from_pretrained("pixart-sigma", weights=folder, dtype=torch.float16)
    tc.spec = clipcond.get_spec("pixart-sigma")  # the real width in the manifest, the layout and the null
    ready = torch.randn(batch, LENGTH, tc.spec.sequence_dim, generator=torch.Generator().manual_seed(SEED)).half()

    def encode_tokens(tokens: list[Tokens]) -> Conditioning:
        t5 = tokens[-1]
        length = int(t5.eos.max()) + 1
        return assemble(tc.spec, [], ready[: len(t5.ids), :length], token_mask(t5)[:, :length])

    tc.encode_tokens = encode_tokens
    return tc


class PerSample(Dataset):
    """One ``.safetensors`` per sample, read whole (``safetensors.torch.load_file``)."""

    def __init__(self, files: list[Path]) -> None:
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return load_file(self.files[i])


def pad_collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Kept rows [len, D] each -> ``sequence`` [B, L', D] (L' the batch's longest, zeros after each row) and
    ``mask`` [B, L']; in a worker the sequence goes straight into shared memory, as ``default_collate`` stacks."""
    kept = [item["sequence"] for item in items]
    lengths = torch.tensor([len(k) for k in kept])
    shape = (len(kept), int(lengths.max()), kept[0].shape[1])
    sequence = torch.empty(0, dtype=kept[0].dtype)
    if get_worker_info() is not None:
        sequence = sequence.new(sequence.untyped_storage()._new_shared(math.prod(shape) * sequence.itemsize))
    sequence = sequence.resize_(shape)
    for row, k in zip(sequence, kept, strict=True):
        row[: len(k)] = k
        row[len(k) :].zero_()
    return {"sequence": sequence, "mask": (torch.arange(shape[1]) < lengths[:, None]).long()}


class Floor(Dataset):
    """The floor of any worker-side fetch: each batch only a fresh shared-memory segment of the store's batch size
    ([B, L', D] float16, L' the batch's longest kept length), its pages given, nothing copied into it."""

    def __init__(self, kept: list[int], width: int) -> None:
        self.kept, self.width = kept, width

    def __len__(self) -> int:
        return len(self.kept)

    def __getitems__(self, rows: list[int]) -> dict[str, torch.Tensor]:
        from clipcond.store.checksums import populate

        length = max(self.kept[r] for r in rows)
        size = len(rows) * length * self.width * torch.float16.itemsize
        buffer = torch.empty(0, dtype=torch.uint8).new(torch.UntypedStorage._new_shared(size))
        populate(buffer.numpy())
        return {"sequence": buffer.view(torch.float16).view(len(rows), length, self.width)}


def write_per_sample(store: EmbeddingStore, root: Path) -> tuple[dict[str, list[Path]], list[int]]:
    """Each store row as the per-sample caches hold it: its kept rows only, and the padded row with its mask; and
    each row's kept length, in row order."""
    from safetensors.torch import save_file

    files: dict[str, list[Path]] = {"kept": [], "padded": []}
    for kind in files:
        (root / kind).mkdir()
    lengths = []
    for i in range(len(store)):
        item = store[i]  # [300, D] and mask [300]
        k = int(item["mask"].sum())
        kept, padded = root / "kept" / f"{i:09d}.safetensors", root / "padded" / f"{i:09d}.safetensors"
        save_file({"sequence": item["sequence"][:k].contiguous()}, kept)
        save_file({"sequence": item["sequence"], "mask": item["mask"]}, padded)
        files["kept"].append(kept)
        files["padded"].append(padded)
        lengths.append(k)
    return files, lengths


STORE_WAY = "EmbeddingStore, store.collate()"
LOADER_WAY = "JoinedLoader (a reused shared segment a batch), store.collate()"


def loader_section(a: argparse.Namespace, folder: Path, texts: list[str], root: Path) -> dict:
    """rows/s of each way over the same shuffled epochs; the stored and per-sample bytes."""
    from clipcond import EmbeddingStore, JoinedLoader

    root.mkdir()
    run_precompute(free_conditioner(folder, a.batch), write_jsonl(root / "loader.jsonl", texts), root / "wide",
                   a.batch)
    store_dir = root / "wide"
    files, kept = write_per_sample(EmbeddingStore(store_dir), root)
    shards = sorted(store_dir.glob("shard-*.safetensors"))
    disk = {"store": sum(p.stat().st_size for p in shards) / len(texts), "floor": 0.0,
            **{kind: sum(p.stat().st_size for p in paths) / len(paths) for kind, paths in files.items()}}
    order = list(range(len(texts)))  # shuffled in place before each epoch: the samplers iterate this list

    def loader(dataset: Dataset, collate: Callable | None, workers: int) -> DataLoader:
        return DataLoader(dataset, batch_size=LOADER_BATCH, sampler=order, num_workers=workers, collate_fn=collate,
                          persistent_workers=workers > 0, prefetch_factor=4 if workers else None)

    checked, unchecked = EmbeddingStore(store_dir), EmbeddingStore(store_dir, verify_rows=False)
    kept_rows = "per-sample .safetensors, kept rows [len, 4096], pad collate"
    ways = {(STORE_WAY, LOADER_WORKERS): (checked, checked.collate(), "store"),
            ("EmbeddingStore(verify_rows=False), store.collate()", LOADER_WORKERS):
            (unchecked, unchecked.collate(), "store"),
            (kept_rows, LOADER_WORKERS): (PerSample(files["kept"]), pad_collate, "kept"),
            ("per-sample .safetensors, padded [300, 4096] + mask, default collate", LOADER_WORKERS):
            (PerSample(files["padded"]), None, "padded"),
            ("floor: a fresh shared segment a batch, nothing copied", LOADER_WORKERS):
            (Floor(kept, checked.layout.width), lambda batch: batch, "floor"),
            (STORE_WAY, 0): (checked, checked.collate(), "store"),
            (kept_rows, 0): (PerSample(files["kept"]), pad_collate, "kept")}
    loaders = {key: loader(dataset, collate, key[1]) for key, (dataset, collate, _) in ways.items()}
    # The first-class join: its workers fetch the items of a dataset of yours (here nothing but each index, a dataset
    # of text rows having no other data) with the store's rows, into shared memory they reuse.
    loaders[(LOADER_WAY, LOADER_WORKERS)] = JoinedLoader(
        [{"index": i} for i in range(len(texts))], checked, batch_size=LOADER_BATCH, sampler=order,
        num_workers=LOADER_WORKERS, persistent_workers=True, prefetch_factor=4, collate=checked.collate())
    ways[(LOADER_WAY, LOADER_WORKERS)] = (None, None, "store")
    out = {key: {"way": key[0], "workers": key[1], "disk_bytes_per_row": disk[kind], "rows_per_s": [],
                 "batch_rows": []} for key, (_, _, kind) in ways.items()}

    def epoch(key: tuple[str, int]) -> None:
        start, n, rows = time.perf_counter(), 0, 0
        for batch in loaders[key]:
            n += len(batch["sequence"])
            rows += batch["sequence"].shape[1] * len(batch["sequence"])
        out[key]["rows_per_s"].append(n / (time.perf_counter() - start))
        out[key]["batch_rows"].append(rows / n)

    rng = random.Random(SEED)
    rng.shuffle(order)
    for key in ways:  # warm: workers started, every file and shard read once
        epoch(key)
        out[key]["rows_per_s"].clear()
    load = [load_average()]
    for k in range(a.passes):
        rng.shuffle(order)
        for key in list(ways) if k % 2 == 0 else list(ways)[::-1]:
            epoch(key)
    load.append(load_average())  # the persistent workers end with the loaders, on return
    return {"rows": len(texts), "kept": kept, "ways": list(out.values()), "load": load}


def loader_table(r: dict) -> tuple[str, dict[str, float]]:
    """The table, and the store's rows/s over the best per-sample format's: both with ``LOADER_WORKERS``
    ("workers"), and each at its best worker count ("any")."""
    def rate(w: dict) -> float:
        return statistics.median(w["rows_per_s"])

    peers = [w for w in r["ways"] if w["workers"] == LOADER_WORKERS]
    best = max(rate(w) for w in peers if w["way"].startswith("per-sample"))
    best_any = max(rate(w) for w in r["ways"] if w["way"].startswith("per-sample"))
    lines = [f"| way | workers | disk a row | batch rows a caption (mean L') | rows/s | min-max "
             f"| × best per-sample ({LOADER_WORKERS} workers) |", "|---|---:|---:|---:|---:|---:|---:|"]
    for w in r["ways"]:
        rates = w["rows_per_s"]
        disk = f"{w['disk_bytes_per_row'] / 1e3:,.0f} kB" if w["disk_bytes_per_row"] else "-"
        lines.append(f"| {w['way']} | {w['workers']} | {disk} | {statistics.mean(w['batch_rows']):.1f} "
                     f"| {rate(w):,.0f} | {min(rates):,.0f}-{max(rates):,.0f} | **{rate(w) / best:.2f}** |")
    ours = (STORE_WAY, LOADER_WAY)  # the store read by workers through a DataLoader, or by JoinedLoader
    store = max(rate(w) for w in peers if w["way"] in ours)
    store_any = max(rate(w) for w in r["ways"] if w["way"] in ours)
    return "\n".join(lines), {"workers": store / best, "any": store_any / best_any}


# --- main ----------------------------------------------------------------------------------
def verdicts(results: dict) -> list[str]:
    out = []
    if (r := results.get("precompute")) is not None:
        ok = "met" if r["ratio"] >= SPEED_TARGET else "NOT met"
        out.append(f"- precompute: clipcond {r['ratio']:.2f}x diffusers' captions/s (target >= {SPEED_TARGET}): {ok}")
    for r in results.get("bytes", []):
        share = r["bytes"] / r["padded"]
        if r.get("target"):
            ok = "met" if share <= r["target"] else "NOT met"
            out.append(f"- {r['name']}: {share:.1%} of the padded row (target <= {r['target']:.0%}): {ok}")
        elif r.get("target_mib"):
            ok = "met" if r["bytes"] / MIB <= r["target_mib"] else "NOT met"
            out.append(f"- {r['name']}: {r['bytes'] / MIB:.3f} MiB a row against {r['padded'] / MIB:.3f} padded "
                       f"(target <= {r['target_mib']} MiB): {ok}")
    if (ratio := results.get("loader_ratio")) is not None:
        ok = "met" if ratio["workers"] >= LOADER_TARGET else "NOT met"
        out.append(f"- loader: the store {ratio['workers']:.2f}x the best per-sample format's rows/s, both with "
                   f"{LOADER_WORKERS} workers (target >= {LOADER_TARGET}): {ok}; each at its best worker count: "
                   f"{ratio['any']:.2f}x")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    parser.add_argument("--captions", type=int, default=CAPTIONS, help="captions of precompute (and bytes)")
    parser.add_argument("--loader-rows", type=int, default=LOADER_ROWS, help="rows of the loader's store")
    parser.add_argument("--passes", type=int, default=PASSES, help="timed epochs of each way in loader")
    parser.add_argument("--batch", type=int, default=BATCH, help="precompute batch_size and diffusers' batch")
    parser.add_argument("--threads", type=int, default=THREADS, help="torch threads (0: torch's default)")
    parser.add_argument("--quick", action="store_true", help="256 captions and loader rows, 3 passes")
    parser.add_argument("--dir", type=Path, default=None, help="where the files go (default: a temporary folder)")
    parser.add_argument("--out", type=Path, default=OUT)
    a = parser.parse_args()
    if a.quick:
        a.captions, a.loader_rows, a.passes = 256, 256, 3
    if a.threads:
        torch.set_num_threads(a.threads)

    import logging
    import platform

    from t5_fixtures import t5_vocabulary
    from transformers import T5TokenizerFast
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    logging.getLogger("clipcond").setLevel(logging.ERROR)
    start, load = time.perf_counter(), [load_average()]
    tokenizer = T5TokenizerFast.from_pretrained(t5_vocabulary()["sd3"])

    def count(text: str) -> int:
        return len(tokenizer(text.lower().strip()).input_ids)  # PixArt-Sigma lowercases and strips

    results: dict = {"args": {k: str(v) for k, v in vars(a).items()}, "t5": T5_SIZE}
    with tempfile.TemporaryDirectory(dir=a.dir) as tmp:
        root = Path(tmp)
        folder = write_pipeline(root, t5_vocabulary()["sd3"])
        texts = captions(a.captions, count)
        store = None
        if "precompute" in a.sections:
            results["precompute"] = precompute_section(a, folder, texts, root)
            store = Path(results["precompute"]["store"])
            print(f"  precompute: {results['precompute']['ratio']:.2f}x", file=sys.stderr)
        if "bytes" in a.sections:
            if store is None:
                import clipcond

                tc = clipcond.TextConditioner.from_pretrained("pixart-sigma", weights=folder)
                run_precompute(tc, write_jsonl(root / "captions.jsonl", texts), root / "store", a.batch)
                store = root / "store"
            results["bytes"] = bytes_section(store, root)
        if "loader" in a.sections:
            wide = captions(a.loader_rows, count, seed=SEED + 1)
            results["loader"] = loader_section(a, folder, wide, root / "loader")
    load.append(load_average())
    results["wall_s"], results["load_average"] = time.perf_counter() - start, load
    print(f"\nclipcond T5 rows at dataset scale on {platform.processor() or platform.machine()}, {os.cpu_count()} "
          f"cores, torch {torch.__version__}, {torch.get_num_threads()} threads; {results['wall_s']:.0f} s in all; "
          f"load average {load[0]:.1f} at start, {load[1]:.1f} at end")
    if (r := results.get("precompute")) is not None:
        t5 = ", ".join(f"{k} {v}" for k, v in T5_SIZE.items())
        print(f"\nprecompute: PixArt-Sigma, random T5 v1.1 ({t5}, gated-gelu, vocab 32128), float32, "
              f"{r['captions']} distinct LAION-like captions, batch {r['batch']}; clipcond, diffusers, clipcond "
              f"(load average {r['load'][0]:.1f} -> {r['load'][1]:.1f})\n{token_summary(r['kept'])}\n")
        print(precompute_table(r))
        print("\nstore[i] against diffusers' prompt_embeds where its mask is 1:")
        for c in r["agree"]:
            print(f"  row {c['row']} ({c['kept']} tokens): mask equal {c['mask_equal']}, max abs err "
                  f"{c['max_abs_err']:.1e}")
    if "bytes" in results:
        print("\nbytes a row: shard files' bytes (header, lengths and check included) over their rows, against "
              "the padded row the pipeline takes (PixArt: [300, D] and no pooled; the mask is not counted). The "
              "PixArt share is the kept rows' share, independent of D and the dtype but for the 16 bytes a row "
              "and the headers: the real-size row shows it\n")
        print(bytes_table(results["bytes"]))
    if (r := results.get("loader")) is not None:
        table, results["loader_ratio"] = loader_table(r)
        print(f"\nloader: PixArt-Sigma rows at real width (float16, D 4096), {r['rows']} rows, "
              f"{token_summary(r['kept'])}; DataLoader batch {LOADER_BATCH}, {LOADER_WORKERS} "
              f"persistent workers, warm, medians of {a.passes} epochs of each way, alternating, a new shuffle each "
              f"(load average {r['load'][0]:.1f} -> {r['load'][1]:.1f})\n")
        print(table)
    print("\n" + "\n".join(verdicts(results)))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(results, indent=1))
    print(f"\nwrote {a.out}")


if __name__ == "__main__":
    main()
