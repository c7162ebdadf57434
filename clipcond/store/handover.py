"""DataLoader workers' batches handed to the main process through shared memory that each worker reuses.

torch hands a worker's batch over in new shared-memory segments: per batch, each is made, its pages zeroed by the
kernel, sent as a file descriptor, received, mapped and unmapped again. On 2 cores that costs more than reading
16 SDXL rows from the page cache (docs/performance.md, "Reading a store in training"). Instead, a worker fetches
the store's rows (and a join's stacked fields) into one of ``SLOTS`` segments it keeps (``Lending.memory``, one
``Lending`` per worker process, whatever the stores); the store's collate (or ``JoinedLoader``'s) wraps the batch
in ``Lent``, which the multiprocessing pickler (a DataLoader's queue) sends as the slot's number and each
tensor's place in it; the main process maps each segment once (``Receiver``) and afterwards only makes views.

A slot is written over only once nothing can still read its last batch. Each batch's hold on its slot (``Lease``)
ends once, one way. Sent: in the main process the batch's tensors are views of one array made for that batch, and
when the last tensor, view or array of it is gone a weak-reference callback marks the slot free in a flag array
the worker shares. Not sent (another collate copies the rows or returns them as they are, a second ``Lent`` of
the same rows, any other pickling): the slot is free once the worker's own views are gone, since torch's pickler
copies a worker's views into a new segment of their own (they are not shared memory to it), so no other process
ever reads a slot but through ``Lent``. A worker whose slots are all lent makes a new segment, as torch does.
"""

from __future__ import annotations

import os
import secrets
import threading
import weakref
from dataclasses import dataclass
from multiprocessing.reduction import ForkingPickler

import numpy as np
import torch
from torch.utils.data import get_worker_info

from clipcond.store.checksums import populate

SLOTS = 8  # segments a worker may keep: its prefetched batches, the one a loop holds, the one it drops
HEADROOM = 4  # a segment made for a larger batch than its slot held gets 1/HEADROOM more (masked batches vary)


class Lending:
    """A DataLoader worker process's reusable batch memory, one for all the stores it reads (``lending()``), made
    the first time it fetches a batch: nothing in the main process, nothing pickled."""

    def __init__(self) -> None:
        self.pid, self.token = os.getpid(), secrets.randbits(63)
        self.flags = torch.zeros(SLOTS, dtype=torch.uint8).share_memory_()  # 1 while a batch holds the slot
        self.segments: list[torch.Tensor | None] = [None] * SLOTS  # uint8, shared memory
        self.told = [False] * SLOTS  # whether the main process has been sent the slot's segment
        self.leases: list[Lease | None] = [None] * SLOTS
        # A dataset may fetch from several threads of one worker; reentrant, because a batch freed by the cyclic
        # garbage collector gives its slot back (Lease.back) at whatever allocation triggers it, lock held or not.
        self.lock = threading.RLock()

    def memory(self, size: int) -> torch.Tensor | None:
        """``size`` bytes of a free slot, as a tensor that is not shared memory to torch (its old contents left in
        place; its segment made larger where it is too small); None when every slot is lent."""
        with self.lock:
            flags = self.flags.numpy()
            free = np.flatnonzero(flags == 0).tolist()
            if not free:
                return None
            fits = [k for k in free if self.segments[k] is not None and len(self.segments[k]) >= size]
            slot = fits[0] if fits else free[0]
            if not fits:
                segment = torch.empty(0, dtype=torch.uint8).new(
                    torch.UntypedStorage._new_shared(size + size // HEADROOM))
                populate(segment.numpy())
                self.segments[slot], self.told[slot] = segment, False
            flags[slot] = 1
            lent = self.segments[slot].numpy()[:size]  # this batch's own array: gone when the worker's batch is
            self.leases[slot] = lease = Lease(self, slot)
        weakref.finalize(lent, lease.back)
        return torch.from_numpy(lent)

    def lease_of(self, tensor: torch.Tensor) -> Lease | None:
        """The lease of the slot ``tensor`` lies in, if it lies in one."""
        p = tensor.data_ptr()
        with self.lock:
            for segment, lease in zip(self.segments, self.leases, strict=True):
                if segment is not None and segment.data_ptr() <= p < segment.data_ptr() + len(segment):
                    return lease
        return None


_lending: Lending | None = None  # this process's, in a DataLoader worker
_lending_lock = threading.Lock()


def lending() -> Lending | None:
    """This DataLoader worker's ``Lending``; None outside a worker."""
    global _lending
    if get_worker_info() is None:
        return None
    with _lending_lock:
        if _lending is None or _lending.pid != os.getpid():  # a forked child starts its own
            _lending = Lending()
        return _lending


def worker_memory(size: int) -> torch.Tensor | None:
    """``batch_tensors``' worker memory: a free slot of this worker's ``Lending``, or None."""
    worker = lending()
    return worker.memory(size) if worker is not None else None


def lease_of(tensor: torch.Tensor) -> Lease | None:
    """The lease of this worker's slot ``tensor`` lies in, if it lies in one."""
    worker = lending()
    return worker.lease_of(tensor) if worker is not None else None


class Lease:
    """One batch's hold on a slot, in the worker: ``held`` until either the worker's views of it are gone
    (``back``: the slot free again) or a ``Lent`` sends it to the main process (``send``: the main process gives it
    back). Once only: a second ``Lent`` over the same slot, or one pickled after the worker let go, is sent as the
    plain dict it is (torch copies its tensors)."""

    def __init__(self, lending: Lending, slot: int) -> None:
        self.lending, self.slot, self.state = lending, slot, "held"

    def __reduce__(self) -> tuple:
        return type(None), ()  # a Rows pickled whole (your collate returning it): its lease stays in the worker

    def back(self) -> None:
        with self.lending.lock:
            if self.state == "held":
                self.state = "returned"
                self.lending.flags.numpy()[self.slot] = 0

    def send(self, batch: dict) -> tuple | None:
        """The batch as the slot's number and each of its tensors' place in the segment (``_rebuild``'s arguments);
        None when the lease is not held or no tensor of the batch lies in the slot."""
        lending, slot = self.lending, self.slot
        with lending.lock:
            segment = lending.segments[slot]
            places: list[At] = []
            skeleton = _skeleton(batch, segment.data_ptr(), segment.data_ptr() + len(segment), places)
            if self.state != "held" or not places:
                return None
            self.state, new, lending.told[slot] = "sent", not lending.told[slot], True
        return _rebuild, (lending.token, lending.pid, slot, segment if new else None, lending.flags if new else None,
                          skeleton)


class Lent(dict):
    """A collate's batch whose tensors lie in a worker's slot (``lease``). The multiprocessing pickler (a
    DataLoader's queue) sends it without them (``_send``); any other pickling, copy or deepcopy sees the plain dict
    it is."""

    def __init__(self, batch: dict, lease: Lease) -> None:
        super().__init__(batch)
        self.lease = lease

    def __reduce__(self) -> tuple:
        return dict, (dict(self),)


def _send(lent: Lent) -> tuple:
    if lent.lease.lending.pid == os.getpid() and (sent := lent.lease.send(dict(lent))) is not None:
        return sent
    return dict, (dict(lent),)


ForkingPickler.register(Lent, _send)


@dataclass(frozen=True)
class At:
    """Where a tensor lies in a slot: dtype, shape, strides (elements) and its first element's byte offset."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int


def _skeleton(obj: object, low: int, high: int, places: list[At]) -> object:
    """``obj`` (dicts, lists and tuples of anything) with each tensor lying in [low, high) replaced by its ``At``
    (each also added to ``places``)."""
    if isinstance(obj, torch.Tensor):
        if obj.numel() and low <= obj.data_ptr() < high:
            places.append(At(obj.dtype, tuple(obj.shape), obj.stride(), obj.data_ptr() - low))
            return places[-1]
        return obj
    if type(obj) is dict:
        return {key: _skeleton(value, low, high, places) for key, value in obj.items()}
    if type(obj) in (list, tuple):
        return type(obj)(_skeleton(value, low, high, places) for value in obj)
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


def _after_fork_in_child() -> None:
    """A process forked while another thread held a lock (a pin-memory thread receiving) gets fresh ones."""
    global _lending_lock
    _lending_lock, Receiver.lock = threading.Lock(), threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)
