"""T5 recipes: encode throughput against diffusers' ``encode_prompt``, and loading a T5-XXL-size encoder.

``encode``: a random mid-size T5 (``T5_SIZE``; Flux's CLIP-L at ``CLIP_SIZE``) saved once as diffusers pipeline
folders (``flux/``: text_encoder, tokenizer, text_encoder_2, tokenizer_2; ``pixart/``: text_encoder, tokenizer),
with the real T5 vocabulary (tests/t5_fixtures.py ``t5_vocabulary()``, or ``--tokenizer``). In one worker per
(recipe, dtype), ``TextConditioner.from_pretrained(recipe, weights=folder, dtype=...)`` and the pipeline built
from the same folders (``T5EncoderModel`` / ``CLIPTextModel.from_pretrained(..., dtype=...)``, the tokenizers
beside them) encode the same batch of LAION-like captions (``bench_tokenizer.captions()``), alternating, call
for call: ``tc(prompts)`` against ``FluxPipeline.encode_prompt(prompts, max_sequence_length=512)`` /
``PixArtSigmaPipeline.encode_prompt(prompts, do_classifier_free_guidance=False, max_sequence_length=300)``,
tokenization included on both sides. Each cell is the median of ``PAIRS`` alternating pairs; "× diffusers" is
the median of the per-pair ratios. The worker also checks that both give the same tensors (max |difference|).

``load``: a T5-XXL-size encoder (the ``t5-xxl`` spec's sizes: d_model 4096, 24 layers, d_ff 10240, 64 heads,
vocab 32128) written once with random weights at the real size as ComfyUI's standalone files: fp16
(``t5xxl_fp16.safetensors``, 9.5 GB) and fp8 e4m3fn Linear weights (``t5xxl_fp8_e4m3fn.safetensors``, 4.9 GB),
under ``--dir`` and kept there for the next run. Each load runs in its own worker process, after a load of a
tiny file of the same format (imports and first-call costs untimed), the file read through once just before
(page cache warm): ``TextConditioner.from_pretrained("t5-xxl", weights=file, dtype=..., tokenizer=...)``;
its seconds, the bytes of the weights it holds, and the process's peak resident memory (``ru_maxrss``) in all
and above the worker's RSS before the load. The peer: transformers' ``T5EncoderModel.from_pretrained`` of a
folder holding ``config.json`` and the fp16 file (what a diffusers pipeline does), whose file pages are mapped
and read lazily, so the memory once every weight was read is its cost. Where the machine lacks the memory or
disk for the full 24 layers, the files hold fewer (the largest that fits) and the table says so.

    python bench/bench_t5.py                                       # ~2.5 min; a first run writes 14 GB: +2 min
    python bench/bench_t5.py --sections encode --dtypes float32 --batch 16
    python bench/bench_t5.py --sections load --dir /data/t5-bench  # keeps the 14 GB of files there
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # bench_tokenizer
sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))  # t5_fixtures.t5_vocabulary

# --- knobs ---------------------------------------------------------------------------------
SECTIONS = ("encode", "load")
# encode: a mid-size T5 v1.1 (gated-gelu) that runs a batch in about a second on 2 cores; the real vocabulary,
# relative-attention table and recipe lengths (Flux 512, PixArt-Sigma 300), so only the widths are smaller.
T5_SIZE = {"d_model": 512, "num_layers": 6, "num_heads": 8, "d_kv": 64, "d_ff": 1280}
CLIP_SIZE = {"hidden_size": 384, "num_hidden_layers": 4, "num_attention_heads": 6, "intermediate_size": 1536}
RECIPES = ("flux", "pixart-sigma")
DTYPES = ("float32", "bfloat16")
BATCH = 8
PAIRS = 9  # timed (clipcond, diffusers) pairs after WARMUP of each, the order alternating pair by pair
WARMUP = 1
THREADS = None  # torch.set_num_threads in each worker; None: torch's default (one per core)
SPEED_TARGET = 1.0  # clipcond's prompts/s over diffusers' encode_prompt: never the slower way
# load: T5-XXL at the real size (google/t5-v1_1-xxl's encoder, clipcond's t5-xxl spec); LAYERS shrinks it.
LAYERS = 24
FILES = {"fp16": "t5xxl_fp16.safetensors", "fp8": "t5xxl_fp8_e4m3fn.safetensors"}
LOADS = (("fp16", "float16"), ("fp16", "bfloat16"), ("fp8", "float16"), ("fp8", "bfloat16"))
PEER = True  # also transformers' T5EncoderModel.from_pretrained of the fp16 file (float16)
MEMORY_TARGET = 1.1  # peak RSS above the worker's baseline <= 1.1x the weights held: never two copies
HEADROOM = 1.25  # a load runs only with MemAvailable >= HEADROOM x its expected peak (a shared machine)
DIR = Path(tempfile.gettempdir()) / "clipcond-bench-t5"
SEED = 0
OUT = Path(__file__).parent / "results" / "t5.json"
GIB = 2**30


def load_average() -> float:
    return os.getloadavg()[0]


def vocabulary(tokenizer: str | None) -> dict[str, Path]:
    """{"flux": tokenizer_2 folder, "sd3": tokenizer_3 folder}: --tokenizer for both, or PyPI's diffsynth wheel."""
    if tokenizer:
        return {"flux": Path(tokenizer), "sd3": Path(tokenizer)}
    from t5_fixtures import t5_vocabulary

    return t5_vocabulary()


# --- encode --------------------------------------------------------------------------------
def write_pipelines(root: Path, vocab: dict[str, Path]) -> dict[str, Path]:
    """Flux and PixArt-Sigma pipeline folders holding one random mid-size T5 (float32) and Flux's CLIP-L."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from clipcond.text.tokenizer import write_hf_tokenizer

    torch.manual_seed(SEED)
    t5 = T5EncoderModel(T5Config(vocab_size=32128, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
                                 use_cache=False, pad_token_id=0, eos_token_id=1, **T5_SIZE)).eval()
    with torch.no_grad():  # a final RMSNorm gain near 0.2 as tests/t5_fixtures.py: outputs ~1, as a real T5's
        t5.encoder.final_layer_norm.weight.mul_(0.2)
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_act="quick_gelu", projection_dim=768, **CLIP_SIZE))
    flux, pixart = root / "flux", root / "pixart"
    clip.save_pretrained(flux / "text_encoder")
    write_hf_tokenizer(flux / "tokenizer")
    for folder, sub, tok, which, index in (
        (flux, "text_encoder_2", "tokenizer_2", "flux", {"_class_name": "FluxPipeline"}),
        (pixart, "text_encoder", "tokenizer", "sd3", {"_class_name": "PixArtSigmaPipeline"}),
    ):
        t5.save_pretrained(folder / sub)
        shutil.copytree(vocab[which], folder / tok)
        (folder / "model_index.json").write_text(json.dumps({**index, "_diffusers_version": "0.42.1"}))
    return {"flux": flux, "pixart-sigma": pixart}


def diffusers_encoder(recipe: str, folder: Path, dtype: object):  # -> Callable[[list[str]], tuple]
    """The recipe's diffusers pipeline over the models in ``folder``, loaded as the pipeline loads them, its
    ``encode_prompt`` called under ``torch.no_grad()`` as its ``__call__`` and every training script call it
    (without it, autograd records the forward: ~1.3-2x slower here, not a fair peer)."""
    import torch
    from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    if recipe == "flux":
        from diffusers import FluxPipeline

        pipe = FluxPipeline(scheduler=None, vae=None, transformer=None,
                            text_encoder=CLIPTextModel.from_pretrained(folder / "text_encoder", dtype=dtype),
                            tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer"),
                            text_encoder_2=T5EncoderModel.from_pretrained(folder / "text_encoder_2", dtype=dtype),
                            tokenizer_2=T5TokenizerFast.from_pretrained(folder / "tokenizer_2"))
        return torch.no_grad()(lambda prompts: pipe.encode_prompt(prompts, prompt_2=None, device="cpu",
                                                                  max_sequence_length=512))
    from diffusers import PixArtSigmaPipeline

    pipe = PixArtSigmaPipeline(tokenizer=T5TokenizerFast.from_pretrained(folder / "tokenizer"),
                               text_encoder=T5EncoderModel.from_pretrained(folder / "text_encoder", dtype=dtype),
                               vae=None, transformer=None, scheduler=None)
    return torch.no_grad()(lambda prompts: pipe.encode_prompt(prompts, do_classifier_free_guidance=False,
                                                              device="cpu", max_sequence_length=300,
                                                              clean_caption=False))


def difference(recipe: str, ours: object, theirs: tuple) -> float:
    """Max |clipcond - diffusers| over the tensors the pipeline returns (masks must be equal)."""
    import torch

    if recipe == "flux":  # (prompt_embeds, pooled_prompt_embeds, text_ids)
        pairs = [(ours.sequence, theirs[0]), (ours.pooled, theirs[1])]
    else:  # (prompt_embeds, prompt_attention_mask, negative..., negative...)
        if not torch.equal(ours.mask, theirs[1]):
            return float("inf")
        pairs = [(ours.sequence, theirs[0])]
    return max(float((a.float() - b.float()).abs().max()) for a, b in pairs)


def encode_worker(job: dict) -> dict:
    import logging

    import torch
    from bench_tokenizer import captions

    import clipcond

    logging.getLogger("clipcond").setLevel(logging.ERROR)  # a warning per truncated caption
    if job["threads"]:
        torch.set_num_threads(job["threads"])
    dtype, folder, batch = getattr(torch, job["dtype"]), Path(job["folder"]), job["batch"]
    tc = clipcond.TextConditioner.from_pretrained(job["recipe"], weights=folder, dtype=dtype)
    impls = {"clipcond": tc, "diffusers": diffusers_encoder(job["recipe"], folder, dtype)}
    pairs = job["pairs"]
    texts = captions(batch * (pairs + WARMUP))
    batches = [texts[i * batch:(i + 1) * batch] for i in range(pairs + WARMUP)]
    times: dict[str, list[float]] = {name: [] for name in impls}
    for i, prompts in enumerate(batches):
        order = list(impls) if i % 2 == 0 else list(reversed(impls))
        outputs = {}
        for name in order:
            start = time.perf_counter()
            outputs[name] = impls[name](prompts)
            if i >= WARMUP:
                times[name].append(time.perf_counter() - start)
        if i == 0:
            diff = difference(job["recipe"], outputs["clipcond"], outputs["diffusers"])
    ratios = [d / c for c, d in zip(times["clipcond"], times["diffusers"], strict=True)]
    tokens = statistics.mean(len(r) for r in tc.t5_tokenizer.tokenizer(texts[batch * WARMUP:]).input_ids)
    return {**job, "times": times, "ratio": statistics.median(ratios), "ratios": ratios, "max_abs_diff": diff,
            "mean_t5_tokens": tokens, "threads": torch.get_num_threads()}


# --- load ----------------------------------------------------------------------------------
def xxl_tensors(layers: int, fp8: bool, *, tiny: bool = False) -> dict[str, tuple[object, tuple[int, ...]]]:
    """name -> (dtype, shape) of a ComfyUI-style T5-XXL encoder file: T5EncoderModel's keys (``shared.weight``
    holds the embedding), in clipcond's expected order; fp8: Linear weights F8_E4M3, everything else F16."""
    import torch

    import clipcond
    from clipcond.encoders.t5 import LINEAR_WEIGHT, TIED, T5Tower

    tower = clipcond.get_spec("tiny-t5-xxl" if tiny else "t5-xxl").t5.replace(**({} if tiny else {"layers": layers}))
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in T5Tower(tower).model.state_dict().items() if k != TIED}
    return {k: (torch.float8_e4m3fn if fp8 and LINEAR_WEIGHT.search(k) else torch.float16, s)
            for k, s in shapes.items()}


def write_file(path: Path, tensors: dict[str, tuple[object, tuple[int, ...]]]) -> None:
    """A safetensors file of seeded random weights, written tensor by tensor (never the whole model in memory)."""
    import torch

    codes = {torch.float16: "F16", torch.float8_e4m3fn: "F8_E4M3"}
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, (dtype, shape) in tensors.items():
        size = dtype.itemsize * int(torch.Size(shape).numel())
        header[name] = {"dtype": codes[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    generator = torch.Generator().manual_seed(SEED)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text)
        for name, (dtype, shape) in tensors.items():
            std = 1.0 if name == "shared.weight" else 0.05
            if name.endswith("layer_norm.weight"):
                t = torch.ones(shape)
            else:
                t = torch.empty(shape).normal_(0.0, std, generator=generator)
            f.write(t.to(dtype).view(torch.uint8).numpy().tobytes())
    os.replace(tmp, path)


def ensure_file(path: Path, tensors: dict) -> float:
    """Write ``path`` unless a file with these tensors is already there; seconds spent writing."""
    from clipcond._files import read_safetensors_header

    if path.is_file():
        try:
            with open(path, "rb") as f:
                have = read_safetensors_header(f, path).tensors
            if {k: (v.dtype, tuple(v.shape)) for k, v in have.items()} == tensors:
                return 0.0
        except ValueError:
            pass
    start = time.perf_counter()
    write_file(path, tensors)
    return time.perf_counter() - start


def file_bytes(tensors: dict) -> int:
    import torch

    return sum(d.itemsize * int(torch.Size(s).numel()) for d, s in tensors.values())


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def load_one(job: dict, file: str) -> list[object]:
    import torch

    import clipcond

    dtype = getattr(torch, job["dtype"])
    if job["impl"] == "clipcond":
        spec = "tiny-t5-xxl" if "tiny" in Path(file).name else "t5-xxl"
        overrides = {} if spec.startswith("tiny") else {"t5": clipcond.get_spec(spec).t5.replace(layers=job["layers"])}
        return [clipcond.TextConditioner.from_pretrained(spec, weights=file, dtype=dtype, tokenizer=job["tokenizer"],
                                                         **overrides)]
    from transformers import T5EncoderModel

    return [T5EncoderModel.from_pretrained(Path(file).parent, dtype=dtype)]


def held_bytes(modules: list[object]) -> int:
    """Bytes of the distinct storages behind the modules' parameters and buffers (tied weights once)."""
    storages = {}
    for m in modules:
        for t in m.state_dict().values():
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


def load_worker(job: dict) -> dict:
    import gc

    load_one(job, job["tiny"])  # imports and first-call costs, untimed
    gc.collect()
    base = rss()
    start = time.perf_counter()
    modules = load_one(job, job["file"])
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    after = rss()
    held = held_bytes(modules)
    start = time.perf_counter()
    for m in modules:  # read every weight once: pages in what a loader mapped lazily
        for t in m.state_dict().values():
            t.view(-1)[:: max(1, 4096 // t.element_size())].float().sum()  # a value from each 4 kB page
    touch = time.perf_counter() - start
    used = rss()
    return {**job, "seconds": seconds, "ready_s": seconds + touch, "held_bytes": held, "maxrss": peak,
            "base_rss": base, "peak_above_base": peak - base, "after_rss": after - base, "used_rss": used - base}


def peer_folder(root: Path, file: Path, layers: int, *, tiny: bool = False) -> Path:
    """A transformers T5 folder (config.json + model.safetensors linked to ``file``) for the peer's loader."""
    import clipcond
    from clipcond.encoders.t5 import t5_config

    tower = clipcond.get_spec("tiny-t5-xxl" if tiny else "t5-xxl").t5
    folder = root / f"transformers-{file.stem}"
    folder.mkdir(exist_ok=True)
    t5_config(tower if tiny else tower.replace(layers=layers)).save_pretrained(folder)
    link = folder / "model.safetensors"
    link.unlink(missing_ok=True)
    link.symlink_to(file.resolve())
    return folder


def warm(path: Path) -> float:
    """Read ``path`` through once (into the page cache); GB/s."""
    start, n = time.perf_counter(), 0
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(1 << 24)
        while read := f.readinto(buf):
            n += read
    return n / (time.perf_counter() - start) / 1e9


def fitting_layers(directory: Path) -> int:
    """The most layers (<= LAYERS) whose files fit the free disk and whose largest load fits MemAvailable."""
    one, two = file_bytes(xxl_tensors(1, False)), file_bytes(xxl_tensors(2, False))
    per_layer, fixed = two - one, 2 * one - two
    for layers in range(LAYERS, 0, -1):
        fp16 = fixed + layers * per_layer
        disk = shutil.disk_usage(directory).free + sum(p.stat().st_size for p in directory.glob("t5xxl_*"))
        # float16 holds wo (2/7 of each layer's weights) in float32: ~1.29x the fp16 file
        if 1.5 * fp16 <= disk and HEADROOM * 1.35 * fp16 + 0.8 * GIB <= mem_available():
            return layers
    return 0


# --- workers and tables --------------------------------------------------------------------
def run_worker(kind: str, job: dict) -> dict:
    done = subprocess.run([sys.executable, __file__, "--worker", kind, json.dumps(job)], capture_output=True,
                          text=True, check=False)
    if done.returncode != 0:
        sys.stderr.write(done.stderr[-3000:])
        return {**job, "error": f"exit {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def encode_section(a: argparse.Namespace, vocab: dict[str, Path], tmp: Path) -> list[dict]:
    folders = write_pipelines(tmp, vocab)
    rows = []
    for recipe in a.recipes:
        for dtype in a.dtypes:
            load = load_average()
            row = run_worker("encode", {"recipe": recipe, "dtype": dtype, "batch": a.batch,
                                        "folder": str(folders[recipe]), "threads": a.threads,
                                        "pairs": a.pairs})
            rows.append({**row, "load": (load, load_average())})
            print(f"  {recipe} {dtype}: {row.get('ratio', row.get('error'))}", file=sys.stderr)
    return rows


def encode_table(rows: list[dict]) -> str:
    lines = ["| recipe | dtype | batch | T5 tokens (mean) | clipcond prompts/s | diffusers prompts/s | × diffusers "
             "(pairs: min-max) | max abs diff | load avg |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['recipe']} | {r['dtype']} | {r['batch']} | {r['error']} |" + " |" * 5)
            continue
        ours, theirs = (r["batch"] / statistics.median(r["times"][k]) for k in ("clipcond", "diffusers"))
        lines.append(f"| {r['recipe']} | {r['dtype']} | {r['batch']} | {r['mean_t5_tokens']:.1f} | {ours:.2f} "
                     f"| {theirs:.2f} | **{r['ratio']:.2f}** ({min(r['ratios']):.2f}-{max(r['ratios']):.2f}) "
                     f"| {r['max_abs_diff']:.1e} | {r['load'][0]:.1f}-{r['load'][1]:.1f} |")
    return "\n".join(lines)


def load_section(a: argparse.Namespace, vocab: dict[str, Path]) -> tuple[list[dict], dict]:
    a.dir.mkdir(parents=True, exist_ok=True)
    layers = min(a.layers, fitting_layers(a.dir))
    info = {"layers": layers, "scale": layers / LAYERS, "write_s": 0.0}
    if layers == 0:
        return [], info
    files = {}
    for fmt, name in FILES.items():
        full, tiny = a.dir / (name if layers == LAYERS else f"{Path(name).stem}-{layers}l.safetensors"), \
            a.dir / f"tiny-{name}"
        info["write_s"] += ensure_file(full, xxl_tensors(layers, fmt == "fp8"))
        ensure_file(tiny, xxl_tensors(layers, fmt == "fp8", tiny=True))
        files[fmt] = (full, tiny)
        info[f"{fmt}_file_bytes"] = full.stat().st_size
    jobs = [{"impl": "clipcond", "format": fmt, "dtype": dtype} for fmt, dtype in LOADS]
    if PEER:
        jobs.append({"impl": "transformers", "format": "fp16", "dtype": "float16"})
    rows = []
    for job in jobs:
        full, tiny = files[job["format"]]
        if job["impl"] == "transformers":
            full = peer_folder(a.dir, full, layers) / "model.safetensors"
            tiny = peer_folder(a.dir, tiny, layers, tiny=True) / "model.safetensors"
        need = HEADROOM * 1.35 * info["fp16_file_bytes"]
        if mem_available() < need:
            rows.append({**job, "error": f"skipped: MemAvailable {mem_available() / GIB:.1f} GiB < {need / GIB:.1f}"})
            continue
        gbps = warm(full)
        load = load_average()
        row = run_worker("load", {**job, "file": str(full), "tiny": str(tiny), "layers": layers,
                                  "tokenizer": str(vocab["flux"])})
        rows.append({**row, "warm_gbps": gbps, "load": (load, load_average())})
        print(f"  {job}: {row.get('seconds', row.get('error'))}", file=sys.stderr)
    return rows, info


def load_table(rows: list[dict]) -> str:
    lines = ["| loader | file | dtype | seconds | + every weight read once | weights held | peak RSS (ru_maxrss) "
             "| RSS before the load | peak − before | × weights | RSS after, above before "
             "| once every weight was read | load avg |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['impl']} | {r['format']} | {r['dtype']} | {r['error']} |" + " |" * 9)
            continue
        lines.append(f"| {r['impl']} | {r['format']} | {r['dtype']} | {r['seconds']:.1f} | {r['ready_s']:.1f} "
                     f"| {r['held_bytes'] / GIB:.2f} GiB | {r['maxrss'] / GIB:.2f} GiB "
                     f"| {r['base_rss'] / GIB:.2f} GiB "
                     f"| {r['peak_above_base'] / GIB:.2f} GiB | **{r['peak_above_base'] / r['held_bytes']:.3f}** "
                     f"| {r['after_rss'] / GIB:.2f} GiB | {r['used_rss'] / GIB:.2f} GiB "
                     f"| {r['load'][0]:.1f}-{r['load'][1]:.1f} |")
    return "\n".join(lines)


def verdicts(encode: list[dict], load: list[dict]) -> list[str]:
    out = []
    for r in encode:
        if "error" not in r:
            ok = "met" if r["ratio"] >= SPEED_TARGET else "NOT met"
            out.append(f"- {r['recipe']} {r['dtype']}: {r['ratio']:.2f}x diffusers (target >= {SPEED_TARGET}): {ok}")
    ours = {(r["format"], r["dtype"]): r for r in load if r["impl"] == "clipcond" and "error" not in r}
    for (fmt, dtype), r in ours.items():
        x = r["peak_above_base"] / r["held_bytes"]
        ok = "met" if x <= MEMORY_TARGET else "NOT met"
        out.append(f"- load {fmt} -> {dtype}: peak {x:.3f}x the weights held above the worker's baseline "
                   f"({r['maxrss'] / r['held_bytes']:.3f}x counting the whole process) "
                   f"(target <= {MEMORY_TARGET}): {ok}")
    for dtype in ("float16", "bfloat16"):
        if ("fp8", dtype) in ours and ("fp16", dtype) in ours:
            x = ours[("fp8", dtype)]["held_bytes"] / ours[("fp16", dtype)]["held_bytes"]
            out.append(f"- fp8 file in {dtype}: holds {x:.2f}x of the fp16 file's weights in {dtype} (about half)")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=RECIPES)
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=("float32", "bfloat16"))
    parser.add_argument("--batch", type=int, default=BATCH)
    parser.add_argument("--pairs", type=int, default=PAIRS, help="timed alternating pairs per row")
    parser.add_argument("--threads", type=int, default=THREADS, help="torch threads per worker (default: torch's)")
    parser.add_argument("--layers", type=int, default=LAYERS, help="T5-XXL blocks in the load files (24: real size)")
    parser.add_argument("--dir", type=Path, default=DIR, help="where the XXL files are written and kept (~14 GB)")
    parser.add_argument("--tokenizer", help="a T5 tokenizer folder (default: the diffsynth wheel's, as the tests)")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.worker:
        kind, job = a.worker
        print(json.dumps((encode_worker if kind == "encode" else load_worker)(json.loads(job))))
        return

    import platform

    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    vocab = vocabulary(a.tokenizer)
    start, load = time.perf_counter(), [load_average()]
    encode, loads, info = [], [], {}
    with tempfile.TemporaryDirectory() as tmp:
        if "encode" in a.sections:
            encode = encode_section(a, vocab, Path(tmp))
    if "load" in a.sections:
        loads, info = load_section(a, vocab)
    load.append(load_average())
    wall = time.perf_counter() - start
    threads = a.threads or torch.get_num_threads()
    print(f"\nclipcond T5 recipes on {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
          f"{torch.__version__}, {threads} threads; {wall:.0f} s in all; load average {load[0]:.1f} at start, "
          f"{load[1]:.1f} at end")
    if encode:
        t5 = ", ".join(f"{k} {v}" for k, v in T5_SIZE.items())
        print(f"\nencode: random T5 v1.1 ({t5}, vocab 32128) and CLIP-L ({CLIP_SIZE['hidden_size']} wide, "
              f"{CLIP_SIZE['num_hidden_layers']} layers) in diffusers folders; LAION-like captions; median of "
              f"{a.pairs} alternating pairs after {WARMUP} warm-up; tokenization included on both sides\n")
        print(encode_table(encode))
    if "load" in a.sections:
        if not loads:
            print("\nload: not run: this machine has neither the memory nor the disk for one T5-XXL layer")
        else:
            scale = "" if info["layers"] == LAYERS else (
                f" -- SCALED: {info['layers']} of {LAYERS} layers ({info['scale']:.2f}x), the most that fits")
            written = f", written in {info['write_s']:.0f} s" if info["write_s"] else ""
            print(f"\nload: T5-XXL encoder, {info['layers']} layers{scale}; files "
                  f"{info['fp16_file_bytes'] / 1e9:.2f} GB (fp16) and {info['fp8_file_bytes'] / 1e9:.2f} GB (fp8 "
                  f"e4m3fn Linear weights) in {a.dir}{written}; "
                  "page cache warm; each load in its own worker after a tiny load of the same format\n")
            print(load_table(loads))
    print("\n" + "\n".join(verdicts(encode, loads)))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"wall_s": wall, "load_average": load, "encode": encode, "load": loads,
                                 "load_info": info, "knobs": {"t5": T5_SIZE, "clip": CLIP_SIZE, "pairs": a.pairs,
                                                              "warmup": WARMUP}}, indent=1))
    print(f"\nwrote {a.out}")


if __name__ == "__main__":
    main()
