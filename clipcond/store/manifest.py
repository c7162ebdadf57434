"""The store's manifest: what a store is bound to and every file it holds (``Manifest``), one owner.

``manifest.json`` is written last and atomically (``Manifest.write``), so a manifest lists only whole files;
read, it is validated field by field (``Manifest.from_json``) before anything in it is trusted. Format 1 (no row
checksums; only unreleased clipcond wrote it) is refused with how to make a format-2 store.
"""

from __future__ import annotations

import hashlib
import json
import logging
import mmap
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from clipcond._files import atomic_write, sha256_file
from clipcond.specs import SpecError, spec_from_dict
from clipcond.store.layout import RowLayout

logger = logging.getLogger(__name__)

FORMAT = "clipcond-embeddings"
FORMAT_VERSION = 3  # what this clipcond writes: 2 plus the row layout (``parts``) that T5 stores need
READ_VERSIONS = (2, 3)  # 2: a CLIP store (one whole part); 1 was written by unreleased clipcond only
MANIFEST = "manifest.json"
NULL = "null.safetensors"
REPAIR_HINT = "delete the damaged file(s) and rerun the same `clipcond precompute` command to re-encode them"
STORE_DTYPES = ("float32", "float16", "bfloat16")  # what precompute writes (torch dtype names)
STORE_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}
SHA256_HEX = frozenset("0123456789abcdef")


# --- the manifest -----------------------------------------------------------------------
@dataclass(frozen=True, slots=True, kw_only=True)
class FileEntry:
    """A file of the store as the manifest records it: checked by size on open, by sha256 on verify."""

    file: str  # name in the store folder
    bytes: int
    sha256: str

    def problem(self, root: Path, checksums: bool = False) -> str | None:
        path = root / self.file
        if not path.is_file():
            return f"{path}: missing (the manifest lists it with {self.bytes} bytes)"
        size = path.stat().st_size
        if size != self.bytes:
            return f"{path}: truncated or overwritten: {size} bytes, the manifest says {self.bytes}"
        if checksums and (digest := sha256_file(path)) != self.sha256:
            return f"{path}: corrupted: sha256 {digest[:16]}..., the manifest says {self.sha256[:16]}..."
        return None

    @classmethod
    def from_json(cls, data: dict) -> FileEntry:
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})

    def check(self, what: str) -> None:
        """Each field's type and range, as a reader needs them; ``ValueError`` naming ``what`` and the field."""
        name = self.file
        if not (isinstance(name, str) and name and name[0] != "." and name.isascii() and name.isprintable()
                and "/" not in name and "\\" not in name):
            raise ValueError(f"{what}: file {name!r:.80} is not a file name in the store folder")
        _count(self.bytes, f"{what} ({name}): bytes")
        if not (isinstance(self.sha256, str) and len(self.sha256) == 64 and set(self.sha256) <= SHA256_HEX):
            raise ValueError(f"{what} ({name}): sha256 {self.sha256!r:.80} is not 64 lowercase hex digits")

    def read_checked(self, root: Path) -> bytes:
        """The whole file, its size and sha256 checked against this entry (a small file read whole: the null)."""
        path = Path(root) / self.file
        try:
            data = path.read_bytes()
        except FileNotFoundError as err:
            raise FileNotFoundError(f"{path}: missing (the manifest lists it with {self.bytes} bytes)") from err
        self.check_data(path, data)
        return data

    def check_data(self, path: Path, data: bytes | mmap.mmap) -> None:
        """``data``, the file's bytes, has this entry's size and sha256."""
        if len(data) != self.bytes:
            raise ValueError(f"{path}: truncated or overwritten: {len(data)} bytes, the manifest says {self.bytes}; "
                             f"{REPAIR_HINT}")
        if (digest := hashlib.sha256(data).hexdigest()) != self.sha256:
            raise ValueError(f"{path}: corrupted: sha256 {digest[:16]}..., the manifest says {self.sha256[:16]}...; "
                             f"{REPAIR_HINT}")


def _count(value: object, what: str, *, positive: bool = False) -> int:
    """``value`` as a manifest count: an int (not a bool), >= 0 (``positive``: > 0); ``ValueError`` naming it."""
    if type(value) is not int or value < int(positive):
        raise ValueError(f"{what} must be an int >= {int(positive)}, got {value!r:.80}")
    return value


@dataclass(frozen=True, slots=True, kw_only=True)
class ShardEntry(FileEntry):
    """A shard: the embeddings of slots ``start:stop``, written by run ``plan`` (or a gc)."""

    start: int
    stop: int
    truncated: int = 0  # of its captions, how many were longer than the context and cut
    plan: str | None = None  # the run that wrote it (a resumed run keeps only its own plan's shards)


@dataclass(frozen=True, slots=True, kw_only=True)
class Source:
    """The input a store version was made from; ``sha256`` covers every caption and id in row order (a sha256
    of each input file's sha256 of its rows, so that a scan can take an unchanged file's from its cache)."""

    paths: tuple[str, ...]
    columns: tuple[str, ...]
    id_column: str | None
    limit: int | None
    sha256: str

    @classmethod
    def from_json(cls, data: dict) -> Source:
        if not isinstance(data["paths"], list) or not isinstance(data["columns"], list):
            raise TypeError(f"input paths and columns must be lists, got {data['paths']!r:.50}, "
                            f"{data['columns']!r:.50}")
        return cls(paths=tuple(data["paths"]), columns=tuple(data["columns"]), id_column=data["id_column"],
                   limit=data["limit"], sha256=data["sha256"])

    def to_json(self) -> dict:
        return {"paths": list(self.paths), "columns": list(self.columns), "id_column": self.id_column,
                "limit": self.limit, "sha256": self.sha256}

    def check(self) -> None:
        """Each field's type, as ``describe`` and precompute's comparison read them; ``ValueError`` naming it."""
        for name in ("paths", "columns"):
            values = getattr(self, name)
            if not values or not all(isinstance(v, str) for v in values):
                raise ValueError(f"input.{name} must be a non-empty list of strings, got {list(values)!r:.80}")
        if not isinstance(self.id_column, str | None):
            raise ValueError(f"input.id_column must be a string or null, got {self.id_column!r:.80}")
        if self.limit is not None:
            _count(self.limit, "input.limit")
        if not (isinstance(self.sha256, str) and len(self.sha256) == 64 and set(self.sha256) <= SHA256_HEX):
            raise ValueError(f"input.sha256 {self.sha256!r:.80} is not 64 lowercase hex digits")


@dataclass(frozen=True, slots=True, kw_only=True)
class Manifest:
    """``manifest.json``: what a store version is bound to, what it holds, and every file in it."""

    format_version: int = FORMAT_VERSION
    clipcond_version: str
    complete: bool  # False until the last shard is in: readers refuse the store
    # What a store is bound to (precompute refuses to add to a store that differs in any of these):
    encoder: dict  # the spec (EncoderSpec.to_dict())
    fingerprint: str  # of the weights
    dtype: str
    sequence_shape: tuple[int, int]  # [77, D]
    pooled_dim: int
    shard_size: int  # embeddings per shard
    # This version:
    input: Source
    has_ids: bool
    rows: int  # N input rows
    variants: int  # k captions a row
    unique: int  # distinct captions among them
    slots: int  # embedding slots numbered so far (>= unique: unreferenced ones stay until gc)
    next_shard: int  # the number the next new shard gets
    num_shards: int  # shards this version needs (== len(shards) once complete)
    plan: str | None  # which captions go to which shard and batch
    generation: str | None  # this version's id; names its index
    truncated: int  # captions longer than the context, cut
    index: FileEntry | None
    null: FileEntry | None
    shards: tuple[ShardEntry, ...] = ()  # sorted by start
    # How each row's sequence is held (RowLayout.to_json()); None: one whole part (format 2, and CLIP stores).
    parts: list | None = None

    @property
    def layout(self) -> RowLayout:
        return RowLayout.from_json(self.parts, self.sequence_shape)

    @classmethod
    def read(cls, root: Path) -> Manifest:
        path = Path(root) / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(f"{root}: no {MANIFEST}: not a clipcond embedding store "
                                    f"(write one with `clipcond precompute --out {root} ...`)")
        try:
            data = json.loads(path.read_bytes().decode("utf-8"))
        except UnicodeDecodeError as err:
            raise ValueError(f"{path}: not UTF-8 ({err}); {REPAIR_HINT}") from err
        except (ValueError, RecursionError) as err:  # JSONDecodeError is a ValueError; absurd nesting recurses
            raise ValueError(f"{path}: not valid JSON ({type(err).__name__}: {str(err):.200}); {REPAIR_HINT}") from err
        return cls.from_json(data, path)

    @classmethod
    def from_json(cls, data: dict, where: object = MANIFEST) -> Manifest:
        if not isinstance(data, dict):
            raise ValueError(f"{where}: a manifest is a JSON object, got {type(data).__name__}")
        if data.get("format") != FORMAT:
            raise ValueError(f"{where}: format is {data.get('format')!r:.80}, expected {FORMAT!r}")
        version = data.get("format_version")
        if version == 1:
            raise ValueError(f"{where}: store format version 1 (clipcond {data.get('clipcond_version')!r:.40}) is "
                             f"no longer read: only unreleased clipcond versions wrote it. Run `clipcond precompute` "
                             f"again with --out a new folder to make a version-{FORMAT_VERSION} store")
        if version not in READ_VERSIONS:
            raise ValueError(f"{where}: store format version {version!r:.40} (clipcond "
                             f"{data.get('clipcond_version')!r:.40}); this clipcond reads versions "
                             f"{', '.join(map(str, READ_VERSIONS))}")
        if version == 2 and "parts" in data:
            raise ValueError(f"{where}: a version-2 manifest has no parts (damaged?); {REPAIR_HINT}")
        try:
            values = {f.name: data[f.name] for f in fields(cls) if f.name != "parts" or version > 2}
            entry = FileEntry.from_json
            manifest = cls(**{**values, "sequence_shape": tuple(values["sequence_shape"]),
                              "input": Source.from_json(values["input"]),
                              "index": entry(values["index"]) if values["index"] else None,
                              "null": entry(values["null"]) if values["null"] else None,
                              "shards": tuple(ShardEntry.from_json(e) for e in values["shards"])})
            manifest.check()
        except (KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"{where}: not a version-{version} manifest ({type(err).__name__}: {err})") from err
        except ValueError as err:
            raise ValueError(f"{where}: {err}; {REPAIR_HINT}") from err
        return manifest

    def check(self) -> None:
        """Every field a reader relies on has its type and range, and the shards tile their slots in order;
        ``ValueError`` naming the field (``from_json`` adds the file)."""
        for name in ("rows", "unique", "slots", "next_shard", "num_shards", "truncated"):
            _count(getattr(self, name), name)
        for name in ("variants", "shard_size"):
            _count(getattr(self, name), name, positive=True)
        _count(self.pooled_dim, "pooled_dim")  # 0: PixArt has no pooled vector
        if self.dtype not in STORE_DTYPES:
            raise ValueError(f"dtype {self.dtype!r:.40} is not one of {STORE_DTYPES}")
        if len(self.sequence_shape) != 2:
            raise ValueError(f"sequence_shape must be [L, D], got {list(self.sequence_shape)!r:.80}")
        for value in self.sequence_shape:
            _count(value, "sequence_shape", positive=True)
        self.layout  # noqa: B018 (validates parts against sequence_shape)
        if type(self.complete) is not bool or type(self.has_ids) is not bool:
            raise ValueError(f"complete and has_ids must be true or false, got {self.complete!r:.20}, "
                             f"{self.has_ids!r:.20}")
        if not isinstance(self.encoder, dict) or not isinstance(self.encoder.get("name"), str):
            raise ValueError(f"encoder must be a JSON object with a name, got {self.encoder!r:.80}")
        try:
            spec_from_dict(self.encoder)
        except (SpecError, ValueError, TypeError, AttributeError) as err:
            raise ValueError(f"encoder is not an encoder spec ({err})") from err
        for name in ("clipcond_version", "fingerprint"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name} must be a string, got {getattr(self, name)!r:.80}")
        for name in ("plan", "generation"):
            if not isinstance(getattr(self, name), str | None):
                raise ValueError(f"{name} must be a string or null, got {getattr(self, name)!r:.80}")
        self.input.check()
        for name in ("index", "null"):
            if (entry := getattr(self, name)) is not None:
                entry.check(name)
            elif self.complete:
                raise ValueError(f"a complete store lists its {name}, this manifest has {name}: null")
        stop = 0
        for k, entry in enumerate(self.shards):
            entry.check(f"shards[{k}]")
            start, end = _count(entry.start, f"shards[{k}].start"), _count(entry.stop, f"shards[{k}].stop")
            _count(entry.truncated, f"shards[{k}].truncated")
            if not stop <= start < end <= self.slots:
                raise ValueError(f"shards[{k}] ({entry.file}) holds slots {start}:{end}; shards must be sorted, "
                                 f"disjoint and within the store's {self.slots} slots (the one before ends at {stop})")
            stop = end

    def to_json(self) -> dict:
        data = {"format": FORMAT, **asdict(self)}  # asdict recurses into the entries
        return {**data, "sequence_shape": list(self.sequence_shape), "input": self.input.to_json(),
                "shards": [asdict(e) for e in self.shards]}

    def write(self, root: Path) -> None:
        atomic_write(Path(root) / MANIFEST, json.dumps(self.to_json(), indent=1).encode())

    @property
    def files(self) -> list[FileEntry]:
        return [e for e in (self.index, self.null) if e is not None] + list(self.shards)

    def problems(self, root: Path, *, checksums: bool = False, progress: bool = False) -> list[str]:
        """What is wrong: incomplete, missing or resized files, and (``checksums``) bad sha256."""
        from tqdm.auto import tqdm

        root = Path(root)
        problems = []
        if not self.complete:
            problems.append(f"{root}: incomplete: {len(self.shards)} of {self.num_shards} shards recorded; rerun "
                            "the same `clipcond precompute` command to finish it")
        for entry in tqdm(self.files, desc="verify", unit="file", disable=True if not progress else None):
            if (problem := entry.problem(root, checksums)) is not None:
                problems.append(problem)
        return problems

    def raise_problems(self, root: Path, *, checksums: bool = False) -> None:
        if problems := self.problems(root, checksums=checksums):
            incomplete = f"{root}: incomplete"  # has its own hint; damaged files need the repair hint
            fix = "" if all(p.startswith(incomplete) for p in problems) else f"\n{REPAIR_HINT}"
            raise ValueError(f"embedding store {root} failed verification:\n  " + "\n  ".join(problems) + fix)

    def describe(self, root: Path) -> list[str]:
        """What the store holds, as lines for people (``clipcond inspect``, ``clipcond precompute``)."""
        seq, source = list(self.sequence_shape), self.input
        disk = sum(e.bytes for e in self.files)
        ids = f"ids from column {source.id_column!r}" if source.id_column else "no ids (look rows up by position)"
        ids = "ids: each tar sample's __key__" if self.has_ids and not source.id_column else ids
        variants = f", {self.variants} variants a row" if self.variants > 1 else ""
        more = f" (+{len(source.paths) - 1} more)" if len(source.paths) > 1 else ""
        return [
            f"{root}: clipcond embedding store (format {self.format_version}, clipcond {self.clipcond_version}), "
            + ("complete" if self.complete else "INCOMPLETE"),
            f"  encoder {self.encoder['name']}: sequence {seq}, pooled [{self.pooled_dim}], {self.dtype}; "
            f"weights fingerprint {self.fingerprint[:16]}",
            f"  rows {self.rows}{variants}: {self.unique} unique captions, {ids}",
            f"  input {source.paths[0]}{more} column(s) {', '.join(map(repr, source.columns))}, "
            f"sha256 {source.sha256[:16]}",
            f"  shards {len(self.shards)}/{self.num_shards} of up to {self.shard_size} embeddings, {_size(disk)} on "
            f"disk; {self.truncated} unique captions truncated to {spec_from_dict(self.encoder).token_limits}",
            self._describe_rows(),
        ]

    def _describe_rows(self) -> str:
        """Bytes a row takes in the shards, against the padded [L, D] + [P] row the pipeline gets."""
        layout, itemsize = self.layout, STORE_ITEMSIZE[self.dtype]
        padded = (layout.length * layout.width + self.pooled_dim) * itemsize
        slots = sum(e.stop - e.start for e in self.shards)
        stored = sum(e.bytes for e in self.shards) / slots if slots else float("nan")
        parts = " + ".join(f"{p.name} [{p.length}, {p.width}]" for p in layout.parts)
        how = ("the rows each mask keeps, and their lengths (the others are padding, restored as zeros)"
               if layout.masked else f"parts {parts} (zero columns not stored)" if len(layout.parts) > 1 else
               "whole rows (the transformer reads every row: nothing is left out)")
        saved = f" ({100 - 100 * stored / padded:.1f} % saved)" if layout.masked or len(layout.parts) > 1 else ""
        recipe = self.encoder.get("pipeline") or ("CLIP" if self.encoder.get("t5") is None else self.encoder["name"])
        return (f"  rows ({recipe}): {how}; {_size(stored)} a row on disk (shard headers included), "
                f"{stored / padded:.1%} of the {_size(padded)} of a padded row{saved}")


def _size(n: float) -> str:
    unit = "B"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            break
        n /= 1000
    return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"


def inspect_store(root: Path) -> tuple[list[str], list[str]]:
    """``(description lines, problems)`` after checking every file's size and sha256."""
    manifest = Manifest.read(Path(root))
    return manifest.describe(Path(root)), manifest.problems(Path(root), checksums=True, progress=True)
