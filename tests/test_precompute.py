"""``clipcond precompute``: every input format, dedup, refusal, crash safety (SIGKILL), torchrun, errors.

Store rows are compared with ``tc(captions)`` computed in the same test on the same conditioner.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pytest
import torch

from clipcond import EmbeddingStore, TextConditioner
from clipcond.cli import main
from clipcond.precompute.encode import DELAY_ENV
from clipcond.precompute.job import PrecomputeJob, precompute
from clipcond.precompute.scan import ScanFolder, scan_captions
from clipcond.store.format import TMP_MARK, StoreFiles
from clipcond.store.manifest import MANIFEST

TOL = {"atol": 1e-5, "rtol": 1e-5}  # float32 on CPU; batches differ from the direct call's
CAPTIONS = [
    "a photo of a cat", "a running dog", "", "a photo of a cat", "An astronaut, riding a horse; on Mars",
    'quotes "inside" and \'single\'', "emoji 🐱 and accents: café naïve", "a running dog", "tabs\tand  spaces",
    "a very long prompt " + "with many repeated words " * 30, "(masterpiece:1.2), [blurry]", "a photo of a cat",
]
FORMATS = ["txt", "jsonl", "csv", "parquet", "hf"]


def write_input(folder: Path, fmt: str, captions: list[str], ids: list | None = None) -> Path:
    """The same table as .txt / .jsonl / .csv / .parquet / a saved Hugging Face dataset."""
    folder.mkdir(parents=True, exist_ok=True)
    table = {"caption": captions, **({"id": ids} if ids is not None else {})}
    path = folder / ("data" if fmt == "hf" else f"data.{fmt}")
    if fmt == "txt":
        path.write_text("".join(c + "\n" for c in captions), encoding="utf-8")
    elif fmt == "jsonl":
        rows = [dict(zip(table, values, strict=True)) for values in zip(*table.values(), strict=True)]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    elif fmt == "csv":
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(table)
            writer.writerows(zip(*table.values(), strict=True))
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table(table), path, row_group_size=5)  # several row groups: streamed in pieces
    else:
        datasets = pytest.importorskip("datasets")
        datasets.Dataset.from_dict(table).save_to_disk(str(path))
    return path


def run(tc: TextConditioner, path: Path, out: Path, **job: object) -> dict:
    return precompute(tc, PrecomputeJob(input=path, out=out, progress=False, **job))


def stacked(store: EmbeddingStore) -> tuple[torch.Tensor, torch.Tensor]:
    rows = [store[i] for i in range(len(store))]
    return torch.stack([r["sequence"] for r in rows]), torch.stack([r["pooled"] for r in rows])


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_input_format_matches_direct_encoding(tmp_path, sd15, fmt):
    captions = CAPTIONS + ([] if fmt == "txt" else ["two\nlines, quoted"])  # a caption per line in .txt
    ids = None if fmt == "txt" else [f"img-{i:03d}" for i in range(len(captions))]
    path = write_input(tmp_path, fmt, captions, ids)
    manifest = run(sd15, path, tmp_path / "store", id_column=None if ids is None else "id", batch_size=4,
                   shard_size=3)
    assert manifest["complete"] and manifest["rows"] == len(captions)
    assert manifest["unique"] == len(set(captions)) and manifest["truncated"] == 1
    store = EmbeddingStore(tmp_path / "store")
    sequence, pooled = stacked(store)  # [N, 77, 32], [N, 32]
    ref = sd15(captions)
    torch.testing.assert_close(sequence, ref.sequence, **TOL)
    torch.testing.assert_close(pooled, ref.pooled, **TOL)
    assert torch.equal(store.null().sequence, sd15.null(1).sequence)  # SD1: "" encoded
    assert store.fingerprint == sd15.fingerprint and store.spec == sd15.spec and store.dtype == torch.float32
    if ids is not None:
        assert store.row_of("img-004") == 4 and store.id_of(7) == "img-007"
        assert torch.equal(store.by_id("img-004")["sequence"], store[4]["sequence"])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_store_keeps_the_dtype(tmp_path, dtype):
    tc = TextConditioner.from_pretrained("tiny-sdxl", dtype=dtype)
    path = write_input(tmp_path, "txt", CAPTIONS)
    manifest = run(tc, path, tmp_path / "store", batch_size=4)
    store = EmbeddingStore(tmp_path / "store")
    assert manifest["dtype"] == str(dtype).removeprefix("torch.") and store.dtype == dtype
    sequence, pooled = stacked(store)
    assert sequence.dtype == pooled.dtype == store.null().sequence.dtype == dtype
    ref = tc(CAPTIONS)
    torch.testing.assert_close(sequence, ref.sequence, atol=2e-2, rtol=2e-2)  # half precision, other batches
    torch.testing.assert_close(pooled, ref.pooled, atol=2e-2, rtol=2e-2)


def test_dedup_encodes_each_caption_once_in_first_appearance_order(tmp_path, sdxl):
    captions = [CAPTIONS[i % 7] + f" {i % 37}" for i in range(400)]  # 222 distinct of 400
    path = write_input(tmp_path, "parquet", captions)
    manifest = run(sdxl, path, tmp_path / "store", batch_size=16, shard_size=32)
    unique = list(dict.fromkeys(captions))
    assert (manifest["rows"], manifest["unique"]) == (400, len(unique)) and len(unique) == 222
    assert sum(s["stop"] - s["start"] for s in manifest["shards"]) == len(unique)
    assert [s["start"] for s in manifest["shards"]] == list(range(0, len(unique), 32))
    store = EmbeddingStore(tmp_path / "store")
    assert torch.equal(store._rows[:, 0], torch.tensor([unique.index(c) for c in captions]))
    sequence, pooled = stacked(store)
    ref = sdxl(unique)
    torch.testing.assert_close(sequence, ref.sequence[store._rows[:, 0]], **TOL)
    torch.testing.assert_close(pooled, ref.pooled[store._rows[:, 0]], **TOL)
    assert not store.null().sequence.any()  # SDXL: zeros


def test_limit_and_resume_of_a_complete_store_changes_nothing(tmp_path, sd15):
    path = write_input(tmp_path, "jsonl", CAPTIONS)
    out = tmp_path / "store"
    first = run(sd15, path, out, limit=5, shard_size=2)
    assert first["rows"] == 5 and first["input"]["limit"] == 5
    rewritten = [MANIFEST, ".clipcond.lock"]  # the lock file records each run's pid
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name not in rewritten}
    again = run(sd15, path, out, limit=5)  # --shard-size omitted: the store's own
    assert {**again, "run": None} == {**first, "run": None}
    assert first["run"] == {"encoded": 4, "reused": 0} and again["run"] == {"encoded": 0, "reused": 4}
    assert stamps == {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name not in rewritten}
    killed = out / f"{StoreFiles.SCAN}99999-abc"  # a scan killed (say, out of memory) on this complete store...
    killed.mkdir()
    (killed / "lock").touch()
    run(sd15, path, out, limit=5)
    assert not killed.exists()  # ...is removed by the next run, even one with nothing to do


def test_scan_folders_are_locked_before_they_are_named_and_half_made_ones_expire(tmp_path):
    from clipcond.store.locks import remove_stale_scans

    live = ScanFolder.create(tmp_path)
    assert live.path.name.startswith(StoreFiles.SCAN) and (live.path / "lock").exists()
    assert not list(tmp_path.glob(f"{StoreFiles.SCAN_NEW}*"))  # renamed once locked
    half = [tmp_path / f"{StoreFiles.SCAN_NEW}{n}" for n in ("1-old", "2-young")]  # killed while making one
    for path in half:
        path.mkdir()
    os.utime(half[0], (time.time() - 3600,) * 2)
    remove_stale_scans(tmp_path)
    assert live.path.exists() and not half[0].exists() and half[1].exists()
    live.remove()
    assert not live.path.exists()


def test_resume_repairs_what_a_crash_leaves(tmp_path, sd15):
    path = write_input(tmp_path, "txt", CAPTIONS * 3)
    clean = run(sd15, path, tmp_path / "clean", shard_size=2, batch_size=2)
    out = tmp_path / "crashed"
    run(sd15, path, out, shard_size=2, batch_size=2)
    manifest = json.loads((out / MANIFEST).read_text())
    (out / MANIFEST).write_text(json.dumps({**manifest, "complete": False, "shards": manifest["shards"][:2]}))
    (out / "shard-00001.safetensors").write_bytes(b"partial")  # never happens (atomic), still handled
    (out / "shard-00003.safetensors").unlink()
    (out / "shard-00004.json").write_text(json.dumps(manifest["shards"][4]))  # a sidecar whose shard...
    (out / "shard-00004.safetensors").unlink()  # ...was killed before its rename
    (out / f".shard-00005.safetensors{TMP_MARK}99999").write_bytes(b"half a shard")
    killed = out / f"{StoreFiles.SCAN}99999-abc"  # a killed run's scan folder: its lock file held by nobody
    killed.mkdir()
    (killed / "lock").touch()
    (killed / "texts").write_bytes(b"captions")
    live = ScanFolder.create(out)  # a running part's scan folder (this process holds its lock)
    resumed = run(sd15, path, out)
    assert resumed == clean
    assert not killed.exists() and (live.path / "lock").exists()
    live.remove()
    assert not [p for p in out.iterdir() if TMP_MARK in p.name or p.suffix == ".json" and p.name != MANIFEST]
    EmbeddingStore(out, verify=True)


def test_a_damaged_null_is_rewritten_to_the_bytes_the_manifest_records(tmp_path, sd15):
    path = write_input(tmp_path, "txt", CAPTIONS)
    out = tmp_path / "store"
    run(sd15, path, out, shard_size=4)
    before = (out / MANIFEST).read_bytes()
    (out / "null.safetensors").write_bytes(b"damaged")
    with pytest.raises(ValueError, match="null.safetensors: truncated or overwritten"):
        EmbeddingStore(out)
    assert run(sd15, path, out)["run"] == {"encoded": 0, "reused": 9}
    assert (out / MANIFEST).read_bytes() == before  # the same version, its null whole again
    EmbeddingStore(out, verify=True)


@pytest.mark.parametrize("change", ["encoder", "weights", "dtype", "shard_size"])
def test_a_store_made_differently_is_refused(tmp_path, sd15, change):
    path = write_input(tmp_path, "txt", CAPTIONS)
    out = tmp_path / "store"
    run(sd15, path, out, shard_size=4)
    tc, job = sd15, {"shard_size": 4}
    if change == "encoder":
        tc = TextConditioner.from_pretrained("tiny-sd2")
    elif change == "weights":
        tc = TextConditioner.from_pretrained("tiny-sd15")
        with torch.no_grad():
            tc.towers[0].token_embedding.weight[0] += 1
    elif change == "dtype":
        tc = TextConditioner.from_pretrained("tiny-sd15", dtype=torch.bfloat16)
    else:
        job = {"shard_size": 5}
    key = {"encoder": "encoder", "weights": "fingerprint", "dtype": "dtype", "shard_size": "shard_size"}[change]
    before = (out / MANIFEST).read_bytes()
    with pytest.raises(ValueError, match="holds a store made differently; refusing to add to it") as err:
        run(tc, path, out, **job)
    assert f"\n  {key}: the store has " in str(err.value)
    assert (out / MANIFEST).read_bytes() == before


def test_a_foreign_folder_is_refused(tmp_path, sd15):
    path = write_input(tmp_path, "txt", CAPTIONS)
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_bytes(b"jpeg")
    with pytest.raises(ValueError, match=r"photos is not empty and holds no manifest.json \(it has \['cat.jpg'\]\)"):
        run(sd15, path, tmp_path / "photos")


def test_input_errors_name_file_row_and_column(tmp_path, sd15):
    jsonl = write_input(tmp_path, "jsonl", ["a", "b"], ids=[1, 2])
    with pytest.raises(ValueError, match=r"no column 'text'; the columns are \['caption', 'id'\]"):
        run(sd15, jsonl, tmp_path / "s1", column="text")
    parquet = write_input(tmp_path, "parquet", ["a", None, "c"])
    with pytest.raises(ValueError, match=r"data.parquet row 1: column 'caption' must be a string, got NoneType"):
        run(sd15, parquet, tmp_path / "s2")
    dup = write_input(tmp_path / "dup", "csv", ["a", "b", "c"], ids=["x", "y", "x"])
    with pytest.raises(ValueError, match=r"id column 'id' repeats id 'x': \S*data.csv row 0 and \S*data.csv row 2"):
        run(sd15, dup, tmp_path / "s3", id_column="id")
    txt = write_input(tmp_path, "txt", ["a"])
    with pytest.raises(ValueError, match="a .txt input has no columns, so no --id-column"):
        run(sd15, txt, tmp_path / "s4", id_column="id")
    (tmp_path / "data.tsv").write_text("a\n")
    with pytest.raises(ValueError, match=r"unknown input type '.tsv'"):
        run(sd15, tmp_path / "data.tsv", tmp_path / "s5")
    with pytest.raises(ValueError, match=r"PrecomputeJob.batch_size must be >= 1, got 0"):
        PrecomputeJob(input=txt, out=tmp_path, batch_size=0)
    chunked = TextConditioner.from_pretrained("tiny-sd15", long_prompts="chunk")
    with pytest.raises(ValueError, match=r"precompute stores \[77, D\] sequences; .* long_prompts='chunk'"):
        run(chunked, txt, tmp_path / "s6")


def test_csv_ids_stay_text_and_int_ids_are_found_by_int(tmp_path, sd15):
    csv_path = write_input(tmp_path / "c", "csv", ["a", "b"], ids=["00123", "7"])
    run(sd15, csv_path, tmp_path / "c" / "store", id_column="id")
    store = EmbeddingStore(tmp_path / "c" / "store")
    assert store.id_of(0) == "00123" and store.row_of(7) == 1
    with pytest.raises(KeyError, match=r"id 123 is not in store"):
        store.row_of(123)


def test_scan_holds_under_64_bytes_a_row_ids_included_and_no_caption_text(tmp_path):
    """Issue 11, item 5: the first pass keeps at most 64 bytes a row beyond the unique captions' text
    (here none of it: texts stay in the scan folder). tracemalloc sees Python's and numpy's allocations."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = 200_000  # half the captions unique, long ids: the index and the id table at their largest
    captions = [f"caption number {i % (n // 2)} of a table that is big enough to measure" for i in range(n)]
    ids = [f"laion-2b-en/{i:09d}" for i in range(n)]
    path = tmp_path / "big.parquet"
    pq.write_table(pa.table({"caption": captions, "key": ids}), path, row_group_size=20_000)
    tracemalloc.start()
    with scan_captions(path, id_column="key", folder=tmp_path) as scan:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert scan.rows.shape == (n, 1) and scan.unique == n // 2 and scan.has_ids
        assert len(list(tmp_path.glob(".scan*"))) == 1
        assert list(scan.captions(scan.rows[[0, n - 1], 0])) == [captions[0], captions[n - 1]]
    batch = 8 * 2**20  # one READ_BATCH of rows as Python objects, and pyarrow's buffers
    assert peak < 64 * n + batch, f"scan peaked at {peak / n:.0f} bytes a row beyond one batch"
    assert not list(tmp_path.glob(".scan*")), "the scan folder is removed on close"


def test_a_failing_writer_stops_the_pipeline_with_its_error(tmp_path, sd15, monkeypatch):
    import clipcond.precompute.encode as pipeline
    import clipcond.store.format as store_format  # the sidecar's writer

    path = write_input(tmp_path, "txt", CAPTIONS * 4)
    calls = []

    def failing_write(target: Path, data: bytes) -> None:
        calls.append(target.name)
        if target.name == "shard-00001.json":  # the sidecar, written once the shard is on disk
            raise OSError(28, "No space left on device")
        real_write(target, data)

    real_write = store_format.atomic_write
    monkeypatch.setattr(store_format, "atomic_write", failing_write)
    with pytest.raises(OSError, match="No space left on device"):
        run(sd15, path, tmp_path / "store", shard_size=2, batch_size=1)
    # Stopped there (no hang); the shards already handed to the fsync thread are finished, no more.
    assert "shard-00001.json" in calls and f"shard-{1 + pipeline.FLUSHING + 1:05d}.json" not in calls
    assert not [p.name for p in (tmp_path / "store").iterdir() if TMP_MARK in p.name]  # nor a half shard left


# --- subprocesses: SIGKILL and torchrun ---------------------------------------------------
def cli(*args: str, env: dict | None = None, **popen: object) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}  # equal thread counts: equal bytes
    return subprocess.Popen([sys.executable, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, **popen)


def finished(proc: subprocess.Popen) -> str:
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output
    return output


PRECOMPUTE = ["-m", "clipcond", "-v", "precompute", "--encoder", "tiny-sdxl", "--shard-size", "4", "--batch-size", "2"]


@pytest.fixture(scope="module")
def kill_input(tmp_path_factory) -> tuple[Path, dict]:
    """120 rows, 100 unique captions: 25 shards; and the store a clean run makes of them."""
    root = tmp_path_factory.mktemp("kill")
    path = write_input(root, "jsonl", [f"caption number {i % 100}" for i in range(120)], ids=list(range(120)))
    finished(cli(*PRECOMPUTE, "--input", str(path), "--id-column", "id", "--out", str(root / "clean")))
    return path, json.loads((root / "clean" / MANIFEST).read_text())


def wait_for(predicate: object, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"finished before the kill: {proc.communicate()[0]}"
        assert time.monotonic() < deadline, "timed out waiting for the run to get going"
        time.sleep(0.01)


@pytest.mark.parametrize("kill_after", [0, 6])
def test_sigkill_then_rerun_loses_and_duplicates_nothing(tmp_path, kill_input, kill_after):
    path, clean = kill_input
    out = tmp_path / "store"
    args = [*PRECOMPUTE, "--input", str(path), "--id-column", "id", "--out", str(out)]
    proc = cli(*args, env={DELAY_ENV: "0.05"})  # 50 batches, ~2.5 s: the kill lands mid-run
    if kill_after == 0:
        wait_for(lambda: (out / MANIFEST).exists(), proc)
    else:
        wait_for(lambda: len(list(out.glob("shard-*.safetensors"))) >= kill_after, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed = json.loads((out / MANIFEST).read_text())
    assert not killed["complete"]
    with pytest.raises(ValueError, match="incomplete: .* rerun the same `clipcond precompute` command"):
        EmbeddingStore(out)
    output = finished(cli(*args))
    assert "rank 0/1: " in output and "120: 100 unique" in output
    assert json.loads((out / MANIFEST).read_text()) == clean  # every shard byte-identical to a clean run
    store = EmbeddingStore(out, verify=True)
    assert len(store) == 120 and store.num_unique == 100 and store.row_of(119) == 119
    assert not [p for p in out.iterdir() if TMP_MARK in p.name]


def test_torchrun_two_processes_equal_one(tmp_path, kill_input):
    path, clean = kill_input
    out = tmp_path / "store"
    run_module = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    output = finished(cli(*run_module, *PRECOMPUTE, "--input", str(path), "--id-column", "id", "--out", str(out)))
    assert "rank 0/2: 13 shards to encode" in output and "rank 1/2: 12 shards to encode" in output
    assert output.count("scan: 120 rows") == 1  # the input is read once a job: rank 1 reads rank 0's scan
    assert json.loads((out / MANIFEST).read_text()) == clean
    EmbeddingStore(out, verify=True)
    # Rank 0 refuses a store made differently; rank 1 hears of it and stops too (no hang at a barrier).
    refused = cli(*run_module, *[a if a != "tiny-sdxl" else "tiny-sd15" for a in PRECOMPUTE], "--input", str(path),
                  "--out", str(out))
    output = refused.communicate(timeout=300)[0]
    assert refused.returncode != 0 and "refusing to add to it" in output and "rank 0 failed: ValueError" in output


def test_cli_prints_the_store_and_reports_errors(tmp_path, capsys):
    path = write_input(tmp_path, "txt", CAPTIONS)
    out = tmp_path / "store"
    assert main(["precompute", "--encoder", "tiny-sd15", "--input", str(path), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"rows {len(CAPTIONS)}: {len(set(CAPTIONS))} unique" in text and "complete" in text
    assert main(["precompute", "--encoder", "tiny-sd2", "--input", str(path), "--out", str(out)]) == 2
    assert "clipcond precompute: error: " in capsys.readouterr().err


def test_a_second_run_on_the_same_store_is_refused_while_the_first_holds_it(tmp_path, sd15):
    from clipcond.store.locks import StoreLock

    path = write_input(tmp_path, "txt", CAPTIONS)
    out = tmp_path / "store"
    out.mkdir()
    first = StoreLock(out)  # what a running precompute holds (its own open file: flock conflicts)
    first.acquire()
    try:
        with pytest.raises(ValueError, match=rf"{out} is being written by another clipcond precompute "
                                             rf"\(pid {os.getpid()} on .+\); wait for it"):
            run(sd15, path, out)
    finally:
        first.close()
    assert run(sd15, path, out)["complete"]  # released: the next run proceeds (a killed run releases too)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a clipcond store"):
        run(sd15, path, tmp_path / "other")
    assert sorted(p.name for p in (tmp_path / "other").iterdir()) == ["notes.txt"]  # no lock file left there
