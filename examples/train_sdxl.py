"""Train an SDXL UNet from a precomputed ``EmbeddingStore``, with caption dropout and micro-conditioning.

The conditioning part of diffusers' ``train_text_to_image_sdxl.py``, with clipcond:

1. ``precompute`` encodes the captions once (identical captions once) into a store folder: the
   text encoders (1.6 GB in fp16) never sit beside the UNet, and a killed run resumes;
2. ``EmbeddingStore(dir)`` is a memory-mapped ``Dataset``; ``store.collate(drop_prob=0.1, seed=...)``
   replaces rows by the stored ``null()`` (SDXL: zeros, as sgm drops and as the pipeline's
   ``force_zeros_for_empty_prompt`` guides) for classifier-free guidance, reproducibly per epoch;
3. the UNet gets ``encoder_hidden_states = sequence [B, 77, 2048]`` and ``added_cond_kwargs =
   {"text_embeds": pooled [B, 1280], "time_ids": [B, 6]}``, the time ids built per image by
   ``clipcond.sdxl_time_ids(original_size, crops_coords_top_left, target_size)`` from what the data
   pipeline recorded: the size before resizing, the random-crop offset, the training resolution;
4. your image dataset (here ``Latents``: a VAE latent and the image's sizes per row) and the store are
   read together by ``JoinedLoader(images, store)``: its ``--workers`` DataLoader workers fetch each batch's
   store rows in one checked copy beside your items, into shared memory they reuse, and the collate (caption
   dropout) runs in the main process (``by="id"`` joins on an id field instead of the row number).

The latents are fixed random stand-ins for ``vae.encode(x).latent_dist.sample() *
vae.config.scaling_factor``, so the printed loss must fall: a smoke test of the wiring.

    python examples/train_sdxl.py --tiny       # tiny-sdxl conditioner, tiny UNet, temp store, CPU, seconds

Real weights (a local pipeline folder or hub id; the UNet in float32 with AdamW needs over 40 GB):

    python examples/train_sdxl.py --pretrained stabilityai/stable-diffusion-xl-base-1.0 \\
        --captions my_captions.jsonl --store embeddings/ --device cuda --dtype float16 --lr 1e-5

``--captions``: JSON lines ``{"id": ..., "caption": ..., "original_size": [h, w], "crop_top_left":
[top, left]}``. ``--store`` is precomputed once (the same as ``clipcond precompute --encoder sdxl --weights PIPELINE
--dtype float16 --input my_captions.jsonl --id-column id --out embeddings/``) and reused on later runs.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

import clipcond
from clipcond import EmbeddingStore, JoinedLoader, TextConditioner
from clipcond.precompute.job import PrecomputeJob, precompute

if TYPE_CHECKING:
    from diffusers import DDPMScheduler, UNet2DConditionModel

# Demo rows: each image's original size and crop offset as a data pipeline records them.
DEMO = [("a photo of a cat", (1536, 1024), (0, 256)), ("a red bicycle leaning on a wall", (768, 1024), (0, 0)),
        ("an astronaut riding a horse", (2048, 2048), (512, 512)), ("a photo of a cat", (1024, 1024), (0, 0)),
        ("a bowl of soup", (900, 1200), (0, 88)), ("a lighthouse at dusk", (1024, 768), (128, 0)),
        ("a red bicycle leaning on a wall", (640, 640), (0, 0)), ("a bowl of soup", (1080, 1920), (0, 420))]


def demo_captions(folder: Path) -> Path:
    path = folder / "captions.jsonl"
    rows = [{"id": f"img{i:03d}", "caption": c, "original_size": s, "crop_top_left": k} for i, (c, s, k) in
            enumerate(DEMO)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def build_store(args: argparse.Namespace, captions: Path, out: Path) -> EmbeddingStore:
    """Encode the captions once (resumes or reuses ``out``); the conditioner is freed afterwards."""
    name, weights = ("tiny-sdxl", None) if args.tiny else ("sdxl", args.pretrained)
    tc = TextConditioner.from_pretrained(name, weights=weights, device=args.device, dtype=getattr(torch, args.dtype))
    precompute(tc, PrecomputeJob(input=captions, out=out, column="caption", id_column="id", progress=not args.tiny))
    return EmbeddingStore(out)


def load_unet(args: argparse.Namespace, store: EmbeddingStore) -> tuple[UNet2DConditionModel, DDPMScheduler]:
    from diffusers import DDPMScheduler, UNet2DConditionModel

    if args.tiny:
        import _tiny  # examples/_tiny.py

        unet = _tiny.tiny_unet(store.spec.sequence_dim, pooled_dim=store.spec.pooled_dim)
        scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")  # SDXL's
    else:
        unet = UNet2DConditionModel.from_pretrained(args.pretrained, subfolder="unet")
        scheduler = DDPMScheduler.from_pretrained(args.pretrained, subfolder="scheduler")
    # A store of another encoder would fail deep inside the UNet; say so here instead.
    expected = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
    if (unet.config.cross_attention_dim, expected) != (store.spec.sequence_dim, store.spec.pooled_dim):
        raise SystemExit(f"store {store.path} holds {store.spec.name} (D {store.spec.sequence_dim}, P "
                         f"{store.spec.pooled_dim}); the UNet wants D {unet.config.cross_attention_dim}, P {expected}")
    return unet.to(args.device).train(), scheduler


def diffusion_loss(unet: UNet2DConditionModel, scheduler: DDPMScheduler, x0: torch.Tensor, cond: clipcond.Conditioning,
                   g: torch.Generator, added: dict[str, torch.Tensor]) -> torch.Tensor:
    """Noise ``x0`` to random timesteps, predict the noise (or v), MSE: the standard denoising loss."""
    noise = torch.randn(x0.shape, generator=g, device=x0.device)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (len(x0),), generator=g, device=x0.device)
    pred = unet(scheduler.add_noise(x0, noise, t), t, encoder_hidden_states=cond.sequence,  # [B, 77, D]
                added_cond_kwargs=added).sample
    target = noise if scheduler.config.prediction_type == "epsilon" else scheduler.get_velocity(x0, noise, t)
    return F.mse_loss(pred.float(), target.float())


class Latents(Dataset):
    """Your image dataset: row r's VAE latent and what the data pipeline recorded about its image."""

    def __init__(self, latents: torch.Tensor, meta: list[dict]) -> None:
        self.latents, self.meta = latents, meta  # [N, C, h, w]; per row: original_size, crop_top_left

    def __len__(self) -> int:
        return len(self.latents)

    def __getitem__(self, r: int) -> dict[str, torch.Tensor]:
        return {"latent": self.latents[r],  # [C, h, w]
                "original_size": torch.tensor(self.meta[r]["original_size"]),  # [2] (h, w) before resizing
                "crop_top_left": torch.tensor(self.meta[r]["crop_top_left"])}  # [2] (top, left) of the crop


def train(args: argparse.Namespace, captions: Path, store: EmbeddingStore) -> list[float]:
    unet, scheduler = load_unet(args, store)
    device = torch.device(args.device)
    with open(captions, encoding="utf-8") as f:  # row r of the store is the r-th non-blank line, as precompute reads
        meta = [json.loads(line) for line in f if line.strip()]
    side = unet.config.sample_size  # latent side: 128 for SDXL (1024 px / 8)
    target_size = (side * 8, side * 8)  # the training resolution in pixels (VAE factor 8)
    g = torch.Generator(device).manual_seed(args.seed)
    latents = torch.randn((len(store), unet.config.in_channels, side, side),
                          generator=torch.Generator().manual_seed(args.seed))  # [N, C, h, w] on the CPU, as loaded
    collate = store.collate(drop_prob=args.drop_prob, seed=args.seed)  # rows -> the stored null, per epoch
    # Row r: your latent and sizes + the store's row r (checked), fetched by the workers; the collate runs here.
    loader = JoinedLoader(Latents(latents, meta), store, batch_size=args.batch_size, shuffle=True,
                          num_workers=args.workers, persistent_workers=args.workers > 0, collate=collate,
                          generator=torch.Generator().manual_seed(args.seed))
    optimizer = torch.optim.AdamW(unet.parameters(), lr=args.lr)
    losses, epoch = [], 0
    while len(losses) < args.steps:
        collate.set_epoch(epoch)  # a new dropout draw every epoch, the same on every rerun
        for batch in loader:
            rows = batch["row"]  # [B] input rows
            time_ids = clipcond.sdxl_time_ids(batch["original_size"], batch["crop_top_left"], target_size)  # [B, 6]
            # The store's dtype (fp16 for real runs) to the UNet's: explicit, never silent.
            cond = clipcond.Conditioning(batch["sequence"], batch["pooled"]).to(device, unet.dtype)
            loss = diffusion_loss(unet, scheduler, batch["latent"].to(device), cond, g,
                                  clipcond.added_cond_kwargs(cond, time_ids))  # text_embeds [B, P], time_ids
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            dropped = int(batch["dropped"].sum())
            print(f"step {len(losses) - 1:3d}  epoch {epoch}  loss {losses[-1]:.4f}  dropped {dropped}/{len(rows)}")
            if len(losses) == args.steps:
                break
        epoch += 1
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny-sdxl conditioner and tiny UNet on CPU")
    parser.add_argument("--pretrained", help="an SDXL diffusers pipeline folder or hub id")
    parser.add_argument("--captions", type=Path, help="JSON lines with id, caption, original_size, crop_top_left")
    parser.add_argument("--store", type=Path, help="the embedding store folder (default: a temporary one)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                        help="the conditioner's and store's dtype (the UNet trains in float32)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    parser.add_argument("--lr", type=float, default=None, help="AdamW learning rate (tiny: 2e-3, real: 1e-5)")
    parser.add_argument("--drop-prob", type=float, default=0.1, help="caption dropout for CFG")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not args.tiny and not args.pretrained:
        parser.error("give --tiny or --pretrained")
    args.lr = args.lr or (2e-3 if args.tiny else 1e-5)
    with tempfile.TemporaryDirectory(prefix="clipcond-sdxl-") as tmp:
        captions = args.captions or demo_captions(Path(tmp))
        store = build_store(args, captions, args.store or Path(tmp) / "embeddings")
        print(f"{store!r}")
        losses = train(args, captions, store)
    window = max(1, min(5, len(losses) // 4))  # per-step losses are noisy (random t): compare window means
    first, last = sum(losses[:window]) / window, sum(losses[-window:]) / window
    print(f"first loss {first:.4f}  last loss {last:.4f}  (means of the first and last {window} steps); "
          f"all finite: {all(map(math.isfinite, losses))}")


if __name__ == "__main__":
    main()
