"""Named encoder specs: every hidden semantic of an SD text conditioner as an explicit field.

Pure data, no torch import, so that ``clipcond list`` is instant. The facts come from
diffusers' ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline.encode_prompt`` and
Stability's ldm/sgm conditioners (``FrozenCLIPEmbedder``, ``FrozenOpenCLIPEmbedder(2)``).
The registry is built on the last line of this module.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

Activation = Literal["quick_gelu", "gelu"]
TokenizerKind = Literal["hf", "open_clip"]
# Where the pooled vector comes from, always read at the first EOS position:
#   "final_eos"    last block -> final LayerNorm -> EOS row (HF CLIPTextModel.pooler_output)
#   "sequence_eos" EOS row of the returned sequence (diffusers' pooler_output of its 23-layer SD2 encoder)
#   "projected"    "final_eos" @ text_projection (HF text_embeds, open_clip encode_text)
Pooled = Literal["final_eos", "sequence_eos", "projected"]
NullMode = Literal["empty", "zeros"]
LongPrompts = Literal["truncate", "chunk"]

POOLED_CHOICES: tuple[str, ...] = ("final_eos", "sequence_eos", "projected")
NULL_CHOICES: tuple[str, ...] = ("empty", "zeros")
LONG_PROMPT_CHOICES: tuple[str, ...] = ("truncate", "chunk")

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
    # Tokenize as the conditioner that trained the UNet did (see clipcond/tokenizer.py).
    tokenizer: TokenizerKind
    # No default on purpose: SD1 pads with EOS (49407), OpenCLIP towers with 0, and the
    # UNet was trained on whichever its conditioner used.
    pad_id: int
    # -1 last block, -2 penultimate, ... of the reference tower (HF hidden_states[-2] == -2).
    hidden_layer: int
    final_norm: bool  # apply the final LayerNorm to the returned sequence
    pooled: Pooled | None  # None: this tower contributes no pooled vector
    # diffusers' SD2 text_encoder folders store only the first 23 of ViT-H's 24 blocks (the
    # pipeline reads the penultimate layer), so such a folder's last block is our -2.
    hf_dropped_layers: int = 0
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
        if self.pooled is not None and self.pooled not in POOLED_CHOICES:
            raise fail("pooled", f"must be one of {POOLED_CHOICES} or None, got {self.pooled!r}")
        if self.pooled == "projected" and self.projection_dim is None:
            raise fail("pooled", "is 'projected' but the tower has no projection_dim")
        if not 0 <= self.pad_id < self.vocab_size:
            raise fail("pad_id", f"must be a token id in [0, {self.vocab_size}), got {self.pad_id}")
        if self.tokenizer not in ("hf", "open_clip"):
            raise fail("tokenizer", f"must be 'hf' or 'open_clip', got {self.tokenizer!r}")

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
class EncoderSpec:
    """A conditioner: one or two towers whose sequences are concatenated along features."""

    name: str
    towers: tuple[TowerSpec, ...]
    pooled_tower: int  # index of the tower whose pooled vector is returned (SDXL: bigG)
    null: NullMode  # "empty": encode "" ; "zeros": all-zero tensors (SDXL force_zeros_for_empty_prompt)
    max_length: int = 77
    # Beyond max_length: "truncate" (diffusers, with a warning) or "chunk": 75-token windows, each
    # framed BOS ... EOS, concatenated to [B, 77 * k, D] (A1111, ComfyUI, compel); opt-in.
    long_prompts: LongPrompts = "truncate"
    hub_repo: str | None = None  # default weights: a diffusers pipeline repo on the hub
    source: str = ""  # where these facts come from, for `clipcond list`

    def __post_init__(self) -> None:
        if not self.towers:
            raise SpecError(f"encoder spec {self.name!r}: towers must not be empty")
        if not 0 <= self.pooled_tower < len(self.towers):
            raise SpecError(f"encoder spec {self.name!r}: pooled_tower must index towers "
                            f"(0..{len(self.towers) - 1}), got {self.pooled_tower}")
        if self.towers[self.pooled_tower].pooled is None:
            raise SpecError(f"encoder spec {self.name!r}: pooled_tower {self.pooled_tower} has pooled=None")
        if self.null not in NULL_CHOICES:
            raise SpecError(f"encoder spec {self.name!r}: null must be one of {NULL_CHOICES}, got {self.null!r}")
        if self.long_prompts not in LONG_PROMPT_CHOICES:
            raise SpecError(f"encoder spec {self.name!r}: long_prompts must be one of {LONG_PROMPT_CHOICES}, "
                            f"got {self.long_prompts!r}")
        shortest = min(t.context_length for t in self.towers)
        if not 2 <= self.max_length <= shortest:
            raise SpecError(f"encoder spec {self.name!r}: max_length must be in [2, {shortest}] "
                            f"(the position embeddings), got {self.max_length}")

    @property
    def sequence_dim(self) -> int:
        return sum(t.width for t in self.towers)

    def semantics(self) -> dict[str, object]:
        """The fields that change outputs: ``source`` and ``hub_repo`` only describe (fingerprints)."""
        fields = dataclasses.asdict(self)
        del fields["source"], fields["hub_repo"]
        return fields

    @property
    def pooled_dim(self) -> int:
        return self.towers[self.pooled_tower].pooled_dim

    def replace(
        self,
        *,
        clip_skip: int | None = None,
        hidden_layer: int | None = None,
        pooled: Pooled | None = None,
        pad_id: int | None = None,
        **changes: object,
    ) -> EncoderSpec:
        """A variant of this spec; tower-level overrides apply to every tower.

        ``clip_skip=k`` moves each tower k blocks earlier than this spec's layer, as diffusers'
        ``encode_prompt(clip_skip=k)`` does (k=1 is A1111/kohya "clip skip 2", ComfyUI -2).
        ``hidden_layer`` sets the layer absolutely (-1 last, -2 penultimate); ``pooled`` changes
        the pooled tower's source; ``pad_id`` the padding id of every tower.
        """
        if clip_skip is not None and hidden_layer is not None:
            raise SpecError(f"encoder spec {self.name!r}: give clip_skip or hidden_layer, not both")
        if clip_skip is not None and clip_skip < 0:
            raise SpecError(f"encoder spec {self.name!r}: clip_skip must be >= 0, got {clip_skip}")
        towers = []
        for i, tower in enumerate(changes.pop("towers", self.towers)):
            tower_changes: dict[str, object] = {}
            if clip_skip is not None:
                tower_changes["hidden_layer"] = tower.hidden_layer - clip_skip
            if hidden_layer is not None:
                tower_changes["hidden_layer"] = hidden_layer
            if pad_id is not None:
                tower_changes["pad_id"] = pad_id
            if pooled is not None and i == self.pooled_tower:
                tower_changes["pooled"] = pooled
            towers.append(tower.replace(**tower_changes) if tower_changes else tower)
        fields = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - fields)
        if unknown:
            raise SpecError(f"encoder spec {self.name!r}: unknown override(s) {unknown}; "
                            f"known: {sorted(fields | {'clip_skip', 'hidden_layer', 'pooled', 'pad_id'})}")
        return dataclasses.replace(self, towers=tuple(towers), **changes)


# --- reference towers --------------------------------------------------------------------

# OpenAI CLIP ViT-L/14 text tower (openai/clip-vit-large-patch14 text_config), as SD 1.x's
# FrozenCLIPEmbedder uses it: HF CLIPTokenizer padding with <|endoftext|>, last layer + final LN.
CLIP_L = TowerSpec(
    name="clip-vit-l-14", width=768, layers=12, heads=12, mlp_width=3072, activation="quick_gelu",
    projection_dim=768, tokenizer="hf", pad_id=EOS_ID, hidden_layer=-1, final_norm=True, pooled="final_eos",
)

# OpenCLIP ViT-H/14 (laion2b_s32b_b79k) text tower as SD 2.x's FrozenOpenCLIPEmbedder uses it:
# open_clip.tokenize (pad 0), layer="penultimate", then ln_final. diffusers ships it truncated
# to 23 blocks, so its last_hidden_state is this sequence and its pooler_output its EOS row.
OPENCLIP_H = TowerSpec(
    name="openclip-vit-h-14", width=1024, layers=24, heads=16, mlp_width=4096, activation="gelu",
    projection_dim=1024, tokenizer="open_clip", pad_id=0, hidden_layer=-2, final_norm=True,
    pooled="sequence_eos", hf_dropped_layers=1,
)

# OpenCLIP ViT-bigG/14 (laion2b_s39b_b160k) text tower as SDXL's FrozenOpenCLIPEmbedder2 uses
# it: penultimate layer *without* ln_final for the sequence; pooled = ln_final(last)[eos] @ proj.
OPENCLIP_BIGG = TowerSpec(
    name="openclip-vit-bigg-14", width=1280, layers=32, heads=20, mlp_width=5120, activation="gelu",
    projection_dim=1280, tokenizer="open_clip", pad_id=0, hidden_layer=-2, final_norm=False,
    pooled="projected", hub_subfolder="text_encoder_2",
)

# SDXL's first tower: CLIP ViT-L/14 read at the penultimate layer without final LN, no pooled.
SDXL_CLIP_L = CLIP_L.replace(hidden_layer=-2, final_norm=False, pooled=None)


def _tiny(tower: TowerSpec, width: int) -> TowerSpec:
    # Same semantics, toy size: 4 blocks so that penultimate != last, the real vocabulary so
    # that token ids are real.
    proj = None if tower.projection_dim is None else width
    return tower.replace(name=f"tiny-{tower.name}", width=width, layers=4, heads=4, mlp_width=2 * width,
                         projection_dim=proj)


def _specs() -> list[EncoderSpec]:
    sd15 = EncoderSpec(name="clip-vit-l-14", towers=(CLIP_L,), pooled_tower=0, null="empty",
                       hub_repo="stable-diffusion-v1-5/stable-diffusion-v1-5",
                       source="diffusers StableDiffusionPipeline / ldm FrozenCLIPEmbedder")
    sd2 = EncoderSpec(name="openclip-vit-h-14", towers=(OPENCLIP_H,), pooled_tower=0, null="empty",
                      hub_repo="stabilityai/stable-diffusion-2-1",
                      source="diffusers StableDiffusionPipeline (SD 2.x) / ldm FrozenOpenCLIPEmbedder")
    bigg = EncoderSpec(name="openclip-vit-bigg-14", towers=(OPENCLIP_BIGG,), pooled_tower=0, null="empty",
                       hub_repo="stabilityai/stable-diffusion-xl-base-1.0",
                       source="diffusers StableDiffusionXLImg2ImgPipeline (refiner) / sgm FrozenOpenCLIPEmbedder2")
    sdxl = EncoderSpec(name="sdxl", towers=(SDXL_CLIP_L, OPENCLIP_BIGG), pooled_tower=1, null="zeros",
                       hub_repo="stabilityai/stable-diffusion-xl-base-1.0",
                       source="diffusers StableDiffusionXLPipeline / sgm GeneralConditioner")
    tiny_l, tiny_h, tiny_g = _tiny(CLIP_L, 32), _tiny(OPENCLIP_H, 40), _tiny(OPENCLIP_BIGG, 48)
    tiny = [
        sd15.replace(name="tiny-clip-vit-l-14", towers=(tiny_l,), hub_repo=None),
        sd2.replace(name="tiny-openclip-vit-h-14", towers=(tiny_h,), hub_repo=None),
        bigg.replace(name="tiny-openclip-vit-bigg-14", towers=(tiny_g,), hub_repo=None),
        sdxl.replace(name="tiny-sdxl", hub_repo=None,
                     towers=(_tiny(SDXL_CLIP_L, 32).replace(name="tiny-clip-vit-l-14"), tiny_g)),
    ]
    return [sd15, sd2, bigg, sdxl, *tiny]


ALIASES: dict[str, str] = {
    "sd15": "clip-vit-l-14", "sd1": "clip-vit-l-14",
    "sd2": "openclip-vit-h-14", "sd21": "openclip-vit-h-14",
    "sdxl-refiner": "openclip-vit-bigg-14",
    "tiny-sd15": "tiny-clip-vit-l-14", "tiny-sd2": "tiny-openclip-vit-h-14",
    "tiny-sdxl-refiner": "tiny-openclip-vit-bigg-14",
}


def list_encoders() -> list[str]:
    """Registered names and aliases, sorted."""
    return sorted([*REGISTRY, *ALIASES])


def get_spec(name: str | EncoderSpec) -> EncoderSpec:
    """The spec registered under ``name`` (or alias); a spec passes through unchanged."""
    if isinstance(name, EncoderSpec):
        return name
    if not isinstance(name, str):
        raise TypeError(f"encoder name must be str or EncoderSpec, got {type(name).__name__}")
    key = ALIASES.get(name.lower(), name.lower())
    if key not in REGISTRY:
        raise KeyError(f"unknown encoder {name!r}; registered: {', '.join(list_encoders())}")
    return REGISTRY[key]


REGISTRY: dict[str, EncoderSpec] = {spec.name: spec for spec in _specs()}
