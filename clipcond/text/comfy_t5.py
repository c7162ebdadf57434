"""``weighted(..., style="comfy")`` on Flux: ComfyUI's ``CLIPTextEncode`` with its Flux text encoders.

ComfyUI's rules for Flux (``comfy/text_encoders/flux.py``, ``comfy/sd1_clip.py``), as facts:

- T5 (``T5XXLTokenizer``): the prompt read by ComfyUI's parser (``comfy_weights``), each weighted segment tokenized
  whole by T5's tokenizer without its EOS (``comfy_pieces``), all of them in one sequence (its ``max_length`` is
  99,999,999: no windows), then EOS (weight 1), then padding with id 0 up to ``min_length`` 256 tokens: a prompt of
  255 tokens or fewer gives ``[256, D]``, a longer one ``[tokens + 1, D]`` (diffusers: 512, or 256 for schnell,
  truncated). T5 runs without a mask (``enable_attention_masks`` off), so it attends to the padding.
- Weights: ``z_empty + (z - z_empty) * w`` on the rows whose weight is not 1, ``z_empty`` the encoding of
  ``[EOS, pad, pad, ...]`` at the same length (``gen_empty_tokens``); rows of weight 1 are ``z`` itself.
- The pooled vector is CLIP-L's, from its first window, unweighted (ComfyUI's ``clip_l`` encoder, as for SD 1.x).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from clipcond.conditioning import Conditioning
from clipcond.text.prompts import frame
from clipcond.text.windows import comfy_pieces, read_windows

if TYPE_CHECKING:
    from clipcond.encoders.conditioner import TextConditioner

MIN_LENGTH = 256  # ComfyUI's T5XXLTokenizer(min_length=256) for Flux


class ComfyT5Reader:
    """ComfyUI's encoding of one prompt for Flux: T5 weighted as ComfyUI weights it, CLIP-L's pooled vector."""

    def __init__(self, tc: TextConditioner) -> None:
        self.tc = tc
        self.tokenizer = tc.t5_tokenizer.tokenizer  # the pipeline's T5TokenizerFast (ComfyUI ships the same files)
        self.eos, self.pad = tc.spec.t5.eos_id, tc.spec.t5.pad_id

    def _encode(self, texts: list[str]) -> list[list[int]]:
        """Texts to T5 ids without the EOS the tokenizer appends (ComfyUI's ``input_ids[tokens_start:-1]``)."""
        return [ids[:-1] for ids in self.tokenizer(texts, verbose=False).input_ids] if texts else []

    def __call__(self, prompt: str) -> Conditioning:
        pieces = comfy_pieces(prompt, self._encode, {})  # T5 has no textual inversion here: embedding: is dropped
        tokens = [token for piece in pieces for token in piece] + [(self.eos, 1.0)]
        tokens += [(self.pad, 1.0)] * (MIN_LENGTH - len(tokens))
        ids = torch.tensor([[t for t, _ in tokens]])  # [1, L]
        weights = torch.tensor([w for _, w in tokens])  # [L]
        z = self.tc.t5(self.tc.to_device(ids), None)  # [1, L, D]
        if (weights != 1).any():
            empty = torch.tensor([[self.eos] + [self.pad] * (ids.shape[1] - 1)])
            z_empty = self.tc.t5(self.tc.to_device(empty), None)
            w = weights.to(z.device, z.dtype)[None, :, None]
            z = torch.where(w == 1, z, z_empty + (z - z_empty) * w)
        return Conditioning(z, self._pooled(prompt), None, z.new_zeros(z.shape[1], 3), self.tc.spec.pipeline)

    def _pooled(self, prompt: str) -> torch.Tensor:
        """CLIP-L's pooled vector of the prompt's first ComfyUI window (weights do not reach it), [1, P]."""
        tok = self.tc.tokenizers[0]
        windows = read_windows([prompt], tok, style="comfy")
        framed = frame(windows, length=self.tc.spec.max_length, pad_id=tok.pad_id, k=len(windows[0]))
        return self.tc.run_tower(0, framed.ids[:1], framed.eos[:1])[1]
