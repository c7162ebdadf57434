"""A shard of a store as tensors over one private memory map: its rows' parts, pooled vectors, checks and (masked
layouts) lengths, each row checked and copied into a batch from here (clipcond/store/reader.py).
"""

from __future__ import annotations

import math
import mmap
from pathlib import Path

import numpy as np
import torch

from clipcond.store.checksums import buffers_checksum, row_bytes, row_checksum
from clipcond.store.format import ShardFormat
from clipcond.store.manifest import REPAIR_HINT, Manifest, ShardEntry


class ShardView:
    """A shard's parts, ``pooled`` [n, P] and checks as tensors over one private memory map.

    A CLIP row (one whole part, ``sequence`` [n, L, D]) is a view (no copy, no per-call parsing: ~1 µs); the map is
    copy-on-write, so a caller writing into a row never touches the file. The header is parsed by the one strict
    safetensors header reader and held to the shard rules and the manifest (``ShardFormat.layout``), and a masked
    layout's ``lengths`` must cut its kept rows exactly, before any byte of data is trusted.
    """

    def __init__(self, path: Path, entry: ShardEntry, manifest: Manifest) -> None:
        try:
            with open(path, "rb") as f:
                layout, data_start = ShardFormat.layout(f, path, entry, manifest)
                self.map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        except FileNotFoundError:
            raise
        except OSError as err:
            raise ValueError(f"{path}: not a readable shard ({type(err).__name__}: {err}); {REPAIR_HINT}") from err
        tensors = {name: torch.frombuffer(self.map, dtype=info.dtype, count=math.prod(info.shape),
                                          offset=data_start + info.begin).view(info.shape)
                   if math.prod(info.shape) else torch.empty(info.shape, dtype=info.dtype)  # PixArt's pooled [n, 0]
                   for name, info in layout.items()}
        self.path, self.layout = path, manifest.layout
        self.parts = [tensors[part.name] for part in self.layout.parts]  # [n, length, width] | masked: [T, D]
        self.sequence, self.pooled = self.parts[0], tensors["pooled"]  # [n, L, D] for a plain layout, [n, P]
        self.checks = tensors["check"].numpy()  # [n] int64
        self.part_rows = [row_bytes(part) for part in self.parts]  # [n, bytes] | masked: [T, bytes per row]
        self.rows = {"sequence": self.part_rows[0], "pooled": row_bytes(self.pooled)}  # uint8 views
        self.lengths = self.starts = None
        if self.layout.masked:
            lengths = tensors["lengths"].numpy()  # [n] rows each row keeps
            if len(lengths) and (lengths.min() < 1 or lengths.max() > self.layout.length
                                 or lengths.sum() != len(self.parts[0])):
                raise ValueError(f"{path}: tensor 'lengths' does not cut the {len(self.parts[0])} kept rows into "
                                 f"rows of 1 to {self.layout.length} (damaged); {REPAIR_HINT}")
            self.lengths, self.starts = lengths, np.concatenate([[0], np.cumsum(lengths)])  # [n], [n + 1]

    def row_parts(self, local: int) -> list[np.ndarray]:
        """Row ``local``'s parts as stored: 1-D uint8 views, one per part."""
        if self.starts is None:
            return [rows[local] for rows in self.part_rows]
        return [self.part_rows[0][self.starts[local] : self.starts[local + 1]].reshape(-1)]

    def kept(self, local: int) -> int:
        """Rows of the sequence row ``local`` keeps: a masked layout's length, else all of them."""
        return self.layout.length if self.lengths is None else int(self.lengths[local])

    def verify(self, local: int, what: str) -> None:
        """Row ``local`` as stored matches its checksum: one compiled pass over the row's bytes in place."""
        if self.layout.plain:
            ok = row_checksum(self.rows["sequence"][local], self.rows["pooled"][local]) == self.checks[local]
        else:
            length = 0 if self.lengths is None else int(self.lengths[local])
            ok = buffers_checksum(self.row_parts(local), self.rows["pooled"][local], length) == self.checks[local]
        if not ok:
            raise self.damaged(local, what)

    def pairs(self, local: int, row: torch.Tensor) -> list[tuple[np.ndarray, np.ndarray]]:
        """(stored bytes, destination bytes) pairs that put row ``local``'s parts into ``row`` [L', D] (L' >= its
        kept rows): a part as wide as the sequence in one piece, a narrower one (SD3's CLIP rows) row by row."""
        if self.starts is None:
            out, first = [], 0
            for part, rows in zip(self.layout.parts, self.part_rows, strict=True):
                target = row[first : first + part.length, : part.width]  # [length, width]
                if part.width == row.shape[1]:
                    out.append((rows[local], row_bytes(target[None])[0]))
                else:
                    step = part.width * row.element_size()
                    out += [(rows[local][t * step : (t + 1) * step], row_bytes(target[t : t + 1])[0])
                            for t in range(part.length)]
                first += part.length
            return out
        k = int(self.lengths[local])
        return [(self.row_parts(local)[0], row_bytes(row[None, :k])[0])]

    def damaged(self, local: int, what: str) -> ValueError:
        return ValueError(f"{self.path} row {local} ({what}): checksum mismatch, the shard is damaged on disk; "
                          f"rerun `clipcond precompute` with --verify to re-encode the damaged shards")
