"""CUDA checks (fp16 is the production path); skipped on machines without a GPU."""

from __future__ import annotations

import pytest
import torch

from clipcond import TextConditioner

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

ODD = ["", "!!!!!!!!!!!!!!!!!!!!", "a " * 200, "日本語 " * 60, "(((((((((masterpiece)))))))))" * 8, "\u200b\u200b"]


@pytest.mark.parametrize("name", ["tiny-sd15", "tiny-sd2", "tiny-sdxl"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_half_matches_cpu_float32(name, dtype):
    prompts = ["a photo of a cat", "an astronaut riding a horse", *ODD]
    ref = TextConditioner.from_pretrained(name)(prompts)
    tc = TextConditioner.from_pretrained(name, device="cuda", dtype=dtype)
    c = tc(prompts)
    assert c.sequence.device.type == "cuda" and c.sequence.dtype == dtype and not c.sequence.requires_grad
    assert torch.isfinite(c.sequence).all() and torch.isfinite(c.pooled).all()
    torch.testing.assert_close(c.sequence.float().cpu(), ref.sequence, atol=0.05, rtol=0.05)
    assert tc.null(2).sequence.device.type == "cuda"
    d = tc.encode(prompts, drop_prob=0.5, generator=torch.Generator("cuda").manual_seed(0))
    assert d.sequence.shape == c.sequence.shape


def test_cuda_graphs_outputs_survive_the_next_call():
    # mode="reduce-overhead" replays CUDA graphs whose outputs the next replay overwrites: tc clones them.
    eager = TextConditioner.from_pretrained("tiny-sdxl", device="cuda", dtype=torch.float16)
    graphs = TextConditioner.from_pretrained("tiny-sdxl", device="cuda", dtype=torch.float16)
    graphs.compile(mode="reduce-overhead")
    batches = [["a photo of a cat", "a dog"], ["an astronaut", *ODD[:1]], ["a photo of a cat", "a dog"]] * 2
    held = [graphs(b) for b in batches]  # all alive at once, as a training step or the precompute writer holds them
    for batch, c in zip(batches, held, strict=True):
        ref = eager(batch)
        torch.testing.assert_close(c.sequence, ref.sequence, atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(c.pooled, ref.pooled, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(graphs.null(2).sequence, eager.null(2).sequence)


def test_precompute_on_cuda_counts_idle_within_waits_and_matches_tc(tmp_path):
    import logging

    from clipcond import EmbeddingStore
    from clipcond.precompute.job import PrecomputeJob, precompute

    captions = [f"a photo of cat number {i}, " + "highly detailed " * (i % 9) for i in range(2000)]
    path = tmp_path / "captions.txt"
    path.write_text("\n".join(captions) + "\n")
    tc = TextConditioner.from_pretrained("tiny-sdxl", device="cuda", dtype=torch.float16)
    # Measured on the device itself: an event before and after each batch's kernels. The GPU is idle
    # from one batch's end event to the next one's start event (elapsed_time between them).
    events, encode_tokens = [], tc.encode_tokens

    def timed(tokens):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = encode_tokens(tokens)
        end.record()
        events.append((start, end))
        return out

    tc.encode_tokens = timed
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    log = logging.getLogger("clipcond.precompute.job")
    level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        precompute(tc, PrecomputeJob(input=path, out=tmp_path / "store", batch_size=64, progress=False))
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    [stats] = [r.pipeline_stats for r in records if hasattr(r, "pipeline_stats")]
    torch.cuda.synchronize()
    gaps = sum(a[1].elapsed_time(b[0]) for a, b in zip(events, events[1:], strict=False)) / 1e3  # seconds
    # The writer's device-to-host copies run on the same stream between batches: busy for the events,
    # not for the pipeline's clock, which also counts the wait for the first batch. Hence the slack.
    assert stats.device_idle == pytest.approx(gaps, abs=0.05 + 0.25 * gaps)
    store = EmbeddingStore(tmp_path / "store")
    # float16 at batch 64 against batch 1: other GEMM kernels, so a float16-sized tolerance.
    torch.testing.assert_close(store[5]["sequence"].cuda(), tc([captions[5]]).sequence[0], atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_t5_recipes_on_cuda_are_finite_and_match_cpu_float32(dtype):
    """A masked (PixArt) and an unmasked (Flux) T5 recipe on CUDA: finite in float16 (wo kept float32), close to
    the CPU float32 encoding of the same random ids, masked batches run to their longest prompt."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from bench_t5_gpu import batches, conditioner, lengths

    for recipe in ("masked", "unmasked"):
        ref = conditioner(recipe, "tiny", torch.float32, "cpu")
        tc = conditioner(recipe, "tiny", dtype, "cuda")
        assert tc.t5.model.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == (
            torch.float32 if dtype == torch.float16 else dtype)
        for tokens in batches(ref, lengths(64), 32, grouped=False):
            expected, c = ref.encode_tokens(tokens), tc.encode_tokens(tokens)
            assert c.sequence.device.type == "cuda" and torch.isfinite(c.sequence).all()
            assert c.sequence.shape == expected.sequence.shape
            torch.testing.assert_close(c.sequence.float().cpu(), expected.sequence, atol=0.05, rtol=0.05)


def test_the_joined_loader_pins_the_whole_batch(tmp_path):
    """pin_memory=True on JoinedLoader: the workers' items and the store's rows (fetched in the main process) are
    both pinned, and equal what the unpinned loader gives. Bug: only the items pinned (the DataLoader's own pin
    step sees the workers' hand-over, not the joined batch), or the rows left in pageable memory."""
    import json

    from clipcond import EmbeddingStore, JoinedLoader
    from clipcond.precompute.job import PrecomputeJob, precompute

    tc = TextConditioner.from_pretrained("tiny-sdxl")
    captions = tmp_path / "captions.jsonl"
    captions.write_text("".join(json.dumps({"caption": f"photo {i}"}) + "\n" for i in range(32)))
    precompute(tc, PrecomputeJob(input=captions, out=tmp_path / "store", progress=False))
    store = EmbeddingStore(tmp_path / "store")
    latents = [{"latent": torch.full((4, 8, 8), float(i))} for i in range(32)]
    plain = JoinedLoader(latents, store, batch_size=8, num_workers=2)
    pinned = JoinedLoader(latents, store, batch_size=8, num_workers=2, pin_memory=True)
    for want, got in zip(plain, pinned, strict=True):
        for key in ("latent", "sequence", "pooled"):
            assert got[key].is_pinned() and torch.equal(got[key], want[key]), key
