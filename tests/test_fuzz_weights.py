"""Damaged weight files: a WeightsError naming the file (and the tensor at fault), or the undamaged result.

Valid files in the real layouts (an SD 1.x single file, an open_clip checkpoint, an SDXL single file, a
diffusers pipeline folder, a diffusers textual-inversion embedding) are damaged the ways files are:
truncated, bytes flipped in the header, a lying header length, data_offsets shifted onto a neighbour, of
one value or huge, shapes and dtypes changed, names that are not UTF-8, a header that is not a JSON object
or holds no tensors. Each is loaded through the real loaders (``load_towers`` as ``TextConditioner.
from_pretrained`` calls it, ``load_embedding``). Bugs caught (before issue 17): a header that is a JSON list
raised AttributeError; a one-value data_offsets raised "not enough values to unpack" naming no file; offsets
shifted onto a neighbour, or a header length one short of its padding, loaded other bytes silently; a
header ``{}`` was blamed as weights of another size; an F32 tensor relabelled I32 loaded as wrong numbers;
an empty tensor with a huge dimension raised torch's TypeError.

Flipped *data* bytes are not tried: safetensors has no checksum, so they are wrong numbers no reader sees.
Examples are derandomized (no database): CI runs the same ~150 every time.
"""

from __future__ import annotations

import json
import resource
import shutil
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from conftest import time_limit
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from clipcond import WeightsError, get_spec
from clipcond.encoders.textual_inversion import load_embedding
from clipcond.encoders.weights import load_towers

LOAD_SECONDS = 30  # a load of these small files takes well under a second; more is a hang
GROWTH_LIMIT_KB = 256 * 1024  # peak memory may not grow more per example (a lying length would allocate it)
# name: (the file to damage, relative to the layout's root; how to load the root)
LAYOUTS: dict[str, tuple[str, Callable[[Path], object]]] = {
    "sd1 single file": ("sd15.safetensors", lambda p: load_towers(get_spec("tiny-sd15"), p, dtype=torch.float32)),
    "open_clip checkpoint": ("openclip_h.safetensors",
                             lambda p: load_towers(get_spec("tiny-sd2"), p, dtype=torch.float32)),
    "sdxl single file": ("sdxl.safetensors", lambda p: load_towers(get_spec("tiny-sdxl"), p, dtype=torch.float32)),
    "diffusers folder": ("text_encoder/model.safetensors",
                         lambda p: load_towers(get_spec("sd15"), p, dtype=torch.float32)),
    "embedding": ("learned_embeds.safetensors", lambda p: embedding_rows(p / "learned_embeds.safetensors")),
}


def embedding_rows(path: Path) -> tuple[str, torch.Tensor]:
    """What ``with_textual_inversion`` takes from an embedding file for tiny-sd15: its token and rows [n, W]."""
    embedding = load_embedding(path)
    return embedding.token, embedding.rows_for(get_spec("tiny-sd15").towers[0], path)


class Layouts(dict):
    def __repr__(self) -> str:  # hypothesis prints the fixture with a failing example: not its tensors
        return f"layouts({', '.join(self)})"


class Original:
    """A valid file's parts: its bytes, header (in file order) and where the data starts."""

    def __init__(self, data: bytes) -> None:
        self.bytes = data
        n = int.from_bytes(data[:8], "little")
        self.header = json.loads(data[8:8 + n])
        self.start = 8 + n
        self.names = [k for k in self.header if k != "__metadata__"]

    def with_header(self, header: object) -> bytes:
        text = json.dumps(header).encode()
        return len(text).to_bytes(8, "little") + text + self.bytes[self.start:]


@pytest.fixture(scope="module")
def layouts(tiny, tmp_path_factory) -> dict[str, tuple[Path, Path, Original, object]]:
    """Per layout: the root to load, the file in it to damage, the file's parts and the undamaged result."""
    base = tmp_path_factory.mktemp("fuzz")
    roots = {"diffusers folder": base / "pipeline", "embedding": base / "embedding"}
    shutil.copytree(tiny.sd15 / "text_encoder", roots["diffusers folder"] / "text_encoder")
    roots["embedding"].mkdir()
    save_file({"<cat-toy>": torch.randn(2, 32, generator=torch.Generator().manual_seed(0))},
              roots["embedding"] / "learned_embeds.safetensors")
    out = Layouts()
    for name, (file, load) in LAYOUTS.items():
        root = roots.get(name) or tiny.files[file]
        target = root / file if root.is_dir() else root
        out[name] = (root, target, Original(target.read_bytes()), load(root))
    return out


def assert_same(got: object, expected: object) -> None:
    if isinstance(expected, list):  # load_towers: [(tower, state)]
        assert [t for t, _ in got] == [t for t, _ in expected]
        for (_, a), (_, b) in zip(got, expected, strict=True):
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in b)
    else:  # embedding_rows: (token, rows)
        assert got[0] == expected[0] and torch.equal(got[1], expected[1])


@contextmanager
def bounded():
    """Fail on a hang (SIGALRM) or on peak memory growing by more than GROWTH_LIMIT_KB."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with time_limit(LOAD_SECONDS, "a load"):
        yield
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown < GROWTH_LIMIT_KB, f"peak memory grew by {grown} KB"


def offsets(draw, original: Original, name: str) -> object:
    """data_offsets for ``name`` that lie: shifted, onto a neighbour, of one or three values, huge, not ints."""
    begin, end = original.header[name]["data_offsets"]
    neighbour = original.header[draw(st.sampled_from([n for n in original.names if n != name] or [name]))]
    shift = draw(st.integers(-64, 64).filter(bool))
    return draw(st.sampled_from([
        [begin + shift, end + shift],
        [neighbour["data_offsets"][0], neighbour["data_offsets"][0] + end - begin],  # the neighbour's bytes
        [begin], [begin, end, end], [], [begin, 2**64], [2**70, 2**70 + end - begin], [-1, end - begin - 1],
        [float(begin), float(end)], [str(begin), str(end)], None, {"begin": begin},
    ]))


def shape(draw, shape: list[int]) -> object:
    return draw(st.sampled_from([
        [*shape, 1], shape[::-1], [], [-1], [0, 2**63], [2**64], [2**31, 2**31], [*shape[:-1], shape[-1] + 1] if shape
        else [1], [1.0] * len(shape), "[4]", None,
    ]))


DAMAGE = ("truncate", "flip", "length", "offsets", "shape", "dtype", "not an object", "no tensors", "metadata",
          "non-UTF-8 name", "renamed", "extra entry")


def damage(draw, original: Original, kinds: tuple[str, ...]) -> tuple[bytes, str, set[str]]:
    """The damaged bytes, what was done, and the tensors one of which the error must name (empty: any)."""
    data, header, names = original.bytes, original.header, original.names
    kind = draw(st.sampled_from(kinds))
    name = draw(st.sampled_from(names))
    entry = header[name]
    if kind == "truncate":
        cut = draw(st.integers(0, len(data) - 1))
        beyond = {n for n in names if original.start + header[n]["data_offsets"][1] > cut}
        return data[:cut], f"cut at byte {cut}", beyond if cut >= original.start else set()
    if kind == "flip":
        out = bytearray(data)
        flips = draw(st.lists(st.tuples(st.integers(0, original.start - 1), st.integers(1, 255)), min_size=1,
                              max_size=3))
        for pos, xor in flips:
            out[pos] ^= xor
        return bytes(out), f"header bytes flipped {flips}", set()
    if kind == "length":
        n = original.start - 8
        lie = draw(st.one_of(st.sampled_from([0, 1, 2, n - 1, n + 1, n + 8, len(data) - 8, len(data) - 7, 2**63,
                                              2**64 - 1]), st.integers(0, 2**64 - 1)))
        return lie.to_bytes(8, "little") + data[8:], f"header length {lie} (true: {n})", set()
    if kind == "offsets":
        lie = offsets(draw, original, name)
        return original.with_header({**header, name: {**entry, "data_offsets": lie}}), f"{name} at {lie}", {name}
    if kind == "shape":
        lie = shape(draw, entry["shape"])
        return original.with_header({**header, name: {**entry, "shape": lie}}), f"{name} shaped {lie}", {name}
    if kind == "dtype":
        lie = draw(st.sampled_from(["F16", "BF16", "F64", "I32", "I64", "U8", "BOOL", "F8_E4M3", "F8_E5M2", "F32 ",
                                    "f32", "", 32, None]))
        return original.with_header({**header, name: {**entry, "dtype": lie}}), f"{name} of dtype {lie!r}", {name}
    if kind == "not an object":
        lie = draw(st.sampled_from([[header], [], "header", 3, None, True]))
        return original.with_header(lie), f"header {json.dumps(lie)[:20]}", set()
    if kind == "no tensors":
        lie = draw(st.sampled_from([{}, {"__metadata__": {"format": "pt"}}]))
        return original.with_header(lie)[:8 + len(json.dumps(lie))], f"header {lie}", set()
    if kind == "metadata":
        lie = draw(st.sampled_from([{"format": 1}, ["pt"], "pt", {"a": None}]))
        return original.with_header({"__metadata__": lie, **header}), f"__metadata__ {lie}", set()
    if kind == "non-UTF-8 name":
        quoted = json.dumps(name).encode()
        bad = quoted[:-1] + draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x80abc"])) + b'"'
        text = data[8:original.start].replace(quoted, bad, 1)
        return len(text).to_bytes(8, "little") + text + data[original.start:], f"{name} renamed {bad!r}", set()
    if kind == "renamed":
        new = draw(st.sampled_from([name + "x", name.replace(".", "/"), "é" + name, name.upper(), ""]))
        renamed = {new if k == name else k: v for k, v in header.items()}
        return original.with_header(renamed), f"{name} renamed {new!r}", set()
    # An extra entry over another tensor's bytes (a header spliced from another file).
    lie = {"dtype": entry["dtype"], "shape": entry["shape"], "data_offsets": entry["data_offsets"]}
    return original.with_header({**header, "extra": lie}), f"extra entry over {name}", {"extra", name}


# Errors that name a tensor by its canonical key rather than the file's (clipcond/encoders/convert.py).
CONVERSION_ERRORS = ("tensor shape mismatch", "missing tensor(s)", "unexpected tensor(s)")


@settings(max_examples=150, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_damaged_weights_fail_clearly_or_load_unchanged(layouts, data):
    layout = data.draw(st.sampled_from(sorted(layouts)))
    root, target, original, expected = layouts[layout]
    # A diffusers embedding's one key is its token: renamed, it is another valid file.
    kinds = tuple(k for k in DAMAGE if not (layout == "embedding" and k == "renamed"))
    damaged, what, at_fault = damage(data.draw, original, kinds)
    target.write_bytes(damaged)
    try:
        with bounded():
            try:
                got = LAYOUTS[layout][1](root)
            except WeightsError as err:
                message = str(err)
                assert str(target) in message, f"{layout}, {what}: the error does not name the file: {message}"
                assert not at_fault or any(repr(n) in message for n in at_fault) or any(
                    e in message for e in CONVERSION_ERRORS), f"{layout}, {what}: names no tensor of {at_fault}: "\
                                                              f"{message}"
                return
        assert_same(got, expected)
    finally:
        target.write_bytes(original.bytes)
