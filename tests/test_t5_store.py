"""Stores of T5 recipes (issue 19): a masked recipe's rows trimmed to what its mask keeps, SD3's parts, batches
padded to their longest row, caption dropout per tower, and the store's guarantees (incremental runs, parts,
--verify, gc, variants, the damaged-row check) for T5 rows exactly as for CLIP rows.

Shard contents are read back with the safetensors library itself (an independent reader), and rows are compared
with ``tc(...)`` on the same captions, which tests/test_t5.py holds equal to the diffusers pipelines."""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
from pathlib import Path

import open_clip
import pytest
import torch
from safetensors import safe_open
from torch.utils.data import DataLoader

from clipcond import EmbeddingStore, TextConditioner
from clipcond.cli import main
from clipcond.precompute.job import PrecomputeJob, precompute
from clipcond.store.gc import collect
from clipcond.store.handover import Receiver

TOL = {"atol": 2e-6, "rtol": 1e-5}  # float32, the same weights; only the batches' composition differs
WORDS = "a photo of the cat dog red blue big small old new on in with at sunset city street portrait painting".split()


def laion_like(n: int, seed: int = 0) -> list[str]:
    """Captions of LAION-like lengths: mostly 5-25 words, a few long ones."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        words = rng.choice([rng.randint(3, 12), rng.randint(8, 25), rng.randint(30, 60)] if i % 10 == 0 else
                           [rng.randint(3, 12), rng.randint(8, 25)])
        out.append(" ".join(rng.choice(WORDS) for _ in range(words)) + f" {i}")
    return out


def write_jsonl(path: Path, captions: list[str]) -> Path:
    path.write_text("".join(json.dumps({"caption": c, "key": f"k{i}"}) + "\n" for i, c in enumerate(captions)))
    return path


def shard_tensors(store: Path) -> list[dict[str, torch.Tensor]]:
    out = []
    for name in json.loads((store / "manifest.json").read_text())["shards"]:
        with safe_open(store / name["file"], "pt") as f:
            out.append({key: f.get_tensor(key) for key in f.keys()})
    return out


@pytest.fixture(scope="module")
def pixart(t5_vocab) -> TextConditioner:
    return TextConditioner.from_pretrained("tiny-pixart-sigma", tokenizer=t5_vocab["sd3"])


@pytest.fixture(scope="module")
def sd3(t5_vocab) -> TextConditioner:
    return TextConditioner.from_pretrained("tiny-sd3", tokenizer=t5_vocab["sd3"])


@pytest.fixture(scope="module")
def pixart_store(pixart, tmp_path_factory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("pixart")
    captions = laion_like(120)
    precompute(pixart, PrecomputeJob(input=write_jsonl(root / "c.jsonl", captions), out=root / "store",
                                     id_column="key", batch_size=16, shard_size=50, progress=False))
    return root / "store", captions


def test_a_masked_store_holds_only_the_rows_the_mask_keeps(pixart, pixart_store):
    """Bug: padding rows stored (300 rows a caption where ~20 are read), lengths that do not cut the kept rows, or
    new captions left in input order (batches of mixed lengths run T5 to the longest of each)."""
    out, captions = pixart_store
    shards = shard_tensors(out)
    assert set(shards[0]) == {"sequence", "pooled", "lengths", "check"}
    lengths = torch.cat([s["lengths"] for s in shards])  # in slot order
    kept = pixart(captions).mask.sum(1)  # [N] rows each caption's mask keeps
    assert sorted(lengths.tolist()) == sorted(kept.tolist())
    assert lengths.tolist() == sorted(lengths.tolist())  # slots ordered by length: batches of about one length
    assert all(s["sequence"].shape == (int(s["lengths"].sum()), 96) and s["pooled"].shape == (len(s["lengths"]), 0)
               for s in shards)
    stored = sum(s["sequence"].numel() for s in shards) / len(captions)
    assert stored <= 0.15 * 300 * 96  # the target: <= 15 % of the padded bytes a row


def test_masked_rows_read_back_as_tc_gives_them(pixart, pixart_store):
    """Bug: a trimmed row restored at another place, its mask wrong, garbage (a reused buffer) past its kept
    rows, or a batch not padded to its longest row."""
    out, captions = pixart_store
    store = EmbeddingStore(out)
    full = pixart(captions).padded(300)
    for i in (0, 7, 50, 119):
        item = store[i]
        assert item["sequence"].shape == (300, 96) and torch.equal(item["mask"], full.mask[i])
        torch.testing.assert_close(item["sequence"], full.sequence[i], **TOL)
    for _ in range(2):  # the second fetch reuses the first's memory once it is dropped
        rows = [3, 90, 14, 60]
        batch = store.collate()(store.__getitems__(rows))
        expected = pixart([captions[r] for r in rows])  # tc batches to the longest prompt too
        assert batch["sequence"].shape == expected.sequence.shape and torch.equal(batch["mask"], expected.mask)
        torch.testing.assert_close(batch["sequence"], expected.sequence, **TOL)
        c = store.conditioning(batch)
        assert set(c.pipeline_kwargs()) == {"prompt_embeds", "prompt_attention_mask"}
        del batch, c


def test_masked_caption_dropout_restores_the_null_and_its_mask(pixart, pixart_store):
    """Bug: a dropped row keeping its caption's mask (PixArt would attend to its length), or the null's row and
    mask not the recipe's null."""
    out, _ = pixart_store
    store = EmbeddingStore(out)
    batch = store.collate(drop_prob=0.5, seed=1)(store.__getitems__(list(range(40))))
    dropped = batch["dropped"]
    assert 0 < int(dropped.sum()) < 40
    null = pixart.null(1).padded(batch["sequence"].shape[1])
    assert torch.equal(batch["mask"][dropped], null.mask.expand(int(dropped.sum()), -1))
    torch.testing.assert_close(batch["sequence"][dropped], null.sequence.expand(int(dropped.sum()), -1, -1), **TOL)
    assert store.null(2).mask.shape == (2, 300) and store.null(2).mask.sum().item() == 2


def test_lengths_moved_between_rows_are_caught(pixart_store, tmp_path):
    """Bug: a masked shard's row check not covering its length: one unit of length moved from row 0 to row 1 (the
    lengths' sum, and so every stored byte, unchanged) would read both rows shifted by one row, silently."""
    import struct

    out = tmp_path / "store"
    shutil.copytree(pixart_store[0], out)
    shard = out / "shard-00000.safetensors"
    data = bytearray(shard.read_bytes())
    (size,) = struct.unpack("<Q", data[:8])
    start = 8 + size + json.loads(data[8 : 8 + size])["lengths"]["data_offsets"][0]
    lengths = struct.unpack_from("<2q", data, start)
    struct.pack_into("<2q", data, start, lengths[0] - 1, lengths[1] + 1)
    shard.write_bytes(bytes(data))
    store, clean, failed = EmbeddingStore(out), EmbeddingStore(pixart_store[0]), []
    for row in range(len(store)):
        try:
            got = store[row]
        except ValueError as err:
            assert re.search(r"shard-00000.safetensors row [01] .*checksum mismatch", str(err)), err
            failed.append(row)
        else:
            assert torch.equal(got["sequence"], clean[row]["sequence"])  # every other row reads as before
    assert len(failed) == 2, failed  # the two slots whose lengths moved
    with pytest.raises(ValueError, match=r"shard-00000.safetensors row [01] .*checksum mismatch"):
        store.__getitems__(failed)


def test_masked_store_through_a_dataloader_with_two_workers(pixart_store):
    """Bug: a worker's batch of masked rows losing its mask or its rows' lengths across the process boundary."""
    out, _ = pixart_store
    store = EmbeddingStore(out)
    loader = DataLoader(store, batch_size=16, num_workers=2, collate_fn=store.collate())
    seen = 0
    for batch in loader:
        rows = batch["row"].tolist()
        ref = store.collate()(store.__getitems__(rows))
        assert torch.equal(batch["mask"], ref["mask"]) and torch.equal(batch["sequence"], ref["sequence"])
        seen += len(rows)
    assert seen == len(store)


def test_sd3_stores_its_parts_and_assembles_the_pipeline_row(sd3, tmp_path):
    """Bug: SD3's 2048 (here 16) zero columns of its CLIP rows stored, the parts assembled in the wrong order, or
    a narrow part copied over the wrong columns."""
    captions = laion_like(24, seed=3)
    precompute(sd3, PrecomputeJob(input=write_jsonl(tmp_path / "c.jsonl", captions), out=tmp_path / "store",
                                  batch_size=8, progress=False))
    shards = shard_tensors(tmp_path / "store")
    assert {k: tuple(v.shape) for k, v in shards[0].items()} == {
        "clip": (24, 77, 80), "t5": (24, 256, 96), "pooled": (24, 80), "check": (24,)}
    store = EmbeddingStore(tmp_path / "store")
    expected = sd3(captions)
    assert expected.sequence.shape == (24, 333, 96) and not expected.sequence[:, :77, 80:].any()
    torch.testing.assert_close(store[5]["sequence"], expected.sequence[5], **TOL)
    batch = store.collate()(store.__getitems__([4, 0, 23]))
    torch.testing.assert_close(batch["sequence"], expected.sequence[[4, 0, 23]], **TOL)
    torch.testing.assert_close(batch["pooled"], expected.pooled[[4, 0, 23]], **TOL)
    row_bytes = (77 * 80 + 256 * 96 + 80) * 4
    assert (tmp_path / "store" / "shard-00000.safetensors").stat().st_size < 24 * row_bytes + 2000


def test_sd3_caption_dropout_per_tower_on_the_store(sd3, tmp_path):
    """Bug: per-tower dropout zeroing another tower's columns or pooled slice, or one draw for all towers."""
    captions = laion_like(64, seed=4)
    precompute(sd3, PrecomputeJob(input=write_jsonl(tmp_path / "c.jsonl", captions), out=tmp_path / "store",
                                  batch_size=16, progress=False))
    store = EmbeddingStore(tmp_path / "store")
    rows = list(range(64))
    clean = store.collate()(store.__getitems__(rows))
    collate = store.collate(drop_prob={"clip_l": 0.3, "clip_g": 0.3, "t5": 0.3}, seed=2)
    batch = collate(store.__getitems__(rows))
    dropped = batch["dropped_towers"]
    assert set(dropped) == {"clip_l", "clip_g", "t5"}
    assert torch.equal(batch["dropped"], dropped["clip_l"] | dropped["clip_g"] | dropped["t5"])
    assert len({tuple(d.tolist()) for d in dropped.values()}) == 3 and all(0 < int(d.sum()) < 64
                                                                        for d in dropped.values())
    seq, ref = batch["sequence"], clean["sequence"]  # CLIP-L: columns :32 of rows :77, pooled :32; G: 32:80, 32:80
    for key, columns, pooled in (("clip_l", slice(0, 32), slice(0, 32)), ("clip_g", slice(32, 80), slice(32, 80))):
        d = dropped[key]
        assert not seq[d, :77, columns].any() and not batch["pooled"][d, pooled].any()
        assert torch.equal(seq[~d, :77, columns], ref[~d, :77, columns])
    assert not seq[dropped["t5"], 77:].any() and torch.equal(seq[~dropped["t5"], 77:], ref[~dropped["t5"], 77:])
    with pytest.raises(ValueError, match=r"needs a probability in \[0, 1\] for each of \['clip_l', 'clip_g', 't5'\]"):
        store.collate(drop_prob={"t5": 0.1})


def test_flux_store_keeps_every_row_and_gives_text_ids(t5_vocab, tmp_path):
    """Bug: Flux's padding rows trimmed (its transformer attends to them), or its txt_ids missing at read."""
    tc = TextConditioner.from_pretrained("tiny-flux-schnell", tokenizer=t5_vocab["flux"])
    captions = laion_like(10, seed=5)
    precompute(tc, PrecomputeJob(input=write_jsonl(tmp_path / "c.jsonl", captions), out=tmp_path / "store",
                                 progress=False))
    store = EmbeddingStore(tmp_path / "store")
    assert store.layout.plain and "mask" not in store[0] and (store.kept_lengths() == 256).all()
    batch = store.collate()(store.__getitems__([1, 2]))
    c = store.conditioning(batch)
    assert c.text_ids.shape == (256, 3) and c.pipeline == "FluxPipeline"
    torch.testing.assert_close(c.sequence, tc(captions[1:3]).sequence, **TOL)


# --- the store's guarantees, for a CLIP and two T5 recipes -------------------------------------------------

@pytest.fixture(scope="module", params=["tiny-sdxl", "tiny-pixart-sigma", "tiny-sd3"])
def recipe(request, t5_vocab) -> TextConditioner:
    if request.param == "tiny-sdxl":
        return TextConditioner.from_pretrained("tiny-sdxl")
    return TextConditioner.from_pretrained(request.param, tokenizer=t5_vocab["sd3"])


def read_all(out: Path) -> dict[str, torch.Tensor]:
    store = EmbeddingStore(out)
    batch = store.collate()(store.__getitems__(list(range(len(store)))))
    return {k: v.clone() for k, v in batch.items() if k != "dropped"}


def test_incremental_runs_parts_and_gc_agree_with_one_run(recipe, tmp_path):
    """Bug: a T5 layout lost when a run adds to a store, when parts write its shards, or when gc rewrites them."""
    first, more = laion_like(30, seed=6), laion_like(50, seed=7)
    single = tmp_path / "single"
    precompute(recipe, PrecomputeJob(input=write_jsonl(tmp_path / "all.jsonl", first + more), out=single,
                                     batch_size=8, shard_size=10, progress=False))
    grown = tmp_path / "grown"
    precompute(recipe, PrecomputeJob(input=write_jsonl(tmp_path / "first.jsonl", first), out=grown, batch_size=8,
                                     shard_size=10, progress=False))
    result = precompute(recipe, PrecomputeJob(input=tmp_path / "all.jsonl", out=grown, batch_size=8, progress=False))
    assert result["run"] == {"encoded": 50, "reused": 30}
    parts = tmp_path / "parts"
    for i in (1, 0, 2):
        precompute(recipe, PrecomputeJob(input=tmp_path / "all.jsonl", out=parts, batch_size=8, shard_size=10,
                                         part=(i, 3), progress=False))
    expected = read_all(single)
    manifest = json.loads((single / "manifest.json").read_text())
    assert json.loads((parts / "manifest.json").read_text()) == manifest  # the same plan, shards, index, null
    assert all((parts / e["file"]).read_bytes() == (single / e["file"]).read_bytes() for e in manifest["shards"])
    got = read_all(grown)  # other batches (30, then 50 new): equal up to the batches' float rounding
    assert got.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], **TOL)
    precompute(recipe, PrecomputeJob(input=tmp_path / "first.jsonl", out=grown, batch_size=8, progress=False))
    assert collect(grown).removed == 50
    shrunk, reference = read_all(grown), {k: v[:30] for k, v in expected.items()}
    if "mask" in shrunk:  # the batch of the first 30 rows is as long as its own longest row
        length = shrunk["sequence"].shape[1]
        reference = {**reference, "sequence": reference["sequence"][:, :length], "mask": reference["mask"][:, :length]}
    for key in reference:
        torch.testing.assert_close(shrunk[key], reference[key], **TOL)


def test_a_damaged_row_is_caught_and_verify_re_encodes_it(recipe, tmp_path):
    """Bug: a T5 row's checksum covering only part of it (SD3's second part, the kept rows, the length)."""
    captions = laion_like(20, seed=8)
    out = tmp_path / "store"
    job = PrecomputeJob(input=write_jsonl(tmp_path / "c.jsonl", captions), out=out, batch_size=8, shard_size=8,
                        progress=False)  # a shard a batch: --verify re-encodes shard 1 in the batch it was made in
    precompute(recipe, job)
    expected = read_all(out)
    shard = out / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-200] ^= 0x01  # in the held parts, pooled, lengths or checks: the end of the file
    data[len(data) // 2] ^= 0x40  # in the streamed part's rows
    shard.write_bytes(bytes(data))
    store = EmbeddingStore(out)
    with pytest.raises(ValueError, match=r"shard-00001.safetensors (row \d+ .*checksum mismatch|: tensor 'lengths')"):
        store.__getitems__(list(range(20)))
    with pytest.raises(ValueError, match=r"shard-00001.safetensors"):
        [store[i] for i in range(20)]  # noqa: B018 (each row checked on its own too)
    precompute(recipe, PrecomputeJob(input=job.input, out=out, batch_size=8, verify=True, progress=False))
    for key, value in read_all(out).items():  # its captions re-encoded (into new slots) in the batch they were
        assert torch.equal(value, expected[key]), key  # made in: the same bits


def test_variants_of_different_lengths(recipe, tmp_path):
    """Bug: a masked batch as long as variant 0's rows while a chosen variant is longer (its rows cut off)."""
    rows = [{"caption": ["a cat", "a very long caption about a cat " * 6][: 1 + i % 2]} for i in range(12)]
    path = tmp_path / "v.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    precompute(recipe, PrecomputeJob(input=path, out=tmp_path / "store", progress=False))
    store = EmbeddingStore(tmp_path / "store")
    collate = store.collate(variant="random", seed=0)
    batch = collate(store.__getitems__(list(range(12))))
    chosen = collate.variants(list(range(12)))
    assert 1 in chosen
    texts = [r["caption"][v] for r, v in zip(rows, chosen, strict=True)]
    expected = recipe(texts)
    if expected.mask is not None:
        assert torch.equal(batch["mask"], expected.mask)
    torch.testing.assert_close(batch["sequence"], expected.sequence, **TOL)
    shutil.rmtree(tmp_path / "store")


def test_a_batch_of_another_variant_is_as_long_as_its_own_longest_row(pixart, tmp_path):
    """Bug: a batch of variant 1 sized by variant 0's rows (the fetch reads variant 0): 61 masked rows where the
    chosen captions keep 6, a shape tc() never gives."""
    long = "a very long caption about a red cat on a blue chair " * 4
    rows = [{"caption": [f"{long} number {i}", f"cat {i}"]} for i in range(8)]
    path = tmp_path / "v.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    precompute(pixart, PrecomputeJob(input=path, out=tmp_path / "store", progress=False))
    store = EmbeddingStore(tmp_path / "store")
    expected = pixart([r["caption"][1] for r in rows])
    for got in (store.collate(variant=1)(store.__getitems__(list(range(8)))),
                next(iter(DataLoader(store, batch_size=8, collate_fn=store.collate(variant=1))))):
        assert got["sequence"].shape == expected.sequence.shape and torch.equal(got["mask"], expected.mask)
        torch.testing.assert_close(got["sequence"], expected.sequence, **TOL)


def test_items_read_one_by_one_collate_to_the_batchs_longest_row(pixart_store):
    """Bug: rows read one at a time (a ConcatDataset or your own wrapper: ``store[i]``, each at the full 300
    rows) stacked as they come, so the batch keeps every padding row the store's own fetch leaves out."""
    from torch.utils.data import ConcatDataset

    out, _ = pixart_store
    store = EmbeddingStore(out)
    loader = DataLoader(ConcatDataset([store]), batch_size=8, sampler=list(range(40, 56)),
                        collate_fn=store.collate())
    for got in loader:
        want = store.batch(got["row"].tolist())
        assert got["sequence"].shape == want["sequence"].shape and torch.equal(got["sequence"], want["sequence"])
        assert torch.equal(got["mask"], want["mask"]) and got["sequence"].shape[1] < 300


def test_inspect_prints_bytes_per_row_and_the_share_saved(pixart_store, capsys):
    """Bug: inspect silent on what trimming saved, or a figure from the padded shape instead of the shards."""
    from clipcond.cli import main

    out, _ = pixart_store
    assert main(["inspect", str(out)]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("  rows (PixArtSigmaPipeline)"))
    assert "the rows each mask keeps" in line
    stored = sum((out / e["file"]).stat().st_size for e in json.loads((out / "manifest.json").read_text())["shards"])
    share = stored / 120 / (300 * 96 * 4)
    assert f"{share:.1%} of the 115.2 KB of a padded row" in line and share < 0.15


def test_inspect_names_a_t5_recipe_without_a_pipeline(t5_vocab, tmp_path, capsys):
    """Bug: a `t5-xxl` store (no pipeline named) described as "rows (CLIP)"."""
    tc = TextConditioner.from_pretrained("tiny-t5-xxl", tokenizer=t5_vocab["sd3"])
    precompute(tc, PrecomputeJob(input=write_jsonl(tmp_path / "c.jsonl", ["a cat", "a dog"]), out=tmp_path / "s",
                                 progress=False))
    assert main(["inspect", str(tmp_path / "s")]) == 0
    assert "  rows (tiny-t5-xxl): whole rows" in capsys.readouterr().out


def test_a_format_2_manifest_reads_as_one_whole_part(tmp_path):
    """Bug: stores written before row layouts (format 2, no "parts") refused or misread."""
    from clipcond.store.manifest import Manifest

    tc = TextConditioner.from_pretrained("tiny-sd15")
    precompute(tc, PrecomputeJob(input=write_jsonl(tmp_path / "c.jsonl", ["a cat", "a dog"]), out=tmp_path / "s",
                                 progress=False))
    path = tmp_path / "s" / "manifest.json"
    data = json.loads(path.read_text())
    assert data["format_version"] == 3 and data["parts"] == [["sequence", 77, 32, False]]
    del data["parts"]
    path.write_text(json.dumps({**data, "format_version": 2}))
    assert Manifest.read(tmp_path / "s").layout.plain
    torch.testing.assert_close(EmbeddingStore(tmp_path / "s")[1]["sequence"], tc("a dog").sequence[0])
    path.write_text(json.dumps({**data, "format_version": 2, "parts": [["sequence", 77, 32, False]]}))
    with pytest.raises(ValueError, match="a version-2 manifest has no parts"):
        EmbeddingStore(tmp_path / "s")


def test_a_sana_store_keeps_the_bos_row_and_the_prompt_rows(t5_pipes, tmp_path):
    """Bug: Sana's kept rows counted from the instruction's tokens (its prefix stored, or the prompt cut), or its
    null stored with the instruction."""
    tc = TextConditioner.from_pretrained("sana", weights=t5_pipes.sana)
    captions = ["a photo of a cat", "an astronaut riding a horse on mars, 8k", "a cat"]
    precompute(tc, PrecomputeJob(input=write_jsonl(tmp_path / "c.jsonl", captions), out=tmp_path / "store",
                                 batch_size=2, progress=False))
    store, expected = EmbeddingStore(tmp_path / "store"), tc(captions)
    assert [int(s["lengths"].sum()) for s in shard_tensors(tmp_path / "store")] == [int(expected.mask.sum())]
    batch = store.collate()(store.__getitems__([0, 1, 2]))
    assert torch.equal(batch["mask"], expected.mask)
    torch.testing.assert_close(batch["sequence"], expected.sequence, **TOL)
    assert torch.equal(store.null(1).mask, tc.null(1).padded(300).mask)  # the BOS row alone


@pytest.mark.parametrize("name", ["chroma", "auraflow"])
def test_chroma_and_auraflow_stores_read_back_as_their_pipelines_encode(t5_pipes, tmp_path, name):
    """Bug: Chroma's kept pad row not stored or not in the mask (its transformer attends to it), or AuraFlow's
    batches cut to their longest row (its transformer takes no mask and attends to all 256 rows, zeros included).
    The reference is the diffusers pipeline's encode_prompt on the same weights."""
    chroma = name == "chroma"
    tc = TextConditioner.from_pretrained(name, weights=t5_pipes.chroma if chroma else t5_pipes.aura)
    pipe = t5_pipes.chroma_pipeline() if chroma else t5_pipes.aura_pipeline()
    captions = ["a photo of a cat", "an astronaut riding a horse on mars, 8k", "a cat", "a red car in a city at night"]
    precompute(tc, PrecomputeJob(input=write_jsonl(tmp_path / "c.jsonl", captions), out=tmp_path / "store",
                                 batch_size=2, progress=False))
    store = EmbeddingStore(tmp_path / "store")
    batch = store.collate()(store.__getitems__([0, 1, 2, 3]))
    if chroma:
        embeds, _, mask, _, _, null_mask = pipe.encode_prompt(captions, device="cpu", max_sequence_length=512)
        null = pipe.encode_prompt(captions[:1], device="cpu")[3]
    else:
        embeds, mask, null, null_mask = pipe.encode_prompt(captions, device="cpu")
        mask, null_mask = mask.reshape(4, 256, -1)[..., 0], null_mask.reshape(4, 256, -1)[..., 0]
    mask, length = mask.long(), batch["sequence"].shape[1]
    assert length == (int(mask.sum(1).max()) if chroma else 256)  # Chroma's longest kept row; AuraFlow's 256
    assert torch.equal(batch["mask"], mask[:, :length]) and not mask[:, length:].any()
    kept = mask[:, :length].bool()
    torch.testing.assert_close(batch["sequence"][kept], embeds[:, :length][kept], **TOL)
    assert not batch["sequence"][~kept].any()  # zeros: diffusers' too for AuraFlow; Chroma's are never read
    assert sum(int(s["lengths"].sum()) for s in shard_tensors(tmp_path / "store")) == int(mask.sum())
    width = int(null_mask[0].sum())  # "": its EOS (and Chroma's kept pad)
    torch.testing.assert_close(store.null(1).sequence[0, :width], null[0, :width], **TOL)
    assert torch.equal(store.null(1).mask[0], null_mask[0].long())


def test_the_joined_loader_reads_masked_rows_into_reused_memory(pixart_store):
    """Bug: JoinedLoader losing a masked batch's mask or length, joining rows to the wrong items, or a reused
    segment keeping the last batch's rows past a shorter batch's kept rows (memory taken as zeros when it is not):
    120 rows in batches of 4 for 3 epochs, shuffled, through a few segments per worker."""
    from clipcond import JoinedLoader

    out, _ = pixart_store
    store = EmbeddingStore(out)
    latents = [{"latent": torch.full((4, 2, 2), float(i))} for i in range(len(store))]
    loader = JoinedLoader(latents, store, batch_size=4, shuffle=True, num_workers=2, persistent_workers=True,
                          collate=store.collate())
    seen, segments = 0, {}
    for _ in range(3):
        for batch in loader:
            segments.update((id(s), s) for r in Receiver.known.values() for _, s in r.segments.values())
            rows = batch["row"].tolist()
            assert batch["latent"][:, 0, 0, 0].tolist() == [float(r) for r in rows]
            ref = store.collate()(store.__getitems__(rows))  # the main process's own read
            assert torch.equal(batch["mask"], ref["mask"]) and torch.equal(batch["sequence"], ref["sequence"])
            seen += len(rows)
    assert seen == 3 * len(store) and len(segments) < seen // 4 // 3  # reused: fewer than a third of the batches


def test_length_grouped_batches_of_a_masked_store(pixart, pixart_store):
    """Bug: the sampler dropping or repeating rows, ignoring the epoch or seed, or batches as long as shuffled
    ones (a masked batch is as long as its longest row: the padding a transformer would attend over)."""
    from clipcond import LengthGroupedSampler

    out, captions = pixart_store
    store = EmbeddingStore(out)
    lengths = store.kept_lengths()
    assert lengths.tolist() == pixart(captions).mask.sum(1).tolist()  # each row's own, in input order
    sampler = LengthGroupedSampler(lengths, 8, seed=0, mega=4)
    first = list(sampler)
    assert sorted(first) == list(range(len(store))) and list(sampler) == first
    sampler.set_epoch(1)
    assert list(sampler) != first and sorted(sampler) == list(range(len(store)))
    grouped = DataLoader(store, batch_size=8, sampler=sampler, collate_fn=store.collate())
    shuffled = DataLoader(store, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0),
                          collate_fn=store.collate())
    width = {name: sum(b["sequence"].shape[1] * len(b["row"]) for b in loader) / len(store)
             for name, loader in (("grouped", grouped), ("shuffled", shuffled))}
    assert width["grouped"] < 0.7 * width["shuffled"], width


def test_a_masked_store_counts_its_truncated_captions(pixart, tmp_path):
    """Bug: a masked recipe's shard, tokenized whole and cut into batches, losing or misnumbering its truncation
    notes (the manifest's count of captions cut to 300 tokens)."""
    captions = laion_like(11, seed=9) + ["a very long caption " * 120]
    precompute(pixart, PrecomputeJob(input=write_jsonl(tmp_path / "c.jsonl", captions), out=tmp_path / "store",
                                     batch_size=4, progress=False))
    store = EmbeddingStore(tmp_path / "store")
    assert store.manifest.truncated == 1 and store.kept_lengths().max() == 300
    torch.testing.assert_close(store[11]["sequence"], pixart(captions[11:]).sequence[0], **TOL)


def test_sd3_truncation_is_reported_per_tower(sd3, t5_vocab, tmp_path, caplog, capsys):
    """Bug: SD3's truncation warning and `clipcond inspect` said "longer than 333 tokens" (the assembled row's
    length), a limit no tower has: CLIP-L and G take 77 tokens, T5 256."""
    captions = ["a cat", "a very long caption " * 30]  # 121 CLIP tokens, under 256 T5 tokens
    assert len(open_clip.tokenize(captions[1:], context_length=200)[0].nonzero()) > 77
    with caplog.at_level(logging.WARNING, logger="clipcond"):
        precompute(sd3, PrecomputeJob(input=write_jsonl(tmp_path / "c.jsonl", captions), out=tmp_path / "store",
                                      progress=False))
    limits = "77 CLIP tokens or 256 tiny-t5-v1_1-xxl tokens"  # the tiny twin of T5-XXL
    assert f"1 unique captions were longer than {limits} and were truncated" in caplog.text, caplog.text
    assert main(["inspect", str(tmp_path / "store")]) == 0
    out = capsys.readouterr().out
    assert f"1 unique captions truncated to {limits}" in out
    # A T5 shorter than the CLIP towers' 77: a caption only T5 cuts counts too (not only the first tower's cuts).
    short = TextConditioner.from_pretrained(sd3.spec.replace(t5_max_length=16), tokenizer=t5_vocab["sd3"])
    precompute(short, PrecomputeJob(input=write_jsonl(tmp_path / "d.jsonl", ["a cat", " ".join(["a photo"] * 12)]),
                                    out=tmp_path / "short", progress=False))
    assert json.loads((tmp_path / "short" / "manifest.json").read_text())["truncated"] == 1
    rows = next(line for line in out.splitlines() if line.startswith("  rows (StableDiffusion3Pipeline): "))
    saved = float(re.search(r"\(([\d.]+) % saved\)", rows)[1])  # the CLIP rows' 16 zero columns of 96
    assert 0 < saved < 100 * (77 * 16) / (333 * 96 + 80), rows


@pytest.mark.parametrize(("name", "dtype"), [("tiny-sd3", torch.float16), ("tiny-pixart-sigma", torch.bfloat16)])
def test_half_precision_t5_stores_read_back_bit_for_bit(t5_vocab, tmp_path, name, dtype):
    """Bug: a part or the kept rows written or checked in another dtype than the store's (fp16 / bf16 are what real
    runs store), or their row checks computed over other bytes than a read copies."""
    tc = TextConditioner.from_pretrained(name, tokenizer=t5_vocab["sd3"], dtype=dtype)
    captions = laion_like(12, seed=10)
    precompute(tc, PrecomputeJob(input=write_jsonl(tmp_path / "c.jsonl", captions), out=tmp_path / "store",
                                 batch_size=12, progress=False))
    store = EmbeddingStore(tmp_path / "store")
    assert store.dtype == dtype
    batch = store.collate()(store.__getitems__(list(range(12))))
    expected = tc(captions)  # one batch of 12, as precompute encoded it: the same bits
    assert torch.equal(batch["sequence"], expected.sequence) and torch.equal(batch["pooled"], expected.pooled)
    assert all(torch.equal(store[i]["sequence"][: expected.sequence.shape[1]], expected.sequence[i])
               for i in range(12))
