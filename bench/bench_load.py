"""Loading: time and peak memory of ``TextConditioner.from_pretrained`` against transformers' ``from_pretrained``.

For each encoder, random towers at the real sizes are saved once as a diffusers pipeline folder
(``text_encoder*/model.safetensors``, in ``--file-dtype``), then each loader runs in a fresh worker
process, after loading a tiny folder the same way (imports and first-call costs are not timed):
its time, and the resident memory above that baseline, sampled every millisecond during the load,
split into anonymous memory and mapped file pages, as a multiple of the bytes of the weights it
holds; then the memory once every weight has been read (a loader that maps the file lazily pays
for its pages then). About 1.0x means one copy: nothing held twice on the way.

    python bench/bench_load.py                           # sd15, sd2, sdxl; float16 files; load in float16
    python bench/bench_load.py --dtype float32 --encoders sdxl
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ENCODERS = ("sd15", "sd2", "sdxl")
JSON_PATH = Path(__file__).parent / "results" / "load.json"


def memory() -> dict[str, int]:
    """This process's resident memory now: VmRSS, and its anonymous and file-backed parts, in bytes."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) * 1024
    return out


class Sampler(threading.Thread):
    """Polls ``memory()`` every millisecond; ``peak`` holds the largest value of each field seen."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak, self.stop = memory(), threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            for key, value in memory().items():
                self.peak[key] = max(self.peak[key], value)
            time.sleep(0.001)


def load(impl: str, encoder: str, folder: Path, dtype: object) -> list[object]:
    import clipcond

    if impl == "clipcond":
        return [clipcond.TextConditioner.from_pretrained(encoder, weights=folder, dtype=dtype)]
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    # What diffusers' pipelines and training scripts do, one tower after the other.
    subs = [s for s in ("text_encoder", "text_encoder_2") if (folder / s).is_dir()]
    return [(CLIPTextModelWithProjection if s.endswith("_2") else CLIPTextModel)
            .from_pretrained(folder / s, dtype=dtype) for s in subs]


def worker(job: dict) -> dict:
    import gc

    import torch

    dtype = getattr(torch, job["dtype"])
    load(job["impl"], job["encoder"], Path(job["tiny"]), dtype)  # imports and first-call costs, untimed
    gc.collect()
    base, sampler = memory(), Sampler()
    sampler.start()
    start = time.perf_counter()
    modules = load(job["impl"], job["encoder"], Path(job["folder"]), dtype)
    seconds = time.perf_counter() - start
    sampler.stop.set()
    sampler.join()
    after = memory()
    held = sum(t.numel() * t.element_size() for m in modules for t in m.state_dict().values())
    # What using the weights costs: read every tensor once (pages in what a loader mapped lazily).
    total = sum(float(t.float().sum()) for m in modules for t in m.state_dict().values())
    touched = memory()
    return {**job, "seconds": seconds, "weights_bytes": held, "checksum": total,
            **{f"peak_{k}": v - base[k] for k, v in sampler.peak.items()},
            **{f"after_{k}": v - base[k] for k, v in after.items()},
            **{f"used_{k}": v - base[k] for k, v in touched.items()}}


def run_worker(job: dict) -> dict:
    done = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)], capture_output=True, text=True,
                          check=False)
    if done.returncode != 0:
        sys.stderr.write(done.stderr[-2000:])
        return {**job, "error": f"exit {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--encoders", nargs="+", default=list(ENCODERS), choices=ENCODERS)
    parser.add_argument("--file-dtype", default="float16", choices=("float32", "float16"))
    parser.add_argument("--dtype", default="float16", choices=("float32", "float16", "bfloat16"))
    parser.add_argument("--out", type=Path, default=JSON_PATH)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.worker:
        print(json.dumps(worker(json.loads(a.worker))))
        return

    import torch
    from bench_precompute import random_pipeline
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for encoder in a.encoders:
            folder = random_pipeline(Path(tmp) / encoder, encoder, getattr(torch, a.file_dtype))
            tiny = random_pipeline(Path(tmp) / f"tiny-{encoder}", f"tiny-{encoder}", getattr(torch, a.file_dtype))
            for impl in ("clipcond", "naive"):
                rows.append(run_worker({"encoder": encoder, "impl": impl, "dtype": a.dtype, "folder": str(folder),
                                        "tiny": str(tiny)}))
    gib = 2**30
    print(f"loading a diffusers folder ({a.file_dtype} safetensors, in the page cache) into {a.dtype} on the CPU; "
          "memory above the worker's baseline (imports and a tiny load done), sampled every millisecond; "
          "anon = anonymous memory, file = mapped file pages\n")
    print("| encoder | loader | seconds | weights | peak RSS while loading (anon + file) | × weights "
          "| RSS after (anon + file) | RSS once every weight was read |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if "error" in r:
            print(f"| {r['encoder']} | {r['impl']} | {r['error']} |" + " |" * 5)
            continue
        print(f"| {r['encoder']} | {r['impl']} | {r['seconds']:.2f} | {r['weights_bytes'] / gib:.2f} GiB "
              f"| {r['peak_VmRSS'] / gib:.2f} GiB ({r['peak_RssAnon'] / gib:.2f} + {r['peak_RssFile'] / gib:.2f}) "
              f"| {r['peak_VmRSS'] / r['weights_bytes']:.2f} "
              f"| {r['after_VmRSS'] / gib:.2f} GiB ({r['after_RssAnon'] / gib:.2f} + {r['after_RssFile'] / gib:.2f}) "
              f"| {r['used_VmRSS'] / gib:.2f} GiB |")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(rows, indent=1))
    print(f"\nwrote {a.out}")


if __name__ == "__main__":
    main()
