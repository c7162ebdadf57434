"""The webdataset tar reader (clipcond/precompute/tar.py) fuzzed: mutated tars, plain and gzip.

Each mutated tar must give either a ``ValueError`` naming the tar, or exactly the samples webdataset itself
reads from it (its tar iterator over ``tarfile``'s ``r|*`` and ``group_by_keys``); never another exception
type, a hang, a read request past what the file holds, or memory that follows a lying size field. The
known failures first, through the CLI: each names the bug it catches.
"""

from __future__ import annotations

import gzip
import io
import json
import re
import tarfile
import tracemalloc
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from clipcond.cli import main
from clipcond.precompute import tar
from clipcond.precompute.tar import BLOCK, members, samples
from clipcond.store.manifest import MANIFEST

WANTED = {"txt", "json"}
FORMATS = {"ustar": tarfile.USTAR_FORMAT, "gnu": tarfile.GNU_FORMAT, "pax": tarfile.PAX_FORMAT}
FUZZ = settings(max_examples=150, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
MEMORY = 4 * 2**20  # the reader's peak on these small tars: a few chunks, never what a size field claims


def tar_bytes(fmt: str, pax: dict[str, str] | None = None, at: int = 1) -> bytes:
    """Four samples as img2dataset writes them (jpg, txt, json); ``pax`` records on member ``at`` (pax only)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=FORMATS[fmt]) as tar:
        i = 0
        for n in range(4):
            key = f"{n:06d}" if n != 2 or fmt == "ustar" else "shard/" + "long-" * 22 + f"{n:06d}"  # over 100
            for ext, data in (("jpg", bytes([n]) * (700 + n)), ("txt", f"caption {n}".encode()),
                              ("json", json.dumps({"caption": f"caption {n}", "n": n}).encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                if pax is not None and i == at:
                    info.pax_headers = pax
                tar.addfile(info, io.BytesIO(data))
                i += 1
    return buffer.getvalue()


def headers(data: bytes) -> list[int]:
    """Where each member's own header starts (pax and GNU long-name headers passed over), by the size fields."""
    found, pos = [], 0
    while pos + BLOCK <= len(data) and data[pos : pos + BLOCK] != bytes(BLOCK):
        if data[pos + 156 : pos + 157] not in (b"x", b"g", b"L", b"K"):
            found.append(pos)
        pos += BLOCK + -(-int(data[pos + 124 : pos + 136].strip(b"\0 ") or b"0", 8) // BLOCK) * BLOCK
    return found


def with_checksum(data: bytearray, at: int) -> None:
    """Recompute the header checksum at ``at`` (the field summed as 8 spaces), as a writer would."""
    block = data[at : at + BLOCK]
    data[at + 148 : at + 156] = b"%06o\0 " % (sum(block[:148]) + 256 + sum(block[156:]))


def reference(path: Path) -> list[tuple[str, dict[str, bytes]]]:
    """What webdataset reads: each sample's key and its txt / json members."""
    from webdataset.tariterators import group_by_keys, tar_file_expander

    with open(path, "rb") as stream:
        found = list(group_by_keys(tar_file_expander([{"url": str(path), "stream": stream}])))
    return [(s["__key__"], {k: s[k] for k in WANTED if k in s}) for s in found]


def ours(path: Path) -> tuple[list[tuple[str, dict[str, bytes]]] | None, int]:
    """clipcond's samples (None: a ValueError naming the tar), and the reader's peak memory."""
    tracemalloc.start()
    try:
        result = [(key, {k: v for k, v in found.items() if k in WANTED}) for key, found in samples(path, WANTED)]
    except ValueError as err:
        assert str(path) in str(err), err
        result = None
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return result, peak


class Recording(io.BufferedReader):
    """A plain file that records each read request: (position, bytes asked for)."""

    def __init__(self, path: Path) -> None:
        super().__init__(io.FileIO(path))
        self.requests: list[tuple[int, int]] = []

    def read(self, n: int | None = -1) -> bytes:
        self.requests.append((self.tell(), -1 if n is None else n))
        return super().read(n)


def check(path: Path, size: int) -> None:
    """The property: an error naming the tar, or webdataset's samples; bounded memory and reads."""
    result, peak = ours(path)
    event("read" if result is not None else "an error naming the tar")
    assert peak < MEMORY, f"peak {peak} bytes reading a {size}-byte tar"
    if result is not None:
        assert result == reference(path)  # webdataset reads it, and reads the same
    if path.read_bytes()[:2] != b"\x1f\x8b":
        stream = Recording(path)
        try:
            for _ in members(stream, WANTED):
                pass
        except tarfile.TarError:
            pass
        finally:
            stream.close()
        total = path.stat().st_size
        assert all(0 <= n <= max(total - at, BLOCK) for at, n in stream.requests), stream.requests


SIZES = [b"77777777777\0", b"\x80" + b"\xff" * 11, b"\x80" + b"\0" * 3 + b"\2" + b"\0" * 7,  # 8 GiB, 2^88, 2^63
         b"\xff" * 12, b"00000001000\0", b"0000000001\0\0", b"9999\0\0\0\0\0\0\0\0", b"\0" * 12]
NUMBERS = [(100, b"\xff" * 8), (108, b"\x80" + b"\xff" * 7), (136, b"z" * 12), (329, b"7777777\0"), (136, b"\0" * 12)]


@st.composite
def mutated(draw: st.DrawFn) -> tuple[bytes, bool]:
    """A tar with one to three mutations; True: gzip it (the mutations then hit the tar inside, or the stream)."""
    fmt = draw(st.sampled_from(sorted(FORMATS)))
    records = [None, {"size": str(10**20)}, {"size": "0"}, {"path": "\udce9x.txt"}, {"path": "a/b/.c.txt"},
               {"size": "999999999999999999999999"}, {"size": "9" * 5000}]
    pax = draw(st.sampled_from(records)) if fmt == "pax" else None
    data = bytearray(tar_bytes(fmt, pax, draw(st.integers(0, 11))))
    at = headers(bytes(data))
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["truncate", "flip", "size", "size-fixed", "checksum", "name", "number", "type"]))
        head = draw(st.sampled_from(at))
        if kind == "truncate":
            del data[draw(st.integers(0, len(data))) :]
        elif kind == "flip" and data:
            pos = draw(st.integers(0, len(data) - 1))
            data[pos] ^= draw(st.integers(1, 255))
        elif kind.startswith("size") and head + BLOCK <= len(data):
            data[head + 124 : head + 136] = draw(st.sampled_from(SIZES))
            if kind == "size-fixed":
                with_checksum(data, head)
        elif kind == "checksum" and head + BLOCK <= len(data):
            data[head + 148 : head + 156] = draw(st.sampled_from([b"\x80" + b"\xff" * 7, b"9" * 8, b"0" * 8]))
        elif kind == "name" and head + BLOCK <= len(data):
            name = draw(st.sampled_from([b"\xe9t\xe9.txt\0", b"000001.TXT\0", b"__meta__\0", b".x.txt\0",
                                         b"a\xff.txt\0", b"000000.txt\0", b"dir/\0"]))
            data[head : head + len(name)] = name
            with_checksum(data, head)
        elif kind == "number" and head + BLOCK <= len(data):
            offset, value = draw(st.sampled_from(NUMBERS))
            data[head + offset : head + offset + len(value)] = value
            with_checksum(data, head)
        elif kind == "type" and head + BLOCK <= len(data):
            data[head + 156] = draw(st.sampled_from(b"0125SxgLK7Z"))
            with_checksum(data, head)
    compressed = draw(st.booleans())
    if compressed:
        data = bytearray(gzip.compress(bytes(data), mtime=0))
        if draw(st.booleans()):  # damage the stream itself
            pos = draw(st.integers(0, len(data) - 1))
            if draw(st.booleans()):
                del data[pos:]
            else:
                data[pos] ^= draw(st.integers(1, 255))
    return bytes(data), compressed


@FUZZ
@given(mutated())
def test_a_mutated_tar_is_an_error_naming_it_or_reads_as_webdataset_reads_it(tmp_path, case):
    data, compressed = case
    path = tmp_path / ("fuzz.tar.gz" if compressed else "fuzz.tar")  # the reader goes by content, not the name
    path.write_bytes(data)
    check(path, len(data) if not compressed else len(gzip.decompress(data)) if _whole_gzip(data) else 1 << 20)


def _whole_gzip(data: bytes) -> bool:
    try:
        gzip.decompress(data)
    except (OSError, EOFError, ValueError, Exception):  # noqa: BLE001 (any damage: size it generously)
        return False
    return True


@pytest.mark.parametrize("fmt", sorted(FORMATS))
@pytest.mark.parametrize("compressed", [False, True])
def test_unmutated_tars_read_as_webdataset_reads_them(tmp_path, fmt, compressed):
    data = tar_bytes(fmt)
    path = tmp_path / "t.tar"
    path.write_bytes(gzip.compress(data) if compressed else data)
    result, _ = ours(path)
    assert result == reference(path) and len(result) == 4


# --- the known failures, through the CLI ------------------------------------------------------------
def precompute(capsys, path: Path, out: Path) -> tuple[int, str]:
    code = main(["precompute", "--encoder", "tiny-sd15", "--input", str(path), "--column", "txt", "--out", str(out)])
    return code, capsys.readouterr().err


@pytest.mark.parametrize(("lie", "message"), [
    ({"size": str(10**20)}, r"member '000000.txt' claims 100000000000000000000 bytes, the file has \d+ left"),
    ({"size": str(2**63)}, r"member '000000.txt' claims 9223372036854775808 bytes"),
    ({"size": "9" * 5000}, r"damaged pax header record at byte 0"),  # past int()'s 4300 digits: ValueError
])
@pytest.mark.parametrize("compressed", [False, True])
def test_a_lying_member_size_is_an_error_naming_the_tar_not_an_allocation(tmp_path, capsys, lie, message,
                                                                          compressed):
    """Issue 17, section 4 (tar): a pax ``size`` record of 10^20 made the reader allocate the claimed size before
    checking it (OverflowError / MemoryError, uncaught: a traceback); one of 5000 digits raised int()'s ValueError."""
    data = tar_bytes("pax", lie, at=1)  # sample 0's txt
    path = tmp_path / "00000.tar"
    path.write_bytes(gzip.compress(data) if compressed else data)
    code, err = precompute(capsys, path, tmp_path / "store")
    assert code == 2 and "00000.tar: truncated or damaged tar at sample '000000'" in err, err
    if not compressed:  # a compressed stream's length is unknown until read through: "cut short" there
        assert re.search(message, err), err
    assert not (tmp_path / "store" / MANIFEST).exists()


@pytest.mark.parametrize("compressed", [False, True])
def test_a_member_read_into_memory_is_bounded_whatever_the_file_holds(tmp_path, capsys, monkeypatch, compressed):
    """Bug: a size field that lies within the file (a plain tar) or that no file size bounds (a compressed one:
    read until the stream ends) decided how much was read into memory: a 200 MiB pax size on a caption member
    peaked at 400 MiB. Caption members and headers are read up to MAX_READ (64 MiB; 64 bytes here)."""
    monkeypatch.setattr(tar, "MAX_READ", 64)
    data = tar_bytes("pax", {"size": "100"}, at=1)  # sample 0's txt claims 100 bytes, within the file
    path = tmp_path / "00000.tar"
    path.write_bytes(gzip.compress(data) if compressed else data)
    code, err = precompute(capsys, path, tmp_path / "store")
    assert code == 2 and "00000.tar: truncated or damaged tar at sample '000000'" in err, err
    assert "member '000000.txt' claims 100 bytes; clipcond reads caption members and headers of at most" in err, err


def test_a_non_utf8_sample_key_is_an_error_naming_the_tar_and_the_member(tmp_path, capsys):
    """Issue 17, section 4 (tar): a member named with a Latin-1 byte failed in the scan with "'utf-8' codec can't
    encode character '\\udce9'", naming no tar."""
    data = bytearray(tar_bytes("ustar"))
    at = headers(bytes(data))[3]  # sample 1's jpg: its key
    data[at : at + 6] = b"00\xe901"
    with_checksum(data, at)
    path = tmp_path / "00000.tar"
    path.write_bytes(bytes(data))
    code, err = precompute(capsys, path, tmp_path / "store")
    assert code == 2 and re.search(r"00000.tar: member b'00\\xe901.jpg': its sample key is not UTF-8 \(byte 0xe9\)",
                                   err), err
    assert not (tmp_path / "store" / MANIFEST).exists()


def test_a_damaged_gzip_stream_is_an_error_naming_the_tar(tmp_path, capsys):
    """A flipped byte inside a .tar.gz's deflate stream raised zlib.error, which nothing caught: a traceback."""
    data = bytearray(gzip.compress(tar_bytes("gnu"), mtime=0))
    data[10] ^= 0xFF  # the first byte of the deflate stream, after gzip's 10-byte header
    path = tmp_path / "00000.tar"
    path.write_bytes(bytes(data))
    with pytest.raises(zlib.error), gzip.open(path) as f:
        f.read()
    code, err = precompute(capsys, path, tmp_path / "store")
    assert code == 2 and "00000.tar: truncated or damaged tar" in err, err
    assert not (tmp_path / "store" / MANIFEST).exists()
