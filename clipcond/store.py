"""``EmbeddingStore``: precomputed text conditioning, read back as a memory-mapped ``Dataset``.

A store is what ``clipcond precompute`` writes (clipcond/precompute.py). It replaces kohya
sd-scripts' ``--cache_text_encoder_outputs`` (an ``.npz`` per image, and no caption dropout on
cached outputs: sd-scripts#1583, #2266) and the diffusers SDXL training script's precompute step.
Layout (format 1), one folder:

- ``shard-00000.safetensors``, ...: ``sequence`` ``[n, 77, D]`` and ``pooled`` ``[n, P]`` of the
  *unique* captions ``start:stop`` (numbered in order of first appearance), in the store's dtype;
- ``index.safetensors``: ``rows`` ``[N]`` int64, input row -> unique caption; with an id column
  also the ids (UTF-8 ``id_bytes`` cut by ``id_offsets [N + 1]``) and a hash-sorted lookup table
  (``id_sorted_hash``, ``id_sorted_rows``) so that opening costs no dict of a million ids;
- ``null.safetensors``: the encoder's null conditioning (``sequence [1, 77, D]``, ``pooled [1, P]``);
- ``manifest.json``: encoder spec, weights fingerprint, dtype, counts, every file's size and
  sha256, the clipcond version and ``complete``.
- ``.clipcond.lock``: locked by the run writing the store (``StoreLock``); holds its pid and host.

Every file is written under a temporary name, fsynced and renamed (``atomic_write``), so a file
that exists under its final name is whole. Opening a store checks the manifest and file sizes
(cheap); ``verify()`` and ``clipcond inspect DIR`` also check every sha256.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import math
import os
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate, get_worker_info

from clipcond.conditioning import Conditioning
from clipcond.files import (  # noqa: F401 (re-exported: the store's writers use them through this module)
    SAFETENSORS_DTYPES,
    TMP_MARK,
    atomic_write,
    file_entry,
    id_hash,
    publish,
    raw_bytes,
    safetensors_header,
    sha256_file,
    temporary,
    tensor_bytes,
    write_file,
    write_json,
    write_tensors,
)
from clipcond.specs import EncoderSpec, spec_from_dict

logger = logging.getLogger(__name__)

FORMAT = "clipcond-embeddings"
FORMAT_VERSION = 2
READ_VERSIONS = (1, 2)  # version 1: one input, rows [N], shards numbered by shard_size (read-only here)
MANIFEST = "manifest.json"
INDEX = "index.safetensors"  # version 1's only index
NULL = "null.safetensors"
MAX_OPEN_SHARDS = 64  # memory maps kept open per process (DataLoader worker)
REPAIR_HINT = "delete the damaged file(s) and rerun the same `clipcond precompute` command to re-encode them"


def shard_name(k: int) -> str:
    """Shard numbers are never reused in a store (gc writes new ones): a name always means the same rows."""
    return f"shard-{k:05d}.safetensors"


def index_name(generation: str) -> str:
    """Each version of a store has its own index; readers of an older version keep theirs until gc."""
    return f"index-{generation}.safetensors"


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


def read_manifest(root: Path) -> dict:
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{root}: no {MANIFEST}: not a clipcond embedding store "
                                f"(write one with `clipcond precompute --out {root} ...`)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: format is {manifest.get('format')!r}, expected {FORMAT!r}")
    if manifest.get("format_version") not in READ_VERSIONS:
        raise ValueError(f"{path}: store format version {manifest.get('format_version')} (clipcond "
                         f"{manifest.get('clipcond_version')}); this clipcond reads versions {READ_VERSIONS}")
    return manifest


# --- verification -----------------------------------------------------------------------
def _entry_problem(root: Path, entry: dict, checksums: bool) -> str | None:
    path = root / entry["file"]
    if not path.is_file():
        return f"{path}: missing (the manifest lists it with {entry['bytes']} bytes)"
    size = path.stat().st_size
    if size != entry["bytes"]:
        return f"{path}: truncated or overwritten: {size} bytes, the manifest says {entry['bytes']}"
    if checksums and (digest := sha256_file(path)) != entry["sha256"]:
        return f"{path}: corrupted: sha256 {digest[:16]}..., the manifest says {entry['sha256'][:16]}..."
    return None


def store_problems(root: Path, manifest: dict, *, checksums: bool = False, progress: bool = False) -> list[str]:
    """What is wrong with a store: incomplete, missing or resized files, and (``checksums``) bad sha256."""
    from tqdm.auto import tqdm

    root = Path(root)
    problems = []
    if not manifest.get("complete"):
        problems.append(f"{root}: incomplete: {len(manifest['shards'])} of {manifest['num_shards']} shards "
                        "recorded; rerun the same `clipcond precompute` command to finish it")
    entries = [e for e in (manifest.get("index"), manifest.get("null")) if e] + manifest["shards"]
    for entry in tqdm(entries, desc="verify", unit="file", disable=True if not progress else None):
        if (problem := _entry_problem(root, entry, checksums)) is not None:
            problems.append(problem)
    return problems


def _raise_problems(root: Path, problems: list[str]) -> None:
    if problems:
        incomplete = f"{root}: incomplete"  # has its own hint; damaged files need the repair hint
        fix = "" if all(p.startswith(incomplete) for p in problems) else f"\n{REPAIR_HINT}"
        raise ValueError(f"embedding store {root} failed verification:\n  " + "\n  ".join(problems) + fix)


def _size(n: float) -> str:
    unit = "B"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            break
        n /= 1000
    return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"


def describe_store(root: Path, manifest: dict) -> list[str]:
    """What a store holds, as lines for people (``clipcond inspect``, ``clipcond precompute``)."""
    m, rows, unique = manifest, manifest["rows"], manifest["unique"]
    seq, inp = m["sequence_shape"], m["input"]
    disk = sum(e["bytes"] for e in [*m["shards"], m.get("index") or {"bytes": 0}, m.get("null") or {"bytes": 0}])
    ids = f"ids from column {inp['id_column']!r}" if inp.get("id_column") else "no ids (look rows up by position)"
    paths = inp.get("paths") or [inp["path"]]
    columns = inp.get("columns") or [inp["column"]]
    variants = f", {m['variants']} variants a row" if m.get("variants", 1) > 1 else ""
    return [
        f"{root}: clipcond embedding store (format {m['format_version']}, clipcond {m['clipcond_version']}), "
        + ("complete" if m["complete"] else "INCOMPLETE"),
        f"  encoder {m['encoder']['name']}: sequence {seq}, pooled [{m['pooled_dim']}], {m['dtype']}; "
        f"weights fingerprint {m['fingerprint'][:16]}",
        f"  rows {rows}{variants}: {unique} unique captions, {ids}",
        f"  input {paths[0]}{f' (+{len(paths) - 1} more)' if len(paths) > 1 else ''} column(s) "
        f"{', '.join(map(repr, columns))}, sha256 {inp['sha256'][:16]}",
        f"  shards {len(m['shards'])}/{m['num_shards']} of up to {m['shard_size']} embeddings, {_size(disk)} on disk; "
        f"{m.get('truncated', 0)} unique captions truncated to {seq[0]} tokens",
    ]


def inspect_store(root: Path) -> tuple[list[str], list[str]]:
    """``(description lines, problems)`` after checking every file's size and sha256."""
    manifest = read_manifest(Path(root))
    return describe_store(Path(root), manifest), store_problems(Path(root), manifest, checksums=True, progress=True)


# --- reading ----------------------------------------------------------------------------
_MIX = np.uint64(0x9E3779B97F4A7C15)  # odd: a sequence sum moved into the pooled one gives another checksum


def _word_sums(rows: torch.Tensor) -> np.ndarray:
    """[n] uint64: each row's bytes as little-endian 64-bit words, summed mod 2^64 (a short tail zero-padded).

    torch sums the words as int64, which wraps as two's complement: the same bits as the unsigned sum,
    at about twice numpy's speed (tests compare both with Python integers)."""
    data = rows.contiguous().view(torch.uint8).reshape(len(rows), -1)  # [n, bytes], no copy
    if data.shape[1] % 8 or data.storage_offset() % 8:
        data = torch.nn.functional.pad(data, (0, -data.shape[1] % 8))  # a copy: padded and aligned
    return data.view(torch.int64).sum(dim=1).numpy().view(np.uint64)


def row_checksums(sequence: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """[n] int64 checksums of rows ``sequence`` [n, L, D] and ``pooled`` [n, P], as shards store them.

    A sum of 64-bit words: ~13 µs for an SDXL float16 row in cache (CRC32: 68 µs), so a read checks
    every row it serves. It catches what damages a file in place, bit rot and torn writes (any change
    to one word; any overwritten block but with probability 2^-64), not a deliberate forgery.
    """
    mixed = _word_sums(sequence) + _word_sums(pooled) * _MIX
    return torch.from_numpy(mixed.view(np.int64))


class ShardView:
    """A shard's ``sequence`` [n, L, D] and ``pooled`` [n, P] as tensors over one private memory map.

    A row is a view (no copy, no per-call parsing: ~1 µs); the map is copy-on-write, so a caller
    writing into a row never touches the file. Any safetensors file of these two tensors opens.
    """

    def __init__(self, path: Path) -> None:
        import mmap

        try:
            with open(path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(n))
                self.map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            codes = {code: dtype for dtype, code in SAFETENSORS_DTYPES.items()}
            self.tensors = {}
            for name in ("sequence", "pooled", "check"):
                if name == "check" and name not in header:
                    continue  # a version-1 shard: no row checksums
                info = header[name]
                begin, end = info["data_offsets"]
                dtype = codes[info["dtype"]]
                flat = torch.frombuffer(self.map, dtype=dtype, count=(end - begin) // dtype.itemsize,
                                        offset=8 + n + begin)
                self.tensors[name] = flat.view(info["shape"])
        except (ValueError, KeyError, TypeError, OSError) as err:  # JSONDecodeError is a ValueError
            raise ValueError(f"{path}: not a readable safetensors shard ({type(err).__name__}: {err}); "
                             f"{REPAIR_HINT}") from err

        self.path = path

    def row(self, local: int, what: str, *, verify: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Row ``local`` [L, D], [P] as views, its checksum verified; ``what`` names it in the error."""
        sequence, pooled = self.tensors["sequence"][local], self.tensors["pooled"][local]
        if verify:
            self.verify(local, sequence, pooled, what)
        return sequence, pooled

    def verify(self, local: int, sequence: torch.Tensor, pooled: torch.Tensor, what: str) -> None:
        """``sequence`` [L, D] and ``pooled`` [P] (row ``local`` or a copy of it) match the stored checksum."""
        check = self.tensors.get("check")
        if check is not None and int(row_checksums(sequence[None], pooled[None])[0]) != int(check[local]):
            raise ValueError(f"{self.path} row {local} ({what}): checksum mismatch, the shard is damaged on disk; "
                             f"rerun `clipcond precompute` with --verify to re-encode the damaged shards")


class EmbeddingStore(Dataset):
    """A precomputed store as a ``Dataset`` of the input's rows, in input order.

    ``store[i]`` is ``{"sequence": [77, D], "pooled": [P], "row": i}`` in the store's dtype, on the CPU, so the
    default collate gives ``sequence [B, 77, D]`` / ``pooled [B, P]``: ``Conditioning(b["sequence"],
    b["pooled"])``. ``store.by_id(id)`` looks a row up by the precompute's ``--id-column``;
    ``store.collate(drop_prob, seed=...)`` is a ``collate_fn`` with caption dropout to the stored null.

    Opening reads the manifest and the row index (8 bytes a row) and checks file sizes; shards are
    memory-mapped lazily, per process, so DataLoader workers each open their own. ``verify=True``
    (or ``verify()``) also checks every file's sha256, which reads the whole store.
    """

    def __init__(self, path: str | os.PathLike[str], *, verify: bool = False, verify_rows: bool = True) -> None:
        self.path = Path(path)
        self.verify_rows = verify_rows  # check each row's checksum as it is read
        self.manifest = read_manifest(self.path)
        _raise_problems(self.path, store_problems(self.path, self.manifest, checksums=verify))
        self._index = self.path / self.manifest["index"]["file"]
        rows = read_tensors(self._index, ["rows"])["rows"]
        self._rows = rows if rows.ndim == 2 else rows[:, None]  # [N, k] slots; version 1: [N]
        if len(self._rows) != self.manifest["rows"]:
            raise ValueError(f"{self._index}: {len(self._rows)} rows, the manifest says {self.manifest['rows']}")
        null = read_tensors(self.path / NULL)
        self._null = Conditioning(null["sequence"], null["pooled"])  # [1, L, D], [1, P]
        self._files = [self.path / entry["file"] for entry in self.manifest["shards"]]
        self._starts = [entry["start"] for entry in self.manifest["shards"]]  # [S], sorted
        self._slots = self._rows.numpy()  # numpy: a scalar read is ~20x cheaper than a tensor's
        self._ids: dict[str, torch.Tensor] | None = None
        self._handles: OrderedDict[int, object] = OrderedDict()
        self._pid = os.getpid()

    # --- facts ---------------------------------------------------------------------------
    @property
    def spec(self) -> EncoderSpec:
        return spec_from_dict(self.manifest["encoder"])

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self.manifest["dtype"])

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    @property
    def num_unique(self) -> int:
        return self.manifest["unique"]

    def __len__(self) -> int:
        return len(self._rows)

    def __repr__(self) -> str:
        return (f"EmbeddingStore({str(self.path)!r}, rows={len(self)}, unique={self.num_unique}, "
                f"encoder={self.manifest['encoder']['name']!r}, dtype={self.manifest['dtype']})")

    # --- rows ----------------------------------------------------------------------------
    @property
    def variants(self) -> int:
        """Captions a row holds (``--column`` given k times, or a list column); ``store[i]`` is variant 0."""
        return self._rows.shape[1]

    def __getitem__(self, row: int) -> dict[str, torch.Tensor | int]:
        return self.get(row)

    def get(self, row: int, variant: int = 0) -> dict[str, torch.Tensor | int]:
        """Row ``row``'s embedding of caption variant ``variant``: ``{"sequence", "pooled", "row"}``."""
        row = self._check_row(row)
        if not 0 <= variant < self.variants:
            raise IndexError(f"variant {variant} is out of range: store {self.path} has {self.variants} a row")
        shard, local = self._locate(row, variant)
        sequence, pooled = self._shard(shard).row(local, f"store row {row}, variant {variant}",
                                                  verify=self.verify_rows)  # [L, D], [P]
        return {"sequence": sequence, "pooled": pooled, "row": row}

    def _locate(self, row: int, variant: int) -> tuple[int, int]:
        slot = int(self._slots[row, variant])
        shard = bisect.bisect_right(self._starts, slot) - 1  # the shard whose slots hold it
        return shard, slot - self._starts[shard]

    def __getitems__(self, rows: Sequence[int]) -> Rows:
        """A DataLoader's batched fetch: the rows copied once into ``[B, L, D]`` / ``[B, P]`` tensors, each
        checksum computed on the copy while it is in cache (reading each row once, not twice).

        Returns per-row items (views of the batch), so any ``collate_fn`` works; ``store.collate()``
        takes the batch as it is instead of stacking the rows again.
        """
        rows = [self._check_row(r) for r in rows]
        first = self._null
        sequence = _batch_tensor((len(rows), *first.sequence.shape[1:]), first.sequence.dtype)  # [B, L, D]
        pooled = _batch_tensor((len(rows), first.pooled.shape[1]), first.pooled.dtype)  # [B, P]
        located = [self._locate(row, 0) for row in rows]
        for i in sorted(range(len(rows)), key=located.__getitem__):  # in file order: readahead helps a cold read
            seq_row, pooled_row = self._shard(located[i][0]).row(located[i][1], "", verify=False)
            sequence[i].copy_(seq_row)
            pooled[i].copy_(pooled_row)
        if self.verify_rows:  # one pass over the batch: no per-row call overhead
            got = row_checksums(sequence, pooled).tolist()
            for i, (shard, local) in enumerate(located):
                view = self._shard(shard)
                if "check" in view.tensors and got[i] != int(view.tensors["check"][local]):
                    view.verify(local, sequence[i], pooled[i], f"store row {rows[i]}, variant 0")  # raises
        items = Rows({"sequence": sequence[i], "pooled": pooled[i], "row": row} for i, row in enumerate(rows))
        items.batch = {"sequence": sequence, "pooled": pooled, "row": torch.tensor(rows)}
        return items

    def _check_row(self, row: int) -> int:
        try:
            index = row.__index__()
        except AttributeError as err:
            raise TypeError(f"store row must be an int, got {type(row).__name__}") from err
        n = len(self._slots)
        if not -n <= index < n:
            raise IndexError(f"row {index} is out of range for store {self.path} with {n} rows")
        return index % n

    def _shard(self, k: int):  # noqa: ANN202
        if self._pid != os.getpid():  # a forked DataLoader worker: never share the parent's maps
            self._handles, self._pid = OrderedDict(), os.getpid()
        handle = self._handles.get(k)
        if handle is None:
            if not self._files[k].exists():
                raise FileNotFoundError(f"{self._files[k]}: removed since this EmbeddingStore was opened "
                                        f"(`clipcond gc` rewrote the store); open {self.path} again")
            handle = self._handles[k] = ShardView(self._files[k])
            if len(self._handles) > MAX_OPEN_SHARDS:
                self._handles.popitem(last=False)
        else:
            self._handles.move_to_end(k)
        return handle

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()  # spawned workers: handles are per process and cannot be pickled
        state["_handles"] = OrderedDict()
        return state

    # --- ids -----------------------------------------------------------------------------
    def row_of(self, key: str | int) -> int:
        """The input row whose id is ``key`` (ids compare as strings: ``7`` finds ``"7"``)."""
        ids = self._load_ids()
        text = str(key)
        hashes = ids["id_sorted_hash"]  # [N] sorted
        target = id_hash(text)
        pos = int(hashes.searchsorted(target))
        while pos < len(hashes) and hashes[pos] == target:
            row = int(ids["id_sorted_rows"][pos])
            if self.id_of(row) == text:
                return row
            pos += 1
        raise KeyError(f"id {key!r} is not in store {self.path} "
                       f"({len(self)} rows, ids from column {self.manifest['input']['id_column'] or '__key__'!r})")

    def by_id(self, key: str | int) -> dict[str, torch.Tensor | int]:
        """``store[store.row_of(key)]``."""
        return self[self.row_of(key)]

    def id_of(self, row: int) -> str:
        ids = self._load_ids()
        row = self._check_row(row)
        offsets = ids["id_offsets"]
        return ids["id_bytes"][offsets[row] : offsets[row + 1]].decode()

    def _load_ids(self) -> dict[str, object]:
        if self._ids is None:
            if not self.manifest.get("has_ids", bool(self.manifest["input"].get("id_column"))):
                raise ValueError(f"store {self.path} has no ids: it was precomputed without --id-column; "
                                 "index it by row number instead")
            if not self._index.exists():
                raise FileNotFoundError(f"{self._index}: removed since this EmbeddingStore was opened "
                                        f"(`clipcond gc` rewrote the store); open {self.path} again")
            ids = read_tensors(self._index, ["id_bytes", "id_offsets", "id_sorted_hash", "id_sorted_rows"])
            # numpy arrays and one bytes object: per-lookup costs of well under a microsecond each.
            self._ids = {"id_bytes": ids["id_bytes"].numpy().tobytes(), **{k: ids[k].numpy() for k in
                                                                         ("id_offsets", "id_sorted_hash",
                                                                          "id_sorted_rows")}}
        return self._ids

    # --- null, dropout, verification ----------------------------------------------------
    def null(self, batch_size: int = 1) -> Conditioning:
        """The encoder's null conditioning as stored (``""`` encoded, or SDXL's zeros), ``batch_size`` rows."""
        return Conditioning(self._null.sequence.repeat(batch_size, 1, 1), self._null.pooled.repeat(batch_size, 1))

    def collate(self, drop_prob: float = 0.0, *, seed: int = 0, epoch: int = 0,
                variant: int | Literal["random"] = 0) -> CaptionDropout:
        """A DataLoader ``collate_fn`` dropping rows to the stored null; see ``CaptionDropout``.

        ``variant="random"``: each row gets one of its caption variants, chosen per (seed, epoch, row).
        """
        if variant != "random" and not (isinstance(variant, int) and 0 <= variant < self.variants):
            raise ValueError(f"variant must be 'random' or in [0, {self.variants}), got {variant!r}")
        null = self._null
        return CaptionDropout(null.sequence[0], null.pooled[0], drop_prob=drop_prob, seed=seed, epoch=epoch,
                              variant=variant, store=self if variant != 0 else None)

    def verify(self) -> None:
        """Check every file's size and sha256 (reads the whole store); ``ValueError`` naming bad files."""
        _raise_problems(self.path, store_problems(self.path, self.manifest, checksums=True))


def _batch_tensor(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An empty batch tensor; in a DataLoader worker, straight in shared memory (as default_collate makes
    its batches), so that handing it to the main process copies nothing."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    storage = torch.empty(0, dtype=dtype)._typed_storage()._new_shared(math.prod(shape))
    return torch.empty(0, dtype=dtype).new(storage).view(shape)


class Rows(list):
    """``EmbeddingStore.__getitems__``'s items, with ``batch``: the same rows already stacked."""

    batch: dict[str, torch.Tensor]


@dataclass
class CaptionDropout:
    """``collate_fn`` for store items: ``default_collate``, then rows replaced by the null conditioning.

    Row ``r`` is dropped in epoch ``e`` when ``u(seed, e, r) < drop_prob``, ``u`` a hash-based
    uniform in [0, 1): the choice depends on nothing else (not batch size, shuffling, worker count),
    so it is reproducible and changes every epoch. ``variant="random"`` picks each row's caption
    variant the same way (an independent uniform per (seed, epoch, row)). Call ``set_epoch(e)`` before iterating the
    DataLoader each epoch; workers copy the collate_fn when an epoch's iterator starts, so with
    ``persistent_workers=True`` build a new DataLoader (or collate) per epoch instead.
    The batch gains ``"dropped"`` ``[B]`` bool.
    """

    null_sequence: torch.Tensor  # [L, D]
    null_pooled: torch.Tensor  # [P]
    drop_prob: float = 0.0
    seed: int = 0
    epoch: int = 0
    variant: int | Literal["random"] = 0  # which caption variant each row gets (store items are variant 0)
    store: EmbeddingStore | None = None  # reads the other variants

    def __post_init__(self) -> None:
        if not 0.0 <= self.drop_prob <= 1.0:
            raise ValueError(f"drop_prob must be in [0, 1], got {self.drop_prob}")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _uniform(self, rows: Sequence[int] | torch.Tensor, salt: str = "") -> list[float]:
        rows = rows.tolist() if isinstance(rows, torch.Tensor) else list(rows)
        return [int.from_bytes(hashlib.blake2b(f"{self.seed}/{self.epoch}/{r}{salt}".encode(), digest_size=8)
                               .digest(), "little") / 2**64 for r in rows]

    def dropped(self, rows: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """``[B]`` bool: which of these input rows this epoch replaces by the null conditioning."""
        return torch.tensor(self._uniform(rows), dtype=torch.float64) < self.drop_prob

    def variants(self, rows: Sequence[int] | torch.Tensor) -> list[int]:
        """The caption variant of each row this epoch: fixed, or uniform per (seed, epoch, row)."""
        if self.variant != "random":
            return [self.variant] * len(rows)
        k = self.store.variants
        return [min(int(u * k), k - 1) for u in self._uniform(rows, "/variant")]

    def __call__(self, items: list[dict]) -> dict:
        missing = {"sequence", "pooled", "row"} - set(items[0]) if items else set()
        if missing:
            raise TypeError(f"CaptionDropout needs items with 'sequence', 'pooled' and 'row' (EmbeddingStore "
                            f"items), got keys {sorted(items[0])}")
        if self.store is not None:  # items are variant 0: read the chosen variants instead
            items = [self.store.get(item["row"], v) if v else item
                     for item, v in zip(items, self.variants([item["row"] for item in items]), strict=True)]
        # A batched fetch stacked the rows already: take its tensors rather than copying every row again.
        batch = dict(items.batch) if isinstance(items, Rows) else default_collate(items)
        mask = self.dropped(batch["row"])  # [B]
        if mask.any():
            batch["sequence"][mask] = self.null_sequence.to(batch["sequence"].dtype)
            batch["pooled"][mask] = self.null_pooled.to(batch["pooled"].dtype)
        batch["dropped"] = mask
        return batch
