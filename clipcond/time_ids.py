"""SDXL micro-conditioning: the ``time_ids`` of a UNet's ``added_cond_kwargs``, laid out as diffusers does.

Matches ``StableDiffusionXLPipeline._get_add_time_ids`` (base model, 6 values per row:
``original_size + crops_coords_top_left + target_size``) and
``StableDiffusionXLImg2ImgPipeline._get_add_time_ids`` with ``requires_aesthetics_score=True``
(refiner, 5 values per row: ``original_size + crops_coords_top_left + (aesthetic_score,)``). These
are the inputs of sgm's ``ConcatTimestepEmbedderND`` embedders (``original_size_as_tuple``,
``crop_coords_top_left``, ``target_size_as_tuple`` / ``aesthetic_score``) in the order of the
SDXL configs. Pairs are ``(height, width)`` and ``(top, left)``, in pixels of the image, not latents.

Unlike the pipelines, which build one row and repeat it, every argument may also be given per
row (a sequence of pairs, or an integer tensor ``[B, 2]``): a training batch carries each image's
own original size and random-crop offset.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from clipcond.conditioning import Conditioning

# (h, w) for every row, one (h, w) per row, or an integer tensor [2] / [B, 2].
PairArg = Sequence[int] | Sequence[Sequence[int]] | torch.Tensor
ScoreArg = float | Sequence[float] | torch.Tensor

_PAIR_FORMS = "a (height, width) pair of ints, a sequence of such pairs (one per row) or an integer tensor [B, 2]"


def sdxl_time_ids(
    original_size: PairArg,
    crops_coords_top_left: PairArg,
    target_size: PairArg,
    *,
    batch_size: int | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """SDXL base ``time_ids`` ``[B, 6]``: ``(orig_h, orig_w, crop_top, crop_left, target_h, target_w)``.

    diffusers' text-to-image defaults are ``original_size = target_size = (height, width)`` and
    ``crops_coords_top_left = (0, 0)``; in training, ``original_size`` is the image's size before
    resizing, ``crops_coords_top_left`` where the crop starts in the resized image, ``target_size`` the
    training resolution (sgm's data pipeline). ``B`` is ``batch_size``, else the row count of the
    per-row arguments (1 if none); single pairs are repeated to every row.
    """
    parts = {"original_size": _positive_pairs(original_size, "original_size"),
             "crops_coords_top_left": _crop_pairs(crops_coords_top_left),
             "target_size": _positive_pairs(target_size, "target_size")}
    return _assemble(parts, batch_size=batch_size, device=device, dtype=dtype)  # [B, 6]


def sdxl_refiner_time_ids(
    original_size: PairArg,
    crops_coords_top_left: PairArg,
    aesthetic_score: ScoreArg,
    *,
    batch_size: int | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """SDXL refiner ``time_ids`` ``[B, 5]``: ``(orig_h, orig_w, crop_top, crop_left, aesthetic_score)``.

    No default score on purpose: diffusers uses 6.0 for the prompt and 2.5 for the negative
    (``negative_aesthetic_score``), so a CFG batch of the refiner has two different rows.
    """
    parts = {"original_size": _positive_pairs(original_size, "original_size"),
             "crops_coords_top_left": _crop_pairs(crops_coords_top_left),
             "aesthetic_score": _scores(aesthetic_score)}
    return _assemble(parts, batch_size=batch_size, device=device, dtype=dtype)  # [B, 5]


def added_cond_kwargs(cond: Conditioning, time_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{"text_embeds": cond.pooled, "time_ids": time_ids}``, the SDXL UNet's ``added_cond_kwargs``.

    ``time_ids`` ``[n]`` or ``[1, n]`` (n = 6 base, 5 refiner) is repeated to ``len(cond)`` rows;
    ``[B, n]`` needs ``B == len(cond)``. They take the conditioning's device and dtype, as diffusers
    builds them with ``prompt_embeds.dtype``.
    """
    if not isinstance(time_ids, torch.Tensor):
        raise TypeError(f"time_ids must be a tensor (see sdxl_time_ids), got {type(time_ids).__name__}")
    if time_ids.ndim == 1:
        time_ids = time_ids[None]
    if time_ids.ndim != 2 or time_ids.shape[1] not in (5, 6):
        raise ValueError(f"time_ids must have shape [B, 6] (base) or [B, 5] (refiner), got {tuple(time_ids.shape)}")
    if time_ids.shape[0] not in (1, len(cond)):
        raise ValueError(f"time_ids has {time_ids.shape[0]} rows but the conditioning has {len(cond)}; "
                         f"give one row (repeated) or one per conditioning row")
    time_ids = time_ids.to(cond.pooled.device, cond.pooled.dtype).expand(len(cond), -1).contiguous()  # [B, n]
    return {"text_embeds": cond.pooled, "time_ids": time_ids}


# --- parsing and validation ---------------------------------------------------------------
def _assemble(
    parts: dict[str, torch.Tensor], *, batch_size: int | None, device: str | torch.device | None, dtype: torch.dtype
) -> torch.Tensor:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype (the UNet's), got {dtype!r}")
    rows = _batch_rows({name: len(t) for name, t in parts.items()}, batch_size)
    # float64 first: every int and score is exact there, so the one rounding to ``dtype`` is the
    # one diffusers' ``torch.tensor([[...]], dtype=dtype)`` makes.
    columns = [t.to(torch.float64).expand(rows, -1) for t in parts.values()]
    return torch.cat(columns, dim=1).to(device=device, dtype=dtype)  # [B, 6] or [B, 5]


def _batch_rows(counts: dict[str, int], batch_size: int | None) -> int:
    """The batch size: ``batch_size`` if given, else the per-row arguments' common row count."""
    per_row = {name: n for name, n in counts.items() if n != 1}
    if batch_size is not None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 0:
            raise ValueError(f"batch_size must be an int >= 0, got {batch_size!r}")
        wrong = {name: n for name, n in per_row.items() if n != batch_size}
        if wrong:
            raise ValueError(f"batch_size is {batch_size} but these arguments have other row counts: {wrong}; "
                             f"give one value (repeated) or one per row")
        return int(batch_size)
    if len(set(per_row.values())) > 1:
        raise ValueError(f"per-row arguments disagree on the batch size: {per_row}")
    return next(iter(per_row.values()), 1)


def _positive_pairs(value: PairArg, name: str) -> torch.Tensor:
    rows = _pairs(value, name)
    _check_rows(rows, name, rows > 0, "positive (height, width) in pixels")
    return rows


def _crop_pairs(value: PairArg) -> torch.Tensor:
    name = "crops_coords_top_left"
    rows = _pairs(value, name)
    _check_rows(rows, name, rows >= 0, "a (top, left) pixel offset >= 0")
    return rows


def _check_rows(rows: torch.Tensor, name: str, ok: torch.Tensor, expected: str) -> None:
    bad = (~ok.all(dim=1)).nonzero().flatten()
    if len(bad):
        i = int(bad[0])
        where = name if len(rows) == 1 else f"{name}[{i}]"
        raise ValueError(f"{where} must be {expected}, got {tuple(rows[i].tolist())}")


def _pairs(value: PairArg, name: str) -> torch.Tensor:
    """``value`` as an int64 tensor ``[N, 2]``; N = 1 for one pair meant for every row."""
    if isinstance(value, torch.Tensor):
        if value.dtype == torch.bool or value.is_floating_point() or value.is_complex():
            raise TypeError(f"{name} must be an integer tensor (pixels), got dtype {value.dtype}")
        rows = value[None] if value.ndim == 1 else value
        if rows.ndim != 2 or rows.shape[1] != 2 or len(rows) == 0:
            raise ValueError(f"{name} must be {_PAIR_FORMS}, got a tensor of shape {tuple(value.shape)}")
        return rows.to("cpu", torch.int64)
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) == 0:
        raise TypeError(f"{name} must be {_PAIR_FORMS}, got {_describe(value)}")
    if any(isinstance(v, torch.Tensor) for v in value):
        # torch's default_collate turns a batch of (h, w) tuples into [heights, widths].
        raise TypeError(f"{name} is a sequence of tensors (a DataLoader's default_collate of (height, width) "
                        f"tuples gives [heights, widths]); pass torch.stack({name}, dim=1), shape [B, 2]")
    single = len(value) == 2 and not any(isinstance(v, Sequence) for v in value)  # (h, w), not [(h, w)]
    pairs = [value] if single else list(value)
    for i, pair in enumerate(pairs):
        where = name if single else f"{name}[{i}]"
        if isinstance(pair, (str, bytes)) or not isinstance(pair, Sequence) or len(pair) != 2:
            raise TypeError(f"{where} must be a (height, width) pair of ints, got {_describe(pair)}")
        for j, v in enumerate(pair):
            if not _is_int(v):
                raise TypeError(f"{where}[{j}] must be int (pixels), got {type(v).__name__} {v!r}")
    return torch.tensor([[int(a), int(b)] for a, b in pairs], dtype=torch.int64)


def _scores(value: ScoreArg) -> torch.Tensor:
    """``aesthetic_score`` as a float64 tensor ``[N, 1]``; N = 1 for one score meant for every row."""
    name = "aesthetic_score"
    if isinstance(value, torch.Tensor):
        if value.ndim > 1 or value.dtype == torch.bool or value.is_complex():
            raise ValueError(f"{name} must be a number, a sequence of numbers or a real tensor [B], "
                             f"got a {value.dtype} tensor of shape {tuple(value.shape)}")
        scores = [float(v) for v in value.reshape(-1).tolist()]
    elif _is_real(value):
        scores = [float(value)]
    elif isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        for i, v in enumerate(value):
            if not _is_real(v):
                raise TypeError(f"{name}[{i}] must be a number, got {type(v).__name__} {v!r}")
        scores = [float(v) for v in value]
    else:
        raise TypeError(f"{name} must be a number (diffusers: 6.0, negative 2.5), a sequence of numbers or "
                        f"a tensor [B], got {_describe(value)}")
    if not scores:
        raise ValueError(f"{name} is empty; give one score for every row or one per row")
    if not all(math.isfinite(s) for s in scores):
        raise ValueError(f"{name} must be finite, got {scores}")
    return torch.tensor(scores, dtype=torch.float64)[:, None]


def _is_int(v: object) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v: object) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _describe(value: object) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"
