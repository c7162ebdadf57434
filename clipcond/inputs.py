"""Caption tables read in bounded batches, and the deduplicating first pass of ``clipcond precompute``.

Inputs: ``.txt`` (a caption per line), ``.jsonl`` (a JSON object per line), ``.csv`` (pyarrow's
streaming reader), ``.parquet`` (``pyarrow.parquet.ParquetFile.iter_batches``) and a folder written
by Hugging Face ``datasets``' ``save_to_disk`` (memory-mapped Arrow). No reader holds more than
``READ_BATCH`` rows, so the pass over a million-row table keeps memory flat but for what
deduplication must keep: one copy of each unique caption, and 8 bytes a row for the index
(plus the id bytes with an id column).
"""

from __future__ import annotations

import csv
import hashlib
import importlib
import itertools
import json
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from clipcond.store import id_hash

READ_BATCH = 8192  # rows per batch read from the input
Batch = tuple[list[str], list[str] | None]  # captions, ids (None without an id column)
SUFFIXES = (".txt", ".jsonl", ".csv", ".parquet")


def _require(names: Iterable[str], columns: list[str], source: object) -> None:
    names = list(names)
    for column in columns:
        if column not in names:
            raise ValueError(f"{source}: no column {column!r}; the columns are {names} "
                             "(choose with --column / --id-column)")


def _strings(values: list, column: str, first_row: int, source: object, *, ids: bool = False) -> list[str]:
    """Check a column's values; ids may be ints (stored and looked up as their decimal string)."""
    out = []
    for i, value in enumerate(values):
        if ids and isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str):
            kind = "a string or an int" if ids else "a string"
            raise ValueError(f"{source} row {first_row + i}: column {column!r} must be {kind}, "
                             f"got {type(value).__name__} {value!r:.60}")
        out.append(value)
    return out


def _txt(path: Path, column: str, id_column: str | None) -> Iterator[tuple[list, list | None]]:
    if id_column is not None:
        raise ValueError(f"{path}: a .txt input has no columns, so no --id-column; use .jsonl, .csv or .parquet")
    with open(path, encoding="utf-8") as f:  # universal newlines: "\r\n" files read like "\n" ones
        while lines := list(itertools.islice(f, READ_BATCH)):
            yield [line.removesuffix("\n") for line in lines], None


def _jsonl(path: Path, column: str, id_column: str | None) -> Iterator[tuple[list, list | None]]:
    with open(path, encoding="utf-8") as f:
        numbered = ((n, line) for n, line in enumerate(f, start=1) if line.strip())  # blank lines are not rows
        while chunk := list(itertools.islice(numbered, READ_BATCH)):
            records = []
            for n, line in chunk:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path} line {n}: not JSON ({err})") from err
                if not isinstance(record, dict):
                    raise ValueError(f"{path} line {n}: expected a JSON object, got {type(record).__name__}")
                _require(record, [column] + ([id_column] if id_column else []), f"{path} line {n}")
                records.append(record)
            yield [r[column] for r in records], [r[id_column] for r in records] if id_column else None


def _arrow(batches: Iterable, column: str, id_column: str | None) -> Iterator[tuple[list, list | None]]:
    for batch in batches:
        yield batch[column].to_pylist(), batch[id_column].to_pylist() if id_column else None


def _need(module: str, path: Path, package: str):  # noqa: ANN202 (optional modules)
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(f"reading {path} needs {package}: pip install {package}") from err


def _csv(path: Path, column: str, id_column: str | None) -> Iterator[tuple[list, list | None]]:
    pa, pv = _need("pyarrow", path, "pyarrow"), _need("pyarrow.csv", path, "pyarrow")

    columns = [column] + ([id_column] if id_column else [])
    with open(path, encoding="utf-8", newline="") as f:
        _require(next(csv.reader(f), []), columns, path)
    reader = pv.open_csv(
        path,
        # Quoted captions may hold newlines; only the columns we read are parsed, all as text
        # ("00123" stays an id, not the number 123), empty cells stay "" rather than null.
        parse_options=pv.ParseOptions(newlines_in_values=True),
        convert_options=pv.ConvertOptions(include_columns=columns, column_types=dict.fromkeys(columns, pa.string()),
                                          strings_can_be_null=False),
    )
    yield from _arrow(reader, column, id_column)


def _parquet(path: Path, column: str, id_column: str | None) -> Iterator[tuple[list, list | None]]:
    pq = _need("pyarrow.parquet", path, "pyarrow")

    columns = [column] + ([id_column] if id_column else [])
    parquet = pq.ParquetFile(path)
    _require(parquet.schema_arrow.names, columns, path)
    yield from _arrow(parquet.iter_batches(batch_size=READ_BATCH, columns=columns), column, id_column)


def _load_dataset(path: Path):  # noqa: ANN202 (datasets is optional)
    datasets = _need("datasets", path, "datasets")  # a folder: a saved Hugging Face dataset
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if len(ds) != 1:
            raise ValueError(f"{path} is a DatasetDict with splits {list(ds)}; pass one split's folder, "
                             f"e.g. --input {path / next(iter(ds))}")
        ds = next(iter(ds.values()))
    return ds


def _hf_dataset(path: Path, column: str, id_column: str | None) -> Iterator[tuple[list, list | None]]:
    ds = _load_dataset(path)
    columns = [column] + ([id_column] if id_column else [])
    _require(ds.column_names, columns, path)
    for batch in ds.select_columns(columns).iter(batch_size=READ_BATCH):
        yield batch[column], batch[id_column] if id_column else None


def row_count_hint(path: Path) -> int | None:
    """Rows in the input if its metadata says so cheaply (parquet, datasets), for the progress bar."""
    if path.is_dir():
        return _load_dataset(path).num_rows
    if path.suffix.lower() == ".parquet":
        return _need("pyarrow.parquet", path, "pyarrow").ParquetFile(path).metadata.num_rows
    return None


def read_captions(path: str | Path, *, column: str = "caption", id_column: str | None = None) -> Iterator[Batch]:
    """``(captions, ids)`` batches of at most ``READ_BATCH`` rows, values checked and ids as strings."""
    path = Path(path)
    readers = {".txt": _txt, ".jsonl": _jsonl, ".csv": _csv, ".parquet": _parquet}
    if path.is_dir():
        reader = _hf_dataset
    elif path.suffix.lower() not in readers:
        raise ValueError(f"{path}: unknown input type {path.suffix!r}; expected one of {SUFFIXES} "
                         "or a folder written by datasets' save_to_disk")
    elif not path.is_file():
        raise FileNotFoundError(f"{path}: no such input file")
    else:
        reader = readers[path.suffix.lower()]
    row = 0
    for captions, ids in reader(path, column, id_column):
        captions = _strings(captions, column, row, path)
        if id_column is not None:
            ids = _strings(ids, id_column, row, path, ids=True)
        row += len(captions)
        yield captions, ids


# --- the first pass: deduplication ---------------------------------------------------------
def _int64(values: array) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(values, dtype=np.int64).copy())  # no per-element Python loop


class _Ids:
    """Ids in row order as one UTF-8 blob with offsets, and their hashes for the sorted lookup table."""

    def __init__(self) -> None:
        self.blob, self.offsets, self.hashes = bytearray(), array("q", [0]), array("q")

    def add(self, key: bytes) -> None:
        self.blob += key
        self.offsets.append(len(self.blob))
        self.hashes.append(id_hash(key))

    def tensors(self, source: object, column: str) -> dict[str, torch.Tensor]:
        sorted_hash, order = torch.sort(_int64(self.hashes), stable=True)  # [N], [N]
        for i in (sorted_hash[1:] == sorted_hash[:-1]).nonzero().flatten().tolist():
            a, b = int(order[i]), int(order[i + 1])
            if self._key(a) == self._key(b):
                raise ValueError(f"{source}: id column {column!r} repeats id {self._key(a).decode()!r} "
                                 f"(rows {a} and {b}); ids must be unique to look rows up by id")
        return {"id_bytes": torch.from_numpy(np.frombuffer(bytes(self.blob), dtype=np.uint8).copy()),
                "id_offsets": _int64(self.offsets), "id_sorted_hash": sorted_hash, "id_sorted_rows": order}

    def _key(self, row: int) -> bytes:
        return bytes(self.blob[self.offsets[row] : self.offsets[row + 1]])


@dataclass
class Scan:
    """The input as precompute needs it: unique captions in order of first appearance, and the index."""

    captions: list[str]  # [U]
    rows: torch.Tensor  # [N] int64: input row -> index into captions
    ids: dict[str, torch.Tensor] | None  # the id tensors of index.safetensors
    sha256: str  # of every caption (and id), length-prefixed, in row order: the input's identity

    def index_tensors(self) -> dict[str, torch.Tensor]:
        return {"rows": self.rows, **(self.ids or {})}


def _update(digest: hashlib._Hash, data: bytes) -> None:
    digest.update(len(data).to_bytes(8, "little"))
    digest.update(data)


def scan_captions(path: str | Path, *, column: str = "caption", id_column: str | None = None,
                  limit: int | None = None, progress: bool = False) -> Scan:
    """One streaming pass: dedup (first appearance wins, so it is deterministic), index, ids, input sha256."""
    from tqdm.auto import tqdm

    unique: dict[str, int] = {}
    rows, digest, ids = array("q"), hashlib.sha256(), _Ids() if id_column else None
    total = row_count_hint(Path(path)) if progress else None
    total = min(total, limit) if total is not None and limit is not None else total or limit
    with tqdm(total=total, desc="scan", unit="row", unit_scale=True, disable=None if progress else True) as bar:
        for captions, batch_ids in read_captions(path, column=column, id_column=id_column):
            if limit is not None:
                captions = captions[: limit - len(rows)]
            for i, caption in enumerate(captions):
                rows.append(unique.setdefault(caption, len(unique)))
                _update(digest, caption.encode())
                if ids is not None:
                    ids.add(batch_ids[i].encode())
                    _update(digest, batch_ids[i].encode())
            bar.update(len(captions))
            if limit is not None and len(rows) >= limit:
                break
    if not rows:
        raise ValueError(f"{path}: no rows to encode" + (" (--limit 0)" if limit == 0 else ""))
    return Scan(list(unique), _int64(rows),
                ids.tensors(path, id_column) if ids is not None else None, digest.hexdigest())
