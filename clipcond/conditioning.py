"""``Conditioning``: the tensors a diffusers UNet consumes, batched by rows."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class Conditioning:
    """``sequence`` is the UNet's ``encoder_hidden_states``; ``pooled`` SDXL's ``text_embeds``."""

    sequence: torch.Tensor  # [B, L, D]
    pooled: torch.Tensor  # [B, P]

    def __post_init__(self) -> None:
        if self.sequence.ndim != 3 or self.pooled.ndim != 2:
            raise ValueError(f"Conditioning needs sequence [B, L, D] and pooled [B, P], got "
                             f"{tuple(self.sequence.shape)} and {tuple(self.pooled.shape)}")
        if self.sequence.shape[0] != self.pooled.shape[0]:
            raise ValueError(f"Conditioning rows differ: sequence has {self.sequence.shape[0]}, "
                             f"pooled {self.pooled.shape[0]}")

    def __len__(self) -> int:
        return self.sequence.shape[0]

    def __getitem__(self, rows: int | slice | Sequence[int] | torch.Tensor) -> Conditioning:
        """Rows of the batch; an int keeps the batch dimension (``c[0]`` is a batch of one)."""
        if isinstance(rows, int):
            rows = slice(rows, rows + 1 if rows != -1 else None)
        return Conditioning(self.sequence[rows], self.pooled[rows])

    def to(self, *args: object, **kwargs: object) -> Conditioning:
        """``Tensor.to`` on both tensors (device, dtype, ``non_blocking``)."""
        return Conditioning(self.sequence.to(*args, **kwargs), self.pooled.to(*args, **kwargs))

    @property
    def device(self) -> torch.device:
        return self.sequence.device

    @property
    def dtype(self) -> torch.dtype:
        return self.sequence.dtype

    @staticmethod
    def cat(items: Sequence[Conditioning]) -> Conditioning:
        """Concatenate along rows, e.g. ``cat([null, cond])`` for a CFG batch."""
        if not items:
            raise ValueError("Conditioning.cat needs at least one Conditioning")
        return Conditioning(torch.cat([c.sequence for c in items]), torch.cat([c.pooled for c in items]))
