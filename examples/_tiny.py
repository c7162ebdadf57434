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
