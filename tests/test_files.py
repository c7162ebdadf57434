"""clipcond/_files.py: the id hash every store agrees on, and the one safetensors header reader."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from clipcond._files import id_digest, id_hash, id_hashes, read_safetensors_header

# blake2b with an 8-byte digest (RFC 7693), as `b2sum -l 64` prints it, and that digest read little-endian as
# a signed 64-bit integer. Written out, not computed: a reading in the machine's own byte order would pass on
# x86 and ARM and fail on a big-endian machine; a change of hash or byte order fails here everywhere.
KNOWN = [("000000042", "719c02ca743e20df", -2368824732670583695),
         ("sample/0001", "85f3131dcd97e2ae", -5844942459161545851)]


@pytest.mark.parametrize(("key", "digest", "value"), KNOWN)
def test_id_hash_is_the_little_endian_blake2b_64_of_the_id(key, digest, value):
    """Catches an id hash that depends on the machine (native int64 views of the digests) or on the process."""
    assert id_digest(key).hex() == digest
    assert id_hash(key) == id_hash(key.encode()) == value
    assert int.from_bytes(bytes.fromhex(digest), "little", signed=True) == value  # the literal itself is consistent


def test_id_hashes_reads_digests_written_end_to_end_as_one_hash_each():
    """Catches the scan's digests (written raw, end to end) read back in another order or width than lookups."""
    digests = b"".join(bytes.fromhex(d) for _, d, _ in KNOWN)
    hashes = id_hashes(digests)
    assert hashes.dtype == np.int64 and hashes.tolist() == [v for _, _, v in KNOWN]
    assert id_hashes(np.frombuffer(digests, dtype=np.uint8)).tolist() == hashes.tolist()


def _file(tmp_path, tensors, metadata=None):
    path = tmp_path / "t.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    return path


def test_header_reader_agrees_with_safetensors_on_a_valid_file(tmp_path):
    """Catches a reader that misplaces tensors: every name, dtype, shape, offset and the metadata as
    safetensors reads them (bf16 and bool included)."""
    tensors = {"a": torch.randn(3, 4), "b": torch.ones(2, dtype=torch.bfloat16), "c": torch.zeros(0, 5),
               "d": torch.tensor([True, False])}
    path = _file(tmp_path, tensors, {"k": "v"})
    with open(path, "rb") as f:
        header = read_safetensors_header(f, path)
        data = path.read_bytes()
    with safe_open(str(path), "pt") as ref:
        assert header.metadata == ref.metadata() and set(header.tensors) == set(ref.keys())
        for name in ref.keys():
            info, expected = header.tensors[name], ref.get_tensor(name)
            assert (info.dtype, info.shape) == (expected.dtype, tuple(expected.shape))
            raw = data[header.data_start + info.begin : header.data_start + info.end]
            assert raw == expected.contiguous().view(torch.uint8).numpy().tobytes()


def _rewrite(path, edit) -> None:
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = edit(json.loads(data[8 : 8 + n]))
    text = json.dumps(header).encode()
    text += b" " * (n - len(text)) if len(text) <= n else b""
    path.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + n :])


@pytest.mark.parametrize(("edit", "message"), [
    (lambda h: [1, 2], "JSON list, not an object"),
    (lambda h: {**h, "a": {**h["a"], "data_offsets": [0]}}, r"'a': data_offsets must be \[begin, end\]"),
    (lambda h: {**h, "b": {**h["b"], "data_offsets": [0, 8]}}, "'b' and 'a' overlap"),
    (lambda h: {**h, "a": {**h["a"], "shape": [2, 4], "data_offsets": [0, 32]}},
     "'b' starts at data byte 48, expected 32"),
    (lambda h: {**h, "a": {**h["a"], "dtype": ["F32"]}}, "'a': unknown dtype"),
    (lambda h: {**h, "a": {**h["a"], "shape": [-1, 4]}}, "'a': shape must be a list of non-negative ints"),
    (lambda h: {**h, "a": {**h["a"], "dtype": "Q9"}}, "'a': unknown dtype"),
    (lambda h: {**h, "a": {**h["a"], "data_offsets": [0, 10**20]}}, "'a': data_offsets"),
    (lambda h: {**h, "a": {**h["a"], "shape": [4, 4]}}, "'a': 48 bytes at"),
])
def test_header_reader_refuses_what_safetensors_refuses_naming_file_and_tensor(tmp_path, edit, message):
    """Catches damaged headers read as something else (a neighbour's bytes, a wrong shape, an AttributeError)."""
    path = _file(tmp_path, {"a": torch.zeros(3, 4), "b": torch.ones(2)})
    _rewrite(path, edit)
    with pytest.raises(Exception):  # noqa: B017, PT011 (the reference: safetensors refuses it, its own way)
        with safe_open(str(path), "pt") as ref:
            [ref.get_tensor(k) for k in ref.keys()]
    with open(path, "rb") as f, pytest.raises(ValueError, match=message) as err:
        read_safetensors_header(f, path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("length", [2**64 - 1, 2**40, 0])
def test_header_length_is_bounded_by_the_file_before_anything_is_read(tmp_path, length):
    """Catches a lying 8-byte header length allocated before it is checked (MemoryError, OverflowError)."""
    path = _file(tmp_path, {"a": torch.zeros(3)})
    path.write_bytes(struct.pack("<Q", length) + path.read_bytes()[8:])
    with open(path, "rb") as f, pytest.raises(ValueError, match=f"header length {length} does not fit"):
        read_safetensors_header(f, path)


def test_a_header_length_within_a_large_file_is_bounded_by_the_librarys_limit(tmp_path):
    """Bug: a header length that fits the file (the file's size minus a few bytes) made the reader read that much
    before it parsed anything: a 15.6 MB file peaked at 46.7 MB, a 6.9 GB checkpoint would have read gigabytes.
    safetensors refuses headers over 100 MB (MAX_HEADER_SIZE); so does clipcond, before reading one."""
    import tracemalloc

    path = tmp_path / "large.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", 150_000_000) + b"{")
        f.truncate(150_000_100)  # sparse: no disk is spent
    with pytest.raises(Exception, match="header"):  # the library's own verdict on the same file
        safe_open(str(path), "pt")
    tracemalloc.start()
    try:
        with open(path, "rb") as f, pytest.raises(ValueError, match=r"large.safetensors: not a safetensors file: "
                                                  r"header length 150000000 is over the 100000000 bytes"):
            read_safetensors_header(f, path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000, peak
