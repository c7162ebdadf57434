"""Key conversion from published layouts into clipcond/encoders/model.py's canonical layout.

Layouts: Hugging Face ``CLIPTextModel`` (as published, ``text_model.`` prefix, and as
transformers 5 saves it, without), open_clip ``CLIP.state_dict()`` (also inside SD 2.x and SDXL
single files). Tables map source templates (``{}`` = block index) to canonical keys; ``None``
drops a key on purpose. An unknown key is an error; so is a missing or wrongly shaped tensor.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch

from clipcond.errors import WeightsError


@dataclass(frozen=True, slots=True)
class Rule:
    target: str  # canonical key template
    part: int = 0  # HF stores q, k, v apart; canonical fuses them as rows [q; k; v]
    parts: int = 1
    transpose: bool = False


HF_TEXT: dict[str, Rule | None] = {
    "embeddings.token_embedding.weight": Rule("token_embedding.weight"),
    "embeddings.position_embedding.weight": Rule("position_embedding"),
    "embeddings.position_ids": None,  # a buffer older transformers saved; arange(77)
    **{f"encoder.layers.{{}}.self_attn.{n}_proj.{p}": Rule(f"blocks.{{}}.attn.qkv.{p}", i, 3)
       for i, n in enumerate("qkv") for p in ("weight", "bias")},
    **{f"encoder.layers.{{}}.{src}.{p}": Rule(f"blocks.{{}}.{dst}.{p}")
       for src, dst in [("self_attn.out_proj", "attn.out"), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
                        ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")]
       for p in ("weight", "bias")},
    "final_layer_norm.weight": Rule("final_norm.weight"),
    "final_layer_norm.bias": Rule("final_norm.bias"),
    "text_projection.weight": Rule("text_projection.weight"),  # CLIPTextModelWithProjection
}

OPENCLIP_TEXT: dict[str, Rule | None] = {
    "token_embedding.weight": Rule("token_embedding.weight"),
    "positional_embedding": Rule("position_embedding"),
    **{f"transformer.resblocks.{{}}.{src}": Rule(f"blocks.{{}}.{dst}")
       for src, dst in [("attn.in_proj_weight", "attn.qkv.weight"), ("attn.in_proj_bias", "attn.qkv.bias"),
                        ("attn.out_proj.weight", "attn.out.weight"), ("attn.out_proj.bias", "attn.out.bias"),
                        ("ln_1.weight", "ln_1.weight"), ("ln_1.bias", "ln_1.bias"),
                        ("ln_2.weight", "ln_2.weight"), ("ln_2.bias", "ln_2.bias"),
                        ("mlp.c_fc.weight", "mlp.fc1.weight"), ("mlp.c_fc.bias", "mlp.fc1.bias"),
                        ("mlp.c_proj.weight", "mlp.fc2.weight"), ("mlp.c_proj.bias", "mlp.fc2.bias")]},
    "ln_final.weight": Rule("final_norm.weight"),
    "ln_final.bias": Rule("final_norm.bias"),
    "text_projection": Rule("text_projection.weight", transpose=True),  # open_clip computes x @ P, [W, P]
    "logit_scale": None,  # contrastive temperature, unused for conditioning
    "attn_mask": None,  # the causal mask, a buffer in old open_clip / ldm checkpoints
}

# open_clip checkpoints carry the image tower beside the text tower; the conditioner ignores it.
OPENCLIP_IGNORED_PREFIXES = ("visual.",)

_INDEX = re.compile(r"(?<=\.)\d+(?=\.)")


def _template(key: str) -> tuple[str, str | None]:
    """``encoder.layers.7.mlp.fc1.weight`` -> (``encoder.layers.{}.mlp.fc1.weight``, ``"7"``)."""
    match = _INDEX.search(key)
    if match is None:
        return key, None
    return key[: match.start()] + "{}" + key[match.end():], match.group()


def count_blocks(keys: Iterable[str], table: Mapping[str, Rule | None]) -> int:
    """Number of transformer blocks present in ``keys`` (1 + the highest block index)."""
    indices = [int(i) for t, i in map(_template, keys) if i is not None and t in table]
    return max(indices, default=-1) + 1


def summary(keys: list[str]) -> str:
    """The first ten of ``keys`` and how many there are, for messages."""
    shown = ", ".join(keys[:10])
    return f"{shown}, ... ({len(keys)} in all)" if len(keys) > 10 else shown


def convert_state(
    keys: Iterable[str],
    read: Callable[[str], torch.Tensor],
    table: Mapping[str, Rule | None],
    expected: Mapping[str, torch.Size],
    *,
    source: str,
    ignored_prefixes: tuple[str, ...] = (),
) -> dict[str, torch.Tensor]:
    """Read and convert the tensors ``expected`` needs from ``keys``; strict in every direction.

    ``read(key)`` loads one tensor, so a lazy safetensors file is only read where needed.
    Known keys whose canonical target the (truncated) model does not hold are skipped unread:
    blocks past the layer the spec uses, a projection the spec does not use.
    """
    unknown, pieces = [], {}
    for key in keys:
        if key.startswith(ignored_prefixes):
            continue
        template, index = _template(key)
        if template not in table:
            unknown.append(key)
            continue
        rule = table[template]
        if rule is None:
            continue
        target = rule.target.format(index) if index is not None else rule.target
        if target in expected:
            pieces.setdefault(target, [None] * rule.parts)[rule.part] = (key, rule)
    if unknown:
        raise WeightsError(f"{source}: unexpected tensor(s) for a CLIP text tower: {summary(unknown)}")
    missing = sorted(set(expected) - set(pieces)) + sorted(
        f"{t} (part {i})" for t, ps in pieces.items() for i, p in enumerate(ps) if p is None)
    if missing:
        raise WeightsError(f"{source}: missing tensor(s): {summary(missing)}")
    state = {target: _assemble(parts, read) for target, parts in pieces.items()}
    wrong = [f"{k}: expected {tuple(expected[k])}, got {tuple(v.shape)}"
             for k, v in state.items() if v.shape != expected[k]]
    if wrong:
        raise WeightsError(f"{source}: tensor shape mismatch: {summary(wrong)}")
    return state


def _assemble(parts: list[tuple[str, Rule]], read: Callable[[str], torch.Tensor]) -> torch.Tensor:
    tensors = [read(key).T if rule.transpose else read(key) for key, rule in parts]
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=0)
