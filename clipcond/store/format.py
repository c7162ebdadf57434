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
files. Format 1 (clipcond before incremental precompute: ``index.safetensors`` with ``rows [N]``,
shards without checksums) is read, never written.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch

from clipcond._files import (
    TMP_MARK,  # noqa: F401 (re-exported: what a killed writer leaves behind)
    atomic_write,
    raw_bytes,
    safetensors_header,
    sha256_file,
    write_streamed,
)

try:  # the batched read's copy-and-checksum in one pass (clipcond/store/_rows.c; optional, little-endian only)
    from clipcond.store import _rows
except ImportError:
    _rows = None
if sys.byteorder != "little":
    _rows = None
_told_numpy = False  # copy_rows said once that it falls back to numpy

logger = logging.getLogger(__name__)

FORMAT = "clipcond-embeddings"
FORMAT_VERSION = 2
READ_VERSIONS = (1, 2)
MANIFEST = "manifest.json"
NULL = "null.safetensors"
REPAIR_HINT = "delete the damaged file(s) and rerun the same `clipcond precompute` command to re-encode them"


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
        paths = data["paths"] if "paths" in data else [data["path"]]  # version 1: one path, one column
        columns = data["columns"] if "columns" in data else [data["column"]]
        return cls(paths=tuple(paths), columns=tuple(columns), id_column=data["id_column"], limit=data["limit"],
                   sha256=data["sha256"])

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
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from err
        return cls.from_json(data, path)

    @classmethod
    def from_json(cls, data: dict, where: object = MANIFEST) -> Manifest:
        if data.get("format") != FORMAT:
            raise ValueError(f"{where}: format is {data.get('format')!r}, expected {FORMAT!r}")
        version = data.get("format_version")
        if version not in READ_VERSIONS:
            raise ValueError(f"{where}: store format version {version} (clipcond {data.get('clipcond_version')}); "
                             f"this clipcond reads versions {READ_VERSIONS}")
        try:
            if version == 1:  # one input, rows -> unique captions numbered 0.., no slots beyond them
                data = {**data, "has_ids": bool(data["input"]["id_column"]), "variants": 1, "slots": data["unique"],
                        "next_shard": data["num_shards"], "plan": None, "generation": None}
            values = {f.name: data[f.name] for f in fields(cls)}
            entry = FileEntry.from_json
            return cls(**{**values, "sequence_shape": tuple(values["sequence_shape"]),
                          "input": Source.from_json(values["input"]),
                          "index": entry(values["index"]) if values["index"] else None,
                          "null": entry(values["null"]) if values["null"] else None,
                          "shards": tuple(ShardEntry.from_json(e) for e in values["shards"])})
        except (KeyError, TypeError) as err:
            raise ValueError(f"{where}: not a version-{version} manifest ({type(err).__name__}: {err})") from err

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
    def header(n: int, dtype: torch.dtype, row_shape: Sequence[int], pooled_dim: int, meta: dict) -> bytes:
        """The header of a shard of ``n`` rows, for a writer that streams the tensors after it."""
        return safetensors_header(ShardFormat._shapes(n, dtype, row_shape, pooled_dim), ShardFormat._about(meta))

    @staticmethod
    def write(root: Path, k: int, sequence: torch.Tensor, pooled: torch.Tensor, meta: dict) -> FileEntry:
        """A whole shard from its rows (``sequence`` [n, L, D], ``pooled`` [n, P]), checksums computed here."""
        check = row_checksums(sequence, pooled)
        shapes = ShardFormat._shapes(len(sequence), sequence.dtype, sequence.shape[1:], pooled.shape[1])
        tensors = {name: (*shapes[name], [raw_bytes(t)]) for name, t in zip(ShardFormat.TENSORS,
                                                                            (sequence, pooled, check), strict=True)}
        return FileEntry.from_json(write_streamed(root, ShardFormat.name(k), tensors, ShardFormat._about(meta)))

    @staticmethod
    def _shapes(n: int, dtype: torch.dtype, row_shape: Sequence[int], pooled_dim: int) -> dict:
        return {"sequence": (dtype, (n, *row_shape)), "pooled": (dtype, (n, pooled_dim)), "check": (torch.int64, (n,))}

    @staticmethod
    def _about(meta: dict) -> dict[str, str]:
        return {"clipcond": json.dumps(meta, sort_keys=True)}  # one key: equal stores must be equal bytes


PARALLEL_COPY_BYTES = 1 << 20  # below this a batch is copied on one thread (a thread costs ~20 µs to start)
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

    A sum of 64-bit words: ~12-16 µs for an SDXL float16 row in cache (CRC32: 68 µs), and nearly free
    where the read copies the row anyway (``copy_rows``), so a read checks every row it serves. It
    catches what damages a file in place, bit rot and torn writes (any change to one word; any
    overwritten block but with probability 2^-64), not a deliberate forgery.
    """
    return torch.from_numpy(mix_checksums(_word_sums(row_bytes(sequence)), _word_sums(row_bytes(pooled))))


def copy_rows(sources: Sequence[np.ndarray], destinations: Sequence[np.ndarray]) -> np.ndarray:
    """Copy each uint8 row of ``sources`` into its destination (same size) and return its word sum, [n] uint64
    (``row_checksums`` mixes a row's sequence and pooled sums).

    In one pass with the compiled ``clipcond._rows`` (built at install where a C compiler is): each word is
    added on its way to the destination, on ``torch.get_num_threads()`` threads for a large batch as
    torch's own copy would. Without it, numpy sums each row right after copying it, while it is in cache.
    """
    sums = np.empty(len(sources), dtype=np.uint64)
    if _rows is not None:
        big = sum(source.nbytes for source in sources) >= PARALLEL_COPY_BYTES
        _rows.copy_rows(sources, destinations, sums, torch.get_num_threads() if big else 1)
        return sums
    global _told_numpy
    if not _told_numpy:
        _told_numpy = True
        logger.warning("clipcond._rows is not built (no C compiler when clipcond was installed?): store reads check "
                       "each row with a second pass in numpy, about a fifth slower; reinstall with a C compiler")
    for i, (source, destination) in enumerate(zip(sources, destinations, strict=True)):
        np.copyto(destination, source)
        sums[i] = _word_sums(destination[None])[0]
    return sums


def mix_checksums(sequence_sums: np.ndarray, pooled_sums: np.ndarray) -> np.ndarray:
    """[n] int64 row checksums from each row's sequence and pooled word sums ([n] uint64 each)."""
    return (sequence_sums + pooled_sums * CHECK_MIX).view(np.int64)


# --- the index --------------------------------------------------------------------------
class IndexFormat:
    """``index-<generation>.safetensors``: ``rows`` [N, k] int64 (input row, variant -> slot), ``keys``
    [slots, 16] uint8 (each slot's caption key), and with ids: the UTF-8 ``id_bytes`` cut by ``id_offsets``
    [N + 1], and ``id_sorted_hash`` / ``id_sorted_rows`` [N] (ids' 64-bit hashes sorted, and their rows),
    so that looking an id up needs no dict of a million ids. Version 1: ``index.safetensors``, rows [N]."""

    IDS = ("id_bytes", "id_offsets", "id_sorted_hash", "id_sorted_rows")
    VERSION_1 = "index.safetensors"

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
    def rows(path: Path) -> torch.Tensor:
        """[N, k] slots (version 1: [N, 1])."""
        rows = read_tensors(path, ["rows"])["rows"]
        return rows if rows.ndim == 2 else rows[:, None]


# --- files ------------------------------------------------------------------------------
class StoreLock:
    """One writer per store: an exclusive ``flock`` on ``OUT/.clipcond.lock``.

    The kernel drops it when the process ends, however it ends (SIGKILL included), so a killed
    run never blocks its rerun. Where the filesystem has no locks (or there is no ``fcntl``), the
    run goes on unlocked, with a warning.
    """

    NAME = ".clipcond.lock"

    def __init__(self, folder: Path) -> None:
        self.folder, self.path, self.fd = folder, folder / self.NAME, None

    def acquire(self, *, wait: bool = False) -> None:
        """Take the lock; ``wait``: block until the holder lets go (parts take it only briefly)."""
        try:
            import fcntl
        except ImportError:  # Windows
            logger.warning("%s: no file locks on this platform; run one precompute per store at a time", self.folder)
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown process"
            os.close(fd)
            raise ValueError(f"{self.folder} is being written by another clipcond precompute ({holder}); wait for "
                             "it to finish, or write to another --out") from None
        except OSError as err:  # e.g. ENOLCK on some network filesystems
            os.close(fd)
            logger.warning("%s: cannot lock (%s); run one precompute per store at a time", self.folder, err)
            return
        import socket

        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
        self.fd = fd

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the last descriptor drops the lock
            self.fd = None


class PartsLock:
    """A parts job (``--part I/N``) on a store: ``OUT/.clipcond.parts`` holds its plan and N from its first
    part's start until its last part publishes. Parts encode without the store lock; while they run they
    hold this file shared. Parts join under the store lock, and only parts of the same plan and N may join;
    gc and runs of another plan are refused while a parts job is pending (they would reuse the shard
    numbers its parts write, or delete their finished shards)."""

    NAME = ".clipcond.parts"

    def __init__(self, folder: Path) -> None:
        self.folder, self.path, self.fd = folder, folder / self.NAME, None

    def join(self, plan: str, parts: int) -> None:
        """Record the job (if it is the first part) and hold the file shared; the caller holds the store lock."""
        try:
            import fcntl
        except ImportError:
            return
        job = f"{plan} {parts}"
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            pending = os.pread(fd, 200, 0).decode(errors="replace")
            if pending and pending != job:
                mine = f"this part has plan {plan} of {parts} parts"
                raise ValueError(self._refusal(self.folder, pending, mine, self._running(fd)))
            if not pending:
                os.pwrite(fd, job.encode(), 0)
            fcntl.flock(fd, fcntl.LOCK_SH)
        except OSError as err:  # e.g. no locks on this filesystem: parts run without the guard
            os.close(fd)
            logger.warning("%s: cannot hold the parts lock (%s); run gc and other precomputes only after every "
                           "part has finished", self.folder, err)
            return
        except ValueError:
            os.close(fd)
            raise
        self.fd = fd

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    @classmethod
    def check(cls, folder: Path, plan: str | None, what: str) -> None:
        """Refuse ``what`` (a run of ``plan``, or gc: None) while a parts job of another plan is pending."""
        try:
            fd = os.open(folder / cls.NAME, os.O_RDWR)
        except FileNotFoundError:
            return
        try:
            pending = os.pread(fd, 200, 0).decode(errors="replace")
            running = cls._running(fd)
            if pending and (plan is None or pending.split(" ")[0] != plan or running):
                raise ValueError(cls._refusal(folder, pending, what, running))
        finally:
            os.close(fd)

    @staticmethod
    def _running(fd: int) -> bool:
        """Whether some part holds the file (cannot tell without locks: then assume so)."""
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
            return False
        except (ImportError, OSError):
            return True

    @classmethod
    def finished(cls, folder: Path) -> None:
        """The job's store is published: no parts job is pending any more (the caller holds the store lock)."""
        (folder / cls.NAME).unlink(missing_ok=True)

    @classmethod
    def _refusal(cls, folder: Path, pending: str, what: str, running: bool) -> str:
        plan, _, parts = pending.partition(" ")
        state = "running" if running else "pending: none of its parts is running now"
        return (f"{folder}: a precompute split in {parts} parts (plan {plan}) is {state}; {what}. Finish that job "
                f"(run its missing parts with the same command) or delete {folder}/{cls.NAME} to abandon it")


def read_tensors(path: Path, keys: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file; an unreadable file is a ``ValueError`` naming it."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in (f.keys() if keys is None else keys)}
    except (OSError, KeyError) as err:
        raise ValueError(f"{path}: cannot read {list(keys or [])!r} ({err}); {REPAIR_HINT}") from err
    except Exception as err:  # safetensors' SafetensorError derives from Exception only
        raise ValueError(f"{path}: not a readable safetensors file ({err}); {REPAIR_HINT}") from err


__all__ = ["FORMAT", "FORMAT_VERSION", "MANIFEST", "NULL", "FileEntry", "IndexFormat", "Manifest", "ShardEntry",
           "PartsLock", "ShardFormat", "Source", "StoreLock", "inspect_store", "read_tensors", "row_checksums"]
