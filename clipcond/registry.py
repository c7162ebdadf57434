"""The named encoders: the reference towers and recipes of SD 1.x, 2.x, SDXL, SD3, Flux, PixArt, Chroma,
AuraFlow and Sana as ``EncoderSpec`` values (clipcond/specs.py), their aliases, and the registry
``from_pretrained`` and the CLI look names up in.

Pure data, no torch import, so that ``clipcond list`` is instant. The facts come from diffusers' pipelines'
``encode_prompt`` and Stability's ldm/sgm conditioners (``FrozenCLIPEmbedder``, ``FrozenOpenCLIPEmbedder(2)``),
as each spec's comment says. The registry is built on the last line of this module.
"""

from __future__ import annotations

import os

from clipcond.specs import EOS_ID, EncoderSpec, SpecError, T5TowerSpec, TowerSpec, load_spec_file

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
    # Chroma: T5 with its mask at 512; the mask handed on keeps one pad after the EOS; the rows after it zeroed.
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
