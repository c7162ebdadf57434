"""The precompute pipeline: where the encoder's time goes, and no inf/NaN ever reaches a store."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest
import torch

import clipcond.precompute.encode as pipeline
import clipcond.store.format as store_format
from clipcond import TextConditioner
from clipcond.precompute.encode import PipelineStats, encode_shards
from clipcond.precompute.job import PrecomputeJob, precompute

CAPTIONS = [f"caption number {i}" for i in range(12)]


@pytest.fixture()
def tc() -> TextConditioner:
    return TextConditioner.from_pretrained("tiny-sd15")


def encode(tc: TextConditioner, out: Path, *, batch_size: int = 2, shard_size: int = 4) -> PipelineStats:
    shards = [(k, a, min(a + shard_size, len(CAPTIONS))) for k, a in enumerate(range(0, len(CAPTIONS), shard_size))]
    out.mkdir()
    return encode_shards(tc, CAPTIONS, shards, out, batch_size=batch_size, meta={}, progress=False)


def test_stats_count_every_batch_and_bound_the_loop(tmp_path, tc):
    stats = encode(tc, tmp_path / "store")
    assert (stats.batches, stats.rows) == (6, 12)
    assert 0 < stats.encoding <= stats.seconds
    assert stats.encoding + stats.waiting_tokens + stats.waiting_writer <= stats.seconds
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == [
        f"shard-0000{k}.{ext}" for k in range(3) for ext in ("json", "safetensors")]


def instant(tc: TextConditioner, monkeypatch) -> list[tuple[float, float]]:
    """An encoder that takes 5 ms (ready rows), so that waits depend on the other stages; returns the
    (start, end) of every call: the device's busy intervals, measured outside the pipeline."""
    ready, calls = tc(CAPTIONS[:2]), []

    def encode_tokens(tokens):
        start = time.perf_counter()
        time.sleep(0.005)
        calls.append((start, time.perf_counter()))
        return ready[: len(tokens[0].ids)]

    monkeypatch.setattr(tc, "encode_tokens", encode_tokens)
    return calls


def test_a_slow_tokenizer_shows_as_device_idle(tmp_path, tc, monkeypatch):
    calls = instant(tc, monkeypatch)
    tokenize = tc.tokenize

    def slow(prompts):
        time.sleep(0.05)
        return tokenize(prompts)

    monkeypatch.setattr(tc, "tokenize", slow)
    started = time.perf_counter()
    stats = encode(tc, tmp_path / "store")
    assert stats.waiting_tokens >= 6 * 0.05 * 0.8  # the encoder outruns a 50 ms tokenizer: it waits each batch
    # Measured outside the pipeline: the device was idle before the first encoder call and between
    # calls. Thread start-up and the pipeline's own bookkeeping stay within the slack.
    gaps = calls[0][0] - started + sum(b[0] - a[1] for a, b in zip(calls, calls[1:], strict=False))
    busy = sum(end - start for start, end in calls)
    assert stats.device_idle == pytest.approx(gaps, abs=0.01 + 0.05 * gaps)
    assert stats.seconds == pytest.approx(gaps + busy, abs=0.02)
    assert stats.busy == pytest.approx(busy / (gaps + busy), abs=0.05) and stats.busy < 0.3
    assert "device busy" in stats.summary()


def test_a_slow_disk_shows_as_waiting_for_the_writer(tmp_path, tc, monkeypatch):
    write = store_format.atomic_write

    def slow(target: Path, data: bytes) -> None:
        time.sleep(0.1)
        write(target, data)

    monkeypatch.setattr(store_format, "atomic_write", slow)  # the sidecar (ShardFormat.write_sidecar): once a shard
    instant(tc, monkeypatch)
    stats = encode(tc, tmp_path / "store", batch_size=1, shard_size=1)  # 12 shards, 0.1 s of writes each
    # The output queue holds PREFETCH batches and FLUSHING shards await their sidecar; past them
    # the encoder waits for every write.
    assert stats.waiting_writer >= (12 - pipeline.PREFETCH - pipeline.FLUSHING - 2) * 0.1 * 0.8
    assert stats.waiting_writer > stats.waiting_tokens


def test_precompute_logs_the_stats(tmp_path, tc, caplog):
    path = tmp_path / "captions.txt"
    path.write_text("\n".join(CAPTIONS + CAPTIONS[:3]) + "\n")
    with caplog.at_level(logging.INFO, logger="clipcond.precompute.job"):
        precompute(tc, PrecomputeJob(input=path, out=tmp_path / "store", batch_size=5, progress=False))
    [stats] = [r.pipeline_stats for r in caplog.records if hasattr(r, "pipeline_stats")]
    assert (stats.rows, stats.batches) == (12, 3)  # unique captions only
    assert "device busy" in caplog.text


def test_inf_or_nan_never_reaches_a_store(tmp_path, tc):
    # A token whose embedding is inf makes every later position NaN (LayerNorm of inf), as an
    # fp16 overflow would: the run stops and names the caption, and its shard is not written.
    [cat] = tc.tokenizers[0].encode(["cat"])[0]
    tc.towers[0].token_embedding.weight.data[cat] = float("inf")
    path = tmp_path / "captions.txt"
    path.write_text("a dog\na photo of a cat\na bird\n")
    out = tmp_path / "store"
    with pytest.raises(ValueError, match=r"1 captions encode to inf/NaN in torch.float32 \(unique rows \[1\]: "
                                         r"'a photo of a cat'\).*bfloat16 or float32"):
        precompute(tc, PrecomputeJob(input=path, out=out, batch_size=2, progress=False))
    assert not list(out.glob("shard-*"))
    assert torch.isnan(tc(["a photo of a cat"]).sequence).any()  # the premise: it really is NaN


def test_a_batch_that_does_not_fit_its_shard_s_header_stops_the_run(tmp_path, tc, monkeypatch):
    encode_tokens, calls = tc.encode_tokens, []

    def drifting(tokens):  # as autocast around a call could make it: the second batch in float16
        calls.append(1)
        c = encode_tokens(tokens)
        return c if len(calls) == 1 else c.to(torch.float16)

    monkeypatch.setattr(tc, "encode_tokens", drifting)
    with pytest.raises(RuntimeError, match=r"shard 0: a batch of torch.float16 rows after torch.float32 ones"):
        encode(tc, tmp_path / "store")
    assert not list((tmp_path / "store").iterdir())  # the half-written shard's temporary is gone
