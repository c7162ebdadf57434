"""Encoder specs: every hidden semantic of an SD text conditioner as an explicit field.

Pure data, no torch import, so that ``clipcond list`` is instant. The facts come from
diffusers' ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline.encode_prompt`` and
Stability's ldm/sgm conditioners (``FrozenCLIPEmbedder``, ``FrozenOpenCLIPEmbedder(2)``).
The named specs and their registry: clipcond/registry.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Activation = Literal["quick_gelu", "gelu"]
TokenizerKind = Literal["hf", "open_clip"]
# The family a tower was trained in, which names the key layout its weights take inside SD single
# files and the slot its textual-inversion vectors take: "clip" = OpenAI CLIP (ldm's
# FrozenCLIPEmbedder, transformers' layout; TI key "clip_l"), "open_clip" = an OpenCLIP
# TextTransformer (FrozenOpenCLIPEmbedder(2), open_clip's layout; TI key "clip_g").
Family = Literal["clip", "open_clip"]
# Where the pooled vector comes from, always read at the first EOS position:
#   "final_eos"    last block -> final LayerNorm -> EOS row (HF CLIPTextModel.pooler_output)
#   "sequence_eos" EOS row of the returned sequence (diffusers' pooler_output of its 23-layer SD2 encoder)
#   "projected"    "final_eos" @ text_projection (HF text_embeds, open_clip encode_text)
Pooled = Literal["final_eos", "sequence_eos", "projected"]
NullMode = Literal["empty", "zeros"]
LongPrompts = Literal["truncate", "chunk"]
# T5's feed-forward (transformers' T5Config.feed_forward_proj): "gated-gelu" = T5 v1.1 / Flan (wi_0, wi_1, wo;
# every T5 a diffusion model uses), "relu" = the original T5 (wi, wo).
FeedForward = Literal["gated-gelu", "relu"]
# The transformers encoder class (its config's model_type): "t5" = T5EncoderModel (one relative-attention table, in
# block 0), "umt5" = UMT5EncoderModel (a table in every block: AuraFlow's pile-T5), "gemma2" = Gemma2Model (Sana's
# decoder-only LLM read as an encoder: causal attention, BOS first, no EOS appended, rotary positions).
T5Architecture = Literal["t5", "umt5", "gemma2"]
# What the T5 rows after the prompt's EOS hold:
#   "raw"    as the encoder computes them, attended by the diffusion transformer (SD3, Flux: no mask)
#   "zero"   zeroed by the pipeline (AuraFlow), no mask passed on
#   "masked" a mask [B, L] comes with the sequence and the transformer never attends to them (PixArt)
Padding = Literal["raw", "zero", "masked"]
# Prompt text before the T5 tokenizer: "none"; "lower_strip" = str.lower().strip() (PixArt's
# _text_preprocessing with clean_caption=False, applied to the negative prompt too); "clean_caption" = PixArt's
# clean_caption=True (its pipeline __call__'s default): DeepFloyd IF's caption cleaning, applied twice.
Preprocess = Literal["none", "lower_strip", "clean_caption"]
# The length of a masked recipe's outputs (padding "masked"; the transformer reads the mask):
#   "longest"    the batch's longest kept row (exact: the transformer never attends past a row's mask)
#   "max_length" the recipe's full length (t5_max_length), as the diffusers pipeline returns it
# Either way T5 runs only to the batch's longest prompt and the rows the mask hides are zeros.
PadTo = Literal["longest", "max_length"]
# How the towers make the sequence:
#   "features" CLIP towers concatenated along features, [B, 77, sum W] (SD 1/2, SDXL; no T5)
#   "t5"       the T5 sequence alone, [B, L5, d_model]; CLIP towers give only pooled (Flux) or nothing (PixArt)
#   "tokens"   CLIP towers along features, zero-padded to d_model columns, then the T5 rows after them along
#              tokens: [B, 77 + L5, d_model] (SD3: [77, 2048] -> [77, 4096] ++ [256, 4096])
Combine = Literal["features", "t5", "tokens"]

POOLED_CHOICES: tuple[str, ...] = typing.get_args(Pooled)
NULL_CHOICES: tuple[str, ...] = typing.get_args(NullMode)
LONG_PROMPT_CHOICES: tuple[str, ...] = typing.get_args(LongPrompts)
# Every Literal field of the specs, checked in __post_init__ (a typo is an error, not a silent default).
_TOWER_CHOICES: dict[str, tuple[object, ...]] = {
    "activation": typing.get_args(Activation), "tokenizer": typing.get_args(TokenizerKind),
    "family": typing.get_args(Family), "pooled": (*POOLED_CHOICES, None),
}
_ENCODER_CHOICES: dict[str, tuple[object, ...]] = {
    "null": NULL_CHOICES, "long_prompts": LONG_PROMPT_CHOICES, "padding": typing.get_args(Padding),
    "preprocess": typing.get_args(Preprocess), "combine": typing.get_args(Combine),
    "pad_to": typing.get_args(PadTo),
}
# Overrides of EncoderSpec.replace that set a field of every tower.
TOWER_OVERRIDES = ("hidden_layer", "pad_id", "final_norm", "hf_dropped_layers")

BOS_ID = 49406
EOS_ID = 49407
VOCAB_SIZE = 49408  # the CLIP BPE's ids, BOS and EOS the last two
# A tower's key in SDXL-style embedding files and in ComfyUI's / kohya's per-tower weight files, by its family.
FAMILY_KEYS = {"clip": "clip_l", "open_clip": "clip_g"}


class SpecError(ValueError):
    """A spec or an override is invalid; the message names the spec and the field."""


@dataclass(frozen=True, slots=True, kw_only=True)
class TowerSpec:
    """One CLIP text transformer and how its output is read."""

    name: str
    # Architecture of the *reference* tower. Folders with a config.json override these
    # sizes (a name fixes semantics, not size); files without one are checked against them.
    width: int
    layers: int
    heads: int
    mlp_width: int
    activation: Activation
    projection_dim: int | None  # text_projection output size; None: the tower has none
    vocab_size: int = VOCAB_SIZE
    context_length: int = 77
    family: Family
    # Tokenize as the conditioner that trained the UNet did (see clipcond/text/tokenizer.py).
    tokenizer: TokenizerKind
    # No default on purpose: SD1 pads with EOS (49407), OpenCLIP towers with 0, and the
    # UNet was trained on whichever its conditioner used.
    pad_id: int
    # -1 last block, -2 penultimate, ... of the reference tower (HF hidden_states[-2] == -2).
    hidden_layer: int
    final_norm: bool  # apply the final LayerNorm to the returned sequence
    pooled: Pooled | None  # None: this tower contributes no pooled vector
    # Blocks a transformers-layout folder leaves out at the end. diffusers' SD2 text_encoder
    # folders store only the first 23 of ViT-H's 24 blocks (the pipeline reads the penultimate
    # layer), so such a folder's last block is our -2; a full ViT-H tower (laion's repo, a
    # CLIPTextModelWithProjection) stores all 24. None: worked out from the weights when they
    # are loaded (clipcond/encoders/weights.py, dropped_layers); 0 or 1 settles it.
    hf_dropped_layers: int | None = 0
    hub_subfolder: str = "text_encoder"  # where the tower lives in a diffusers pipeline folder

    def __post_init__(self) -> None:
        def fail(field: str, why: str) -> SpecError:
            return SpecError(f"tower spec {self.name!r}: {field} {why}")

        for field in ("width", "layers", "heads", "mlp_width", "vocab_size", "context_length"):
            if getattr(self, field) <= 0:
                raise fail(field, f"must be positive, got {getattr(self, field)}")
        if self.width % self.heads:
            raise fail("heads", f"must divide width {self.width}, got {self.heads}")
        if not -self.layers <= self.hidden_layer <= -1:
            raise fail("hidden_layer", f"must be in [-{self.layers}, -1] (-1 last, -2 penultimate), "
                       f"got {self.hidden_layer}")
        for field, choices in _TOWER_CHOICES.items():
            if getattr(self, field) not in choices:
                raise fail(field, f"must be one of {choices}, got {getattr(self, field)!r}")
        if self.hf_dropped_layers is not None and not 0 <= self.hf_dropped_layers < self.layers:
            raise fail("hf_dropped_layers", f"must be None or in [0, {self.layers}), got {self.hf_dropped_layers}")
        if self.pooled == "projected" and self.projection_dim is None:
            raise fail("pooled", "is 'projected' but the tower has no projection_dim")
        if not 0 <= self.pad_id < self.vocab_size:
            raise fail("pad_id", f"must be a token id in [0, {self.vocab_size}), got {self.pad_id}")

    @property
    def sequence_blocks(self) -> int:
        """Blocks to run for the sequence: the one place the -1/-2 convention is converted."""
        return self.layers + 1 + self.hidden_layer

    @property
    def blocks_needed(self) -> int:
        """Blocks to run in all: the pooled vector may need the last block (SDXL's bigG does)."""
        return self.layers if self.pooled in ("final_eos", "projected") else self.sequence_blocks

    @property
    def pooled_dim(self) -> int:
        return self.projection_dim if self.pooled == "projected" else self.width

    def replace(self, **changes: object) -> TowerSpec:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True, slots=True, kw_only=True)
class T5TowerSpec:
    """One T5 encoder (transformers' ``T5EncoderModel``) and where a pipeline keeps it and its tokenizer."""

    name: str
    # Architecture of the *reference* tower (transformers' T5Config names); a folder's config.json
    # overrides the sizes (a name fixes semantics, not size).
    vocab_size: int  # embedding rows: 32128 for T5 v1.1 (the tokenizer's 32100 ids, padded to a multiple of 128)
    d_model: int
    layers: int  # num_layers
    heads: int  # num_heads
    d_kv: int  # per-head size: heads * d_kv need not equal d_model in T5
    d_ff: int
    feed_forward: FeedForward
    architecture: T5Architecture = "t5"  # left out of to_dict() at "t5": a T5 v1.1 spec's dict has no such key
    kv_heads: int = 0  # Gemma-2's grouped-query key/value heads (0: as many as heads); left out of to_dict() at 0
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_eps: float = 1e-6
    # The tokenizer's model_max_length: T5 has relative positions, so this is the length it was
    # trained at, not a table size; a recipe's t5_max_length must not exceed it.
    max_length: int = 512
    # No BOS: T5's SentencePiece ids are the prompt, then EOS </s> = 1, then <pad> = 0.
    pad_id: int = 0
    eos_id: int = 1
    hub_subfolder: str = "text_encoder_3"  # where a diffusers pipeline keeps it ("" : a transformers repo's root)
    # Tokenizer source: the pipeline's own transformers tokenizer folder beside the weights ("tokenizer_3"
    # for SD3, "tokenizer_2" for Flux, "tokenizer" for PixArt), read with AutoTokenizer (T5TokenizerFast).
    tokenizer_subfolder: str = "tokenizer_3"

    def __post_init__(self) -> None:
        def fail(field: str, why: str) -> SpecError:
            return SpecError(f"T5 tower spec {self.name!r}: {field} {why}")

        for field in ("vocab_size", "d_model", "layers", "heads", "d_kv", "d_ff", "relative_attention_num_buckets",
                      "relative_attention_max_distance", "max_length"):
            if not isinstance(getattr(self, field), int) or getattr(self, field) <= 0:
                raise fail(field, f"must be a positive int, got {getattr(self, field)!r}")
        if not isinstance(self.kv_heads, int) or self.kv_heads < 0 or (self.kv_heads and self.heads % self.kv_heads):
            raise fail("kv_heads", f"must be 0 or divide heads {self.heads}, got {self.kv_heads!r}")
        if self.architecture not in typing.get_args(T5Architecture):
            raise fail("architecture", f"must be one of {typing.get_args(T5Architecture)}, got {self.architecture!r}")
        if self.feed_forward not in typing.get_args(FeedForward):
            raise fail("feed_forward", f"must be one of {typing.get_args(FeedForward)}, got {self.feed_forward!r}")
        if not 0 < self.layer_norm_eps < 1:
            raise fail("layer_norm_eps", f"must be in (0, 1), got {self.layer_norm_eps}")
        for field in ("pad_id", "eos_id"):
            if not 0 <= getattr(self, field) < self.vocab_size:
                raise fail(field, f"must be a token id in [0, {self.vocab_size}), got {getattr(self, field)}")
        if self.pad_id == self.eos_id:
            raise fail("eos_id", f"must differ from pad_id {self.pad_id}: the mask is read from the EOS position")

    def replace(self, **changes: object) -> T5TowerSpec:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True, slots=True, kw_only=True)
class EncoderSpec:
    """A conditioner: towers whose sequences are concatenated along features, pooled from some of them."""

    name: str
    towers: tuple[TowerSpec, ...]
    # Towers whose pooled vectors are returned, concatenated in this order: SDXL (1,) = bigG's;
    # SD3 (0, 1) = CLIP-L's projected vector then CLIP-G's, [B, 768 + 1280].
    pooled_towers: tuple[int, ...]
    null: NullMode  # "empty": encode "" ; "zeros": all-zero tensors (SDXL force_zeros_for_empty_prompt)
    max_length: int = 77
    # Beyond max_length: "truncate" (diffusers, with a warning) or "chunk": 75-token windows, each
    # framed BOS ... EOS, concatenated to [B, 77 * k, D] (A1111, ComfyUI, compel); opt-in.
    long_prompts: LongPrompts = "truncate"
    hub_repo: str | None = None  # default weights: a hub repo (diffusers pipeline, transformers or open_clip)
    source: str = ""  # where these facts come from, for `clipcond list`
    # --- T5 recipes (SD3, Flux, PixArt). At their defaults these fields are left out of to_dict(): a CLIP spec's
    # dict, fingerprint and store name no T5 field.
    t5: T5TowerSpec | None = None  # the T5 tower, run after the CLIP towers; None: a CLIP-only encoder
    # Tokens T5 sees, EOS included, padded to it (diffusers' max_sequence_length): SD3 256, Flux-dev 512,
    # Flux-schnell 256, PixArt-alpha 120, PixArt-Sigma 300. 0 when there is no T5 tower.
    t5_max_length: int = 0
    t5_mask: bool = False  # the attention mask goes into T5 (PixArt); SD3 and Flux let T5 attend to padding
    padding: Padding = "raw"  # what the rows after EOS hold, see Padding
    # Pad rows after the EOS that the returned mask still marks 1 (its transformer attends to them): Chroma 1
    # (ChromaPipeline: "all except the first padding token are masked out"). T5 itself sees the tokenizer's mask.
    mask_pads: int = 0
    preprocess: Preprocess = "none"  # the T5 prompt's text before tokenizing, see Preprocess
    pad_to: PadTo = "max_length"  # a masked recipe's output length, see PadTo ("longest" for the masked presets)
    # Text put before every prompt (not the negative or null prompt): Sana's "complex human instruction" lines
    # joined by newlines. The rows it adds are cut from the output but its first (BOS) row, as SanaPipeline's
    # select_index [0] + the last t5_max_length - 1: the sequence keeps t5_max_length rows.
    instruction: str = ""
    combine: Combine = "features"  # how tower outputs make the sequence, see Combine
    text_ids: bool = False  # Flux: Conditioning.text_ids = zeros [L, 3] (the transformer's txt_ids)
    # The diffusers pipeline whose __call__ keywords Conditioning.pipeline_kwargs() gives (descriptive: it
    # names keywords, it changes no tensor). None: not said.
    pipeline: str | None = None

    def __post_init__(self) -> None:
        def fail(field: str, why: str) -> SpecError:
            return SpecError(f"encoder spec {self.name!r}: {field} {why}")

        if not all(isinstance(t, TowerSpec) for t in self.towers) or not (self.towers or self.t5):
            raise fail("towers", f"must be a tuple of TowerSpec, non-empty without t5, got {self.towers!r}")
        if (not self.pooled_towers and self.t5 is None) or any(not 0 <= i < len(self.towers)
                                                               for i in self.pooled_towers):
            raise fail("pooled_towers", f"must index towers (0..{len(self.towers) - 1}), got {self.pooled_towers}")
        for i in self.pooled_towers:
            if self.towers[i].pooled is None:
                raise fail("pooled_towers", f"names tower {i} ({self.towers[i].name!r}), which has pooled=None")
        for field, choices in _ENCODER_CHOICES.items():
            if getattr(self, field) not in choices:
                raise fail(field, f"must be one of {choices}, got {getattr(self, field)!r}")
        shortest = min((t.context_length for t in self.towers), default=self.max_length)
        if not 2 <= self.max_length <= shortest:
            raise fail("max_length", f"must be in [2, {shortest}] (the position embeddings), got {self.max_length}")
        self._check_recipe(fail)

    def _check_recipe(self, fail: typing.Callable[[str, str], SpecError]) -> None:
        """The T5 fields agree with each other and with the towers."""
        if self.t5 is None:
            changed = [f for f, default in _RECIPE_DEFAULTS.items() if f != "pipeline" and getattr(self, f) != default]
            if changed:
                raise fail(changed[0], "is a T5 recipe field, but the spec has no t5 tower")
            return
        if not isinstance(self.t5, T5TowerSpec):
            raise fail("t5", f"must be a T5TowerSpec or None, got {type(self.t5).__name__}")
        if not 1 <= self.t5_max_length <= self.t5.max_length:
            raise fail("t5_max_length", f"must be in [1, {self.t5.max_length}], got {self.t5_max_length}")
        if self.combine == "features":
            raise fail("combine", "is 'features' (CLIP towers only); a T5 recipe combines by 't5' or 'tokens'")
        if self.combine == "tokens" and not (self.towers and self.sequence_dim >= sum(t.width for t in self.towers)):
            raise fail("combine", f"is 'tokens', which needs CLIP towers no wider than T5's d_model {self.t5.d_model}")
        if self.padding in ("zero", "masked") and not self.t5_mask:
            raise fail("padding", f"is {self.padding!r}, which needs t5_mask=True (T5 must not attend to padding)")
        if self.long_prompts != "truncate":
            raise fail("long_prompts", "must be 'truncate' for a T5 recipe (T5 windows are not defined)")
        if not isinstance(self.mask_pads, int) or self.mask_pads < 0 or (self.mask_pads and self.padding != "masked"):
            raise fail("mask_pads", f"must be an int >= 0, and 0 unless padding is 'masked', got {self.mask_pads!r}")
        if self.instruction and (self.t5.architecture != "gemma2" or not self.t5_mask):
            raise fail("instruction", "is for a decoder-only tower (gemma2) read with its mask (Sana)")
        if self.pad_to == "longest" and self.padding != "masked":
            raise fail("pad_to", f"is 'longest', which needs padding='masked' (a transformer that reads the mask); "
                                 f"padding is {self.padding!r}")

    @property
    def sequence_dim(self) -> int:
        return sum(t.width for t in self.towers) if self.t5 is None else self.t5.d_model

    @property
    def sequence_length(self) -> int:
        """Rows of the sequence: 77 for CLIP, T5's length, or both (SD3's 77 + 256)."""
        return {"features": self.max_length, "t5": self.t5_max_length,
                "tokens": self.max_length + self.t5_max_length}[self.combine]

    @property
    def pooled_dim(self) -> int:
        return sum(self.towers[i].pooled_dim for i in self.pooled_towers)

    @property
    def token_limits(self) -> str:
        """The prompt lengths past which the towers truncate, for messages: ``77 tokens``; SD3's ``77 CLIP tokens
        or 256 t5-v1_1-xxl tokens``; PixArt's ``300 t5-v1_1-xxl tokens``."""
        if self.t5 is None:
            return f"{self.max_length} tokens"
        t5 = f"{self.t5_max_length} {self.t5.name} tokens"
        return f"{self.max_length} CLIP tokens or {t5}" if self.towers else t5

    def semantics(self) -> dict[str, object]:
        """The fields that change outputs: ``source``, ``hub_repo`` and ``pipeline`` only describe, ``pad_to`` only
        adds rows the mask hides (fingerprints: stores of either agree)."""
        fields = self.to_dict()
        for name in ("source", "hub_repo", "pipeline", "pad_to"):
            fields.pop(name, None)
        return fields

    def to_dict(self) -> dict[str, object]:
        """Plain JSON data (tuples as lists): ``spec_from_dict`` reads it back equal. The T5 recipe fields are
        left out at their defaults: a CLIP spec's dict holds only the CLIP fields."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name not in _RECIPE_DEFAULTS or getattr(self, f.name) != _RECIPE_DEFAULTS[f.name]}
        data["towers"] = [dataclasses.asdict(t) for t in self.towers]
        if self.t5 is not None:
            data["t5"] = dataclasses.asdict(self.t5)
            if self.t5.architecture == "t5":
                del data["t5"]["architecture"]
            if not self.t5.kv_heads:
                del data["t5"]["kv_heads"]
        return json.loads(json.dumps(data))

    def replace(self, *, clip_skip: int | None = None, pooled: Pooled | None = None, **changes: object) -> EncoderSpec:
        """A variant of this spec; tower-level overrides apply to every tower.

        ``clip_skip=k`` moves each tower k blocks earlier than this spec's layer, as diffusers'
        ``encode_prompt(clip_skip=k)`` does (k=1 is A1111/kohya "clip skip 2", ComfyUI -2).
        ``hidden_layer`` sets the layer absolutely (-1 last, -2 penultimate); ``final_norm`` switches
        the final LayerNorm on the sequence; ``pad_id`` the padding id; ``hf_dropped_layers`` says
        how many blocks a transformers folder leaves out (see TowerSpec); ``pooled`` changes the
        source of every pooled tower.
        """
        if clip_skip is not None and "hidden_layer" in changes:
            raise SpecError(f"encoder spec {self.name!r}: give clip_skip or hidden_layer, not both")
        if clip_skip is not None and clip_skip < 0:
            raise SpecError(f"encoder spec {self.name!r}: clip_skip must be >= 0, got {clip_skip}")
        common = {k: changes.pop(k) for k in TOWER_OVERRIDES if k in changes and changes[k] is not None}
        towers = []
        for i, tower in enumerate(changes.pop("towers", self.towers)):
            tower_changes = dict(common)
            if clip_skip is not None:
                tower_changes["hidden_layer"] = tower.hidden_layer - clip_skip
            if pooled is not None and i in changes.get("pooled_towers", self.pooled_towers):
                tower_changes["pooled"] = pooled
            towers.append(tower.replace(**tower_changes) if tower_changes else tower)
        fields = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - fields)
        if unknown:
            raise SpecError(f"encoder spec {self.name!r}: unknown override(s) {unknown}; "
                            f"known: {sorted(fields | {'clip_skip', 'pooled', *TOWER_OVERRIDES})}")
        return dataclasses.replace(self, towers=tuple(towers), **changes)


# The T5 recipe fields and their defaults: a CLIP spec holds these, and to_dict() leaves them out.
_RECIPE_DEFAULTS: dict[str, object] = {
    f.name: f.default for f in dataclasses.fields(EncoderSpec)
    if f.name in ("t5", "t5_max_length", "t5_mask", "padding", "mask_pads", "preprocess", "pad_to", "instruction",
                  "combine", "text_ids", "pipeline")
}


def spec_from_dict(data: dict[str, object]) -> EncoderSpec:
    """The spec ``EncoderSpec.to_dict`` (or a spec JSON file, or a store manifest) recorded."""
    try:
        data = dict(data)
        towers = tuple(TowerSpec(**dict(tower)) for tower in data.pop("towers"))
        data["pooled_towers"] = tuple(data["pooled_towers"])
        if data.get("t5") is not None:
            data["t5"] = T5TowerSpec(**data["t5"])
        return EncoderSpec(**data, towers=towers)
    except (KeyError, TypeError) as err:
        raise SpecError(f"not an encoder spec: {type(err).__name__}: {err}") from err


def load_spec_file(path: str | os.PathLike[str]) -> EncoderSpec:
    """An encoder spec from a JSON file (``clipcond list --json NAME`` writes one)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise SpecError(f"{path}: cannot read an encoder spec JSON file: {err}") from err
    if not isinstance(data, dict):
        raise SpecError(f"{path}: an encoder spec JSON file holds an object, got {type(data).__name__}")
    try:
        return spec_from_dict(data)
    except SpecError as err:
        raise SpecError(f"{path}: {err}") from err
