"""``weighted(..., style="compel")``: compel's syntax and arithmetic on clipcond's towers.

The prompt is parsed by compel's own ``PromptParser`` (``pip install compel``: its grammar is
compel's definition, so it is used, not re-written); the embeddings follow compel's
``EmbeddingsProvider`` as ``CompelForSD`` / ``CompelForSDXL`` configure it (long prompts chunked,
``SplitLongTextMode.SENTENCES``, ``DownweightMode.MASK``), computed by the conditioner's towers:

- each fragment tokenized on its own by transformers' CLIPTokenizer (every tower; padding the
  tower's; a tower padded with 0 pads with ``"!"``, so a literal ``!`` is 0 there, diffusers#4153),
  the tokens concatenated; beyond 75 tokens, chunks split after the last ``.`` within 75,
  else the last ``.`` ``,`` ``;`` ``:``, else the last word end, else at 75;
- a weight ``w != 1``: ``z_empty + (z - z_empty) * w`` per token, ``z_empty`` the empty prompt's
  window; a fragment with ``w < 1`` is also blended with the prompt encoded with that fragment
  attention-masked out: ``(z + Σ λ_i z_i) / (1 + Σ λ_i)``, ``λ_i = tan((1 - w_i) π / 2)``;
- ``("a", "b").blend(0.7, 0.3)``: the weighted sum (normalised unless ``no_normalize``);
  ``("a", "b").and()``: concatenated along the tokens (a weight pulls a part from the empty prompt);
- the pooled vector is read from the raw prompt string, syntax included, truncated to 75 tokens:
  what compel returns (compel#96).

Flux (``CompelForFlux``): the same arithmetic on T5 alone (``T5Reader``): fragments tokenized on their own by the
pipeline's T5 tokenizer, concatenated, cut to 511 tokens, EOS, padded to the tokenizer's 512 (``flux-schnell`` too:
compel pads to 512 always), T5 run with an all-ones mask (a fragment with ``w < 1`` masked out for its blend
partner); ``z_empty`` is ``[EOS, pad...]`` run without a mask. Flux's pooled vector is CLIP-L's ``pooler_output``
of the fragments' text joined by spaces (syntax removed, weights not applied: compel's POOLED path); a blend's is the
blend of its prompts' pooled vectors (compel returns a pooled row per blended prompt, which the pipeline cannot
take), an ``.and()``'s that of its first part. Sana (``CompelForSana``): the prompt lower-cased, Gemma-2 over
``[BOS, tokens]`` padded to 300 with the padding masked out, no EOS, and no instruction (compel does not put
SanaPipeline's before the prompt); its mask is the tokens', the rows it hides zeros.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from clipcond.conditioning import Conditioning
from clipcond.text.prompts import ROOM, Windows, apply_weights, frame
from clipcond.text.tokenizer import ClipTokenizer

if TYPE_CHECKING:
    from clipcond.encoders.conditioner import TextConditioner

LENGTH = ROOM + 2
_SENTENCE = {".</w>"}
_PHRASE = {".</w>", ",</w>", ";</w>", ":</w>"}


def parse(prompt: str):  # noqa: ANN201 (compel's Conjunction)
    try:
        from compel.prompt_parser import PromptParser
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError("style='compel' reads prompts with compel's own parser: pip install compel") from err
    return PromptParser().parse_conjunction(prompt)


def _split_point(tokens: list[str]) -> int:
    """compel's ``_find_next_best_split_point`` in SENTENCES mode, over more than 75 remaining tokens."""
    window = tokens[:ROOM]
    for marks in (_SENTENCE, _PHRASE):
        for i in range(len(window) - 1, -1, -1):
            if window[i] in marks:
                return i + 1
    for i in range(len(window) - 1, -1, -1):
        if window[i].endswith("</w>"):
            return i + 1
    return ROOM


def _chunks(tokens: list[str]) -> list[tuple[int, int]]:
    """compel's chunks, as (start, end) token indices: each cut after the last "." (then , ; :, then a word
    end) within 75 tokens; one empty chunk for no tokens."""
    chunks, start = [], 0
    while True:
        cut = _split_point(tokens[start:]) if len(tokens) - start > ROOM else len(tokens) - start
        chunks.append((start, start + cut))
        start += cut
        if start >= len(tokens):
            return chunks


class CompelReader:
    """compel's encoding of one prompt at a time, every tower of ``tc``."""

    def __init__(self, tc: TextConditioner) -> None:
        self.tc = tc
        # The pipelines' transformers tokenizers compel is given: those padding with 0 do it with "!" as their
        # pad token, which turns every literal "!" into 0 too.
        self.tokenizers = [ClipTokenizer("hf", pad_id=t.pad_id, max_length=tc.max_length, bang_pad=t.pad_id == 0)
                           for t in tc.spec.towers]

    def __call__(self, prompt: str) -> Conditioning:
        conjunction = parse(prompt)
        parts = []
        for part, weight in zip(conjunction.prompts, conjunction.weights, strict=True):
            c = self._prompt_object(part)  # [1, 77 k, D]
            if weight != 1:  # the whole part pulled from the empty prompt, its windows repeated to c's length
                empty = self.tc.empty().sequence.repeat(1, c.shape[1] // LENGTH, 1)
                c = empty + (c - empty) * weight
            parts.append(c)
        return Conditioning(torch.cat(parts, dim=1), self._pooled(prompt))

    def _prompt_object(self, part) -> torch.Tensor:  # noqa: ANN001 (FlattenedPrompt or Blend)
        from compel.prompt_parser import Blend

        if isinstance(part, Blend):
            conds = [Conditioning(self._flattened(p), self.tc.empty().pooled) for p in part.prompts]
            conds = self.tc.pad_chunks(*conds)
            weights = torch.tensor(part.weights, dtype=conds[0].sequence.dtype)
            if part.normalize_weights:
                weights = weights / weights.sum()
            return sum(w * c.sequence for w, c in zip(weights, conds, strict=True))
        return self._flattened(part)

    def _flattened(self, prompt) -> torch.Tensor:  # noqa: ANN001 (compel's FlattenedPrompt)
        fragments = fragments_of(prompt)
        towers = [self._tower(i, fragments) for i in range(len(self.tc.towers))]
        k = max(t.shape[1] for t in towers) // LENGTH  # the towers' tokenizers may disagree: pad (CompelForSDXL)
        empty = self.tc.empty().sequence
        padded = []
        for i, t in enumerate(towers):
            filler = empty[..., self.tc.feature_slice(i)].repeat(1, k - t.shape[1] // LENGTH, 1)
            padded.append(torch.cat([t, filler], dim=1))
        return torch.cat(padded, dim=-1)

    def _tower(self, i: int, fragments: list[tuple[str, float]]) -> torch.Tensor:
        tok = self.tokenizers[i]
        ids, weights, owner = [], [], []
        for f, (encoded, (_, weight)) in enumerate(zip(tok.encode([t for t, _ in fragments]), fragments, strict=True)):
            ids += encoded
            weights += [float(weight)] * len(encoded)
            owner += [f] * len(encoded)
        chunks = _chunks(tok.tokens(ids))
        windows = frame([[[(ids[j], weights[j]) for j in range(a, b)] for a, b in chunks]], length=LENGTH,
                        pad_id=tok.pad_id, k=len(chunks))  # one prompt, its chunks as windows
        position = {j: c * LENGTH + 1 + j - a for c, (a, b) in enumerate(chunks) for j in range(a, b)}  # -> column
        base = self._weighted(i, windows, None)  # [k, 77, W]
        embeddings, lambdas = [base], [1.0]
        for f, (_, weight) in enumerate(fragments):
            members = [position[j] for j, o in enumerate(owner) if o == f]
            if weight >= 1 or not members:
                continue
            keep = torch.ones(len(chunks) * LENGTH, dtype=torch.bool)
            keep[members[0] : members[-1] + 1] = False  # the fragment's span, chunk markers between included...
            keep[0::LENGTH] = keep[LENGTH - 1 :: LENGTH] = True  # ...but every chunk's first and last position kept
            embeddings.append(self._weighted(i, windows, keep.view(len(chunks), LENGTH)))
            lambdas.append(math.tan((1.0 - max(1e-5, weight)) * math.pi / 2))
        if len(embeddings) == 1:
            return base.reshape(1, -1, base.shape[-1])
        w = torch.tensor(lambdas, dtype=base.dtype)
        w = w / w.sum()
        mixed = sum(wi * e for wi, e in zip(w, embeddings, strict=True))
        return mixed.reshape(1, -1, base.shape[-1])

    def _weighted(self, i: int, windows: Windows, keep: torch.Tensor | None) -> torch.Tensor:
        """compel's ``build_weighted_embedding_tensor``: ComfyUI's arithmetic too (``apply_weights``)."""
        z, _ = self.tc.run_tower(i, windows.ids, windows.eos, keep)  # [k, 77, W]
        empty = self.tc.empty().sequence[..., self.tc.feature_slice(i)]  # [1, 77, W]
        return apply_weights(z, windows.weights.to(z.device), style="comfy", empty=empty)

    def _pooled(self, prompt: str) -> torch.Tensor:
        """compel's pooled vector: the raw prompt, syntax and all, through each pooled tower (compel#96)."""
        tokens = [tok([prompt]) for tok in self.tokenizers]
        return self.tc.encode_tokens(tokens).pooled


class T5Reader:
    """compel's encoding of one prompt on a T5 recipe's sequence tower: Flux's T5 with CLIP-L's pooled vector
    (``CompelForFlux``) or Sana's Gemma-2 (``CompelForSana``); see the module."""

    def __init__(self, tc: TextConditioner) -> None:
        self.tc = tc
        self.tokenizer = tc.t5_tokenizer.tokenizer  # the pipeline's own, as compel is given it
        self.sana = tc.spec.t5.architecture == "gemma2"
        # CompelForSana: model_max_length 300, no EOS (suppress_eos), padding masked out (value 0); CompelForFlux:
        # the tokenizer's 512, EOS appended, T5 attending to the padding (value 1).
        self.length = tc.spec.t5_max_length if self.sana else self.tokenizer.model_max_length
        self.bos = [] if self.tokenizer.bos_token_id is None else [self.tokenizer.bos_token_id]
        self.eos = [] if self.sana else [tc.spec.t5.eos_id]
        self.pad, self.padding_mask = tc.spec.t5.pad_id, 0 if self.sana else 1
        self.clip = None if self.sana else ClipTokenizer("hf", pad_id=tc.spec.towers[0].pad_id,
                                                         max_length=tc.spec.max_length)
        self._empty: torch.Tensor | None = None

    def __call__(self, prompt: str) -> Conditioning:
        conjunction = parse(prompt.lower().strip() if self.sana else prompt)  # CompelForSana lower-cases the prompt
        parts, masks, pooled = [], [], None
        for part, weight in zip(conjunction.prompts, conjunction.weights, strict=True):
            c, p, m = self._prompt_object(part)  # [1, L, D], [1, P], [1, L]
            if weight != 1:  # the whole part pulled from the empty prompt
                c = self.empty() + (c - self.empty()) * weight
            parts.append(c)
            masks.append(m)
            pooled = p if pooled is None else pooled
        sequence = torch.cat(parts, dim=1)  # [1, L k, D]
        if self.sana:  # its tokens' mask (compel's _build_attention_masks); the rows it hides: zeros, as clipcond's
            mask = torch.cat(masks, dim=1).to(sequence.device)
            sequence = sequence * mask[..., None].to(sequence.dtype)
            return Conditioning(sequence, pooled, mask, None, self.tc.spec.pipeline)
        return Conditioning(sequence, pooled, None, sequence.new_zeros(sequence.shape[1], 3), self.tc.spec.pipeline)

    def _prompt_object(self, part) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # noqa: ANN001
        from compel.prompt_parser import Blend

        if isinstance(part, Blend):
            encoded = [self._prompt_object(p) for p in part.prompts]
            weights = torch.tensor(part.weights, dtype=encoded[0][0].dtype)
            if part.normalize_weights:
                weights = weights / weights.sum()
            mask = torch.stack([m for _, _, m in encoded]).amax(0)  # compel: each blended prompt's tokens
            return (sum(w * c for w, (c, _, _) in zip(weights, encoded, strict=True)),
                    sum(w * p for w, (_, p, _) in zip(weights, encoded, strict=True)), mask)
        fragments = fragments_of(part)
        sequence, ids = self._sequence(fragments)
        return sequence, self._pooled(" ".join(text for text, _ in fragments)), (ids != self.pad).long()

    def _sequence(self, fragments: list[tuple[str, float]]) -> tuple[torch.Tensor, torch.Tensor]:
        """compel's weighted embedding of one prompt's fragments, [1, L, D], and its token ids [1, L]."""
        ids, weights, owner = [], [], []
        for f, (text, weight) in enumerate(fragments):
            encoded = self.tokenizer(text, truncation=True).input_ids
            encoded = encoded[len(self.bos):] if self.bos and encoded[:1] == self.bos else encoded
            encoded = encoded[:-1] if encoded and encoded[-1:] == self.eos else encoded  # markers stripped
            ids += encoded
            weights += [float(weight)] * len(encoded)
            owner += [f] * len(encoded)
        room, start = self.length - len(self.bos) - len(self.eos), len(self.bos)
        ids = self.bos + ids[:room] + self.eos
        weights, owner = [1.0] * start + weights[:room] + [1.0] * len(self.eos), owner[:room]
        pad = self.length - len(ids)
        mask = torch.tensor([[1] * len(ids) + [self.padding_mask] * pad])  # [1, L]
        ids = torch.tensor([ids + [self.pad] * pad])  # [1, L]
        weights = torch.tensor(weights + [1.0] * pad)  # [L]
        base = self._weighted(ids, weights, mask)
        embeddings, lambdas = [base], [1.0]
        for f, (_, weight) in enumerate(fragments):
            members = [start + j for j, o in enumerate(owner) if o == f]
            if weight >= 1 or not members:
                continue
            without = mask.clone()
            without[0, members[0] : members[-1] + 1] = 0
            embeddings.append(self._weighted(ids, weights, without))
            lambdas.append(math.tan((1.0 - max(1e-5, weight)) * math.pi / 2))
        w = torch.tensor(lambdas, dtype=base.dtype)
        mixed = sum(wi * e for wi, e in zip(w / w.sum(), embeddings, strict=True)) if len(embeddings) > 1 else base
        return mixed, ids

    def _weighted(self, ids: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """compel's ``build_weighted_embedding_tensor``: ``z_empty + (z - z_empty) * w`` where ``w != 1``, ``z``
        itself where ``w == 1``."""
        z = self.tc.t5(self.tc.to_device(ids), self.tc.to_device(mask))  # [1, L, D]
        w = weights.to(z.device, z.dtype)[None, :, None]
        return torch.where(w == 1, z, self.empty() + (z - self.empty()) * w)

    def empty(self) -> torch.Tensor:
        """compel's ``empty_z``: ``[BOS, EOS, pad, ...]`` (the markers its tokenizer has) without a mask, [1, L, D]."""
        if self._empty is None:
            markers = self.bos + self.eos
            ids = torch.tensor([markers + [self.pad] * (self.length - len(markers))])
            self._empty = self.tc.t5(self.tc.to_device(ids), None)
        return self._empty

    def _pooled(self, text: str) -> torch.Tensor:
        """CLIP-L's ``pooler_output`` of ``text``, truncated to 77 tokens (compel's POOLED embeddings); Sana: none."""
        if self.clip is None:
            return self.empty().new_zeros(1, 0)
        tokens = self.clip([text])
        return self.tc.run_tower(0, tokens.ids, tokens.eos)[1]  # [1, P]


def fragments_of(prompt) -> list[tuple[str, float]]:  # noqa: ANN001 (compel's FlattenedPrompt)
    """A flattened prompt's ``(text, weight)`` fragments; a ``.swap()`` gives its original's, as compel's
    conditioning does (the edit only steers its cross-attention control, which no diffusers pipeline takes)."""
    from compel.prompt_parser import CrossAttentionControlSubstitute

    out = []
    for f in prompt.children:
        swapped = isinstance(f, CrossAttentionControlSubstitute)
        out += [(x.text, x.weight) for x in f.original] if swapped else [(f.text, f.weight)]
    return out or [("", 1.0)]
