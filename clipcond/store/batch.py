"""Batch memory for the store's fetches: buffers the main process reuses once a batch is gone, a worker's batch as
one segment of shared memory (clipcond/store/handover.py: reused), and the columns of your data that a join
stacks into the same memory (clipcond/store/reader.py, clipcond/store/join.py).
"""

from __future__ import annotations

import math
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import get_worker_info

from clipcond.store.checksums import populate, row_bytes


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

    def get(self, size: int) -> np.ndarray:
        """``size`` bytes that nothing else uses (the old contents left in place): the batch's own array."""
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
            return lent


def batch_tensors(buffers: BatchBuffers, *specs: tuple[tuple[int, ...], torch.dtype],
                  memory: Callable[[int], np.ndarray | None] | None = None) -> tuple[list[torch.Tensor], bool]:
    """Empty batch tensors of these (shape, dtype)s, laid out one after another in one buffer, and whether that
    buffer is zeros. In a DataLoader worker the buffer is ``memory(size)`` where that gives one (a slot of the
    worker's reused shared memory, old contents left in place); else each tensor gets a new shared-memory segment,
    its pages given at once (``populate``), as default_collate makes its batches there. In the main process, from
    ``buffers``."""
    offsets, size = [], 0
    for shape, dtype in specs:
        size += -size % 8  # every tensor 8-byte aligned
        offsets.append(size)
        size += math.prod(shape) * dtype.itemsize
    if get_worker_info() is None:
        buffer = buffers.get(size)
    elif not size or (buffer := memory(size) if memory is not None else None) is None:
        return [_shared(shape, dtype) for shape, dtype in specs], True
    return [tensor_at(buffer, a, dtype, shape) for a, (shape, dtype) in zip(offsets, specs, strict=True)], False


def tensor_at(memory: np.ndarray, offset: int, dtype: torch.dtype, shape: tuple[int, ...],
              stride: tuple[int, ...] | None = None) -> torch.Tensor:
    """The tensor of ``dtype`` and ``shape`` (``stride`` in elements, contiguous if None) whose first element lies
    ``offset`` bytes into ``memory``, over a storage of its own that keeps ``memory`` alive. One storage per
    tensor, not views of one: ``torch.save`` refuses a storage seen as several dtypes."""
    if not math.prod(shape):
        return torch.empty(shape, dtype=dtype)
    if stride is None:
        return torch.frombuffer(memory, dtype=dtype, count=math.prod(shape), offset=offset).view(shape)
    extent = 1 + sum((n - 1) * s for n, s in zip(shape, stride, strict=True))
    return torch.frombuffer(memory, dtype=dtype, count=extent, offset=offset).as_strided(shape, stride)


def _shared(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A tensor in a new shared-memory segment of its own, its pages given at once."""
    size = math.prod(shape) * dtype.itemsize
    if not size:  # a segment cannot be empty
        return torch.empty(shape, dtype=dtype)
    segment = torch.empty(0, dtype=torch.uint8).new(torch.UntypedStorage._new_shared(size))
    populate(segment.numpy())
    return segment.view(dtype).view(shape)


class Rows(list):
    """``EmbeddingStore.__getitems__``'s items, with ``batch``: the same rows already stacked, ``dropped``: a
    [B] bool in the same memory, for the collate's caption dropout mask, and ``lease``: in a DataLoader worker, the
    reused shared memory they lie in (``Lent`` hands a batch over through it), else None."""

    batch: dict[str, torch.Tensor]
    dropped: torch.Tensor
    lease: object = None


SCALARS = {bool: (torch.bool, np.bool_), int: (torch.int64, np.int64), float: (torch.float64, np.float64)}


@dataclass(frozen=True)
class Column:
    """One field of a joined dataset's items, to be stacked by the store's copy into the batch's memory exactly as
    ``default_collate`` would stack it: ``shape`` of one item, ``dtype``, and the bytes to copy (``sources``: one
    contiguous buffer per item, or with ``whole`` one for the whole column)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    sources: list[np.ndarray]
    whole: bool = False

    def destinations(self, batch: torch.Tensor) -> list[np.ndarray]:
        """Where ``sources`` go in ``batch`` [B, *shape]: its rows' bytes, or all of them."""
        rows = row_bytes(batch)  # [B, bytes], a view
        return [rows.reshape(-1)] if self.whole else list(rows)

    @staticmethod
    def of(values: list) -> Column | None:
        """The column ``default_collate`` makes of ``values`` (one per item) when it is one tensor: CPU tensors or
        numeric numpy arrays of one shape and dtype, Python bools, ints (int64) or floats (float64); else None
        (strings, tuples, mixed types and shapes: left to the collate, which stacks or refuses them as ever)."""
        kind = type(values[0])
        if not all(type(v) is kind for v in values):
            return None
        if kind in SCALARS:  # default_collate's torch.tensor(values): ordinary memory, a segment of its own
            try:
                return Column((), SCALARS[kind][0], [np.array(values, dtype=SCALARS[kind][1])], whole=True)
            except OverflowError:  # past int64: default_collate's own error says so
                return None
        first = values[0]
        if kind is torch.Tensor:
            if (first.layout != torch.strided or first.device.type != "cpu" or first.is_quantized
                    or any(v.shape != first.shape or v.dtype != first.dtype or v.requires_grad for v in values)):
                return None
            return Column(tuple(first.shape), first.dtype, [_tensor_bytes(v) for v in values])
        if issubclass(kind, np.ndarray) and first.dtype.kind in "biufc" and first.dtype.isnative:
            if any(v.shape != first.shape or v.dtype != first.dtype for v in values):
                return None
            try:
                dtype = torch.from_numpy(np.empty(0, dtype=first.dtype)).dtype
            except TypeError:  # a numpy dtype torch has no tensor of
                return None
            return Column(first.shape, dtype, [np.ascontiguousarray(v) for v in values])
        return None


def _tensor_bytes(tensor: torch.Tensor) -> np.ndarray:
    """A CPU tensor's values as contiguous bytes (a view when it is contiguous)."""
    return tensor.resolve_conj().resolve_neg().contiguous().reshape(-1).view(torch.uint8).numpy()
