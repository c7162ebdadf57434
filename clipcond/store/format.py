"""The embedding store's format: one owner for the shards, the index, and which files are a store's.

A store is what ``clipcond precompute`` writes (clipcond/precompute/job.py) and ``EmbeddingStore``
reads (clipcond/store/reader.py). It replaces kohya sd-scripts' ``--cache_text_encoder_outputs`` (an
``.npz`` per image) and the diffusers SDXL training script's precompute step. Format 3, one folder:

- ``shard-00000.safetensors``, ...: the row layout's parts (``sequence`` ``[n, L, D]`` for CLIP; SD3's
  ``clip`` and ``t5``; a masked recipe's kept rows ``[T, D]`` and ``lengths`` ``[n]``: clipcond/store/layout.py),
  ``pooled`` ``[n, P]`` (the store's dtype) and ``check`` ``[n]`` int64 row checksums of embedding slots
  ``start:stop`` (``ShardFormat``); shard numbers are never reused, so a name always means the same rows;
  format 2 is format 3 with one whole ``sequence`` part and is read as such;
- ``index-<generation>.safetensors``: ``rows`` ``[N, k]`` input row and caption variant -> slot,
  ``keys`` ``[slots, 16]`` each slot's caption key, and with ids the id table (``IndexFormat``);
- ``null.safetensors``: the encoder's null conditioning (``sequence [1, L, D]``, ``pooled [1, P]``, a masked
  recipe's ``mask``);
- ``manifest.json``: what the store is bound to and every file's size and sha256 (``Manifest``,
  clipcond/store/manifest.py);
- ``.clipcond.lock``: locked by the run writing the store (``StoreLock``, clipcond/store/locks.py).

Every file is written under a temporary name, fsynced and renamed (clipcond/_files.py), and the
manifest is published last: a file under its final name is whole, and a manifest lists only whole
files.

Reading trusts nothing it has not checked: the manifest is validated field by field, the index and the null
are checked against their sha256 when a store is opened (they are read whole anyway), a shard's header is
parsed by the one strict safetensors header reader (``clipcond._files.read_safetensors_header``) and then held
to the shard rules below and to the manifest, and every row read is checked against its row checksum. A
damaged file is a ``ValueError`` naming it (and the tensor or row), never another row's bytes.

Format 1 (written by unreleased clipcond only: ``index.safetensors`` with ``rows [N]``, shards without checksums)
is not read: opening one says to run ``clipcond precompute`` again into a new folder. Nothing in a damaged file
of a later format can make a reader take it for format 1 and skip the row checks.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import math
import mmap
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from clipcond._files import (
    TMP_MARK,
    SafetensorsHeader,
    TensorInfo,
    atomic_write,
    publish,
    raw_bytes,
    read_safetensors_header,
    safetensors_header,
    temporary,
    write_streamed,
)
from clipcond._files import read_tensors as read_safetensors
from clipcond.store.checksums import part_checksums
from clipcond.store.layout import RowLayout
from clipcond.store.manifest import MANIFEST, NULL, REPAIR_HINT, FileEntry, Manifest, ShardEntry

logger = logging.getLogger(__name__)

# --- the shards -------------------------------------------------------------------------
class ShardFormat:
    """``shard-XXXXX.safetensors``: the row layout's parts (``RowLayout``: ``sequence`` [n, L, D] for CLIP; SD3's
    ``t5`` [n, 256, 4096] and ``clip`` [n, 77, 2048]; a masked recipe's kept rows ``sequence`` [T, D]), ``pooled``
    [n, P] (the store's dtype), a masked layout's ``lengths`` [n] int64 (rows kept, T in all) and ``check`` [n]
    int64 (``part_checksums``), in this order, the streamed (largest) part first; one metadata key, ``clipcond``,
    a JSON of the run's facts."""

    TENSORS = ("sequence", "pooled", "check")  # a CLIP store's shard (one whole part)

    @staticmethod
    def name(k: int) -> str:
        """Shard numbers are never reused in a store (gc writes new ones): a name always means the same rows."""
        return f"shard-{k:05d}.safetensors"

    @staticmethod
    def sidecar(name: str) -> str:
        """A new shard's manifest entry, written beside it (before it is renamed into place) until publication."""
        return name.replace(".safetensors", ".json")

    @staticmethod
    def write_sidecar(root: Path, entry: ShardEntry) -> None:
        atomic_write(root / ShardFormat.sidecar(entry.file), json.dumps(asdict(entry)).encode())

    @staticmethod
    def read_sidecar(path: Path) -> ShardEntry | None:
        """A sidecar's entry, or None where it is missing or unreadable (re-encoding its shard is always safe)."""
        try:
            return ShardEntry.from_json(json.loads(path.read_text()))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    @staticmethod
    def write(root: Path, k: int, layout: RowLayout, parts: Sequence[torch.Tensor], pooled: torch.Tensor,
              lengths: np.ndarray | None, meta: dict) -> FileEntry:
        """A whole shard from its rows (``parts`` as ``RowLayout.split`` gives them, ``pooled`` [n, P], a masked
        layout's ``lengths`` [n]), published at once."""
        writer = ShardWriter(root, k, len(pooled), pooled.dtype, layout, pooled.shape[1], meta, lengths)
        try:
            writer.add(parts, pooled)
            entry = writer.close()
        except BaseException:
            writer.abort()
            raise
        writer.publish()
        return entry

    @staticmethod
    def _shapes(n: int, dtype: torch.dtype, layout: RowLayout, pooled_dim: int, kept: int | None) -> dict:
        """Every tensor's (dtype, shape) in file order; ``kept``: a masked layout's rows in all (T)."""
        order = [layout.streamed] + [i for i in range(len(layout.parts)) if i != layout.streamed]
        shapes = {}
        for i in order:
            part = layout.parts[i]
            shapes[part.name] = (dtype, (kept, part.width) if part.trimmed else (n, part.length, part.width))
        shapes["pooled"] = (dtype, (n, pooled_dim))
        if layout.masked:
            shapes["lengths"] = (torch.int64, (n,))
        shapes["check"] = (torch.int64, (n,))
        return shapes

    @staticmethod
    def _about(meta: dict) -> dict[str, str]:
        return {"clipcond": json.dumps(meta, sort_keys=True)}  # one key: equal stores must be equal bytes

    @staticmethod
    def layout(f: BinaryIO, path: Path, entry: ShardEntry, manifest: Manifest) -> tuple[dict[str, TensorInfo], int]:
        """The checked layout of the shard open as ``f`` (``entry`` of ``manifest``): its tensors and the data's
        offset in the file. Beyond the safetensors rules (``read_safetensors_header``), a shard holds exactly the
        manifest's row layout's tensors (``_shapes``) of the store's dtype, n the entry's ``stop - start`` (a
        masked layout's T between n and n * L; its lengths are checked when mapped), and its metadata names the
        same slots: a header that disagrees is damage (``ValueError`` naming the file and tensor), never a reason
        to read less."""
        header = read_header(f, path)
        tensors = header.tensors
        n, dtype, layout = entry.stop - entry.start, getattr(torch, manifest.dtype), manifest.layout
        kept = None
        if layout.masked and (info := tensors.get(layout.parts[0].name)) is not None and len(info.shape) == 2:
            kept = info.shape[0] if n <= info.shape[0] <= n * layout.length else -1
        expected = ShardFormat._shapes(n, dtype, layout, manifest.pooled_dim, kept)
        if set(tensors) != set(expected):
            raise ValueError(f"{path}: a shard of this store holds tensors {list(expected)}, this one "
                             f"{sorted(tensors)!r:.200} (damaged header); {REPAIR_HINT}")
        for name, (want_dtype, want_shape) in expected.items():
            got = tensors[name]
            if got.dtype != want_dtype or got.shape != tuple(want_shape):
                want = [("T" if d == -1 else d) for d in want_shape]
                raise ValueError(f"{path}: tensor {name!r} is {got.dtype} {list(got.shape)}, the manifest's shard "
                                 f"{entry.file} (slots {entry.start}:{entry.stop}) needs {want_dtype} {want}"
                                 f"{' with n <= T <= n * L' if -1 in want_shape else ''} (damaged header); "
                                 f"{REPAIR_HINT}")
        try:
            meta = json.loads(header.metadata.get("clipcond", "null"))
            slots = (meta.get("start"), meta.get("stop")) if isinstance(meta, dict) else None
        except (ValueError, RecursionError):
            slots = None
        if slots != (entry.start, entry.stop):
            raise ValueError(f"{path}: its metadata names slots {slots!r:.80}, the manifest {entry.start}:"
                             f"{entry.stop} (damaged header, or a shard from another store); {REPAIR_HINT}")
        return tensors, header.data_start


class ShardWriter:
    """The one writer of shards: a shard streamed to disk as its rows arrive, never held whole in memory.

    Every shape is known up front (a masked layout's kept rows from ``lengths``, which the tokenizer gives before
    the encoder runs), so the header goes first; the largest part's rows are written and hashed batch by batch,
    the other parts (SD3's CLIP rows: 13 % of a row), the ``pooled`` rows, the lengths and the checksums are kept
    and go last. ``close`` fsyncs the file under its temporary name and returns its entry; ``publish`` renames
    it into place.
    """

    def __init__(self, root: Path, k: int, n: int, dtype: torch.dtype, layout: RowLayout, pooled_dim: int,
                 meta: dict, lengths: np.ndarray | None = None) -> None:
        if layout.masked != (lengths is not None) or (lengths is not None and len(lengths) != n):
            raise ValueError(f"{ShardFormat.name(k)}: a masked layout needs the {n} rows' lengths, another none")
        self.path, self.n, self.filled, self.layout, self.dtype = root / ShardFormat.name(k), n, 0, layout, dtype
        self.lengths = None if lengths is None else np.asarray(lengths, dtype=np.int64)  # [n] rows each keeps
        self.streamed = layout.streamed
        self.held = {i: torch.empty((n, p.length, p.width), dtype=dtype)  # [n, length, width]: the other parts
                     for i, p in enumerate(layout.parts) if i != self.streamed}
        self.pooled = torch.empty((n, pooled_dim), dtype=dtype)  # [n, P]
        self.check = torch.empty(n, dtype=torch.int64)  # [n] row checksums, verified on every read
        kept = None if lengths is None else int(self.lengths.sum())
        shapes = ShardFormat._shapes(n, dtype, layout, pooled_dim, kept)
        header = safetensors_header(shapes, ShardFormat._about(meta))
        self.expected_size = len(header) + sum(d.itemsize * math.prod(shape) for d, shape in shapes.values())
        self.tmp, self.digest, self.size = temporary(self.path), hashlib.sha256(), 0
        self.file = open(self.tmp, "wb")  # noqa: SIM115 (closed in close() or abort())
        self._write(memoryview(header))

    def _write(self, data: memoryview) -> None:
        self.file.write(data)
        self.digest.update(data)
        self.size += data.nbytes

    def add(self, parts: Sequence[torch.Tensor], pooled: torch.Tensor) -> None:
        """The next rows, on the CPU, in the shard's dtype: ``parts`` as ``RowLayout.split`` gives them (a masked
        layout's [b, L_b, D], row i's first ``lengths[i]`` rows kept) and ``pooled`` [b, P]."""
        b = len(parts[0]) if parts else len(pooled)
        rows = slice(self.filled, self.filled + b)
        lengths = None if self.lengths is None else self.lengths[rows]
        for part, tensor in zip(self.layout.parts, parts, strict=True):
            fits = (tensor.dtype == self.dtype and len(tensor) == b and tensor.shape[2] == part.width
                    and (tensor.shape[1] == part.length if lengths is None
                         else len(lengths) == b and tensor.shape[1] >= lengths.max(initial=0)))
            if not fits or self.filled + b > self.n:
                raise ValueError(f"{self.path.name}: {b} rows of {part.name} {tensor.dtype} {list(tensor.shape)} "
                                 f"after {self.filled} of {self.n} rows of {self.dtype} [{part.length}, {part.width}]")
        if pooled.dtype != self.dtype or tuple(pooled.shape) != (b, self.pooled.shape[1]):
            raise ValueError(f"{self.path.name}: pooled rows of {pooled.dtype} {list(pooled.shape)} beside "
                             f"{b} sequence rows; its pooled is {self.dtype} [n, {self.pooled.shape[1]}]")
        self.pooled[rows].copy_(pooled)
        self.check[rows] = part_checksums(parts, self.pooled[rows], lengths)
        for i, tensor in self.held.items():
            tensor[rows].copy_(parts[i])
        data = parts[self.streamed]
        if lengths is not None:  # the kept rows only, row after row: [sum(lengths), D]
            data = data[torch.arange(data.shape[1]) < torch.from_numpy(lengths)[:, None]]
        self._write(raw_bytes(data))
        self.filled += b

    def close(self) -> FileEntry:
        """Every row added: write the rest, fsync; the entry of the file (still under its temporary name)."""
        if self.filled != self.n:
            raise ValueError(f"{self.path.name}: {self.filled} of its {self.n} rows were written")
        for i in sorted(self.held):
            self._write(raw_bytes(self.held[i]))
        self._write(raw_bytes(self.pooled))
        if self.lengths is not None:
            self._write(raw_bytes(torch.from_numpy(self.lengths)))
        self._write(raw_bytes(self.check))
        if self.size != self.expected_size:
            raise RuntimeError(f"{self.path.name}: wrote {self.size} bytes, its header says {self.expected_size}")
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        return FileEntry(file=self.path.name, bytes=self.size, sha256=self.digest.hexdigest())

    def publish(self) -> None:
        publish(self.tmp, self.path)

    def abort(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)  # gone already if it was published


def read_rows(path: Path, layout: RowLayout, local: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor,
                                                                             np.ndarray | None, torch.Tensor]:
    """Rows ``local`` [m] of a shard file, read whole (gc): their parts (a masked layout's as [m, L_m, D] with
    zeros after each row's kept rows), ``pooled`` [m, P], lengths [m] (masked) and stored checks [m]."""
    tensors = read_tensors(path)
    pooled, check = tensors["pooled"][local], tensors["check"][local]
    if not layout.masked:
        return [tensors[p.name][local] for p in layout.parts], pooled, None, check
    data, all_lengths = tensors[layout.parts[0].name], tensors["lengths"].numpy()  # [T, D], [n]
    if (all_lengths < 1).any() or (all_lengths > layout.length).any() or all_lengths.sum() != len(data):
        raise ValueError(f"{path}: tensor 'lengths' does not cut its {len(data)} rows; {REPAIR_HINT}")
    starts = np.concatenate([[0], np.cumsum(all_lengths)])
    lengths = all_lengths[local.numpy()]
    rows = data.new_zeros((len(local), int(lengths.max(initial=1)), data.shape[1]))  # [m, L_m, D]
    for i, (j, k) in enumerate(zip(local.tolist(), lengths.tolist(), strict=True)):
        rows[i, :k] = data[starts[j] : starts[j] + k]
    return [rows], pooled, lengths, check


# --- the index --------------------------------------------------------------------------
class IndexFormat:
    """``index-<generation>.safetensors``: ``rows`` [N, k] int64 (input row, variant -> slot; a row with fewer
    than k captions has its slots packed left and ``-1`` after them, column 0 always a slot), ``keys``
    [slots, 16] uint8 (each slot's caption key), and with ids: the UTF-8 ``id_bytes`` cut by ``id_offsets``
    [N + 1], and ``id_sorted_hash`` / ``id_sorted_rows`` [N] (ids' 64-bit hashes sorted, and their rows),
    so that looking an id up needs no dict of a million ids."""

    IDS = ("id_bytes", "id_offsets", "id_sorted_hash", "id_sorted_rows")
    MISSING = -1  # in ``rows``: no caption variant here (the row has fewer)

    @staticmethod
    def name(generation: str) -> str:
        """Each version of a store has its own index; readers of an older version keep theirs until gc."""
        return f"index-{generation}.safetensors"

    @staticmethod
    def write(root: Path, generation: str, rows: tuple[tuple[int, int], Iterable],
              keys: tuple[int, Iterable], ids: dict[str, tuple[torch.dtype, tuple[int, ...], Iterable]] | None
              ) -> FileEntry:
        """Streamed: ``rows`` as (shape, pieces), ``keys`` as (slots, pieces), ``ids`` name -> (dtype, shape,
        pieces); nothing is held twice."""
        tensors = {"rows": (torch.int64, rows[0], rows[1]), "keys": (torch.uint8, (keys[0], 16), keys[1])}
        if ids is not None:
            if set(ids) != set(IndexFormat.IDS):
                raise ValueError(f"index ids must be {IndexFormat.IDS}, got {sorted(ids)}")
            tensors.update(ids)
        return FileEntry.from_json(write_streamed(root, IndexFormat.name(generation), tensors))

    @staticmethod
    def read(root: Path, manifest: Manifest) -> dict[str, np.ndarray]:
        """The index of ``manifest``, checked, as read-only numpy arrays: ``rows`` [N, k] int64, ``keys``
        [slots, 16] uint8 and with ids the four id tensors.

        It is read whole, so its sha256 is checked against the manifest's on the way (~1 ms a MB): a changed
        slot would otherwise serve another row, whose own row check passes. Then its layout: exactly these
        tensors, N the manifest's rows, k its variants; each row's slots in [0, slots), packed left, ``-1``
        after a row's last variant (rows with fewer captions), column 0 always a slot. ``ValueError`` naming
        the file and tensor."""
        entry = manifest.index
        if entry is None:
            raise ValueError(f"{root}: the manifest lists no index; {REPAIR_HINT}")
        path = Path(root) / entry.file
        try:
            f = open(path, "rb")  # noqa: SIM115 (closed below; FileNotFoundError needs its own message)
        except FileNotFoundError as err:
            raise FileNotFoundError(f"{path}: missing (the manifest lists it with {entry.bytes} bytes); "
                                    f"{REPAIR_HINT}") from err
        with f:
            header = read_header(f, path)  # first: it refuses an empty or truncated file
            data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)  # pages come in as the arrays are used
        entry.check_data(path, data)
        names = ("rows", "keys", *(IndexFormat.IDS if manifest.has_ids else ()))
        if set(header.tensors) != set(names):
            raise ValueError(f"{path}: an index of this store holds {list(names)}, this one "
                             f"{sorted(header.tensors)!r:.200}; {REPAIR_HINT}")
        n = manifest.rows
        expected = {"rows": (torch.int64, (n, manifest.variants)), "keys": (torch.uint8, (manifest.slots, 16)),
                    "id_bytes": (torch.uint8, None), "id_offsets": (torch.int64, (n + 1,)),
                    "id_sorted_hash": (torch.int64, (n,)), "id_sorted_rows": (torch.int64, (n,))}
        arrays = {}
        for name in names:
            info, (dtype, shape) = header.tensors[name], expected[name]
            if info.dtype != dtype or (info.shape != shape if shape else len(info.shape) != 1):
                raise ValueError(f"{path}: tensor {name!r} is {info.dtype} {list(info.shape)}, the manifest needs "
                                 f"{dtype} {list(shape) if shape else '[bytes]'}; {REPAIR_HINT}")
            array = np.frombuffer(data, dtype="<i8" if dtype == torch.int64 else "u1", count=math.prod(info.shape),
                                  offset=header.data_start + info.begin)
            arrays[name] = array.reshape(info.shape) if array.flags.aligned else array.copy().reshape(info.shape)
        IndexFormat._check_rows(path, arrays["rows"], manifest.slots)
        if manifest.has_ids:
            IndexFormat._check_ids(path, arrays)
        return arrays

    @staticmethod
    def _check_rows(path: Path, rows: np.ndarray, slots: int) -> None:
        """Slots in range and packed left (``-1`` only after a row's last variant)."""
        if not rows.size:
            return
        out = (rows < -1) | (rows >= slots)
        out[:, 0] |= rows[:, 0] < 0  # column 0 always holds a caption
        out[:, 1:] |= (rows[:, 1:] >= 0) & (rows[:, :-1] < 0)  # a slot after a -1: not packed left
        bad = np.flatnonzero(out.any(axis=1))
        if len(bad):
            raise ValueError(f"{path}: tensor 'rows': row {int(bad[0])} has slots {rows[bad[0]].tolist()!r:.120}; "
                             f"each row needs slots in [0, {slots}) packed left, then -1 ({len(bad)} bad rows); "
                             f"{REPAIR_HINT}")

    @staticmethod
    def _check_ids(path: Path, ids: dict[str, np.ndarray]) -> None:
        """The id table's offsets cut ``id_bytes`` in order, its hashes are sorted, its rows in range."""
        offsets, rows, hashes = ids["id_offsets"], ids["id_sorted_rows"], ids["id_sorted_hash"]
        n = len(rows)
        if offsets[0] != 0 or offsets[-1] != len(ids["id_bytes"]) or (offsets[1:] < offsets[:-1]).any():
            raise ValueError(f"{path}: tensor 'id_offsets' does not cut the {len(ids['id_bytes'])} id bytes in "
                             f"order; {REPAIR_HINT}")
        if n and ((rows < 0).any() or (rows >= n).any() or (hashes[1:] < hashes[:-1]).any()):
            raise ValueError(f"{path}: tensor 'id_sorted_hash' / 'id_sorted_rows' is not a sorted table of rows "
                             f"in [0, {n}); {REPAIR_HINT}")


# --- which files belong to a store --------------------------------------------------------
class StoreFiles:
    """The one place that decides which names in a store folder are the store's (or a run's on it).

    A store's files: the manifest, the null, ``index-<generation>.safetensors``, ``shard-XXXXX.safetensors`` and
    their ``shard-XXXXX.json`` sidecars (a finished shard's manifest entry, until the run publishes it). A run's:
    temporaries (``.<name>.tmp-<pid>``: what a killed writer leaves), the locks, scan folders (``.scan.tmp-*``,
    ``.scan-new.tmp-*`` while being made) and the scan cache. ``clipcond precompute`` writes into a folder only
    when everything in it is ``ours``; gc and publishing remove what the manifest does not list.
    """

    LOCK = ".clipcond.lock"  # StoreLock
    PARTS = ".clipcond.parts"  # PartsLock
    SCAN_CACHE = ".clipcond.scan-cache"  # each input file's share of the last scans
    SCAN = f".scan{TMP_MARK}"  # a scan folder, locked by its live run
    SCAN_NEW = f".scan-new{TMP_MARK}"  # a scan folder being made (not yet locked)
    SHARDS, SIDECARS, INDEXES = "shard-*.safetensors", "shard-*.json", "index-*.safetensors"

    @classmethod
    def ours(cls, name: str) -> bool:
        """Whether a store or a run on it makes files of this name."""
        return (name in (MANIFEST, NULL, cls.LOCK, cls.PARTS, cls.SCAN_CACHE) or cls.temporary(name)
                or any(fnmatch.fnmatchcase(name, g) for g in (cls.SHARDS, cls.SIDECARS, cls.INDEXES)))

    @staticmethod
    def temporary(name: str) -> bool:
        return TMP_MARK in name

    @classmethod
    def is_shard(cls, name: str) -> bool:
        """A shard or its sidecar."""
        return fnmatch.fnmatchcase(name, cls.SHARDS) or fnmatch.fnmatchcase(name, cls.SIDECARS)

    @classmethod
    def unlisted(cls, root: Path, listed: set[str], *, temporaries: bool = True, indexes: bool = True) -> list[Path]:
        """Files of ``root`` that are shards, sidecars, (``indexes``) indexes or (``temporaries``) temporaries and
        not in ``listed``: what gc and a publishing run remove."""
        def drop(name: str) -> bool:
            return ((temporaries and cls.temporary(name)) or cls.is_shard(name)
                    or (indexes and fnmatch.fnmatchcase(name, cls.INDEXES)))

        return [path for path in root.iterdir() if path.is_file() and path.name not in listed and drop(path.name)]

    @classmethod
    def leftovers(cls, root: Path) -> list[Path]:
        """Sidecars and temporaries: what is left of a run once its manifest is published (old versions' shards
        and indexes stay for their readers until gc)."""
        return [path for path in root.iterdir() if path.is_file()
                and (cls.temporary(path.name) or fnmatch.fnmatchcase(path.name, cls.SIDECARS))]


def read_header(f: BinaryIO, path: Path) -> SafetensorsHeader:
    """``read_safetensors_header``, its refusal with how to repair a store."""
    try:
        return read_safetensors_header(f, path)
    except ValueError as err:
        raise ValueError(f"{err}; {REPAIR_HINT}") from err


def read_null(root: Path, manifest: Manifest) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``null.safetensors``, its sha256 checked: ``sequence`` [1, L, D] and ``pooled`` [1, P] in the store's dtype,
    and a masked layout's ``mask`` [1, L] int64 (else None): the null at the recipe's full length, stored once."""
    entry, path = manifest.null, Path(root) / NULL
    if entry is None:
        raise ValueError(f"{root}: the manifest lists no {NULL}; {REPAIR_HINT}")
    try:
        null = read_safetensors(entry.read_checked(root), path=path)
    except ValueError as err:
        raise ValueError(f"{err}; {REPAIR_HINT}") from err
    dtype, (length, width) = getattr(torch, manifest.dtype), manifest.sequence_shape
    expected = {"sequence": (dtype, (1, length, width)), "pooled": (dtype, (1, manifest.pooled_dim))}
    if manifest.layout.masked:
        expected["mask"] = (torch.int64, (1, length))
    for name, (want, shape) in expected.items():
        got = null.get(name)
        if got is None or got.dtype != want or tuple(got.shape) != shape:
            what = "missing" if got is None else f"{got.dtype} {list(got.shape)}"
            raise ValueError(f"{path}: tensor {name!r} is {what}, the manifest needs {want} {list(shape)}; "
                             f"{REPAIR_HINT}")
    return null["sequence"], null["pooled"], null.get("mask")


def read_tensors(path: Path, keys: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """Tensors of a store file; an unreadable file is a ``ValueError`` naming it, with how to repair the store."""
    try:
        return read_safetensors(path, keys)
    except OSError as err:
        raise ValueError(f"{path}: cannot read it ({err}); {REPAIR_HINT}") from err
    except ValueError as err:
        raise ValueError(f"{err}; {REPAIR_HINT}") from err


__all__ = ["IndexFormat", "ShardFormat", "ShardWriter", "StoreFiles", "read_header", "read_null", "read_rows",
           "read_tensors"]
