"""``EmbeddingStore``: a precomputed store (clipcond/store/format.py) read back as a memory-mapped ``Dataset``, a row
or a batch at a time (the batch memory: clipcond/store/batch.py; caption dropout: clipcond/store/dropout.py; your
data joined with the rows: clipcond/store/join.py).

Opening reads the manifest (validated field by field) and the row index (8 bytes a row and variant, its
sha256 checked) and checks file sizes; shards are memory-mapped lazily, per process, so DataLoader workers
each open their own, and each shard's header is held to the format's rules when it is mapped. Every row
read is checked against its shard's row checksum (``verify_rows=False`` skips that, nothing else); a
DataLoader fetches a batch at once (``__getitems__``), copying each row once into the batch tensors. Stores
of format 1 (unreleased clipcond) are not read: opening one says to precompute again into a new folder.
"""

from __future__ import annotations

import bisect
import operator
import os
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from clipcond._files import id_hash
from clipcond.conditioning import Conditioning
from clipcond.specs import EncoderSpec, spec_from_dict
from clipcond.store.batch import BatchBuffers, Column, Rows, batch_tensors
from clipcond.store.checksums import copy_rows, mix_checksums, row_bytes
from clipcond.store.dropout import CaptionDropout
from clipcond.store.format import IndexFormat, read_null
from clipcond.store.handover import lease_of, worker_memory
from clipcond.store.layout import RowLayout
from clipcond.store.manifest import REPAIR_HINT, Manifest
from clipcond.store.shard_view import ShardView

MAX_OPEN_SHARDS = 64  # memory maps kept open per process (DataLoader worker)


class EmbeddingStore(Dataset):
    """A precomputed store as a ``Dataset`` of the input's rows, in input order.

    ``store[i]`` is ``{"sequence": [L, D], "pooled": [P], "row": i}`` (L: 77 for CLIP encoders, a T5 recipe's
    length; a masked recipe's with ``"mask": [L]``) in the store's dtype, on the CPU, so the default collate gives
    ``sequence [B, L, D]`` / ``pooled [B, P]``: ``store.conditioning(batch)``. ``store.by_id(id)`` looks a row up
    by the precompute's ``--id-column``; ``store.collate(drop_prob, seed=...)`` is a ``collate_fn`` with caption
    dropout to the stored null.

    Opening reads the manifest and the row index (its sha256 checked: it is read whole anyway, ~1 ms a MB)
    and checks file sizes; shards are memory-mapped lazily, per process, so DataLoader workers each open their
    own. Every row served is checked against its stored checksum on every read (one compiled pass over its
    bytes: ~1 µs for a 12 kB row; ``verify_rows=False`` skips it). ``verify=True`` (or ``verify()``) also
    checks every file's sha256, which reads the whole store.
    """

    def __init__(self, path: str | os.PathLike[str], *, verify: bool = False, verify_rows: bool = True) -> None:
        self.path = Path(path).absolute()  # shards open lazily: a later chdir must not move the store
        self.verify_rows = verify_rows  # check each row's checksum as it is read
        self.manifest = Manifest.read(self.path)
        self.manifest.raise_problems(self.path, checksums=verify)
        self._index = self.path / self.manifest.index.file
        index = IndexFormat.read(self.path, self.manifest)  # checked: sha256, layout, slots in range
        self._slots = index["rows"]  # [N, k] int64, -1 past a row's last variant; numpy: cheap scalar reads
        self._counts = self._variant_counts(self._slots)  # [N] captions per row, None when every row has k
        self._ids = {name: index[name] for name in IndexFormat.IDS} if self.manifest.has_ids else None
        self._layout = self.manifest.layout  # how rows are held (clipcond/store/layout.py)
        self._spec = spec_from_dict(self.manifest.encoder)
        sequence, pooled, mask = read_null(self.path, self.manifest)  # [1, L, D], [1, P], masked: [1, L]
        self._null = Conditioning(sequence, pooled, mask, pipeline=self._spec.pipeline)
        self._entries = self.manifest.shards
        self._files = [self.path / entry.file for entry in self._entries]
        self._starts = [entry.start for entry in self._entries]  # [S], sorted
        self._sizes = [entry.stop - entry.start for entry in self._entries]
        self._handles: OrderedDict[int, ShardView] = OrderedDict()
        self._pid = os.getpid()
        self._buffers = BatchBuffers()  # batch memory of this process, reused once a batch is dropped

    @staticmethod
    def _variant_counts(slots: np.ndarray) -> np.ndarray | None:
        if slots.shape[1] == 1 or not len(slots) or slots[:, -1].min() >= 0:
            return None
        return (slots >= 0).sum(axis=1)  # packed left (checked by IndexFormat.read)

    @property
    def _rows(self) -> torch.Tensor:
        """[N, k] int64 slots as a tensor (a copy; tests/test_precompute.py reads it)."""
        return torch.from_numpy(np.array(self._slots))

    # --- facts ---------------------------------------------------------------------------
    @property
    def spec(self) -> EncoderSpec:
        return self._spec

    @property
    def layout(self) -> RowLayout:
        """How each row's sequence is held: whole, SD3's parts, or a masked recipe's kept rows."""
        return self._layout

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
        return len(self._slots)

    def __repr__(self) -> str:
        return (f"EmbeddingStore({str(self.path)!r}, rows={len(self)}, unique={self.num_unique}, "
                f"encoder={self.manifest.encoder['name']!r}, dtype={self.manifest.dtype})")

    # --- rows ----------------------------------------------------------------------------
    @property
    def variants(self) -> int:
        """The most captions a row holds (``--column`` given k times, or a list column); ``store[i]`` is variant
        0, which every row has; ``variant_count(i)`` is row i's own number."""
        return self._slots.shape[1]

    def kept_lengths(self) -> np.ndarray:
        """[N] int64: the sequence rows each input row's caption (variant 0) keeps: a masked recipe's mask length
        (PixArt, Chroma, AuraFlow, Sana), else the full length. For batches of about one length
        (``LengthGroupedSampler``): a masked batch is as long as its longest row."""
        slots = self._slots[:, 0]
        if not self._layout.masked:
            return np.full(len(slots), self._layout.length, dtype=np.int64)
        by_slot = np.zeros(self.manifest.slots, dtype=np.int64)
        for k, entry in enumerate(self._entries):
            by_slot[entry.start : entry.stop] = self._shard(k).lengths  # checked when the shard is mapped
        return by_slot[slots]

    def variant_count(self, row: int) -> int:
        """How many caption variants row ``row`` holds (1 to ``variants``: a list column's rows may differ)."""
        row = self._check_row(row)
        return self.variants if self._counts is None else int(self._counts[row])

    def __getitem__(self, row: int) -> dict[str, torch.Tensor | int]:
        return self.get(row)

    def get(self, row: int, variant: int = 0) -> dict[str, torch.Tensor | int]:
        """Row ``row``'s embedding of caption variant ``variant``: ``{"sequence", "pooled", "row"}``."""
        row = self._check_row(row)
        variant = operator.index(variant)  # numpy and torch integers too; a float is a TypeError
        if variant and not (0 < variant < self.variants and (self._counts is None or variant < self._counts[row])):
            raise IndexError(f"variant {variant!r} is out of range: row {row} of store {self.path} has "
                             f"{self.variant_count(row)} caption variant(s) (the most a row has: {self.variants})")
        view, local = self._locate(row, variant)
        if self.verify_rows:
            view.verify(local, f"store row {row}, variant {variant}")
        if self._layout.plain:
            return {"sequence": view.sequence[local], "pooled": view.pooled[local], "row": row}  # [L, D], [P] views
        sequence = self._null.sequence.new_zeros(self.manifest.sequence_shape)  # [L, D]: the full padded row
        for source, target in view.pairs(local, sequence):
            np.copyto(target, source)
        item = {"sequence": sequence, "pooled": view.pooled[local], "row": row}
        if self._layout.masked:
            item["mask"] = (torch.arange(len(sequence)) < view.kept(local)).long()  # [L]
        return item

    def _locate(self, row: int, variant: int) -> tuple[ShardView, int]:
        """The shard holding row ``row``'s variant ``variant``, opened, and the row's place in it."""
        slot = int(self._slots[row, variant])
        shard = bisect.bisect_right(self._starts, slot) - 1  # the shard whose slots hold it
        local = slot - self._starts[shard] if shard >= 0 else -1
        if not 0 <= local < self._sizes[shard]:
            raise ValueError(f"{self._index}: row {row} variant {variant} is slot {slot}, which no shard of "
                             f"{self.path / 'manifest.json'} holds; {REPAIR_HINT}")
        return self._shard(shard), local

    def __getitems__(self, rows: Sequence[int]) -> Rows:
        """A DataLoader's batched fetch: the rows copied once into ``[B, L, D]`` / ``[B, P]`` tensors, each
        row's checksum computed in the same pass (``copy_rows``) and compared with the shard's; unchecked
        (``verify_rows=False``), the same copy without the sums.

        Returns per-row items (views of the batch), so any ``collate_fn`` works; ``store.collate()``
        takes the batch as it is instead of stacking the rows again.
        """
        return self.fetch(rows, {})

    def batch(self, rows: Sequence[int] | torch.Tensor) -> dict[str, torch.Tensor]:
        """Rows ``rows`` stacked: ``{"sequence": [B, L, D], "pooled": [B, P], "row": [B]}``, checked as every read.

        For a join in the main process: let the DataLoader's workers load your data (latents) with the row
        indices, and fetch the store's rows here, into batch memory this process reuses once a batch is gone, so
        that the rows never cross from a worker (docs/store.md)."""
        return self.fetch([int(r) for r in rows], {}).batch

    def fetch(self, rows: Sequence[int], columns: Mapping[str, Column]) -> Rows:
        """``__getitems__``, with ``columns`` (a joined dataset's fields, one value per row) stacked into the same
        batch memory by the same copy: in a DataLoader worker, one segment of shared memory it reuses for the
        whole batch (clipcond/store/handover.py; ``Rows.lease`` holds it).

        A masked layout's batch is as long as its longest row (``pad_to="longest"``, the masked presets) or the
        recipe's full length, with ``mask`` [B, L']; rows the store does not hold (past a row's kept rows, SD3's
        CLIP padding columns) are zeros."""
        rows = [self._check_row(r) for r in rows]
        located = [self._locate(row, 0) for row in rows]
        layout, n, length = self._layout, len(rows), self._batch_length(located)
        null = self._null
        specs = [((n, length, null.sequence.shape[2]), null.sequence.dtype), ((n, null.pooled.shape[1]),
                 null.pooled.dtype), ((n,), torch.int64), ((n,), torch.bool)]  # [B, L', D], [B, P], [B], [B]
        if layout.masked:
            specs.append(((n, length), torch.int64))  # [B, L'] the mask
        specs += [((n, *column.shape), column.dtype) for column in columns.values()]
        (sequence, pooled, row_ids, dropped, *stacked), fresh = batch_tensors(self._buffers, *specs,
                                                                              memory=worker_memory)
        mask = stacked.pop(0) if layout.masked else None
        row_ids.copy_(torch.tensor(rows, dtype=torch.int64))
        order = sorted(range(n), key=lambda i: (id(located[i][0]), located[i][1]))  # file order: readahead
        sources, destinations, owners = self._pieces(located, order, sequence, pooled)
        pieces = len(owners) if owners else n  # sequence pieces: a plain layout's rows, else the parts' pieces
        for column, batch in zip(columns.values(), stacked, strict=True):  # summed too when checking: ~free, unused
            sources.extend(column.sources)
            destinations.extend(column.destinations(batch))
        aligned = all(p.width == layout.width or p.width * sequence.element_size() % 8 == 0 for p in layout.parts)
        if self.verify_rows and not aligned:  # pieces of odd sizes do not add up to the row's word sum
            for row, (view, local) in zip(rows, located, strict=True):
                view.verify(local, f"store row {row}, variant 0")
        sums = copy_rows(sources, destinations, checksums=self.verify_rows and aligned)
        if sums is not None:
            self._check_sums(sums, pieces, order, owners, rows, located)
        if not layout.plain:
            self._zero_unstored(sequence, mask, located, fresh=fresh)
        batch = {"sequence": sequence, "pooled": pooled, "row": row_ids}
        if mask is not None:
            batch["mask"] = mask
        items = Rows({key: row if key == "row" else tensor[i] for key, tensor in batch.items()}
                     for i, row in enumerate(rows))  # sequence [L', D], pooled [P], row, mask [L']
        items.batch, items.dropped = {**batch, **dict(zip(columns, stacked, strict=True))}, dropped
        items.lease = lease_of(sequence)  # in a worker's reused memory: how the collate hands it over
        return items

    def _pieces(self, located: list[tuple[ShardView, int]], order: list[int], sequence: torch.Tensor,
                pooled: torch.Tensor) -> tuple[list[np.ndarray], list[np.ndarray], list[int]]:
        """The copy of a batch's rows, in file ``order``: (stored bytes, batch bytes) of every sequence piece, then of
        every pooled vector, and the batch row each sequence piece belongs to (none for a plain layout, whose pieces
        are its rows)."""
        sources, destinations, owners = [], [], []
        if self._layout.plain:
            batch_bytes = row_bytes(sequence)  # [B, bytes], a view
            for i in order:
                view, local = located[i]
                sources.append(view.rows["sequence"][local])
                destinations.append(batch_bytes[i])
        else:
            for i in order:
                view, local = located[i]
                for source, destination in view.pairs(local, sequence[i]):
                    sources.append(source)
                    destinations.append(destination)
                    owners.append(i)
        batch_bytes = row_bytes(pooled)
        for i in order:
            view, local = located[i]
            sources.append(view.rows["pooled"][local])
            destinations.append(batch_bytes[i])
        return sources, destinations, owners

    def _batch_length(self, located: list[tuple[ShardView, int]]) -> int:
        """Rows of a batch's sequences: the store's L, or a masked ``pad_to="longest"`` layout's longest kept row."""
        if self._layout.masked and self._spec.pad_to == "longest" and located:
            return max(view.kept(local) for view, local in located)
        return self.manifest.sequence_shape[0]

    def _check_sums(self, sums: np.ndarray, pieces: int, order: list[int], owners: list[int], rows: list[int],
                    located: list[tuple[ShardView, int]]) -> None:
        """The copy's word sums (``pieces`` sequence pieces, then a pooled row each, in ``order``) against each row's
        stored check; ``owners``: the row of each piece where a row has several (else one piece each, in order)."""
        n = len(rows)
        if owners:
            sequence_sums = np.zeros(n, dtype=np.uint64)
            np.add.at(sequence_sums, np.array(owners), sums[:pieces])
            if self._layout.masked:
                sequence_sums += np.array([view.kept(local) for view, local in located], dtype=np.uint64)
            sequence_sums = sequence_sums[order]  # file order, as the pooled sums
        else:
            sequence_sums = sums[:n]
        pooled_sums = sums[pieces : pieces + n]
        expected = np.array([located[i][0].checks[located[i][1]] for i in order], dtype=np.int64)
        for k in np.flatnonzero(mix_checksums(sequence_sums, pooled_sums) != expected):
            view, local = located[order[k]]
            raise view.damaged(local, f"store row {rows[order[k]]}, variant 0")

    def _zero_unstored(self, sequence: torch.Tensor, mask: torch.Tensor | None,
                       located: list[tuple[ShardView, int]], *, fresh: bool) -> None:
        """What the store does not hold: zeros past each row's kept rows (and the mask), zeros in a narrow part's
        columns (SD3's CLIP rows past 2048); ``fresh``: the batch memory is zeros already (a worker's new shared
        segment), else it may be a reused buffer."""
        if mask is not None:
            kept = torch.tensor([view.kept(local) for view, local in located], dtype=torch.int64)  # [B]
            mask.copy_(torch.arange(sequence.shape[1]) < kept[:, None])
            if not fresh:
                for i, k in enumerate(kept.tolist()):
                    sequence[i, k:].zero_()
            return
        if fresh:
            return
        first = 0
        for part in self._layout.parts:
            if part.width < sequence.shape[2]:
                sequence[:, first : first + part.length, part.width :].zero_()
            first += part.length

    def _check_row(self, row: int) -> int:
        n = len(self._slots)
        if type(row) is int and 0 <= row < n:
            return row
        try:
            index = row.__index__()
        except AttributeError as err:
            raise TypeError(f"store row must be an int, got {type(row).__name__}") from err
        if not -n <= index < n:
            raise IndexError(f"row {index} is out of range for store {self.path} with {n} rows")
        return index % n

    def _shard(self, k: int) -> ShardView:
        if self._pid != os.getpid():  # a forked DataLoader worker: never share the parent's maps
            self._handles, self._pid = OrderedDict(), os.getpid()
        handle = self._handles.get(k)
        if handle is None:
            if not self._files[k].exists():
                raise FileNotFoundError(f"{self._files[k]}: removed since this EmbeddingStore was opened "
                                        f"(`clipcond gc` rewrote the store); open {self.path} again")
            handle = self._handles[k] = ShardView(self._files[k], self._entries[k], self.manifest)
            if len(self._handles) > MAX_OPEN_SHARDS:
                self._handles.popitem(last=False)
        elif len(self._handles) > 1:
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
        while pos < len(hashes) and int(hashes[pos]) == target:
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
        try:
            return ids["id_bytes"][offsets[row] : offsets[row + 1]].tobytes().decode()
        except UnicodeDecodeError as err:
            raise ValueError(f"{self._index}: the id of row {row} is not UTF-8; {REPAIR_HINT}") from err

    def _load_ids(self) -> dict[str, np.ndarray]:
        if self._ids is None:
            raise ValueError(f"store {self.path} has no ids: it was precomputed without --id-column; "
                             "index it by row number instead")
        return self._ids

    # --- null, dropout, verification ----------------------------------------------------
    def null(self, batch_size: int = 1) -> Conditioning:
        """The encoder's null conditioning as stored (``""`` encoded, or SDXL's zeros), ``batch_size`` rows (a masked
        recipe's with its mask, at its full length)."""
        null = self._null
        mask = None if null.mask is None else null.mask.repeat(batch_size, 1)
        return self.conditioning({"sequence": null.sequence.repeat(batch_size, 1, 1),
                                  "pooled": null.pooled.repeat(batch_size, 1), "mask": mask})

    def conditioning(self, batch: dict) -> Conditioning:
        """A collated batch of this store's rows as the ``Conditioning`` its pipeline takes: ``sequence``,
        ``pooled``, a masked recipe's ``mask``, Flux's and Chroma's ``text_ids``, and the pipeline's name, so that
        ``store.conditioning(batch).pipeline_kwargs()`` are the diffusers pipeline's keywords."""
        sequence = batch["sequence"]
        text_ids = sequence.new_zeros(sequence.shape[1], 3) if self._spec.text_ids else None  # [L, 3]
        return Conditioning(sequence, batch["pooled"], batch.get("mask"), text_ids, self._spec.pipeline)

    def collate(self, drop_prob: float | Mapping[str, float] = 0.0, *, seed: int = 0, epoch: int = 0,
                variant: int | Literal["random"] = 0) -> CaptionDropout:
        """A DataLoader ``collate_fn`` dropping rows to the stored null; see ``CaptionDropout``.

        ``drop_prob`` per tower for SD3 and Flux (``{"clip_l": 0.1, "clip_g": 0.1, "t5": 0.1}``, kohya's SD3
        ``--clip_l_dropout_rate`` ...): each tower's part of a row zeroed with its own probability, as
        ``TextConditioner.encode`` does. ``variant="random"``: each row gets one of its own caption variants
        (``variant_count(row)`` of them), chosen uniformly per (seed, epoch, row). A fixed ``variant=j`` on a row
        with fewer captions is an ``IndexError`` naming the row and its count.
        """
        if variant != "random":
            variant = operator.index(variant)  # numpy and torch integers too; a float is a TypeError
            if not 0 <= variant < self.variants:
                raise ValueError(f"variant must be 'random' or in [0, {self.variants}), got {variant!r}")
        null = self._null
        return CaptionDropout(null.sequence[0], null.pooled[0], drop_prob=drop_prob, seed=seed, epoch=epoch,
                              variant=variant, store=self if variant != 0 else None,
                              null_mask=None if null.mask is None else null.mask[0],
                              spec=self._spec if isinstance(drop_prob, Mapping) else None,
                              longest=self._layout.masked and self._spec.pad_to == "longest")

    def verify(self) -> None:
        """Check every file's size and sha256 (reads the whole store); ``ValueError`` naming bad files."""
        self.manifest.raise_problems(self.path, checksums=True)
