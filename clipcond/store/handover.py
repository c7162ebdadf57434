"""DataLoader workers' batches handed to the main process through shared memory that each worker reuses.

torch hands a worker's batch over in new shared-memory segments: per batch, each is made, its pages zeroed by the
kernel, sent as a file descriptor, received, mapped and unmapped again. On 2 cores that costs more than reading
16 SDXL rows from the page cache (docs/performance.md, "Reading a store in training"). Instead, a worker fetches
the store's rows (and a join's stacked fields) into one of ``SLOTS`` segments it keeps (``Lending.memory``, one
``Lending`` per worker process, whatever the stores); the store's collate (or ``JoinedLoader``'s) wraps the batch
in ``Lent``, which the multiprocessing pickler (a DataLoader's queue) sends as the slot's number and each
tensor's place in it; the main process maps each segment once (``Receiver``) and afterwards only makes views.

A slot is written over only once nothing can still read its last batch: neither the worker (its own views of
the batch are gone: ``Lease.back``) nor, if a ``Lent`` sent the batch (once only: ``Lease.send``), the process
that received it. There the batch's tensors lie in one array made for that batch, and when the last
tensor, view or array of it is gone a weak-reference callback marks the slot free in the flags the worker shares
(not in a process forked from the receiver, which inherits the callback). A batch that leaves the worker any other
way (another collate copies the rows or returns them as they are, a second ``Lent`` of the same rows, any other
pickling) is copied by torch's pickler, since a worker's views are not shared memory to it: no other process ever
reads a slot but through ``Lent``. A batch brings its slot's segment until the DataLoader's process acknowledges
mapping it (in the flags), so one that reaches another process by another channel still brings what it needs. A
worker whose slots are all held makes a new segment, as torch does.
"""

from __future__ import annotations

import multiprocessing
import os
import secrets
import threading
import weakref
from dataclasses import dataclass
from multiprocessing.reduction import ForkingPickler

import numpy as np
import torch
from torch.utils.data import get_worker_info

from clipcond.store.batch import tensor_at
from clipcond.store.checksums import populate

SLOTS = 8  # segments a worker may keep: its prefetched batches, the one a loop holds, the one it drops
HEADROOM = 4  # a segment made for a larger batch than its slot held gets 1/HEADROOM more (masked batches vary)


class Lending:
    """A DataLoader worker process's reusable batch memory, one for all the stores it reads (``lending()``), made
    the first time it fetches a batch: nothing in the main process, nothing pickled."""

    def __init__(self) -> None:
        self.pid, self.token = os.getpid(), secrets.randbits(63)
        parent = multiprocessing.parent_process()  # the process that started this worker: the DataLoader's
        self.parent = parent.pid if parent is not None else None
        # Shared with the receiving process: [0, SLOTS) 1 while it holds the slot's batch; [SLOTS, 2 SLOTS) the
        # generation of the slot's segment the DataLoader's process has mapped (its acknowledgement).
        self.flags = torch.zeros(2 * SLOTS, dtype=torch.int64).share_memory_()
        self.segments: list[torch.Tensor | None] = [None] * SLOTS  # uint8, shared memory
        self.generations = [0] * SLOTS  # of each slot's segment, counting from 1
        self.viewed = [False] * SLOTS  # the worker's own views of the slot's last batch are alive
        self.leases: list[Lease | None] = [None] * SLOTS
        # A dataset may fetch from several threads of one worker; reentrant, because a batch freed by the cyclic
        # garbage collector gives its slot back (Lease.back) at whatever allocation triggers it, lock held or not.
        self.lock = threading.RLock()

    def memory(self, size: int) -> np.ndarray | None:
        """``size`` bytes of a free slot (no process holds its last batch: neither the receiver nor this worker),
        as the batch's own array, which is not shared memory to torch (its old contents left in place; its segment
        made larger where it is too small); None when every slot is held."""
        with self.lock:
            held = self.flags.numpy()[:SLOTS]
            free = [k for k in range(SLOTS) if not held[k] and not self.viewed[k]]
            if not free:
                return None
            fits = [k for k in free if self.segments[k] is not None and len(self.segments[k]) >= size]
            slot = fits[0] if fits else free[0]
            if not fits:
                segment = torch.empty(0, dtype=torch.uint8).new(
                    torch.UntypedStorage._new_shared(size + size // HEADROOM))
                populate(segment.numpy())
                self.segments[slot], self.generations[slot] = segment, self.generations[slot] + 1
            self.viewed[slot] = True
            lent = self.segments[slot].numpy()[:size]  # this batch's own array: gone when the worker's batch is
            self.leases[slot] = lease = Lease(self, slot)
        weakref.finalize(lent, lease.back)
        return lent

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


def worker_memory(size: int) -> np.ndarray | None:
    """``batch_tensors``' worker memory: a free slot of this worker's ``Lending``, or None."""
    worker = lending()
    return worker.memory(size) if worker is not None else None


def lease_of(tensor: torch.Tensor) -> Lease | None:
    """The lease of this worker's slot ``tensor`` lies in, if it lies in one."""
    worker = lending()
    return worker.lease_of(tensor) if worker is not None else None


class Lease:
    """One batch's hold on a slot, in the worker. The slot is free again once the worker's own views of the batch
    are gone (``back``) and, if a ``Lent`` sent the batch (``send``, once only: ``state`` "sent"), once the process
    that received it has let go too. A second ``Lent`` over the same slot, or one pickled after the worker let go,
    is sent as the plain dict it is (torch copies its tensors)."""

    def __init__(self, lending: Lending, slot: int) -> None:
        self.lending, self.slot, self.state = lending, slot, "held"

    def __reduce__(self) -> tuple:
        return type(None), ()  # a Rows pickled whole (your collate returning it): its lease stays in the worker

    def back(self) -> None:
        lending = self.lending
        if lending.pid != os.getpid():  # a process forked from this worker collecting what it inherited
            return
        with lending.lock:
            if self.state == "held":
                self.state = "returned"
            if lending.leases[self.slot] is self:
                lending.viewed[self.slot] = False

    def send(self, batch: dict) -> tuple | None:
        """The batch as the slot's number and each of its tensors' place in the segment (``_rebuild``'s arguments),
        with the segment and the flags until the DataLoader's process has acknowledged mapping this segment; None
        when the lease is not held or no tensor of the batch lies in the slot."""
        lending, slot = self.lending, self.slot
        with lending.lock:
            segment, generation = lending.segments[slot], lending.generations[slot]
            places: list[At] = []
            skeleton = _skeleton(batch, segment.data_ptr(), segment.data_ptr() + len(segment), places)
            if self.state != "held" or not places:
                return None
            self.state = "sent"
            flags = lending.flags.numpy()
            flags[slot] = 1  # held by the receiver until it lets go
            new = flags[SLOTS + slot] != generation
        return _rebuild, (lending.token, lending.pid, lending.parent, slot, generation, segment if new else None,
                          lending.flags if new else None, skeleton)


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


def _fill(obj: object, base: np.ndarray) -> object:
    """``_skeleton`` undone over ``base``, the receiving process's array of the slot."""
    if isinstance(obj, At):
        return tensor_at(base, obj.offset, obj.dtype, obj.shape, obj.stride)
    if type(obj) is dict:
        return {key: _fill(value, base) for key, value in obj.items()}
    if type(obj) in (list, tuple):
        return type(obj)(_fill(value, base) for value in obj)
    return obj


class Receiver:
    """The receiving process's side of one worker process: its flags and the segments mapped, by slot. ``known``
    is the one registry of them: unpickling calls a module-level function (``_rebuild``), which finds the worker's
    receiver there; a batch brings its slot's segment and the flags until the DataLoader's process (the worker's
    parent) acknowledges the segment in the flags, so a batch that reaches another process by another queue
    still brings them."""

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

    def view(self, slot: int, generation: int, segment: torch.Tensor | None, parent: int | None) -> np.ndarray:
        """The slot's bytes, an array of their own that gives the slot back when it is gone."""
        with self.lock:
            if segment is not None:
                self.segments[slot] = (generation, segment)
                if parent == os.getpid():
                    self.flags.numpy()[SLOTS + slot] = generation  # mapped: later batches come without it
            known, segment = self.segments.get(slot, (None, None))
            if known != generation:
                raise RuntimeError(f"a batch from DataLoader worker process {self.pid} names generation "
                                   f"{generation} of its slot {slot}, which this process was never sent")
            lent = segment.numpy()
        weakref.finalize(lent, _release, self.flags, slot, os.getpid())
        return lent


def _rebuild(token: int, pid: int, parent: int | None, slot: int, generation: int, segment: torch.Tensor | None,
             flags: torch.Tensor | None, skeleton: object) -> object:
    return _fill(skeleton, Receiver.of(token, pid, flags).view(slot, generation, segment, parent))


def _release(flags: torch.Tensor, slot: int, pid: int) -> None:
    if os.getpid() == pid:  # not in a process forked from this one, collecting what it inherited
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
