"""Train an SD 1.5 UNet on live ``TextConditioner`` outputs, with classifier-free-guidance caption dropout.

The conditioning part of a diffusers text-to-image training step (``train_text_to_image.py``),
with clipcond as the frozen text encoder:

- ``tc.encode(captions, drop_prob=0.1, generator=g)`` replaces each row by ``tc.null()`` (``""``
  encoded, what the pipeline uses as "no negative prompt") with probability 0.1, so the UNet learns
  the unconditional branch that classifier-free guidance needs at inference; dropped rows are not
  encoded, and ``g`` makes the choice reproducible;
- ``.sequence`` ``[B, 77, 768]`` is the UNet's ``encoder_hidden_states`` (SD 1.5 needs no pooled);
- the conditioner is frozen and runs without autograd, so the loss trains only the UNet.

The batch is fixed (random latents standing in for ``vae.encode(x).latent_dist.sample() *
vae.config.scaling_factor`` of real images), so the printed loss must fall: a smoke test of the
wiring, not a recipe.

    python examples/train_sd15.py --tiny          # tiny-sd15 conditioner and a tiny UNet, CPU, seconds

Real weights (a local pipeline folder or a hub id; only ``unet/``, ``scheduler/`` and the text
encoder are read; the UNet in float32 with AdamW needs about 14 GB plus activations):

    python examples/train_sd15.py --pretrained stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --device cuda --dtype float16 --steps 20 --lr 1e-5
"""

from __future__ import annotations

import argparse
import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from clipcond import TextConditioner

if TYPE_CHECKING:
    from diffusers import DDPMScheduler, UNet2DConditionModel

CAPTIONS = ["a photo of a cat", "a red bicycle leaning on a wall", "an astronaut riding a horse", "a bowl of soup"]


def load(args: argparse.Namespace) -> tuple[TextConditioner, UNet2DConditionModel, DDPMScheduler]:
    from diffusers import DDPMScheduler, UNet2DConditionModel

    dtype = getattr(torch, args.dtype)
    if args.tiny:
        import _tiny  # examples/_tiny.py

        tc = TextConditioner.from_pretrained("tiny-sd15", device=args.device, dtype=dtype)  # seeded random
        unet = _tiny.tiny_unet(tc.sequence_dim)  # cross_attention_dim = tc.sequence_dim (32; SD 1.5: 768)
        # SD 1.5's training noise schedule (its scheduler/ folder).
        scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    else:
        tc = TextConditioner.from_pretrained("sd15", weights=args.pretrained, device=args.device, dtype=dtype)
        unet = UNet2DConditionModel.from_pretrained(args.pretrained, subfolder="unet")
        scheduler = DDPMScheduler.from_pretrained(args.pretrained, subfolder="scheduler")
    if unet.config.cross_attention_dim != tc.sequence_dim:
        raise SystemExit(f"UNet cross_attention_dim {unet.config.cross_attention_dim} != conditioner D "
                         f"{tc.sequence_dim}: wrong encoder name for this UNet")
    return tc, unet.to(args.device).train(), scheduler


def diffusion_loss(
    unet: UNet2DConditionModel, scheduler: DDPMScheduler, x0: torch.Tensor, sequence: torch.Tensor, g: torch.Generator
) -> torch.Tensor:
    """Noise ``x0`` to random timesteps, predict the noise (or v), MSE: the standard denoising loss."""
    noise = torch.randn(x0.shape, generator=g, device=x0.device)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (len(x0),), generator=g, device=x0.device)
    pred = unet(scheduler.add_noise(x0, noise, t), t, encoder_hidden_states=sequence).sample  # [B, 77, D] in
    target = noise if scheduler.config.prediction_type == "epsilon" else scheduler.get_velocity(x0, noise, t)
    return F.mse_loss(pred.float(), target.float())


def train(args: argparse.Namespace) -> list[float]:
    tc, unet, scheduler = load(args)
    device = torch.device(args.device)
    g = torch.Generator(device).manual_seed(args.seed)  # dropout, noise and timesteps: reproducible
    side = unet.config.sample_size  # latent side: 64 for SD 1.5 (512 px / 8)
    latents = torch.randn((len(CAPTIONS), unet.config.in_channels, side, side), generator=g, device=device)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=args.lr)
    losses = []
    for step in range(args.steps):
        cond = tc.encode(CAPTIONS, drop_prob=args.drop_prob, generator=g)  # rows -> tc.null() with p
        # The conditioner's dtype (fp16 on GPU) to the UNet's: explicit, never silent.
        loss = diffusion_loss(unet, scheduler, latents, cond.sequence.to(unet.dtype), g)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        print(f"step {step:3d}  loss {losses[-1]:.4f}")
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny-sd15 conditioner and tiny UNet on CPU")
    parser.add_argument("--pretrained", help="an SD 1.5 diffusers pipeline folder or hub id")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                        help="the conditioner's dtype (the UNet trains in float32)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--lr", type=float, default=None, help="AdamW learning rate (tiny: 2e-3, real: 1e-5)")
    parser.add_argument("--drop-prob", type=float, default=0.1, help="caption dropout for CFG")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not args.tiny and not args.pretrained:
        parser.error("give --tiny or --pretrained")
    args.lr = args.lr or (2e-3 if args.tiny else 1e-5)
    losses = train(args)
    window = max(1, min(5, len(losses) // 4))  # per-step losses are noisy (random t): compare window means
    first, last = sum(losses[:window]) / window, sum(losses[-window:]) / window
    print(f"first loss {first:.4f}  last loss {last:.4f}  (means of the first and last {window} steps); "
          f"all finite: {all(map(math.isfinite, losses))}")


if __name__ == "__main__":
    main()
