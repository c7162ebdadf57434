"""Files written whole or not at all, and safetensors bytes: the leaf helpers of stores and weights.

``atomic_write``: a temporary name, fsync, rename, fsync of the folder, so that a file under its
final name is always whole. ``safetensors_header`` / ``raw_bytes``: safetensors files written piece
by piece (the precompute writer) and read into tensors without a copy (encoders/weights.py).
``read_safetensors_header``: the one reader of safetensors headers, strict about damaged files.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

TMP_MARK = ".tmp-"  # ".<final name>.tmp-<pid>": what a killed writer leaves behind


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


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


SAFETENSORS_MAX_HEADER = 100_000_000  # bytes: the safetensors library's own limit (MAX_HEADER_SIZE)
SAFETENSORS_CODES = {code: dtype for dtype, code in SAFETENSORS_DTYPES.items()}
SAFETENSORS_CODES.update({"F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2})  # fp8 text encoders


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """Where a tensor of a safetensors file lies: ``begin:end`` relative to the data, after the header."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True, slots=True)
class SafetensorsHeader:
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_start: int  # 8 + the header's length: byte offset of the data in the file


def read_safetensors_header(f: BinaryIO, path: object) -> SafetensorsHeader:
    """The header of the safetensors file open as ``f``, checked against the file before anything is trusted.

    The one reader of safetensors headers (weights and store shards). Holds the rules the safetensors
    library holds, so that a damaged or hostile file is a ``ValueError`` naming ``path`` (and the tensor),
    never another exception, an allocation of what a length field claims, or bytes of a neighbour tensor:
    the header length fits the file and the library's 100 MB; the header is a UTF-8 JSON object; each tensor
    has a known dtype, a shape of non-negative ints that torch can allocate and two data offsets that fit the
    data and match dtype and shape; the tensors tile the data.
    """
    size = f.seek(0, os.SEEK_END)
    f.seek(0)
    n = int.from_bytes(f.read(8), "little")
    if size < 8 or not 2 <= n <= size - 8:
        raise ValueError(f"{path}: not a safetensors file: header length {n} does not fit the file's {size} bytes")
    if n > SAFETENSORS_MAX_HEADER:
        raise ValueError(f"{path}: not a safetensors file: header length {n} is over the {SAFETENSORS_MAX_HEADER} "
                         "bytes the safetensors library reads")
    try:
        header = json.loads(f.read(n).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as err:  # JSONDecodeError is a ValueError
        raise ValueError(f"{path}: not a safetensors file: its header is not UTF-8 JSON ({err})") from err
    if not isinstance(header, dict):
        raise ValueError(f"{path}: not a safetensors file: its header is JSON {type(header).__name__}, not an object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError(f"{path}: safetensors __metadata__ must map strings to strings, got {metadata!r:.200}")
    data = size - 8 - n
    tensors = {name: _tensor_info(name, info, data, path) for name, info in header.items()}
    _check_tiling(tensors, data, path)
    return SafetensorsHeader(tensors, metadata, 8 + n)


def read_tensor(f: BinaryIO, header: SafetensorsHeader, name: str, path: object) -> torch.Tensor:
    """Tensor ``name`` of the file open as ``f`` (its ``header``), read straight into its own memory."""
    info = header.tensors[name]
    out = torch.empty(info.shape, dtype=info.dtype)
    f.seek(header.data_start + info.begin)
    if info.end > info.begin and f.readinto(raw_bytes(out)) != info.end - info.begin:
        raise ValueError(f"{path}: safetensors tensor {name!r} is cut short: the file changed while it was read")
    return out


def read_tensors(source: Path | bytes, names: Iterable[str] | None = None, *, path: object = None
                 ) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file or of its bytes (all, or ``names``), through ``read_safetensors_header``;
    a missing tensor is a ``ValueError`` naming it. ``path``: the name messages give bytes (default: the file)."""
    path = path if path is not None else "<bytes>" if isinstance(source, bytes) else source
    with io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb") as f:
        header = read_safetensors_header(f, path)
        missing = sorted(set(names or ()) - set(header.tensors))
        if missing:
            raise ValueError(f"{path}: no safetensors tensor {missing[0]!r} (it has {sorted(header.tensors)})")
        return {name: read_tensor(f, header, name, path) for name in (header.tensors if names is None else names)}


def _check_tiling(tensors: dict[str, TensorInfo], data: int, path: object) -> None:
    """Tensors lie back to back from the first data byte to the last, as the safetensors library requires: a
    header length or offsets off by a few bytes would otherwise read shifted bytes, or a neighbour's, silently."""
    end, last = 0, None
    for name, info in sorted(tensors.items(), key=lambda item: (item[1].begin, item[1].end)):
        if info.begin < end:
            raise ValueError(f"{path}: safetensors tensors {last!r} and {name!r} overlap (damaged header)")
        if info.begin > end:
            raise ValueError(f"{path}: safetensors tensor {name!r} starts at data byte {info.begin}, expected {end}: "
                             "safetensors writes tensors back to back from byte 0 (damaged header)")
        end, last = info.end, name
    if tensors and end != data:  # a file of no tensors is the caller's to judge
        raise ValueError(f"{path}: the safetensors tensors end at data byte {end} of {data}: a wrong header length "
                         "or data_offsets (damaged header)")


def _tensor_info(name: str, info: object, data: int, path: object) -> TensorInfo:
    def bad(why: str) -> ValueError:
        return ValueError(f"{path}: safetensors tensor {name!r}: {why} (damaged header)")

    if not isinstance(info, dict):
        raise bad(f"entry is a JSON {type(info).__name__}, not an object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_CODES:
        raise bad(f"unknown dtype {dtype!r:.40}")
    ints = (lambda v: isinstance(v, list) and all(type(x) is int and x >= 0 for x in v))  # noqa: E731 (not bool)
    if not ints(shape):
        raise bad(f"shape must be a list of non-negative ints, got {shape!r:.80}")
    if not ints(offsets) or len(offsets) != 2 or not offsets[0] <= offsets[1] <= data:
        raise bad(f"data_offsets must be [begin, end] within the file's {data} data bytes, got {offsets!r:.80}")
    dtype = SAFETENSORS_CODES[dtype]
    if offsets[1] - offsets[0] != dtype.itemsize * math.prod(shape):
        raise bad(f"{offsets[1] - offsets[0]} bytes at {offsets} do not hold {dtype} {shape}")
    if math.prod(max(d, 1) for d in shape) >= 1 << 63:  # an empty tensor's other dimensions: torch's strides are int64
        raise bad(f"shape {shape} is too large for torch")
    return TensorInfo(dtype, tuple(shape), offsets[0], offsets[1])


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


def file_chunks(path: Path, chunk: int = 1 << 24) -> Iterator[bytes]:
    """A file's bytes in pieces (copying a file into another without holding it)."""
    with open(path, "rb") as f:
        while block := f.read(chunk):
            yield block


def write_streamed(root: Path, name: str, tensors: dict[str, tuple[torch.dtype, tuple[int, ...], Iterable]],
                   metadata: dict[str, str] | None = None) -> dict[str, object]:
    """``write_tensors`` for tensors too big to hold twice: each given as (dtype, shape, its bytes in pieces).

    Written atomically, as ``atomic_write``; returns the file's manifest entry (size and sha256).
    """
    path, digest, size = root / name, hashlib.sha256(), 0
    tmp = temporary(path)

    def put(data: memoryview | bytes) -> None:
        nonlocal size
        f.write(data)
        digest.update(data)
        size += len(data)

    try:
        with open(tmp, "wb") as f:
            put(safetensors_header({k: (dtype, shape) for k, (dtype, shape, _) in tensors.items()}, metadata or {}))
            for key, (dtype, shape, pieces) in tensors.items():
                start, expected = size, dtype.itemsize * int(torch.Size(shape).numel())
                for piece in map(memoryview, pieces):
                    if piece.nbytes:  # an empty array's view has no bytes to cast
                        put(piece.cast("B"))
                if size - start != expected:
                    raise ValueError(f"{path}: tensor {key!r} got {size - start} bytes, its shape {list(shape)} "
                                     f"needs {expected}")
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)  # a killed process leaves it for the next run to remove; an error does not
        raise
    publish(tmp, path)
    return {"file": name, "bytes": size, "sha256": digest.hexdigest()}


ID_HASH_DTYPE = np.dtype("<i8")  # an id's hash: its 8-byte blake2b digest read as a little-endian signed int64


def id_digest(key: str | bytes) -> bytes:
    """The 8 bytes an id hashes to (stable across processes and machines, unlike Python's salted ``hash``)."""
    return hashlib.blake2b(key.encode() if isinstance(key, str) else key, digest_size=8).digest()


def id_hashes(digests: bytes | np.ndarray) -> np.ndarray:
    """[n] int64 hashes of ``id_digest`` outputs laid end to end: the one reading of a digest as a number,
    with an explicit byte order, so that the hash does not depend on the machine that computes it."""
    return np.frombuffer(digests, dtype=ID_HASH_DTYPE).astype(np.int64)


def id_hash(key: str | bytes) -> int:
    """The hash of one id, as ``id_hashes`` reads it."""
    return int(id_hashes(id_digest(key))[0])
