"""The examples run offline with ``--tiny`` and print what they promise: training losses that are finite
and fall on a fixed tiny batch, and CFG images through clipcond equal to the pipeline's own text path."""

from __future__ import annotations

import functools
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
EQUAL = 1e-6  # float32 on CPU, same weights and ops: in practice exactly 0


@functools.cache  # each example runs once per session, whatever the number of tests reading its output
def run_example(name: str, *args: str) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(EXAMPLES.parent), os.environ.get("PYTHONPATH", "")]),
           # Tiny models gain nothing from threads, and OpenMP threads spinning against a busy machine
           # (another test process, xdist) made one run 6x slower.
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(EXAMPLES / name), "--tiny", *args], capture_output=True, text=True,
                          timeout=300, env=env, cwd=EXAMPLES.parent)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def number(pattern: str, text: str) -> float:
    match = re.search(pattern, text)
    assert match, f"{pattern!r} not in output:\n{text[-2000:]}"
    return float(match.group(1))


def assert_loss_falls(out: str, steps: int = 30) -> None:
    """A training example's printed steps: each loss finite, the last under 0.9x the first."""
    losses = [float(v) for v in re.findall(r"^step +\d+ .*?loss (\S+)", out, flags=re.M)]
    assert len(losses) == steps and all(math.isfinite(v) for v in losses), out[-2000:]
    first, last = number(r"first loss (\S+)", out), number(r"last loss (\S+)", out)
    assert "all finite: True" in out
    assert last < 0.9 * first, f"loss did not fall: first {first}, last {last}"


@pytest.mark.parametrize("name", ["train_sd15.py", "train_sdxl.py"])
def test_training_example_loss_is_finite_and_falls(name):
    out = run_example(name, "--steps", "30")
    assert_loss_falls(out)


def test_sdxl_training_example_reads_the_store_and_drops_captions():
    out = run_example("train_sdxl.py", "--steps", "30")
    assert re.search(r"EmbeddingStore\(.*rows=8, unique=5, encoder='tiny-sdxl'", out), out[:2000]
    dropped = [int(d) for d in re.findall(r"dropped (\d+)/4", out)]
    assert len(dropped) == 30 and sum(dropped) > 0  # drop_prob 0.1 over 120 rows


def test_cfg_inference_example_matches_the_pipelines_text_path():
    out = run_example("cfg_inference.py")
    for kind in ("sd15", "sdxl"):
        diff = rf"{kind}: max abs diff, "
        assert number(diff + r"clipcond prompt_embeds vs the pipeline's text path: (\S+)", out) <= EQUAL
        assert number(diff + r"hand-written CFG sampler vs the pipeline's latents: (\S+)", out) <= EQUAL
        assert number(diff + r"other prompts \(must be > 0\): (\S+)", out) > 1e-3  # the text reaches the image


def test_webdataset_example_joins_every_sample_once_by_key():
    pytest.importorskip("webdataset")
    out = run_example("webdataset_latents.py", "--workers", "2")
    assert "joined 24 samples (24 distinct keys) by __key__ across 2 workers" in out
    assert "every sample's latent and conditioning equal its own (direct encoding)" in out


def test_prompt_schedule_example_switches_at_a1111_s_step():
    out = run_example("prompt_schedule.py")
    # [cat:dog:0.5] at 20 steps: A1111 uses "cat" for denoiser calls 0..10 and "dog" from call 11.
    assert "applied: from call 0: 'a photo of a cat on a mat'; from call 11: 'a photo of a dog on a mat'" in out
    assert "20 of 20 UNet calls conditioned on their A1111 segment" in out


def test_encode_prompts_example_shows_a_t5_recipe_or_says_why_not(t5_vocab):
    """Bug: the example failing offline without a T5 tokenizer instead of saying what to pass, or its T5 recipe part
    printing another length or ids than the Flux recipe's."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(EXAMPLES.parent), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}

    def run(*args: str) -> str:
        proc = subprocess.run([sys.executable, str(EXAMPLES / "encode_prompts.py"), *args], capture_output=True,
                              text=True, timeout=300, env=env, cwd=EXAMPLES.parent)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout

    assert "T5 recipe tiny-flux: skipped: no T5 tokenizer (pass --t5-tokenizer PATH" in run()
    out = run("--t5-tokenizer", str(t5_vocab["flux"]))
    assert "sequence  (3, 512, 96) torch.float32  pooled (3, 32)  mask None  text_ids (512, 3)" in out
    assert "[2] 'a running dog': T5 ids [3, 9, 1180, 1782, 1]" in out
    assert "'pooled_prompt_embeds', 'prompt_embeds']" in out


def test_pixart_training_example_trains_on_masked_t5_rows_from_2_workers(t5_vocab):
    """Bug: the PixArt example's loss not falling or not finite, its batches padded to 300 rows (or to another length
    than their longest caption) instead of carrying the mask, the mask or embeddings not the transformer's width, or
    the batches not coming from the 2 DataLoader workers."""
    out = run_example("train_pixart.py", "--steps", "30", "--t5-tokenizer", str(t5_vocab["sd3"]))
    assert_loss_falls(out)
    assert re.search(r"EmbeddingStore\(.*rows=8, unique=7, encoder='tiny-pixart-sigma'", out), out[:2000]
    shapes = re.search(r"first batch: prompt_embeds \[4, (\d+), 96\] prompt_attention_mask \[4, (\d+)\] .*kept rows "
                       r"\[([\d, ]+)\], from DataLoader worker [01] of 2", out)
    assert shapes, out[:2000]
    length, mask_length, kept = int(shapes[1]), int(shapes[2]), [int(k) for k in shapes[3].split(",")]
    assert length == mask_length == max(kept) < 300  # padded to the batch's longest caption, not to 300
    assert "epoch 0: batches from DataLoader workers [0, 1] (num_workers=2)" in out
    lengths = [int(v) for v in re.findall(r"^step .* L' (\d+)$", out, flags=re.M)]
    assert len(lengths) == 30 and max(lengths) < 300 and len(set(lengths)) > 1  # each batch its own longest
    dropped = [int(d) for d in re.findall(r"dropped (\d+)/4", out)]
    assert len(dropped) == 30 and sum(dropped) > 0  # drop_prob 0.1 over 120 rows


def test_flux_training_example_trains_on_t5_rows_from_2_workers(t5_vocab):
    """Bug: the Flux example's loss not falling or not finite, its batches not FluxPipeline's shapes (T5 rows padded to
    256 for schnell, CLIP-L's pooled vector, txt_ids [256, 3]), the batches not coming from the 2 DataLoader workers,
    or the per-tower caption dropout ({"clip_l": p, "t5": p}) never dropping one of the two text encoders."""
    out = run_example("train_flux.py", "--steps", "30", "--t5-tokenizer", str(t5_vocab["flux"]))
    assert_loss_falls(out)
    assert re.search(r"EmbeddingStore\(.*rows=8, unique=7, encoder='tiny-flux-schnell'", out), out[:2000]
    # tiny-flux-schnell: T5 width 96 at schnell's 256 rows, all kept (no mask); CLIP-L's pooled width 32.
    shapes = re.search(r"first batch: prompt_embeds \[4, 256, 96\] pooled_prompt_embeds \[4, 32\] txt_ids \[256, 3\] "
                       r".*hidden_states \[4, 16, 16\] img_ids \[16, 3\] guidance None, from DataLoader worker [01] "
                       r"of 2", out)
    assert shapes, out[:2000]
    assert "epoch 0: batches from DataLoader workers [0, 1] (num_workers=2)" in out
    dropped = re.findall(r"^step .* dropped clip_l (\d)/4  t5 (\d)/4$", out, flags=re.M)
    assert len(dropped) == 30, out[-2000:]
    clip_l, t5 = sum(int(c) for c, _ in dropped), sum(int(t) for _, t in dropped)
    assert clip_l > 0 and t5 > 0  # drop_prob 0.1 per tower over 120 rows
    assert f"clip_l dropped {clip_l} of 120 rows (p 0.1), t5 dropped {t5} of 120 rows (p 0.1)" in out
