"""The scan cache: each input file's share of the first pass, kept in the store folder.

The next run copies a file's share from here instead of reading a file that has not changed, so an update
of a store reads only new and changed files and its first pass is proportional to what changed. What an
entry holds and when it is trusted: ``ScanCache``.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from clipcond._files import TMP_MARK, publish
from clipcond.precompute.scan import FILES, RAGGED

logger = logging.getLogger(__name__)

CACHE_VERSION = 3  # bump when what a reader yields for a file changes: older entries are then read past
RACY_NS = 2 * 10**9  # a file changed this recently could change again within its times' resolution: not cached


class ScanCache:
    """Each input file's share of the scan, kept in the store folder so that an update reads only the
    files that are new or changed since: its first pass is then proportional to what changed.

    An entry (``<hash of the resolved path and the columns read>.scan``) holds what the pass wrote for the
    file (texts, keys, lengths, ids, counts), then a JSON header: the file's size, mtime, inode, device and
    ctime when it was read, its counts (rows, variants, ids), the streams' sizes, and a hash of the streams
    and of every other header field. It is used only while the file's stamp is unchanged, the sizes agree
    with each other and the counts, and the hash matches; any other entry is read past as damaged (``touch`` a file
    to have it read again; deleting the folder is always safe). Entries are published atomically; a file
    changed while it was read, or within ``RACY_NS`` of its scan, is not cached.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def entry(self, file: Path, columns: list[str], id_column: str | None) -> CacheEntry:
        resolved = file.resolve()
        name = hashlib.blake2b(json.dumps([str(resolved), columns, id_column]).encode(), digest_size=16).hexdigest()
        return CacheEntry(self.folder / f"{name}.scan", resolved, _stamp(resolved))

    def prune(self, used: set[Path], min_age: float = 60.0) -> None:
        """Remove entries but the ``used`` ones whose file is gone or changed (entries of other inputs,
        unchanged, stay), and what a killed scan left half-written (older than ``min_age`` seconds)."""
        for path in self.folder.glob("*") if self.folder.is_dir() else ():
            try:
                if TMP_MARK in path.name:
                    if time.time() - path.stat().st_mtime > min_age:
                        path.unlink(missing_ok=True)
                    continue
                if path in used:
                    continue
                with open(path, "rb") as f:
                    header = _entry_header(f, path)  # checked: its fields are there
                file = Path(header["path"]) if header else None
                if file is None or not file.is_file() or _stamp(file) != header["stamp"]:
                    path.unlink(missing_ok=True)
            except OSError:
                continue


@dataclass
class CacheEntry:
    path: Path  # the entry
    file: Path  # the input file, resolved
    stamp: list[int]  # its ``_stamp`` before it was read

    def read(self, out: dict[str, io.BufferedWriter]) -> tuple[int, int | None, bool | None, bytes] | None:
        """Append the entry's streams to the pass's files: ``(rows, variants, has ids, sha256)``; None (and the
        files as they were) if there is no whole entry for the file as it is now."""
        try:
            f = open(self.path, "rb")
        except FileNotFoundError:
            return None
        with f:
            header = _entry_header(f, self.path)
            if header is None or header["stamp"] != self.stamp:
                return None
            marks, digest = {name: stream.tell() for name, stream in out.items()}, hashlib.blake2b()
            try:
                for name in FILES:
                    _copy(f, out[name], header["bytes"][name], digest)
            except OSError:  # cut short while read (sizes were checked: only a concurrent writer does this)
                digest = None
        if digest is None or _sealed(digest, header) != header["payload"]:  # damaged: take back what was appended
            logger.warning("%s: damaged (its streams and header do not match their hash); %s is read again",
                           self.path, self.file)
            for name, stream in out.items():
                stream.seek(marks[name])
                stream.truncate()
            return None
        return header["rows"], header["variants"], header["ids"], bytes.fromhex(header["sha256"])

    def write(self, out: dict[str, io.BufferedWriter], marks: dict[str, int], rows: int, variants: int | None,
              has_ids: bool | None, sha256: bytes) -> None:
        """Save what the pass wrote for the file since ``marks`` (each stream's size before it)."""
        if _stamp(self.file) != self.stamp or time.time_ns() - max(self.stamp[1], self.stamp[4]) < RACY_NS:
            return  # changed while read, or so recently that a change right after could keep the same stamp
        for stream in out.values():
            stream.flush()
        sizes = {name: out[name].tell() - marks[name] for name in FILES}
        tmp = self.path.with_name(f".{self.path.name}{TMP_MARK}{os.getpid()}-{secrets.token_hex(4)}")  # any host
        try:
            self.path.parent.mkdir(exist_ok=True)
            with open(tmp, "wb") as f:  # the streams, then their header, then its length
                digest = hashlib.blake2b()
                for name in FILES:
                    with open(out[name].name, "rb") as stream:
                        stream.seek(marks[name])
                        _copy(stream, f, sizes[name], digest)
                fields = {"version": CACHE_VERSION, "path": str(self.file), "stamp": self.stamp, "rows": rows,
                          "variants": variants, "ids": has_ids, "sha256": sha256.hex(), "bytes": sizes}
                header = json.dumps({**fields, "payload": _sealed(digest, fields)}).encode()
                f.write(header + len(header).to_bytes(8, "little"))
                f.flush()
                os.fsync(f.fileno())
            publish(tmp, self.path)
        except OSError as err:  # a cache: the scan goes on without it
            logger.warning("%s: could not save its scan to %s (%s); it will be read again next time", self.file,
                           self.path.parent, err)
            tmp.unlink(missing_ok=True)


def _sealed(streams: hashlib.blake2b, header: dict) -> str:
    """The entry's hash: its streams', then every header field but itself (so changed counts are damage too)."""
    digest = streams.copy()
    digest.update(json.dumps({k: v for k, v in header.items() if k != "payload"}, sort_keys=True).encode())
    return digest.hexdigest()


def _stamp(file: Path) -> list[int]:
    """What changes when a file does: its size, mtime, inode, device, and ctime (which no tool sets back: a file
    replaced by one of the same size, a restored mtime and a reused inode still has a new ctime)."""
    stat = file.stat()
    return [stat.st_size, stat.st_mtime_ns, stat.st_ino, stat.st_dev, stat.st_ctime_ns]


HEADER_TYPES = {"version": int, "path": str, "stamp": list, "rows": int, "variants": (int, type(None)),
                "ids": (bool, type(None)), "sha256": str, "bytes": dict, "payload": str}


def _entry_header(f: BinaryIO, path: Path) -> dict | None:
    """An entry's header, if it is one this version wrote, of the right fields, and the file is whole."""
    try:
        total = os.fstat(f.fileno()).st_size
        f.seek(max(total - 8, 0))
        size = int.from_bytes(f.read(8), "little")
        if not 0 < size <= min(1 << 20, total - 8):
            raise ValueError(f"a header of {size} bytes in {total}")
        f.seek(total - 8 - size)
        header = json.loads(f.read(size))
        if not isinstance(header, dict) or header.get("version") != CACHE_VERSION:
            return None
        for key, kind in HEADER_TYPES.items():
            if not isinstance(header[key], kind):
                raise TypeError(f"{key} is {type(header[key]).__name__}")
        bytes.fromhex(header["sha256"])
        sizes = [header["bytes"][name] for name in FILES]
        if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in sizes):
            raise ValueError(f"stream sizes {sizes}")
        _check_sizes(header)
        f.seek(0)  # where the streams are
        return header if sum(sizes) + size + 8 == total else None
    except (ValueError, KeyError, TypeError, RecursionError) as err:
        logger.warning("%s: not a scan cache entry (%s); ignored", path, err)
        return None


def _check_sizes(header: dict) -> None:
    """The streams' sizes agree with each other and with the header's counts (each item's size, ``FILES``)."""
    sizes, rows, ids, variants = header["bytes"], header["rows"], header["ids"], header["variants"]
    captions = sizes["lengths"] // 4
    expected = {"keys": 16 * captions, "lengths": 4 * captions, "counts": 4 * rows,
                "id_lengths": 4 * rows if ids else 0, "id_hashes": 8 * rows if ids else 0}
    wrong = {name: (sizes[name], n) for name, n in expected.items() if sizes[name] != n}
    if variants is None:  # an empty file
        fits = rows == 0
    elif variants == RAGGED:
        fits = rows < captions  # each row at least one caption, some more
    else:
        fits = variants >= 1 and captions == variants * rows
    if wrong or not fits:
        raise ValueError(f"stream sizes {sizes} do not fit {rows} rows of {variants} variants (ids: {ids})")


def _copy(source: BinaryIO, target: BinaryIO, size: int, digest: hashlib.blake2b, chunk: int = 1 << 24) -> None:
    while size > 0:
        block = source.read(min(chunk, size))
        if not block:
            raise OSError(f"{source.name}: cut short")
        target.write(block)
        digest.update(block)
        size -= len(block)
