"""Ragged caption variants in a store: rows with fewer captions than the most a row has (index ``rows``
[N, kmax] with ``-1`` after a row's last variant), read by ``EmbeddingStore`` and kept by ``gc``.

The ragged index is written here through the format's own writer (``IndexFormat.write``) over a precomputed
store whose rows all have 3 captions, as the precompute writes one for a list column of uneven lists.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from clipcond import EmbeddingStore, TextConditioner
from clipcond.precompute.job import PrecomputeJob, precompute
from clipcond.store.format import IndexFormat, read_tensors
from clipcond.store.gc import collect
from clipcond.store.manifest import Manifest

ROWS = 12
COUNTS = [3, 1, 2, 3, 1, 1, 2, 3, 2, 1, 3, 2]  # each row's own number of captions


@pytest.fixture(scope="module")
def tc() -> TextConditioner:
    return TextConditioner.from_pretrained("tiny-sd15")


@pytest.fixture(scope="module")
def full(tmp_path_factory, tc) -> Path:
    """A store of 12 rows with 3 distinct captions each (36 slots, shards of 8)."""
    root = tmp_path_factory.mktemp("variants")
    captions = root / "captions.jsonl"
    captions.write_text("".join(json.dumps({"caption": [f"row {i} caption {j}" for j in range(3)], "id": f"r{i}"})
                                + "\n" for i in range(ROWS)))
    precompute(tc, PrecomputeJob(input=captions, out=root / "store", id_column="id", shard_size=8, progress=False))
    return root / "store"


def write_index(out: Path, rows: np.ndarray, generation: str = "ragged0000000001") -> None:
    """Publish ``rows`` [N, k] as the store's index (keys and ids as they were) and point the manifest at it."""
    manifest = Manifest.read(out)
    old = read_tensors(out / manifest.index.file)
    ids = {name: (old[name].dtype, tuple(old[name].shape), [old[name].numpy()]) for name in IndexFormat.IDS}
    rows = np.ascontiguousarray(rows, dtype=np.int64)
    entry = IndexFormat.write(out, generation, (rows.shape, [rows]), (len(old["keys"]), [old["keys"].numpy()]), ids)
    replace(manifest, index=entry, generation=generation).write(out)


@pytest.fixture()
def ragged(full, tmp_path) -> tuple[Path, np.ndarray]:
    """A copy of ``full`` whose row i keeps only its first COUNTS[i] captions (-1 after them), and the original
    [N, 3] slots."""
    out = Path(shutil.copytree(full, tmp_path / "store"))
    slots = EmbeddingStore(out)._slots.copy()  # [N, 3]
    rows = slots.copy()
    for i, k in enumerate(COUNTS):
        rows[i, k:] = IndexFormat.MISSING
    write_index(out, rows)
    return out, slots


def test_each_row_reads_its_own_variants_and_no_more(ragged, full):
    """A -1 slot was read as slot -1: bisection put it in the last shard and its row -1, another caption's
    embedding with a valid row check. Now ``variant_count(i)`` is the row's own number, ``variants`` the most,
    and asking for a variant the row lacks is an IndexError naming the row and its count."""
    out, slots = ragged
    store, before = EmbeddingStore(out), EmbeddingStore(full)
    assert store.variants == 3 and [store.variant_count(i) for i in range(ROWS)] == COUNTS
    for i, k in enumerate(COUNTS):
        for j in range(k):
            assert torch.equal(store.get(i, j)["sequence"], before.get(i, j)["sequence"])
    with pytest.raises(IndexError, match=r"variant 1 is out of range: row 1 of store .* has 1 caption variant\(s\) "
                                         r"\(the most a row has: 3\)"):
        store.get(1, variant=1)
    with pytest.raises(IndexError, match=r"variant 2 is out of range: row 2 of store .* has 2 caption variant"):
        store.get(2, variant=2)
    with pytest.raises(IndexError, match="variant 3 is out of range"):
        store.get(0, variant=3)


def test_random_variants_are_uniform_over_each_row_s_own_count_and_reproducible(ragged):
    """``collate(variant="random")`` drew among kmax variants for every row, so a row with one caption got a
    missing slot 2 times in 3. Now each row's pick is uniform over its own count, the same for a (seed, epoch,
    row) whatever the batching and workers, and changes with the epoch."""
    store = EmbeddingStore(ragged[0])
    seen: dict[int, Counter] = {i: Counter() for i in range(ROWS)}
    for seed in range(300):
        for i, v in enumerate(store.collate(seed=seed, variant="random").variants(range(ROWS))):
            seen[i][v] += 1
    for i, k in enumerate(COUNTS):
        assert set(seen[i]) == set(range(k)), (i, seen[i])
        assert all(abs(n - 300 / k) < 5 * (300 / k) ** 0.5 for n in seen[i].values()), (i, seen[i])  # ~uniform
    collate = store.collate(0.0, seed=7, variant="random")
    picked = collate.variants(range(ROWS))
    batch = collate([store[i] for i in range(ROWS)])
    for i, v in enumerate(picked):
        assert torch.equal(batch["sequence"][i], store.get(i, v)["sequence"])
    loader = DataLoader(store, batch_size=5, num_workers=2, collate_fn=collate)
    assert torch.equal(torch.cat([b["sequence"] for b in loader]), batch["sequence"])
    collate.set_epoch(1)
    assert collate.variants(range(ROWS)) != picked


def test_a_fixed_variant_a_row_lacks_is_an_error_naming_row_and_count(ragged):
    """``collate(variant=2)`` on a batch holding a row with one caption: an IndexError naming that row and its
    count, not the slot -1 (another row's caption)."""
    store = EmbeddingStore(ragged[0])
    collate = store.collate(variant=2)
    assert torch.equal(collate([store[0], store[3]])["sequence"][1], store.get(3, 2)["sequence"])
    with pytest.raises(IndexError, match=r"variant 2 is out of range: row 1 of store .* has 1 caption variant"):
        collate([store[0], store[1]])
    with pytest.raises(ValueError, match=r"variant must be 'random' or in \[0, 3\), got 3"):
        store.collate(variant=3)


def test_gc_keeps_missing_variants_missing(ragged, full):
    """gc marked ``referenced[rows.flatten()]``, so a -1 kept the last slot alive, and remapped -1 to that slot's
    new number: after gc a row with one caption had a second (another row's). Now -1 stays -1 and every
    present variant reads the same embedding as before."""
    out, _ = ragged
    result = collect(out)
    assert result.removed == sum(3 - k for k in COUNTS) and result.kept == sum(COUNTS)
    store, before = EmbeddingStore(out, verify=True), EmbeddingStore(full)
    missing = np.array([[j >= k for j in range(3)] for k in COUNTS])  # [N, 3]
    assert np.array_equal(store._slots == IndexFormat.MISSING, missing)
    assert [store.variant_count(i) for i in range(ROWS)] == COUNTS
    for i, k in enumerate(COUNTS):
        for j in range(k):
            assert torch.equal(store.get(i, j)["pooled"], before.get(i, j)["pooled"])


@pytest.mark.parametrize(("row", "slots", "why"), [
    (4, [-1, 5, 6], "column 0 missing"), (5, [3, -1, 7], "a slot after a -1"), (6, [3, 4, 10**6], "past the slots"),
    (7, [3, 4, -2], "below -1")])
def test_an_index_with_holes_in_the_wrong_places_is_refused(full, tmp_path, row, slots, why):
    """Rows must be packed left with column 0 always a slot: a hole anywhere else would be read as a slot (or
    make variant 0 missing). The index is written consistently (sha256 in the manifest), so only the layout
    check stands between it and a wrong row."""
    out = Path(shutil.copytree(full, tmp_path / "store"))
    rows = EmbeddingStore(out)._slots.copy()
    rows[row] = slots
    write_index(out, rows)
    with pytest.raises(ValueError, match=rf"index-ragged0000000001.safetensors: tensor 'rows': row {row} has slots"):
        EmbeddingStore(out)


def test_numpy_and_torch_integers_are_variants_too(ragged):
    """store.get(0, variant=np.int64(1)) was refused as "out of range" (the check took only Python ints), and
    collate(variant=np.int64(1)) likewise; indices from numpy or torch are what training code has."""
    store = EmbeddingStore(ragged[0])
    j = next(i for i in range(len(store)) if store.variant_count(i) > 1)
    want = store.get(j, variant=1)["pooled"]
    assert torch.equal(store.get(j, variant=np.int64(1))["pooled"], want)
    assert torch.equal(store.get(j, variant=torch.tensor(1))["pooled"], want)
    store.collate(0.0, variant=np.int64(0))
    with pytest.raises(TypeError):
        store.get(j, variant=1.0)
