"""T5 recipes (SD3, Flux, PixArt): the towers' outputs made into what the diffusers pipeline's
``encode_prompt`` returns, and where the T5 half's weights and tokenizer are found.

The rules, read from diffusers 0.42 (each a spec field, clipcond/specs.py):

- ``StableDiffusion3Pipeline.encode_prompt``: CLIP-L ⊕ CLIP-G penultimate ``[B, 77, 2048]``,
  ``F.pad`` to T5's 4096 columns, then ``cat([clip, t5], dim=-2)``: ``[B, 77 + 256, 4096]``; pooled
  ``cat([L_proj, G_proj])`` ``[B, 2048]``; T5 without attention mask.
- ``FluxPipeline.encode_prompt``: T5 ``[B, 512, 4096]`` without mask (``256`` for schnell), pooled =
  CLIP-L ``pooler_output`` ``[B, 768]``, ``text_ids = zeros(L, 3)``.
- ``PixArtAlpha/SigmaPipeline.encode_prompt``: prompts ``lower().strip()``, T5 with the attention mask,
  ``[B, 120 | 300, 4096]`` and the mask ``[B, L]`` (int64, as the tokenizer returns it). clipcond runs T5 only to
  the batch's longest prompt and zeroes the rows the mask hides (``pad_to``: the batch's longest or the full length).
- ``ChromaPipeline.encode_prompt``: T5 with the tokenizer's mask at 512; the mask it returns is
  ``arange(L) <= mask.sum(1)``: one pad after the EOS kept (``mask_pads=1``); the rest unread (zeroed here);
  ``text_ids = zeros(L, 3)``.
- ``AuraFlowPipeline.encode_prompt``: UMT5 with the mask at 256, ``prompt_embeds * mask``: padding rows zero;
  its mask comes back expanded to ``[B, L * D]``, which its transformer never reads (clipcond keeps ``[B, L]``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from clipcond.conditioning import Conditioning
from clipcond.encoders.hub import Hub
from clipcond.encoders.t5 import (
    INDEX_FILES,
    WEIGHT_FILES,
    T5Tower,
    load_folder,
    random_t5,
    read_state,
    tower_from_state,
    weight_files,
)
from clipcond.errors import WeightsError
from clipcond.specs import FAMILY_KEYS, EncoderSpec
from clipcond.text.t5_tokens import TOKENIZER_FILES, T5Prompts, load_tokenizer

logger = logging.getLogger(__name__)


def clip_half(spec: EncoderSpec) -> EncoderSpec | None:
    """The recipe's CLIP towers as a CLIP-only spec (read by the CLIP weights code); None if it has none."""
    if not spec.towers:
        return None
    return dataclasses.replace(spec, t5=None, t5_max_length=0, t5_mask=False, padding="raw", preprocess="none",
                               combine="features", text_ids=False)


def assemble(spec: EncoderSpec, clip: Sequence[tuple[torch.Tensor, torch.Tensor | None]], t5: torch.Tensor,
             mask: torch.Tensor) -> Conditioning:
    """The pipeline's tensors from the CLIP towers' (sequence [B, 77, W_i], pooled [B, P_i] | None), T5's
    sequence [B, L5, d_model] and the T5 tokens' mask [B, L5]."""
    rows = t5.shape[0]
    if spec.padding == "zero":
        t5 = t5 * mask[..., None].to(t5.dtype)  # [B, L5, d]: padding rows zeroed (AuraFlow)
    if spec.mask_pads:  # [B, L5]: Chroma's transformer attends to one pad after the EOS too
        mask = (torch.arange(mask.shape[1], device=mask.device) < mask.sum(1, keepdim=True) + spec.mask_pads).long()
    if spec.padding == "masked":  # rows the transformer never reads: zeros, so a row is the same in any batch
        t5 = t5 * mask[..., None].to(t5.dtype)
    sequence = t5
    if spec.combine == "tokens":
        features = torch.cat([s for s, _ in clip], dim=-1)  # [B, 77, sum W]
        features = torch.nn.functional.pad(features, (0, t5.shape[-1] - features.shape[-1]))  # [B, 77, d]
        sequence = torch.cat([features, t5], dim=-2)  # [B, 77 + L5, d]
    pooled = [clip[i][1] for i in spec.pooled_towers]
    pooled = torch.cat(pooled, dim=-1) if pooled else t5.new_zeros(rows, 0)  # [B, P]
    text_ids = t5.new_zeros(sequence.shape[1], 3) if spec.text_ids else None  # [L, 3]
    return Conditioning(sequence, pooled, mask if spec.padding != "raw" else None, text_ids, spec.pipeline)


def zeros(spec: EncoderSpec, rows: int, *, device: torch.device, dtype: torch.dtype) -> Conditioning:
    """All-zero tensors of the recipe's shapes (``rows`` may be 0); the mask, if any, keeps the first row
    (a zero-length prompt still has its EOS)."""
    kw = {"device": device, "dtype": dtype}
    length = spec.sequence_length
    mask = None
    if spec.padding != "raw":
        mask = torch.zeros(rows, length, dtype=torch.long, device=device)
        mask[:, : 1 + spec.mask_pads] = 1
    text_ids = torch.zeros(length, 3, **kw) if spec.text_ids else None
    return Conditioning(torch.zeros(rows, length, spec.sequence_dim, **kw), torch.zeros(rows, spec.pooled_dim, **kw),
                        mask, text_ids, spec.pipeline)


def repeat(c: Conditioning, rows: int) -> Conditioning:
    """``rows`` copies of a one-row Conditioning (the null)."""
    mask = None if c.mask is None else c.mask.repeat(rows, 1)
    return Conditioning(c.sequence.repeat(rows, 1, 1), c.pooled.repeat(rows, 1), mask, c.text_ids, c.pipeline)


def drop_parts(spec: EncoderSpec, c: Conditioning, dropped: Mapping[str, torch.Tensor]) -> Conditioning:
    """Caption dropout per tower, as kohya's sd-scripts do it for SD3 (strategy_sd3: ``--clip_l_dropout_rate``,
    ``--clip_g_dropout_rate``, ``--t5_dropout_rate``; the same rule applied to Flux's two encoders here, kohya's Flux
    scripts having no per-encoder rate): a dropped tower's part of a row is zeroed, not replaced by the empty
    prompt's. ``dropped``: a bool [B] per ``tower_keys`` key.
    SD3: CLIP-L's columns [:W_L] and CLIP-G's [W_L:W_L+W_G] of the 77 CLIP rows and each one's slice of the pooled
    vector; T5's rows 77: (all of them for Flux, whose CLIP-L gives only the pooled vector)."""
    if spec.padding != "raw":
        raise ValueError(f"{spec.name}: drop_prob per tower is for unmasked recipes (SD3, Flux); a masked recipe "
                         f"would be left with an all-zero mask: give one drop_prob")
    sequence, pooled = c.sequence.clone(), c.pooled.clone()
    keys = tower_keys(spec)
    col, start = 0, 0
    for i, (key, tower) in enumerate(zip(keys, spec.towers, strict=False)):
        rows = dropped[key].to(sequence.device)  # [B]
        if spec.combine == "tokens":
            sequence[rows, : spec.max_length, col : col + tower.width] = 0  # [n, 77, W_i]
        col += tower.width
        if i in spec.pooled_towers:
            width = tower.pooled_dim
            pooled[rows, start : start + width] = 0  # [n, P_i]
            start += width
    first = spec.max_length if spec.combine == "tokens" else 0
    sequence[dropped["t5"].to(sequence.device), first:] = 0  # [n, L5, d]
    return Conditioning(sequence, pooled, c.mask, c.text_ids, c.pipeline)


def tower_keys(spec: EncoderSpec) -> list[str]:
    """The keys of ``weights={...}`` for a recipe, one per tower in order: "clip_l" (a CLIP ViT-L), "clip_g"
    (an OpenCLIP tower), "t5" (ComfyUI's and kohya's names for the files)."""
    return [FAMILY_KEYS[t.family] for t in spec.towers] + ["t5"]


def split_weights(spec: EncoderSpec, weights: Mapping[str, object]) -> tuple[list[object], object]:
    """Per-tower weights of a mapping (``{"clip_l": ..., "t5": ...}``): the CLIP towers' in order, and T5's."""
    keys = tower_keys(spec)
    if sorted(weights) != sorted(keys):
        raise ValueError(f"{spec.name}: weights={{...}} needs exactly the keys {keys}, got {sorted(weights)}")
    return [weights[k] for k in keys[:-1]], weights["t5"]


def load_t5_half(spec: EncoderSpec, weights: str | os.PathLike[str] | None, *, dtype: torch.dtype,
                 revision: str | None = None, tokenizer: object = None) -> tuple[T5Tower, T5Prompts]:
    """The recipe's T5 tower and tokenizer. ``weights``: a diffusers pipeline folder (the tower's
    ``hub_subfolder``), a transformers T5 folder, or a hub repo id; None: the spec's hub repo, or seeded random
    weights for a spec that names none. ``tokenizer``: a tokenizer folder or object, else the one beside the
    weights (``tokenizer_subfolder``)."""
    assert spec.t5 is not None
    if weights is None and spec.hub_repo is None:
        logger.info("%s names no published weights: seeded random T5 weights (tests and demos)", spec.name)
        if tokenizer is None:
            kind, example = (("Gemma", "Sana_1600M_1024px_diffusers/tokenizer") if spec.t5.architecture == "gemma2"
                             else ("T5", "FLUX.1-dev/tokenizer_2"))
            raise WeightsError(f"{spec.name}: random weights, but no {kind} tokenizer: pass tokenizer=PATH to a "
                               f"pipeline's {kind} tokenizer folder (e.g. {example})")
        return random_t5(spec.t5, seed=len(spec.towers)).to(dtype), load_tokenizer(tokenizer, spec)
    root = Path(weights if weights is not None else spec.hub_repo).expanduser()
    if root.is_file():  # a standalone encoder file (ComfyUI / kohya t5xxl_fp16.safetensors): the spec's sizes
        if tokenizer is None:
            raise WeightsError(f"{root}: a single T5 file has no tokenizer beside it; pass tokenizer=PATH to a "
                               f"pipeline's T5 tokenizer folder (e.g. FLUX.1-dev/{spec.t5.tokenizer_subfolder})")
        return tower_from_state(spec.t5, read_state(spec.t5, [root], dtype)), load_tokenizer(tokenizer, spec)
    if not root.exists():
        root = download(spec, str(weights if weights is not None else spec.hub_repo), revision=revision,
                        tokenizer=tokenizer is None)
    sub = root / spec.t5.hub_subfolder
    folder = sub if (sub / "config.json").is_file() else root
    if not (folder / "config.json").is_file():
        raise WeightsError(f"{root}: no {spec.t5.hub_subfolder or '.'}/config.json for T5 tower {spec.t5.name!r} of "
                           f"encoder {spec.name!r}; expected a diffusers pipeline folder ({spec.t5.hub_subfolder}/, "
                           f"{spec.t5.tokenizer_subfolder}/) or a transformers T5 folder")
    tower = load_folder(spec.t5, folder, dtype)
    if tokenizer is None:
        tokenizer = root / spec.t5.tokenizer_subfolder if folder == sub else folder
    return tower, load_tokenizer(tokenizer, spec)


def download(spec: EncoderSpec, repo: str, *, revision: str | None, tokenizer: bool) -> Path:
    """The T5 files of a hub repo (the local Hugging Face cache first): config, index, the shards with encoder
    tensors, and the tokenizer files; nothing else. Returns the snapshot folder."""
    assert spec.t5 is not None
    sub, tok = spec.t5.hub_subfolder, spec.t5.tokenizer_subfolder
    hub = Hub(repo, revision)

    def get(name: str, folder: str) -> Path | None:
        return hub.get(name, folder or None)

    config = get("config.json", sub)
    if config is None:
        raise WeightsError(f"{repo}: no {sub + '/' if sub else ''}config.json on the hub or in the local Hugging Face "
                           f"cache (HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '0')}); run `clipcond download "
                           f"{spec.name}` with network, or pass weights=PATH")
    index = next((p for p in (get(name, sub) for name in INDEX_FILES) if p is not None), None)
    if index is not None:
        for shard in weight_files(index.parent):
            if get(shard.name, sub) is None:
                raise WeightsError(f"{repo}/{sub}/{shard.name}: listed in {index.name} but not found")
    elif hub.first(WEIGHT_FILES, sub or None) is None:  # the first one the repo has, and only that one
        raise WeightsError(f"{repo}/{sub}: none of {list(WEIGHT_FILES)} found on the hub or in the cache")
    if tokenizer:
        for name in TOKENIZER_FILES:
            get(name, tok)
    return config.parent.parent if sub else config.parent
