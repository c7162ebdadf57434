"""The embedding store's format: one owner for the manifest, the index and the shards.

A store is what ``clipcond precompute`` writes (clipcond/precompute/job.py) and ``EmbeddingStore``
reads (clipcond/store/reader.py). It replaces kohya sd-scripts' ``--cache_text_encoder_outputs`` (an
``.npz`` per image) and the diffusers SDXL training script's precompute step. Format 2, one folder:

- ``shard-00000.safetensors``, ...: ``sequence`` ``[n, 77, D]``, ``pooled`` ``[n, P]`` (the store's
  dtype) and ``check`` ``[n]`` int64 row checksums of embedding slots ``start:stop``
  (``ShardFormat``); shard numbers are never reused, so a name always means the same rows;
- ``index-<generation>.safetensors``: ``rows`` ``[N, k]`` input row and caption variant -> slot,
  ``keys`` ``[slots, 16]`` each slot's caption key, and with ids the id table (``IndexFormat``);
- ``null.safetensors``: the encoder's null conditioning (``sequence [1, 77, D]``, ``pooled [1, P]``);
- ``manifest.json``: what the store is bound to and every file's size and sha256 (``Manifest``);
- ``.clipcond.lock``: locked by the run writing the store (``StoreLock``).

Every file is written under a temporary name, fsynced and renamed (clipcond/_files.py), and the
manifest is published last: a file under its final name is whole, and a manifest lists only whole
files.

Reading trusts nothing it has not checked: the manifest is validated field by field, the index and the null
are checked against their sha256 when a store is opened (they are read whole anyway), a shard's header is
parsed by the one strict safetensors header reader (``clipcond._files.read_safetensors_header``) and then held
to the shard rules below and to the manifest, and every row read is checked against its row checksum. A
damaged file is a ``ValueError`` naming it (and the tensor or row), never another row's bytes.

Format 1 (unreleased clipcond before incremental precompute: ``index.safetensors`` with ``rows [N]``, shards
without checksums) is no longer read: opening one says to run ``clipcond precompute`` again into a new
folder. Nothing in a damaged version-2 file can make a reader take it for format 1 and skip the row checks.
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
from dataclasses import asdict, dataclass, fields
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
    sha256_file,
    temporary,
    write_streamed,
)
from clipcond._files import read_tensors as read_safetensors
from clipcond.store.checksums import row_checksums

logger = logging.getLogger(__name__)

FORMAT = "clipcond-embeddings"
FORMAT_VERSION = 2  # the only version read: 1 was written by unreleased clipcond only
MANIFEST = "manifest.json"
NULL = "null.safetensors"
REPAIR_HINT = "delete the damaged file(s) and rerun the same `clipcond precompute` command to re-encode them"
STORE_DTYPES = ("float32", "float16", "bfloat16")  # what precompute writes (torch dtype names)
SHA256_HEX = frozenset("0123456789abcdef")


# --- the manifest -----------------------------------------------------------------------
@dataclass(frozen=True, slots=True, kw_only=True)
class FileEntry:
    """A file of the store as the manifest records it: checked by size on open, by sha256 on verify."""

    file: str  # name in the store folder
    bytes: int
    sha256: str

    def problem(self, root: Path, checksums: bool = False) -> str | None:
        path = root / self.file
        if not path.is_file():
            return f"{path}: missing (the manifest lists it with {self.bytes} bytes)"
        size = path.stat().st_size
        if size != self.bytes:
            return f"{path}: truncated or overwritten: {size} bytes, the manifest says {self.bytes}"
        if checksums and (digest := sha256_file(path)) != self.sha256:
            return f"{path}: corrupted: sha256 {digest[:16]}..., the manifest says {self.sha256[:16]}..."
        return None

    @classmethod
    def from_json(cls, data: dict) -> FileEntry:
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})

    def check(self, what: str) -> None:
        """Each field's type and range, as a reader needs them; ``ValueError`` naming ``what`` and the field."""
        name = self.file
        if not (isinstance(name, str) and name and name[0] != "." and name.isascii() and name.isprintable()
                and "/" not in name and "\\" not in name):
            raise ValueError(f"{what}: file {name!r:.80} is not a file name in the store folder")
        _count(self.bytes, f"{what} ({name}): bytes")
        if not (isinstance(self.sha256, str) and len(self.sha256) == 64 and set(self.sha256) <= SHA256_HEX):
            raise ValueError(f"{what} ({name}): sha256 {self.sha256!r:.80} is not 64 lowercase hex digits")

    def read_checked(self, root: Path) -> bytes:
        """The whole file, its size and sha256 checked against this entry (a small file read whole: the null)."""
        path = Path(root) / self.file
        try:
            data = path.read_bytes()
        except FileNotFoundError as err:
            raise FileNotFoundError(f"{path}: missing (the manifest lists it with {self.bytes} bytes)") from err
        self.check_data(path, data)
        return data

    def check_data(self, path: Path, data: bytes | mmap.mmap) -> None:
        """``data``, the file's bytes, has this entry's size and sha256."""
        if len(data) != self.bytes:
            raise ValueError(f"{path}: truncated or overwritten: {len(data)} bytes, the manifest says {self.bytes}; "
                             f"{REPAIR_HINT}")
        if (digest := hashlib.sha256(data).hexdigest()) != self.sha256:
            raise ValueError(f"{path}: corrupted: sha256 {digest[:16]}..., the manifest says {self.sha256[:16]}...; "
                             f"{REPAIR_HINT}")


def _count(value: object, what: str, *, positive: bool = False) -> int:
    """``value`` as a manifest count: an int (not a bool), >= 0 (``positive``: > 0); ``ValueError`` naming it."""
    if type(value) is not int or value < int(positive):
        raise ValueError(f"{what} must be an int >= {int(positive)}, got {value!r:.80}")
    return value


@dataclass(frozen=True, slots=True, kw_only=True)
class ShardEntry(FileEntry):
    """A shard: the embeddings of slots ``start:stop``, written by run ``plan`` (or a gc)."""

    start: int
    stop: int
    truncated: int = 0  # of its captions, how many were longer than the context and cut
    plan: str | None = None  # the run that wrote it (a resumed run keeps only its own plan's shards)


@dataclass(frozen=True, slots=True, kw_only=True)
class Source:
    """The input a store version was made from; ``sha256`` covers every caption and id in row order (a sha256
    of each input file's sha256 of its rows, so that a scan can take an unchanged file's from its cache)."""

    paths: tuple[str, ...]
    columns: tuple[str, ...]
    id_column: str | None
    limit: int | None
    sha256: str

    @classmethod
    def from_json(cls, data: dict) -> Source:
        return cls(paths=tuple(data["paths"]), columns=tuple(data["columns"]), id_column=data["id_column"],
                   limit=data["limit"], sha256=data["sha256"])

    def to_json(self) -> dict:
        return {"paths": list(self.paths), "columns": list(self.columns), "id_column": self.id_column,
                "limit": self.limit, "sha256": self.sha256}


@dataclass(frozen=True, slots=True, kw_only=True)
class Manifest:
    """``manifest.json``: what a store version is bound to, what it holds, and every file in it."""

    format_version: int = FORMAT_VERSION
    clipcond_version: str
    complete: bool  # False until the last shard is in: readers refuse the store
    # What a store is bound to (precompute refuses to add to a store that differs in any of these):
    encoder: dict  # the spec (EncoderSpec.to_dict())
    fingerprint: str  # of the weights
    dtype: str
    sequence_shape: tuple[int, int]  # [77, D]
    pooled_dim: int
    shard_size: int  # embeddings per shard
    # This version:
    input: Source
    has_ids: bool
    rows: int  # N input rows
    variants: int  # k captions a row
    unique: int  # distinct captions among them
    slots: int  # embedding slots numbered so far (>= unique: unreferenced ones stay until gc)
    next_shard: int  # the number the next new shard gets
    num_shards: int  # shards this version needs (== len(shards) once complete)
    plan: str | None  # which captions go to which shard and batch
    generation: str | None  # this version's id; names its index
    truncated: int  # captions longer than the context, cut
    index: FileEntry | None
    null: FileEntry | None
    shards: tuple[ShardEntry, ...] = ()  # sorted by start

    @classmethod
    def read(cls, root: Path) -> Manifest:
        path = Path(root) / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(f"{root}: no {MANIFEST}: not a clipcond embedding store "
                                    f"(write one with `clipcond precompute --out {root} ...`)")
        try:
            data = json.loads(path.read_bytes().decode("utf-8"))
        except UnicodeDecodeError as err:
            raise ValueError(f"{path}: not UTF-8 ({err}); {REPAIR_HINT}") from err
        except (ValueError, RecursionError) as err:  # JSONDecodeError is a ValueError; absurd nesting recurses
            raise ValueError(f"{path}: not valid JSON ({type(err).__name__}: {str(err):.200}); {REPAIR_HINT}") from err
        return cls.from_json(data, path)

    @classmethod
    def from_json(cls, data: dict, where: object = MANIFEST) -> Manifest:
        if not isinstance(data, dict):
            raise ValueError(f"{where}: a manifest is a JSON object, got {type(data).__name__}")
        if data.get("format") != FORMAT:
            raise ValueError(f"{where}: format is {data.get('format')!r:.80}, expected {FORMAT!r}")
        version = data.get("format_version")
        if version == 1:
            raise ValueError(f"{where}: store format version 1 (clipcond {data.get('clipcond_version')!r:.40}) is "
                             f"no longer read: only unreleased clipcond versions wrote it. Run `clipcond precompute` "
                             f"again with --out a new folder to make a version-{FORMAT_VERSION} store")
        if version != FORMAT_VERSION:
            raise ValueError(f"{where}: store format version {version!r:.40} (clipcond "
                             f"{data.get('clipcond_version')!r:.40}); this clipcond reads version {FORMAT_VERSION}")
        try:
            values = {f.name: data[f.name] for f in fields(cls)}
            entry = FileEntry.from_json
            manifest = cls(**{**values, "sequence_shape": tuple(values["sequence_shape"]),
                              "input": Source.from_json(values["input"]),
                              "index": entry(values["index"]) if values["index"] else None,
                              "null": entry(values["null"]) if values["null"] else None,
                              "shards": tuple(ShardEntry.from_json(e) for e in values["shards"])})
            manifest.check()
        except (KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"{where}: not a version-{version} manifest ({type(err).__name__}: {err})") from err
        except ValueError as err:
            raise ValueError(f"{where}: {err}; {REPAIR_HINT}") from err
        return manifest

    def check(self) -> None:
        """Every field a reader relies on has its type and range, and the shards tile their slots in order;
        ``ValueError`` naming the field (``from_json`` adds the file)."""
        for name in ("rows", "unique", "slots", "next_shard", "num_shards", "truncated"):
            _count(getattr(self, name), name)
        for name in ("variants", "pooled_dim", "shard_size"):
            _count(getattr(self, name), name, positive=True)
        if self.dtype not in STORE_DTYPES:
            raise ValueError(f"dtype {self.dtype!r:.40} is not one of {STORE_DTYPES}")
        if len(self.sequence_shape) != 2:
            raise ValueError(f"sequence_shape must be [L, D], got {list(self.sequence_shape)!r:.80}")
        for value in self.sequence_shape:
            _count(value, "sequence_shape", positive=True)
        if type(self.complete) is not bool or type(self.has_ids) is not bool:
            raise ValueError(f"complete and has_ids must be true or false, got {self.complete!r:.20}, "
                             f"{self.has_ids!r:.20}")
        if not isinstance(self.encoder, dict):
            raise ValueError(f"encoder must be a JSON object, got {type(self.encoder).__name__}")
        for name in ("index", "null"):
            if (entry := getattr(self, name)) is not None:
                entry.check(name)
            elif self.complete:
                raise ValueError(f"a complete store lists its {name}, this manifest has {name}: null")
        stop = 0
        for k, entry in enumerate(self.shards):
            entry.check(f"shards[{k}]")
            start, end = _count(entry.start, f"shards[{k}].start"), _count(entry.stop, f"shards[{k}].stop")
            _count(entry.truncated, f"shards[{k}].truncated")
            if not stop <= start < end <= self.slots:
                raise ValueError(f"shards[{k}] ({entry.file}) holds slots {start}:{end}; shards must be sorted, "
                                 f"disjoint and within the store's {self.slots} slots (the one before ends at {stop})")
            stop = end

    def to_json(self) -> dict:
        data = {"format": FORMAT, **asdict(self)}  # asdict recurses into the entries
        return {**data, "sequence_shape": list(self.sequence_shape), "input": self.input.to_json(),
                "shards": [asdict(e) for e in self.shards]}

    def write(self, root: Path) -> None:
        atomic_write(Path(root) / MANIFEST, json.dumps(self.to_json(), indent=1).encode())

    @property
    def files(self) -> list[FileEntry]:
        return [e for e in (self.index, self.null) if e is not None] + list(self.shards)

    def problems(self, root: Path, *, checksums: bool = False, progress: bool = False) -> list[str]:
        """What is wrong: incomplete, missing or resized files, and (``checksums``) bad sha256."""
        from tqdm.auto import tqdm

        root = Path(root)
        problems = []
        if not self.complete:
            problems.append(f"{root}: incomplete: {len(self.shards)} of {self.num_shards} shards recorded; rerun "
                            "the same `clipcond precompute` command to finish it")
        for entry in tqdm(self.files, desc="verify", unit="file", disable=True if not progress else None):
            if (problem := entry.problem(root, checksums)) is not None:
                problems.append(problem)
        return problems

    def raise_problems(self, root: Path, *, checksums: bool = False) -> None:
        if problems := self.problems(root, checksums=checksums):
            incomplete = f"{root}: incomplete"  # has its own hint; damaged files need the repair hint
            fix = "" if all(p.startswith(incomplete) for p in problems) else f"\n{REPAIR_HINT}"
            raise ValueError(f"embedding store {root} failed verification:\n  " + "\n  ".join(problems) + fix)

    def describe(self, root: Path) -> list[str]:
        """What the store holds, as lines for people (``clipcond inspect``, ``clipcond precompute``)."""
        seq, source = list(self.sequence_shape), self.input
        disk = sum(e.bytes for e in self.files)
        ids = f"ids from column {source.id_column!r}" if source.id_column else "no ids (look rows up by position)"
        ids = "ids: each tar sample's __key__" if self.has_ids and not source.id_column else ids
        variants = f", {self.variants} variants a row" if self.variants > 1 else ""
        more = f" (+{len(source.paths) - 1} more)" if len(source.paths) > 1 else ""
        return [
            f"{root}: clipcond embedding store (format {self.format_version}, clipcond {self.clipcond_version}), "
            + ("complete" if self.complete else "INCOMPLETE"),
            f"  encoder {self.encoder['name']}: sequence {seq}, pooled [{self.pooled_dim}], {self.dtype}; "
            f"weights fingerprint {self.fingerprint[:16]}",
            f"  rows {self.rows}{variants}: {self.unique} unique captions, {ids}",
            f"  input {source.paths[0]}{more} column(s) {', '.join(map(repr, source.columns))}, "
            f"sha256 {source.sha256[:16]}",
            f"  shards {len(self.shards)}/{self.num_shards} of up to {self.shard_size} embeddings, {_size(disk)} on "
            f"disk; {self.truncated} unique captions truncated to {seq[0]} tokens",
        ]


def _size(n: float) -> str:
    unit = "B"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            break
        n /= 1000
    return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"


def inspect_store(root: Path) -> tuple[list[str], list[str]]:
    """``(description lines, problems)`` after checking every file's size and sha256."""
    manifest = Manifest.read(Path(root))
    return manifest.describe(Path(root)), manifest.problems(Path(root), checksums=True, progress=True)


# --- the shards -------------------------------------------------------------------------
class ShardFormat:
    """``shard-XXXXX.safetensors``: ``sequence`` [n, L, D], ``pooled`` [n, P] (the store's dtype) and ``check``
    [n] int64 (``row_checksums``), in this order; one metadata key, ``clipcond``, a JSON of the run's facts."""

    TENSORS = ("sequence", "pooled", "check")

    @staticmethod
    def name(k: int) -> str:
        """Shard numbers are never reused in a store (gc writes new ones): a name always means the same rows."""
        return f"shard-{k:05d}.safetensors"

    @staticmethod
    def sidecar(name: str) -> str:
        """A new shard's manifest entry, written beside it (before it is renamed into place) until publication."""
        return name.replace(".safetensors", ".json")

    @staticmethod
    def write(root: Path, k: int, sequence: torch.Tensor, pooled: torch.Tensor, meta: dict) -> FileEntry:
        """A whole shard from its rows (``sequence`` [n, L, D], ``pooled`` [n, P]), published at once."""
        writer = ShardWriter(root, k, len(sequence), sequence.dtype, sequence.shape[1:], pooled.shape[1], meta)
        try:
            writer.add(sequence, pooled)
            entry = writer.close()
        except BaseException:
            writer.abort()
            raise
        writer.publish()
        return entry

    @staticmethod
    def _shapes(n: int, dtype: torch.dtype, row_shape: Sequence[int], pooled_dim: int) -> dict:
        return {"sequence": (dtype, (n, *row_shape)), "pooled": (dtype, (n, pooled_dim)), "check": (torch.int64, (n,))}

    @staticmethod
    def _about(meta: dict) -> dict[str, str]:
        return {"clipcond": json.dumps(meta, sort_keys=True)}  # one key: equal stores must be equal bytes

    @staticmethod
    def layout(f: BinaryIO, path: Path, entry: ShardEntry, manifest: Manifest) -> tuple[dict[str, TensorInfo], int]:
        """The checked layout of the shard open as ``f`` (``entry`` of ``manifest``): its three tensors and the
        data's offset in the file. Beyond the safetensors rules (``read_safetensors_header``), a shard holds
        exactly ``sequence`` [n, L, D] and ``pooled`` [n, P] of the store's dtype and ``check`` [n] int64, n the
        entry's ``stop - start``, [L, D] and P the manifest's, and its metadata names the same slots: a header
        that disagrees is damage (``ValueError`` naming the file and tensor), never a reason to read less."""
        header = read_header(f, path)
        tensors = header.tensors
        if set(tensors) != set(ShardFormat.TENSORS):
            raise ValueError(f"{path}: a shard holds tensors {list(ShardFormat.TENSORS)}, this one "
                             f"{sorted(tensors)!r:.200} (damaged header); {REPAIR_HINT}")
        n, dtype = entry.stop - entry.start, getattr(torch, manifest.dtype)
        expected = ShardFormat._shapes(n, dtype, manifest.sequence_shape, manifest.pooled_dim)
        for name, (want_dtype, want_shape) in expected.items():
            got = tensors[name]
            if got.dtype != want_dtype or got.shape != tuple(want_shape):
                raise ValueError(f"{path}: tensor {name!r} is {got.dtype} {list(got.shape)}, the manifest's shard "
                                 f"{entry.file} (slots {entry.start}:{entry.stop}) needs {want_dtype} "
                                 f"{list(want_shape)} (damaged header); {REPAIR_HINT}")
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

    Every shape is known up front, so the header goes first; the ``sequence`` rows are written and hashed batch
    by batch, the ``pooled`` rows and their checksums (``n x P`` and ``n``: small) are kept and go last. ``close``
    fsyncs the file under its temporary name and returns its entry; ``publish`` renames it into place.
    """

    def __init__(self, root: Path, k: int, n: int, dtype: torch.dtype, row_shape: Sequence[int], pooled_dim: int,
                 meta: dict) -> None:
        self.path, self.n, self.filled = root / ShardFormat.name(k), n, 0
        self.dtype, self.row_shape = dtype, torch.Size(row_shape)
        self.pooled = torch.empty((n, pooled_dim), dtype=dtype)  # [n, P]
        self.check = torch.empty(n, dtype=torch.int64)  # [n] row checksums, verified on every read
        shapes = ShardFormat._shapes(n, dtype, row_shape, pooled_dim)
        header = safetensors_header(shapes, ShardFormat._about(meta))
        self.expected_size = len(header) + sum(d.itemsize * math.prod(shape) for d, shape in shapes.values())
        self.tmp, self.digest, self.size = temporary(self.path), hashlib.sha256(), 0
        self.file = open(self.tmp, "wb")  # noqa: SIM115 (closed in close() or abort())
        self._write(memoryview(header))

    def _write(self, data: memoryview) -> None:
        self.file.write(data)
        self.digest.update(data)
        self.size += data.nbytes

    def add(self, sequence: torch.Tensor, pooled: torch.Tensor) -> None:
        """The next rows: ``sequence`` [b, L, D] and ``pooled`` [b, P], on the CPU, in the shard's dtype."""
        fits = sequence.dtype == self.dtype and sequence.shape[1:] == self.row_shape
        if not fits or self.filled + len(sequence) > self.n:
            raise ValueError(f"{self.path.name}: {len(sequence)} rows of {sequence.dtype} {list(sequence.shape[1:])} "
                             f"after {self.filled} of {self.n} rows of {self.dtype} {list(self.row_shape)}")
        rows = slice(self.filled, self.filled + len(sequence))
        self.pooled[rows].copy_(pooled)
        self.check[rows] = row_checksums(sequence, self.pooled[rows])
        self._write(raw_bytes(sequence))
        self.filled += len(sequence)

    def close(self) -> FileEntry:
        """Every row added: write the rest, fsync; the entry of the file (still under its temporary name)."""
        if self.filled != self.n:
            raise ValueError(f"{self.path.name}: {self.filled} of its {self.n} rows were written")
        self._write(raw_bytes(self.pooled))
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
            raise FileNotFoundError(f"{path}: missing (the manifest lists it with {entry.bytes} bytes)") from err
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


def read_null(root: Path, manifest: Manifest) -> tuple[torch.Tensor, torch.Tensor]:
    """``null.safetensors``, its sha256 checked: ``sequence`` [1, L, D] and ``pooled`` [1, P] in the store's dtype."""
    entry, path = manifest.null, Path(root) / NULL
    if entry is None:
        raise ValueError(f"{root}: the manifest lists no {NULL}; {REPAIR_HINT}")
    try:
        null = read_safetensors(entry.read_checked(root), path=path)
    except ValueError as err:
        raise ValueError(f"{err}; {REPAIR_HINT}") from err
    dtype, (length, width) = getattr(torch, manifest.dtype), manifest.sequence_shape
    for name, shape in (("sequence", (1, length, width)), ("pooled", (1, manifest.pooled_dim))):
        got = null.get(name)
        if got is None or got.dtype != dtype or tuple(got.shape) != shape:
            what = "missing" if got is None else f"{got.dtype} {list(got.shape)}"
            raise ValueError(f"{path}: tensor {name!r} is {what}, the manifest needs {dtype} {list(shape)}; "
                             f"{REPAIR_HINT}")
    return null["sequence"], null["pooled"]


def read_tensors(path: Path, keys: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """Tensors of a store file; an unreadable file is a ``ValueError`` naming it, with how to repair the store."""
    try:
        return read_safetensors(path, keys)
    except OSError as err:
        raise ValueError(f"{path}: cannot read it ({err}); {REPAIR_HINT}") from err
    except ValueError as err:
        raise ValueError(f"{err}; {REPAIR_HINT}") from err


__all__ = ["FORMAT", "FORMAT_VERSION", "MANIFEST", "NULL", "FileEntry", "IndexFormat", "Manifest", "ShardEntry",
           "ShardFormat", "Source", "StoreFiles", "inspect_store", "read_null", "read_tensors"]
