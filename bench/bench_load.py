"""Loading: time and peak memory of ``TextConditioner.from_pretrained`` against transformers' ``from_pretrained``.

For each encoder, random towers at the real sizes are saved once as a diffusers pipeline folder
(``text_encoder*/model.safetensors``, in ``--file-dtype``), then each loader runs in a fresh worker
process: its time, and its peak RSS above the worker's baseline (torch and the library imported)
as a multiple of the bytes of the weights it ends up holding. About 1.0x means one copy of the
weights: nothing held twice on the way (file pages that the kernel maps in while reading count
in RSS too, so a loader that copies out of a memory map peaks near 2x).

    python bench/bench_load.py                           # sd15, sd2, sdxl; float16 files; load in float16
    python bench/bench_load.py --dtype float32 --encoders sdxl
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ENCODERS = ("sd15", "sd2", "sdxl")
JSON_PATH = Path(__file__).parent / "results" / "load.json"


def rss_bytes() -> tuple[int, int]:
    """(peak, current) resident set size of this process."""
    current = 0
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            current = int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, current


def worker(job: dict) -> dict:
    import torch

    import clipcond

    dtype, folder = getattr(torch, job["dtype"]), Path(job["folder"])
    if job["impl"] == "naive":
        from transformers import CLIPTextModel, CLIPTextModelWithProjection  # noqa: F401 (imported before the baseline)
    base_peak, base = rss_bytes()
    start = time.perf_counter()
    if job["impl"] == "clipcond":
        model = clipcond.TextConditioner.from_pretrained(job["encoder"], weights=folder, dtype=dtype)
    else:  # what diffusers' pipelines and training scripts do, one tower after the other
        subs = [s for s in ("text_encoder", "text_encoder_2") if (folder / s).is_dir()]
        model = [(CLIPTextModelWithProjection if s.endswith("_2") else CLIPTextModel).from_pretrained(
            folder / s, dtype=dtype) for s in subs]
    seconds = time.perf_counter() - start
    peak, current = rss_bytes()
    modules = model if isinstance(model, list) else [model]
    held = sum(t.numel() * t.element_size() for m in modules for t in m.state_dict().values())
    # If the imports peaked higher than the load, the load's own peak is unknown (and below this).
    return {**job, "seconds": seconds, "weights_bytes": held, "peak_above_base": peak - base,
            "peak_set_by_load": peak > base_peak, "resident_above_base": current - base, "base_rss": base}


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
            for impl in ("clipcond", "naive"):
                rows.append(run_worker({"encoder": encoder, "impl": impl, "dtype": a.dtype, "folder": str(folder)}))
    print(f"loading a diffusers folder ({a.file_dtype} safetensors) into {a.dtype} on the CPU; peak RSS above "
          f"the worker's baseline, as a multiple of the weights held\n")
    print("| encoder | loader | seconds | weights held | peak RSS above base | × weights | resident after |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        if "error" in r:
            print(f"| {r['encoder']} | {r['impl']} | {r['error']} | | | | |")
            continue
        print(f"| {r['encoder']} | {r['impl']} | {r['seconds']:.2f} | {r['weights_bytes'] / 2**30:.2f} GiB "
              f"| {'' if r['peak_set_by_load'] else '<= '}{r['peak_above_base'] / 2**30:.2f} GiB "
              f"| {r['peak_above_base'] / r['weights_bytes']:.2f} "
              f"| {r['resident_above_base'] / 2**30:.2f} GiB |")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(rows, indent=1))
    print(f"\nwrote {a.out}")


if __name__ == "__main__":
    main()
