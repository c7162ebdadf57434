"""``EmbeddingStore``: rows, ids, DataLoader workers, caption dropout, and damage detection."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from clipcond import Conditioning, EmbeddingStore, JoinedDataset, TextConditioner
from clipcond._files import raw_bytes, safetensors_header
from clipcond.cli import main
from clipcond.precompute.job import PrecomputeJob, precompute
from clipcond.store.handover import SLOTS, Receiver
from clipcond.store.manifest import MANIFEST

ROWS = 400
CAPTIONS = [f"a photo of thing {i % 150}, style {i % 3}" for i in range(ROWS)]  # 150 distinct


@pytest.fixture(scope="module")
def tc() -> TextConditioner:
    return TextConditioner.from_pretrained("tiny-sdxl")


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory, tc) -> Path:
    root = tmp_path_factory.mktemp("store")
    path = root / "captions.jsonl"
    path.write_text("".join(json.dumps({"caption": c, "key": 1000 + i}) + "\n" for i, c in enumerate(CAPTIONS)))
    precompute(tc, PrecomputeJob(input=path, out=root / "store", id_column="key", shard_size=16, progress=False))
    return root / "store"


@pytest.fixture()
def damaged(store_dir, tmp_path) -> Path:
    """A private copy to break."""
    return Path(shutil.copytree(store_dir, tmp_path / "store"))


@pytest.fixture(scope="module")
def store(store_dir) -> EmbeddingStore:
    return EmbeddingStore(store_dir)


def test_rows_equal_direct_encoding_and_null(store, tc):
    assert len(store) == ROWS and store.num_unique == 150 and not store._handles  # shards opened lazily
    rows = [store[i] for i in range(0, ROWS, 7)]
    ref = tc([CAPTIONS[r["row"]] for r in rows])
    assert rows[0]["sequence"].shape == (77, 80) and rows[0]["pooled"].shape == (48,)
    torch.testing.assert_close(torch.stack([r["sequence"] for r in rows]), ref.sequence, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.stack([r["pooled"] for r in rows]), ref.pooled, atol=1e-5, rtol=1e-5)
    null = store.null(2)
    assert torch.equal(null.sequence, tc.null(2).sequence) and torch.equal(null.pooled, tc.null(2).pooled)
    assert store.spec == tc.spec and store.fingerprint == tc.fingerprint and store.dtype == torch.float32
    assert "rows=400, unique=150, encoder='tiny-sdxl'" in repr(store)


def test_indexing_and_ids(store):
    assert torch.equal(store[-1]["sequence"], store[ROWS - 1]["sequence"]) and store[-1]["row"] == ROWS - 1
    assert torch.equal(store[3]["sequence"], store[153]["sequence"])  # same caption, one embedding
    assert store.row_of(1005) == 5 and store.row_of("1005") == 5 and store.id_of(399) == "1399"
    assert store.by_id(1010)["row"] == 10
    with pytest.raises(IndexError, match=r"row 400 is out of range for store .* with 400 rows"):
        store[ROWS]
    with pytest.raises(TypeError, match="store row must be an int, got str"):
        store["7"]
    with pytest.raises(KeyError, match=r"id 5 is not in store .*ids from column 'key'"):
        store.by_id(5)


def test_store_without_ids_says_so(tmp_path, tc):
    path = tmp_path / "c.txt"
    path.write_text("a\nb\n")
    precompute(tc, PrecomputeJob(input=path, out=tmp_path / "s", progress=False))
    with pytest.raises(ValueError, match="has no ids: it was precomputed without --id-column"):
        EmbeddingStore(tmp_path / "s").by_id("a")


def test_dataloader_with_two_workers_sees_every_row_once(store):
    store[0]  # the parent has a shard open: forked workers must open their own
    loader = DataLoader(store, batch_size=32, shuffle=True, num_workers=2, generator=torch.Generator().manual_seed(0))
    seen, sequences = [], {}
    for batch in loader:
        cond = Conditioning(batch["sequence"], batch["pooled"])  # [B, 77, 80], [B, 48]
        assert cond.sequence.shape[1:] == (77, 80) and cond.pooled.shape[1:] == (48,)
        seen += batch["row"].tolist()
        sequences.update(zip(batch["row"].tolist(), cond.sequence, strict=True))
    assert sorted(seen) == list(range(ROWS))
    assert all(torch.equal(sequences[r], store[r]["sequence"]) for r in range(0, ROWS, 13))
    assert pickle.loads(pickle.dumps(store))[5]["row"] == 5  # spawn-started workers get a pickled copy


def dropped_rows(store: EmbeddingStore, collate, batch_size: int, *, num_workers: int = 0) -> set[int]:
    loader = DataLoader(store, batch_size=batch_size, shuffle=True, collate_fn=collate, num_workers=num_workers)
    null = store.null()
    rows = set()
    for batch in loader:
        for i, row in enumerate(batch["row"].tolist()):
            is_null = torch.equal(batch["sequence"][i], null.sequence[0]) and torch.equal(batch["pooled"][i],
                                                                                          null.pooled[0])
            assert bool(batch["dropped"][i]) == is_null  # tiny-sdxl's null is zeros: never a real caption
            if is_null:
                rows.add(row)
            else:
                assert torch.equal(batch["sequence"][i], store[row]["sequence"])
    return rows


class Images(Dataset):
    """A user's dataset: a latent, sizes, a caption string, an id and numbers of every kind default_collate takes."""

    def __len__(self) -> int:
        return ROWS

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(i)
        return {"latent": torch.randn((4, 8, 8), generator=g).to(torch.float16), "size": np.array([i, 2 * i]),
                "scale": i / 7, "step": i * 3, "flipped": i % 2 == 0, "text": f"image {i}", "key": 1000 + i}


class Ragged(Images):
    def __getitem__(self, i: int) -> dict:
        return {**super().__getitem__(i), "mask": torch.ones(i % 3 + 1)}  # shapes differ from row to row


def test_a_joined_batch_is_collated_as_default_collate_would(store):
    """JoinedDataset stacks your fields into the batch's memory itself (one copy with the store's rows): each must come
    out as default_collate makes it: float16 latents stay float16, Python ints int64, floats float64, bools bool,
    numpy int arrays int64, strings a list; a field whose shapes differ is left to the collate, which refuses it."""
    joined, collate = JoinedDataset(Images(), store), store.collate()
    for by, dataset in (("index", joined), ("id", JoinedDataset(Images(), store, by="id", id_key="key"))):
        rows = [5, 17, 3, 392, 250]
        batch = collate(dataset.__getitems__(rows))
        expected = default_collate([Images()[r] for r in rows])
        for key, value in expected.items():
            got = batch[key]
            assert type(got) is type(value), (by, key)
            if isinstance(value, torch.Tensor):
                assert got.dtype == value.dtype and torch.equal(got, value), (by, key)
            else:
                assert got == value, (by, key)
        assert batch["row"].tolist() == rows
        assert torch.equal(batch["sequence"], torch.stack([store[r]["sequence"] for r in rows]))
    with pytest.raises(RuntimeError, match="stack expects each tensor to be equal size"):
        collate(JoinedDataset(Ragged(), store).__getitems__([0, 1]))


def test_the_joined_loader_gives_the_joined_dataset_s_batches(store):
    """JoinedLoader (your items from 2 workers, the store's rows fetched in the main process) must give what the
    worker-side join gives: the same rows for the same items (by index and by id), the same caption dropout."""
    from clipcond import JoinedLoader

    order = [5, 17, 3, 392, 250, 0, 399, 42] * 4
    collate = store.collate(0.5, seed=3)
    reference = DataLoader(JoinedDataset(Images(), store), batch_size=8, sampler=order, collate_fn=collate)
    for by in ("index", "id"):
        loader = JoinedLoader(Images(), store, by=by, id_key="key", batch_size=8, sampler=order, num_workers=2,
                              collate=collate)
        assert len(loader) == 4
        for got, want in zip(loader, reference, strict=True):
            assert got.keys() == want.keys()
            for key, value in want.items():
                assert torch.equal(got[key], value) if isinstance(value, torch.Tensor) else got[key] == value, key
    with pytest.raises(TypeError, match="give the store's collate as collate="):
        JoinedLoader(Images(), store, collate_fn=collate)


class Buckets(Images):
    """Latents of two sizes, as aspect-ratio buckets give: rows 0-23 [4, 8, 8], the rest [4, 16, 16]."""

    def __getitem__(self, i: int) -> dict:
        item = super().__getitem__(i)
        side = 8 if i < 24 else 16
        return {**item, "latent": torch.randn((4, side, side), generator=torch.Generator().manual_seed(i))}


def mapped_segments() -> list[torch.Tensor]:
    """Every workers' segment this process has mapped (clipcond/store/handover.py)."""
    return [segment for receiver in Receiver.known.values() for _, segment in receiver.segments.values()]


def expected_batches(dataset: Dataset, order: list[int], batch: int) -> list[dict]:
    return list(DataLoader(dataset, batch_size=batch, sampler=order))  # torch's own: workers 0, default collate


def assert_batches_equal(got: dict, want: dict) -> None:
    assert list(got)[: len(want)] == list(want)  # your keys first, in your items' order
    for key, value in want.items():
        if isinstance(value, torch.Tensor):
            assert got[key].dtype == value.dtype and torch.equal(got[key], value), key
        else:
            assert got[key] == value, key


def test_the_joined_loader_never_writes_over_a_batch_you_hold(store):
    """Workers hand batches over through shared memory they reuse once the main process lets go of a batch. Bug:
    a segment written over while a batch made of it is still held (a loop keeping every batch, or the previous
    one), or fields read at the wrong offsets. Every batch kept to the end must still equal torch's default
    collate of the same items; the workers then run out of free segments and collate as torch does (as it does
    with no workers)."""
    from clipcond import JoinedLoader

    order = list(range(0, ROWS, 3))
    for dataset, workers in ((Images(), 2), (Buckets(), 2), (Buckets(), 0)):
        loader = JoinedLoader(dataset, store, batch_size=8, sampler=order, num_workers=workers)
        kept = list(loader)
        for got, want in zip(kept, expected_batches(dataset, order, 8), strict=True):
            assert_batches_equal(got, want)
            assert got["row"].tolist() == want["step"].div(3).tolist()


def assert_rows_of(store: EmbeddingStore, batch: dict) -> None:
    """``batch`` holds the store's rows ``batch["row"]``, as the main process reads them."""
    want = store.batch(batch["row"].tolist())
    assert torch.equal(batch["sequence"], want["sequence"]) and torch.equal(batch["pooled"], want["pooled"])


class LazyStore(Dataset):
    """A dataset that opens the store in each worker, as a webdataset pipeline does (examples/webdataset_latents.py),
    and returns a batch's rows from ``store.batch``."""

    def __init__(self, path: Path) -> None:
        self.path, self.store = path, None

    def __len__(self) -> int:
        return ROWS

    def __getitems__(self, rows: list[int]) -> dict:
        self.store = self.store or EmbeddingStore(self.path)
        return self.store.batch(rows)


class ThreadedFetch(Dataset):
    """A dataset whose ``__getitems__`` fetches two halves of a batch from two threads of the worker at once."""

    def __init__(self, store: EmbeddingStore) -> None:
        self.store = store

    def __len__(self) -> int:
        return len(self.store)

    def __getitems__(self, rows: list[int]) -> dict:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(2) as pool:
            halves = list(pool.map(self.store.batch, [rows[:4], rows[4:]]))
        return {key: torch.cat([half[key] for half in halves]) for key in ("sequence", "pooled", "row")}


class Reopening(torch.utils.data.IterableDataset):
    """Opens the store at every ``__iter__`` (each epoch, in each persistent worker), as webdataset pipelines do."""

    def __init__(self, path: Path, order: list[int]) -> None:
        self.path, self.order = path, order

    def __iter__(self):  # noqa: ANN204
        store, info = EmbeddingStore(self.path), torch.utils.data.get_worker_info()
        mine = self.order[info.id :: info.num_workers] if info else self.order
        for a in range(0, len(mine), 8):
            yield store.collate()(store.__getitems__(mine[a : a + 8]))


class Caching(Dataset):
    """A dataset that keeps the rows of two hot batches in the worker and hands them out again in later epochs."""

    def __init__(self, store: EmbeddingStore) -> None:
        self.store, self.cache = store, {}

    def __len__(self) -> int:
        return len(self.store)

    def __getitems__(self, rows: list[int]) -> list:
        if rows[0] < 16:
            return self.cache.setdefault(tuple(rows), self.store.__getitems__(rows))
        return self.store.__getitems__(rows)


_SIDE: list = []  # a queue to another process, for the collate below


def _also_elsewhere(rows: list) -> dict:
    """Every other batch also sent to another process (a monitor) through a pipe, before the DataLoader sends it:
    the slots go round between batches the main process receives and batches the monitor does."""
    batch = _STORE_COLLATE[0](rows)
    if rows[0]["row"] % 32 == 0:
        _SIDE[1].send(batch)  # pickled here and now, by the multiprocessing pickler
    return batch


def _drain(end) -> None:  # noqa: ANN001
    while end.recv() is not None:
        pass


def _as_they_are(rows: list) -> object:
    return rows


def _their_batch(rows: list) -> dict:
    return dict(rows.batch)


def _views_then_lent(rows: list) -> dict:
    """A view of the rows pickled (by torch: copied) before the store's batch is handed over."""
    return {"extra": rows.batch["pooled"], "cond": _STORE_COLLATE[0](rows)}


def _rows_then_lent(rows: list) -> tuple:
    return rows, _STORE_COLLATE[0](rows)


def _two_collates(rows: list) -> dict:
    """Two batches over one fetch: only one of them can be handed over through the slot."""
    return {"cond": _STORE_COLLATE[0](rows), "again": _STORE_COLLATE[1](rows)}


def _pickled_first(rows: list) -> dict:
    """A collate that pickles (caches, measures) the batch before returning it: not the hand-over."""
    import pickle

    batch = _STORE_COLLATE[0](rows)
    pickle.dumps(batch)
    return batch


_STORE_COLLATE: list = []  # the test's store.collate() twice, for the module-level collates above (fork workers)
WAYS = {"store.collate()": lambda batch: batch, "the rows as they are": lambda rows: rows.batch,
        "a dict of their views": lambda batch: batch, "default_collate": lambda batch: batch,
        "a store opened in the worker": lambda batch: batch, "a view, then the batch": lambda out: out["cond"],
        "the rows, then the batch": lambda out: out[1], "two collates of one fetch": lambda out: out["cond"],
        "pickled in the worker first": lambda batch: batch, "two threads of a worker": lambda batch: batch,
        "rows the worker keeps": lambda batch: batch, "also sent to another process": lambda batch: batch}


@pytest.mark.parametrize("way", list(WAYS))
def test_a_store_read_by_workers_never_has_a_batch_written_over(store, store_dir, way):
    """A plain DataLoader over the store: the workers fetch into shared memory they reuse, and store.collate()
    hands the batch over through it. Every other way a batch can leave a worker (a collate that returns the rows as
    they are, a dict of their views, stacks them again, pickles the batch itself, or makes two batches of one fetch;
    views of it pickled by torch before it; a store opened in the worker; two threads fetching at once; rows the
    worker keeps and hands out again; the batch also sent to another process) must never let a slot be written
    over while a process still reads it, nor fail. Bug: a slot given back twice (once by the worker when its views
    die, once by the main process), or when torch's pickler shared it, or while the worker still holds the rows;
    two threads taking one slot; a segment taken as sent when another process received it; a batch read from a
    slot another batch now fills. Every batch is kept to the end of three epochs, then compared with the main
    process's own reads of the rows the sampler gave."""
    order = list(range(0, ROWS, 2))
    _STORE_COLLATE[:] = [store.collate(), store.collate(0.0, seed=3)]
    ways = {"store.collate()": (store, store.collate()), "the rows as they are": (store, _as_they_are),
            "a dict of their views": (store, _their_batch), "default_collate": (store, None),
            "a store opened in the worker": (LazyStore(store_dir), _as_they_are),
            "a view, then the batch": (store, _views_then_lent),
            "the rows, then the batch": (store, _rows_then_lent), "two collates of one fetch": (store, _two_collates),
            "pickled in the worker first": (store, _pickled_first),
            "two threads of a worker": (ThreadedFetch(store), _as_they_are),
            "rows the worker keeps": (Caching(store), store.collate()),
            "also sent to another process": (store, _also_elsewhere)}
    dataset, collate_fn = ways[way]
    context = torch.multiprocessing.get_context("fork")
    _SIDE[:] = context.Pipe(duplex=False)  # (receiving end, sending end)
    monitor = context.Process(target=_drain, args=(_SIDE[0],), daemon=True)
    monitor.start()
    loader = DataLoader(dataset, batch_size=8, sampler=order, num_workers=2, collate_fn=collate_fn,
                        persistent_workers=True, prefetch_factor=4, multiprocessing_context=context)
    expected = [order[a : a + 8] for a in range(0, len(order), 8)] * 3
    if way == "rows the worker keeps":  # each batch dropped at once: the slots go round while the worker keeps some
        for batch, rows in zip((batch for _ in range(3) for batch in loader), expected, strict=True):
            assert batch["row"].tolist() == rows
            assert_rows_of(store, batch)
        kept = []
    else:
        kept = [WAYS[way](batch) for _ in range(3) for batch in loader]
        assert [batch["row"].tolist() for batch in kept] == expected
    _SIDE[1].send(None)
    monitor.join(timeout=30)
    for batch in kept:
        assert_rows_of(store, batch)


def test_a_batch_freed_by_the_garbage_collector_gives_its_slot_back_without_a_deadlock(monkeypatch):
    """Bug: the worker's lock not reentrant: a batch in a reference cycle, freed by the cyclic collector at an
    allocation inside a locked section (choosing the next slot, placing a batch's tensors), gives its slot back on
    the same thread, which then waits for itself forever."""
    import gc
    import threading

    from clipcond.store import handover

    monkeypatch.setattr(handover, "get_worker_info", lambda: object())  # this thread as a DataLoader worker
    monkeypatch.setattr(handover, "_lending", None)
    lending = handover.lending()
    batch = lending.memory(64)  # slot 0 lent to it
    cycle: list = [batch]
    cycle.append(cycle)
    del batch, cycle  # garbage only the cyclic collector frees

    def collect_while_locked() -> None:
        with lending.lock:
            gc.collect()  # as an allocation in a locked section would trigger it

    gc.disable()
    try:
        thread = threading.Thread(target=collect_while_locked, daemon=True)
        thread.start()
        thread.join(timeout=20)
    finally:
        gc.enable()
    assert not thread.is_alive(), "deadlock: Lease.back waits for the lock its own thread holds"
    assert not lending.viewed[0]  # the slot given back


def test_a_process_forked_from_the_receiver_never_gives_its_slots_back(store):
    """Bug: a process forked from the main process (a second DataLoader's worker) collecting the received batches
    it inherited runs their finalizers, which clear the worker's shared flags: the slot is given back although the
    main process still holds its batch, and the worker writes over it."""
    import os

    loader = DataLoader(store, batch_size=8, sampler=list(range(16)), num_workers=1, collate_fn=store.collate(),
                        persistent_workers=True)
    batches = list(loader)  # held here
    held = [r.flags.numpy()[:SLOTS].copy() for r in Receiver.known.values() if r.segments]
    child = os.fork()
    if child == 0:  # the forked process lets go of everything it inherited
        batches.clear()
        import gc

        gc.collect()
        os._exit(0)
    os.waitpid(child, 0)
    assert [r.flags.numpy()[:SLOTS].tolist() for r in Receiver.known.values() if r.segments] == \
        [h.tolist() for h in held]
    assert sum(int(h.sum()) for h in held) >= 2  # both batches' slots still held by this process
    for batch in batches:
        assert_rows_of(store, batch)


def test_stores_opened_again_and_again_in_a_worker_keep_its_memory_bounded(store_dir):
    """Bug: every store opened in a worker lending memory of its own (a new set of segments and a new receiver in
    the main process each epoch, none let go while the worker lives): the main process's mapped memory grows
    epoch after epoch. One worker process lends one set, whatever the stores."""
    order = list(range(0, ROWS, 2))
    loader = DataLoader(Reopening(store_dir, order), batch_size=None, num_workers=2, persistent_workers=True,
                        collate_fn=_as_they_are)
    before = set(Receiver.known)
    for _ in range(6):
        assert sorted(r for batch in loader for r in batch["row"].tolist()) == order
    assert len(set(Receiver.known) - before) == 2  # the two workers'


def test_a_store_read_by_workers_reuses_their_memory(store):
    """Bug: the plain DataLoader path making a new segment every batch (store.collate() not handing the batch over
    through the worker's memory), or slots never given back by the main process."""
    order = list(range(ROWS))
    loader = DataLoader(store, batch_size=8, sampler=order, num_workers=2, collate_fn=store.collate(),
                        persistent_workers=True)
    before = {id(s) for s in mapped_segments()}
    segments = {}
    for _ in range(2):
        for batch in loader:
            assert_rows_of(store, batch)
            assert any(s.data_ptr() <= batch["sequence"].data_ptr() < s.data_ptr() + len(s)
                       for s in mapped_segments())
            segments.update((id(s), s) for s in mapped_segments() if id(s) not in before)
            del batch
    assert len(segments) <= 2 * SLOTS, (len(segments), 2 * len(order) // 8)


def test_every_batch_saves_and_loads_with_torch(store, tmp_path):
    """``torch.save`` of a batch as the store hands it out: in the main process, from a worker's reused memory,
    from a worker's new segments (every slot held), and a joined batch. Bug: a batch's tensors of several dtypes as
    views of one buffer ("Cannot save multiple tensors or storages that view the same data as different types")."""
    from clipcond import JoinedLoader

    loader = DataLoader(store, batch_size=8, sampler=list(range(0, 12 * 8)), num_workers=1,
                        collate_fn=store.collate(), prefetch_factor=2)
    held = list(loader)  # more batches than slots: the last ones in segments of their own
    joined = next(iter(JoinedLoader(Images(), store, batch_size=8, num_workers=1)))
    batches = [store.batch([5, 2, 9]), store.collate()(store.__getitems__([7, 1])), held[0], held[-1], joined]
    assert len({id(s) for s in mapped_segments()}) >= 1 and len(held) > SLOTS
    for k, batch in enumerate(batches):
        torch.save(batch, tmp_path / f"{k}.pt")
        loaded = torch.load(tmp_path / f"{k}.pt", weights_only=True)
        assert loaded.keys() == batch.keys()
        assert_batches_equal(loaded, batch)
        assert_rows_of(store, loaded)


def test_two_iterations_of_one_joined_loader_at_once_keep_their_own_segments(store):
    """Bug: one table of mapped segments and one flag array for every iteration of a JoinedLoader, so that two
    running at once (``zip(loader, loader)``) read each other's segments or free each other's slots."""
    from clipcond import JoinedLoader

    order = list(range(0, ROWS, 2))
    loader = JoinedLoader(Images(), store, batch_size=8, sampler=order, num_workers=2)
    kept = []  # every other pair kept to the end: the slots of its batches must stay lent to them
    for k, (first, second, want) in enumerate(zip(loader, loader, expected_batches(Images(), order, 8),
                                                  strict=True)):
        assert_batches_equal(first, want)
        assert_batches_equal(second, want)
        if k % 2:
            kept.append((first, second, want))
    for first, second, want in kept:
        assert_batches_equal(first, want)
        assert_batches_equal(second, want)


def test_the_joined_loader_with_spawned_workers(store):
    """Workers started by spawn (macOS and Windows; forkserver, Python 3.14's default on Linux, likewise) get the
    hand-over pickled: the shared flag array, none of the segments. Bug: a worker with its own copy of the flags
    (the main process's releases never reaching it: no segment ever reused) or with the parent's segments."""
    from clipcond import JoinedLoader

    order = list(range(0, 96))
    loader = JoinedLoader(Images(), store, batch_size=8, sampler=order, num_workers=2, prefetch_factor=2,
                          multiprocessing_context="spawn", persistent_workers=True)
    kept = list(zip(loader, expected_batches(Images(), order, 8), strict=True))  # 12 batches, 8 slots: all lent
    for got, want in kept:
        assert_batches_equal(got, want)
    del kept, got, want  # every batch gone: all slots free again
    for got, want in zip(loader, expected_batches(Images(), order, 8), strict=True):
        assert_batches_equal(got, want)
        assert any(s.data_ptr() <= got["latent"].data_ptr() < s.data_ptr() + len(s)
                   for s in mapped_segments())  # in a reused segment, not a new one


def test_the_joined_loader_reuses_its_workers_shared_memory(store):
    """Bug: a new shared-memory segment for every batch (made, zeroed, sent and mapped each time: the cost the
    hand-over exists to avoid), or a slot given out again before its batch is gone. A loop that drops each batch
    sees a few segments again and again; batches of a larger size (buckets) get a larger segment, sent once."""
    from clipcond import JoinedLoader

    order = list(range(ROWS))
    for dataset in (Images(), Buckets()):
        loader = JoinedLoader(dataset, store, batch_size=8, sampler=order, num_workers=2, prefetch_factor=2,
                              persistent_workers=True)
        segments = {}  # every segment the main process mapped, kept alive: a new one is a new object
        for _ in range(2):  # persistent workers: their segments stay mapped
            for got, want in zip(loader, expected_batches(dataset, order, 8), strict=True):
                assert_batches_equal(got, want)
                assert any(all(s.data_ptr() <= got[key].data_ptr() < s.data_ptr() + len(s) for key in
                                   ("latent", "sequence", "pooled")) for s in mapped_segments())
                segments.update((id(s), s) for s in mapped_segments())
                del got
        bound = 2 * SLOTS * (2 if isinstance(dataset, Buckets) else 1)  # workers x slots (x sizes)
        assert len(segments) <= bound, (len(segments), 2 * len(order) // 8)


def test_the_joined_loader_keeps_your_own_dropped_field_without_a_collate(store):
    """Bug: the store's dropout mask handed over under the name "dropped" and written over a field of yours of that
    name (with no store collate nothing drops captions, so the batch is yours and the rows as stacked)."""
    from clipcond import JoinedLoader

    class Flagged(Images):
        def __getitem__(self, i: int) -> dict:
            return {"latent": super().__getitem__(i)["latent"], "dropped": i % 3 == 0}

    order = list(range(48))
    for got, want in zip(JoinedLoader(Flagged(), store, batch_size=8, sampler=order, num_workers=2),
                         expected_batches(Flagged(), order, 8), strict=True):
        assert_batches_equal(got, want)
        assert list(got) == ["latent", "dropped", "sequence", "pooled", "row"]


def test_a_joined_batch_made_in_a_worker_crosses_in_one_reused_segment(store):
    """In a DataLoader worker the batch (the store's rows, your stacked fields and the dropout mask) is made in one
    segment of shared memory the worker reuses, and ``store.collate`` hands it over through it: in the main process
    every tensor of the batch lies in one segment mapped once. Bug: fields in segments of their own (a file
    descriptor each, ~0.5 ms), the batch left to torch's pickler (a new segment made, sent and mapped every
    batch), or the hand-over's wrapper reaching your loop instead of a dict."""
    collate = store.collate(0.5, seed=1)

    def in_worker(items: list) -> dict:
        batch = collate(items)
        batch["lent"] = type(batch).__name__ == "Lent"  # made there, before any pickling
        return batch

    loader = DataLoader(JoinedDataset(Images(), store), batch_size=16, num_workers=2, collate_fn=in_worker)
    seen = []
    for batch in loader:
        assert batch["lent"] and type(batch) is dict
        tensors = [value for value in batch.values() if isinstance(value, torch.Tensor)]
        segment = [s for s in mapped_segments() if s.data_ptr() <= tensors[0].data_ptr() < s.data_ptr() + len(s)]
        assert len(segment) == 1 and all(segment[0].data_ptr() <= t.data_ptr() <= t.data_ptr() + t.nbytes
                                         <= segment[0].data_ptr() + len(segment[0]) for t in tensors)
        rows = batch["row"].tolist()
        assert torch.equal(batch["latent"], torch.stack([Images()[r]["latent"] for r in rows]))
        kept = ~batch["dropped"]
        assert 0 < int(kept.sum()) < 16
        assert torch.equal(batch["pooled"][kept], torch.stack([store[r]["pooled"] for r in rows])[kept])
        assert not batch["pooled"][~kept].any()  # dropped to tiny-sdxl's null: zeros
        seen += rows
        if len(seen) >= 64:
            break
    assert len(seen) >= 64


def test_caption_dropout_statistics_and_reproducibility(store):
    collate = store.collate(0.25, seed=3)
    epoch0 = dropped_rows(store, collate, 32)
    assert 60 <= len(epoch0) <= 140  # Binomial(400, 0.25): mean 100, sd 8.7
    assert dropped_rows(store, collate, 7, num_workers=2) == epoch0  # batch size, order, workers: no matter
    assert dropped_rows(store, store.collate(0.25, seed=3), 400) == epoch0
    collate.set_epoch(1)
    epoch1 = dropped_rows(store, collate, 32)
    assert 60 <= len(epoch1) <= 140 and epoch1 != epoch0
    assert len(epoch0 & epoch1) < 45  # independent epochs: about 25 shared
    assert dropped_rows(store, store.collate(0.25, seed=4), 32) != epoch0
    assert dropped_rows(store, store.collate(0.0), 64) == set()
    assert dropped_rows(store, store.collate(1.0), 64) == set(range(ROWS))
    with pytest.raises(ValueError, match=r"drop_prob must be in \[0, 1\], got 1.5"):
        store.collate(1.5)
    persistent = store.collate(0.25, seed=3)  # Bug: persistent workers kept the first epoch's copy of the collate
    loader = DataLoader(store, batch_size=32, collate_fn=persistent, num_workers=2, persistent_workers=True)
    for epoch, expected in ((0, epoch0), (1, epoch1), (0, epoch0)):
        persistent.set_epoch(epoch)
        assert {r for b in loader for r in b["row"][b["dropped"]].tolist()} == expected, epoch
    with pytest.raises(TypeError, match="needs items with 'sequence', 'pooled' and 'row'"):
        store.collate(0.5)([{"sequence": torch.zeros(1)}])


def test_inspect_describes_and_verifies(store_dir, capsys):
    assert main(["inspect", str(store_dir)]) == 0
    out = capsys.readouterr().out
    assert "rows 400: 150 unique captions, ids from column 'key'" in out
    assert "encoder tiny-sdxl: sequence [77, 80], pooled [48], float32" in out
    assert "verified every file's size and sha256" in out
    rows = next(line for line in out.splitlines() if line.startswith("  rows (CLIP): "))
    assert "whole rows" in rows and "saved" not in rows, rows  # was "(-0.0 % saved)": headers counted as a loss


def test_truncated_shard_is_named_by_the_store_and_inspect(damaged, capsys):
    shard = damaged / "shard-00003.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"shard-00003.safetensors: truncated or overwritten: \d+ bytes"):
        EmbeddingStore(damaged)
    assert main(["inspect", str(damaged)]) == 1
    assert "PROBLEM " + str(shard) + ": truncated" in capsys.readouterr().out


def test_corrupted_shard_is_caught_by_its_checksum(damaged, capsys):
    """One byte of a row's sequence data changed in place (same size): reading that row fails on its row
    checksum, naming shard and row, while the shard's other rows still read; ``verify`` and ``inspect`` name
    the shard by its sha256. (Flipping the file's last bytes would only hit the ``check`` column.)"""
    shard = damaged / "shard-00005.safetensors"
    data = bytearray(shard.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    row_bytes = 77 * 80 * 4  # tiny-sdxl float32: sequence [16, 77, 80] first in the data
    data[header + 3 * row_bytes + 123] ^= 0xFF  # local row 3 of shard 5, one float's byte
    shard.write_bytes(bytes(data))
    store = EmbeddingStore(damaged)  # opening checks sizes only: cheap for a huge store
    row = next(r for r in range(ROWS) if int(store._slots[r, 0]) == 5 * 16 + 3)
    other = next(r for r in range(ROWS) if int(store._slots[r, 0]) == 5 * 16 + 4)
    with pytest.raises(ValueError, match=rf"shard-00005.safetensors row 3 \(store row {row}, variant 0\): checksum"):
        store[row]
    with pytest.raises(ValueError, match=rf"shard-00005.safetensors row 3 \(store row {row}, variant 0\): checksum"):
        store.__getitems__([other, row])
    assert store[other]["row"] == other
    with pytest.raises(ValueError, match=r"(?s)shard-00005.safetensors: corrupted: sha256 .*rerun the same"):
        store.verify()
    with pytest.raises(ValueError, match=r"shard-00005.safetensors: corrupted"):
        EmbeddingStore(damaged, verify=True)
    assert main(["inspect", str(damaged)]) == 1
    assert f"{shard}: corrupted" in capsys.readouterr().out


def test_unreadable_shard_header_is_named_on_read(damaged):
    shard = damaged / "shard-00002.safetensors"
    data = bytearray(shard.read_bytes())
    data[:8] = (10**9).to_bytes(8, "little")  # header length past the end of the file
    shard.write_bytes(bytes(data))
    store = EmbeddingStore(damaged)
    row = next(r for r in range(ROWS) if int(store._slots[r, 0]) // 16 == 2)
    with pytest.raises(ValueError, match=r"shard-00002.safetensors: not a safetensors file: header length 1000000000"):
        store[row]


def test_incomplete_or_missing_store_is_refused(damaged, tmp_path):
    manifest = json.loads((damaged / MANIFEST).read_text())
    (damaged / MANIFEST).write_text(json.dumps({**manifest, "complete": False, "shards": manifest["shards"][:3]}))
    with pytest.raises(ValueError, match=r"incomplete: 3 of 10 shards recorded; rerun the same `clipcond precompute`"):
        EmbeddingStore(damaged)
    with pytest.raises(FileNotFoundError, match="no manifest.json: not a clipcond embedding store"):
        EmbeddingStore(tmp_path)
    (damaged / MANIFEST).write_text(json.dumps({**manifest, "format_version": 9}))
    with pytest.raises(ValueError, match="store format version 9"):
        EmbeddingStore(damaged)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_streamed_safetensors_are_byte_equal_to_the_library_s(tmp_path, dtype):
    # Shards are written piece by piece from a header built ahead; in safetensors' own tensor order
    # the bytes are exactly safetensors.torch.save's, and in ours (sequence first) any reader loads them.
    from safetensors.torch import load_file, save

    g = torch.Generator().manual_seed(0)
    tensors = {"pooled": torch.randn(3, 5, generator=g).to(dtype),
               "sequence": torch.randn(3, 7, 4, generator=g).to(dtype)}
    meta = {"clipcond": json.dumps({"start": 0, "stop": 3})}

    def streamed(order: list[str]) -> bytes:
        header = safetensors_header({k: (dtype, tuple(tensors[k].shape)) for k in order}, meta)
        return header + b"".join(bytes(raw_bytes(tensors[k])) for k in order)

    assert streamed(["pooled", "sequence"]) == save(tensors, metadata=meta)
    path = tmp_path / "shard.safetensors"
    path.write_bytes(streamed(["sequence", "pooled"]))
    loaded = load_file(path)
    assert all(torch.equal(loaded[k], tensors[k]) for k in tensors) and loaded["sequence"].dtype == dtype


@pytest.mark.parametrize(("shape", "dtype"), [((3, 77, 64), torch.float16), ((2, 5, 3), torch.float32)])
def test_row_checksums_are_sums_of_64_bit_words_mod_2_64(shape, dtype):
    """The format's checksum, computed with Python integers: sequence words + pooled words * MIX, mod 2^64,
    a short tail zero-padded (float32 [5, 3]: 60 bytes, 4 of them a padded tail); rows read at any offset."""
    from clipcond.store.checksums import row_checksums

    g = torch.Generator().manual_seed(0)
    sequence = (torch.randn(shape, generator=g) * 1e4).to(dtype)  # big values: every sum wraps
    pooled = (torch.randn(shape[0], 7, generator=g) * 1e4).to(dtype)

    def words(row: torch.Tensor) -> int:
        data = bytes(raw_bytes(row))
        data += b"\0" * (-len(data) % 8)
        return sum(int.from_bytes(data[i : i + 8], "little") for i in range(0, len(data), 8))

    mix = 0x9E3779B97F4A7C15  # the format's constant (clipcond/store/checksums.py CHECK_MIX)
    expected = [(words(s) + words(p) * mix) % 2**64 for s, p in zip(sequence, pooled, strict=True)]
    got = row_checksums(sequence, pooled).numpy().view("uint64").tolist()
    assert got == expected
    assert row_checksums(sequence[1:], pooled[1:]).numpy().view("uint64").tolist() == expected[1:]  # unaligned


def test_the_compiled_row_copy_copies_and_sums_like_python_integers():
    """clipcond._rows (built at install; CI has a compiler, so it must be there): each source copied to its
    destination and summed as little-endian 64-bit words mod 2^64, a short tail zero-padded; sources at odd
    addresses and of odd sizes; the pairs shared between 1 to more threads than pairs; sizes checked."""
    from clipcond.store import _rows

    rng = np.random.default_rng(0)
    pool = rng.integers(0, 256, size=1 << 20, dtype=np.uint8)
    sizes = [0, 1, 7, 8, 9, 63, 64, 65, 1000, 318_464, 2560, 77 * 80 * 4 + 3]
    sources = [pool[i * 13 + 1 : i * 13 + 1 + n] for i, n in enumerate(sizes)]  # odd offsets: unaligned

    def words(data: bytes) -> int:
        data += b"\0" * (-len(data) % 8)
        return sum(int.from_bytes(data[i : i + 8], "little") for i in range(0, len(data), 8)) % 2**64

    expected = [words(bytes(source)) for source in sources]
    for threads in (1, 2, 3, len(sizes) + 5):
        for summed in (True, False):  # the unchecked read's copy: the same loop, no sums
            destinations = [np.zeros(n, dtype=np.uint8) for n in sizes]
            sums = np.zeros(len(sizes), dtype=np.uint64)
            _rows.copy_rows(sources, destinations, sums if summed else None, threads, 1)  # a thread per byte
            assert sums.tolist() == (expected if summed else [0] * len(sizes))
            assert all(np.array_equal(d, s) for d, s in zip(destinations, sources, strict=True))
    mix = 0x9E3779B97F4A7C15
    for a, b in ((9, 3), (10, 11), (4, 0)):  # one row's check, in place: sequence words + mix * pooled words
        want = (expected[a] + mix * expected[b]) % 2**64
        assert _rows.row_checksum(sources[a], sources[b], mix) == want - (2**64 if want >= 2**63 else 0)
    _rows.copy_rows([], [], np.zeros(0, dtype=np.uint64), 2)
    with pytest.raises(ValueError, match="copy_rows: source 1 has 1 bytes, its destination 8"):
        _rows.copy_rows(sources[:2], [np.zeros(0, np.uint8), np.zeros(8, np.uint8)], np.zeros(2, np.uint64), 1)
    with pytest.raises(ValueError, match="2 sources, 1 destinations and 16 bytes of sums"):
        _rows.copy_rows(sources[:2], [np.zeros(0, np.uint8)], np.zeros(2, np.uint64), 1)
    with pytest.raises(BufferError, match="not writable"):
        _rows.copy_rows([sources[3]], [bytes(8)], np.zeros(1, np.uint64), 1)


def test_populate_gives_a_fresh_shared_segment_s_pages_over_any_part_of_it():
    """``populate`` (a worker's batch memory) rounds the buffer out to whole pages, which must stay inside its mapping:
    a part that starts or ends inside a page succeeds wherever the whole segment does (Linux 5.14+: both), instead
    of failing (ENOMEM past the mapping) and leaving every page to fault in. The pages read as zeros."""
    from clipcond.store import _rows

    segment = torch.empty(0, dtype=torch.uint8).new(torch.UntypedStorage._new_shared(3 * 4096 + 5)).numpy()
    whole = _rows.populate(segment)
    assert _rows.populate(segment[7:-3]) is whole and _rows.populate(segment[4096 * 3 :]) is whole
    assert _rows.populate(segment[:0]) is False  # nothing to give
    assert not segment.any()
    with pytest.raises(BufferError, match="not writable"):
        _rows.populate(bytes(8))


def test_a_version_1_store_is_refused_with_how_to_remake_it(damaged, tmp_path, tc):
    """Format 1 (unreleased clipcond) is no longer read: its manifest is refused naming the version and the fix,
    by the reader and by a precompute into it, rather than read without row checks."""
    manifest = json.loads((damaged / MANIFEST).read_text())
    (damaged / MANIFEST).write_text(json.dumps({**manifest, "format_version": 1, "clipcond_version": "0.1.0"}))
    fix = r"store format version 1 \(clipcond '0.1.0'\) is no longer read.*Run `clipcond precompute` again with --out"
    with pytest.raises(ValueError, match=fix):
        EmbeddingStore(damaged)
    captions = tmp_path / "captions.txt"
    captions.write_text("a red cube\n")
    with pytest.raises(ValueError, match="store format version 1"):
        precompute(tc, PrecomputeJob(input=captions, out=damaged, progress=False))


@pytest.mark.parametrize("cut", [False, True])
def test_a_shard_without_its_check_tensor_is_refused_not_read_unchecked(damaged, cut):
    """A shard whose ``check`` entry was removed from the header (format 1's layout) was read with no row
    checks at all; now a header that lacks it is damage: with the check bytes left in the file, the tensors no
    longer tile the data; with them cut off too, the file is not the size its manifest entry records."""
    shard = damaged / "shard-00001.safetensors"
    data = shard.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    check = header.pop("check")
    text = json.dumps(header).encode()
    text += b" " * (n - len(text))  # same length: the data stays where it was
    body = data[8 + n :][: check["data_offsets"][0]] if cut else data[8 + n :]
    shard.write_bytes(data[:8] + text + body)
    if cut:  # the shard's size no longer matches its manifest entry: refused when the store opens
        with pytest.raises(ValueError, match=r"shard-00001.safetensors: truncated or overwritten"):
            EmbeddingStore(damaged)
        return
    store = EmbeddingStore(damaged)
    row = next(r for r in range(ROWS) if int(store._slots[r, 0]) // 16 == 1)
    with pytest.raises(ValueError, match=r"shard-00001.safetensors: the safetensors tensors end at data byte \d+"):
        store[row]


def test_a_batch_still_held_is_never_written_over_and_a_dropped_one_is_reused(store_dir):
    """The main process's batch memory (BatchBuffers): a batch's buffer is handed out again only after every
    tensor and array of that batch is gone; a batch of another size gets its own."""
    store = EmbeddingStore(store_dir)
    expected = {r: store[r]["sequence"].clone() for r in range(40)}

    def fetch(rows: list[int]) -> torch.Tensor:
        return store.__getitems__(rows).batch["sequence"]

    held = fetch(list(range(0, 8)))
    held_rows = held[2:5].numpy()  # an array of part of the batch keeps it alive too
    address, used = held.data_ptr(), set()
    del held
    for start in (8, 16, 24):  # a loop holding one batch while the next is fetched
        batch = fetch(list(range(start, start + 8)))
        assert batch.data_ptr() != address
        assert all(torch.equal(batch[i], expected[start + i]) for i in range(8))
        used.add(batch.data_ptr())
    assert all(torch.equal(torch.from_numpy(held_rows[i]), expected[2 + i]) for i in range(3))
    assert len(used) == 2  # the loop's third batch went into the first one's memory
    del batch
    assert fetch(list(range(32, 40))).data_ptr() in used  # dropped: its memory is used again
    assert fetch(list(range(3))).shape == (3, *expected[0].shape)
    assert fetch([]).shape == (0, *expected[0].shape)


@pytest.mark.parametrize("copy", ["compiled", "compiled, 3 threads", "numpy"])
def test_the_batched_fetch_checks_every_row_on_its_copy(damaged, monkeypatch, caplog, copy):
    """Compiled: each row summed as it is copied (clipcond._rows), on one thread for a small batch, or several;
    else numpy sums each copy right after it. A wrong sum would fail clean rows; a skipped one would let the
    damaged row through. The unchecked fetch (the same copy, no sums) gives the same batch."""
    from clipcond.store import checksums as store

    if copy == "numpy":
        monkeypatch.setattr(store, "_rows", None)
        monkeypatch.setattr(store, "_told_numpy", False)
    if copy == "compiled, 3 threads":
        monkeypatch.setattr(store, "BYTES_PER_THREAD", 1)
        monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    store = EmbeddingStore(damaged)
    clean = store.__getitems__(list(range(0, ROWS, 7)))
    assert torch.equal(clean.batch["sequence"][3], store[21]["sequence"])
    said = [r.getMessage() for r in caplog.records if "clipcond._rows is not built" in r.getMessage()]
    assert len(said) == (copy == "numpy")  # once, and only when it falls back
    unchecked = EmbeddingStore(damaged, verify_rows=False).__getitems__(list(range(0, ROWS, 7)))
    assert all(torch.equal(unchecked.batch[k], clean.batch[k]) for k in ("sequence", "pooled", "row"))
    shard = damaged / "shard-00005.safetensors"
    data = bytearray(shard.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    data[header + 1000] ^= 0x40  # row 0 of shard 5, one bit of its sequence
    shard.write_bytes(bytes(data))
    store = EmbeddingStore(damaged)
    row = next(r for r in range(ROWS) if int(store._slots[r, 0]) == 5 * 16)
    with pytest.raises(ValueError, match=rf"shard-00005.safetensors row 0 \(store row {row}, variant 0\): checksum"):
        store.__getitems__([0, row, 1])
    with pytest.raises(ValueError, match=rf"shard-00005.safetensors row 0 \(store row {row}, variant 0\): checksum"):
        store[row]


def test_batch_in_the_main_process_stacks_checked_rows_in_reused_memory(damaged):
    """store.batch(rows), the main-process half of a join: the rows as store[i] gives them, stacked (a wrong
    slot or order would differ), checked like every read (a damaged row is an error, not a batch), and a batch
    dropped by the caller gives its memory to the next one (a fresh buffer a batch is what it must avoid)."""
    store = EmbeddingStore(damaged)
    rows = [5, 0, 17, 5]
    batch = store.batch(torch.tensor(rows))
    assert batch["row"].tolist() == rows
    for i, r in enumerate(rows):
        assert torch.equal(batch["sequence"][i], store[r]["sequence"]) and torch.equal(batch["pooled"][i],
                                                                                          store[r]["pooled"])
    address = batch["sequence"].data_ptr()
    del batch
    assert store.batch([1, 2, 3, 4])["sequence"].data_ptr() == address
    shard = damaged / "shard-00005.safetensors"
    data = bytearray(shard.read_bytes())
    data[8 + int.from_bytes(data[:8], "little") + 64] ^= 0x10  # row 0 of shard 5, a byte of its sequence
    shard.write_bytes(bytes(data))
    damaged_store = EmbeddingStore(damaged)
    row = next(r for r in range(ROWS) if int(damaged_store._slots[r, 0]) == 5 * 16)  # slot 80: shard 5, row 0
    with pytest.raises(ValueError, match=r"shard-00005.safetensors row 0 .*checksum"):
        damaged_store.batch([row])


@pytest.mark.parametrize(("change", "message"), [
    (lambda m: {**m, "encoder": {}}, r"encoder must be a JSON object with a name"),
    (lambda m: {**m, "fingerprint": 7}, r"fingerprint must be a string, got 7"),
    (lambda m: {**m, "input": {**m["input"], "paths": []}}, r"input.paths must be a non-empty list of strings"),
    (lambda m: {**m, "input": {**m["input"], "paths": "captions.jsonl"}}, r"input paths and columns must be lists"),
    (lambda m: {**m, "input": {**m["input"], "sha256": "xyz"}}, r"input.sha256 'xyz' is not 64 lowercase hex"),
    (lambda m: {**m, "generation": 3}, r"generation must be a string or null"),
])
def test_manifest_fields_every_reader_relies_on_are_checked(damaged, change, message):
    """Fields that repr, inspect and precompute read were not validated: an encoder without a name raised
    KeyError 'name', empty input paths an IndexError in inspect, an int fingerprint a TypeError. Each is now a
    ValueError naming manifest.json, from every entry point."""
    from clipcond.store.manifest import inspect_store

    manifest = json.loads((damaged / MANIFEST).read_text())
    (damaged / MANIFEST).write_text(json.dumps(change(manifest)))
    for read in (EmbeddingStore, inspect_store):
        with pytest.raises(ValueError, match=rf"{MANIFEST}: .*{message}"):
            read(damaged)


def test_shard_writer_refuses_pooled_rows_that_do_not_match(tmp_path):
    """ShardWriter checked only the sequence: a [1, P] pooled beside 4 rows was broadcast into all four, a
    float32 one cast silently, one of another width raised torch's RuntimeError. Each is now refused by name,
    and nothing is published."""
    from clipcond.store.format import ShardWriter
    from clipcond.store.layout import RowLayout

    sequence = torch.randn(4, 77, 8).half()
    for pooled in (torch.randn(1, 6).half(), torch.randn(4, 6), torch.randn(4, 3).half()):
        writer = ShardWriter(tmp_path, 0, 4, torch.float16, RowLayout.whole(77, 8), 6, {"start": 0, "stop": 4})
        with pytest.raises(ValueError, match=r"shard-00000.safetensors: pooled rows of .* beside 4 sequence rows"):
            writer.add([sequence], pooled)
        writer.abort()
    assert not list(tmp_path.iterdir())


def test_a_store_opened_by_a_relative_path_reads_after_a_chdir(store_dir, monkeypatch):
    """Bug: shards open lazily from the path as given: after os.chdir (Hydra-style runs) a relative path pointed
    elsewhere and the read failed with "removed since this EmbeddingStore was opened (`clipcond gc` ...)"."""
    monkeypatch.chdir(store_dir.parent)
    store = EmbeddingStore(store_dir.name)
    monkeypatch.chdir("/")
    assert torch.equal(store[0]["sequence"], EmbeddingStore(store_dir)[0]["sequence"])
