"""Caption tables read in bounded batches: what the first pass of ``clipcond precompute`` reads (scan.py).

Inputs: ``.txt`` (a caption per line), ``.jsonl`` (a JSON object per line), ``.csv`` (Python's ``csv``,
RFC 4180, strict: rules below), ``.parquet`` (``pyarrow.parquet.ParquetFile.iter_batches``), a folder
written by Hugging Face ``datasets``' ``save_to_disk`` (memory-mapped Arrow), and webdataset ``.tar``
shards as img2dataset writes them (clipcond/precompute/tar.py). Several files (``--input`` repeated or a
glob) are read in sorted path order as one table. No reader holds more than ``READ_BATCH`` rows.

Text files (txt, jsonl, csv) are UTF-8 (a byte-order mark is skipped); anything else is an error naming
the file, the line and the byte, never a bare codec error.

Variants: a row may hold several captions, from several caption columns or one list-valued column.
Rows are ragged (COCO has 5 to 7 captions an image): each row keeps its own k >= 1. With several
columns or a list, an empty or null caption is a missing variant; a row left with none is an error
naming it. With one plain column, ``""`` is a caption (the empty prompt) and null an error.

CSV: a quoted caption may hold newlines, but a stray quote must not swallow the rows after it (a lenient
reader takes ``499,"a quoted start never closed`` and every row after it for one caption, silently).
Where the line is drawn, each an error naming the file and the line where the row with the quote
starts:
- a quoted field never closed, running to the end of the file;
- a closing quote followed by anything but a comma or a line end (strict RFC 4180; a stray quote
  that runs on is nearly always closed by the next quote in a later row, followed by its text);
- a quoted field spanning more than ``CSV_MAX_LINES`` lines (a caption of more lines is a stray
  quote's run, not a caption: the encoder reads 77 tokens of it), or over ``csv``'s field limit;
- a row with more or fewer fields than the header.
"""

from __future__ import annotations

import csv
import glob
import importlib
import itertools
import json
import logging
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from clipcond.precompute import tar
from clipcond.precompute.tar import TAR_DEFAULT_COLUMN, TAR_KEY

logger = logging.getLogger(__name__)

READ_BATCH = 8192  # rows per batch read from the input
Batch = tuple[list[tuple[str, ...]], list[str] | None]  # each row's captions (k_i >= 1 variants), ids (None: no ids)
SUFFIXES = (".txt", ".jsonl", ".csv", ".parquet", ".tar")
TAR_SUFFIXES = (".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")  # compressed shards: read as .tar (tar.open_tar)
CSV_MAX_LINES = 32  # lines a quoted CSV field may span: more is a stray quote that swallowed the rows after it
TEXT_ENCODING = "utf-8-sig"  # UTF-8, a byte-order mark (Excel's "CSV UTF-8") skipped


def _require(names: Iterable[str], columns: list[str], source: object) -> None:
    names = list(names)
    for column in columns:
        if column not in names:
            raise ValueError(f"{source}: no column {column!r}; the columns are {names} "
                             "(choose with --column / --id-column)")


def _string(value: object, column: str, row: int, source: object, *, ids: bool = False) -> str:
    """A checked value; ids may be ints (stored and looked up as their decimal string)."""
    if ids and isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        kind = "a string or an int" if ids else "a string"
        raise ValueError(f"{source} row {row}: column {column!r} must be {kind}, got {type(value).__name__} "
                         f"{value!r:.60}")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as err:  # JSON can spell half a character: "\ud83d"
            raise ValueError(f"{source} row {row}: column {column!r} holds {value[err.start]!r}, half a UTF-16 "
                             "surrogate pair, which is no text (a JSON escape cut in two?)") from err
    return value


def _strings(values: list, column: str, first_row: int, source: object, *, ids: bool = False) -> list[str]:
    return [_string(value, column, first_row + i, source, ids=ids) for i, value in enumerate(values)]


Columns = tuple[list[list], list | None]  # values of each caption column, ids


def _not_utf8(path: Path, err: UnicodeDecodeError) -> ValueError:
    """A codec error located: the first line of ``path`` that is not UTF-8, and its first bad byte."""
    with open(path, "rb") as f:
        for n, line in enumerate(f, start=1):  # UTF-8 never holds a newline byte inside a character
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as bad:
                return ValueError(f"{path} line {n}: not UTF-8 text (byte 0x{line[bad.start]:02x} at byte "
                                  f"{bad.start + 1} of the line: {bad.reason}); clipcond reads text inputs as UTF-8: "
                                  "convert the file (e.g. iconv -f latin1 -t utf-8)")
    return ValueError(f"{path}: not UTF-8 text ({err})")


def _txt(path: Path, columns: list[str], id_column: str | None) -> Iterator[Columns]:
    if id_column is not None:
        raise ValueError(f"{path}: a .txt input has no columns, so no --id-column; use .jsonl, .csv or .parquet")
    if len(columns) > 1:
        raise ValueError(f"{path}: a .txt input has one caption a line, so one --column; got {columns}")
    try:
        with open(path, encoding=TEXT_ENCODING) as f:  # universal newlines: "\r\n" files read like "\n" ones
            while lines := list(itertools.islice(f, READ_BATCH)):
                yield [[line.removesuffix("\n") for line in lines]], None
    except UnicodeDecodeError as err:
        raise _not_utf8(path, err) from err


def _jsonl(path: Path, columns: list[str], id_column: str | None) -> Iterator[Columns]:
    try:
        wanted = columns + ([id_column] if id_column else [])
        with open(path, encoding=TEXT_ENCODING) as f:
            numbered = ((n, line) for n, line in enumerate(f, start=1) if line.strip())  # blank lines are not rows
            while chunk := list(itertools.islice(numbered, READ_BATCH)):
                records = [_record(path, n, line, wanted) for n, line in chunk]
                ids = [r[id_column] for r in records] if id_column else None
                yield [[r[c] for r in records] for c in columns], ids
    except UnicodeDecodeError as err:
        raise _not_utf8(path, err) from err


def _record(path: Path, n: int, line: str, wanted: list[str]) -> dict:
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, RecursionError) as err:  # RecursionError: nested deeper than Python's stack
        raise ValueError(f"{path} line {n}: not JSON ({err})") from err
    if not isinstance(record, dict):
        raise ValueError(f"{path} line {n}: expected a JSON object, got {type(record).__name__}")
    _require(record, wanted, f"{path} line {n}")
    return record


def _csv(path: Path, columns: list[str], id_column: str | None) -> Iterator[Columns]:
    """Every field read as text ("00123" stays an id, not the number 123; an empty cell is ""), batch by batch."""
    wanted = columns + ([id_column] if id_column else [])
    try:
        with open(path, encoding=TEXT_ENCODING, newline="") as f:
            reader = csv.reader(f, strict=True)
            start, row = 1, 0  # the line the current row starts at, data rows before it
            try:
                header = next(reader, [])
                _require(header, wanted, path)
                at = [header.index(c) for c in wanted]
                batch: list[list[str]] = []
                start, previous = reader.line_num + 1, None  # previous: the last one-line row's first field
                doubtful, examples = 0, []  # quoted captions whose lines may be rows a stray quote swallowed
                for record in reader:
                    if record:  # a blank line is no row
                        end = reader.line_num
                        rows_inside = _row_shaped_lines(record, len(header), previous) if end > start else []
                        _check_csv_row(path, start, end, row, record, len(header), rows_inside)
                        previous = record[0] if end == start else previous
                        if end > start and (len(header) == 1 or rows_inside):
                            doubtful += 1
                            examples += [f"row {row} (lines {start}-{end})"] if len(examples) < 3 else []
                        batch.append([record[i] for i in at])
                        row += 1
                        if len(batch) == READ_BATCH:
                            yield _csv_batch(batch, len(columns), id_column)
                            batch = []
                    start = reader.line_num + 1
                if batch:
                    yield _csv_batch(batch, len(columns), id_column)
                if doubtful:  # a one-column table, or one line that reads as a row: read, but not silently
                    logger.warning("%s: %d quoted captions span lines that could be rows of their own: %s%s; if a "
                                   "quote there is a stray one, the rows up to its closing quote became part of that "
                                   "caption", path, doubtful, ", ".join(examples), ", ..." if doubtful > 3 else "")
            except csv.Error as err:
                raise _csv_error(path, start, reader.line_num, row, err) from err
    except UnicodeDecodeError as err:
        raise _not_utf8(path, err) from err


def _csv_batch(batch: list[list[str]], n: int, id_column: str | None) -> Columns:
    """Records of the wanted fields (n caption columns, then the id) as columns."""
    return [[record[c] for record in batch] for c in range(n)], [record[-1] for record in batch] if id_column else None


def _check_csv_row(path: Path, start: int, end: int, row: int, record: list[str], expected: int,
                   rows_inside: list[str]) -> None:
    fix = 'Remove the stray quote, or quote the field whole and double the quotes inside it ("")'
    if end - start >= CSV_MAX_LINES:
        raise ValueError(f"{path} line {start} (row {row}): a quoted field runs from this row over {end - start + 1} "
                         f"lines, to line {end}; clipcond takes a quoted caption of more than {CSV_MAX_LINES} lines "
                         f"for a stray quote that swallowed the rows after it. {fix}")
    if len(rows_inside) >= 2:
        raise ValueError(f"{path} line {start} (row {row}): a quoted field opened in this row runs to line {end} and "
                         f"holds {len(rows_inside)} lines that read as rows of their own ({rows_inside[0]!r:.60}, "
                         f"{rows_inside[1]!r:.60}): a stray quote that swallowed the rows after it. {fix}")
    if len(record) != expected:
        raise ValueError(f"{path} line {start} (row {row}): {len(record)} fields, the header has {expected}")


def _row_shaped_lines(record: list[str], expected: int, previous: str | None) -> list[str]:
    """The lines after a line break inside a field that read as rows of the table: quote-free, as many fields as
    the header (two or more), the first field shaped as the previous row's (``11,caption 11`` after ``10``: digits,
    then letters, spaces and signs alike). What the rows a stray quote swallowed look like; one such line can be a
    caption's own ("Over\n1,000 balloons" after id ``17``): two are taken for swallowed rows."""
    if expected < 2 or previous is None:
        return []
    shape = _shape(previous)
    return [line for field in record for line in (x.rstrip("\r") for x in field.split("\n")[1:])
            if '"' not in line and line.count(",") == expected - 1 and _shape(line.split(",")[0]) == shape]


def _shape(text: str) -> str:
    """Runs of letters as ``a``, of digits as ``9``, of spaces as one space; other characters kept (k-12: a-9)."""
    return re.sub(r"\s+", " ", re.sub(r"\d+", "9", re.sub(r"[^\W\d_]+", "a", text)))


def _csv_error(path: Path, start: int, end: int, row: int, err: csv.Error) -> ValueError:
    where = f"{path} line {start} (row {row})"
    text = str(err)
    fix = 'remove the stray quote, or quote the field whole and double the quotes inside it ("")'
    if "unexpected end of data" in text:
        return ValueError(f"{where}: a quoted field opened in this row is never closed: it runs to the end of the "
                          f"file (line {end}), swallowing every row after it; {fix}")
    if "expected after" in text:
        return ValueError(f"{where}: a quoted field opened in this row is closed on line {end} by a quote followed by "
                          f"more text, not by a comma or the line's end; {fix}")
    if "field limit" in text:
        return ValueError(f"{where}: a field runs past {csv.field_size_limit()} characters (to line {end}): a quoted "
                          f"field never closed? {fix}")
    return ValueError(f"{where}: not CSV ({text}, at line {end})")


def _arrow(batches: Iterable, columns: list[str], id_column: str | None) -> Iterator[Columns]:
    for batch in batches:
        yield [batch[c].to_pylist() for c in columns], batch[id_column].to_pylist() if id_column else None


def _need(module: str, path: Path, package: str):  # noqa: ANN202 (optional modules)
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(f"reading {path} needs {package}: pip install {package}") from err


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


def _tar(path: Path, columns: list[str], id_column: str | None) -> Iterator[Columns]:
    """A webdataset shard: ``--column txt`` (a member suffix) or ``json:FIELD``; ids are the ``__key__``s."""
    if id_column not in (None, TAR_KEY):
        raise ValueError(f"{path}: the id of a tar sample is its {TAR_KEY}; --id-column must be omitted or "
                         f"{TAR_KEY!r}, got {id_column!r}")
    samples = tar.samples(path, {c.partition(":")[0] for c in columns})
    while chunk := list(itertools.islice(samples, READ_BATCH)):
        yield [[tar.field(path, key, found, c) for key, found in chunk] for c in columns], [k for k, _ in chunk]


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
    suffix = ".tar" if path.name.lower().endswith(TAR_SUFFIXES) else path.suffix.lower()
    if suffix not in READERS:
        raise ValueError(f"{path}: unknown input type {path.suffix!r}; expected one of {SUFFIXES + TAR_SUFFIXES} "
                         "or a folder written by datasets' save_to_disk")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such input file")
    return READERS[suffix]


def _present(cells: Sequence[object], names: Sequence[str], row: int, source: object) -> tuple[str, ...]:
    """A row's captions among ``cells`` (named ``names`` in messages): empty and null ones are missing variants."""
    pairs = zip(cells, names, strict=True)
    captions = tuple(_string(c, n, row, source) for c, n in pairs if c is not None and c != "")
    if not captions:
        raise ValueError(f"{source} row {row}: no caption (columns {list(dict.fromkeys(names))} are all empty or "
                         "null); every row needs at least one")
    return captions


def _variants(values: list[list], columns: list[str], first_row: int, source: object) -> list[tuple[str, ...]]:
    """Each row's captions: one per column, or the items of one list-valued column (k_i of them)."""
    if len(columns) > 1:
        return [_present(cells, columns, first_row + i, source) for i, cells in enumerate(zip(*values, strict=True))]
    rows, column = [], columns[0]
    for i, value in enumerate(values[0]):
        if isinstance(value, list | tuple):
            if not value:
                raise ValueError(f"{source} row {first_row + i}: no caption (column {column!r} holds an empty list); "
                                 "every row needs at least one")
            rows.append(_present(value, [f"{column}[{j}]" for j in range(len(value))], first_row + i, source))
        else:
            rows.append((_string(value, column, first_row + i, source),))
    return rows


def read_captions(path: str | Path | Sequence[str | Path], *, column: str | Sequence[str] = "caption",
                  id_column: str | None = None, with_ids: bool | None = None) -> Iterator[Batch]:
    """``(rows, ids)`` batches of at most ``READ_BATCH`` rows over every input file in sorted order;
    each row a tuple of its k_i >= 1 captions (variants), values checked, ids as strings. ``with_ids``:
    whether the rows read before these held ids (a scan reading its inputs file by file)."""
    columns = [column] if isinstance(column, str) else list(column)
    if not columns:
        raise ValueError("at least one --column is needed")
    for file in expand_inputs(path):
        reader = _reader(file)
        is_tar = reader is READERS[".tar"]
        # Tars default to the .txt member, as img2dataset writes the caption.
        file_columns = [TAR_DEFAULT_COLUMN if c == "caption" else c for c in columns] if is_tar else columns
        row = 0
        for values, ids in reader(file, file_columns, id_column):
            rows = _variants(values, file_columns, row, file)
            check_like_before(file, ids_before=with_ids, has_ids=ids is not None)
            with_ids = ids is not None
            if ids is not None:
                ids = _strings(ids, TAR_KEY if is_tar else id_column, row, file, ids=True)
            row += len(rows)
            yield rows, ids


def check_like_before(file: Path, *, ids_before: bool | None = None, has_ids: bool | None = None) -> None:
    """Rows of ``file`` hold ids if and only if the rows before them did (their variant counts may differ)."""
    if None not in (ids_before, has_ids) and has_ids != ids_before:
        raise ValueError(f"{file}: rows {'with' if has_ids else 'without'} ids after rows "
                         f"{'with' if ids_before else 'without'} them: tars (ids = {TAR_KEY}) and tables "
                         "without --id-column cannot be mixed")
