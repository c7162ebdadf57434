"""The first pass of ``clipcond precompute``: every row read once, deduplicated in bounded memory.

The pass streams the input (clipcond/precompute/inputs.py) and writes what it learns to a scan folder
instead of holding it: each caption's UTF-8 text, its 16-byte key (BLAKE2b: what a store
addresses an embedding by), its length, and the ids with their 8-byte hashes. Deduplication then
sorts the keys (numpy, ~27 bytes a caption at the peak) and keeps, per input row and caption
variant, 8 bytes: the index of its unique caption (rows are ragged: a row of fewer variants than the
most holds -1 after its own, packed left); per unique caption, its key and where its text is in the
folder. No caption text is held in memory; the encoder reads it back from the folder.

The folder lives in the store folder (``.scan.tmp-*``), which every rank of a job sees: under
torchrun rank 0 scans and the other ranks read the captions they encode from its folder, so the
input is read, and its index held, once per job rather than once per rank. A folder's owner
holds an exclusive ``flock`` on its ``lock`` file; a folder no process holds is a killed run's
and the next run removes it (``clipcond.store.locks.remove_stale_scans``).

Each input file's share of the pass is also kept in the store folder (``ScanCache``,
clipcond/precompute/scan_cache.py): the next run copies it from there instead of reading a file that has not
changed, so an update reads only new and changed files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import mmap
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from clipcond._files import ID_HASH_DTYPE, id_digest
from clipcond.precompute.inputs import TAR_KEY, check_like_before, expand_inputs, read_captions, row_count_hint
from clipcond.store.format import StoreFiles
from clipcond.store.locks import try_lock
from clipcond.store.manifest import Source

if TYPE_CHECKING:
    from clipcond.precompute.scan_cache import ScanCache

logger = logging.getLogger(__name__)

CHUNK = 1 << 20  # rows per step of the chunked numpy passes: bounds their temporaries to a few MiB
# What the pass writes: name -> numpy dtype of its items (texts and ids: raw UTF-8 bytes back to back;
# counts: each row's number of captions, its variants).
FILES = {"texts": np.uint8, "keys": np.uint8, "lengths": np.uint32, "ids": np.uint8, "id_lengths": np.uint32,
         "id_hashes": ID_HASH_DTYPE, "counts": np.uint32}  # id hashes: id_digest's bytes, as id_hashes reads them
RAGGED = -1  # a file's ``variants`` when its rows hold different numbers of captions


def caption_key(text: bytes) -> bytes:
    """What a store addresses an embedding by: 16 bytes of BLAKE2b of the caption's UTF-8 ``text``."""
    return hashlib.blake2b(text, digest_size=16).digest()


# --- the folder -------------------------------------------------------------------------
class ScanFolder:
    """A scan's files; the process that made it holds its lock until ``remove``."""

    def __init__(self, path: Path, fd: int | None = None) -> None:
        self.path, self.fd = path, fd

    @classmethod
    def create(cls, parent: Path | None) -> ScanFolder:
        """Made under another name, locked, then renamed: a folder under ``StoreFiles.SCAN`` is always locked while
        its run lives, so that ``remove_stale_scans`` can tell a killed run's from a live one's by its lock alone."""
        new = Path(tempfile.mkdtemp(prefix=f"{StoreFiles.SCAN_NEW}{os.getpid()}-", dir=parent))
        fd = os.open(new / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try_lock(fd)  # nobody else knows this folder yet
        path = new.with_name(StoreFiles.SCAN + new.name.removeprefix(StoreFiles.SCAN_NEW))
        os.rename(new, path)
        return cls(path, fd)

    def file(self, name: str) -> Path:
        return self.path / name

    def load(self, name: str) -> np.ndarray:
        return np.fromfile(self.file(name), dtype=FILES.get(name, np.int64))

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


# --- the scan ---------------------------------------------------------------------------
@dataclass
class Scan:
    """The input as precompute needs it: the index, the unique captions' keys, their texts in ``folder``."""

    folder: ScanFolder
    rows: np.ndarray  # [N, kmax] int64: input row, variant -> unique caption (first appearance order); -1: none
    keys: np.ndarray  # [U, 16] uint8: each unique caption's key (``caption_key``)
    spans: np.ndarray  # [U, 2] int64: where each unique caption's UTF-8 text is in the folder's ``texts``
    has_ids: bool  # the folder holds the id tensors of the index (``id_tensors``)
    source: Source  # what was read: the files, columns, id column, limit, and the sha256 of every caption and id

    @property
    def sha256(self) -> str:
        """Of each input file's sha256 of its captions (and ids), length-prefixed, in row order."""
        return self.source.sha256

    @property
    def variants(self) -> int:
        return self.rows.shape[1]

    @property
    def unique(self) -> int:
        return len(self.keys)

    def captions(self, which: np.ndarray | None = None) -> CaptionTexts:
        """The unique captions ``which`` (default: all), in that order, read from the folder on demand."""
        spans = self.spans if which is None else self.spans[which]
        return CaptionTexts(self.folder.file("texts"), spans)

    def id_tensors(self) -> dict[str, tuple[torch.dtype, tuple[int, ...], Path]]:
        """The index's id tensors as files: name -> (dtype, shape, file holding its bytes)."""
        n = len(self.rows)
        files = {"id_bytes": (torch.uint8, "ids"), "id_offsets": (torch.int64, "id_offsets"),
                 "id_sorted_hash": (torch.int64, "id_sorted_hash"), "id_sorted_rows": (torch.int64, "id_sorted_rows")}
        shapes = {"id_bytes": self.folder.file("ids").stat().st_size, "id_offsets": n + 1}
        return {name: (dtype, (shapes.get(name, n),), self.folder.file(file)) for name, (dtype, file) in files.items()}

    def close(self) -> None:
        self.folder.remove()

    def __enter__(self) -> Scan:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class CaptionTexts(Sequence[str]):
    """Captions as ``(start, stop)`` spans of a UTF-8 file, decoded when asked for (a memory map per process)."""

    def __init__(self, path: Path, spans: np.ndarray) -> None:
        self.path, self.spans = path, spans  # [M, 2] int64
        self._map: mmap.mmap | bytes | None = None

    def __len__(self) -> int:
        return len(self.spans)

    def _bytes(self) -> mmap.mmap | bytes:
        if self._map is None:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
        return self._map

    def __getitem__(self, i: int | slice) -> str | list[str]:  # type: ignore[override]
        data = self._bytes()
        if isinstance(i, slice):
            return [data[a:b].decode() for a, b in self.spans[i].tolist()]
        a, b = self.spans[i].tolist()
        return data[a:b].decode()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_map": None}


def scan_captions(path: str | Path | Sequence[str | Path], *, column: str | Sequence[str] = "caption",
                  id_column: str | None = None, limit: int | None = None, progress: bool = False,
                  folder: Path | None = None, cache: ScanCache | None = None) -> Scan:
    """One streaming pass, then deduplication (first appearance wins, so it is deterministic).

    The scan's files go to a new folder in ``folder`` (default: the system's temporary folder);
    ``Scan.close()`` (or ``with``) removes it. With a ``cache``, input files scanned before and unchanged
    since are not read again (not with ``limit``).
    """
    files = expand_inputs(path)
    spill = ScanFolder.create(folder)
    try:
        n, sha256, per_file = _read(spill, files, column, id_column, limit, progress,
                                    cache if limit is None else None)
        _release_arrow_memory()
        has_ids = spill.file("id_lengths").stat().st_size > 0
        started = time.perf_counter()
        if has_ids:
            _index_ids(spill, n, per_file, id_column or TAR_KEY)
        inverse, first = _dedup(spill)  # [captions], [U]
        keys, spans = _select(spill, first)
        rows = _ragged(inverse, spill.load("counts"))
        logger.info("scan: %d rows, %d variants at most, %d captions, %d unique; index built in %.1f s", n,
                    rows.shape[1], len(inverse), len(first), time.perf_counter() - started)
        columns = (column,) if isinstance(column, str) else tuple(column)
        source = Source(paths=tuple(map(str, files)), columns=columns, id_column=id_column, limit=limit,
                        sha256=sha256)
        return Scan(spill, rows, keys, spans, has_ids, source)
    except BaseException:
        spill.remove()
        raise


def _ragged(inverse: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """[N, kmax] int64: each row's captions (``inverse``, row-major) packed left, -1 after a row's own."""
    kmax = int(counts.max())
    if (counts == kmax).all():
        return inverse.reshape(len(counts), kmax)  # every row alike: no copy
    rows = np.full((len(counts), kmax), -1, dtype=np.int64)
    rows[np.arange(kmax) < counts[:, None]] = inverse  # a boolean mask fills row-major: row r's first counts[r]
    return rows


def _read(spill: ScanFolder, files: list[Path], column: str | Sequence[str], id_column: str | None,
          limit: int | None, progress: bool, cache: ScanCache | None) -> tuple[int, str, list[tuple[Path, int]]]:
    """The pass: each batch's texts, keys, lengths and ids appended to the folder's files, file by file; a
    file in ``cache`` (unchanged since) is copied from there, a file read is saved there. Returns the rows,
    the input's sha256 and each file's rows."""
    from tqdm.auto import tqdm

    columns = [column] if isinstance(column, str) else list(column)
    digest, n, variants, with_ids, used, per_file = hashlib.sha256(), 0, [], None, set(), []
    total = row_count_hint(files) if progress else None
    total = min(total, limit) if total is not None and limit is not None else total or limit
    with ExitStack() as stack:
        out = {name: stack.enter_context(open(spill.file(name), "wb")) for name in FILES}
        bar = stack.enter_context(tqdm(total=total, desc="scan", unit="row", unit_scale=True,
                                       disable=None if progress else True))
        for file in files:
            entry = cache.entry(file, columns, id_column) if cache is not None and file.is_file() else None
            found = entry.read(out) if entry is not None else None
            if found is not None:
                rows, file_k, file_ids, file_digest = found
                check_like_before(file, ids_before=with_ids, has_ids=file_ids)
                bar.update(rows)
            else:
                marks = {name: f.tell() for name, f in out.items()}
                rows, file_k, file_ids, file_digest = _read_file(out, file, column, id_column, with_ids,
                                                                 None if limit is None else limit - n, bar)
                if entry is not None:
                    entry.write(out, marks, rows, file_k, file_ids, file_digest)
            if entry is not None:
                used.add(entry.path)
            digest.update(file_digest)
            n += rows
            per_file.append((file, rows))
            variants += [file_k] if file_k is not None else []
            with_ids = with_ids if file_ids is None else file_ids
            if limit is not None and n >= limit:
                break
    if not n:
        raise ValueError(f"{', '.join(map(str, files))}: no rows to encode" + (" (--limit 0)" if limit == 0 else ""))
    if cache is not None:
        cache.prune(used)
    if len(set(variants)) > 1:  # files of different variant counts: where one's rows end is part of the input
        digest.update(json.dumps(variants).encode())
    return n, digest.hexdigest(), per_file


def _read_file(out: dict, file: Path, column: str | Sequence[str], id_column: str | None, with_ids: bool | None,
               limit: int | None, bar) -> tuple[int, int | None, bool | None, bytes]:  # noqa: ANN001
    """One input file through the pass: ``(rows, variants, has ids, sha256 of its rows)``; variants: each row's
    number of captions, ``RAGGED`` where they differ, None for no rows."""
    digest, n, file_k, has_ids, counts_digest = hashlib.sha256(), 0, None, None, hashlib.sha256()
    for batch, batch_ids in read_captions(file, column=column, id_column=id_column, with_ids=with_ids):
        if limit is not None:
            batch = batch[: limit - n]
        if not batch:
            break
        has_ids = batch_ids is not None
        counts = np.fromiter(map(len, batch), dtype=np.uint32, count=len(batch))  # [rows]
        low, high = int(counts.min()), int(counts.max())
        file_k = low if low == high and file_k in (None, low) else RAGGED
        out["counts"].write(counts.tobytes())
        counts_digest.update(counts.astype("<u4").tobytes())
        texts = [caption.encode() for captions in batch for caption in captions]  # row-major
        out["texts"].write(b"".join(texts))
        out["keys"].write(b"".join(map(caption_key, texts)))
        out["lengths"].write(_lengths(texts, "caption"))
        ids = [key.encode() for key in batch_ids[: len(batch)]] if batch_ids is not None else None
        if ids is not None:
            out["ids"].write(b"".join(ids))
            out["id_lengths"].write(_lengths(ids, "id"))
            out["id_hashes"].write(b"".join(map(id_digest, ids)))
        digest.update(b"".join(_identity(texts, ids, counts.tolist())))
        n += len(batch)
        bar.update(len(batch))
        if limit is not None and n >= limit:
            break
    digest.update(b"rows of " + counts_digest.digest())  # where each row ends is part of the input (2 x 2 != 4 x 1)
    return n, file_k, has_ids, digest.digest()


def _release_arrow_memory() -> None:
    """pyarrow's allocator keeps what the readers freed (a row group's buffers) for reuse: give it back."""
    import sys

    if "pyarrow" in sys.modules:
        sys.modules["pyarrow"].default_memory_pool().release_unused()


def _lengths(items: list[bytes], what: str) -> bytes:
    lengths = np.fromiter(map(len, items), dtype=np.int64, count=len(items))
    if len(lengths) and lengths.max() >= 2**32:
        raise ValueError(f"a {what} of {lengths.max()} bytes: clipcond reads captions and ids under 4 GiB")
    return lengths.astype(np.uint32).tobytes()


def _identity(texts: list[bytes], ids: list[bytes] | None, counts: list[int]) -> list[bytes]:
    """What the input's sha256 covers, row by row: its k_i captions, then its id, each length-prefixed."""
    parts, a = [], 0
    for r, k in enumerate(counts):
        for text in [*texts[a : a + k], *([ids[r]] if ids is not None else [])]:
            parts += (len(text).to_bytes(8, "little"), text)
        a += k
    return parts


def _dedup(spill: ScanFolder) -> tuple[np.ndarray, np.ndarray]:
    """``(inverse [n], first [U])`` for the folder's keys [n, 16]: the unique key of each item, numbered in
    order of first appearance, and the item where each unique key first appears (ascending).

    Peak memory ~27 bytes an item (the keys, the sort's permutation and its temporaries)."""
    words = spill.load("keys").view(np.uint64).reshape(-1, 2)  # [n, 2]: equal keys, equal words
    n = len(words)
    perm = np.lexsort((words[:, 1], words[:, 0]))  # any total order; stable: equal keys stay in input order
    new = np.empty(n, dtype=bool)  # [n]: sorted position i starts a run of its key
    new[:1] = True
    for a in range(1, n, CHUNK):
        b = min(a + CHUNK, n)
        new[a:b] = (words[perm[a:b]] != words[perm[a - 1 : b - 1]]).any(axis=1)
    del words
    first = perm[np.flatnonzero(new)]  # [U]: each run's first item, its first appearance
    order = np.argsort(first)
    rank = np.argsort(order)  # [U]: each run's number in order of first appearance
    del order
    first.sort()
    inverse = np.empty(n, dtype=np.int64)
    run = -1
    for a in range(0, n, CHUNK):
        b = min(a + CHUNK, n)
        runs = np.cumsum(new[a:b]) + run  # [b - a]: the run of each sorted position
        inverse[perm[a:b]] = rank[runs]
        run = int(runs[-1])
    return inverse, first


def _select(spill: ScanFolder, items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The keys [U, 16] and text spans [U, 2] (start, stop) of ``items`` (ascending), read chunk by chunk."""
    keys, spans = np.empty((len(items), 16), dtype=np.uint8), np.empty((len(items), 2), dtype=np.int64)
    with open(spill.file("keys"), "rb") as key_file, open(spill.file("lengths"), "rb") as length_file:
        offset, done, a = 0, 0, 0  # bytes of text before the chunk, items filled, first item of the chunk
        while len(lengths := np.fromfile(length_file, dtype=np.uint32, count=CHUNK)):
            chunk_keys = np.fromfile(key_file, dtype=np.uint8, count=16 * len(lengths)).reshape(-1, 16)
            stops = np.cumsum(lengths, dtype=np.int64) + offset  # [chunk]
            end = done + int(np.searchsorted(items[done:], a + len(lengths)))
            local = items[done:end] - a
            keys[done:end] = chunk_keys[local]
            spans[done:end, 1] = stops[local]
            spans[done:end, 0] = stops[local] - lengths[local]
            offset, done, a = int(stops[-1]), end, a + len(lengths)
    return keys, spans


def _index_ids(spill: ScanFolder, n: int, per_file: list[tuple[Path, int]], column: str) -> None:
    """The id tensors of the index, written to the folder (little-endian, as safetensors holds them): offsets,
    and the hash-sorted lookup table; an id seen twice is an error naming the file and row of each."""
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(spill.load("id_lengths"), out=offsets[1:])
    offsets.astype("<i8", copy=False).tofile(spill.file("id_offsets"))
    hashes = spill.load("id_hashes").astype(np.int64)  # [N]: the store's id hashes (clipcond._files.id_hashes)
    order = np.argsort(hashes, kind="stable")  # [N]: equal hashes stay in row order
    hashes = hashes[order]
    order.astype("<i8", copy=False).tofile(spill.file("id_sorted_rows"))
    hashes.astype("<i8", copy=False).tofile(spill.file("id_sorted_hash"))
    same = np.flatnonzero(hashes[1:] == hashes[:-1])  # candidates: an id repeated (or a 64-bit collision)
    del hashes
    if len(same):
        ids = np.memmap(spill.file("ids"), dtype=np.uint8, mode="r") if offsets[-1] else np.zeros(0, np.uint8)
        for i in same.tolist():
            a, b = int(order[i]), int(order[i + 1])
            key = ids[offsets[a] : offsets[a + 1]].tobytes()
            if key == ids[offsets[b] : offsets[b + 1]].tobytes():
                raise ValueError(f"id column {column!r} repeats id {key.decode()!r}: {_where(a, per_file)} and "
                                 f"{_where(b, per_file)}; ids must be unique to look rows up by id")


def _where(row: int, per_file: list[tuple[Path, int]]) -> str:
    """Input row ``row`` (counted across the files) as its file and the row within it."""
    for file, rows in per_file:
        if row < rows:
            return f"{file} row {row}"
        row -= rows
    raise IndexError(row)
