"""``EmbeddingStore``: a precomputed store (clipcond/store/format.py) read back as a memory-mapped ``Dataset``.

Opening reads the manifest and the row index (8 bytes a row and variant) and checks file sizes;
shards are memory-mapped lazily, per process, so DataLoader workers each open their own. Every
row read is checked against its shard's row checksum; a DataLoader fetches a batch at once
(``__getitems__``), copying each row once into the batch tensors.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
import os
import threading
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate, get_worker_info

from clipcond._files import SAFETENSORS_DTYPES, id_hash
from clipcond.conditioning import Conditioning
from clipcond.specs import EncoderSpec, spec_from_dict
from clipcond.store.format import (
    NULL,
    REPAIR_HINT,
    IndexFormat,
    Manifest,
    ShardFormat,
    copy_rows,
    mix_checksums,
    read_tensors,
    row_bytes,
    row_checksums,
)

MAX_OPEN_SHARDS = 64  # memory maps kept open per process (DataLoader worker)


class ShardView:
    """A shard's ``sequence`` [n, L, D] and ``pooled`` [n, P] as tensors over one private memory map.

    A row is a view (no copy, no per-call parsing: ~1 µs); the map is copy-on-write, so a caller
    writing into a row never touches the file. Any safetensors file of these two tensors opens.
    """

    def __init__(self, path: Path) -> None:
        import mmap

        try:
            with open(path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(n))
                self.map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            codes = {code: dtype for dtype, code in SAFETENSORS_DTYPES.items()}
            self.tensors = {}
            for name in ShardFormat.TENSORS:
                if name == "check" and name not in header:
                    continue  # a version-1 shard: no row checksums
                info = header[name]
                begin, end = info["data_offsets"]
                dtype = codes[info["dtype"]]
                flat = torch.frombuffer(self.map, dtype=dtype, count=(end - begin) // dtype.itemsize,
                                        offset=8 + n + begin)
                self.tensors[name] = flat.view(info["shape"])
        except (ValueError, KeyError, TypeError, OSError) as err:  # JSONDecodeError is a ValueError
            raise ValueError(f"{path}: not a readable safetensors shard ({type(err).__name__}: {err}); "
                             f"{REPAIR_HINT}") from err

        self.path = path
        self.checks = self.tensors["check"].numpy() if "check" in self.tensors else None  # [n] int64 (version 2)
        self.rows = {name: row_bytes(t) for name, t in self.tensors.items() if name != "check"}  # [n, bytes] views

    def row(self, local: int, what: str, *, verify: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Row ``local`` [L, D], [P] as views, its checksum verified; ``what`` names it in the error."""
        sequence, pooled = self.tensors["sequence"][local], self.tensors["pooled"][local]
        if verify:
            self.verify(local, sequence, pooled, what)
        return sequence, pooled

    def verify(self, local: int, sequence: torch.Tensor, pooled: torch.Tensor, what: str) -> None:
        """``sequence`` [L, D] and ``pooled`` [P] (row ``local`` or a copy of it) match the stored checksum."""
        check = self.tensors.get("check")
        if check is not None and int(row_checksums(sequence[None], pooled[None])[0]) != int(check[local]):
            raise ValueError(f"{self.path} row {local} ({what}): checksum mismatch, the shard is damaged on disk; "
                             f"rerun `clipcond precompute` with --verify to re-encode the damaged shards")


class EmbeddingStore(Dataset):
    """A precomputed store as a ``Dataset`` of the input's rows, in input order.

    ``store[i]`` is ``{"sequence": [77, D], "pooled": [P], "row": i}`` in the store's dtype, on the CPU, so the
    default collate gives ``sequence [B, 77, D]`` / ``pooled [B, P]``: ``Conditioning(b["sequence"],
    b["pooled"])``. ``store.by_id(id)`` looks a row up by the precompute's ``--id-column``;
    ``store.collate(drop_prob, seed=...)`` is a ``collate_fn`` with caption dropout to the stored null.

    Opening reads the manifest and the row index (8 bytes a row and variant) and checks file sizes; shards are
    memory-mapped lazily, per process, so DataLoader workers each open their own. ``verify=True``
    (or ``verify()``) also checks every file's sha256, which reads the whole store.
    """

    def __init__(self, path: str | os.PathLike[str], *, verify: bool = False, verify_rows: bool = True) -> None:
        self.path = Path(path)
        self.verify_rows = verify_rows  # check each row's checksum as it is read
        self.manifest = Manifest.read(self.path)
        self.manifest.raise_problems(self.path, checksums=verify)
        self._index = self.path / self.manifest.index.file
        self._rows = IndexFormat.rows(self._index)  # [N, k] slots
        if len(self._rows) != self.manifest.rows:
            raise ValueError(f"{self._index}: {len(self._rows)} rows, the manifest says {self.manifest.rows}")
        null = read_tensors(self.path / NULL)
        self._null = Conditioning(null["sequence"], null["pooled"])  # [1, L, D], [1, P]
        self._files = [self.path / entry.file for entry in self.manifest.shards]
        self._starts = [entry.start for entry in self.manifest.shards]  # [S], sorted
        self._slots = self._rows.numpy()  # numpy: a scalar read is ~20x cheaper than a tensor's
        self._ids: dict[str, torch.Tensor] | None = None
        self._handles: OrderedDict[int, object] = OrderedDict()
        self._pid = os.getpid()
        self._buffers = BatchBuffers()  # batch memory of this process, reused once a batch is dropped

    # --- facts ---------------------------------------------------------------------------
    @property
    def spec(self) -> EncoderSpec:
        return spec_from_dict(self.manifest.encoder)

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self.manifest.dtype)

    @property
    def fingerprint(self) -> str:
        return self.manifest.fingerprint

    @property
    def num_unique(self) -> int:
        return self.manifest.unique

    def __len__(self) -> int:
        return len(self._rows)

    def __repr__(self) -> str:
        return (f"EmbeddingStore({str(self.path)!r}, rows={len(self)}, unique={self.num_unique}, "
                f"encoder={self.manifest.encoder['name']!r}, dtype={self.manifest.dtype})")

    # --- rows ----------------------------------------------------------------------------
    @property
    def variants(self) -> int:
        """Captions a row holds (``--column`` given k times, or a list column); ``store[i]`` is variant 0."""
        return self._rows.shape[1]

    def __getitem__(self, row: int) -> dict[str, torch.Tensor | int]:
        return self.get(row)

    def get(self, row: int, variant: int = 0) -> dict[str, torch.Tensor | int]:
        """Row ``row``'s embedding of caption variant ``variant``: ``{"sequence", "pooled", "row"}``."""
        row = self._check_row(row)
        if not 0 <= variant < self.variants:
            raise IndexError(f"variant {variant} is out of range: store {self.path} has {self.variants} a row")
        shard, local = self._locate(row, variant)
        sequence, pooled = self._shard(shard).row(local, f"store row {row}, variant {variant}",
                                                  verify=self.verify_rows)  # [L, D], [P]
        return {"sequence": sequence, "pooled": pooled, "row": row}

    def _locate(self, row: int, variant: int) -> tuple[int, int]:
        slot = int(self._slots[row, variant])
        shard = bisect.bisect_right(self._starts, slot) - 1  # the shard whose slots hold it
        return shard, slot - self._starts[shard]

    def __getitems__(self, rows: Sequence[int]) -> Rows:
        """A DataLoader's batched fetch: the rows copied once into ``[B, L, D]`` / ``[B, P]`` tensors, each
        row's checksum computed in the same pass (``copy_rows``) and compared with the shard's.

        Returns per-row items (views of the batch), so any ``collate_fn`` works; ``store.collate()``
        takes the batch as it is instead of stacking the rows again.
        """
        rows = [self._check_row(r) for r in rows]
        first = self._null
        sequence, pooled, row_ids = _batch_tensors(self._buffers,
                                                   ((len(rows), *first.sequence.shape[1:]), first.sequence.dtype),
                                                   ((len(rows), first.pooled.shape[1]), first.pooled.dtype),
                                                   ((len(rows),), torch.int64))  # [B, L, D], [B, P], [B]
        row_ids.copy_(torch.tensor(rows))
        located = [self._locate(row, 0) for row in rows]
        order = sorted(range(len(rows)), key=located.__getitem__)  # file order: readahead helps a cold read
        views = {shard: self._shard(shard) for shard, _ in located}
        if not self.verify_rows:  # torch's copy, nothing summed
            for i in order:
                seq_row, pooled_row = views[located[i][0]].row(located[i][1], "", verify=False)
                sequence[i].copy_(seq_row)
                pooled[i].copy_(pooled_row)
        else:
            sources, destinations = [], []
            for name, batch in (("sequence", sequence), ("pooled", pooled)):
                batch_bytes = row_bytes(batch)  # [B, bytes], a view
                for i in order:
                    sources.append(views[located[i][0]].rows[name][located[i][1]])
                    destinations.append(batch_bytes[i])
            sums = copy_rows(sources, destinations).reshape(2, -1)  # [sequence, pooled] word sums, in file order
            stored = [views[located[i][0]].checks for i in order]  # None: a version-1 shard, no checksums
            expected = np.array([0 if c is None else c[located[i][1]] for i, c in zip(order, stored, strict=True)],
                                dtype=np.int64)
            checked = np.array([c is not None for c in stored], dtype=bool)
            for k in np.flatnonzero((mix_checksums(sums[0], sums[1]) != expected) & checked):
                i = order[k]
                views[located[i][0]].verify(located[i][1], sequence[i], pooled[i], f"store row {rows[i]}, variant 0")
        items = Rows({"sequence": sequence[i], "pooled": pooled[i], "row": row} for i, row in enumerate(rows))
        items.batch = {"sequence": sequence, "pooled": pooled, "row": row_ids}
        return items

    def _check_row(self, row: int) -> int:
        try:
            index = row.__index__()
        except AttributeError as err:
            raise TypeError(f"store row must be an int, got {type(row).__name__}") from err
        n = len(self._slots)
        if not -n <= index < n:
            raise IndexError(f"row {index} is out of range for store {self.path} with {n} rows")
        return index % n

    def _shard(self, k: int):  # noqa: ANN202
        if self._pid != os.getpid():  # a forked DataLoader worker: never share the parent's maps
            self._handles, self._pid = OrderedDict(), os.getpid()
        handle = self._handles.get(k)
        if handle is None:
            if not self._files[k].exists():
                raise FileNotFoundError(f"{self._files[k]}: removed since this EmbeddingStore was opened "
                                        f"(`clipcond gc` rewrote the store); open {self.path} again")
            handle = self._handles[k] = ShardView(self._files[k])
            if len(self._handles) > MAX_OPEN_SHARDS:
                self._handles.popitem(last=False)
        else:
            self._handles.move_to_end(k)
        return handle

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()  # spawned workers: handles are per process and cannot be pickled
        state["_handles"] = OrderedDict()
        return state

    # --- ids -----------------------------------------------------------------------------
    def row_of(self, key: str | int) -> int:
        """The input row whose id is ``key`` (ids compare as strings: ``7`` finds ``"7"``)."""
        ids = self._load_ids()
        text = str(key)
        hashes = ids["id_sorted_hash"]  # [N] sorted
        target = id_hash(text)
        pos = int(hashes.searchsorted(target))
        while pos < len(hashes) and hashes[pos] == target:
            row = int(ids["id_sorted_rows"][pos])
            if self.id_of(row) == text:
                return row
            pos += 1
        raise KeyError(f"id {key!r} is not in store {self.path} "
                       f"({len(self)} rows, ids from column {self.manifest.input.id_column or '__key__'!r})")

    def by_id(self, key: str | int) -> dict[str, torch.Tensor | int]:
        """``store[store.row_of(key)]``."""
        return self[self.row_of(key)]

    def id_of(self, row: int) -> str:
        ids = self._load_ids()
        row = self._check_row(row)
        offsets = ids["id_offsets"]
        return ids["id_bytes"][offsets[row] : offsets[row + 1]].decode()

    def _load_ids(self) -> dict[str, object]:
        if self._ids is None:
            if not self.manifest.has_ids:
                raise ValueError(f"store {self.path} has no ids: it was precomputed without --id-column; "
                                 "index it by row number instead")
            if not self._index.exists():
                raise FileNotFoundError(f"{self._index}: removed since this EmbeddingStore was opened "
                                        f"(`clipcond gc` rewrote the store); open {self.path} again")
            ids = read_tensors(self._index, IndexFormat.IDS)
            # numpy arrays and one bytes object: per-lookup costs of well under a microsecond each.
            self._ids = {"id_bytes": ids["id_bytes"].numpy().tobytes(), **{k: ids[k].numpy() for k in
                                                                         ("id_offsets", "id_sorted_hash",
                                                                          "id_sorted_rows")}}
        return self._ids

    # --- null, dropout, verification ----------------------------------------------------
    def null(self, batch_size: int = 1) -> Conditioning:
        """The encoder's null conditioning as stored (``""`` encoded, or SDXL's zeros), ``batch_size`` rows."""
        return Conditioning(self._null.sequence.repeat(batch_size, 1, 1), self._null.pooled.repeat(batch_size, 1))

    def collate(self, drop_prob: float = 0.0, *, seed: int = 0, epoch: int = 0,
                variant: int | Literal["random"] = 0) -> CaptionDropout:
        """A DataLoader ``collate_fn`` dropping rows to the stored null; see ``CaptionDropout``.

        ``variant="random"``: each row gets one of its caption variants, chosen per (seed, epoch, row).
        """
        if variant != "random" and not (isinstance(variant, int) and 0 <= variant < self.variants):
            raise ValueError(f"variant must be 'random' or in [0, {self.variants}), got {variant!r}")
        null = self._null
        return CaptionDropout(null.sequence[0], null.pooled[0], drop_prob=drop_prob, seed=seed, epoch=epoch,
                              variant=variant, store=self if variant != 0 else None)

    def verify(self) -> None:
        """Check every file's size and sha256 (reads the whole store); ``ValueError`` naming bad files."""
        self.manifest.raise_problems(self.path, checksums=True)


class BatchBuffers:
    """Batch memory for fetches in the main process, handed out again once no batch made from it is left.

    A fresh buffer is zeroed page by page by the kernel as the copy first touches it: for 16 SDXL rows (5 MB)
    ~1,200 page faults, longer than copying the rows. A buffer is reused only when the array the batch was
    made from is gone (a weak reference: every tensor, view or array of the batch keeps it alive), so a batch
    that a training loop, a pin-memory thread or a list still holds is never written over. Two are kept: the
    batch a loop holds while the next one is fetched.
    """

    KEEP = 2

    def __init__(self) -> None:
        self.kept: list[tuple[np.ndarray, weakref.ref]] = []  # (buffer, the array its last batch was made of)
        self.lock = threading.Lock()  # fetches from several threads never get the same buffer

    def __reduce__(self) -> tuple:
        return BatchBuffers, ()  # another process (a spawned worker) starts with none

    def get(self, size: int) -> torch.Tensor:
        """``size`` bytes as a uint8 tensor that nothing else uses (the old contents left in place)."""
        with self.lock:
            free = [k for k, (buffer, lent) in enumerate(self.kept) if buffer.nbytes == size and lent() is None]
            if free:
                buffer = self.kept.pop(free[0])[0]
            else:
                buffer = np.empty(size, dtype=np.uint8)
                if len(self.kept) >= self.KEEP:
                    self.kept.pop(0)  # the oldest; a batch still made of it keeps it alive as long as it needs
            lent = buffer[:]  # the batch's own array: gone when the batch is
            self.kept.append((buffer, weakref.ref(lent)))
            return torch.from_numpy(lent)


def _batch_tensors(buffers: BatchBuffers, *specs: tuple[tuple[int, ...], torch.dtype]) -> list[torch.Tensor]:
    """Empty batch tensors of these (shape, dtype)s, views of one buffer; in a DataLoader worker the buffer is
    in shared memory (as default_collate makes its batches), so that handing the batch to the main process
    copies nothing and passes one shared segment rather than one per tensor (each costs ~0.5 ms); in the main
    process, from ``buffers``."""
    offsets, size = [], 0
    for shape, dtype in specs:
        size += -size % 8  # every view 8-byte aligned
        offsets.append(size)
        size += math.prod(shape) * dtype.itemsize
    if get_worker_info() is None:
        buffer = buffers.get(size)
    else:
        buffer = torch.empty(0, dtype=torch.uint8).new(torch.UntypedStorage._new_shared(size))
    return [buffer[a : a + math.prod(shape) * dtype.itemsize].view(dtype).view(shape) if math.prod(shape)
            else torch.empty(shape, dtype=dtype) for a, (shape, dtype) in zip(offsets, specs, strict=True)]


class Rows(list):
    """``EmbeddingStore.__getitems__``'s items, with ``batch``: the same rows already stacked."""

    batch: dict[str, torch.Tensor]


@dataclass
class CaptionDropout:
    """``collate_fn`` for store items: ``default_collate``, then rows replaced by the null conditioning.

    Row ``r`` is dropped in epoch ``e`` when ``u(seed, e, r) < drop_prob``, ``u`` a hash-based
    uniform in [0, 1): the choice depends on nothing else (not batch size, shuffling, worker count),
    so it is reproducible and changes every epoch. ``variant="random"`` picks each row's caption
    variant the same way (an independent uniform per (seed, epoch, row)). Call ``set_epoch(e)`` before iterating the
    DataLoader each epoch; workers copy the collate_fn when an epoch's iterator starts, so with
    ``persistent_workers=True`` build a new DataLoader (or collate) per epoch instead.
    The batch gains ``"dropped"`` ``[B]`` bool.
    """

    null_sequence: torch.Tensor  # [L, D]
    null_pooled: torch.Tensor  # [P]
    drop_prob: float = 0.0
    seed: int = 0
    epoch: int = 0
    variant: int | Literal["random"] = 0  # which caption variant each row gets (store items are variant 0)
    store: EmbeddingStore | None = None  # reads the other variants

    def __post_init__(self) -> None:
        if not 0.0 <= self.drop_prob <= 1.0:
            raise ValueError(f"drop_prob must be in [0, 1], got {self.drop_prob}")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _uniform(self, rows: Sequence[int] | torch.Tensor, salt: str = "") -> list[float]:
        rows = rows.tolist() if isinstance(rows, torch.Tensor) else list(rows)
        return [int.from_bytes(hashlib.blake2b(f"{self.seed}/{self.epoch}/{r}{salt}".encode(), digest_size=8)
                               .digest(), "little") / 2**64 for r in rows]

    def dropped(self, rows: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """``[B]`` bool: which of these input rows this epoch replaces by the null conditioning."""
        return torch.tensor(self._uniform(rows), dtype=torch.float64) < self.drop_prob

    def variants(self, rows: Sequence[int] | torch.Tensor) -> list[int]:
        """The caption variant of each row this epoch: fixed, or uniform per (seed, epoch, row)."""
        if self.variant != "random":
            return [self.variant] * len(rows)
        k = self.store.variants
        return [min(int(u * k), k - 1) for u in self._uniform(rows, "/variant")]

    def __call__(self, items: list[dict]) -> dict:
        missing = {"sequence", "pooled", "row"} - set(items[0]) if items else set()
        if missing:
            raise TypeError(f"CaptionDropout needs items with 'sequence', 'pooled' and 'row' (EmbeddingStore "
                            f"items), got keys {sorted(items[0])}")
        if self.store is not None:  # items are variant 0: read the chosen variants instead
            items = [self.store.get(item["row"], v) if v else item
                     for item, v in zip(items, self.variants([item["row"] for item in items]), strict=True)]
        # A batched fetch stacked the rows already: take its tensors rather than copying every row again.
        batch = dict(items.batch) if isinstance(items, Rows) else default_collate(items)
        mask = self.dropped(batch["row"])  # [B]
        if mask.any():
            batch["sequence"][mask] = self.null_sequence.to(batch["sequence"].dtype)
            batch["pooled"][mask] = self.null_pooled.to(batch["pooled"].dtype)
        batch["dropped"] = mask
        return batch
