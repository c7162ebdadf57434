"""Tokenizer throughput: clipcond's ClipTokenizer against transformers' CLIPTokenizer and open_clip.tokenize.

Each contender turns the same deterministic captions into ``[B, 77]`` int64 ids, chunk by chunk as a
precompute loop would (``CHUNK`` captions per call), and the table gives prompts/s and ratios. The
references are what the UNets were trained through: transformers' ``CLIPTokenizer`` (Rust backend;
transformers 5 has no slow Python CLIPTokenizer left) for CLIP ViT-L, and ``open_clip.tokenize`` (pure
Python BPE, ftfy and html.unescape per caption) for the OpenCLIP towers. "agree" is the share of rows
whose ids equal the reference's, so a fast wrong tokenizer shows.

    python bench/bench_tokenizer.py [--captions 100000] [--out bench/results/tokenizer.json]

``captions()`` is also the caption source of bench_encode.py.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

# --- knobs ---------------------------------------------------------------------------------
N_CAPTIONS = 20_000  # the issue asks for 10k-100k; --captions widens it
CHUNK = 256  # captions per tokenizer call, the precompute batch size
REPEATS = 3  # timed passes per contender after one warm-up pass (BPE caches warm, as in a long run)
SEED = 0
OUT = "bench/results/tokenizer.json"

# --- captions ------------------------------------------------------------------------------
SUBJECTS = ("a cat", "a golden retriever puppy", "an astronaut", "a woman in a red dress", "two children",
            "an old fisherman", "a vintage car", "a bowl of ramen", "a lighthouse", "a dragon", "a robot",
            "a bride and groom", "a mountain cabin", "a bouquet of tulips", "a skateboarder", "a fox",
            "the Eiffel Tower", "a steam locomotive", "a wooden chair", "a plate of sushi", "a teenage girl",
            "a knight in shining armor", "a cup of coffee", "a red sports car", "a herd of elephants")
ACTIONS = ("sitting on", "running through", "standing next to", "flying over", "reading a book in",
           "painted on", "floating above", "walking along", "hiding behind", "photographed in", "dancing in")
PLACES = ("a sunny beach", "a snowy forest", "the streets of Tokyo at night", "a cozy kitchen", "Mars",
          "a crowded market", "an abandoned factory", "a misty lake at dawn", "a white background",
          "the desert", "a neon-lit alley", "a field of sunflowers", "a cathedral", "a living room")
TAGS = ("highly detailed", "8k", "4k uhd", "oil painting", "by greg rutkowski", "trending on artstation",
        "cinematic lighting", "studio photo", "bokeh", "watercolor", "(masterpiece:1.2)", "best quality",
        "sharp focus", "octane render", "unreal engine", "digital art", "35mm film", "f/1.8", "HDR",
        "[blurry]", "concept art", "golden hour", "award winning photograph", "isometric", "pastel colors")
ALT_TEXT = ("IMG_{n}.JPG", "Stock Photo - {s}", "{S} | Free Stock Image", "Buy {s} online - Size 12",
            "{s} royalty-free vector illustration #{n}", "DSC{n}", "Product image {n} of 6")
NON_ASCII = ("café", "naïve", "Zürich", "東京の夜景", "한국어 간판", "🐱🐶", "São Paulo", "Ελληνικά νησιά",
             "crème brûlée", "piñata", "Москва зимой", "—", "“quoted”", "½ price", "❤️", "ﬁne ligature")
ODD = ("&amp;", "!", "!!!", "  double  spaces", "\n", "<3", "1/2", "3.14", "100%", "#tbt", "@user", "&#39;s")


def caption(rng: random.Random) -> str:
    """One caption in the shape of LAION/COCO text: a sentence, tags, alt text, sometimes very long."""
    subject = rng.choice(SUBJECTS)
    roll = rng.random()
    if roll < 0.08:  # scraped alt text
        text = rng.choice(ALT_TEXT).format(n=rng.randrange(10_000), s=subject, S=subject.title())
    elif roll < 0.13:  # over 77 tokens: several sentences and tags, truncated by every tokenizer
        text = ". ".join(f"{rng.choice(SUBJECTS)} {rng.choice(ACTIONS)} {rng.choice(PLACES)}" for _ in range(6))
        text += ", " + ", ".join(rng.choices(TAGS, k=12))
    else:  # a prompt: sentence plus a geometric number of tags (median ~1, tail ~10)
        text = f"{subject} {rng.choice(ACTIONS)} {rng.choice(PLACES)}"
        while rng.random() < 0.55:
            text += ", " + rng.choice(TAGS)
    if rng.random() < 0.06:
        text += " " + rng.choice(NON_ASCII)
    if rng.random() < 0.04:
        text = text.replace(" ", f" {rng.choice(ODD)} ", 1)
    if rng.random() < 0.1:
        text = text.capitalize() if rng.random() < 0.8 else text.upper()
    return text


def captions(n: int, seed: int = SEED) -> list[str]:
    """``n`` deterministic captions; ~15% repeat an earlier one, the popular ones more often (web data)."""
    rng = random.Random(seed)
    out: list[str] = []
    while len(out) < n:
        if out and rng.random() < 0.15:
            out.append(out[int(len(out) * rng.random() ** 3)])  # skewed towards the first (popular) captions
        else:
            out.append(caption(rng))
    return out


# --- contenders ----------------------------------------------------------------------------
def hf_tokenizer(folder: Path, pad_token: str = "<|endoftext|>"):  # -> transformers.CLIPTokenizer
    """transformers' CLIPTokenizer over the vocabulary shipped in open_clip (as tests/conftest.py builds it).

    ``pad_token``: SD 1.x's tokenizer pads with ``<|endoftext|>``, SD 2.x's and SDXL's second with ``!``.
    """
    from transformers import CLIPTokenizer

    from clipcond.text.tokenizer import write_hf_tokenizer

    return CLIPTokenizer.from_pretrained(write_hf_tokenizer(folder, pad_token=pad_token))


def contenders(folder: Path) -> dict[str, Callable[[Sequence[str]], object]]:
    import open_clip

    from clipcond import ClipTokenizer

    hf = hf_tokenizer(folder)
    ours_hf, ours_oc = ClipTokenizer("hf", pad_id=49407), ClipTokenizer("open_clip", pad_id=0)
    return {
        "clipcond hf": lambda p: ours_hf(p).ids,
        "transformers CLIPTokenizer": lambda p: hf(list(p), padding="max_length", max_length=77, truncation=True,
                                                   return_tensors="pt").input_ids,
        "clipcond open_clip": lambda p: ours_oc(p).ids,
        "open_clip.tokenize": lambda p: open_clip.tokenize(list(p)),
    }


REFERENCE = {"clipcond hf": "transformers CLIPTokenizer", "clipcond open_clip": "open_clip.tokenize"}


def run_all(fn: Callable[[Sequence[str]], object], texts: list[str]) -> tuple[list[float], list]:
    chunks = [texts[i : i + CHUNK] for i in range(0, len(texts), CHUNK)]
    ids = [fn(c) for c in chunks]  # warm-up pass, also the ids compared for agreement
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        for c in chunks:
            fn(c)
        times.append(time.perf_counter() - start)
    return times, ids


def agreement(ours: list, ref: list) -> float:
    import torch

    a, b = torch.cat(ours), torch.cat(ref)
    return (a == b).all(dim=1).double().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--captions", type=int, default=N_CAPTIONS)
    parser.add_argument("--out", default=OUT)
    args = parser.parse_args()

    texts = captions(args.captions)
    with tempfile.TemporaryDirectory() as tmp:
        fns = contenders(Path(tmp))
    results, ids = {}, {}
    for name, fn in fns.items():
        times, ids[name] = run_all(fn, texts)
        results[name] = {"seconds": times, "prompts_per_s": len(texts) / statistics.median(times)}
    for name, ref in REFERENCE.items():
        results[name]["agree_with"] = ref
        results[name]["agree"] = agreement(ids[name], ids[ref])

    hf, oc = results["transformers CLIPTokenizer"]["prompts_per_s"], results["open_clip.tokenize"]["prompts_per_s"]
    unique = len(set(texts))
    print(f"\n{len(texts)} captions ({unique} unique, {sum(not t.isascii() for t in texts)} non-ASCII), "
          f"chunks of {CHUNK}, median of {REPEATS} warm passes\n")
    print("| tokenizer | prompts/s | µs/prompt | × transformers | × open_clip.tokenize | ids agree with |")
    print("|---|---:|---:|---:|---:|---|")
    for name, r in results.items():
        pps = r["prompts_per_s"]
        agree = f"{r['agree']:.2%} {r['agree_with']}" if "agree" in r else "(reference)"
        print(f"| {name} | {pps:,.0f} | {1e6 / pps:.1f} | {pps / hf:.2f} | {pps / oc:.2f} | {agree} |")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"captions": len(texts), "unique": unique, "chunk": CHUNK, "repeats": REPEATS, "seed": SEED,
            "machine": platform.processor() or platform.machine(), "python": platform.python_version()}
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
