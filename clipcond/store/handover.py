"""DataLoader workers' batches handed to the main process through shared memory that each worker reuses.

torch hands a worker's batch over in new shared-memory segments: per batch, each is made, its pages zeroed by the
kernel, sent as a file descriptor, received, mapped and unmapped again. On 2 cores that costs more than reading
16 SDXL rows from the page cache (docs/performance.md, "Reading a store in training"). Instead, a worker fetches
the store's rows (and a join's stacked fields) into one of ``SLOTS`` segments it keeps (``Lending.memory``); the
store's collate (or ``JoinedLoader``'s) wraps the batch in ``Lent``, which pickles as the slot's number and each
tensor's place in it; the main process maps each segment once (``Receiver``) and afterwards only makes views.

A slot is written over only once nothing can still read its last batch. In the main process the batch's tensors
are views of one array made for that batch; when the last tensor, view or array of it is gone, a weak-reference
callback marks the slot free in a flag array the worker shares. A batch that leaves the worker in any other way
(another collate copies the rows, or returns them as they are) is free once the worker's own views are gone:
torch's pickler copies a worker's views into a new segment of their own (they are not shared memory to it), so
no other process ever reads a slot but through ``Lent``. A worker whose slots are all lent makes a new segment,
as torch does.
"""

from __future__ import annotations

import copy
import os
import secrets
import threading
import weakref
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import get_worker_info

from clipcond.store.checksums import populate

SLOTS = 8  # segments a worker may keep: its prefetched batches, the one a loop holds, the one it drops
HEADROOM = 4  # a segment made for a larger batch than its slot held gets 1/HEADROOM more (masked batches vary)


class Lending:
    """A DataLoader worker's reusable batch memory, made in the worker the first time it fetches a batch (nothing
    in the main process, nothing pickled: a spawned worker starts with none)."""

    def __init__(self) -> None:
        self.pid: int | None = None

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.pid = None

    def _in_worker(self) -> bool:
        if get_worker_info() is None:
            return False
        if self.pid != os.getpid():  # this worker's first batch
            self.pid, self.token = os.getpid(), secrets.randbits(63)
            self.flags = torch.zeros(SLOTS, dtype=torch.uint8).share_memory_()  # 1 while a batch holds the slot
            self.segments: list[torch.Tensor | None] = [None] * SLOTS  # uint8, shared memory
            self.told = [False] * SLOTS  # whether the main process has been sent the slot's segment
            self.leases: list[Lease | None] = [None] * SLOTS
        return True

    def memory(self, size: int) -> torch.Tensor | None:
        """``size`` bytes of a free slot of this worker, as a tensor that is not shared memory to torch (its old
        contents left in place; its segment made larger where it is too small); None outside a worker or when
        every slot is lent."""
        if not self._in_worker():
            return None
        flags = self.flags.numpy()
        free = np.flatnonzero(flags == 0).tolist()
        if not free:
            return None
        fits = [k for k in free if self.segments[k] is not None and len(self.segments[k]) >= size]
        slot = fits[0] if fits else free[0]
        if not fits:
            segment = torch.empty(0, dtype=torch.uint8).new(torch.UntypedStorage._new_shared(size + size // HEADROOM))
            populate(segment.numpy())
            self.segments[slot], self.told[slot] = segment, False
        flags[slot] = 1
        lent = self.segments[slot].numpy()[:size]  # this batch's own array: gone when the worker's batch is
        self.leases[slot] = lease = Lease(self, slot)
        weakref.finalize(lent, lease.back)
        return torch.from_numpy(lent)

    def lease_of(self, tensor: torch.Tensor) -> Lease | None:
        """The lease of the slot ``tensor`` lies in, if it lies in one of this worker's."""
        if self.pid != os.getpid():
            return None
        p = tensor.data_ptr()
        for segment, lease in zip(self.segments, self.leases, strict=True):
            if segment is not None and segment.data_ptr() <= p < segment.data_ptr() + len(segment):
                return lease
        return None


class Lease:
    """One batch's hold on a slot, in the worker: given back when the worker's views of it are gone, unless the
    batch was sent through ``Lent`` (then the main process gives it back)."""

    def __init__(self, lending: Lending, slot: int) -> None:
        self.lending, self.slot, self.sent = lending, slot, False

    def back(self) -> None:
        if not self.sent:
            self.lending.flags.numpy()[self.slot] = 0

    def send(self, batch: object) -> tuple:
        """``Lent.__reduce__``: the batch as the slot's number and each of its tensors' place in the segment."""
        lending, slot = self.lending, self.slot
        segment = lending.segments[slot]
        skeleton = _skeleton(batch, segment.data_ptr(), segment.data_ptr() + len(segment))
        new, lending.told[slot], self.sent = not lending.told[slot], True, True
        return _rebuild, (lending.token, lending.pid, slot, segment if new else None, lending.flags if new else None,
                          skeleton)


class Lent(dict):
    """A collate's batch whose tensors lie in a worker's slot (``lease``): pickled to the main process without
    them. Anywhere else (no lease, or another process) it pickles as the plain dict it is."""

    def __init__(self, batch: dict, lease: Lease) -> None:
        super().__init__(batch)
        self.lease = lease

    def __reduce__(self) -> tuple:
        if self.lease.lending.pid != os.getpid():
            return dict, (dict(self),)
        return self.lease.send(dict(self))

    def __copy__(self) -> dict:  # copy and deepcopy would go through __reduce__: a hand-over nobody receives
        return dict(self)

    def __deepcopy__(self, memo: dict) -> dict:
        return copy.deepcopy(dict(self), memo)


@dataclass(frozen=True)
class At:
    """Where a tensor lies in a slot: dtype, shape, strides (elements) and its first element's byte offset."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int


def _skeleton(obj: object, low: int, high: int) -> object:
    """``obj`` (dicts, lists and tuples of anything) with each tensor lying in [low, high) replaced by its ``At``."""
    if isinstance(obj, torch.Tensor):
        if obj.numel() and low <= obj.data_ptr() < high:
            return At(obj.dtype, tuple(obj.shape), obj.stride(), obj.data_ptr() - low)
        return obj
    if type(obj) is dict:
        return {key: _skeleton(value, low, high) for key, value in obj.items()}
    if type(obj) in (list, tuple):
        return type(obj)(_skeleton(value, low, high) for value in obj)
    return obj


def _fill(obj: object, base: torch.Tensor) -> object:
    """``_skeleton`` undone over ``base``, the main process's view of the slot."""
    if isinstance(obj, At):
        size = obj.dtype.itemsize
        return base[: len(base) - len(base) % size].view(obj.dtype).as_strided(obj.shape, obj.stride,
                                                                                 obj.offset // size)
    if type(obj) is dict:
        return {key: _fill(value, base) for key, value in obj.items()}
    if type(obj) in (list, tuple):
        return type(obj)(_fill(value, base) for value in obj)
    return obj


class Receiver:
    """The main process's side of one worker process: its flag array and the segments mapped, by slot. ``known``
    is the one registry of them: unpickling calls a module-level function (``_rebuild``), which finds the worker's
    receiver there; a worker's first batch in a slot brings the segment and the flags, so any process that
    receives the batches (the one running the DataLoader) learns them."""

    known: dict[int, Receiver] = {}  # by worker token, in the process that receives
    lock = threading.Lock()  # receiving runs in the loop's thread or the DataLoader's pin-memory thread

    def __init__(self, pid: int, flags: torch.Tensor) -> None:
        self.pid, self.flags, self.segments = pid, flags, {}

    @classmethod
    def of(cls, token: int, pid: int, flags: torch.Tensor | None) -> Receiver:
        with cls.lock:
            receiver = cls.known.get(token)
            if receiver is None:
                if flags is None:
                    raise RuntimeError(f"a batch from DataLoader worker process {pid} names shared memory this "
                                       f"process was never sent (a store's batch unpickled outside the process "
                                       f"that runs the DataLoader?)")
                for key in [key for key, r in cls.known.items() if not _alive(r.pid)]:
                    del cls.known[key]  # workers that have ended: their segments unmapped once their batches are
                receiver = cls.known[token] = Receiver(pid, flags)
            return receiver

    def view(self, slot: int, segment: torch.Tensor | None) -> torch.Tensor:
        """The slot as uint8, over an array of its own that gives the slot back when it is gone."""
        with self.lock:
            if segment is not None:
                self.segments[slot] = segment
            lent = self.segments[slot].numpy()
        weakref.finalize(lent, _release, self.flags, slot)
        return torch.from_numpy(lent)


def _rebuild(token: int, pid: int, slot: int, segment: torch.Tensor | None, flags: torch.Tensor | None,
             skeleton: object) -> object:
    return _fill(skeleton, Receiver.of(token, pid, flags).view(slot, segment))


def _release(flags: torch.Tensor, slot: int) -> None:
    flags.numpy()[slot] = 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True
