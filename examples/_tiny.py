"""Tiny stand-ins for the examples' ``--tiny`` mode: UNets and whole diffusers pipeline folders.

Nothing here is needed with real weights. The shapes follow the ``tiny-*`` specs of clipcond
(``tiny-sd15``: 32-wide CLIP-L; ``tiny-sdxl``: 32-wide CLIP-L + 48-wide bigG), and the pipeline
folders are written the way the SD repos publish theirs (``model_index.json``, ``unet/``,
``vae/``, ``scheduler/``, ``text_encoder*/``, ``tokenizer*/``), so the examples load them with
the same ``from_pretrained`` calls they use on ``stable-diffusion-v1-5`` or ``stable-diffusion-xl-base-1.0``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch

import clipcond
from clipcond.text.tokenizer import write_hf_tokenizer

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

Kind = Literal["sd15", "sdxl"]
TIME_EMBED_DIM = 8  # SDXL's addition_time_embed_dim is 256; 8 keeps the tiny UNet tiny


def tiny_unet(sequence_dim: int, *, pooled_dim: int | None = None, seed: int = 0) -> UNet2DConditionModel:
    """A 2-level ``UNet2DConditionModel``; with ``pooled_dim`` SDXL-style (``added_cond_kwargs``)."""
    from diffusers import UNet2DConditionModel

    xl = {} if pooled_dim is None else {
        "addition_embed_type": "text_time", "addition_time_embed_dim": TIME_EMBED_DIM,
        # 6 time ids (sdxl_time_ids) each embedded to addition_time_embed_dim, plus the pooled vector.
        "projection_class_embeddings_input_dim": 6 * TIME_EMBED_DIM + pooled_dim, "use_linear_projection": True}
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=sequence_dim, attention_head_dim=8, norm_num_groups=8, **xl,
    )


def tiny_vae(seed: int = 0) -> AutoencoderKL:
    """An ``AutoencoderKL`` with a scale factor of 2 (SD's is 8)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         norm_num_groups=8, sample_size=32)


def tiny_text_encoder(name: str, *, seed: int) -> CLIPTextModel | CLIPTextModelWithProjection:
    """A random transformers CLIP text model with the sizes of a tiny clipcond spec's towers."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tower = clipcond.get_spec(name).towers[-1]
    config = CLIPTextConfig(
        vocab_size=tower.vocab_size, hidden_size=tower.width, intermediate_size=tower.mlp_width,
        num_hidden_layers=tower.layers, num_attention_heads=tower.heads, max_position_embeddings=77,
        hidden_act=tower.activation, projection_dim=tower.projection_dim or tower.width,
        bos_token_id=0, eos_token_id=2, pad_token_id=1,  # as the published SD configs carry them
    )
    torch.manual_seed(seed)
    cls = CLIPTextModelWithProjection if tower.pooled == "projected" else CLIPTextModel
    return cls(config).eval()


def clip_tokenizer(folder: Path, pad_token: str) -> CLIPTokenizer:
    """The CLIP BPE as the SD repos ship it (pad ``<|endoftext|>``; SDXL's ``tokenizer_2`` pads with ``!``)."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(write_hf_tokenizer(folder, pad_token=pad_token))


def write_tiny_pipeline(kind: Kind, root: str | Path | None = None) -> Path:
    """A whole tiny diffusers pipeline folder (``sd15``: SD 1.5 layout, ``sdxl``: SDXL base layout)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    # No progress bars for 1 MB files: "Writing model shards", "Loading pipeline components".
    transformers_logging.disable_progress_bar()
    diffusers_logging.disable_progress_bar()
    root = Path(tempfile.mkdtemp(prefix="clipcond-tiny-") if root is None else root)
    folder = root / f"tiny-{kind}-pipeline"
    # SD's training schedule; Euler is SDXL's default sampler and deterministic (no noise with s_churn=0).
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    tok_dir = root / f"tokenizers-{kind}"
    if kind == "sd15":
        pipe = StableDiffusionPipeline(
            vae=tiny_vae(), text_encoder=tiny_text_encoder("tiny-sd15", seed=1),
            tokenizer=clip_tokenizer(tok_dir / "l", "<|endoftext|>"), unet=tiny_unet(32), scheduler=scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    elif kind == "sdxl":
        pipe = StableDiffusionXLPipeline(
            vae=tiny_vae(), text_encoder=tiny_text_encoder("tiny-sd15", seed=1),
            text_encoder_2=tiny_text_encoder("tiny-sdxl-refiner", seed=2),
            tokenizer=clip_tokenizer(tok_dir / "l", "<|endoftext|>"), tokenizer_2=clip_tokenizer(tok_dir / "g", "!"),
            unet=tiny_unet(32 + 48, pooled_dim=48), scheduler=scheduler, add_watermarker=False)
    else:
        raise ValueError(f"kind must be 'sd15' or 'sdxl', got {kind!r}")
    pipe.save_pretrained(folder)  # transformers 5 layout for the text encoders; clipcond reads both
    return folder


# --- PixArt-Sigma (examples/train_pixart.py) -----------------------------------------------------------------------
T5_WHEEL = "diffsynth==1.1.9"  # Apache-2.0; its wheel ships SD3's and Flux's T5TokenizerFast folders
T5_WHEEL_TOKENIZERS = {"sd3": "diffsynth/tokenizer_configs/stable_diffusion_3/tokenizer_3/",
                       "flux": "diffsynth/tokenizer_configs/flux/tokenizer_2/"}

if TYPE_CHECKING:
    from diffusers import PixArtTransformer2DModel


def t5_tokenizer() -> Path:
    """The real T5 tokenizer folder (SD3's ``tokenizer_3``: the T5 v1.1 vocabulary PixArt's ``tokenizer/`` holds too),
    which no tiny spec carries (``t5_tokenizers``)."""
    return t5_tokenizers()["sd3"]


def t5_tokenizers() -> dict[str, Path]:
    """{"sd3": tokenizer_3 folder, "flux": tokenizer_2 folder} of the real pipelines' T5 tokenizer, from PyPI's
    ``diffsynth==1.1.9`` wheel, fetched once with ``pip download --no-deps`` into ``$CLIPCOND_TEST_CACHE`` or
    ``~/.cache/clipcond-test`` and read with zipfile (never installed or imported); the tests and benches take it
    from here too (tests/t5_fixtures.py). ``SystemExit`` saying what to pass instead when pip cannot get it."""
    import os
    import shutil
    import subprocess
    import sys
    import zipfile

    root = Path(os.environ.get("CLIPCOND_TEST_CACHE") or Path.home() / ".cache" / "clipcond-test") / "diffsynth-1.1.9"
    out = {name: root / "tokenizers" / name for name in T5_WHEEL_TOKENIZERS}
    if all((folder / "tokenizer.json").is_file() for folder in out.values()):
        return out
    wheels = sorted(root.glob("diffsynth-1.1.9-*.whl"))
    if not wheels:
        root.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", T5_WHEEL, "-d", str(root)]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        wheels = sorted(root.glob("diffsynth-1.1.9-*.whl"))
        if result.returncode or not wheels:
            raise SystemExit(f"--tiny needs a T5 tokenizer: pip could not download PyPI's {T5_WHEEL} wheel that "
                             f"holds one ({result.stderr.strip()[-300:]}); pass --t5-tokenizer PATH to a T5 "
                             f"tokenizer folder (e.g. PixArt-Sigma-XL-2-1024-MS/tokenizer)")
    with zipfile.ZipFile(wheels[0]) as wheel:
        for name, prefix in T5_WHEEL_TOKENIZERS.items():
            tmp = out[name].with_name(out[name].name + f".tmp-{os.getpid()}")  # then renamed: never half a folder
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            for member in wheel.namelist():
                if member.startswith(prefix) and not member.endswith("/"):
                    (tmp / member[len(prefix):]).write_bytes(wheel.read(member))
            shutil.rmtree(out[name], ignore_errors=True)
            tmp.rename(out[name])
    return out


def tiny_pixart_transformer(caption_channels: int, *, seed: int = 0) -> PixArtTransformer2DModel:
    """A 2-block ``PixArtTransformer2DModel`` on 8x8 latents (PixArt-Sigma-1024: 28 blocks of width 1152 on 128x128),
    with PixArt's learned-sigma output (``out_channels`` 8 for 4 latent channels) and no micro-conditions, as
    Sigma's own config; ``caption_channels`` is the T5 width (tiny-pixart-sigma: 96; T5-XXL: 4096)."""
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed)
    return PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2,
        cross_attention_dim=32, sample_size=8, patch_size=2, caption_channels=caption_channels,
        use_additional_conditions=False, interpolation_scale=1,  # cross_attention_dim = heads x head dim, as PixArt
    )


# --- Flux.1 (examples/train_flux.py) -------------------------------------------------------------------------------
if TYPE_CHECKING:
    from diffusers import FluxTransformer2DModel


def tiny_flux_transformer(joint_attention_dim: int, pooled_projection_dim: int, *, guidance_embeds: bool = False,
                          seed: int = 0) -> FluxTransformer2DModel:
    """A 1 + 1 block ``FluxTransformer2DModel`` (FLUX.1: 19 double-stream and 38 single-stream blocks of 24 heads of
    128) on 4-channel latents packed in 2x2 patches (``in_channels`` 16; FLUX.1's 16-channel VAE latents: 64), 2 heads
    of 16 with rope axes (4, 6, 6) summing to the head dim as FLUX.1's (16, 56, 56) sum to 128. ``joint_attention_dim``
    is the T5 width (tiny-flux: 96; T5-XXL: 4096), ``pooled_projection_dim`` CLIP-L's pooled width (tiny: 32; 768);
    ``guidance_embeds`` as FLUX.1-dev (guidance-distilled), off as FLUX.1-schnell."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=joint_attention_dim, pooled_projection_dim=pooled_projection_dim,
        guidance_embeds=guidance_embeds, axes_dims_rope=(4, 6, 6),
    )
