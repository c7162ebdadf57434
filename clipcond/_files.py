"""Files written whole or not at all, and safetensors bytes: the leaf helpers of stores and weights.

``atomic_write``: a temporary name, fsync, rename, fsync of the folder, so that a file under its
final name is always whole. ``safetensors_header`` / ``raw_bytes``: safetensors files written piece
by piece (the precompute writer) and read into tensors without a copy (weights.py).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

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

    with open(tmp, "wb") as f:
        put(safetensors_header({k: (dtype, shape) for k, (dtype, shape, _) in tensors.items()}, metadata or {}))
        for key, (dtype, shape, pieces) in tensors.items():
            start, expected = size, dtype.itemsize * int(torch.Size(shape).numel())
            for piece in map(memoryview, pieces):
                if piece.nbytes:  # an empty array's view has no bytes to cast
                    put(piece.cast("B"))
            if size - start != expected:
                raise ValueError(f"{path}: tensor {key!r} got {size - start} bytes, its shape {list(shape)} needs "
                                 f"{expected}")
        f.flush()
        os.fsync(f.fileno())
    publish(tmp, path)
    return {"file": name, "bytes": size, "sha256": digest.hexdigest()}


def write_json(path: Path, obj: object) -> None:
    atomic_write(path, json.dumps(obj, indent=1).encode())


def id_hash(key: str | bytes) -> int:
    """A stable signed 64-bit hash of an id (Python's ``hash`` is salted per process)."""
    data = key.encode() if isinstance(key, str) else key
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little", signed=True)
