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

POOLED_CHOICES: tuple[str, ...] = typing.get_args(Pooled)
NULL_CHOICES: tuple[str, ...] = typing.get_args(NullMode)
LONG_PROMPT_CHOICES: tuple[str, ...] = typing.get_args(LongPrompts)
# Every Literal field of the specs, checked in __post_init__ (a typo is an error, not a silent default).
_TOWER_CHOICES: dict[str, tuple[object, ...]] = {
    "activation": typing.get_args(Activation), "tokenizer": typing.get_args(TokenizerKind),
    "family": typing.get_args(Family), "pooled": (*POOLED_CHOICES, None),
}
_ENCODER_CHOICES: dict[str, tuple[object, ...]] = {"null": NULL_CHOICES, "long_prompts": LONG_PROMPT_CHOICES}
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

    def __post_init__(self) -> None:
        def fail(field: str, why: str) -> SpecError:
            return SpecError(f"encoder spec {self.name!r}: {field} {why}")

        if not self.towers or not all(isinstance(t, TowerSpec) for t in self.towers):
            raise fail("towers", f"must be a non-empty tuple of TowerSpec, got {self.towers!r}")
        if not self.pooled_towers or any(not 0 <= i < len(self.towers) for i in self.pooled_towers):
            raise fail("pooled_towers", f"must index towers (0..{len(self.towers) - 1}), got {self.pooled_towers}")
        for i in self.pooled_towers:
            if self.towers[i].pooled is None:
                raise fail("pooled_towers", f"names tower {i} ({self.towers[i].name!r}), which has pooled=None")
        for field, choices in _ENCODER_CHOICES.items():
            if getattr(self, field) not in choices:
                raise fail(field, f"must be one of {choices}, got {getattr(self, field)!r}")
        shortest = min(t.context_length for t in self.towers)
        if not 2 <= self.max_length <= shortest:
            raise fail("max_length", f"must be in [2, {shortest}] (the position embeddings), got {self.max_length}")

    @property
    def sequence_dim(self) -> int:
        return sum(t.width for t in self.towers)

    @property
    def pooled_dim(self) -> int:
        return sum(self.towers[i].pooled_dim for i in self.pooled_towers)

    def semantics(self) -> dict[str, object]:
        """The fields that change outputs: ``source`` and ``hub_repo`` only describe (fingerprints)."""
        fields = self.to_dict()
        del fields["source"], fields["hub_repo"]
        return fields

    def to_dict(self) -> dict[str, object]:
        """Plain JSON data (tuples as lists): ``spec_from_dict`` reads it back equal."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

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
    return [sd15, sd2, bigg, sdxl, sd3, flux, openclip_l, *tiny]


ALIASES: dict[str, str] = {
    "sd15": "clip-vit-l-14", "sd1": "clip-vit-l-14",
    "sd2": "openclip-vit-h-14", "sd21": "openclip-vit-h-14",
    "sdxl-refiner": "openclip-vit-bigg-14",
    "tiny-sd15": "tiny-clip-vit-l-14", "tiny-sd2": "tiny-openclip-vit-h-14",
    "tiny-sdxl-refiner": "tiny-openclip-vit-bigg-14",
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
