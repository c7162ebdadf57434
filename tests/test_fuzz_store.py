"""Fuzzed store files: whatever a damaged shard, index or manifest holds, reading it (``EmbeddingStore(path)``,
``store[i]``, ``store.__getitems__``, ``store.by_id``) either raises ``ValueError`` / ``IndexError`` naming the
file, or returns exactly the original rows. Never another exception, an allocation of what a length field
claims, a hang, or another row's bytes.

Each test mutates one file of a copy of a tiny precomputed store (three shards, ids) in one way, reads
everything, and restores the file.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from conftest import time_limit
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from clipcond import EmbeddingStore
from clipcond.precompute.job import PrecomputeJob, precompute
from clipcond.store.manifest import MANIFEST

ROWS = 40
SHARD = 16
FUZZ = settings(max_examples=150, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
SECONDS = 20  # one example's reads; far more is a hang
NAMES = ("sequence", "pooled", "check")


class Pristine(tuple):
    def __repr__(self) -> str:  # hypothesis prints the arguments of a failing example: not 40 rows of floats
        return f"Pristine({self[0]})"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, sdxl) -> Pristine:
    """A tiny store (40 rows, 36 distinct captions, shards of 16, 16 and 4, ids) and its rows before any damage."""
    root = tmp_path_factory.mktemp("fuzz")
    captions = root / "captions.jsonl"
    captions.write_text("".join(json.dumps({"caption": f"thing {i % 36}", "key": f"k{i}"}) + "\n"
                                for i in range(ROWS)))
    precompute(sdxl, PrecomputeJob(input=captions, out=root / "store", id_column="key", shard_size=SHARD,
                                   progress=False))
    store = EmbeddingStore(root / "store")
    assert len(store.manifest.shards) == 3
    rows = {r: {k: v.clone() for k, v in store[r].items() if k != "row"} for r in range(ROWS)}
    return Pristine((root / "store", rows))


@pytest.fixture(scope="module")
def work(pristine, tmp_path_factory) -> Path:
    """One copy to damage: each example rewrites one file and puts it back."""
    return Path(shutil.copytree(pristine[0], tmp_path_factory.mktemp("work") / "store"))


@contextlib.contextmanager
def replaced(path: Path, data: bytes) -> Iterator[None]:
    original = path.read_bytes()
    path.write_bytes(data)
    try:
        yield
    finally:
        path.write_bytes(original)


def refused(err: BaseException, root: Path, named: str) -> None:
    """A refusal is a ValueError or IndexError whose message names the damaged file (or the store)."""
    assert type(err) is not KeyError and isinstance(err, ValueError | IndexError), repr(err)
    assert named in str(err) or str(root) in str(err), f"{named} not named in {err!r}"


def same(item: dict, expected: dict, row: int) -> None:
    """``item`` is row ``row`` as it was stored; a masked row in a batch is as long as the batch's longest row, so
    the original row past that length must be padding (mask 0, zeros)."""
    assert item["row"] == row
    length = len(item["sequence"])
    if "mask" in expected:
        assert torch.equal(item["mask"], expected["mask"][:length]) and not expected["mask"][length:].any()
    assert torch.equal(item["sequence"], expected["sequence"][:length]) and not expected["sequence"][length:].any()
    assert torch.equal(item["pooled"], expected["pooled"])


def read_everything(root: Path, rows: dict, named: str) -> None:
    """Open, read every row one by one, as one batch and by id: each either refused naming ``named`` or exact."""
    def attempt(read: Callable[[], None]) -> None:
        try:
            read()
        except Exception as err:  # noqa: BLE001 (the point: which exceptions escape)
            refused(err, root, named)

    with time_limit(SECONDS, "reading a damaged store"):
        try:
            store = EmbeddingStore(root)
        except Exception as err:  # noqa: BLE001
            refused(err, root, named)
            return
        for r in range(ROWS):
            attempt(lambda r=r: same(store[r], rows[r], r))
            attempt(lambda r=r: same(store.by_id(f"k{r}"), rows[r], r))

        def batch() -> None:
            fetched = store.__getitems__(list(range(ROWS)))
            for r, item in enumerate(fetched):
                same(item, rows[r], r)

        attempt(batch)


def sizes_unchecked(monkeypatch: pytest.MonkeyPatch) -> None:
    """Opening checks each file's size against the manifest: off, so that a header that grew or a file that
    was cut reaches the header reader (as if the manifest had been rewritten to match)."""
    from clipcond.store import format as store_format

    problem = store_format.FileEntry.problem
    monkeypatch.setattr(store_format.FileEntry, "problem", lambda self, root, checksums=False: None if
                        self.file.startswith("shard-") else problem(self, root, checksums))


def shard_file(work: Path, k: int) -> Path:
    return work / f"shard-{k:05d}.safetensors"


def header_of(data: bytes) -> tuple[int, dict]:
    n = int.from_bytes(data[:8], "little")
    return n, json.loads(data[8 : 8 + n])


def with_header(data: bytes, n: int, header: dict) -> bytes:
    """``header`` in place of the old one: padded to its length when shorter (the data stays put)."""
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * max(0, n - len(text))
    return len(text).to_bytes(8, "little") + text + data[8 + n :]


# --- shards -------------------------------------------------------------------------------
@FUZZ
@given(shard=st.integers(0, 2), where=st.floats(0, 1, exclude_max=True), xor=st.integers(1, 255),
       in_header=st.booleans())
def test_a_flipped_byte_in_a_shard(pristine, work, shard, where, xor, in_header):
    """Bit rot anywhere in a shard: a flipped header byte must not make the reader trust a different layout
    (or drop the row checks), and a flipped data byte must fail exactly the row it lands in."""
    flip_and_read(pristine, work, shard, where, xor, in_header)


def flip_and_read(pristine: Pristine, work: Path, shard: int, where: float, xor: int, in_header: bool) -> None:
    """Shard ``shard`` with one byte flipped (at ``where`` of its header or of the whole file), read everything."""
    path = shard_file(work, shard)
    data = bytearray(path.read_bytes())
    span = 8 + int.from_bytes(data[:8], "little") if in_header else len(data)
    data[int(where * span)] ^= xor
    with replaced(path, bytes(data)):
        read_everything(work, pristine[1], path.name)


@FUZZ
@given(shard=st.integers(0, 2), keep=st.floats(0, 1, exclude_max=True), lie=st.booleans())
def test_a_truncated_shard(pristine, work, shard, keep, lie, monkeypatch):
    """A shard cut short; ``lie``: the manifest's recorded size is made to match, so that only the header
    reader's bounds stand between a read and bytes past the end of the file."""
    path = shard_file(work, shard)
    data = path.read_bytes()
    cut = data[: int(keep * len(data))]
    if lie:
        sizes_unchecked(monkeypatch)
    with replaced(path, cut):
        read_everything(work, pristine[1], path.name)


@FUZZ
@given(shard=st.integers(0, 2),
       length=st.one_of(st.integers(0, 2**64 - 1), st.sampled_from([0, 1, 2, 7, 8, 2**31, 2**63, 2**64 - 1])),
       delta=st.integers(-16, 16))
def test_a_shard_that_lies_about_its_header_length(pristine, work, shard, length, delta, monkeypatch):
    """The first 8 bytes say how long the JSON header is: any value (huge, zero, off by a few) must be
    refused before anything of that size is read or allocated."""
    path = shard_file(work, shard)
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    claimed = (n + delta) % 2**64 if delta else length
    sizes_unchecked(monkeypatch)  # the file's size is right: only its first 8 bytes lie
    with replaced(path, claimed.to_bytes(8, "little") + data[8:]):
        read_everything(work, pristine[1], path.name)


dims = st.one_of(st.integers(-3, 100), st.integers(-(2**70), 2**70), st.sampled_from([0, 16, 48, 77, 80, 2**63]))
field_values = st.one_of(
    st.lists(dims, min_size=0, max_size=4),  # shapes and offsets: negative, huge, reversed, wrong length
    st.tuples(dims, dims).map(list),
    st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "F64", "I32", "BOOL", "F8_E4M3", "Q4", ""]),
    st.none(), st.booleans(), st.text(max_size=5), st.floats(allow_nan=True), st.dictionaries(st.text(max_size=3),
                                                                                               st.integers()))


@FUZZ
@given(shard=st.integers(0, 2), name=st.sampled_from(NAMES), field=st.sampled_from(["dtype", "shape", "data_offsets"]),
       value=field_values)
@example(shard=0, name="pooled", field="shape", value=[16, 16, 3])  # pooled reshaped: same bytes, another shape
@example(shard=0, name="sequence", field="shape", value=[16, 80, 77])  # [n, D, L]: same bytes, transposed shape
@example(shard=1, name="check", field="dtype", value="F64")  # checks read as floats
@example(shard=2, name="pooled", field="data_offsets", value=[0, 3072])  # pooled over the sequence's bytes
def test_a_shard_header_field_rewritten(pristine, work, shard, name, field, value, monkeypatch):
    """A header whose JSON parses but says something else about one tensor: unknown or mismatched dtype,
    negative or huge dims, a same-size reshape, reversed, overlapping or out-of-file offsets."""
    sizes_unchecked(monkeypatch)
    path = shard_file(work, shard)
    data = path.read_bytes()
    n, header = header_of(data)
    header[name][field] = value
    with replaced(path, with_header(data, n, header)):
        read_everything(work, pristine[1], path.name)


@FUZZ
@given(shard=st.integers(0, 2), key=st.sampled_from(["start", "stop", "__all__"]),
       value=st.one_of(st.integers(-2, 60), st.none(), st.text(max_size=4)))
def test_a_shard_metadata_naming_other_slots(pristine, work, shard, key, value, monkeypatch):
    """A shard whose metadata names other slots than the manifest's entry (a shard of another store copied in,
    or a damaged header) is refused: its rows would be served as the wrong captions' with valid checks."""
    sizes_unchecked(monkeypatch)
    path = shard_file(work, shard)
    data = path.read_bytes()
    n, header = header_of(data)
    meta = json.loads(header["__metadata__"]["clipcond"])
    if key == "__all__":
        header["__metadata__"]["clipcond"] = json.dumps(value)
    else:
        meta[key] = value
        header["__metadata__"]["clipcond"] = json.dumps(meta, sort_keys=True)
    with replaced(path, with_header(data, n, header)):
        read_everything(work, pristine[1], path.name)


def test_a_reshaped_pooled_tensor_is_refused_naming_file_and_tensor(work, monkeypatch):
    """A pooled [16, 48] relabelled [16, 16, 3] (same bytes, so the safetensors rules alone accept it) must be
    refused, not served as a [16, 3] row."""
    sizes_unchecked(monkeypatch)  # the header grew by a byte or two
    path = shard_file(work, 0)
    data = path.read_bytes()
    n, header = header_of(data)
    header["pooled"]["shape"] = [16, 16, 3]
    with replaced(path, with_header(data, n, header)):
        store = EmbeddingStore(work)
        with pytest.raises(ValueError, match=r"shard-00000.safetensors: tensor 'pooled' is torch.float32 "
                                             r"\[16, 16, 3\], the manifest's shard .* needs torch.float32 \[16, 48\]"):
            store[next(r for r in range(ROWS) if int(store._slots[r, 0]) < SHARD)]


# --- the index ----------------------------------------------------------------------------
@FUZZ
@given(where=st.floats(0, 1, exclude_max=True), xor=st.integers(1, 255), cut=st.booleans())
def test_a_damaged_index(pristine, work, where, xor, cut):
    """A flipped byte in the index's ``rows`` would send a row to another slot, whose own row check passes:
    the index is read whole at open, so its sha256 is checked; a cut one fails its size."""
    path = next(work.glob("index-*.safetensors"))
    data = bytearray(path.read_bytes())
    at = int(where * len(data))
    if cut:
        data = data[:at]
    else:
        data[at] ^= xor
    with replaced(path, bytes(data)):
        read_everything(work, pristine[1], path.name)


# --- the manifest -------------------------------------------------------------------------
def leaves(value: object, path: tuple = ()) -> Iterator[tuple]:
    if isinstance(value, dict):
        for k, v in value.items():
            yield from leaves(v, (*path, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from leaves(v, (*path, i))
    if path and path[0] != "encoder":  # the spec is read only by ``store.spec``
        yield path


json_values = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.integers(-2, 500),
                                     st.floats(allow_nan=False), st.text(max_size=8)),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                                        max_size=3), max_leaves=6)


@FUZZ
@given(choice=st.integers(0, 10**6), value=json_values)
def test_a_manifest_field_rewritten(pristine, work, choice, value):
    """Any field of the manifest given any JSON value (wrong type, negative, huge, another file's name or size):
    a clear refusal naming the manifest or the file it now misdescribes, or the same rows."""
    path = work / MANIFEST
    original = path.read_bytes()
    manifest = json.loads(original)
    where = list(leaves(manifest))[choice % len(list(leaves(manifest)))]
    parent = manifest
    for key in where[:-1]:
        parent = parent[key]
    parent[where[-1]] = value
    with replaced(path, json.dumps(manifest).encode()):
        read_everything(work, pristine[1], MANIFEST)


@FUZZ
@given(where=st.floats(0, 1, exclude_max=True), byte=st.integers(0, 255), cut=st.booleans())
@example(where=0.5, byte=0xFF, cut=False)  # not UTF-8
@example(where=0.0, byte=0xC3, cut=False)  # a lone UTF-8 lead byte
def test_a_damaged_manifest_file(pristine, work, where, byte, cut):
    """A manifest with a byte replaced (non-UTF-8 included) or cut short: a ValueError naming manifest.json."""
    path = work / MANIFEST
    data = bytearray(path.read_bytes())
    at = int(where * len(data))
    if cut:
        data = data[:at]
    else:
        data[at] = byte
    with replaced(path, bytes(data)):
        read_everything(work, pristine[1], MANIFEST)


def test_a_manifest_that_is_not_utf8_is_named(work):
    """``manifest.json`` that is not UTF-8 was a bare UnicodeDecodeError naming no file."""
    path = work / MANIFEST
    with replaced(path, b"\xff\xfe" + path.read_bytes()):
        with pytest.raises(ValueError, match=rf"{MANIFEST}: not UTF-8"):
            EmbeddingStore(work)


# --- T5 row layouts: a masked recipe's kept rows and lengths, SD3's two parts ----------------------------------
T5_FUZZ = settings(FUZZ, max_examples=60)


@pytest.fixture(scope="module", params=["tiny-pixart-sigma", "tiny-sd3"])
def t5_pristine(request, tmp_path_factory, t5_vocab) -> Pristine:
    """The same 40 rows (ids, shards of 16, 16 and 4) through a T5 recipe: PixArt-Σ (shards of kept rows and
    lengths) or SD3 (clip and t5 parts)."""
    from clipcond import TextConditioner

    tc = TextConditioner.from_pretrained(request.param, tokenizer=t5_vocab["sd3"])
    root = tmp_path_factory.mktemp("fuzz-t5")
    captions = root / "captions.jsonl"
    captions.write_text("".join(json.dumps({"caption": f"thing {i % 36} " + "word " * (i % 7), "key": f"k{i}"})
                                + "\n" for i in range(ROWS)))
    precompute(tc, PrecomputeJob(input=captions, out=root / "store", id_column="key", shard_size=SHARD,
                                 progress=False))
    store = EmbeddingStore(root / "store")
    rows = {r: {k: v.clone() for k, v in store[r].items() if k != "row"} for r in range(ROWS)}
    return Pristine((root / "store", rows))


@pytest.fixture(scope="module")
def t5_work(t5_pristine, tmp_path_factory) -> Path:
    return Path(shutil.copytree(t5_pristine[0], tmp_path_factory.mktemp("work-t5") / "store"))


@T5_FUZZ
@given(shard=st.integers(0, 2), where=st.floats(0, 1, exclude_max=True), xor=st.integers(1, 255),
       in_header=st.booleans())
def test_a_flipped_byte_in_a_t5_shard(t5_pristine, t5_work, shard, where, xor, in_header):
    """Bit rot in a shard of kept rows (their lengths included) or of SD3's parts: refused naming the shard, or
    exactly the original rows and masks."""
    flip_and_read(t5_pristine, t5_work, shard, where, xor, in_header)


@T5_FUZZ
@given(shard=st.integers(0, 2), pick=st.integers(0, 5), field=st.sampled_from(["dtype", "shape", "data_offsets"]),
       value=field_values)
@example(shard=0, pick=1, field="shape", value=[16])  # lengths (PixArt) / t5 (SD3) given another shape
def test_a_t5_shard_header_field_rewritten(t5_pristine, t5_work, shard, pick, field, value, monkeypatch):
    """One tensor of a T5 shard's header (the kept rows, lengths, a part, pooled, check) said otherwise."""
    sizes_unchecked(monkeypatch)
    path = shard_file(t5_work, shard)
    data = path.read_bytes()
    n, header = header_of(data)
    names = sorted(k for k in header if k != "__metadata__")
    header[names[pick % len(names)]][field] = value
    with replaced(path, with_header(data, n, header)):
        read_everything(t5_work, t5_pristine[1], path.name)


def test_lengths_moved_between_rows_are_caught(t5_pristine, t5_work):
    """Two rows' lengths traded (their sum, and so the header, unchanged): each row's check covers its length and
    the bytes its length spans, so both rows are refused, never served cut at another place."""
    path = shard_file(t5_work, 0)
    data = bytearray(path.read_bytes())
    n, header = header_of(bytes(data))
    if "lengths" not in header:
        pytest.skip("SD3's rows keep every row: no lengths")
    start = 8 + n + header["lengths"]["data_offsets"][0]
    lengths = torch.frombuffer(bytearray(data[start : start + 16 * 8]), dtype=torch.int64)
    a, b = next((i, j) for i in range(16) for j in range(i + 1, 16) if lengths[i] != lengths[j])
    lengths[[a, b]] = lengths[[b, a]]
    data[start : start + 16 * 8] = lengths.numpy().tobytes()
    store_rows = torch.tensor(EmbeddingStore(t5_work)._slots[:, 0])
    with replaced(path, bytes(data)):
        store = EmbeddingStore(t5_work)
        for local in (a, b):
            row = int((store_rows == local).nonzero()[0])
            with pytest.raises(ValueError, match=rf"shard-00000.safetensors row {local} .*checksum mismatch"):
                store[row]
        read_everything(t5_work, t5_pristine[1], path.name)
