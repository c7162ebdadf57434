"""``TextConditioner``: the frozen text encoder(s) of SD 1.x / 2.x / SDXL, SD3, Flux, PixArt and Sana behind one call.

Matches diffusers' ``StableDiffusionPipeline.encode_prompt`` and
``StableDiffusionXLPipeline.encode_prompt`` (sequence, pooled, null) on the same weights, and the T5
recipes' pipelines (clipcond/encoders/recipes.py); the prompt languages are in clipcond/encoders/prompting.py.
Frozen in one place: no parameter requires grad, ``train()`` keeps eval mode, and the forward
runs under ``torch.no_grad()`` (not ``inference_mode()``: a training UNet must be able to save
our outputs for its backward).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from clipcond.conditioning import Conditioning
from clipcond.encoders import prompting
from clipcond.encoders.model import TextTransformer, random_tower, tower_from_state
from clipcond.encoders.names import get_spec
from clipcond.encoders.prompting import Segments, len_tokens
from clipcond.encoders.recipes import (
    assemble,
    clip_half,
    drop_parts,
    load_t5_half,
    repeat,
    split_weights,
    tower_keys,
    zeros,
)
from clipcond.encoders.t5 import T5Tower
from clipcond.encoders.weights import load_towers
from clipcond.errors import WeightsError
from clipcond.specs import EncoderSpec
from clipcond.text.prompts import Emphasis, WeightStyle
from clipcond.text.t5_tokens import T5Prompts, token_mask
from clipcond.text.tokenizer import ClipTokenizer, Tokens, check_prompts

logger = logging.getLogger(__name__)


class TextConditioner(nn.Module):
    """``tc(prompts) -> Conditioning`` with ``sequence [B, 77, D]`` and ``pooled [B, P]`` (a T5 recipe's
    ``[B, L, D]``; a masked recipe's ``mask`` [B, L], L the batch's longest prompt under ``pad_to="longest"``)."""

    def __init__(
        self,
        spec: EncoderSpec,
        towers: Sequence[TextTransformer],
        added: Mapping[str, int] | None = None,
        t5: tuple[T5Tower, T5Prompts] | None = None,
    ) -> None:
        """``added``: textual-inversion words and their vector counts, rows appended in this order.
        ``t5``: a T5 recipe's tower and tokenizer (``spec.t5``)."""
        super().__init__()
        if [t.spec for t in towers] != list(spec.towers):
            raise ValueError(f"towers do not match the towers of spec {spec.name!r}")
        if (t5 is None) != (spec.t5 is None) or (t5 is not None and t5[0].spec != spec.t5):
            raise ValueError(f"the T5 tower does not match the t5 tower of spec {spec.name!r}")
        self.spec = spec
        self.towers = nn.ModuleList(towers)
        self.t5, self.t5_tokenizer = t5 if t5 is not None else (None, None)
        self.added = dict(added or {})
        self.tokenizers = [ClipTokenizer(t.tokenizer, pad_id=t.pad_id, max_length=spec.max_length,
                                         added=added_ids(t.vocab_size, self.added)) for t in spec.towers]
        self.requires_grad_(False)
        self.train(False)
        self._null: Conditioning | None = None
        self._empty_cache: Conditioning | None = None
        self._fingerprint: str | None = None
        self._compiled: dict[str, object] | None = None  # torch.compile options, see compile()

    @classmethod
    def from_pretrained(
        cls,
        name: str | EncoderSpec,
        weights: str | os.PathLike[str] | Mapping[str, str | os.PathLike[str]] | None = None,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        revision: str | None = None,
        pretrained: str | None = None,
        tokenizer: object = None,
        **overrides: object,
    ) -> TextConditioner:
        """A conditioner for a registered name (or alias, ``open_clip:MODEL``, spec file or spec), with its weights.

        ``weights``: None for the name's hub source; a diffusers pipeline folder, transformers
        folder (``CLIPModel`` included), open_clip checkpoint, SD/SDXL single file, or hub repo id.
        ``pretrained``: an open_clip tag of an ``open_clip:MODEL`` name (``"laion2b_s32b_b82k"``),
        resolved through open_clip's pretrained table. ``overrides`` derive a variant
        (``clip_skip=1``, ``pooled="projected"``, ``final_norm=False``, ``null="zeros"``, ...; see
        ``EncoderSpec.replace``). Specs that name no weights (``tiny-*``) get seeded random weights.
        ``tokenizer``: a T5 recipe's tokenizer folder, where the weights have none beside them. A T5 recipe's
        ``weights`` may be a mapping of a file or folder per tower: ``{"clip_l": ..., "clip_g": ..., "t5": ...}``.
        """
        spec = get_spec(name)
        if overrides:
            spec = spec.replace(**overrides)
        if spec.t5 is not None:
            return cls._from_recipe(spec, weights, device=device, dtype=dtype, revision=revision, tokenizer=tokenizer)
        files = {}
        if pretrained is not None:
            from clipcond.encoders.openclip import pretrained_source

            if weights is not None:
                raise ValueError(f"give weights= or pretrained=, not both (got {weights!r} and {pretrained!r})")
            weights, files["open_clip_files"] = pretrained_source(spec, pretrained)
        loaded = load_towers(spec, weights, dtype=dtype, revision=revision, **files)
        if loaded is None:
            logger.info("%s names no published weights: seeded random weights (tests and demos)", spec.name)
            towers = [random_tower(t, seed=i).to(dtype) for i, t in enumerate(spec.towers)]
        else:
            towers = [tower_from_state(t, state) for t, state in loaded]
            spec = spec.replace(towers=tuple(t for t, _ in loaded))
        return cls(spec, towers).to(device)

    @classmethod
    def _from_recipe(cls, spec: EncoderSpec, weights: str | os.PathLike[str] | None, *, device: str | torch.device,
                     dtype: torch.dtype, revision: str | None, tokenizer: object) -> TextConditioner:
        """A T5 recipe: its CLIP towers as any CLIP encoder's, its T5 half from recipes.load_t5_half."""
        clip, t5_weights = clip_half(spec), weights
        towers = []
        if isinstance(weights, Mapping):  # {"clip_l": file, "clip_g": file, "t5": file}: a tower per source
            files, t5_weights = split_weights(spec, weights)
            loaded = [load_towers(clip.replace(towers=(t,), pooled_towers=(0,)), f, dtype=dtype)[0]
                      for t, f in zip(spec.towers, files, strict=True)]
        elif clip is not None:
            loaded = load_towers(clip, weights, dtype=dtype, revision=revision)
        if clip is not None and loaded is None:
            towers = [random_tower(t, seed=i).to(dtype) for i, t in enumerate(spec.towers)]
        elif clip is not None:
            towers = [tower_from_state(t, state) for t, state in loaded]
        t5 = load_t5_half(spec, t5_weights, dtype=dtype, revision=revision, tokenizer=tokenizer)
        spec = spec.replace(towers=tuple(t.spec for t in towers), t5=t5[0].spec)
        return cls(spec, towers, t5=t5).to(device)

    def with_textual_inversion(self, path: str | os.PathLike[str], *, token: str | None = None) -> TextConditioner:
        """A conditioner that also knows ``token`` (multi-vector included); this one is unchanged.

        Only rows are appended to each tower's embedding table; every existing weight is shared.
        SDXL needs a file with vectors for both towers (``clip_l`` and ``clip_g``).
        """
        from clipcond.encoders.textual_inversion import load_embedding

        emb = load_embedding(path, token)
        if emb.token in self.added:
            raise ValueError(f"{path}: token {emb.token!r} is already loaded; pass token= to rename it")
        rows = [emb.rows_for(t, path) for t in self.spec.towers]
        if len({len(r) for r in rows}) != 1:
            raise WeightsError(f"{path}: towers get different vector counts {[len(r) for r in rows]}")
        towers = [tower.with_extra_tokens(r) for tower, r in zip(self.towers, rows, strict=True)]
        spec = self.spec.replace(towers=tuple(t.spec for t in towers))
        t5 = None if self.t5 is None else (self.t5, self.t5_tokenizer)
        new = TextConditioner(spec, towers, added={**self.added, emb.token: len(rows[0])}, t5=t5)
        return new.compile(**self._compiled) if self._compiled is not None else new

    def compile(self, **options: object) -> TextConditioner:
        """Compile each tower's forward with ``torch.compile(**options)``, in place; returns self.

        The towers always see ``[B, 77]`` ids: the first batch size compiles a static graph, the
        second a graph with a dynamic batch dimension that every later size reuses.
        ``mode="reduce-overhead"`` adds CUDA graphs on a GPU (one recording per batch size); their
        outputs live in a pool the next call overwrites, so on CUDA outputs are cloned. Parameter
        names, the fingerprint and ``state_dict()`` are unchanged. Meant for GPUs at small batches,
        where launch overhead dominates; on a CPU it gained nothing measurable (docs/performance.md).
        """
        for tower in self.towers:
            tower.compile(**options)
        self._compiled = dict(options)
        self._null = self._empty_cache = None  # computed again by the compiled towers
        return self

    # --- frozen -------------------------------------------------------------------------
    def train(self, mode: bool = True) -> TextConditioner:
        return super().train(False)  # frozen: dropout-free anyway, but eval is the contract

    def _apply(self, fn, recurse=True):  # noqa: ANN001, ANN202 (torch's private signature)
        # .to()/.half()/.cuda(): the cached encodings must follow device and dtype.
        self._null = self._empty_cache = self._fingerprint = None
        return super()._apply(fn, recurse)

    # --- facts --------------------------------------------------------------------------
    @property
    def sequence_dim(self) -> int:
        return self.spec.sequence_dim

    @property
    def pooled_dim(self) -> int:
        return self.spec.pooled_dim

    @property
    def max_length(self) -> int:
        """Rows of the sequence: 77 for CLIP encoders, T5's length or SD3's 77 + 256 for T5 recipes."""
        return self.spec.sequence_length

    @property
    def device(self) -> torch.device:
        return self._first_weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self._first_weight.dtype

    @property
    def _first_weight(self) -> torch.Tensor:
        return self.towers[0].position_embedding if len(self.towers) else self.t5.embedding

    @property
    def fingerprint(self) -> str:
        """sha256 of the spec's semantics and every weight as loaded (dtype included): equal inputs,
        equal fingerprint, across formats and releases (descriptive fields are left out)."""
        if self._fingerprint is None:
            digest = hashlib.sha256(repr(self.spec.semantics()).encode())
            for key, tensor in self.state_dict().items():
                digest.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
                digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
            self._fingerprint = digest.hexdigest()
        return self._fingerprint

    # --- encoding -----------------------------------------------------------------------
    def tokenize(self, prompts: str | Sequence[str], *, instruct: bool = True) -> list[Tokens]:
        """The token ids each tower sees (SDXL: two, padded with 49407 and 0; a T5 recipe's T5 ids last).
        ``instruct=False``: without an instruction recipe's instruction (Sana's negative and null prompts)."""
        t5 = [] if self.t5_tokenizer is None else [self.t5_tokenizer(prompts, instruct=instruct)]
        return [tok(prompts) for tok in self.tokenizers] + t5

    def kept_lengths(self, tokens: Sequence[Tokens]) -> torch.Tensor | None:
        """[B] int64: the rows of each prompt a masked recipe's mask keeps (its tokens with the EOS, and Chroma's one
        pad), known from ``tokenize()`` before encoding; None where every row is kept (CLIP, SD3, Flux). A store
        holds only these rows (clipcond/store/layout.py)."""
        if self.t5 is None or self.spec.padding == "raw":
            return None
        t5 = tokens[-1]
        return torch.clamp(t5.eos + 1 + self.spec.mask_pads - t5.prefix, max=self.spec.t5_max_length)

    @torch.no_grad()
    def forward(self, prompts: str | Sequence[str]) -> Conditioning:
        return self._encode(check_prompts(prompts))

    def _encode(self, prompts: list[str], rows: Sequence[int] | None = None) -> Conditioning:
        """``forward``; ``rows``: each prompt's row in the caller's batch, for the truncation warnings."""
        if not prompts:
            return self.zero_rows(0)
        if self.spec.long_prompts == "chunk":
            return prompting.encode_windows(self, prompts, style=None)
        tokens = self.tokenize(prompts)
        if self.tokenizers:
            warn_truncated(tokens[0], self.spec.max_length, rows=rows)
        if self.t5 is not None:
            warn_truncated(tokens[-1], self.spec.t5_max_length, "T5", rows=rows)
        return self.encode_tokens(tokens)

    @torch.no_grad()
    def encode_tokens(self, tokens: Sequence[Tokens]) -> Conditioning:
        """The forward from ``tokenize()``'s output, e.g. tokenized ahead on another thread."""
        count = len(self.towers) + (self.t5 is not None)
        if len(tokens) != count:
            raise ValueError(f"one Tokens per tower: {count} expected, got {len(tokens)}")
        clip = [self.run_tower(i, t.ids, t.eos) for i, t in enumerate(tokens[: len(self.towers)])]
        if self.t5 is None:
            return self.join_towers(clip)
        t5 = tokens[-1]
        ids, mask = t5.ids, token_mask(t5)  # [B, L5] each
        if self.spec.t5_mask and len(ids):  # T5 never attends past a row's EOS: run it to the batch's longest only
            length = min(int(t5.eos.max()) + 1 + self.spec.mask_pads, ids.shape[1])  # Chroma's kept pad included
            ids, mask = ids[:, :length], mask[:, :length]
        mask = self.to_device(mask)
        sequence = self.t5(self.to_device(ids), mask if self.spec.t5_mask else None)  # [B, L, d]
        if t5.prefix:  # Sana: the instruction's rows cut but the first (BOS), as SanaPipeline's select_index
            keep = slice(t5.prefix + 1, None)
            sequence, mask = (torch.cat([x[:, :1], x[:, keep]], dim=1) for x in (sequence, mask))
        c = assemble(self.spec, clip, sequence, mask)
        full = self.spec.padding == "zero" or self.spec.pad_to == "max_length"
        return c.padded(self.spec.sequence_length) if full and c.mask is not None else c

    def join_towers(self, parts: Sequence[tuple[torch.Tensor, torch.Tensor | None]]) -> Conditioning:
        """The one place towers' outputs become a Conditioning: sequences [N, L, W_i] concatenated along
        features, the pooled vectors [N, P_i] of ``spec.pooled_towers`` concatenated in their order."""
        sequences = [sequence for sequence, _ in parts]
        pooled = [parts[i][1] for i in self.spec.pooled_towers]
        cat = (lambda ts: ts[0] if len(ts) == 1 else torch.cat(ts, dim=-1))  # noqa: E731
        return Conditioning(cat(sequences), cat(pooled))  # [N, L, D], [N, P]

    @torch.no_grad()
    def weighted(self, prompts: str | Sequence[str], *, style: WeightStyle = "a1111", comma_backtrack: int = 20,
                 emphasis: Emphasis = "original") -> Conditioning:
        """Prompts read with a tool's syntax and arithmetic, exactly as that tool computes them.

        ``style="a1111"``: AUTOMATIC1111 (``(word:1.3)``, ``(word)``, ``[word]``, ``\\(``, ``BREAK``);
        75-token chunks with comma back-tracking (``comma_backtrack`` tokens, A1111's default 20; 0 turns
        it off), a textual-inversion word never split, no empty trailing chunk; ``emphasis="original"``
        multiplies each token's row by its weight and restores the window's mean (per prompt and window,
        as A1111 encodes one prompt at a time; ``schedule`` shares it, see there), ``"no_norm"`` only
        multiplies (A1111's advice for SDXL).
        ``style="comfy"``: ComfyUI's ``CLIPTextEncode``: its parser, its tokenization and chunk rule,
        ``z_empty + w * (z - z_empty)``, ``embedding:name`` for textual inversion. Weight 1.0 everywhere
        equals the plain encoding exactly; the pooled vector is the first window's, unweighted.
        ``style="compel"``: compel (``word++``, ``(words)1.3``, ``.blend()``, ``.and()``, its masked
        down-weighting, its pooled vector from the raw string): see clipcond/text/compel_style.py.
        """
        return prompting.read(self, check_prompts(prompts), style=style, comma_backtrack=comma_backtrack,
                              emphasis=emphasis)

    @torch.no_grad()
    def schedule(self, prompt: str, steps: int, *, style: WeightStyle | None = "a1111", hires_steps: int | None = None,
                 **weighting: object) -> Segments | list[tuple[float, Segments]]:
        """A1111 prompt editing (``[from:to:0.4]``, ``[to:12]``, ``[from::0.6]``) and alternation (``[cat|dog]``).

        ``[(end_step, Conditioning), ...]``: ``end_step`` inclusive, steps counted as A1111's
        ``get_learned_conditioning_prompt_schedules`` counts them (a sampler at 0-based step ``i`` uses the
        first segment with ``end_step >= i``); each segment's text read with ``weighted(..., style=style)``,
        except that A1111 encodes a prompt's segments as one batch, so ``emphasis="original"`` restores one
        mean over all of them, window by window. With ``AND``, one such list per sub-prompt with its weight:
        ``[(weight, segments), ...]``. ``style=None``: each segment's text encoded as ``tc(text)`` (no weighting
        syntax: the T5 recipes' way, whose masked segments are each as long as the longest).
        """
        return prompting.schedule(self, prompt, steps, style=style, hires_steps=hires_steps, **weighting)

    @torch.no_grad()
    def blend(self, prompts: Sequence[str], weights: Sequence[float], *, style: WeightStyle | None = None,
              **weighting: object) -> Conditioning:
        """``Σ w_i · c_i`` over sequence and pooled, the weights as given (``(1 - a) c_cat + a c_dog``).

        Chunked prompts are padded to the same number of windows first (with the empty prompt's, as
        ``pad_chunks``); ``style`` reads each prompt with that tool's syntax (``weighted``). A masked recipe's
        prompts are padded to the longest (zero rows, ``Conditioning.padded``) and the blend attends wherever any
        of them does (the masks' union): the rows of one prompt's padding add nothing to the others'.
        """
        return prompting.blend(self, prompts, weights, style=style, **weighting)

    @torch.no_grad()
    def run_tower(self, i: int, ids: torch.Tensor, eos: torch.Tensor, keep: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Tower ``i``'s forward on the conditioner's device, the only place towers are called: its sequence
        [N, L, W_i] and its pooled vector [N, P_i] read at ``eos`` [N] (None if the spec pools nothing there).
        ``keep`` [N, L] bool: an attention mask over the keys (compel's down-weighting), see TextTransformer."""
        out = self.towers[i](self.to_device(ids), self.to_device(eos), None if keep is None else self.to_device(keep))
        # Compiled on a GPU, the outputs may live in a CUDA graph's pool that the next call overwrites
        # (mode="reduce-overhead", backend="cudagraphs", inductor's config): one copy, cheap next to the forward.
        graphs = self._compiled is not None and self.device.type == "cuda"
        sequence, pooled = (t.clone() if graphs and t is not None else t for t in out)
        return sequence, pooled

    def to_device(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids to the conditioner's device; pinned, so the copy overlaps with queued GPU work."""
        if self.device.type == "cuda" and not ids.is_pinned():
            ids = ids.pin_memory()
        return ids.to(self.device, non_blocking=True)

    def feature_slice(self, tower: int) -> slice:
        """Tower ``tower``'s columns of the sequence's features (SDXL: L's 768, then bigG's 1280)."""
        start = sum(t.width for t in self.spec.towers[:tower])
        return slice(start, start + self.spec.towers[tower].width)

    def pad_chunks(self, *conditionings: Conditioning) -> tuple[Conditioning, ...]:
        """Pad to the same number of 77-token windows with empty-prompt windows (compel#45).

        For a positive and a negative prompt of different lengths under ``long_prompts="chunk"``
        or ``weighted()``, as A1111 and compel pad them.
        """
        longest = max(len_tokens(c) for c in conditionings)
        out = []
        for c in conditionings:
            if len_tokens(c) == longest:
                out.append(c)
                continue
            missing, rest = divmod(longest - len_tokens(c), self.max_length)
            if rest:
                raise ValueError(f"sequence length {len_tokens(c)} is not a multiple of {self.max_length}")
            pad = self.empty().sequence.expand(len(c), -1, -1).repeat(1, missing, 1)  # [B, missing*L, D]
            out.append(dataclasses.replace(c, sequence=torch.cat([c.sequence, pad], dim=1)))  # pooled, pipeline kept
        return tuple(out)

    def null(self, batch_size: int = 1, *, chunks: int = 1) -> Conditioning:
        """Classifier-free-guidance null conditioning (``""`` encoded, or zeros for SDXL); cached.

        ``chunks=k`` gives ``[B, 77 * k, D]`` for chunked prompts (the null window repeated).
        """
        if batch_size < 0 or chunks < 1:
            raise ValueError(f"batch_size must be >= 0 and chunks >= 1, got {batch_size} and {chunks}")
        if self._null is None:
            self._null = self.zero_rows(1) if self.spec.null == "zeros" else self.empty()
        if self.t5 is not None:
            return repeat(self._null, batch_size)
        return Conditioning(self._null.sequence.repeat(batch_size, chunks, 1), self._null.pooled.repeat(batch_size, 1))

    def empty(self) -> Conditioning:
        """The empty prompt's encoding, one window ([1, 77, D], [1, P]); cached. The window prompts are padded
        with, the "empty" null, and the ``z_empty`` that ComfyUI's and compel's weights move tokens from. Sana's
        is without the instruction, as its pipeline's negative prompt."""
        if self._empty_cache is None:
            self._empty_cache = self.encode_tokens(self.tokenize([""], instruct=False))
        return self._empty_cache

    @torch.no_grad()
    def negative(self, prompts: str | Sequence[str]) -> Conditioning:
        """Negative prompts as the pipeline encodes them: Sana's without the instruction its prompts get
        (``SanaPipeline.encode_prompt``); every other encoder's exactly as ``tc(prompts)``."""
        if not self.spec.instruction:
            return self(prompts)
        prompts = check_prompts(prompts)
        if not prompts:
            return self.zero_rows(0)
        tokens = self.tokenize(prompts, instruct=False)
        warn_truncated(tokens[-1], self.spec.t5_max_length, "the text encoder")
        return self.encode_tokens(tokens)

    def encode(
        self, prompts: str | Sequence[str], *, drop_prob: float | Mapping[str, float] = 0.0,
        generator: torch.Generator | None = None,
    ) -> Conditioning:
        """Training-time encoding: each row is replaced by ``null()`` with probability ``drop_prob``.

        Dropped rows are never encoded. ``generator`` (any device) makes the choice reproducible.
        A mapping drops each tower on its own, as kohya's SD3 scripts do (``--clip_l_dropout_rate`` ...):
        ``drop_prob={"clip_l": 0.1, "clip_g": 0.1, "t5": 0.1}`` zeroes each tower's part of a row with its own
        probability (``recipes.drop_parts``); one ``torch.rand(B)`` per key, in ``tower_keys`` order.
        """
        prompts = check_prompts(prompts)
        if isinstance(drop_prob, Mapping):
            return self._drop_per_tower(prompts, drop_prob, generator)
        if not 0.0 <= drop_prob <= 1.0:
            raise ValueError(f"drop_prob must be in [0, 1], got {drop_prob}")
        device = generator.device if generator is not None else "cpu"
        dropped = (torch.rand(len(prompts), generator=generator, device=device) < drop_prob).cpu()  # [B]
        keep = (~dropped).nonzero().flatten()
        if len(keep) == len(prompts):
            return self(prompts)
        if not len(keep):
            return self.null(len(prompts))
        kept = self._encode([prompts[i] for i in keep.tolist()], rows=keep.tolist())  # warnings name the caller's rows
        out = self.null(len(prompts), chunks=len_tokens(kept) // self.max_length if self.t5 is None else 1)
        if out.mask is not None:  # a masked recipe's null and captions may differ in length: both to the longer
            longest = max(len_tokens(out), len_tokens(kept))
            out, kept = out.padded(longest), kept.padded(longest)
        keep = keep.to(self.device)
        out.sequence[keep] = kept.sequence
        out.pooled[keep] = kept.pooled
        if out.mask is not None:
            out.mask[keep] = kept.mask
        return out

    def _drop_per_tower(self, prompts: list[str], drop_prob: Mapping[str, float],
                        generator: torch.Generator | None) -> Conditioning:
        if self.t5 is None:
            raise ValueError(f"{self.spec.name}: drop_prob per tower is for T5 recipes (SD3, Flux); give one number")
        keys = tower_keys(self.spec)
        if sorted(drop_prob) != sorted(keys) or not all(0.0 <= p <= 1.0 for p in drop_prob.values()):
            raise ValueError(f"{self.spec.name}: drop_prob={{...}} needs a probability in [0, 1] for each of {keys}, "
                             f"got {dict(drop_prob)}")
        device = generator.device if generator is not None else "cpu"
        dropped = {k: (torch.rand(len(prompts), generator=generator, device=device) < drop_prob[k]).cpu()
                   for k in keys}  # [B] each
        return drop_parts(self.spec, self(prompts) if prompts else self.zero_rows(0), dropped)

    def zero_rows(self, rows: int) -> Conditioning:
        """``rows`` all-zero rows of this encoder's shapes (the "zeros" null; ``rows=0`` for an empty batch)."""
        if self.t5 is not None:
            return zeros(self.spec, rows, device=self.device, dtype=self.dtype)
        kw = {"device": self.device, "dtype": self.dtype}
        return Conditioning(torch.zeros(rows, self.max_length, self.sequence_dim, **kw),
                            torch.zeros(rows, self.pooled_dim, **kw))

    def extra_repr(self) -> str:
        return f"spec={self.spec.name!r}, D={self.sequence_dim}, P={self.pooled_dim}, max_length={self.max_length}"


def added_ids(vocab_size: int, added: Mapping[str, int]) -> dict[str, list[int]]:
    """Ids of the added words: their rows sit at the end of the table, in the order added."""
    first = vocab_size - sum(added.values())
    out = {}
    for word, count in added.items():
        out[word] = list(range(first, first + count))
        first += count
    return out


def warn_truncated(tokens: Tokens, max_length: int, model: str = "CLIP", *, rows: Sequence[int] | None = None) -> None:
    for row, dropped in tokens.truncated:
        # diffusers' wording, so that users who grep for it find it.
        logger.warning("The following part of prompt[%d] was truncated because %s can only handle "
                       "sequences up to %d tokens: %r", row if rows is None else rows[row], model, max_length, dropped)
