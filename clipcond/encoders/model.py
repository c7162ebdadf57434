"""One CLIP text transformer, the forward of OpenAI CLIP / open_clip / HF ``CLIPTextModel``.

Pre-LN blocks, fused QKV, PyTorch scaled-dot-product attention with the causal mask (CLIP's
text tower attends causally and ignores padding: the pad ids are still seen by later rows,
which is why the pad id is part of the spec). Only the blocks the spec needs are built and run.
The canonical state-dict layout of this module is what clipcond/encoders/convert.py converts into.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from clipcond.specs import TowerSpec

LAYER_NORM_EPS = 1e-5  # OpenAI CLIP, open_clip and HF CLIPTextConfig all use 1e-5


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """``x * sigmoid(1.702 x)``: OpenAI CLIP was trained with it (OpenCLIP ViT-H/bigG: exact GELU).

    Without autograd, one temporary updated in place: bit-identical to the plain expression and 2.5x
    faster on the CPU (two fewer allocations of CLIP-L's [B*77, 3072]; bench_encode.py --profile shows
    its share of the forward). ``x`` is left untouched either way.
    """
    if torch.is_grad_enabled():
        return x * torch.sigmoid(1.702 * x)
    return torch.mul(x, 1.702).sigmoid_().mul_(x)


class Attention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)  # rows: q, k, v (open_clip's in_proj order)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, t, w = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)  # 3x [B, H, T, hd]
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, H, T, hd]
        else:  # [B, 1, T, T] bool: causal and the keys an attention mask keeps (transformers' attention_mask)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(y.transpose(1, 2).reshape(b, t, w))


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int, activation: str) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)
        self.act = quick_gelu if activation == "quick_gelu" else F.gelu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, spec: TowerSpec) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(spec.width, eps=LAYER_NORM_EPS)
        self.attn = Attention(spec.width, spec.heads)
        self.ln_2 = nn.LayerNorm(spec.width, eps=LAYER_NORM_EPS)
        self.mlp = MLP(spec.width, spec.mlp_width, spec.activation)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), mask)
        return x + self.mlp(self.ln_2(x))


class TextTransformer(nn.Module):
    """A CLIP text tower truncated to ``spec.blocks_needed`` blocks.

    ``forward(ids, eos)`` returns the sequence the spec reads (``[B, L, W]``) and, if the spec
    has one, the pooled vector (``[B, P]``), both read as TowerSpec documents.
    """

    def __init__(self, spec: TowerSpec) -> None:
        super().__init__()
        self.spec = spec
        self.token_embedding = nn.Embedding(spec.vocab_size, spec.width)
        self.position_embedding = nn.Parameter(torch.empty(spec.context_length, spec.width))
        self.blocks = nn.ModuleList(Block(spec) for _ in range(spec.blocks_needed))
        self.final_norm = nn.LayerNorm(spec.width, eps=LAYER_NORM_EPS)
        self.text_projection = (
            nn.Linear(spec.width, spec.projection_dim, bias=False) if spec.pooled == "projected" else None
        )

    def with_extra_tokens(self, rows: torch.Tensor) -> TextTransformer:
        """A tower whose embedding table has ``rows`` [N, W] appended; every other weight is shared."""
        if rows.ndim != 2 or rows.shape[1] != self.spec.width:
            raise ValueError(f"new token rows must be [N, {self.spec.width}], got {tuple(rows.shape)}")
        new = copy.copy(self)
        # Share the blocks and tensors, replace only the embedding; the dicts themselves are the new one's.
        new._modules, new._parameters, new._buffers = dict(self._modules), dict(self._parameters), dict(self._buffers)
        new._compiled_call_impl = None  # a compiled forward is bound to self: the caller compiles anew
        new.spec = self.spec.replace(vocab_size=self.spec.vocab_size + len(rows))
        table = self.token_embedding.weight
        new.token_embedding = nn.Embedding.from_pretrained(torch.cat([table, rows.to(table)]), freeze=True)
        return new

    def forward(self, ids: torch.Tensor, eos: torch.Tensor, keep: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``keep`` [B, L] bool: the keys every position may attend to besides causality (compel masks a
        down-weighted fragment out this way, as transformers' ``attention_mask``); None: all."""
        x = self.token_embedding(ids) + self.position_embedding[: ids.shape[1]]  # [B, L, W]
        mask = None
        if keep is not None:
            causal = torch.ones(ids.shape[1], ids.shape[1], dtype=torch.bool, device=ids.device).tril()
            mask = (causal & keep[:, None, None, :].bool())  # [B, 1, L, L]
        for block in self.blocks[: self.spec.sequence_blocks]:  # at least one: TowerSpec checks hidden_layer
            x = block(x, mask)
        sequence = x  # [B, L, W]
        for block in self.blocks[self.spec.sequence_blocks:]:  # the last block, where the pooled vector needs it
            x = block(x, mask)
        if self.spec.final_norm:
            sequence = self.final_norm(sequence)
        rows = torch.arange(ids.shape[0], device=ids.device)
        pooled_from = self.spec.pooled
        if pooled_from is None:
            return sequence, None
        if pooled_from == "sequence_eos":
            return sequence, sequence[rows, eos]
        # LayerNorm is per token: normalising only the EOS rows equals reading them afterwards.
        pooled = self.final_norm(x[rows, eos])  # [B, W]
        if pooled_from == "projected":
            pooled = self.text_projection(pooled)  # [B, P]
        return sequence, pooled


def tower_from_state(tower: TowerSpec, state: dict[str, torch.Tensor]) -> TextTransformer:
    """Build on the meta device and adopt the loaded tensors: no second copy of the weights."""
    with torch.device("meta"):
        model = TextTransformer(tower)
    model.load_state_dict(state, strict=True, assign=True)
    return model


def random_tower(tower: TowerSpec, *, seed: int) -> TextTransformer:
    """Seeded random weights without touching the global RNG: std 0.02, LayerNorms near identity
    (weight 1 + 0.1 N, bias 0.1 N: like trained CLIP, the final LN then has a non-zero mean)."""
    generator = torch.Generator().manual_seed(seed)
    model = TextTransformer(tower)
    with torch.no_grad():
        for name, param in model.named_parameters():
            is_norm = "ln_" in name or "norm" in name
            param.normal_(0.0, 0.1 if is_norm else 0.02, generator=generator)
            if is_norm and name.endswith("weight"):
                param.add_(1.0)
    return model
