"""DataLoader workers' batches handed to the main process through shared memory that each worker reuses.

torch hands a worker's batch over in new shared-memory segments: per batch, each is made, its pages zeroed by the
kernel, sent as a file descriptor, received, mapped and unmapped again. On 2 cores that costs more than reading
16 SDXL rows from the page cache (docs/performance.md, "Reading a store in training"). A ``JoinedLoader``'s
workers fetch a batch (the store's rows and your stacked fields, in one copy) into one segment of a few that
each keeps (``SLOTS`` beyond its prefetched batches); the main process maps each segment once and afterwards
receives only its number.

A segment is written over only once the main process has let go of the batch it last held: the batch's tensors
are views of one array made for that batch, and when the last tensor, view or array of the batch is gone a
weak-reference callback marks the slot free in a flag array both processes share (so a batch a training loop
keeps, or a list of batches, is never overwritten). A worker with no free slot makes a new segment, as torch does.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import get_worker_info

from clipcond.store.batch import Rows
from clipcond.store.checksums import populate

SLOTS = 2  # segments a worker keeps beyond its prefetched batches: the batch a loop holds, and the one it drops
HEADROOM = 4  # a segment made for a larger batch than its slot held gets 1/HEADROOM more (masked batches vary)


@dataclass
class Message:
    """One worker batch on its way to the main process (a plain object: the DataLoader's pin-memory step leaves it
    alone): ``fields`` (key, shape, dtype, byte offset) of ``Rows.batch`` and ``Rows.dropped`` in segment ``slot``
    of worker ``worker``; ``segment`` only when the main process has not mapped it yet; ``rest``: each item's
    fields the fetch did not stack (strings, tuples, ...); ``rows``: the store rows; ``order``: an item's keys."""

    worker: int
    slot: int
    segment: torch.Tensor | None
    size: int
    fields: list[tuple[str | None, tuple[int, ...], torch.dtype, int]]
    rest: list[dict]
    rows: list[int]
    order: list[str]


class Handover:
    """A worker's batch memory (``memory``, for ``EmbeddingStore._fetch``) and collate (``__call__``: the fetched
    ``Rows`` as a ``Message``). ``start()``, called just before the loader starts its workers, gives the main
    process's side for them (``Receiver``): a new flag array, so that the batches of workers that have ended, or
    of another iteration running beside this one, never mark slots of the new workers free."""

    def __init__(self, workers: int, prefetch: int) -> None:
        self.shape = (max(workers, 1), prefetch + SLOTS)
        self.start()

    def start(self) -> Receiver:
        self.__setstate__({"shape": self.shape, "flags": torch.zeros(self.shape, dtype=torch.uint8).share_memory_()})
        return Receiver(self.flags)

    def __getstate__(self) -> dict:
        return {"shape": self.shape, "flags": self.flags}  # a spawned worker: the flags, none of the segments

    def __setstate__(self, state: dict) -> None:
        self.shape, self.flags = state["shape"], state["flags"]
        self.owned: list[torch.Tensor | None] = [None] * self.shape[1]  # a worker's own segments
        self.told = [False] * self.shape[1]  # which of them the main process has mapped
        self.lent: int | None = None  # the slot the batch being made is in

    def memory(self, size: int) -> torch.Tensor | None:
        """``size`` bytes of a slot of this worker that no batch in the main process holds (its segment made
        larger where it is too small); None when every slot is lent, or outside a worker."""
        info, self.lent = get_worker_info(), None
        free = [k for k in range(self.shape[1]) if not self.flags[info.id, k]] if info is not None else []
        if not free:
            return None
        fits = [k for k in free if self.owned[k] is not None and len(self.owned[k]) >= size]
        self.lent = fits[0] if fits else free[0]
        if not fits:
            segment = torch.empty(0, dtype=torch.uint8).new(torch.UntypedStorage._new_shared(size + size // HEADROOM))
            populate(segment.numpy())
            self.owned[self.lent], self.told[self.lent] = segment, False
        return self.owned[self.lent][:size]

    def __call__(self, rows: Rows) -> Message | Rows:
        """A worker's collate: the batch just fetched into a slot as a ``Message`` (the slot marked lent), else
        (a new segment, or no worker) the ``Rows`` as they are."""
        slot, self.lent = self.lent, None
        if slot is None:
            return rows
        segment, worker = self.owned[slot], get_worker_info().id
        fields = [(key, tuple(t.shape), t.dtype, t.data_ptr() - segment.data_ptr())
                  for key, t in [*rows.batch.items(), (None, rows.dropped)]]  # the dropout mask last, unnamed
        rest = [{key: value for key, value in item.items() if key not in rows.batch} for item in rows]
        self.flags[worker, slot] = 1  # lent until the main process lets go of this batch
        message = Message(worker, slot, None if self.told[slot] else segment, max(f[3] + _nbytes(f) for f in fields),
                          fields, rest, rows.batch["row"].tolist(), list(rows[0]) if rows else [])
        self.told[slot] = True
        return message



class Receiver:
    """The main process's side of one set of workers: the segments it has mapped (``mapped``), and ``receive``."""

    def __init__(self, flags: torch.Tensor) -> None:
        self.flags = flags  # [workers, slots], shared with the workers: 1 while lent
        self.mapped: dict[tuple[int, int], torch.Tensor] = {}

    def receive(self, message: Message | Rows) -> Rows:
        """The worker's ``Rows``, their tensors views of its segment, lent to the batch."""
        if not isinstance(message, Message):
            return message
        key = (message.worker, message.slot)
        if message.segment is not None:
            self.mapped[key] = message.segment
        lent = self.mapped[key].numpy()[: message.size]  # this batch's own array: gone when the batch is
        weakref.finalize(lent, _release, self.flags.numpy(), *key)
        base = torch.from_numpy(lent)
        views = [base[offset : offset + _nbytes(field)].view(dtype).view(shape)
                 for field in message.fields for _, shape, dtype, offset in [field]]
        batch = {field[0]: view for field, view in zip(message.fields[:-1], views, strict=False)}  # all but the mask
        rows = Rows()
        for i, (rest, row) in enumerate(zip(message.rest, message.rows, strict=True)):
            rows.append({name: row if name == "row" else batch[name][i] if name in batch else rest[name]
                         for name in message.order})
        rows.batch, rows.dropped = batch, views[-1]
        return rows


def _nbytes(field: tuple[str | None, tuple[int, ...], torch.dtype, int]) -> int:
    return math.prod(field[1]) * field[2].itemsize


def _release(flags: np.ndarray, worker: int, slot: int) -> None:
    flags[worker, slot] = 0
