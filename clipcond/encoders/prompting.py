"""The prompt languages on a conditioner's towers: ``tc.weighted`` (A1111, ComfyUI, compel), ``tc.schedule`` (A1111's
prompt editing and alternation), ``tc.blend``, and the 77-token windows they are encoded in (``encode_windows``).

The tools' rules live in clipcond/text/ (prompts.py, windows.py, schedules.py, compel_style.py, comfy_t5.py); here
they meet the towers: which reading a recipe takes, and how windows are framed, run and weighted.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from clipcond.conditioning import Conditioning
from clipcond.text.prompts import Emphasis, WeightStyle, apply_weights, frame
from clipcond.text.tokenizer import check_prompts
from clipcond.text.windows import read_windows

if TYPE_CHECKING:
    from clipcond.encoders.conditioner import TextConditioner

Segments = list[tuple[int, Conditioning]]  # (end step, inclusive; the conditioning in force until then)


def len_tokens(c: Conditioning) -> int:
    return c.sequence.shape[1]


def read(tc: TextConditioner, prompts: list[str], *, style: WeightStyle = "a1111", comma_backtrack: int = 20,
         emphasis: Emphasis = "original", one_batch: bool = False) -> Conditioning:
    """``tc.weighted``; ``one_batch``: the prompts share A1111's emphasis mean (``encode_windows``)."""
    done = {"compel": ("FluxPipeline", "SanaPipeline"), "comfy": ("FluxPipeline",)}
    if tc.t5 is not None and tc.spec.pipeline not in done.get(style, ()):
        raise NotImplementedError(f"{tc.spec.name}: prompt weighting (style={style!r}) of T5 recipes is done "
                                  f"for style='compel' on Flux and Sana and style='comfy' on Flux only; "
                                  f"tc.schedule(..., style=None) and tc.blend() read prompts as tc() does")
    if style not in ("a1111", "comfy", "compel"):
        raise ValueError(f"style must be 'a1111', 'comfy' or 'compel', got {style!r}")
    if emphasis not in ("original", "no_norm"):
        raise ValueError(f"emphasis must be 'original' or 'no_norm', got {emphasis!r}")
    if not 0 <= comma_backtrack <= 74:
        raise ValueError(f"comma_backtrack must be in [0, 74] (A1111's slider), got {comma_backtrack}")
    if not prompts:
        return tc.zero_rows(0)
    if tc.t5 is not None:  # Flux (compel, comfy) or Sana (compel): a prompt at a time, as the tools
        from clipcond.text.comfy_t5 import ComfyT5Reader
        from clipcond.text.compel_style import T5Reader

        reader = (T5Reader if style == "compel" else ComfyT5Reader)(tc)
        encoded = [reader(p) for p in prompts]
        if len({len_tokens(c) for c in encoded}) > 1 and encoded[0].mask is None:
            raise ValueError(f"{tc.spec.name}: under style={style!r} these prompts encode to different lengths "
                             f"{sorted({len_tokens(c) for c in encoded})} (ComfyUI's T5 rows grow past 256 "
                             f"tokens): encode them one at a time")
        return Conditioning.cat(encoded)
    if style == "compel":
        from clipcond.text.compel_style import CompelReader

        reader = CompelReader(tc)
        return Conditioning.cat(tc.pad_chunks(*(reader(p) for p in prompts)))
    return encode_windows(tc, prompts, style=style, comma_backtrack=comma_backtrack, emphasis=emphasis,
                          one_batch=one_batch)


def schedule(tc: TextConditioner, prompt: str, steps: int, *, style: WeightStyle | None, hires_steps: int | None,
             **weighting: object) -> Segments | list[tuple[float, Segments]]:
    """``tc.schedule``."""
    from clipcond.text.schedules import prompt_schedule, split_and

    parts = split_and(prompt)
    if style is not None and tc.t5 is not None:
        read(tc, [], style=style)  # refuses weighting syntax on T5 recipes, saying so

    def segments(text: str) -> list[tuple[int, Conditioning]]:
        plan = prompt_schedule(text, steps, hires_steps=hires_steps)
        texts = [t for _, t in plan]
        encoded = tc(texts) if style is None else read(tc, texts, style=style, one_batch=True, **weighting)
        return [(end, encoded[i : i + 1]) for i, (end, _) in enumerate(plan)]

    if len(parts) == 1 and parts[0][0] == 1.0:
        return segments(parts[0][1])
    return [(weight, segments(text)) for weight, text in parts]


def blend(tc: TextConditioner, prompts: Sequence[str], weights: Sequence[float], *, style: WeightStyle | None,
          **weighting: object) -> Conditioning:
    """``tc.blend``."""
    prompts = check_prompts(prompts)
    if len(prompts) != len(weights) or not prompts:
        raise ValueError(f"blend needs one weight per prompt, got {len(prompts)} prompts and {len(weights)} "
                         "weights")
    parts = [tc.weighted(p, style=style, **weighting) if style else tc(p) for p in prompts]
    if parts[0].mask is not None:
        longest = max(len_tokens(c) for c in parts)
        parts = [c.padded(longest) for c in parts]
        mask = torch.stack([c.mask for c in parts]).amax(0)  # [B, L]: the union
    else:
        parts, mask = tc.pad_chunks(*parts), None
    sequence = sum(w * c.sequence for w, c in zip(weights, parts, strict=True))
    pooled = sum(w * c.pooled for w, c in zip(weights, parts, strict=True))
    return Conditioning(sequence, pooled, mask, parts[0].text_ids, parts[0].pipeline)


def encode_windows(tc: TextConditioner, prompts: list[str], *, style: WeightStyle | None, comma_backtrack: int = 20,
                   emphasis: Emphasis = "original", one_batch: bool = False) -> Conditioning:
    """Each tower over the same number k of 77-token windows per prompt -> [B, 77 * k, D]. ``one_batch``: the
    prompts share A1111's emphasis mean, window by window (one prompt's schedule texts)."""
    length = tc.spec.max_length
    per_tower = [read_windows(prompts, tok, style=style, comma_backtrack=comma_backtrack)
                 for tok in tc.tokenizers]
    k = max(len(w) for windows in per_tower for w in windows)  # SDXL's two tokenizers may disagree: pad
    parts = []
    for i, (tok, windows) in enumerate(zip(tc.tokenizers, per_tower, strict=True)):
        w = frame(windows, length=length, pad_id=tok.pad_id, k=k)
        sequence, pooled = tc.run_tower(i, w.ids, w.eos)  # [B*k, L, W], [B*k, P] | None
        if style is not None:
            empty = tc.empty().sequence[..., tc.feature_slice(i)]  # [1, L, W]
            sequence = apply_weights(sequence, w.weights.to(tc.device), style=style, empty=empty,
                                     emphasis=emphasis, batch=len(prompts) if one_batch else None)
        sequence = sequence.reshape(len(prompts), k * length, -1)  # [B, k*L, W]
        first = None if pooled is None else pooled.reshape(len(prompts), k, -1)[:, 0]  # [B, P]: the first window's
        parts.append((sequence, first))
    return tc.join_towers(parts)
