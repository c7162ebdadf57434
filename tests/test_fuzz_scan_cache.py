"""The scan cache (clipcond/precompute/scan_cache.py, ``CacheEntry``) fuzzed: a damaged entry is read past.

An entry's header says how many rows, variants and ids its streams hold; its hash covered only the streams,
so a changed count was trusted: numpy errors, or an error blaming another input file. Whatever is done to an
entry (header fields, counts, stream sizes, its length trailer, truncation, bytes), a scan that meets it
must equal a scan without the cache, array for array and byte for byte, as the scan-cache tests of
tests/test_incremental.py compare them; and a run through the CLI must publish the store an uncached run does.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clipcond.cli import main
from clipcond.precompute.scan import FILES, scan_captions
from clipcond.precompute.scan_cache import ScanCache
from clipcond.store.format import StoreFiles
from clipcond.store.manifest import MANIFEST

FUZZ = settings(max_examples=150, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
SCAN_FILES = [*FILES, "id_offsets", "id_sorted_hash", "id_sorted_rows"]


def write_inputs(folder: Path) -> list[Path]:
    """Two files: ragged lists of captions (1 to 3 a row), then pairs; ids in both."""
    folder.mkdir(parents=True, exist_ok=True)
    ragged = [[f"caption {i}", f"variant {i}", "shared"][: 1 + i % 3] for i in range(7)]
    (folder / "a.jsonl").write_text("".join(json.dumps({"c": r, "id": f"a{i}"}) + "\n" for i, r in enumerate(ragged)))
    (folder / "b.jsonl").write_text("".join(json.dumps({"c": [f"b {i}", "shared"], "id": f"b{i}"}) + "\n"
                                            for i in range(5)))
    return [folder / "a.jsonl", folder / "b.jsonl"]


def split(entry: bytes) -> tuple[bytes, dict]:
    size = int.from_bytes(entry[-8:], "little")
    return entry[: -8 - size], json.loads(entry[-8 - size : -8])


def join(streams: bytes, header: dict) -> bytes:
    text = json.dumps(header).encode()
    return streams + text + len(text).to_bytes(8, "little")


def snapshot(scan) -> dict[str, bytes]:  # noqa: ANN001
    arrays = {name: getattr(scan, name).tobytes() + str(getattr(scan, name).shape).encode()
              for name in ("rows", "keys", "spans")}
    files = {name: scan.folder.file(name).read_bytes() for name in SCAN_FILES if scan.folder.file(name).exists()}
    return {**arrays, **files, "sha256": scan.sha256.encode(), "ids": bytes([scan.has_ids])}


@pytest.fixture(scope="module")
def cached(tmp_path_factory) -> tuple[Path, list[Path], ScanCache, dict[str, bytes], dict[Path, bytes]]:
    """The inputs, their cache (both files' entries) and the scan without a cache."""
    root = tmp_path_factory.mktemp("cache")
    inputs = write_inputs(root / "data")
    cache = ScanCache(root / "cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("clipcond.precompute.scan_cache.RACY_NS", 0)  # files as a dataset's are: changed long ago
        with scan_captions(inputs, column="c", id_column="id", folder=root) as scan:
            reference = snapshot(scan)
        with scan_captions(inputs, column="c", id_column="id", folder=root, cache=cache) as scan:
            assert snapshot(scan) == reference
    entries = {path: path.read_bytes() for path in sorted(cache.folder.glob("*.scan"))}
    assert len(entries) == 2
    return root, inputs, cache, reference, entries


HEADER_VALUES = {
    "rows": [0, 1, 4, 6, 8, -1, 10**12, True, None, "7"],
    "variants": [None, -1, 1, 2, 3, 7, 0, "2"],
    "ids": [True, False, None, 1],
    "version": [1, 3, None],
    "sha256": ["00" * 32, "zz", ""],
    "stamp": [[0, 0, 0, 0, 0], [], None],
    "payload": ["00" * 64, ""],
    "path": ["/elsewhere", ""],
}


@st.composite
def damage(draw: st.DrawFn, entry: bytes) -> bytes:
    streams, header = split(entry)
    kind = draw(st.sampled_from(["field", "size", "sizes", "truncate", "flip", "trailer", "drop", "append"]))
    if kind == "field":
        field = draw(st.sampled_from(sorted(HEADER_VALUES)))
        header[field] = draw(st.sampled_from(HEADER_VALUES[field]))
        return join(streams, header)
    if kind == "size":  # one stream's size, the others kept: the streams no longer fill the file
        name = draw(st.sampled_from(sorted(FILES)))
        header["bytes"][name] += draw(st.sampled_from([-16, -8, -4, -1, 1, 4, 8, 16]))
        return join(streams, header)
    if kind == "sizes":  # bytes moved between two streams: the total still fits
        a, b = draw(st.permutations(sorted(FILES)))[:2]
        n = draw(st.sampled_from([1, 4, 8, 16, header["bytes"][a]]))
        header["bytes"][a] -= n
        header["bytes"][b] += n
        return join(streams, header)
    if kind == "drop":
        del header[draw(st.sampled_from(sorted(header)))]
        return join(streams, header)
    if kind == "truncate":
        return entry[: draw(st.integers(0, len(entry) - 1))]
    if kind == "trailer":
        return entry[:-8] + draw(st.sampled_from([0, 1, 7, len(entry), 2**63, 2**64 - 1])).to_bytes(8, "little")
    if kind == "append":
        return entry + draw(st.binary(min_size=1, max_size=64))
    data = bytearray(entry)
    for _ in range(draw(st.integers(1, 4))):
        pos = draw(st.integers(0, len(data) - 1))
        data[pos] ^= draw(st.integers(1, 255))
    return bytes(data)


@FUZZ
@given(st.data())
def test_a_damaged_cache_entry_is_read_past_and_the_scan_equals_an_uncached_one(cached, monkeypatch, data):
    root, inputs, cache, reference, entries = cached
    monkeypatch.setattr("clipcond.precompute.scan_cache.RACY_NS", 0)
    target = data.draw(st.sampled_from(sorted(entries)))
    for path, whole in entries.items():
        path.write_bytes(data.draw(damage(whole)) if path == target else whole)
    with scan_captions(inputs, column="c", id_column="id", folder=root, cache=cache) as scan:
        assert snapshot(scan) == reference
    assert {p: p.read_bytes() for p in sorted(cache.folder.glob("*.scan"))} == entries  # rewritten whole


# --- the known failures, through the CLI ------------------------------------------------------------
def precompute(capsys, inputs: list[Path], out: Path) -> tuple[int, str]:
    args = ["precompute", "--encoder", "tiny-sd15", "--column", "c", "--id-column", "id", "--out", str(out)]
    code = main([*args, *(a for path in inputs for a in ("--input", str(path)))])
    return code, capsys.readouterr().err


@pytest.mark.parametrize(("field", "value"), [("rows", 6), ("rows", 8), ("variants", 1), ("variants", 3),
                                             ("ids", False)])
def test_changed_counts_in_an_entry_are_damage_not_a_crash(tmp_path, capsys, monkeypatch, field, value):
    """Issue 17, section 4 (scan cache): an entry whose header says other row or variant counts (its hash covered
    only the streams) failed with a numpy reshape error, or an error blaming the other input file ("b.jsonl: its
    rows hold 2 captions, the rows before it 3"). Now it is read past, and the store is the one an uncached run
    makes."""
    monkeypatch.setattr("clipcond.precompute.scan_cache.RACY_NS", 0)
    inputs = write_inputs(tmp_path / "data")
    first = tmp_path / "first"
    assert precompute(capsys, inputs[:1], first)[0] == 0  # a.jsonl's entry, in first's cache
    entry = next((first / StoreFiles.SCAN_CACHE).glob("*.scan"))
    streams, header = split(entry.read_bytes())
    entry.write_bytes(join(streams, {**header, field: value}))
    out = tmp_path / "out"
    out.mkdir()
    shutil.copytree(first / StoreFiles.SCAN_CACHE, out / StoreFiles.SCAN_CACHE)
    code, err = precompute(capsys, inputs, out)  # a.jsonl from the damaged entry, b.jsonl read
    assert code == 0, err
    fresh = tmp_path / "fresh"
    assert precompute(capsys, inputs, fresh)[0] == 0
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest == json.loads((fresh / MANIFEST).read_text())
    assert (out / manifest["index"]["file"]).read_bytes() == (fresh / manifest["index"]["file"]).read_bytes()
    rows = np.frombuffer((out / manifest["index"]["file"]).read_bytes(), dtype=np.uint8)
    assert len(rows) and manifest["rows"] == 12 and manifest["variants"] == 3
