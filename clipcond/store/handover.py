"""DataLoader workers' batches handed to the main process through shared memory that each worker reuses.

torch's default collate stacks a worker's batch into new shared-memory segments, one per tensor, and the pickler
sends each as a file descriptor: per batch, every segment is made, its pages zeroed by the kernel, sent,
received, mapped and unmapped again. On 2 cores that costs more than reading 16 SDXL rows from the page cache
(docs/performance.md, "Reading a store in training"). ``Handover`` stacks every tensor-like field of a batch into
one segment of a few that the worker keeps (``SLOTS`` beyond the prefetched batches); the main process maps
each segment once and afterwards receives only its number.

A segment is written over only once the main process has let go of the batch it last held: the batch's tensors
are views of one array made for that batch, and when the last tensor, view or array of the batch is gone a
weak-reference callback marks the slot free in a flag array both processes share (so a batch a training loop
keeps, or a list of batches, is never overwritten). A worker with no free slot collates as torch does.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import default_collate, get_worker_info

from clipcond.store.batch import Column
from clipcond.store.checksums import copy_rows, populate

SLOTS = 2  # segments a worker keeps beyond its prefetched batches: the batch a loop holds, and the one it drops
ALIGN = 64  # bytes: each field of a segment starts on a cache line


@dataclass
class Message:
    """One worker batch on its way to the main process (a plain object: the DataLoader's pin-memory step leaves it
    alone). ``fields``: (key, shape, dtype, byte offset) of the stacked fields in segment ``slot`` of worker
    ``worker``; ``segment`` is sent only when the main process has not mapped it yet; ``rest``: the fields
    default_collate made (strings, tuples, ...); ``order``: every key in the items' order."""

    rest: dict
    indices: list[int]
    worker: int
    slot: int
    segment: torch.Tensor | None
    fields: list[tuple[str, tuple[int, ...], torch.dtype, int]]
    size: int
    order: list[str]


class Handover:
    """The collate of a DataLoader whose items are ``(dict, index)`` pairs, and its main-process side ``receive``,
    which turns what the collate returned into ``(batch, indices)``. Call ``start()`` before the loader starts its
    workers (a new flag array: slots of workers that have ended are never marked free in the new ones')."""

    def __init__(self, workers: int, prefetch: int) -> None:
        self.shape = (max(workers, 1), prefetch + SLOTS)
        self.start()

    def start(self) -> None:
        self.flags = torch.zeros(self.shape, dtype=torch.uint8).share_memory_()  # [workers, slots]: 1 while lent
        self.mapped: dict[tuple[int, int], torch.Tensor] = {}  # the main process's maps of the workers' segments
        self.owned: list[torch.Tensor | None] = [None] * self.shape[1]  # a worker's own segments
        self.told = [False] * self.shape[1]  # a worker's segments the main process has mapped

    def __getstate__(self) -> dict:
        return {"shape": self.shape, "flags": self.flags}  # a spawned worker: the flags, none of the segments

    def __setstate__(self, state: dict) -> None:
        self.shape, self.flags, self.mapped = state["shape"], state["flags"], {}
        self.owned, self.told = [None] * self.shape[1], [False] * self.shape[1]

    def __call__(self, samples: list[tuple[dict, int]]) -> Message | tuple[dict, list[int]]:
        items, indices = [item for item, _ in samples], [i for _, i in samples]
        info = get_worker_info()
        columns = {key: column for key in (items[0] if items and info is not None else ())
                   if all(key in item for item in items) and (column := Column.of([item[key] for item in items]))}
        if not columns:
            return default_collate(items), indices
        fields, size = [], 0
        for key, column in columns.items():
            size += -size % ALIGN
            fields.append((key, (len(items), *column.shape), column.dtype, size))
            size += len(items) * math.prod(column.shape) * column.dtype.itemsize
        slot = self._free_slot(info.id, size) if size else None
        if slot is None:
            return default_collate(items), indices
        segment = self.owned[slot]
        sources, destinations = [], []
        for (_, shape, dtype, offset), column in zip(fields, columns.values(), strict=True):
            nbytes = math.prod(shape) * dtype.itemsize
            sources.extend(column.sources)
            destinations.extend(column.destinations(segment[offset : offset + nbytes].view(dtype).view(shape)))
        copy_rows(sources, destinations, checksums=False)
        rest = default_collate([{k: v for k, v in item.items() if k not in columns} for item in items])
        self.flags[info.id, slot] = 1  # lent until the main process lets go of this batch
        message = Message(rest, indices, info.id, slot, None if self.told[slot] else segment, fields, size,
                          list(items[0]))
        self.told[slot] = True
        return message

    def _free_slot(self, worker: int, size: int) -> int | None:
        """A slot of this worker that no batch in the main process holds, its segment at least ``size`` bytes (a
        new one made where it is smaller); None when every slot is lent."""
        free = [k for k in range(self.shape[1]) if not self.flags[worker, k]]
        if not free:
            return None
        fits = [k for k in free if self.owned[k] is not None and len(self.owned[k]) >= size]
        if fits:
            return fits[0]
        slot = free[0]
        segment = torch.empty(0, dtype=torch.uint8).new(torch.UntypedStorage._new_shared(size))
        populate(segment.numpy())
        self.owned[slot], self.told[slot] = segment, False
        return slot

    def receive(self, message: Message | tuple[dict, list[int]]) -> tuple[dict, list[int]]:
        """``(batch, indices)``: the batch's stacked fields as views of the worker's segment, lent to the batch."""
        if not isinstance(message, Message):
            return message
        key = (message.worker, message.slot)
        if message.segment is not None:
            self.mapped[key] = message.segment
        lent = self.mapped[key].numpy()[: message.size]  # this batch's own array: gone when the batch is
        weakref.finalize(lent, _release, self.flags.numpy(), *key)
        base = torch.from_numpy(lent)
        stacked = {name: base[offset : offset + math.prod(shape) * dtype.itemsize].view(dtype).view(shape)
                   for name, shape, dtype, offset in message.fields}
        return {name: stacked[name] if name in stacked else message.rest[name] for name in message.order}, \
            message.indices


def _release(flags: np.ndarray, worker: int, slot: int) -> None:
    flags[worker, slot] = 0
