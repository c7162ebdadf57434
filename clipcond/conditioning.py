"""``Conditioning``: the tensors a diffusers UNet or diffusion transformer consumes, batched by rows.

``pipeline_kwargs()`` names them as the diffusers 0.42 pipelines' ``__call__`` does
(``StableDiffusion3Pipeline``, ``FluxPipeline``, ``PixArtSigmaPipeline``, ...).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

# The __call__ keywords of each diffusers pipeline, as (keyword, Conditioning field); the negative's
# keywords are the same with "negative_" in front (negative_pooled_prompt_embeds, negative_prompt_attention_mask).
# Flux takes negatives only with true_cfg_scale > 1; its text_ids are made inside __call__, not passed.
PIPELINE_KWARGS: dict[str, tuple[tuple[str, str], ...]] = {
    "StableDiffusion3Pipeline": (("prompt_embeds", "sequence"), ("pooled_prompt_embeds", "pooled")),
    "FluxPipeline": (("prompt_embeds", "sequence"), ("pooled_prompt_embeds", "pooled")),
    "PixArtAlphaPipeline": (("prompt_embeds", "sequence"), ("prompt_attention_mask", "mask")),
    "PixArtSigmaPipeline": (("prompt_embeds", "sequence"), ("prompt_attention_mask", "mask")),
    "ChromaPipeline": (("prompt_embeds", "sequence"), ("prompt_attention_mask", "mask")),
    "SanaPipeline": (("prompt_embeds", "sequence"), ("prompt_attention_mask", "mask")),
    # AuraFlow's transformer takes no mask, but its __call__ refuses prompt_embeds without prompt_attention_mask
    # (check_inputs) and only reshapes it to [B, -1]: [B, L] serves, where encode_prompt returns [B, L * D].
    "AuraFlowPipeline": (("prompt_embeds", "sequence"), ("prompt_attention_mask", "mask")),
}
# Pipelines whose mask goes to SDPA in the embeddings' dtype (ChromaPipeline returns it so; SDPA refuses int64).
FLOAT_MASKS = frozenset({"ChromaPipeline"})
# Pipelines that, given no negative_prompt_embeds, encode their own negative padded to max_sequence_length (the
# __call__ default here) and concatenate it with yours along the batch: yours must be that long.
OWN_NEGATIVE_LENGTH = {"SanaPipeline": 300}


@dataclass(frozen=True, slots=True)
class Conditioning:
    """``sequence`` is the UNet's ``encoder_hidden_states`` (a transformer's ``encoder_hidden_states``);
    ``pooled`` SDXL's ``text_embeds`` (SD3/Flux ``pooled_projections``; ``[B, 0]`` where a recipe has none)."""

    sequence: torch.Tensor  # [B, L, D]
    pooled: torch.Tensor  # [B, P]
    mask: torch.Tensor | None = None  # [B, L] int64, 1 on the rows the transformer attends to; None: all (no mask)
    text_ids: torch.Tensor | None = None  # [L, 3] Flux's txt_ids (zeros), shared by every row; None elsewhere
    pipeline: str | None = None  # the diffusers pipeline these tensors feed (PIPELINE_KWARGS); None: not said

    def __post_init__(self) -> None:
        if self.sequence.ndim != 3 or self.pooled.ndim != 2:
            raise ValueError(f"Conditioning needs sequence [B, L, D] and pooled [B, P], got "
                             f"{tuple(self.sequence.shape)} and {tuple(self.pooled.shape)}")
        if self.sequence.shape[0] != self.pooled.shape[0]:
            raise ValueError(f"Conditioning rows differ: sequence has {self.sequence.shape[0]}, "
                             f"pooled {self.pooled.shape[0]}")
        if self.mask is not None and tuple(self.mask.shape) != tuple(self.sequence.shape[:2]):
            raise ValueError(f"Conditioning mask must be [B, L] = {list(self.sequence.shape[:2])}, "
                             f"got {list(self.mask.shape)}")
        if self.text_ids is not None and tuple(self.text_ids.shape) != (self.sequence.shape[1], 3):
            raise ValueError(f"Conditioning text_ids must be [L, 3] = [{self.sequence.shape[1]}, 3], "
                             f"got {list(self.text_ids.shape)}")

    def __len__(self) -> int:
        return self.sequence.shape[0]

    def __iter__(self) -> Iterator[Conditioning]:
        """Each row, as a batch of one."""
        return (self[i] for i in range(len(self)))

    def __getitem__(self, rows: int | slice | Sequence[int] | torch.Tensor) -> Conditioning:
        """Rows of the batch; an int keeps the batch dimension (``c[0]`` is a batch of one)."""
        if isinstance(rows, int):
            if not -len(self) <= rows < len(self):
                raise IndexError(f"row {rows} of a Conditioning of {len(self)} rows")
            rows = slice(rows, rows + 1 if rows != -1 else None)
        mask = None if self.mask is None else self.mask[rows]
        return Conditioning(self.sequence[rows], self.pooled[rows], mask, self.text_ids, self.pipeline)

    def to(self, *args: object, **kwargs: object) -> Conditioning:
        """``Tensor.to`` on every tensor (device, dtype, ``non_blocking``); the mask keeps its integer dtype."""
        sequence = self.sequence.to(*args, **kwargs)
        mask = None if self.mask is None else self.mask.to(sequence.device, non_blocking=bool(kwargs.get(
            "non_blocking", False)))
        text_ids = None if self.text_ids is None else self.text_ids.to(*args, **kwargs)
        return Conditioning(sequence, self.pooled.to(*args, **kwargs), mask, text_ids, self.pipeline)

    @property
    def device(self) -> torch.device:
        return self.sequence.device

    @property
    def dtype(self) -> torch.dtype:
        return self.sequence.dtype

    def padded(self, length: int) -> Conditioning:
        """A masked conditioning at ``length`` rows: zero rows under a zero mask appended (exact: the transformer
        never attends to them); itself at its own length. Unmasked conditionings keep theirs: their transformer
        attends to every row."""
        have = self.sequence.shape[1]
        if length == have:
            return self
        if self.mask is None or length < have:
            what = "an unmasked conditioning (every row is attended)" if self.mask is None else "a shorter length"
            raise ValueError(f"Conditioning.padded({length}): {have} rows cannot be padded to {what}")
        sequence = torch.nn.functional.pad(self.sequence, (0, 0, 0, length - have))  # [B, length, D]
        mask = torch.nn.functional.pad(self.mask, (0, length - have))  # [B, length]
        text_ids = None if self.text_ids is None else self.text_ids.new_zeros(length, 3)
        return Conditioning(sequence, self.pooled, mask, text_ids, self.pipeline)

    @staticmethod
    def cat(items: Sequence[Conditioning]) -> Conditioning:
        """Concatenate along rows, e.g. ``cat([null, cond])`` for a CFG batch; masked items of different lengths
        (a masked recipe batched to its longest prompt) are padded to the longest first (``padded``)."""
        if not items:
            raise ValueError("Conditioning.cat needs at least one Conditioning")
        if items[0].mask is not None:
            longest = max(c.sequence.shape[1] for c in items)
            items = [c.padded(longest) if c.mask is not None else c for c in items]
        first = items[0]
        if len({c.mask is None for c in items}) != 1:
            raise ValueError("Conditioning.cat: some items have a mask and some do not (another recipe?)")
        if len({c.pipeline for c in items}) != 1:
            names = sorted({str(c.pipeline) for c in items})
            raise ValueError(f"Conditioning.cat: items of different pipelines {names}")
        if first.text_ids is not None and any(c.text_ids is None or c.text_ids.shape != first.text_ids.shape
                                              for c in items):
            raise ValueError("Conditioning.cat: items of different text_ids (Flux's txt_ids are per length)")
        mask = None if first.mask is None else torch.cat([c.mask for c in items])
        return Conditioning(torch.cat([c.sequence for c in items]), torch.cat([c.pooled for c in items]), mask,
                            first.text_ids, first.pipeline)

    def pipeline_kwargs(self, negative: Conditioning | None = None) -> dict[str, torch.Tensor]:
        """The keyword arguments of the diffusers pipeline's ``__call__`` (``pipe(**c.pipeline_kwargs(), ...)``):
        ``prompt_embeds``, ``pooled_prompt_embeds``, ``prompt_attention_mask`` as the pipeline takes them, and
        with ``negative``, its ``negative_*`` twins (for CFG; ``tc.null(len(c))`` is the pipelines' default). Without
        it, Sana's masked rows are padded to the 300 rows of the negative its pipeline makes (exact: masked)."""
        if self.pipeline not in PIPELINE_KWARGS:
            raise ValueError(f"pipeline_kwargs: this Conditioning names pipeline {self.pipeline!r}; known: "
                             f"{sorted(PIPELINE_KWARGS)} (the T5 recipes'; a CLIP encoder's conditioning goes to "
                             "its pipeline as prompt_embeds=c.sequence, pooled_prompt_embeds=c.pooled)")
        if negative is not None and negative.pipeline != self.pipeline:
            raise ValueError(f"pipeline_kwargs: negative is for {negative.pipeline!r}, not {self.pipeline!r}")
        positive = self
        if negative is not None and self.mask is not None:  # the pipelines want both at one length
            longest = max(self.sequence.shape[1], negative.sequence.shape[1])
            positive, negative = self.padded(longest), negative.padded(longest)
        elif self.pipeline in OWN_NEGATIVE_LENGTH:  # as long as the negative the pipeline will make
            positive = self.padded(max(self.sequence.shape[1], OWN_NEGATIVE_LENGTH[self.pipeline]))
        out = {}
        for keyword, field in PIPELINE_KWARGS[self.pipeline]:
            for prefix, c in (("", positive), ("negative_", negative)):
                if c is not None:
                    value = getattr(c, field)
                    float_mask = field == "mask" and self.pipeline in FLOAT_MASKS
                    out[prefix + keyword] = value.to(c.sequence.dtype) if float_mask else value
        return out
