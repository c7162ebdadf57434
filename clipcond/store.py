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

import hashlib
import json
import logging
import os
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset, default_collate

from clipcond.conditioning import Conditioning
from clipcond.specs import EncoderSpec, spec_from_dict

logger = logging.getLogger(__name__)

FORMAT = "clipcond-embeddings"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
INDEX = "index.safetensors"
NULL = "null.safetensors"
TMP_MARK = ".tmp-"  # ".<final name>.tmp-<pid>": what a killed writer leaves behind
MAX_OPEN_SHARDS = 64  # memory maps kept open per process (DataLoader worker)
REPAIR_HINT = "delete the damaged file(s) and rerun the same `clipcond precompute` command to re-encode them"


def shard_name(k: int) -> str:
    return f"shard-{k:05d}.safetensors"


# --- files ------------------------------------------------------------------------------
def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


class StoreLock:
    """One writer per store: an exclusive ``flock`` on ``OUT/.clipcond.lock``.

    The kernel drops it when the process ends, however it ends (SIGKILL included), so a killed
    run never blocks its rerun. Where the filesystem has no locks (or there is no ``fcntl``), the
    run goes on unlocked, with a warning.
    """

    NAME = ".clipcond.lock"

    def __init__(self, folder: Path) -> None:
        self.folder, self.path, self.fd = folder, folder / self.NAME, None

    def acquire(self) -> None:
        try:
            import fcntl
        except ImportError:  # Windows
            logger.warning("%s: no file locks on this platform; run one precompute per store at a time", self.folder)
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
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


def temporary(path: Path) -> Path:
    """Where ``path`` is written before it is renamed into place (cleaned up by the next run)."""
    return path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")


def publish(tmp: Path, path: Path) -> None:
    """Rename a written, fsynced ``tmp`` over ``path`` and fsync the folder."""
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename itself must survive a power cut, not only the bytes
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file, fsync it, rename it over ``path``, fsync the folder."""
    tmp = temporary(path)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    publish(tmp, path)


def file_entry(name: str, data: bytes) -> dict[str, object]:
    """The manifest entry of a file: name, size and sha256 (what verification checks)."""
    return {"file": name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def write_file(root: Path, name: str, data: bytes) -> dict[str, object]:
    """``atomic_write`` and the file's manifest entry."""
    atomic_write(root / name, data)
    return file_entry(name, data)


SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                      torch.uint8: "U8", torch.bool: "BOOL"}


def safetensors_header(tensors: dict[str, tuple[torch.dtype, tuple[int, ...]]], metadata: dict[str, str]) -> bytes:
    """The header of a safetensors file holding ``tensors`` (name: dtype, shape) back to back in this order.

    For files written piece by piece (their shapes known up front); any safetensors reader opens them.
    """
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for name, (dtype, shape) in tensors.items():
        size = dtype.itemsize * int(torch.Size(shape).numel())
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    return len(text).to_bytes(8, "little") + text


def raw_bytes(tensor: torch.Tensor) -> memoryview:
    """A CPU tensor's bytes in memory order (bfloat16 included), without a copy when contiguous."""
    return memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())


def tensor_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)


def write_tensors(root: Path, name: str, tensors: dict[str, torch.Tensor]) -> dict[str, object]:
    return write_file(root, name, tensor_bytes(tensors))


def write_json(path: Path, obj: object) -> None:
    atomic_write(path, json.dumps(obj, indent=1).encode())


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
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: store format version {manifest.get('format_version')} (clipcond "
                         f"{manifest.get('clipcond_version')}); this clipcond reads version {FORMAT_VERSION}")
    return manifest


def id_hash(key: str | bytes) -> int:
    """A stable signed 64-bit hash of an id (Python's ``hash`` is salted per process)."""
    data = key.encode() if isinstance(key, str) else key
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little", signed=True)


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
    return [
        f"{root}: clipcond embedding store (format {m['format_version']}, clipcond {m['clipcond_version']}), "
        + ("complete" if m["complete"] else "INCOMPLETE"),
        f"  encoder {m['encoder']['name']}: sequence {seq}, pooled [{m['pooled_dim']}], {m['dtype']}; "
        f"weights fingerprint {m['fingerprint'][:16]}",
        f"  rows {rows}: {unique} unique ({100 * (rows - unique) / rows:.1f}% duplicates), {ids}",
        f"  input {inp['path']} column {inp['column']!r}, sha256 {inp['sha256'][:16]}",
        f"  shards {len(m['shards'])}/{m['num_shards']} of up to {m['shard_size']} embeddings, {_size(disk)} on disk; "
        f"{m.get('truncated', 0)} unique captions truncated to {seq[0]} tokens",
    ]


def inspect_store(root: Path) -> tuple[list[str], list[str]]:
    """``(description lines, problems)`` after checking every file's size and sha256."""
    manifest = read_manifest(Path(root))
    return describe_store(Path(root), manifest), store_problems(Path(root), manifest, checksums=True, progress=True)


# --- reading ----------------------------------------------------------------------------
def _open_shard(path: Path):  # noqa: ANN202 (safetensors' handle type is private)
    from safetensors import safe_open

    try:
        return safe_open(str(path), framework="pt")
    except Exception as err:  # SafetensorError derives from Exception only
        raise ValueError(f"{path}: not a readable safetensors shard ({err}); {REPAIR_HINT}") from err


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

    def __init__(self, path: str | os.PathLike[str], *, verify: bool = False) -> None:
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        _raise_problems(self.path, store_problems(self.path, self.manifest, checksums=verify))
        self._rows = read_tensors(self.path / INDEX, ["rows"])["rows"]  # [N] int64
        if len(self._rows) != self.manifest["rows"]:
            raise ValueError(f"{self.path / INDEX}: {len(self._rows)} rows, the manifest says {self.manifest['rows']}")
        null = read_tensors(self.path / NULL)
        self._null = Conditioning(null["sequence"], null["pooled"])  # [1, L, D], [1, P]
        self._files = [self.path / entry["file"] for entry in self.manifest["shards"]]
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
    def __getitem__(self, row: int) -> dict[str, torch.Tensor | int]:
        row = self._check_row(row)
        shard, local = divmod(int(self._rows[row]), self.manifest["shard_size"])
        handle = self._shard(shard)
        try:
            sequence = handle.get_slice("sequence")[local]  # [L, D]
            pooled = handle.get_slice("pooled")[local]  # [P]
        except Exception as err:
            raise ValueError(f"{self._files[shard]}: cannot read embedding {local} ({err}); {REPAIR_HINT}") from err
        return {"sequence": sequence, "pooled": pooled, "row": row}

    def _check_row(self, row: int) -> int:
        try:
            index = int(row.__index__())
        except AttributeError as err:
            raise TypeError(f"store row must be an int, got {type(row).__name__}") from err
        if not -len(self) <= index < len(self):
            raise IndexError(f"row {index} is out of range for store {self.path} with {len(self)} rows")
        return index % len(self)

    def _shard(self, k: int):  # noqa: ANN202
        if self._pid != os.getpid():  # a forked DataLoader worker: never share the parent's maps
            self._handles, self._pid = OrderedDict(), os.getpid()
        handle = self._handles.get(k)
        if handle is None:
            handle = self._handles[k] = _open_shard(self._files[k])
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
        pos = int(torch.searchsorted(hashes, torch.tensor([target]))[0])
        while pos < len(hashes) and int(hashes[pos]) == target:
            row = int(ids["id_sorted_rows"][pos])
            if self.id_of(row) == text:
                return row
            pos += 1
        raise KeyError(f"id {key!r} is not in store {self.path} "
                       f"({len(self)} rows, ids from column {self.manifest['input']['id_column']!r})")

    def by_id(self, key: str | int) -> dict[str, torch.Tensor | int]:
        """``store[store.row_of(key)]``."""
        return self[self.row_of(key)]

    def id_of(self, row: int) -> str:
        ids = self._load_ids()
        row = self._check_row(row)
        start, stop = ids["id_offsets"][row : row + 2].tolist()
        return bytes(ids["id_bytes"][start:stop].numpy()).decode()

    def _load_ids(self) -> dict[str, torch.Tensor]:
        if self._ids is None:
            if not self.manifest["input"].get("id_column"):
                raise ValueError(f"store {self.path} has no ids: it was precomputed without --id-column; "
                                 "index it by row number instead")
            self._ids = read_tensors(self.path / INDEX, ["id_bytes", "id_offsets", "id_sorted_hash", "id_sorted_rows"])
        return self._ids

    # --- null, dropout, verification ----------------------------------------------------
    def null(self, batch_size: int = 1) -> Conditioning:
        """The encoder's null conditioning as stored (``""`` encoded, or SDXL's zeros), ``batch_size`` rows."""
        return Conditioning(self._null.sequence.repeat(batch_size, 1, 1), self._null.pooled.repeat(batch_size, 1))

    def collate(self, drop_prob: float = 0.0, *, seed: int = 0, epoch: int = 0) -> CaptionDropout:
        """A DataLoader ``collate_fn`` dropping rows to the stored null; see ``CaptionDropout``."""
        null = self._null
        return CaptionDropout(null.sequence[0], null.pooled[0], drop_prob=drop_prob, seed=seed, epoch=epoch)

    def verify(self) -> None:
        """Check every file's size and sha256 (reads the whole store); ``ValueError`` naming bad files."""
        _raise_problems(self.path, store_problems(self.path, self.manifest, checksums=True))


@dataclass
class CaptionDropout:
    """``collate_fn`` for store items: ``default_collate``, then rows replaced by the null conditioning.

    Row ``r`` is dropped in epoch ``e`` when ``u(seed, e, r) < drop_prob``, ``u`` a hash-based
    uniform in [0, 1): the choice depends on nothing else (not batch size, shuffling, worker count),
    so it is reproducible and changes every epoch. Call ``set_epoch(e)`` before iterating the
    DataLoader each epoch; workers copy the collate_fn when an epoch's iterator starts, so with
    ``persistent_workers=True`` build a new DataLoader (or collate) per epoch instead.
    The batch gains ``"dropped"`` ``[B]`` bool.
    """

    null_sequence: torch.Tensor  # [L, D]
    null_pooled: torch.Tensor  # [P]
    drop_prob: float = 0.0
    seed: int = 0
    epoch: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.drop_prob <= 1.0:
            raise ValueError(f"drop_prob must be in [0, 1], got {self.drop_prob}")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def dropped(self, rows: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """``[B]`` bool: which of these input rows this epoch replaces by the null conditioning."""
        rows = rows.tolist() if isinstance(rows, torch.Tensor) else list(rows)
        u = [int.from_bytes(hashlib.blake2b(f"{self.seed}/{self.epoch}/{r}".encode(), digest_size=8).digest(),
                            "little") / 2**64 for r in rows]
        return torch.tensor(u, dtype=torch.float64) < self.drop_prob

    def __call__(self, items: list[dict]) -> dict:
        missing = {"sequence", "pooled", "row"} - set(items[0]) if items else set()
        if missing:
            raise TypeError(f"CaptionDropout needs items with 'sequence', 'pooled' and 'row' (EmbeddingStore "
                            f"items), got keys {sorted(items[0])}")
        batch = default_collate(items)
        mask = self.dropped(batch["row"])  # [B]
        if mask.any():
            batch["sequence"][mask] = self.null_sequence.to(batch["sequence"].dtype)
            batch["pooled"][mask] = self.null_pooled.to(batch["pooled"].dtype)
        batch["dropped"] = mask
        return batch
