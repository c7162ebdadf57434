"""Named encoder specs: every hidden semantic of an SD text conditioner as an explicit field.

Pure data, no torch import, so that ``clipcond list`` is instant. The facts come from
diffusers' ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline.encode_prompt`` and
Stability's ldm/sgm conditioners (``FrozenCLIPEmbedder``, ``FrozenOpenCLIPEmbedder(2)``).
The registry is built on the last line of this module.
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
    vocab_size: int = 49408
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
    architecture: T5Architecture = "t5"  # left out of to_dict() at "t5", so that T5 stores made before it still grow
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
    # --- T5 recipes (SD3, Flux, PixArt). At their defaults these fields are left out of to_dict(), so that
    # the CLIP specs' dicts, fingerprints and stores are those of clipcond before T5.
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

    def semantics(self) -> dict[str, object]:
        """The fields that change outputs: ``source``, ``hub_repo`` and ``pipeline`` only describe, ``pad_to`` only
        adds rows the mask hides (fingerprints: stores of either agree)."""
        fields = self.to_dict()
        for name in ("source", "hub_repo", "pipeline", "pad_to"):
            fields.pop(name, None)
        return fields

    def to_dict(self) -> dict[str, object]:
        """Plain JSON data (tuples as lists): ``spec_from_dict`` reads it back equal. The T5 recipe fields are
        left out at their defaults, so that a CLIP spec's dict is what clipcond recorded before they existed."""
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
    """The spec ``EncoderSpec.to_dict`` (or a spec JSON file, or a store manifest) recorded.

    Version-1 manifests (clipcond before the ``family`` and ``pooled_towers`` fields) read too.
    """
    try:
        data = dict(data)
        towers = []
        for tower in data.pop("towers"):
            tower = dict(tower)
            tower.setdefault("family", "clip" if tower.get("tokenizer") == "hf" else "open_clip")
            towers.append(TowerSpec(**tower))
        if "pooled_tower" in data:
            data["pooled_towers"] = [data.pop("pooled_tower")]
        data["pooled_towers"] = tuple(data["pooled_towers"])
        if data.get("t5") is not None:
            data["t5"] = T5TowerSpec(**data["t5"])
        return EncoderSpec(**data, towers=tuple(towers))
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


# --- reference towers --------------------------------------------------------------------

# OpenAI CLIP ViT-L/14 text tower (openai/clip-vit-large-patch14 text_config), as SD 1.x's
# FrozenCLIPEmbedder uses it: HF CLIPTokenizer padding with <|endoftext|>, last layer + final LN.
CLIP_L = TowerSpec(
    name="clip-vit-l-14", width=768, layers=12, heads=12, mlp_width=3072, activation="quick_gelu",
    projection_dim=768, family="clip", tokenizer="hf", pad_id=EOS_ID, hidden_layer=-1, final_norm=True,
    pooled="final_eos",
)

# OpenCLIP ViT-H/14 (laion2b_s32b_b79k) text tower as SD 2.x's FrozenOpenCLIPEmbedder uses it:
# open_clip.tokenize (pad 0), layer="penultimate", then ln_final. diffusers ships it truncated
# to 23 blocks, so its last_hidden_state is this sequence and its pooler_output its EOS row.
OPENCLIP_H = TowerSpec(
    name="openclip-vit-h-14", width=1024, layers=24, heads=16, mlp_width=4096, activation="gelu",
    projection_dim=1024, family="open_clip", tokenizer="open_clip", pad_id=0, hidden_layer=-2, final_norm=True,
    pooled="sequence_eos", hf_dropped_layers=None,
)

# OpenCLIP ViT-bigG/14 (laion2b_s39b_b160k) text tower as SDXL's FrozenOpenCLIPEmbedder2 uses
# it: penultimate layer *without* ln_final for the sequence; pooled = ln_final(last)[eos] @ proj.
OPENCLIP_BIGG = TowerSpec(
    name="openclip-vit-bigg-14", width=1280, layers=32, heads=20, mlp_width=5120, activation="gelu",
    projection_dim=1280, family="open_clip", tokenizer="open_clip", pad_id=0, hidden_layer=-2, final_norm=False,
    pooled="projected", hub_subfolder="text_encoder_2",
)

# SDXL's first tower: CLIP ViT-L/14 read at the penultimate layer without final LN, no pooled.
SDXL_CLIP_L = CLIP_L.replace(hidden_layer=-2, final_norm=False, pooled=None)

# SD3's CLIP halves, as diffusers' StableDiffusion3Pipeline._get_clip_prompt_embeds reads them: both
# CLIPTextModelWithProjection, hidden_states[-2] without final LN, pooled = text_embeds (projected).
# Both through transformers' CLIPTokenizer (SD3's reference code too); tokenizer_2 pads with 0.
SD3_CLIP_L = CLIP_L.replace(hidden_layer=-2, final_norm=False, pooled="projected")
SD3_CLIP_G = OPENCLIP_BIGG.replace(tokenizer="hf", pooled="projected")

# OpenCLIP ViT-L/14 (laion2b_s32b_b82k, open_clip's ViT-L-14 config) read as open_clip's
# encode_text reads it: ln_final of the last block; pooled = its EOS row @ text_projection.
OPENCLIP_L = TowerSpec(
    name="openclip-vit-l-14", width=768, layers=12, heads=12, mlp_width=3072, activation="gelu",
    projection_dim=768, family="open_clip", tokenizer="open_clip", pad_id=0, hidden_layer=-1, final_norm=True,
    pooled="projected",
)


# google/t5-v1_1-xxl's encoder (its config.json), as T5EncoderModel: what SD3 (text_encoder_3), Flux
# (text_encoder_2) and PixArt (text_encoder) ship, each with the pipeline's T5TokenizerFast beside it.
T5_XXL = T5TowerSpec(
    name="t5-v1_1-xxl", vocab_size=32128, d_model=4096, layers=24, heads=64, d_kv=64, d_ff=10240,
    feed_forward="gated-gelu",
)
FLUX_T5 = T5_XXL.replace(hub_subfolder="text_encoder_2", tokenizer_subfolder="tokenizer_2")
PIXART_T5 = T5_XXL.replace(hub_subfolder="text_encoder", tokenizer_subfolder="tokenizer")
PLAIN_T5 = T5_XXL.replace(hub_subfolder="", tokenizer_subfolder="")  # a transformers repo: all at its root
# AuraFlow's text_encoder (fal/AuraFlow): EleutherAI's pile-T5-XL encoder as UMT5EncoderModel (ComfyUI's
# t5_pile_config_xl.json: d_model 2048, 24 layers, 32 heads, d_ff 5120, gated gelu). Its tokenizer is pile-T5's
# Llama-style SentencePiece (LlamaTokenizerFast): no BOS, EOS </s> = 2, padding with id 1 (ComfyUI: pad 1). The pad
# id never reaches an output: T5 gets the mask and the pipeline zeroes the padding rows.
PILE_T5_XL = T5TowerSpec(
    name="pile-t5-xl", architecture="umt5", vocab_size=32128, d_model=2048, layers=24, heads=32, d_kv=64, d_ff=5120,
    feed_forward="gated-gelu", pad_id=1, eos_id=2, hub_subfolder="text_encoder", tokenizer_subfolder="tokenizer",
)


# Sana's text encoder (Efficient-Large-Model/Sana_*_diffusers text_encoder/): Gemma-2 2B (gemma-2-2b-it) as
# Gemma2Model: d_model 2304, 26 layers, 8 heads (4 key/value heads) of 256, d_ff 9216. Its tokenizer (tokenizer/,
# GemmaTokenizerFast): BOS <bos> = 2 first, no EOS appended, padding <pad> = 0 on the right (SanaPipeline sets it).
GEMMA2_2B = T5TowerSpec(
    name="gemma-2-2b", architecture="gemma2", vocab_size=256000, d_model=2304, layers=26, heads=8, kv_heads=4,
    d_kv=256, d_ff=9216, feed_forward="gated-gelu", max_length=8192, pad_id=0, eos_id=1,
    hub_subfolder="text_encoder", tokenizer_subfolder="tokenizer",
)
# SanaPipeline.__call__'s default complex_human_instruction, joined by newlines as _get_gemma_prompt_embeds joins it.
SANA_INSTRUCTION = "\n".join([
    "Given a user prompt, generate an 'Enhanced prompt' that provides detailed visual descriptions suitable for image "
    "generation. Evaluate the level of detail in the user prompt:",
    "- If the prompt is simple, focus on adding specifics about colors, shapes, sizes, textures, and spatial "
    "relationships to create vivid and concrete scenes.",
    "- If the prompt is already detailed, refine and enhance the existing details slightly without overcomplicating.",
    "Here are examples of how to transform or refine prompts:",
    "- User Prompt: A cat sleeping -> Enhanced: A small, fluffy white cat curled up in a round shape, sleeping "
    "peacefully on a warm sunny windowsill, surrounded by pots of blooming red flowers.",
    "- User Prompt: A busy city street -> Enhanced: A bustling city street scene at dusk, featuring glowing street "
    "lamps, a diverse crowd of people in colorful clothing, and a double-decker bus passing by towering glass "
    "skyscrapers.",
    "Please generate only the enhanced description for the prompt below and avoid including any additional commentary "
    "or evaluations:",
    "User Prompt: ",
])


def _tiny_t5(tower: T5TowerSpec) -> T5TowerSpec:
    # Same semantics, toy size: 3 blocks, the real vocabulary (real token ids) and relative-attention table.
    # d_model 96: SD3's tiny CLIP pair (32 + 48 columns) is zero-padded to it, as 2048 to 4096.
    kv_heads = 2 if tower.kv_heads else 0  # Gemma-2's grouped-query attention kept
    return tower.replace(name=f"tiny-{tower.name}", d_model=96, layers=3, heads=4, kv_heads=kv_heads, d_kv=16,
                         d_ff=128)


def _t5_specs(sd3_clip: EncoderSpec, flux_clip: EncoderSpec) -> list[EncoderSpec]:
    """The T5 recipes, each as its diffusers 0.42 pipeline's encode_prompt builds it."""
    t5 = {"null": "empty", "pooled_towers": ()}
    sd3 = sd3_clip.replace(
        name="sd3", t5=T5_XXL, t5_max_length=256, combine="tokens", pipeline="StableDiffusion3Pipeline",
        source="diffusers StableDiffusion3Pipeline.encode_prompt (max_sequence_length=256)")
    flux = flux_clip.replace(
        name="flux", t5=FLUX_T5, t5_max_length=512, combine="t5", text_ids=True, pipeline="FluxPipeline",
        source="diffusers FluxPipeline.encode_prompt (max_sequence_length=512)")
    schnell = flux.replace(name="flux-schnell", t5_max_length=256, hub_repo="black-forest-labs/FLUX.1-schnell",
                           source="diffusers FluxPipeline.encode_prompt (max_sequence_length=256, FLUX.1-schnell)")
    sigma = EncoderSpec(
        name="pixart-sigma", towers=(), t5=PIXART_T5, t5_max_length=300, t5_mask=True, padding="masked",
        pad_to="longest", preprocess="lower_strip", combine="t5", pipeline="PixArtSigmaPipeline", **t5,
        hub_repo="PixArt-alpha/PixArt-Sigma-XL-2-1024-MS",
        source="diffusers PixArtSigmaPipeline.encode_prompt (max_sequence_length=300, clean_caption=False)")
    alpha = sigma.replace(name="pixart-alpha", t5_max_length=120, pipeline="PixArtAlphaPipeline",
                          hub_repo="PixArt-alpha/PixArt-XL-2-1024-MS",
                          source="diffusers PixArtAlphaPipeline.encode_prompt (max_sequence_length=120, "
                                 "clean_caption=False)")
    plain = EncoderSpec(name="t5-xxl", towers=(), t5=PLAIN_T5, t5_max_length=512, combine="t5", **t5,
                        hub_repo="google/t5-v1_1-xxl", source="transformers T5EncoderModel(ids).last_hidden_state")
    # Chroma: T5 with its mask at 512; the mask handed on keeps one pad after the EOS; rows are not zeroed.
    chroma = sigma.replace(name="chroma", t5_max_length=512, preprocess="none", mask_pads=1, text_ids=True,
                           pipeline="ChromaPipeline", hub_repo="lodestones/Chroma1-HD",
                           source="diffusers ChromaPipeline.encode_prompt (max_sequence_length=512)")
    # AuraFlow: UMT5 with its mask at 256, padding rows zeroed by encode_prompt; its transformer takes no mask.
    aura = EncoderSpec(name="auraflow", towers=(), t5=PILE_T5_XL, t5_max_length=256, t5_mask=True, padding="zero",
                       combine="t5", pipeline="AuraFlowPipeline", hub_repo="fal/AuraFlow", **t5,
                       source="diffusers AuraFlowPipeline.encode_prompt (max_sequence_length=256)")
    # Sana: Gemma-2 read with its mask, the instruction before the prompt, the last 299 rows and the BOS row kept.
    sana = sigma.replace(name="sana", t5=GEMMA2_2B, instruction=SANA_INSTRUCTION, pipeline="SanaPipeline",
                         hub_repo="Efficient-Large-Model/Sana_1600M_1024px_diffusers",
                         source="diffusers SanaPipeline.encode_prompt (max_sequence_length=300, its __call__'s "
                                "complex_human_instruction, clean_caption=False)")
    return [sd3, flux, schnell, sigma, alpha, plain, chroma, aura, sana]


def _tiny_recipe(spec: EncoderSpec, towers: tuple[TowerSpec, ...]) -> EncoderSpec:
    """A T5 recipe's tiny twin: the tiny CLIP towers given, a tiny T5, the same recipe fields."""
    assert spec.t5 is not None
    return spec.replace(name=f"tiny-{spec.name}", towers=towers, t5=_tiny_t5(spec.t5), hub_repo=None)


def _tiny(tower: TowerSpec, width: int) -> TowerSpec:
    # Same semantics, toy size: 4 blocks so that penultimate != last, the real vocabulary so
    # that token ids are real.
    proj = None if tower.projection_dim is None else width
    return tower.replace(name=f"tiny-{tower.name}", width=width, layers=4, heads=4, mlp_width=2 * width,
                         projection_dim=proj)


def _specs() -> list[EncoderSpec]:
    sd15 = EncoderSpec(name="clip-vit-l-14", towers=(CLIP_L,), pooled_towers=(0,), null="empty",
                       hub_repo="stable-diffusion-v1-5/stable-diffusion-v1-5",
                       source="diffusers StableDiffusionPipeline / ldm FrozenCLIPEmbedder")
    sd2 = EncoderSpec(name="openclip-vit-h-14", towers=(OPENCLIP_H,), pooled_towers=(0,), null="empty",
                      hub_repo="stabilityai/stable-diffusion-2-1",
                      source="diffusers StableDiffusionPipeline (SD 2.x) / ldm FrozenOpenCLIPEmbedder")
    bigg = EncoderSpec(name="openclip-vit-bigg-14", towers=(OPENCLIP_BIGG,), pooled_towers=(0,), null="empty",
                       hub_repo="stabilityai/stable-diffusion-xl-base-1.0",
                       source="diffusers StableDiffusionXLImg2ImgPipeline (refiner) / sgm FrozenOpenCLIPEmbedder2")
    sdxl = EncoderSpec(name="sdxl", towers=(SDXL_CLIP_L, OPENCLIP_BIGG), pooled_towers=(1,), null="zeros",
                       hub_repo="stabilityai/stable-diffusion-xl-base-1.0",
                       source="diffusers StableDiffusionXLPipeline / sgm GeneralConditioner")
    sd3 = EncoderSpec(name="sd3-clip", towers=(SD3_CLIP_L, SD3_CLIP_G), pooled_towers=(0, 1), null="empty",
                      hub_repo="stabilityai/stable-diffusion-3-medium-diffusers",
                      source="diffusers StableDiffusion3Pipeline, the CLIP half (before T5 is concatenated)")
    # Flux reads only CLIP-L's pooler_output; the sequence (its last hidden state) is unused there.
    flux = sd15.replace(name="flux-clip", hub_repo="black-forest-labs/FLUX.1-dev",
                        source="diffusers FluxPipeline._get_clip_prompt_embeds (pooled_projections)")
    openclip_l = EncoderSpec(name="openclip-vit-l-14", towers=(OPENCLIP_L,), pooled_towers=(0,), null="empty",
                             hub_repo="laion/CLIP-ViT-L-14-laion2B-s32B-b82K",
                             source="open_clip ViT-L-14 laion2b_s32b_b82k, encode_text")
    tiny_l, tiny_h, tiny_g = _tiny(CLIP_L, 32), _tiny(OPENCLIP_H, 40), _tiny(OPENCLIP_BIGG, 48)
    tiny = [
        sd15.replace(name="tiny-clip-vit-l-14", towers=(tiny_l,), hub_repo=None),
        sd2.replace(name="tiny-openclip-vit-h-14", towers=(tiny_h,), hub_repo=None),
        bigg.replace(name="tiny-openclip-vit-bigg-14", towers=(tiny_g,), hub_repo=None),
        sdxl.replace(name="tiny-sdxl", hub_repo=None,
                     towers=(_tiny(SDXL_CLIP_L, 32).replace(name="tiny-clip-vit-l-14"), tiny_g)),
        sd3.replace(name="tiny-sd3-clip", hub_repo=None,
                    towers=(_tiny(SD3_CLIP_L, 32).replace(name="tiny-clip-vit-l-14"), _tiny(SD3_CLIP_G, 48))),
        flux.replace(name="tiny-flux-clip", towers=(tiny_l,), hub_repo=None),
        openclip_l.replace(name="tiny-openclip-vit-l-14", towers=(_tiny(OPENCLIP_L, 32),), hub_repo=None),
    ]
    recipes = _t5_specs(sd3, flux)
    tiny_clip = {"sd3-clip": tiny[4].towers, "flux-clip": tiny[5].towers}
    tiny += [_tiny_recipe(r, tiny_clip[{"sd3": "sd3-clip"}.get(r.name, "flux-clip")] if r.towers else ())
             for r in recipes]
    return [sd15, sd2, bigg, sdxl, sd3, flux, openclip_l, *recipes, *tiny]


ALIASES: dict[str, str] = {
    "sd15": "clip-vit-l-14", "sd1": "clip-vit-l-14",
    "sd2": "openclip-vit-h-14", "sd21": "openclip-vit-h-14",
    "sdxl-refiner": "openclip-vit-bigg-14",
    "tiny-sd15": "tiny-clip-vit-l-14", "tiny-sd2": "tiny-openclip-vit-h-14",
    "tiny-sdxl-refiner": "tiny-openclip-vit-bigg-14",
    "sd3.5": "sd3", "flux-dev": "flux", "tiny-sd3.5": "tiny-sd3", "tiny-flux-dev": "tiny-flux",
}


OPEN_CLIP_PREFIX = "open_clip:"


def list_encoders() -> list[str]:
    """Registered names and aliases, sorted (``open_clip:MODEL`` names are not listed: see
    ``clipcond list --open-clip``)."""
    return sorted([*REGISTRY, *ALIASES])


def register_encoder(spec: EncoderSpec, *, aliases: tuple[str, ...] = (), replace: bool = False) -> EncoderSpec:
    """Make ``spec`` (and ``aliases``) a name for ``get_spec``, ``from_pretrained`` and the CLI.

    A lab's own conditioner: ``register_encoder(get_spec("sd15").replace(name="ours", clip_skip=1))``.
    Registering over an existing name or alias needs ``replace=True``.
    """
    if not isinstance(spec, EncoderSpec):
        raise TypeError(f"register_encoder takes an EncoderSpec, got {type(spec).__name__}")
    names = [spec.name.lower(), *(a.lower() for a in aliases)]
    if spec.name.lower().startswith(OPEN_CLIP_PREFIX) or spec.name.lower().endswith(".json"):
        raise SpecError(f"encoder name {spec.name!r} is reserved ({OPEN_CLIP_PREFIX}MODEL and *.json are read, "
                        f"not looked up)")
    taken = [n for n in names if (n in REGISTRY or n in ALIASES) and lookup_spec(n) != spec]
    if taken and not replace:
        raise SpecError(f"encoder name(s) {taken} already registered; pass replace=True to override")
    REGISTRY[names[0]] = spec
    for alias in names[1:]:
        ALIASES[alias] = names[0]
    return spec


def lookup_spec(name: str | os.PathLike[str] | EncoderSpec) -> EncoderSpec:
    """The spec for ``name``: a registered name or alias, or a spec JSON file; a spec passes through unchanged.

    ``open_clip:MODEL`` names need open_clip's configs: ``clipcond.get_spec`` (clipcond/encoders/names.py)
    reads those too.
    """
    if isinstance(name, EncoderSpec):
        return name
    if isinstance(name, os.PathLike) or (isinstance(name, str) and name.lower().endswith(".json")):
        return load_spec_file(name)
    if not isinstance(name, str):
        raise TypeError(f"encoder name must be str or EncoderSpec, got {type(name).__name__}")
    key = ALIASES.get(name.lower(), name.lower())
    if key not in REGISTRY:
        raise KeyError(f"unknown encoder {name!r}; registered: {', '.join(list_encoders())}, "
                       f"{OPEN_CLIP_PREFIX}MODEL, or a spec .json file")
    return REGISTRY[key]


REGISTRY: dict[str, EncoderSpec] = {spec.name: spec for spec in _specs()}
