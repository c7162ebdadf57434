"""Caption tables read in bounded batches: what the first pass of ``clipcond precompute`` reads (scan.py).

Inputs: ``.txt`` (a caption per line), ``.jsonl`` (a JSON object per line), ``.csv`` (pyarrow's
streaming reader), ``.parquet`` (``pyarrow.parquet.ParquetFile.iter_batches``), a folder written
by Hugging Face ``datasets``' ``save_to_disk`` (memory-mapped Arrow), and webdataset ``.tar``
shards as img2dataset writes them (``<key>.txt``, ``<key>.json``, images: streamed, images
skipped unread; the id is the sample's ``__key__``). Several files (``--input`` repeated or a glob)
are read in sorted path order as one table. A row may hold several captions (variants): several
caption columns, or one list-valued column. No reader holds more than ``READ_BATCH`` rows.
"""

from __future__ import annotations

import csv
import glob
import importlib
import io
import itertools
import json
import logging
import os
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

logger = logging.getLogger(__name__)

READ_BATCH = 8192  # rows per batch read from the input
Batch = tuple[list[tuple[str, ...]], list[str] | None]  # each row's captions (k variants), ids (None: no ids)
SUFFIXES = (".txt", ".jsonl", ".csv", ".parquet", ".tar")
TAR_KEY = "__key__"  # a webdataset sample's id: its members' shared path before the first dot
TAR_DEFAULT_COLUMN = "txt"


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


Columns = tuple[list[list], list | None]  # values of each caption column, ids


def _txt(path: Path, columns: list[str], id_column: str | None) -> Iterator[Columns]:
    if id_column is not None:
        raise ValueError(f"{path}: a .txt input has no columns, so no --id-column; use .jsonl, .csv or .parquet")
    if len(columns) > 1:
        raise ValueError(f"{path}: a .txt input has one caption a line, so one --column; got {columns}")
    with open(path, encoding="utf-8") as f:  # universal newlines: "\r\n" files read like "\n" ones
        while lines := list(itertools.islice(f, READ_BATCH)):
            yield [[line.removesuffix("\n") for line in lines]], None


def _jsonl(path: Path, columns: list[str], id_column: str | None) -> Iterator[Columns]:
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
                _require(record, columns + ([id_column] if id_column else []), f"{path} line {n}")
                records.append(record)
            yield [[r[c] for r in records] for c in columns], [r[id_column] for r in records] if id_column else None


def _arrow(batches: Iterable, columns: list[str], id_column: str | None) -> Iterator[Columns]:
    for batch in batches:
        yield [batch[c].to_pylist() for c in columns], batch[id_column].to_pylist() if id_column else None


def _need(module: str, path: Path, package: str):  # noqa: ANN202 (optional modules)
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(f"reading {path} needs {package}: pip install {package}") from err


def _csv(path: Path, columns: list[str], id_column: str | None) -> Iterator[Columns]:
    pa, pv = _need("pyarrow", path, "pyarrow"), _need("pyarrow.csv", path, "pyarrow")

    wanted = columns + ([id_column] if id_column else [])
    with open(path, encoding="utf-8", newline="") as f:
        _require(next(csv.reader(f), []), wanted, path)
    reader = pv.open_csv(
        path,
        # Quoted captions may hold newlines; only the columns we read are parsed, all as text
        # ("00123" stays an id, not the number 123), empty cells stay "" rather than null.
        parse_options=pv.ParseOptions(newlines_in_values=True),
        convert_options=pv.ConvertOptions(include_columns=wanted, column_types=dict.fromkeys(wanted, pa.string()),
                                          strings_can_be_null=False),
    )
    yield from _arrow(reader, columns, id_column)


def _parquet(path: Path, columns: list[str], id_column: str | None) -> Iterator[Columns]:
    pq = _need("pyarrow.parquet", path, "pyarrow")

    wanted = columns + ([id_column] if id_column else [])
    parquet = pq.ParquetFile(path, pre_buffer=False)  # pre-buffering keeps what it read: ~30 bytes a row
    _require(parquet.schema_arrow.names, wanted, path)
    yield from _arrow(parquet.iter_batches(batch_size=READ_BATCH, columns=wanted), columns, id_column)


def _load_dataset(path: Path):  # noqa: ANN202 (datasets is optional)
    datasets = _need("datasets", path, "datasets")  # a folder: a saved Hugging Face dataset
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if len(ds) != 1:
            raise ValueError(f"{path} is a DatasetDict with splits {list(ds)}; pass one split's folder, "
                             f"e.g. --input {path / next(iter(ds))}")
        ds = next(iter(ds.values()))
    return ds


def _hf_dataset(path: Path, columns: list[str], id_column: str | None) -> Iterator[Columns]:
    ds = _load_dataset(path)
    wanted = columns + ([id_column] if id_column else [])
    _require(ds.column_names, wanted, path)
    for batch in ds.select_columns(list(dict.fromkeys(wanted))).iter(batch_size=READ_BATCH):
        yield [batch[c] for c in columns], batch[id_column] if id_column else None


BLOCK = 512  # a tar header, and the unit member data is padded to
_REGULAR, _PAX, _GNU_LONGNAME = (b"0", b"\0", b"7"), b"x", b"L"  # header type flags


def _tar_members(stream: BinaryIO, extensions: set[str]) -> Iterator[tuple[str, bytes | None]]:
    """``(name, data)`` of each regular member of a tar stream, ``data`` read only if its extension is
    wanted (else None: skipped unread). POSIX ustar, pax (``path`` and ``size`` records) and GNU long
    names; each header's checksum is checked. ~10x faster than ``tarfile``, which parses every field.
    """
    pending: dict[str, str] = {}  # pax or GNU overrides for the next member
    first = True
    while True:
        header = stream.read(BLOCK)
        if not header and first:
            raise tarfile.ReadError("empty file")
        if not header:  # tarfile reads this too; a download cut at a member boundary looks the same
            logger.warning("%s: no end-of-archive marker after its last member (a cut download?)",
                           getattr(stream, "name", "a tar"))
            return
        if header == bytes(BLOCK):
            return  # the end-of-archive marker
        first = False
        if len(header) < BLOCK:
            raise tarfile.ReadError("unexpected end of data")
        stored = int(header[148:156].split(b"\0", 1)[0].strip() or b"0", 8)
        unsigned = sum(header[:148]) + 256 + sum(header[156:])  # the checksum field counts as 8 spaces
        if stored != unsigned and stored != unsigned - 256 * sum(b >= 0x80 for b in header):  # old tars: signed
            raise tarfile.ReadError("bad header checksum")
        size = int(pending.pop("size")) if "size" in pending else _octal(header[124:136])
        name = header[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        if header[257:262] == b"ustar" and header[345] != 0:
            name = header[345:500].split(b"\0", 1)[0].decode("utf-8", "surrogateescape") + "/" + name
        name = pending.pop("path", name)
        kind = header[156:157]
        wanted = kind in _REGULAR and name.rpartition("/")[2].partition(".")[2] in extensions
        if kind in (_PAX, _GNU_LONGNAME) or wanted:
            data = stream.read(size)
            if len(data) < size:
                raise tarfile.ReadError(f"member {name} is cut short")
            stream.read(-size % BLOCK)
            if kind == _PAX:
                pending.update(_pax_records(data))
            elif kind == _GNU_LONGNAME:
                pending["path"] = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            else:
                yield name, data
        else:
            _skip(stream, size + -size % BLOCK, name)
            if kind in _REGULAR:
                yield name, None


def _octal(field: bytes) -> int:
    if field[0] & 0x80:  # GNU base-256, for members over 8 GiB
        return int.from_bytes(field[1:], "big")
    return int(field.split(b"\0", 1)[0].strip() or b"0", 8)


def _pax_records(data: bytes) -> dict[str, str]:
    """``"%d %s=%s\n"`` records: the ones that matter here are ``path`` and ``size``."""
    records, pos = {}, 0
    while pos < len(data) and data[pos:pos + 1] != b"\0":
        space = data.find(b" ", pos)
        length = int(data[pos:space]) if space > pos and data[pos:space].isdigit() else 0
        if space < 0 or length <= space - pos or pos + length > len(data) or data[pos + length - 1] != 0x0A:
            raise tarfile.ReadError(f"damaged pax header record at byte {pos}")
        key, equals, value = data[space + 1 : pos + length - 1].partition(b"=")
        if not equals or (key == b"size" and not value.isdigit()):
            raise tarfile.ReadError(f"damaged pax header record at byte {pos}")
        records[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return {k: v for k, v in records.items() if k in ("path", "size")}


def _skip(stream: BinaryIO, n: int, name: str) -> None:
    if isinstance(stream, io.BufferedReader):  # a plain file: seek, and check that it has the bytes
        end = stream.tell() + n
        if end > os.fstat(stream.fileno()).st_size:
            raise tarfile.ReadError(f"member {name} is cut short")
        stream.seek(end)
        return
    while n > 0:  # a compressed stream: read through
        chunk = stream.read(min(n, 1 << 20))
        if not chunk:
            raise tarfile.ReadError(f"member {name} is cut short")
        n -= len(chunk)


def _open_tar(path: Path) -> BinaryIO:
    """The tar's bytes: plain, or decompressed as ``tarfile``'s ``r|*`` would (gzip, bzip2, xz)."""
    with open(path, "rb") as f:
        magic = f.read(6)
    if magic.startswith(b"\x1f\x8b"):
        import gzip

        return gzip.open(path, "rb")
    if magic.startswith(b"BZh"):
        import bz2

        return bz2.open(path, "rb")
    if magic.startswith(b"\xfd7zXZ"):
        import lzma

        return lzma.open(path, "rb")
    return open(path, "rb")  # noqa: SIM115 (closed by the caller)


def _tar_samples(path: Path, extensions: set[str]) -> Iterator[tuple[str, dict[str, bytes]]]:
    """``(__key__, {extension: bytes})`` of each sample of a webdataset tar, read as a stream.

    Members of a sample are consecutive (webdataset's rule); only ``extensions`` are read, the
    rest (images) are skipped without being read. A key seen again later is an error.
    """
    key, members, seen = None, {}, set()
    try:
        with _open_tar(path) as stream:
            for name, data in _tar_members(stream, extensions):
                folder, _, base = name.rpartition("/")
                stem, dot, ext = base.partition(".")
                if not dot or not stem:
                    continue  # no extension, or a hidden file such as macOS's ._name (webdataset skips both)
                sample = f"{folder}/{stem}" if folder else stem
                if sample != key:
                    if key is not None:
                        yield key, members
                    if sample in seen:
                        raise ValueError(f"{path}: sample {sample!r} appears twice (its members are not "
                                         "consecutive, or the key repeats): __key__ must be unique")
                    key, members = sample, {}
                    seen.add(sample)
                if data is not None:
                    members[ext] = data
            if key is not None:
                yield key, members
    except (tarfile.TarError, EOFError, OSError, ValueError, IndexError) as err:
        if isinstance(err, ValueError) and str(err).startswith(f"{path}: "):
            raise  # ours, already naming the tar and the key
        where = f" at sample {key!r}" if key is not None else ""
        raise ValueError(f"{path}: truncated or damaged tar{where} ({type(err).__name__}: {err})") from err


def _tar_field(path: Path, key: str, members: dict[str, bytes], column: str) -> object:
    ext, _, field = column.partition(":")
    if ext not in members:
        raise ValueError(f"{path}: sample {key!r} has no .{ext} member (column {column!r}); its members: "
                         f"{sorted(members) or 'none read'}")
    try:
        text = members[ext].decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: sample {key!r}: {key}.{ext} is not UTF-8 text ({err})") from err
    if not field:
        return text
    try:
        record = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: sample {key!r}: {key}.{ext} is not JSON ({err})") from err
    if not isinstance(record, dict) or field not in record:
        raise ValueError(f"{path}: sample {key!r}: {key}.{ext} has no field {field!r}")
    return record[field]


def _tar(path: Path, columns: list[str], id_column: str | None) -> Iterator[Columns]:
    """A webdataset shard: ``--column txt`` (a member extension) or ``json:FIELD``; ids are the ``__key__``s."""
    if id_column not in (None, TAR_KEY):
        raise ValueError(f"{path}: the id of a tar sample is its {TAR_KEY}; --id-column must be omitted or "
                         f"{TAR_KEY!r}, got {id_column!r}")
    extensions = {c.partition(":")[0] for c in columns}
    samples = _tar_samples(path, extensions)
    while chunk := list(itertools.islice(samples, READ_BATCH)):
        yield [[_tar_field(path, key, members, c) for key, members in chunk] for c in columns], [k for k, _ in chunk]


def row_count_hint(paths: Sequence[Path]) -> int | None:
    """Rows in the inputs if their metadata says so cheaply (parquet, datasets), for the progress bar."""
    total = 0
    for path in paths:
        if path.is_dir():
            total += _load_dataset(path).num_rows
        elif path.suffix.lower() == ".parquet":
            total += _need("pyarrow.parquet", path, "pyarrow").ParquetFile(path).metadata.num_rows
        else:
            return None
    return total


READERS = {".txt": _txt, ".jsonl": _jsonl, ".csv": _csv, ".parquet": _parquet, ".tar": _tar}


def expand_inputs(inputs: str | Path | Sequence[str | Path]) -> list[Path]:
    """Input files and folders: globs expanded; all of them in sorted path order, each once."""
    items = [inputs] if isinstance(inputs, str | Path) else list(inputs)
    paths: set[Path] = set()
    for item in items:
        text = str(item)
        if glob.has_magic(text):
            matches = glob.glob(text)
            if not matches:
                raise FileNotFoundError(f"--input {text!r} matches no file")
            paths.update(Path(m) for m in matches)
        else:
            paths.add(Path(text))
    if not paths:
        raise ValueError("no --input given")
    return sorted(paths)


def _reader(path: Path):  # noqa: ANN202
    if path.is_dir():
        return _hf_dataset
    if path.suffix.lower() not in READERS:
        raise ValueError(f"{path}: unknown input type {path.suffix!r}; expected one of {SUFFIXES} "
                         "or a folder written by datasets' save_to_disk")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such input file")
    return READERS[path.suffix.lower()]


def _variants(values: list[list], columns: list[str], first_row: int, source: object, k: int | None
              ) -> list[tuple[str, ...]]:
    """Each row's captions: one per column, or the items of one list-valued column (k of them in every row)."""
    if len(columns) > 1:
        checked = [_strings(v, c, first_row, source) for v, c in zip(values, columns, strict=True)]
        return list(zip(*checked, strict=True))
    rows = []
    for i, value in enumerate(values[0]):
        if isinstance(value, list | tuple):
            items = _strings(list(value), columns[0], first_row + i, source)
            if not items or (k is not None and len(items) != k):
                raise ValueError(f"{source} row {first_row + i}: column {columns[0]!r} holds {len(items)} "
                                 f"captions, the rows before it {k}: every row needs the same number of variants")
            k = len(items)
            rows.append(tuple(items))
        else:
            if k not in (None, 1):
                raise ValueError(f"{source} row {first_row + i}: column {columns[0]!r} holds a single caption, "
                                 f"the rows before it lists of {k}")
            k = 1
            rows.append(tuple(_strings([value], columns[0], first_row + i, source)))
    return rows


def read_captions(path: str | Path | Sequence[str | Path], *, column: str | Sequence[str] = "caption",
                  id_column: str | None = None, variants: int | None = None, with_ids: bool | None = None
                  ) -> Iterator[Batch]:
    """``(rows, ids)`` batches of at most ``READ_BATCH`` rows over every input file in sorted order;
    each row a tuple of its k captions (variants), values checked, ids as strings. ``variants`` and
    ``with_ids``: what the rows read before these held (a scan reading its inputs file by file)."""
    columns = [column] if isinstance(column, str) else list(column)
    if not columns:
        raise ValueError("at least one --column is needed")
    k = variants if len(columns) == 1 else len(columns)
    for file in expand_inputs(path):
        reader = _reader(file)
        tar = reader is _tar
        # Tars default to the .txt member, as img2dataset writes the caption.
        file_columns = [TAR_DEFAULT_COLUMN if c == "caption" else c for c in columns] if tar else columns
        row = 0
        for values, ids in reader(file, file_columns, id_column):
            rows = _variants(values, file_columns, row, file, k)
            k = len(rows[0]) if rows else k
            check_like_before(file, ids_before=with_ids, has_ids=ids is not None)
            with_ids = ids is not None
            if ids is not None:
                ids = _strings(ids, TAR_KEY if tar else id_column, row, file, ids=True)
            row += len(rows)
            yield rows, ids


def check_like_before(file: Path, *, variants_before: int | None = None, variants: int | None = None,
                      ids_before: bool | None = None, has_ids: bool | None = None) -> None:
    """Rows of ``file`` hold as many captions as the rows before them, and ids if and only if they did."""
    if None not in (variants_before, variants) and variants != variants_before:
        raise ValueError(f"{file}: its rows hold {variants} captions, the rows before it {variants_before}: every "
                         "row needs the same number of variants")
    if None not in (ids_before, has_ids) and has_ids != ids_before:
        raise ValueError(f"{file}: rows {'with' if has_ids else 'without'} ids after rows "
                         f"{'with' if ids_before else 'without'} them: tars (ids = {TAR_KEY}) and tables "
                         "without --id-column cannot be mixed")
