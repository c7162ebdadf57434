"""Row checksums: what every shard stores for each row, and the copy that computes them on the way.

A row's checksum is ``sequence_sum + CHECK_MIX * pooled_sum`` mod 2^64, each sum the row's bytes read as
little-endian 64-bit words (``row_checksums`` says what it catches and what it misses). The reader checks every
row it serves: single rows in one compiled pass over the row (``row_checksum``), batches while copying them
(``copy_rows``); both in clipcond/store/_rows.c where it was built, else numpy, the same numbers.
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Sequence

import numpy as np
import torch

try:  # the compiled copy-and-checksum (clipcond/store/_rows.c; optional, little-endian only)
    from clipcond.store import _rows
except ImportError:
    _rows = None
if sys.byteorder != "little":
    _rows = None
_told_numpy = False  # said once that the checks fall back to numpy

logger = logging.getLogger(__name__)

BYTES_PER_THREAD = 1 << 20  # a copy thread per MiB of rows, at most torch's thread count (one costs ~20 µs to start)
CHECK_MIX = np.uint64(0x9E3779B97F4A7C15)  # odd: a sequence sum moved into the pooled one gives another checksum


def _word_sums(rows: np.ndarray) -> np.ndarray:
    """[n] uint64: each row of ``rows`` [n, bytes] uint8 as little-endian 64-bit words, summed mod 2^64 (a short
    tail zero-padded)."""
    if rows.shape[1] % 8:
        rows = np.concatenate([rows, np.zeros((len(rows), -rows.shape[1] % 8), dtype=np.uint8)], axis=1)
    return rows.view("<u8").sum(axis=1, dtype=np.uint64)  # unsigned: wraps silently, as a checksum should


def row_bytes(rows: torch.Tensor) -> np.ndarray:
    """``rows`` [n, ...] as [n, bytes] uint8 (a view when contiguous)."""
    size = math.prod(rows.shape[1:]) * rows.element_size()
    return rows.contiguous().view(torch.uint8).numpy().reshape(len(rows), size)


def row_checksums(sequence: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """[n] int64 checksums of rows ``sequence`` [n, L, D] and ``pooled`` [n, P], as shards store them.

    A row's sequence bytes and its pooled bytes, each read as little-endian 64-bit words (a short tail
    zero-padded) and summed mod 2^64: ``sequence_sum + CHECK_MIX * pooled_sum`` (odd, so invertible). It
    costs ~12-16 µs for an SDXL float16 row in cache in numpy (CRC32: 68 µs), and next to nothing where the
    read copies the row anyway (``copy_rows``), so a read checks every row it serves.

    What it catches, always: any change confined to one 64-bit word of the row (any number of flipped bits
    in it), including the stored check itself; any burst of damage spanning at most 64 consecutive bits
    (it touches at most two adjacent words, and their changes cannot cancel); any change to the sequence
    alone or to the pooled vector alone that alters the sum of its words. What it misses: changes whose
    word sums cancel: words swapped or reordered within a row (the sum is commutative), a value added to
    one word and subtracted from another (e.g. the same bit cleared in one word and set in another), a row
    replaced by another row together with that row's check (a misplaced block whose checks moved with it;
    the header and index checks catch the common cases). For damage that changes many words with no
    such structure, the chance of a miss is about 2^-64. It is a check against bit rot, torn and
    misdirected writes, not against a deliberate forgery (use ``clipcond inspect``'s sha256 for that).
    """
    return torch.from_numpy(mix_checksums(_word_sums(row_bytes(sequence)), _word_sums(row_bytes(pooled))))


def part_checksums(parts: Sequence[torch.Tensor], pooled: torch.Tensor, lengths: np.ndarray | None = None
                   ) -> torch.Tensor:
    """[n] int64 checksums of rows held in parts (clipcond/store/layout.py): ``parts`` [n, length, width] each,
    or a masked layout's one part [n, L_b, D] of which row i keeps its first ``lengths[i]`` rows; ``pooled`` [n, P].

    A row's sequence sum is the sum of its parts' word sums, each part's bytes taken as one buffer, plus its
    kept length (so that a length moved from one row to the next changes both checks); then mixed with the
    pooled sum as in ``row_checksums``, which is this for one whole part."""
    if lengths is None:
        sums = sum((_word_sums(row_bytes(part)) for part in parts), np.zeros(len(pooled), dtype=np.uint64))
    else:
        part = parts[0]
        sums = np.array([_word_sums(row_bytes(part[i : i + 1, :k]))[0] for i, k in enumerate(lengths.tolist())],
                        dtype=np.uint64).reshape(-1) + lengths.astype(np.uint64)
    return torch.from_numpy(mix_checksums(sums, _word_sums(row_bytes(pooled))))


def buffers_checksum(parts: Sequence[np.ndarray], pooled: np.ndarray, length: int = 0) -> int:
    """``part_checksums`` of one row from its parts' bytes (1-D uint8 each, read in place) and its kept length."""
    if _rows is not None:
        def word_sum(data: np.ndarray) -> int:
            return _rows.row_checksum(data, EMPTY, 0) & MASK64
    else:
        def word_sum(data: np.ndarray) -> int:
            return int(_word_sums(data[None])[0])
    total = sum(word_sum(part) for part in parts) + length + int(CHECK_MIX) * word_sum(pooled)
    return _signed(total & MASK64)


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


EMPTY = np.zeros(0, dtype=np.uint8)
MASK64 = (1 << 64) - 1


def copy_rows(sources: Sequence[np.ndarray], destinations: Sequence[np.ndarray], *,
              checksums: bool = True) -> np.ndarray | None:
    """Copy each uint8 row of ``sources`` into its destination (same size) and return its word sum, [n] uint64
    (``row_checksums`` mixes a row's sequence and pooled sums); ``checksums=False``: only copy, None.

    In one pass with the compiled ``clipcond._rows`` (built at install where a C compiler is): each word is
    added on its way to the destination, on one thread per ``BYTES_PER_THREAD`` of rows up to
    ``torch.get_num_threads()``. The unchecked copy is the same loop without the additions (not torch's
    ``copy_``, whose intra-op threads collapse on an oversubscribed host). Without the extension, numpy sums
    each row right after copying it, while it is in cache.
    """
    sums = np.empty(len(sources), dtype=np.uint64) if checksums else None
    if _rows is not None:
        _rows.copy_rows(sources, destinations, sums, torch.get_num_threads(), BYTES_PER_THREAD)
        return sums
    _say_numpy()
    for i, (source, destination) in enumerate(zip(sources, destinations, strict=True)):
        np.copyto(destination, source)
        if sums is not None:
            sums[i] = _word_sums(destination[None])[0]
    return sums


def populate(buffer: np.ndarray) -> bool:
    """Give a fresh batch buffer (writable, contiguous) its pages now, in one system call, where the copy would
    take one page fault per 4 kB (Linux 5.14+, with the compiled ``clipcond._rows``); False where not done: the
    copy then faults the pages in as it writes them. A DataLoader worker's new shared-memory segment (each of
    the few it reuses, or a batch's own when they are all lent): making one of 7.3 MB (16 SDXL rows and latents)
    and copying the batch into it took 2.83 ms of CPU with it, 3.06 ms without (medians of 12 alternating runs
    of 50); the kernel's zeroing of the pages stays."""
    return _rows is not None and _rows.populate(buffer)


def row_checksum(sequence: np.ndarray, pooled: np.ndarray) -> int:
    """One row's stored checksum (an int64 as a Python int) from its ``sequence`` and ``pooled`` bytes (1-D
    uint8, read in place): ``store[i]``'s check, without the numpy temporaries of ``row_checksums``."""
    if _rows is not None:
        return _rows.row_checksum(sequence, pooled, int(CHECK_MIX))
    _say_numpy()
    return int(mix_checksums(_word_sums(sequence[None]), _word_sums(pooled[None]))[0])


def _say_numpy() -> None:
    global _told_numpy
    if not _told_numpy:
        _told_numpy = True
        logger.warning("clipcond._rows is not built (no C compiler when clipcond was installed?): store reads check "
                       "each row with a second pass in numpy, about a fifth slower; reinstall with a C compiler")


def mix_checksums(sequence_sums: np.ndarray, pooled_sums: np.ndarray) -> np.ndarray:
    """[n] int64 row checksums from each row's sequence and pooled word sums ([n] uint64 each)."""
    return (sequence_sums + pooled_sums * CHECK_MIX).view(np.int64)
