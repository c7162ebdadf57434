"""How a store row's sequence is held in the shards (``RowLayout``): one owner for splitting a batch of
conditionings into the shards' tensors and for the rows and mask a reader restores.

- CLIP encoders and the unmasked T5 recipes (Flux) hold the sequence whole: one part ``sequence`` [L, D]. Their
  transformer attends to every row, the T5 padding rows included, so nothing can be left out.
- SD3 holds its two parts: ``clip`` (CLIP-L ⊕ G, [77, 2048]) and ``t5`` ([256, 4096]). The pipeline zero-pads the
  CLIP rows to 4096 columns and stacks the parts; those 2048 zero columns are not stored but restored at read.
- Masked recipes (PixArt, Chroma, Sana, AuraFlow: padding "masked" or "zero") hold only the rows their mask keeps
  (the prompt, its EOS, Chroma's one pad; Sana's BOS and prompt rows): ``sequence`` [T, D] for a shard's rows
  together, and ``lengths`` [n]. A read restores the padded tensor and the mask exactly: PixArt's, Chroma's and
  Sana's transformers mask the other rows out, and AuraFlow's pipeline zeroes them (its transformer attends to
  those zeros, so its batches keep the full length), and clipcond's own encoding holds zeros there too.

A shard holds, in this order: the largest part (streamed to disk as the rows arrive), the other parts, ``pooled``
[n, P], ``lengths`` [n] (masked layouts) and ``check`` [n] (clipcond/store/format.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from clipcond.conditioning import Conditioning
from clipcond.specs import EncoderSpec

RESERVED = ("pooled", "lengths", "check", "mask")  # shard or null tensors that are not sequence parts


@dataclass(frozen=True, slots=True)
class Part:
    """Rows ``length`` of the sequence (after the parts before it), their first ``width`` columns (the rest are
    zeros); ``trimmed``: only the rows the mask keeps are stored."""

    name: str
    length: int
    width: int
    trimmed: bool = False

    def to_json(self) -> list:
        return [self.name, self.length, self.width, self.trimmed]


@dataclass(frozen=True, slots=True)
class RowLayout:
    """The parts a row's sequence [L, D] is stored as; ``L`` the parts' lengths summed, ``D`` = ``width``."""

    parts: tuple[Part, ...]
    width: int

    @classmethod
    def of(cls, spec: EncoderSpec) -> RowLayout:
        """The layout of an encoder's rows: SD3's two parts, a masked recipe's trimmed rows, or the whole sequence."""
        if spec.combine == "tokens":
            clip = sum(t.width for t in spec.towers)
            return cls((Part("clip", spec.max_length, clip), Part("t5", spec.t5_max_length, spec.sequence_dim)),
                       spec.sequence_dim)
        return cls((Part("sequence", spec.sequence_length, spec.sequence_dim, trimmed=spec.padding != "raw"),),
                   spec.sequence_dim)

    @classmethod
    def whole(cls, length: int, width: int) -> RowLayout:
        """One untrimmed part: a CLIP store's (and format 2's, which did not say)."""
        return cls((Part("sequence", length, width),), width)

    @classmethod
    def from_json(cls, parts: object, shape: tuple[int, int]) -> RowLayout:
        """The manifest's ``parts`` ([[name, length, width, trimmed], ...]) checked against its ``sequence_shape``
        [L, D]: names unique and not reserved, lengths summing to L, widths in [1, D], a trimmed part alone and
        full-width. ``ValueError`` naming what is wrong."""
        length, width = shape
        if parts is None:
            return cls.whole(length, width)
        if not isinstance(parts, list) or not parts or not all(isinstance(p, list) and len(p) == 4 for p in parts):
            raise ValueError(f"parts must be a non-empty list of [name, length, width, trimmed], got {parts!r:.80}")
        out = []
        for name, rows, columns, trimmed in parts:
            if not (isinstance(name, str) and name.isidentifier() and name not in RESERVED):
                raise ValueError(f"parts: name {name!r:.40} is not a tensor name a shard may use")
            ints = all(type(v) is int and v > 0 for v in (rows, columns))
            if not ints or columns > width or type(trimmed) is not bool:
                raise ValueError(f"parts: {name!r} has length {rows!r:.20}, width {columns!r:.20}, trimmed "
                                 f"{trimmed!r:.20}; needs ints > 0, width <= {width}, and true or false")
            out.append(Part(name, rows, columns, trimmed))
        layout = cls(tuple(out), width)
        if len({p.name for p in out}) != len(out) or layout.length != length:
            raise ValueError(f"parts {parts!r:.120} must have distinct names and lengths summing to {length}")
        if any(p.trimmed for p in out) and (len(out) > 1 or out[0].width != width):
            raise ValueError(f"parts {parts!r:.120}: a trimmed part must be the only one and full-width")
        return layout

    def to_json(self) -> list:
        return [p.to_json() for p in self.parts]

    @property
    def length(self) -> int:
        return sum(p.length for p in self.parts)

    @property
    def masked(self) -> bool:
        """Rows of different lengths, and a mask restored at read."""
        return self.parts[0].trimmed

    @property
    def plain(self) -> bool:
        """One whole part: a row is one [L, D] block of a shard, read as a view."""
        return len(self.parts) == 1 and not self.masked

    @property
    def streamed(self) -> int:
        """The part a shard writer streams to disk as rows arrive (the largest); the others are held until the end."""
        return max(range(len(self.parts)), key=lambda i: self.parts[i].length * self.parts[i].width)

    def offsets(self) -> list[int]:
        """Each part's first row in the sequence."""
        out, row = [], 0
        for part in self.parts:
            out.append(row)
            row += part.length
        return out

    def row_bytes(self, itemsize: int, kept: float | None = None) -> float:
        """Bytes of a row's parts (no pooled vector): with ``kept`` rows for a masked layout's row."""
        part = self.parts[0]
        if self.masked:
            return (part.length if kept is None else kept) * part.width * itemsize
        return sum(p.length * p.width for p in self.parts) * itemsize

    def split(self, c: Conditioning) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """A batch's part tensors (``[B, length, width]`` each; a masked layout's ``[B, L_b, D]`` as encoded, the
        batch's longest) and each row's kept rows (``[B]`` int64: ``mask.sum(1)``; None where unmasked)."""
        if c.sequence.shape[2] != self.width or (not self.masked and c.sequence.shape[1] != self.length):
            raise ValueError(f"rows of {list(c.sequence.shape[1:])} do not fit the store's [{self.length}, "
                             f"{self.width}]")
        if self.masked:
            if c.mask is None:
                raise ValueError("a masked layout's rows need their mask (a masked T5 recipe's Conditioning)")
            return [c.sequence], c.mask.sum(1)
        parts, offsets = [], self.offsets()
        for part, first in zip(self.parts, offsets, strict=True):
            rows = c.sequence[:, first : first + part.length]  # [B, length, D]
            if part.width < self.width and rows[..., part.width :].any():  # SD3's padding columns: nothing lost
                raise ValueError(f"part {part.name!r} holds columns [:{part.width}] of its rows, but these rows have "
                                 f"non-zero values after them")
            parts.append(rows[..., : part.width])  # [B, length, width]
        return parts, None


__all__ = ["Part", "RowLayout"]
