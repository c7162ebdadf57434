"""Classifier-free guidance with ``tc.null()`` as the unconditional branch, in a diffusers pipeline.

Feeds a ``StableDiffusionPipeline`` (SD 1.5) or ``StableDiffusionXLPipeline`` (SDXL) with clipcond's
tensors, ``prompt_embeds=c.sequence, negative_prompt_embeds=tc.null(B).sequence`` (SDXL also
``pooled_prompt_embeds=c.pooled, negative_pooled_prompt_embeds=tc.null(B).pooled``), and shows that
the images equal the pipeline's own text path, ``pipe(prompt=..., negative_prompt=None)``, with the
same seed. ``null()`` is what that path uses for "no negative prompt": ``""`` encoded for SD 1.x/2.x,
zeros for SDXL (``force_zeros_for_empty_prompt``; note that SDXL's ``negative_prompt=""`` encodes
``""`` instead). Then the same guidance in a hand-written sampler, as a training codebase owns one:
one UNet call on ``[null; cond]`` rows, SDXL's ``added_cond_kwargs`` from ``clipcond.sdxl_time_ids``.

    python examples/cfg_inference.py --tiny     # sd15 and sdxl on tiny random weights, CPU, seconds

Real weights (a local pipeline folder or a hub id; the text encoders are read by both the pipeline,
for the comparison, and clipcond; in production load the pipeline with ``text_encoder=None``,
``tokenizer=None`` (and ``text_encoder_2=None``, ``tokenizer_2=None``) and keep only clipcond):

    python examples/cfg_inference.py --model sd15 --pretrained stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --device cuda --dtype float16 --size 512 --steps 30
    python examples/cfg_inference.py --model sdxl --pretrained stabilityai/stable-diffusion-xl-base-1.0 \\
        --device cuda --dtype float16 --size 1024 --steps 30

On real weights in float16 the two paths are equal up to kernel nondeterminism, not bit for bit.
"""

from __future__ import annotations

import argparse
import tempfile
from typing import TYPE_CHECKING

import torch

import clipcond
from clipcond import Conditioning, TextConditioner

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline


def load(kind: str, folder: str, device: str, dtype: torch.dtype) -> tuple[DiffusionPipeline, TextConditioner]:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if kind == "sdxl":
        pipe = StableDiffusionXLPipeline.from_pretrained(folder, torch_dtype=dtype, add_watermarker=False)
    else:
        pipe = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=dtype, safety_checker=None,
                                                       requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    # The name fixes the semantics (layer, norm, pad, pooled, null); the folder gives weights and sizes.
    tc = TextConditioner.from_pretrained(kind, weights=folder, device=device, dtype=dtype)
    return pipe.to(device), tc


def embeds(tc: TextConditioner, prompts: list[str], xl: bool) -> dict[str, torch.Tensor]:
    """The pipeline keyword arguments of clipcond's conditioning, ``null()`` as the negative."""
    c, n = tc(prompts), tc.null(len(prompts))
    kwargs = {"prompt_embeds": c.sequence, "negative_prompt_embeds": n.sequence}  # [B, 77, D]
    if xl:
        kwargs |= {"pooled_prompt_embeds": c.pooled, "negative_pooled_prompt_embeds": n.pooled}  # [B, P]
    return kwargs


@torch.no_grad()
def sample_latents(
    pipe: DiffusionPipeline, tc: TextConditioner, prompts: list[str], args: argparse.Namespace, xl: bool
) -> torch.Tensor:
    """CFG by hand: ``eps = eps(null) + s * (eps(cond) - eps(null))``, both from one UNet call."""
    unet, scheduler, device = pipe.unet, pipe.scheduler, tc.device
    cond = Conditioning.cat([tc.null(len(prompts)), tc(prompts)])  # [2B, 77, D]: unconditional rows first
    added = None
    if xl:  # text-to-image: original = target = the image size, no crop (diffusers' defaults)
        time_ids = clipcond.sdxl_time_ids((args.size, args.size), (0, 0), (args.size, args.size))  # [1, 6]
        added = clipcond.added_cond_kwargs(cond, time_ids)  # text_embeds [2B, P], time_ids [2B, 6]
    scheduler.set_timesteps(args.steps, device=device)
    side = args.size // pipe.vae_scale_factor
    generator = torch.Generator(device).manual_seed(args.seed)
    latents = torch.randn((len(prompts), unet.config.in_channels, side, side), generator=generator,
                          device=device, dtype=tc.dtype) * scheduler.init_noise_sigma  # [B, 4, h, w]
    for t in scheduler.timesteps:
        x = scheduler.scale_model_input(torch.cat([latents] * 2), t)  # [2B, 4, h, w]
        eps_null, eps_cond = unet(x, t, encoder_hidden_states=cond.sequence, added_cond_kwargs=added).sample.chunk(2)
        latents = scheduler.step(eps_null + args.guidance * (eps_cond - eps_null), t, latents).prev_sample
    return latents


def run(kind: str, folder: str, args: argparse.Namespace, dtype: torch.dtype) -> None:
    pipe, tc = load(kind, folder, args.device, dtype)
    xl = kind == "sdxl"
    prompts = ["a photo of a cat", "an astronaut riding a horse on mars"]

    def call(output_type: str = "pt", **inputs: object) -> torch.Tensor:
        generator = torch.Generator(args.device).manual_seed(args.seed)  # the same noise for every call
        return pipe(**inputs, num_inference_steps=args.steps, guidance_scale=args.guidance, height=args.size,
                    width=args.size, generator=generator, output_type=output_type).images

    text_path = call(prompt=prompts, negative_prompt=None)  # [B, 3, H, W] in [0, 1]
    ours = call(**embeds(tc, prompts, xl))
    other = call(**embeds(tc, ["a bowl of soup", "a red bicycle"], xl))
    diff = (ours.float() - text_path.float()).abs().max().item()
    print(f"{kind}: images {tuple(ours.shape)}, guidance {args.guidance}, {args.steps} steps")
    print(f"{kind}: max abs diff, clipcond prompt_embeds vs the pipeline's text path: {diff:.3e}")
    changed = (other.float() - ours.float()).abs().max().item()
    print(f"{kind}: max abs diff, other prompts (must be > 0): {changed:.3e}")
    reference = call(output_type="latent", **embeds(tc, prompts, xl))
    manual = sample_latents(pipe, tc, prompts, args, xl)
    print(f"{kind}: max abs diff, hand-written CFG sampler vs the pipeline's latents: "
          f"{(manual.float() - reference.float()).abs().max().item():.3e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="write tiny sd15 and sdxl pipelines and run both")
    parser.add_argument("--model", choices=["sd15", "sdxl"], help="which pipeline --pretrained holds")
    parser.add_argument("--pretrained", help="a diffusers pipeline folder or hub id")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--size", type=int, default=None, help="image side in pixels (tiny: 16)")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (tiny: 3)")
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    if args.tiny:
        import _tiny  # examples/_tiny.py: tiny pipeline folders in the published layout

        args.size, args.steps = args.size or 16, args.steps or 3
        with tempfile.TemporaryDirectory(prefix="clipcond-cfg-") as root:
            for kind in [args.model] if args.model else ["sd15", "sdxl"]:
                run(kind, str(_tiny.write_tiny_pipeline(kind, root)), args, dtype)
        return
    if not (args.model and args.pretrained):
        parser.error("give --tiny, or --model and --pretrained")
    args.size, args.steps = args.size or (1024 if args.model == "sdxl" else 512), args.steps or 30
    run(args.model, args.pretrained, args, dtype)


if __name__ == "__main__":
    main()
