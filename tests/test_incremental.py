"""A store that grows with its dataset: incremental runs, gc, parts, variants, sharded and tar inputs.

Every store made incrementally is compared row for row with a fresh store of the same final input,
and both with ``tc(captions)`` computed in the same test.
"""

from __future__ import annotations

import io
import json
import os
import pkgutil
import re
import shutil
import signal
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from test_precompute import PRECOMPUTE, cli, finished, run, wait_for, write_input
from torch.utils.data import DataLoader

from clipcond import EmbeddingStore, TextConditioner
from clipcond._files import TMP_MARK
from clipcond.cli import main
from clipcond.precompute.encode import DELAY_ENV
from clipcond.store.gc import collect
from clipcond.store.manifest import MANIFEST

TOL = {"atol": 1e-5, "rtol": 1e-5}
BASE = [f"a photo of thing number {i}" for i in range(30)]


@pytest.fixture(scope="module")
def tc() -> TextConditioner:
    return TextConditioner.from_pretrained("tiny-sd15")


def rows_of(store: EmbeddingStore, variant: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    items = [store.get(i, variant) for i in range(len(store))]
    return torch.stack([r["sequence"] for r in items]), torch.stack([r["pooled"] for r in items])


def assert_same_rows(a: EmbeddingStore, b: EmbeddingStore) -> None:
    assert len(a) == len(b) and a.variants == b.variants
    for v in range(a.variants):
        for x, y in zip(rows_of(a, v), rows_of(b, v), strict=True):
            torch.testing.assert_close(x, y, **TOL)


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("shard-*.safetensors"))}


@pytest.mark.parametrize("change", ["grown", "shrunk", "edited"])
def test_incremental_run_equals_a_fresh_store_and_leaves_old_shards_alone(tmp_path, tc, change):
    ids = list(range(len(BASE)))
    first = write_input(tmp_path / "v1", "jsonl", BASE, ids=ids)
    out = tmp_path / "store"
    run(tc, first, out, shard_size=8, id_column="id")
    old = shard_bytes(out)
    captions, new_ids = {
        "grown": (BASE + ["a new caption", "another new one", BASE[0]], ids + [100, 101, 102]),
        "shrunk": (BASE[:10], ids[:10]),
        "edited": (BASE[:5] + ["a photo of thing numbr 5"] + BASE[6:], ids),  # one typo fixed the other way
    }[change]
    second = write_input(tmp_path / "v2", "jsonl", captions, ids=new_ids)
    manifest = run(tc, second, out, id_column="id")
    encoded = {"grown": 2, "shrunk": 0, "edited": 1}[change]
    assert manifest["run"] == {"encoded": encoded, "reused": len(set(captions)) - encoded}
    assert {k: v for k, v in shard_bytes(out).items() if k in old} == old  # byte-identical, none rewritten
    run(tc, second, tmp_path / "fresh", id_column="id")
    store = EmbeddingStore(out, verify=True)
    assert_same_rows(store, EmbeddingStore(tmp_path / "fresh"))
    sequence, pooled = rows_of(store)
    direct = tc(captions)
    torch.testing.assert_close(sequence, direct.sequence, **TOL)
    torch.testing.assert_close(pooled, direct.pooled, **TOL)
    assert [store.id_of(i) for i in range(len(store))] == [str(i) for i in new_ids]
    if change == "shrunk":  # rows and ids that left the input are gone from the index
        with pytest.raises(KeyError, match="id 20 is not in store"):
            store.row_of(20)


def test_reader_keeps_its_version_through_an_incremental_run_and_gc(tmp_path, tc):
    out = tmp_path / "store"
    run(tc, write_input(tmp_path / "v1", "jsonl", BASE, ids=list(range(30))), out, shard_size=8, id_column="id")
    before = EmbeddingStore(out)
    old_rows = rows_of(before)
    run(tc, write_input(tmp_path / "v2", "jsonl", BASE[20:] + ["new"], ids=list(range(20, 31))), out, id_column="id")
    assert len(before) == 30 and before.row_of(3) == 3  # still the old version, ids included
    torch.testing.assert_close(rows_of(before)[0], old_rows[0], atol=0, rtol=0)
    assert len(EmbeddingStore(out)) == 11
    # gc drops captions 0-19: the old reader either still reads its open shards or says to reopen.
    untouched = EmbeddingStore(out)
    collected = collect(out)
    assert (collected.removed, collected.kept) == (20, 11)
    # One that had its shards open keeps reading them (deleted files stay readable while mapped)...
    torch.testing.assert_close(rows_of(before)[0], old_rows[0], atol=0, rtol=0)
    # ...one that had not says so, rather than read another row's data from a reused name.
    with pytest.raises(FileNotFoundError, match="removed since this EmbeddingStore was opened .*open .* again"):
        untouched[0]
    after = EmbeddingStore(out, verify=True)
    direct = tc(BASE[20:] + ["new"])
    torch.testing.assert_close(rows_of(after)[0], direct.sequence, **TOL)
    assert after.manifest.slots - after.manifest.shards[0].start >= 11


def test_gc_removes_exactly_the_unreferenced_and_a_second_gc_does_nothing(tmp_path, tc):
    out = tmp_path / "store"
    run(tc, write_input(tmp_path / "v1", "txt", BASE), out, shard_size=8)
    run(tc, write_input(tmp_path / "v2", "txt", BASE[::3]), out)
    stored = sum(e["stop"] - e["start"] for e in json.loads((out / MANIFEST).read_text())["shards"])
    assert stored == 30  # incremental runs never delete
    assert main(["gc", str(out)]) == 0
    manifest = json.loads((out / MANIFEST).read_text())
    assert sum(e["stop"] - e["start"] for e in manifest["shards"]) == 10
    assert collect(out).removed == 0
    torch.testing.assert_close(rows_of(EmbeddingStore(out, verify=True))[1], tc(BASE[::3]).pooled, **TOL)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("index-")) == [manifest["index"]["file"]]


# gc writes the rewritten shards (ShardWriter: 4 here, each added then published), then the index
# (write_streamed), then the manifest (atomic_write, in store/manifest.py), then removes the old files
# (_remove_unlisted, called once before it starts too).
@pytest.mark.parametrize(("crash", "at"), [("clipcond.store.format.ShardWriter.add", 2),
                                           ("clipcond.store.format.ShardWriter.publish", 4),
                                           ("clipcond.store.format.write_streamed", 1),
                                           ("clipcond.store.manifest.atomic_write", 1),
                                           ("clipcond.store.gc._remove_unlisted", 2)])
def test_gc_killed_at_each_step_then_rerun_equals_an_uninterrupted_gc(tmp_path, tc, monkeypatch, crash, at):
    out = tmp_path / "store"
    run(tc, write_input(tmp_path / "v1", "txt", BASE), out, shard_size=8)
    run(tc, write_input(tmp_path / "v2", "txt", BASE[::3]), out)
    clean = tmp_path / "clean"
    shutil.copytree(out, clean)
    collect(clean)
    calls = {"n": 0}
    owner, name = crash.rsplit(".", 1)
    original = getattr(pkgutil.resolve_name(owner), name)

    def dies(*args, **kwargs):  # the process dies here: what it wrote before stays on disk
        calls["n"] += 1
        if calls["n"] == at:  # dies halfway through writing a file: a killed process's temporary is left
            if "ShardWriter" in crash or "write_streamed" in crash:
                path = args[0].path if "ShardWriter" in crash else args[0] / args[1]
                path.with_name(f".{path.name}{TMP_MARK}99999").write_bytes(b"half a file")
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(crash, dies)
    with pytest.raises(KeyboardInterrupt):
        collect(out)
    monkeypatch.undo()
    EmbeddingStore(out, verify=True)  # the old version or the new one, never a mix
    collect(out)
    assert json.loads((out / MANIFEST).read_text()) == json.loads((clean / MANIFEST).read_text())
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in clean.iterdir())
    assert shard_bytes(out) == shard_bytes(clean)


def test_sigkill_during_an_incremental_run_then_rerun(tmp_path):
    base = tmp_path / "base"
    first = write_input(tmp_path / "v1", "jsonl", [f"caption number {i}" for i in range(40)], ids=list(range(40)))
    finished(cli(*PRECOMPUTE, "--input", str(first), "--id-column", "id", "--out", str(base)))
    grown = write_input(tmp_path / "v2", "jsonl", [f"caption number {i}" for i in range(100)], ids=list(range(100)))
    args = [*PRECOMPUTE, "--input", str(grown), "--id-column", "id"]
    clean, out = tmp_path / "clean", tmp_path / "killed"
    shutil.copytree(base, clean)
    shutil.copytree(base, out)
    assert "60 encoded, 40 reused" in finished(cli(*args, "--out", str(clean)))
    before = (out / MANIFEST).read_bytes()
    proc = cli(*args, "--out", str(out), env={DELAY_ENV: "0.05"})
    wait_for(lambda: len(list(out.glob("shard-*.safetensors"))) >= 14, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (out / MANIFEST).read_bytes() == before  # readers still see the old, complete version
    assert len(EmbeddingStore(out)) == 40
    finished(cli(*args, "--out", str(out)))
    assert json.loads((out / MANIFEST).read_text()) == json.loads((clean / MANIFEST).read_text())
    assert shard_bytes(out) == shard_bytes(clean)  # nothing stored twice, every shard as a clean run's
    EmbeddingStore(out, verify=True)


def test_parts_in_any_order_killed_and_rerun_equal_a_single_run(tmp_path):
    path = write_input(tmp_path, "jsonl", [f"caption number {i % 50}" for i in range(60)], ids=list(range(60)))
    args = [*PRECOMPUTE, "--input", str(path), "--id-column", "id"]
    single, out = tmp_path / "single", tmp_path / "parts"
    finished(cli(*args, "--out", str(single)))
    assert "part 2/4 done" in finished(cli(*args, "--out", str(out), "--part", "2/4"))
    with pytest.raises(ValueError, match="incomplete"):
        EmbeddingStore(out)  # refused until the last part is in
    proc = cli(*args, "--out", str(out), "--part", "0/4", env={DELAY_ENV: "0.05"})
    wait_for(lambda: len(list(out.glob("shard-*.safetensors"))) >= 5, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    for proc in [cli(*args, "--out", str(out), "--part", p) for p in ("3/4", "0/4")]:  # at once
        assert "done; the last part to finish publishes" in finished(proc)
    assert "clipcond embedding store (format 3" in finished(cli(*args, "--out", str(out), "--part", "1/4"))
    assert json.loads((out / MANIFEST).read_text()) == json.loads((single / MANIFEST).read_text())
    assert shard_bytes(out) == shard_bytes(single)
    EmbeddingStore(out, verify=True)


def test_a_pending_parts_job_refuses_gc_other_runs_and_other_parts(tmp_path, tc, monkeypatch):
    """Parts encode without the store lock, and finish one by one: until the last publishes, a gc or a run of
    another input would delete their finished shards or reuse their numbers, and a part of another plan or
    another N would mix two jobs' shards."""
    import clipcond.precompute.job as precompute_module

    out = tmp_path / "store"
    run(tc, write_input(tmp_path / "v1", "txt", BASE), out, shard_size=8)
    new = [f"a new caption {i}" for i in range(10)]  # two new shards of 8: one for each part
    grown = write_input(tmp_path / "v2", "txt", BASE[::3] + new)
    other = write_input(tmp_path / "v3", "txt", ["something else entirely"])
    attempts = {"gc": lambda: collect(out), "other input": lambda: run(tc, other, out),
                "other plan's part": lambda: run(tc, other, out, part=(1, 2)),
                "other N": lambda: run(tc, grown, out, part=(1, 4))}

    def refusals() -> dict[str, str]:
        found = {}
        for name, attempt in attempts.items():
            with pytest.raises(ValueError) as err:
                attempt()
            found[name] = str(err.value)
        return found

    seen = {}
    encode = precompute_module.encode_shards

    def meanwhile(*args, **kwargs):  # what others try while this part encodes
        seen.update(refusals())
        return encode(*args, **kwargs)

    monkeypatch.setattr(precompute_module, "encode_shards", meanwhile)
    assert run(tc, grown, out, part=(0, 2))["run"]["waiting"]
    monkeypatch.undo()
    assert all("a precompute split in 2 parts (plan " in m and " is running; " in m for m in seen.values()), seen
    assert "gc would delete its finished shards" in seen["gc"] and "this part has plan " in seen["other N"]
    later = refusals()  # part 0 has finished, part 1 has not started: the job is still pending
    assert all("is pending: none of its parts is running now" in m for m in later.values()), later
    assert all(f"delete {out}/.clipcond.parts to abandon it" in m for m in later.values())
    assert run(tc, grown, out, part=(1, 2))["complete"]  # the same job's other part finishes it
    assert not (out / ".clipcond.parts").exists()
    assert collect(out).removed == 20  # and, no job pending, gc goes ahead
    torch.testing.assert_close(rows_of(EmbeddingStore(out, verify=True))[0],
                               tc(BASE[::3] + new).sequence, **TOL)


def test_a_part_never_publishes_onto_a_version_it_did_not_plan_from(tmp_path, tc, monkeypatch):
    """Without file locks (some network filesystems) nothing stops a gc while a part encodes: gc publishes a
    rewritten shard under the number the part writes. The part then refuses to replace it, and to publish."""
    import clipcond.precompute.job as precompute_module
    from clipcond.store.locks import PartsLock

    out = tmp_path / "store"
    run(tc, write_input(tmp_path / "v1", "txt", BASE), out, shard_size=8)
    run(tc, write_input(tmp_path / "v2", "txt", BASE[::3]), out)  # 20 embeddings left for gc
    grown = write_input(tmp_path / "v3", "txt", BASE[::3] + ["a new caption"])
    monkeypatch.setattr(PartsLock, "join", lambda self, plan, parts: None)  # as where flock is unsupported
    encode = precompute_module.encode_shards

    def gc_meanwhile(*args, **kwargs):
        assert collect(out).removed == 20
        return encode(*args, **kwargs)

    monkeypatch.setattr(precompute_module, "encode_shards", gc_meanwhile)
    with pytest.raises(RuntimeError, match=r"changed while this run encoded: shard-00004.safetensors was "
                                           r"published by another version .* Nothing of this run was published"):
        run(tc, grown, out, part=(0, 1))
    monkeypatch.undo()
    EmbeddingStore(out, verify=True)  # gc's version, whole
    assert run(tc, grown, out)["run"] == {"encoded": 1, "reused": 10}


def test_gc_refuses_to_rewrite_a_damaged_row_that_is_still_used(tmp_path, tc):
    out = tmp_path / "store"
    run(tc, write_input(tmp_path / "v1", "txt", BASE), out, shard_size=8)
    run(tc, write_input(tmp_path / "v2", "txt", BASE[::3]), out)  # slot 0 still used, shard 0 to be rewritten
    shard = out / "shard-00000.safetensors"
    data = bytearray(shard.read_bytes())
    data[8 + int.from_bytes(data[:8], "little") + 10] ^= 1  # slot 0, one bit
    shard.write_bytes(bytes(data))
    before = [p.name for p in out.iterdir()]
    manifest = (out / MANIFEST).read_bytes()
    with pytest.raises(ValueError, match=r"shard-00000.safetensors: rows \[0\] fail their checksum; gc would "
                                         r"rewrite them as if whole"):
        collect(out)
    assert (out / MANIFEST).read_bytes() == manifest  # the store as it was: no new version,
    assert set(p.name for p in out.iterdir()) <= set(before)  # no new shard or index left behind


def test_variants_store_each_distinct_caption_once(tmp_path, tc):
    import pyarrow as pa
    import pyarrow.parquet as pq

    short = ["a cat", "a dog", "a cat", "a bird"]
    long = ["a fluffy cat on a sofa", "a dog", "a cat in the sun", "a small bird on a branch"]
    both = [[s, v] for s, v in zip(short, long, strict=True)]
    pq.write_table(pa.table({"short": short, "long": long, "both": both}), tmp_path / "data.parquet")
    by_columns = run(tc, tmp_path / "data.parquet", tmp_path / "a", column=["short", "long"])
    by_list = run(tc, tmp_path / "data.parquet", tmp_path / "b", column="both")
    assert by_columns["unique"] == by_list["unique"] == 6 and by_columns["variants"] == 2
    store = EmbeddingStore(tmp_path / "a")
    assert_same_rows(store, EmbeddingStore(tmp_path / "b"))
    torch.testing.assert_close(rows_of(store, 1)[0], tc(long).sequence, **TOL)
    torch.testing.assert_close(store[0]["pooled"], tc(short[:1]).pooled[0], **TOL)
    with pytest.raises(IndexError, match="variant 2 is out of range"):
        store.get(0, variant=2)
    # A random variant per (seed, epoch, row): the same whatever the batches and workers.
    collate = store.collate(0.0, seed=3, variant="random")
    picked = collate.variants(range(4))
    batch = collate([store[i] for i in range(4)])
    for i, v in enumerate(picked):
        torch.testing.assert_close(batch["pooled"][i], store.get(i, v)["pooled"], atol=0, rtol=0)
    loader = torch.utils.data.DataLoader(store, batch_size=2, num_workers=2, collate_fn=collate)
    loaded = torch.cat([b["pooled"] for b in loader])
    torch.testing.assert_close(loaded, batch["pooled"], atol=0, rtol=0)
    assert {tuple(store.collate(seed=s, variant="random").variants(range(4))) for s in range(8)} != {tuple(picked)}


def test_globbed_parquet_shards_read_in_sorted_order(tmp_path, tc):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "data").mkdir()
    for name, part in (("b", BASE[10:]), ("a", BASE[:10])):
        pq.write_table(pa.table({"caption": part}), tmp_path / "data" / f"{name}.parquet")
    manifest = run(tc, [str(tmp_path / "data" / "*.parquet")], tmp_path / "store")
    assert manifest["input"]["paths"] == [str(tmp_path / "data" / f"{n}.parquet") for n in "ab"]
    torch.testing.assert_close(rows_of(EmbeddingStore(tmp_path / "store"))[1], tc(BASE).pooled, **TOL)


# --- webdataset tars, as img2dataset writes them -----------------------------------------------
def write_tar(path: Path, samples: list[dict[str, bytes]], *, cut: int | None = None) -> Path:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for sample in samples:
            key = sample["__key__"].decode()
            for ext, data in sample.items():
                if ext != "__key__":
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    data = buffer.getvalue()
    path.write_bytes(data[:cut] if cut else data)
    return path


def sample(i: int, caption: str, **extra: bytes) -> dict[str, bytes]:
    return {"__key__": f"{i:09d}".encode(), "jpg": bytes([i % 256]) * 5000, "txt": caption.encode(),
            "json": json.dumps({"caption": caption.upper(), "key": f"{i:09d}"}).encode(), **extra}


def test_tar_shards_by_txt_and_by_json_field_with_keys(tmp_path, tc):
    for t in range(2):
        write_tar(tmp_path / f"{t:05d}.tar", [sample(10 * t + i, BASE[10 * t + i]) for i in range(10)])
    glob = str(tmp_path / "*.tar")
    run(tc, glob, tmp_path / "txt")
    run(tc, glob, tmp_path / "both", column=["txt", "json:caption"])
    store = EmbeddingStore(tmp_path / "both")
    torch.testing.assert_close(rows_of(store)[1], tc(BASE[:20]).pooled, **TOL)
    torch.testing.assert_close(rows_of(store, 1)[1], tc([c.upper() for c in BASE[:20]]).pooled, **TOL)
    torch.testing.assert_close(rows_of(EmbeddingStore(tmp_path / "txt"))[0], rows_of(store)[0], atol=0, rtol=0)
    assert store.by_id("000000013")["row"] == 13


@pytest.mark.parametrize(("samples", "cut", "message"), [
    ([sample(0, "a"), {"__key__": b"000000001", "jpg": b"x"}], None,
     r"00000.tar: sample '000000001' has no .txt member"),
    ([sample(0, "a"), sample(1, "b", txt=b"caf\xe9")], None,
     r"00000.tar: sample '000000001': 000000001.txt is not UTF-8"),
    ([sample(0, "a"), sample(1, "b"), sample(0, "c")], None, r"00000.tar: sample '000000000' appears twice"),
    ([sample(i, f"caption {i}") for i in range(3)], 5000 * 2 + 2000, r"00000.tar: truncated or damaged tar at sample"),
])
def test_tar_errors_name_the_shard_and_the_key(tmp_path, tc, samples, cut, message):
    write_tar(tmp_path / "00000.tar", samples, cut=cut)
    with pytest.raises(ValueError, match=message):
        run(tc, tmp_path / "00000.tar", tmp_path / "store")


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
@pytest.mark.parametrize("compression", ["", "gz"])
def test_the_tar_reader_reads_what_tarfile_reads(tmp_path, fmt, compression):
    """clipcond's streaming tar reader against Python's tarfile on the same archives: long names (ustar
    prefix, GNU ././@LongLink, pax path records), non-ASCII names (pax), empty members, folders and links."""
    from clipcond.precompute.tar import members, open_tar

    folder = "shard/" + "nested-" * 12  # 91 characters: with the file name, over ustar's 100
    names = ["000000000.txt", "000000000.jpg", f"{folder}/000000001.txt", f"{folder}/000000001.json",
             "caf\u00e9-000000002.txt" if fmt == tarfile.PAX_FORMAT else "cafe-000000002.txt", "000000003.txt",
             "l" * 120 + ".txt" if fmt != tarfile.USTAR_FORMAT else "000000004.txt"]
    path = tmp_path / f"t.tar{'.gz' if compression else ''}"
    with tarfile.open(path, f"w:{compression}", format=fmt) as tar:
        for i, name in enumerate(names):
            data = b"" if name == "000000003.txt" else f"member {i} {name}".encode() * (i + 1)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        folder_info = tarfile.TarInfo("a-folder")
        folder_info.type = tarfile.DIRTYPE
        tar.addfile(folder_info)
        link = tarfile.TarInfo("000000005.txt")
        link.type, link.linkname = tarfile.SYMTYPE, "000000000.txt"
        tar.addfile(link)
    with tarfile.open(path, "r|*") as tar:
        expected = [(m.name, tar.extractfile(m).read() if m.name.endswith(".txt") else None)
                    for m in tar if m.isfile()]
    with open_tar(path) as stream:
        assert list(members(stream, {"txt"})) == expected
    assert len(expected) == len(names)


def test_the_tar_reader_accepts_what_tarfile_accepts(tmp_path):
    """Archives tarfile reads that tarfile itself does not write: no end-of-archive blocks, a header checksum
    summed over signed bytes (old Sun tar), macOS's ._ AppleDouble members (skipped, as webdataset does)."""
    from clipcond.precompute.tar import members, open_tar, samples

    path = write_tar(tmp_path / "t.tar", [sample(i, f"caption {i}") for i in range(3)])
    with tarfile.open(path) as tar:
        last = tar.getmembers()[-1]
        end = last.offset_data + -(-last.size // 512) * 512
    data = bytearray(path.read_bytes()[:end])  # every member, no zero blocks after them
    header = data.index(b"000000001.txt") // 512 * 512
    data[header + 99] = 0xE9  # a byte >= 0x80 in the name field (after its NUL): summed signed, as old tars did
    block = data[header : header + 512]
    signed = sum(b - 256 if b >= 0x80 else b for b in block[:148] + block[156:]) + 256  # the field as 8 spaces
    data[header + 148 : header + 156] = b"%06o\0 " % signed
    path.write_bytes(bytes(data))
    with tarfile.open(path, "r|*") as tar:
        expected = [(m.name, tar.extractfile(m).read() if m.name.endswith(".txt") else None) for m in tar]
    with open_tar(path) as stream:
        assert list(members(stream, {"txt"})) == expected and len(expected) == 9

    apple = write_tar(tmp_path / "mac.tar", [{"__key__": b"._000000000", "txt": b"\0\5\x16\7"}, sample(0, "a")])
    assert [key for key, _ in samples(apple, {"txt"})] == ["000000000"]


def test_an_empty_tar_is_an_error_and_one_without_end_blocks_a_warning(tmp_path, tc, caplog):
    (tmp_path / "00000.tar").write_bytes(b"")
    with pytest.raises(ValueError, match=r"00000.tar: truncated or damaged tar \(ReadError: empty file\)"):
        run(tc, tmp_path / "00000.tar", tmp_path / "store")
    path = write_tar(tmp_path / "00001.tar", [sample(i, f"caption {i}") for i in range(2)])
    path.write_bytes(path.read_bytes().rstrip(b"\0") + b"\0" * (-len(path.read_bytes().rstrip(b"\0")) % 512))
    assert run(tc, path, tmp_path / "cut")["rows"] == 2
    assert "00001.tar: no end-of-archive marker after its last member" in caplog.text


def test_a_damaged_pax_record_is_an_error_not_a_hang():
    from clipcond.precompute.tar import pax_records

    assert pax_records(b"18 path=a/b/c.txt\n11 size=42\n") == {"path": "a/b/c.txt", "size": "42"}
    for damaged in (b"00 path=x\n", b"5 path=a/b/c.txt\n", b"99 path=x\n", b"x path=y\n", b"11 pathxyz\n",
                    b"11 size=-1\n"):
        with pytest.raises(tarfile.ReadError, match="damaged pax header record at byte 0"):
            pax_records(damaged)


def test_a_tar_header_with_a_bad_checksum_is_an_error_naming_the_sample(tmp_path, tc):
    path = write_tar(tmp_path / "00000.tar", [sample(i, f"caption {i}") for i in range(3)])
    data = bytearray(path.read_bytes())
    second = data.index(b"000000001.jpg")  # the header of sample 1's first member
    data[second + 1] ^= 1  # its name, one bit: the header checksum no longer matches
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"00000.tar: truncated or damaged tar at sample '000000000' "
                                         rf"\(ReadError: bad header checksum at byte {second}\)"):
        run(tc, path, tmp_path / "store")


def test_a_key_repeated_across_tars_is_an_error(tmp_path, tc):
    """The error named the glob and a row counted across all files ("*.tar ... rows 1 and 2"); it names each
    tar and the row within it."""
    write_tar(tmp_path / "00000.tar", [sample(0, "a"), sample(1, "b")])
    write_tar(tmp_path / "00001.tar", [sample(1, "c")])
    with pytest.raises(ValueError, match=r"id column '__key__' repeats id '000000001': \S*00000.tar row 1 and "
                                         r"\S*00001.tar row 0;"):
        run(tc, str(tmp_path / "*.tar"), tmp_path / "store")


def test_a_damaged_row_is_caught_on_read_and_verify_re_encodes_exactly_its_shard(tmp_path, tc):
    # 64 bytes overwritten in place (same size: what bit rot or a torn write leaves) inside shard 1.
    path = write_input(tmp_path, "txt", BASE)
    out = tmp_path / "store"
    run(tc, path, out, shard_size=8)
    clean = {k: v for k, v in shard_bytes(out).items()}
    shard = out / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    row_bytes = 77 * 32 * 4
    data[header + 3 * row_bytes + 100 : header + 3 * row_bytes + 164] = b"\xff" * 64  # row 3: now NaNs
    shard.write_bytes(bytes(data))
    store = EmbeddingStore(out)  # sizes still match: opening cannot tell
    store[10]  # another row of the same shard reads fine
    with pytest.raises(ValueError, match=r"shard-00001.safetensors row 3 \(store row 11, variant 0\): checksum "
                                         r"mismatch, the shard is damaged on disk; rerun .* with --verify"):
        store[11]
    with pytest.raises(ValueError, match=r"shard-00001.safetensors row 3 \(store row 11, variant 0\): checksum"):
        next(iter(DataLoader(store, batch_size=4, sampler=range(8, 12))))  # the batched fetch checks each row
    assert len(store.__getitems__([10, 12, 9])) == 3
    assert run(tc, path, out)["run"] == {"encoded": 0, "reused": 30}  # without --verify: sizes only
    assert run(tc, path, out, verify=True)["run"] == {"encoded": 8, "reused": 22}  # that shard's captions
    repaired = EmbeddingStore(out, verify=True)
    assert not shard.exists() and {k: v for k, v in shard_bytes(out).items() if k in clean} == {
        k: v for k, v in clean.items() if k != shard.name}
    torch.testing.assert_close(rows_of(repaired)[0], tc(BASE).sequence, **TOL)


def test_torchrun_incremental_equals_one_process(tmp_path):
    # An incremental run split across ranks: each encodes its share of the captions rank 0 found missing.
    first = write_input(tmp_path / "v1", "jsonl", [f"caption number {i}" for i in range(30)], ids=list(range(30)))
    grown = write_input(tmp_path / "v2", "jsonl", [f"caption number {i}" for i in range(70)], ids=list(range(70)))
    base = tmp_path / "base"
    finished(cli(*PRECOMPUTE, "--input", str(first), "--id-column", "id", "--out", str(base)))
    one, two = tmp_path / "one", tmp_path / "two"
    shutil.copytree(base, one)
    shutil.copytree(base, two)
    args = [*PRECOMPUTE, "--input", str(grown), "--id-column", "id"]
    finished(cli(*args, "--out", str(one)))
    run_module = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    assert "40 encoded, 30 reused" in finished(cli(*run_module, *args, "--out", str(two)))
    assert json.loads((two / MANIFEST).read_text()) == json.loads((one / MANIFEST).read_text())
    assert shard_bytes(two) == shard_bytes(one)


# --- the scan cache: an update reads only new and changed files -------------------------------------
COLUMNS = ["txt", "json:caption"]


@pytest.fixture
def settled(monkeypatch) -> None:
    """Files as a dataset's are, changed long before they are scanned: the cache takes files changed just now."""
    monkeypatch.setattr("clipcond.precompute.scan_cache.RACY_NS", 0)


def counting_tar_reads(monkeypatch) -> list[str]:
    """The names of the tars the scan reads (parses), in order."""
    from clipcond.precompute import inputs

    reads, tar = [], inputs.READERS[".tar"]

    def counted(path: Path, *args: object):  # noqa: ANN202
        reads.append(path.name)
        yield from tar(path, *args)

    monkeypatch.setitem(inputs.READERS, ".tar", counted)
    return reads


def test_a_scan_from_the_cache_equals_a_scan_of_the_files(tmp_path, monkeypatch, settled):
    """Every array and file of the scan (texts, keys, lengths, ids, the index, the input's sha256) as a scan
    without a cache gives, for files all cached, and for a mix of cached and new files."""
    from clipcond.precompute.scan import FILES, scan_captions
    from clipcond.precompute.scan_cache import ScanCache

    tars = [write_tar(tmp_path / f"{t:05d}.tar", [sample(10 * t + i, BASE[(7 * t + i) % 30]) for i in range(10)])
            for t in range(3)]
    glob, cache = str(tmp_path / "*.tar"), ScanCache(tmp_path / "cache")
    reads = counting_tar_reads(monkeypatch)

    def scan(with_cache: bool):  # noqa: ANN202
        return scan_captions(glob, column=COLUMNS, folder=tmp_path, cache=cache if with_cache else None)

    with scan(True):
        assert reads == ["00000.tar", "00001.tar", "00002.tar"] and len(list(cache.folder.glob("*.scan"))) == 3
    tars[1].unlink()  # a mix: 00000 cached, 00003 new
    write_tar(tmp_path / "00003.tar", [sample(40 + i, f"new caption {i}") for i in range(4)])
    for expected_reads in (["00003.tar"], []):
        reads.clear()
        with scan(True) as cached, scan(False) as read:
            assert reads == [*expected_reads, "00000.tar", "00002.tar", "00003.tar"]  # then the uncached scan
            assert cached.sha256 == read.sha256 and cached.has_ids and read.has_ids
            for name in ("rows", "keys", "spans"):
                assert np.array_equal(getattr(cached, name), getattr(read, name)), name
            for name in [*FILES, "id_offsets", "id_sorted_hash", "id_sorted_rows"]:
                assert cached.folder.file(name).read_bytes() == read.folder.file(name).read_bytes(), name
    assert len(list(cache.folder.glob("*.scan"))) == 3  # 00001's entry pruned with its file


def test_an_update_reads_only_new_and_changed_files_and_equals_a_fresh_store(tmp_path, tc, monkeypatch, settled):
    """00000.tar is rewritten in place with one caption changed, keeping its size, inode and mtime (as ``cp -p``
    over it or an unpacked archive with fixed times would): only its ctime tells; 00002.tar is new."""
    tars = [write_tar(tmp_path / f"{t:05d}.tar", [sample(10 * t + i, BASE[10 * t + i]) for i in range(10)])
            for t in range(2)]
    glob, out = str(tmp_path / "*.tar"), tmp_path / "store"
    reads = counting_tar_reads(monkeypatch)
    run(tc, glob, out, column=COLUMNS)
    before = tars[0].stat()
    with open(tars[0], "r+b") as f:
        data = f.read().replace(BASE[3].encode(), BASE[3][::-1].encode())
        f.seek(0)
        f.write(data)
    os.utime(tars[0], ns=(before.st_atime_ns, before.st_mtime_ns))
    after = tars[0].stat()
    assert (after.st_size, after.st_ino, after.st_mtime_ns) == (before.st_size, before.st_ino, before.st_mtime_ns)
    write_tar(tmp_path / "00002.tar", [sample(20 + i, f"a new caption {i}") for i in range(5)])
    reads.clear()
    assert run(tc, glob, out, column=COLUMNS)["run"]["encoded"] == 1 + 5 * 2  # the edit, and 5 new samples' two
    assert reads == ["00000.tar", "00002.tar"]
    reads.clear()
    fresh = run(tc, glob, tmp_path / "fresh", column=COLUMNS)  # no cache there: every file read
    assert reads == ["00000.tar", "00001.tar", "00002.tar"]
    store, reference = EmbeddingStore(out), EmbeddingStore(tmp_path / "fresh")
    assert_same_rows(store, reference)
    assert store.manifest.input.sha256 == fresh["input"]["sha256"]
    assert store.row_of("000000003") == 3 and store.id_of(24) == "000000024"


def test_the_scan_cache_is_only_a_cache(tmp_path, monkeypatch):
    """A file changed within RACY_NS of its scan is not cached. Entries cut short, with a damaged header, or
    with a changed byte of the same size are read past (the file is read again, the entry rewritten whole);
    a half-written one a killed scan left is removed once old, and so is an entry whose file is gone."""
    from clipcond.precompute.scan import scan_captions
    from clipcond.precompute.scan_cache import ScanCache

    tar = write_tar(tmp_path / "00000.tar", [sample(i, BASE[i]) for i in range(5)])
    other = write_tar(tmp_path / "00001.tar", [sample(10 + i, BASE[10 + i]) for i in range(3)])
    cache = ScanCache(tmp_path / "cache")
    reads = counting_tar_reads(monkeypatch)

    def scan(path: Path = tar) -> list[str]:
        reads.clear()
        with scan_captions(str(path), column=COLUMNS, folder=tmp_path, cache=cache) as result:
            return list(result.captions())

    expected = scan()
    assert not list(cache.folder.glob("*.scan"))  # just written: not cached
    monkeypatch.setattr("clipcond.precompute.scan_cache.RACY_NS", 0)
    scan(other)
    (other_entry,) = cache.folder.glob("*.scan")
    scan()
    (entry,) = set(cache.folder.glob("*.scan")) - {other_entry}
    whole = entry.read_bytes()
    assert scan() == expected and reads == []
    header_at = len(whole) - 8 - int.from_bytes(whole[-8:], "little")
    at = whole.index(BASE[3].encode())
    for damaged in (whole[:-10], whole[:header_at] + whole[header_at:].replace(b'"rows"', b'"rowz"'),
                    whole[:at] + BASE[3].upper().encode() + whole[at + len(BASE[3]) :]):
        entry.write_bytes(damaged)
        assert scan() == expected and reads == ["00000.tar"]
        assert entry.read_bytes() == whole
    leftover = entry.with_name(f".{entry.name}.tmp-1-0")
    leftover.write_bytes(whole[:100])
    os.utime(leftover, ns=(0, 0))  # old
    other_entry.write_bytes(b"x" * 50)  # damaged, and its file gone: pruned without a fuss
    other.unlink()
    scan()
    assert sorted(cache.folder.iterdir()) == [entry]


def index_rows(out: Path) -> tuple[np.ndarray, np.ndarray]:
    """The published index's ``rows`` [N, kmax] and the caption key of each row's slots [N, kmax, 16] (zeros
    where a row has no such variant), read with safetensors (not clipcond's reader)."""
    from safetensors.numpy import load_file

    index = load_file(out / json.loads((out / MANIFEST).read_text())["index"]["file"])
    rows = index["rows"]
    return rows, np.where((rows >= 0)[..., None], index["keys"][rows], 0)


def test_a_cached_file_of_other_variant_counts_than_the_rows_before_equals_an_uncached_run(tmp_path, tc, settled):
    """Issue 17, defect 2: files whose rows hold different numbers of variants (3, then 2) were refused ("every
    row needs the same number of variants"), from the cache or not; now each row keeps its own."""
    lists = tmp_path / "b.jsonl"
    lists.write_text("".join(json.dumps({"caption": [f"x {i}", f"y {i}", f"z {i}"]}) + "\n" for i in range(3)))
    run(tc, lists, tmp_path / "store")  # b.jsonl now cached: 3 variants a row
    pairs = tmp_path / "a.jsonl"
    pairs.write_text("".join(json.dumps({"caption": [f"x {i}", f"w {i}"]}) + "\n" for i in range(3)))
    cached = run(tc, [pairs, lists], tmp_path / "store")
    fresh = run(tc, [pairs, lists], tmp_path / "fresh")
    assert cached["variants"] == fresh["variants"] == 3 and cached["input"]["sha256"] == fresh["input"]["sha256"]
    (rows, keys), (fresh_rows, fresh_keys) = index_rows(tmp_path / "store"), index_rows(tmp_path / "fresh")
    assert np.array_equal(rows == -1, fresh_rows == -1) and np.array_equal(keys, fresh_keys) and rows.shape == (6, 3)
    assert (rows[:3, 2] == -1).all() and (rows[3:] >= 0).all() and (rows[:3, :2] >= 0).all()
    assert rows[0, 0] == rows[3, 0]  # "x 0" stored once


def test_gc_refuses_a_damaged_index_instead_of_publishing_it_checked(tmp_path, tc):
    """gc read the index without its sha256 and rewrote it under a fresh one: a flipped slot (row 0 -> the
    slot of another caption, whose own row check passes) came out as a healthy store serving the wrong
    embedding. Now gc reads the index through IndexFormat.read, which checks it, and publishes nothing."""
    out = tmp_path / "store"
    run(tc, write_input(tmp_path / "v1", "txt", ["a", "b", "c", "d"]), out)
    run(tc, write_input(tmp_path / "v2", "txt", ["a", "b", "c"]), out)  # "d" unreferenced: gc has work to do
    manifest = json.loads((out / MANIFEST).read_text())
    index = out / manifest["index"]["file"]
    data = bytearray(index.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little")
    rows = json.loads(data[8:start])["rows"]["data_offsets"][0]
    assert data[start + rows] == 0  # row 0 is slot 0 ("a")...
    data[start + rows] = 1  # ...now slot 1 ("b")
    index.write_bytes(bytes(data))
    listed = [MANIFEST, manifest["index"]["file"], *(shard["file"] for shard in manifest["shards"])]
    before = {name: (out / name).read_bytes() for name in listed}
    with pytest.raises(ValueError, match=rf"{manifest['index']['file']}: corrupted: sha256"):
        collect(out)
    assert {name: (out / name).read_bytes() for name in listed} == before  # nothing published, nothing lost


@pytest.mark.parametrize("damage", ["flipped", "deleted"])
def test_a_damaged_or_deleted_index_is_repaired_by_the_same_precompute(tmp_path, tc, damage):
    """Bug: the repair hint ("delete the damaged file(s) and rerun the same `clipcond precompute` command") failed
    for the index: the rerun stopped at "index-....safetensors: missing". Without its index no stored slot can be
    matched to its caption, so the rerun encodes every caption again and publishes a whole store."""
    out, path = tmp_path / "store", write_input(tmp_path / "v1", "txt", ["a", "b", "c"])
    run(tc, path, out)
    reference = rows_of(EmbeddingStore(out))
    index = out / json.loads((out / MANIFEST).read_text())["index"]["file"]
    if damage == "flipped":
        data = bytearray(index.read_bytes())
        data[-1] ^= 0x01
        index.write_bytes(bytes(data))
    else:
        index.unlink()
    with pytest.raises((ValueError, FileNotFoundError), match="(?s)" + re.escape(index.name) + ".*rerun the same"):
        EmbeddingStore(out)
    assert run(tc, path, out)["run"]["encoded"] == 3
    store = EmbeddingStore(out, verify=True)
    assert all(torch.equal(a, b) for a, b in zip(rows_of(store), reference, strict=True))
    assert sorted(p.name for p in out.glob("shard-*")) == ["shard-00001.safetensors"]  # the old shard is gone


def test_an_unreadable_index_stops_the_run_and_keeps_every_shard(tmp_path, tc, monkeypatch):
    """Bug: an index that cannot be read for a reason that is no damage (permissions, an I/O error) was taken
    for a damaged one: every shard deleted and the whole store encoded again."""
    import clipcond.precompute.plan as plan_module

    out, path = tmp_path / "store", write_input(tmp_path / "v1", "txt", ["a", "b", "c"])
    run(tc, path, out)
    before = shard_bytes(out)

    def unreadable(root, manifest):
        raise PermissionError(13, "Permission denied", str(root / manifest.index.file))

    monkeypatch.setattr(plan_module.IndexFormat, "read", staticmethod(unreadable))
    with pytest.raises(PermissionError, match="Permission denied"):
        run(tc, write_input(tmp_path / "v2", "txt", ["a", "b", "c", "d"]), out)
    assert shard_bytes(out) == before


def test_an_input_reshaped_into_other_rows_is_planned_again(tmp_path, tc):
    """A file of 2 rows x 2 captions rewritten as 4 rows x 1 caption hashed alike (row boundaries entered the
    input's sha256 only for ragged files), so precompute said "complete already" and kept 2 rows for 4."""
    path = tmp_path / "c.jsonl"
    path.write_text('{"caption": ["a", "b"]}\n{"caption": ["c", "d"]}\n')
    out = tmp_path / "store"
    assert main(["precompute", "--encoder", "tiny-sd15", "--input", str(path), "--out", str(out)]) == 0
    assert (len(EmbeddingStore(out)), EmbeddingStore(out).variants) == (2, 2)
    path.write_text("".join(f'{{"caption": ["{c}"]}}\n' for c in "abcd"))
    assert main(["precompute", "--encoder", "tiny-sd15", "--input", str(path), "--out", str(out)]) == 0
    store = EmbeddingStore(out)
    assert (len(store), store.variants) == (4, 1)
    torch.testing.assert_close(rows_of(store)[1], tc(list("abcd")).pooled, **TOL)
