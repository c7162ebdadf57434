"""Your dataset (images, VAE latents, sizes) joined with an ``EmbeddingStore``'s rows, a batch at a time, and a
sampler that batches rows of about one length (a masked recipe's batch is as long as its longest row).

``JoinedDataset``: the store's rows fetched in the DataLoader's workers, with your items, in one checked copy per
batch. ``JoinedLoader``: your items loaded by the workers, the store's rows fetched in the main process, so that
they never cross a process boundary (the faster way when workers are on: docs/performance.md).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate
from torch.utils.data._utils.pin_memory import pin_memory

from clipcond.store.batch import Column, Rows
from clipcond.store.handover import Lent
from clipcond.store.reader import EmbeddingStore

STORE_KEYS = ("sequence", "pooled", "row")  # what a store item holds


class JoinedDataset(Dataset):
    """A map-style dataset of yours (images, VAE latents, sizes) joined with an ``EmbeddingStore``, a batch at a time.

    Item ``i`` is ``dataset[i]`` (a dict; anything else comes under ``"data"``) with the store's row added:
    ``"sequence"`` [L, D], ``"pooled"`` [P] and ``"row"`` (a masked recipe's ``"mask"`` too; the batch as long as its
    longest row). ``by="index"``: row ``i`` (the store was precomputed
    from the same rows in the same order); ``by="id"``: the row whose id is ``dataset[i][id_key]``
    (``store.by_id``). A DataLoader with ``batch_size`` calls ``__getitems__``, which fetches the whole batch's
    rows from the store in one checked copy (``EmbeddingStore.__getitems__``) and your items through your
    dataset's own ``__getitems__`` where it has one, so each worker hands over whole batches:

        joined = JoinedDataset(latents, store)
        loader = DataLoader(joined, batch_size=16, shuffle=True, num_workers=2,
                            collate_fn=store.collate(drop_prob=0.1, seed=0))  # or the default collate

    ``store.collate(...)`` takes the store's rows as already stacked (no second copy), collates your keys with
    the default collate and drops captions to the null for classifier-free guidance; the default collate
    works too, stacking the rows again. torch's ``StackDataset`` zips datasets the same way, but its batches of
    per-sample store rows are stacked again by every collate.
    """

    def __init__(self, dataset: Dataset, store: EmbeddingStore, *, by: Literal["index", "id"] = "index",
                 id_key: str = "id") -> None:
        if by not in ("index", "id"):
            raise ValueError(f"by must be 'index' or 'id', got {by!r}")
        if by == "index" and len(dataset) != len(store):
            raise ValueError(f"by='index' joins row i of the dataset with row i of the store, but the dataset has "
                             f"{len(dataset)} rows and store {store.path} {len(store)}; join by='id' instead")
        self.dataset, self.store, self.by, self.id_key = dataset, store, by, id_key

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: Sequence[int]) -> Rows:
        fetch = getattr(self.dataset, "__getitems__", None)
        items = [self._as_dict(item) for item in (fetch(indices) if fetch else [self.dataset[i] for i in indices])]
        rows = list(indices) if self.by == "index" else [self._row_of(item, i) for item, i in
                                                          zip(items, indices, strict=True)]
        columns = {key: column for key in (items[0] if items else ()) if all(key in item for item in items)
                   and (column := Column.of([item[key] for item in items])) is not None}
        fetched = self.store.fetch(rows, columns)  # [B, L, D], [B, P], your columns: one copy, checked
        joined = Rows({**item, **row} for item, row in zip(items, fetched, strict=True))
        joined.batch, joined.dropped, joined.lease = fetched.batch, fetched.dropped, fetched.lease
        return joined

    def _as_dict(self, item: object) -> dict:
        if not isinstance(item, dict):
            return {"data": item}
        if clash := [key for key in STORE_KEYS if key in item]:
            raise ValueError(f"JoinedDataset adds the store's {list(STORE_KEYS)} to each item; the dataset's items "
                             f"already hold {clash}: rename them")
        return item

    def _row_of(self, item: dict, index: int) -> int:
        if self.id_key not in item:
            raise KeyError(f"JoinedDataset(by='id') reads each item's id from {self.id_key!r}; item {index} has "
                           f"keys {sorted(item)}: pass id_key=")
        return self.store.row_of(item[self.id_key])


class JoinedLoader:
    """A DataLoader over your dataset joined with the store (as ``JoinedDataset``), the store's collate run in the
    main process.

    Each worker fetches a batch's store rows and stacks your items' tensors, arrays and numbers in one checked copy
    into shared memory it reuses, and hands the batch over through it (clipcond/store/handover.py: a slot is
    written over only once no tensor of the batch it held is left, so keeping batches is safe). ``collate``:
    ``store.collate(...)`` (caption dropout, variants, per-tower dropout; run here, so ``set_epoch`` needs no new
    loader, even with persistent workers); None: the rows as stacked. Rows as in ``JoinedDataset``: ``by="index"``
    (row i with row i) or ``by="id"`` (``store.row_of(item[id_key])``). Every other keyword goes to the
    ``DataLoader`` (``batch_size``, ``shuffle``, ``num_workers``, ``sampler``, ``persistent_workers``...);
    ``pin_memory=True`` pins the whole joined batch:

        loader = clipcond.JoinedLoader(latents, store, batch_size=16, shuffle=True, num_workers=2,
                                       collate=store.collate(drop_prob=0.1, seed=0))
        for batch in loader:  # your keys + "sequence", "pooled", "row" (a masked recipe's "mask"), "dropped"
            ...
    """

    def __init__(self, dataset: Dataset, store: EmbeddingStore, *, by: Literal["index", "id"] = "index",
                 id_key: str = "id", collate: Callable[[Rows], dict] | None = None, **loader_kwargs: object) -> None:
        if "collate_fn" in loader_kwargs:
            raise TypeError("JoinedLoader stacks your items as default_collate would in the workers; give the "
                            "store's collate as collate= (it runs in the main process)")
        self.collate = collate
        self.pin = bool(loader_kwargs.pop("pin_memory", False)) and torch.cuda.is_available()  # (torch>=2.4)
        self.loader = DataLoader(JoinedDataset(dataset, store, by=by, id_key=id_key), collate_fn=_hand_over,
                                 **loader_kwargs)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[dict]:
        for handed in self.loader:
            rows = _received(handed)
            batch = self.collate(rows) if self.collate is not None else {
                **rows.batch, **{key: default_collate([item[key] for item in rows]) for key in
                                 (rows[0] if rows else ()) if key not in rows.batch}}
            first = [key for key in (rows[0] if rows else ()) if key not in (*STORE_KEYS, "mask")]  # yours, in order
            batch = {**{key: batch[key] for key in first if key in batch}, **batch}
            yield pin_memory(batch) if self.pin else batch


def _hand_over(rows: Rows) -> dict:
    """A JoinedLoader worker's collate: the joined rows as they are (the main process runs the store's collate),
    the stacked part through the worker's reused memory where it lies there."""
    handed = {"batch": rows.batch, "dropped": rows.dropped, "rows": [item["row"] for item in rows],
              "rest": [{key: value for key, value in item.items() if key not in rows.batch} for item in rows],
              "order": list(rows[0]) if rows else []}
    return Lent(handed, rows.lease) if rows.lease is not None else handed


def _received(handed: dict) -> Rows:
    """``_hand_over`` undone in the main process: the ``Rows`` again, their tensors views of the batch."""
    batch, rows = handed["batch"], Rows()
    for i, (rest, row) in enumerate(zip(handed["rest"], handed["rows"], strict=True)):
        rows.append({name: row if name == "row" else batch[name][i] if name in batch else rest[name]
                     for name in handed["order"]})
    rows.batch, rows.dropped = batch, handed["dropped"]
    return rows


class LengthGroupedSampler(Sampler[int]):
    """Indices in a random order whose consecutive ``batch_size`` have about one length: each epoch a seeded
    permutation, cut into megabatches of ``mega * batch_size``, each sorted by length, longest first (as
    transformers' ``LengthGroupedSampler`` for ``group_by_length``). For a masked T5 store, whose batches are as
    long as their longest row, it cuts the padding a transformer attends over (``lengths``:
    ``store.kept_lengths()``). Every index once an epoch; the order depends on (seed, epoch) only: call
    ``set_epoch(e)`` each epoch, and give it as the DataLoader's ``sampler`` with the same ``batch_size``."""

    def __init__(self, lengths: Sequence[int] | np.ndarray, batch_size: int, *, seed: int = 0, mega: int = 50
                 ) -> None:
        if batch_size < 1 or mega < 1:
            raise ValueError(f"batch_size and mega must be >= 1, got {batch_size} and {mega}")
        self.lengths = np.asarray(lengths, dtype=np.int64)  # [N]
        self.batch_size, self.seed, self.mega, self.epoch = batch_size, seed, mega, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.lengths))
        size = self.mega * self.batch_size
        for a in range(0, len(order), size):
            chunk = order[a : a + size]
            yield from chunk[np.argsort(-self.lengths[chunk], kind="stable")].tolist()
