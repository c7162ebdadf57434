"""Caption inputs through ``clipcond precompute`` (clipcond/precompute/inputs.py, tar.py): bad input is an error
naming the file and the row or line, with nothing published and an existing store unchanged; ragged variants.

Every case runs the CLI (``clipcond.cli.main``) as a user would. Stores are read back with safetensors, not with
clipcond's reader, and embeddings compared with ``tc(caption)`` on the same spec, computed in the test.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from safetensors.torch import load_file as load_tensors

from clipcond import TextConditioner
from clipcond.cli import main
from clipcond.store.manifest import MANIFEST

TOL = {"atol": 1e-5, "rtol": 1e-5}  # float32 on CPU; batches differ from the direct call's
VOLATILE = {".clipcond.lock", ".clipcond.scan-cache"}  # the lock records each run's pid; the cache is a cache


@pytest.fixture(scope="module")
def tc() -> TextConditioner:
    return TextConditioner.from_pretrained("tiny-sd15")  # what --encoder tiny-sd15 loads


def precompute(capsys, inputs: list[Path], out: Path, *columns: str, id_column: str | None = None) -> tuple[int, str]:
    """``clipcond precompute`` as a user runs it: (exit code, stderr)."""
    args = ["precompute", "--encoder", "tiny-sd15", "--out", str(out), "--shard-size", "4"]
    args += [a for path in inputs for a in ("--input", str(path))] + [a for c in columns for a in ("--column", c)]
    args += ["--id-column", id_column] if id_column else []
    code = main(args)
    return code, capsys.readouterr().err


def snapshot(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file() and p.name not in VOLATILE}


def refused(capsys, tmp_path: Path, bad: Path, column: str, message: str, id_column: str | None = None) -> None:
    """``bad`` is refused with ``message`` (a regex), into a new --out (nothing published) and into an existing
    store (unchanged, byte for byte)."""
    code, err = precompute(capsys, [bad], tmp_path / "new", column, id_column=id_column)
    assert code == 2, err
    assert err.startswith("clipcond precompute: error: ") and len(err.splitlines()) == 1, err
    assert re.search(message, err), err
    assert not (tmp_path / "new").exists()  # not even an empty folder
    good = tmp_path / "good.txt"
    good.write_text("a cat\na dog\n")
    existing = tmp_path / "existing"
    assert precompute(capsys, [good], existing)[0] == 0
    before = snapshot(existing)
    code, err = precompute(capsys, [bad], existing, column, id_column=id_column)
    assert code == 2 and re.search(message, err), err
    assert snapshot(existing) == before


def stored(out: Path) -> tuple[np.ndarray, dict[int, torch.Tensor]]:
    """The index's rows [N, kmax] and each slot's pooled embedding, read from the files with safetensors."""
    manifest = json.loads((out / MANIFEST).read_text())
    rows = load_file(out / manifest["index"]["file"])["rows"]
    pooled = {}
    for shard in manifest["shards"]:
        tensors = load_tensors(out / shard["file"])
        pooled.update({shard["start"] + i: row for i, row in enumerate(tensors["pooled"])})
    return rows, pooled


def assert_rows_hold(tc: TextConditioner, out: Path, captions: list[list[str]]) -> None:
    """Row i's variants are ``captions[i]``, packed left, -1 after them; each slot holds tc(caption)."""
    rows, pooled = stored(out)
    assert rows.dtype == np.int64 and rows.shape == (len(captions), max(map(len, captions)))
    flat = [c for row in captions for c in row]
    ref = dict(zip(flat, tc(flat).pooled, strict=True))
    for i, row in enumerate(captions):
        assert (rows[i, len(row) :] == -1).all() and (rows[i, : len(row)] >= 0).all(), (i, rows[i])
        for j, caption in enumerate(row):
            torch.testing.assert_close(pooled[int(rows[i, j])], ref[caption], **TOL)


# --- defect 7: CSV quotes --------------------------------------------------------------------------
def stray_quote_csv(path: Path, row: int, line: str, rows: int = 1000) -> Path:
    lines = ["id,caption"] + [line if i == row else f"{i},caption {i}" for i in range(rows)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_a_stray_quote_running_to_the_end_of_a_csv_is_an_error_naming_its_line(tmp_path, capsys):
    """Issue 17, defect 7: row 500 of 1000 reads `499,"a quoted start never closed`; pyarrow's reader took it and
    the 500 rows after it for one caption ("rows 500") and exited 0."""
    bad = stray_quote_csv(tmp_path / "data.csv", 499, '499,"a quoted start never closed')
    refused(capsys, tmp_path, bad, "caption", r"data.csv line 501 \(row 499\): a quoted field opened in this row is "
                                              r"never closed: it runs to the end of the file \(line 1001\)")


def test_a_stray_quote_closed_by_a_later_rows_quote_is_an_error(tmp_path, capsys):
    """The same stray quote, closed 3 rows later by a properly quoted caption's opening quote: pyarrow merged the
    rows between into one caption, silently."""
    bad = stray_quote_csv(tmp_path / "data.csv", 10, '10,"a stray quote', rows=20)
    text = bad.read_text().replace("13,caption 13", '13,"a caption, quoted"')
    bad.write_text(text)
    refused(capsys, tmp_path, bad, "caption", r"data.csv line 12 \(row 10\): a quoted field opened in this row is "
                                              r"closed on line 15 by a quote followed by more text")


def test_a_stray_quote_closed_by_a_quote_at_a_later_lines_end_is_an_error(tmp_path, capsys, caplog, tc):
    """Row 10 opens a quote that row 13's line-final quote closes: the field then ends where a field may end, the
    record has the header's two fields, and rows 11-13 became part of row 10's caption, silently. Two lines inside
    a quoted field that read as rows ("11,caption 11", "12,caption 12" after the row of id "10") are refused; one
    such line may be a caption's own ("Over\n1,000 balloons"): read, with a warning; a multi-line caption whose
    lines do not read as rows reads silently."""
    bad = stray_quote_csv(tmp_path / "data.csv", 10, '10,"a stray quote', rows=20)
    bad.write_text(bad.read_text().replace("13,caption 13\n", '13,caption 13"\n'))
    refused(capsys, tmp_path, bad, "caption", r"data.csv line 12 \(row 10\): a quoted field opened in this row runs "
                                              r"to line 15 and holds 3 lines that read as rows of their own "
                                              r"\('11,caption 11', '12,caption 12'\)")
    good = tmp_path / "good.csv"
    captions = ["a cat\non two lines", "commas, one\nper line, here", "two\nlines, quoted", "one line",
                "Over\n1,000 balloons"]  # after id 3, "1,000 balloons" reads as a row
    with open(good, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([["id", "caption"], *([str(i), c] for i, c in enumerate(captions))])
    with caplog.at_level(logging.WARNING, logger="clipcond"):
        assert precompute(capsys, [good], tmp_path / "store", "caption")[0] == 0
    assert_rows_hold(tc, tmp_path / "store", [[c] for c in captions])
    assert re.search(r"good.csv: 1 quoted captions span lines that could be rows of their own: row 4 \(lines 9-10\)",
                     caplog.text), caplog.text


def test_a_one_column_csv_warns_of_captions_spanning_lines(tmp_path, capsys, caplog):
    """A one-column table has no other field to tell a caption's own lines from rows a stray quote swallowed
    (row 5's quote closed by row 9's line-final quote): the run goes on, but not silently. Bug: "rows 16", exit 0,
    no word of it."""
    lines = ["caption", *(f"caption {i}" for i in range(20))]
    lines[6], lines[10] = '"Best of 2023 collection cover', 'a flat screen tv, 55"'
    bad = tmp_path / "data.csv"
    bad.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="clipcond"):
        code, err = precompute(capsys, [bad], tmp_path / "store", "caption")
    assert code == 0, err
    assert re.search(r"data.csv: 1 quoted captions span lines that could be rows of their own: row 5 \(lines 7-11\); "
                     r"if a quote there is a stray one", caplog.text), caplog.text


def test_a_quoted_field_over_the_line_limit_is_an_error_and_a_caption_of_a_few_lines_is_fine(tmp_path, capsys, tc):
    from clipcond.precompute.inputs import CSV_MAX_LINES

    captions = ["first", "three\nlines, with commas,\nand \"quotes\"", "last"]
    good = tmp_path / "good.csv"
    with open(good, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([["caption"], *([c] for c in captions)])
    assert precompute(capsys, [good], tmp_path / "store")[0] == 0
    assert_rows_hold(tc, tmp_path / "store", [[c] for c in captions])
    bad = tmp_path / "long.csv"
    bad.write_text('id,caption\n0,"' + "a line\n" * CSV_MAX_LINES + 'end"\n1,next\n')
    refused(capsys, tmp_path, bad, "caption", rf"long.csv line 2 \(row 0\): a quoted field runs from this row over "
                                              rf"{CSV_MAX_LINES + 1} lines, to line {CSV_MAX_LINES + 2}")


def test_a_csv_row_of_the_wrong_width_names_its_line(tmp_path, capsys):
    bad = tmp_path / "data.csv"
    bad.write_text("id,caption\n0,a\n1,b,extra\n")
    refused(capsys, tmp_path, bad, "caption", r"data.csv line 3 \(row 1\): 3 fields, the header has 2")


# --- defect 8: UTF-8 -----------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "content", "message"), [
    ("data.txt", b"a cat\na dog\nthe sea\ncaf\xe9 au lait\n",
     r"data.txt line 4: not UTF-8 text \(byte 0xe9 at byte 4"),
    ("data.csv", b"id,caption\n0,a\n1,b\n2,caf\xe9\n", r"data.csv line 4: not UTF-8 text \(byte 0xe9 at byte 6"),
    ("data.jsonl", b'{"caption": "a"}\n{"caption": "caf\xe9"}\n', r"data.jsonl line 2: not UTF-8 text \(byte 0xe9"),
    ("data.jsonl", b'{"caption": "a"}\n{"caption": "cat \\ud83d"}\n',
     r"data.jsonl row 1: column 'caption' holds '\\ud83d', half a UTF-16 surrogate pair"),
])
def test_non_utf8_text_names_the_file_and_the_line(tmp_path, capsys, name, content, message):
    """Issue 17, defect 8: a Latin-1 byte failed with "'utf-8' codec can't decode byte 0xe9 in position 3" (no file,
    no line); a JSON escape of half a character failed later, in the scan, with a codec error naming nothing."""
    bad = tmp_path / name
    bad.write_bytes(content)
    refused(capsys, tmp_path, bad, "caption", message)


# --- defect 5: upper-case member suffixes in tars ----------------------------------------------------
def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def webdataset_samples(path: Path) -> list[dict]:
    """The samples webdataset itself reads from ``path`` (its tar iterator and group_by_keys, lcase=True)."""
    from webdataset.tariterators import group_by_keys, tar_file_expander

    with open(path, "rb") as stream:
        return list(group_by_keys(tar_file_expander([{"url": str(path), "stream": stream}])))


def test_upper_case_member_suffixes_are_the_lower_case_column_as_in_webdataset(tmp_path, capsys, tc):
    """Issue 17, defect 5: webdataset lower-cases member suffixes (group_by_keys(lcase=True)), so 000001.TXT is the
    sample's txt; clipcond's reader did not, and `--column txt` failed: "sample '000001' has no .txt member"."""
    captions = ["a cat", "a dog on a sofa", "the sea"]
    suffixes = ["TXT", "Txt", "txt"]
    members = [(f"{i:06d}.{ext}", data) for i, (c, s) in enumerate(zip(captions, suffixes, strict=True))
               for ext, data in (("JPG", b"jpeg" * 100), (s, c.encode()))]
    path = write_tar(tmp_path / "00000.tar", members)
    reference = webdataset_samples(path)
    assert [(s["__key__"], s["txt"].decode()) for s in reference] == [(f"{i:06d}", c) for i, c in enumerate(captions)]
    code, err = precompute(capsys, [path], tmp_path / "store", "txt")
    assert code == 0, err
    manifest = json.loads((tmp_path / "store" / MANIFEST).read_text())
    assert manifest["fingerprint"] == tc.fingerprint and manifest["rows"] == 3
    assert_rows_hold(tc, tmp_path / "store", [[c] for c in captions])
    index = load_file(tmp_path / "store" / manifest["index"]["file"])
    assert bytes(index["id_bytes"]).decode() == "".join(s["__key__"] for s in reference)


@pytest.mark.parametrize(("name", "mode"), [("00000.tar.gz", "w:gz"), ("00000.tgz", "w:gz"),
                                            ("00000.tar.bz2", "w:bz2"), ("00000.tar.xz", "w:xz")])
def test_compressed_shards_are_read_by_their_suffix_as_webdataset_reads_them(tmp_path, capsys, tc, name, mode):
    """`x.tar.gz` was refused as "unknown input type '.gz'" although the reader decompresses tars: the input type
    was the last suffix only. webdataset reads the same file (tarfile's r|*)."""
    captions = ["a cat", "a dog on a sofa"]
    path = tmp_path / name
    with tarfile.open(path, mode) as tar:
        for i, caption in enumerate(captions):
            info = tarfile.TarInfo(f"{i:06d}.txt")
            info.size = len(caption.encode())
            tar.addfile(info, io.BytesIO(caption.encode()))
    assert [s["txt"].decode() for s in webdataset_samples(path)] == captions
    code, err = precompute(capsys, [path], tmp_path / "store", "txt")
    assert code == 0, err
    assert_rows_hold(tc, tmp_path / "store", [[c] for c in captions])


def test_a_suffix_twice_in_a_sample_is_an_error_as_in_webdataset(tmp_path, capsys):
    """000001.txt and 000001.TXT are both the sample's txt: webdataset raises "duplicate file name"; clipcond took
    the last one, silently."""
    path = write_tar(tmp_path / "00000.tar", [("000000.txt", b"a"), ("000001.txt", b"b"), ("000001.TXT", b"c")])
    with pytest.raises(ValueError, match="duplicate file name"):
        webdataset_samples(path)
    refused(capsys, tmp_path, path, "txt", r"00000.tar: sample '000001' has two .txt members \(the second: "
                                           r"'000001.TXT'")


# --- defect 2: ragged variants -------------------------------------------------------------------------
RAGGED = [["a cat", "a small cat"], ["a dog"], ["the sea", "waves", "a beach", "a cat"], ["a cat"]]


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_a_ragged_list_column_keeps_each_rows_own_variants(tmp_path, capsys, tc, fmt):
    """Issue 17, defect 2: a list column of 2 captions on one row and 1 on the next was refused ("every row needs the
    same number of variants"); COCO has 5 to 7 an image. The index holds [N, kmax], -1 after a row's own."""
    path = tmp_path / f"data.{fmt}"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps({"captions": row, "id": i}) + "\n" for i, row in enumerate(RAGGED)))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"captions": RAGGED, "id": list(range(len(RAGGED)))}), path)
    code, err = precompute(capsys, [path], tmp_path / "store", "captions", id_column="id")
    assert code == 0, err
    manifest = json.loads((tmp_path / "store" / MANIFEST).read_text())
    assert (manifest["rows"], manifest["variants"], manifest["unique"]) == (4, 4, 6)
    assert_rows_hold(tc, tmp_path / "store", RAGGED)


def test_empty_or_null_cells_of_several_columns_are_missing_variants(tmp_path, capsys, tc):
    """Several --columns: an empty CSV cell, or a null in parquet, gives that row fewer variants (they were
    encoded as the empty prompt, or refused as not a string)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = {"short": ["a cat", "", "the sea"], "long": ["a fluffy cat", "a dog in the sun", ""]}
    expected = [["a cat", "a fluffy cat"], ["a dog in the sun"], ["the sea"]]
    with open(tmp_path / "data.csv", "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([list(table), *zip(*table.values(), strict=True)])
    code, err = precompute(capsys, [tmp_path / "data.csv"], tmp_path / "csv", "short", "long")
    assert code == 0, err
    assert_rows_hold(tc, tmp_path / "csv", expected)
    nulls = {k: [v or None for v in values] for k, values in table.items()}
    pq.write_table(pa.table(nulls), tmp_path / "data.parquet")
    code, err = precompute(capsys, [tmp_path / "data.parquet"], tmp_path / "parquet", "short", "long")
    assert code == 0, err
    assert_rows_hold(tc, tmp_path / "parquet", expected)
    assert np.array_equal(stored(tmp_path / "csv")[0], stored(tmp_path / "parquet")[0])


@pytest.mark.parametrize(("name", "content", "columns", "message"), [
    ("data.csv", "id,short,long\n0,a,b\n1,,\n", ["short", "long"],
     r"data.csv row 1: no caption \(columns \['short', 'long'\] are all empty or null\)"),
    ("data.jsonl", '{"c": ["a"]}\n{"c": []}\n', ["c"],
     r"data.jsonl row 1: no caption \(column 'c' holds an empty list"),
    ("data.jsonl", '{"c": ["a"]}\n{"c": ["b", 3]}\n', ["c"], r"data.jsonl row 1: column 'c\[1\]' must be a string"),
])
def test_a_row_with_no_caption_is_an_error_naming_it(tmp_path, capsys, name, content, columns, message):
    bad = tmp_path / name
    bad.write_text(content)
    code, err = precompute(capsys, [bad], tmp_path / "new", *columns)
    assert code == 2 and re.search(message, err), err
    assert not (tmp_path / "new" / MANIFEST).exists()


def test_a_ragged_store_reads_each_rows_own_variants_back(tmp_path, capsys, tc):
    """Ragged variants end to end, through the CLI and EmbeddingStore: a reader that took the store's widest row
    for every row would serve -1 slots (another row's embedding, or an error blaming the shard) for variants a
    row does not have, and `variant="random"` would pick them."""
    from clipcond import EmbeddingStore

    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps({"captions": row, "id": f"img-{i}"}) + "\n" for i, row in enumerate(RAGGED)))
    code, err = precompute(capsys, [path], tmp_path / "store", "captions", id_column="id")
    assert code == 0, err
    store = EmbeddingStore(tmp_path / "store")
    assert store.variants == max(map(len, RAGGED))
    for i, row in enumerate(RAGGED):
        assert store.variant_count(i) == len(row)
        for j, caption in enumerate(row):
            torch.testing.assert_close(store.get(i, variant=j)["pooled"], tc(caption).pooled[0], **TOL)
        with pytest.raises(IndexError, match=rf"variant {len(row)}.*row {i}.*{len(row)}"):
            store.get(i, variant=len(row))
    torch.testing.assert_close(store.by_id(f"img-{len(RAGGED) - 1}")["pooled"], tc(RAGGED[-1][0]).pooled[0], **TOL)
    collate = store.collate(0.0, seed=0, variant="random")
    picks = {i: set() for i in range(len(RAGGED))}
    for epoch in range(12):
        collate.set_epoch(epoch)
        batch = collate([store[i] for i in range(len(RAGGED))])
        for i, row in enumerate(RAGGED):
            refs = tc(list(row)).pooled
            hits = [j for j in range(len(row)) if torch.allclose(batch["pooled"][i], refs[j], **TOL)]
            assert hits, f"row {i} got a caption that is not one of its own {len(row)}"
            picks[i].add(hits[0])
    assert all(len(picks[i]) == len(set(RAGGED[i])) for i in picks if len(RAGGED[i]) <= 2)  # each own one, seen
