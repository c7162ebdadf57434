"""Train a PixArt-Sigma transformer from a precomputed T5 ``EmbeddingStore`` read by 2 DataLoader workers.

The conditioning part of a PixArt-Sigma training step (PixArt-sigma's ``train_scripts``, diffusers'
``train_text_to_image`` pattern), with clipcond as the T5 text encoder:

1. ``precompute`` encodes the captions once with the ``pixart-sigma`` recipe (``PixArtSigmaPipeline.encode_prompt``:
   T5-XXL at 300 tokens with its attention mask) into a store folder. The store holds only the T5 rows each
   caption's mask keeps (its tokens and EOS: ~20 of 300 rows for a LAION-like caption), so T5-XXL (9.5 GB in fp16)
   never sits beside the transformer and the store is ~15x smaller than padded rows;
2. your latents dataset (``Latents``: a VAE latent per row) and the store are read together by
   ``JoinedLoader(latents, store)``: each of the ``num_workers=2`` DataLoader workers loads a batch's latents and
   fetches its store rows in one checked copy, padded to the batch's longest caption (``L' <= 300``) with the mask
   ``[B, L']``, into shared memory it reuses (nothing made or mapped a batch: docs/store.md);
   ``store.collate(drop_prob=0.1, seed=0)`` replaces rows by the stored null (``""`` encoded, with its mask: what the
   pipeline uses as "no negative prompt") for classifier-free guidance;
3. ``store.conditioning(batch).pipeline_kwargs()`` names the tensors as ``PixArtSigmaPipeline.__call__`` does:
   ``prompt_embeds [B, L', 4096]`` and ``prompt_attention_mask [B, L']``, which the pipeline hands to its
   transformer as ``encoder_hidden_states`` and ``encoder_attention_mask``; so does this training step;
4. the loss is the standard DDPM epsilon MSE. PixArt's transformer predicts ``2 x 4`` channels (learned sigma,
   ``out_channels`` 8): the first 4 are the noise, as the pipeline takes them (``noise_pred.chunk(2, dim=1)[0]``);
   PixArt's own training adds a VLB term on the other 4, which this smoke test leaves out.

The latents are fixed random stand-ins unless ``--latents`` is given, so the printed loss must fall: a smoke test
of the wiring, not a recipe.

    python examples/train_pixart.py --tiny    # tiny-pixart-sigma (T5 width 96), a tiny PixArt transformer, CPU

``--tiny`` needs the real T5 tokenizer, which no tiny spec carries: ``--t5-tokenizer PATH``, else it is taken from
PyPI's ``diffsynth==1.1.9`` wheel (downloaded once into ~/.cache/clipcond-test, as the tests do).

Real weights (a local pipeline folder or hub id; ``transformer/``, ``scheduler/``, ``text_encoder/`` and
``tokenizer/`` are read; the 0.6B transformer in float32 with AdamW needs about 10 GB plus activations):

    python examples/train_pixart.py --pretrained PixArt-alpha/PixArt-Sigma-XL-2-1024-MS \\
        --captions my_captions.jsonl --latents my_latents.pt --store embeddings/ \\
        --device cuda --dtype bfloat16 --lr 2e-5

``--captions``: JSON lines ``{"caption": ...}``, one per image. ``--latents``: ``torch.save`` of a float tensor
``[N, 4, h, w]``, row r the image of caption line r, made once with the pipeline's VAE as
``vae.encode(images).latent_dist.sample() * vae.config.scaling_factor`` (1024 px images: ``[N, 4, 128, 128]``; one
size for all, or batches bucketed by aspect ratio). ``--store`` is precomputed once (the same as ``clipcond
precompute --encoder pixart-sigma --weights PIPELINE --dtype bfloat16 --input my_captions.jsonl --out embeddings/``)
and reused on later runs.
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
from torch.utils.data import Dataset, get_worker_info

from clipcond import EmbeddingStore, TextConditioner
from clipcond.precompute.job import PrecomputeJob, precompute
from clipcond.store.join import JoinedLoader

if TYPE_CHECKING:
    from diffusers import DDPMScheduler, PixArtTransformer2DModel

# Demo captions of different lengths (a batch is padded to its longest), one repeated (encoded and stored once).
DEMO = ["a photo of a cat", "a red bicycle leaning on a wall", "an astronaut riding a horse on mars, 8k",
        "a photo of a cat", "a bowl of soup", "a lighthouse at dusk, waves crashing on the rocks below, long exposure",
        "a portrait of an old man with a white beard, oil painting, dramatic light, museum quality", "a running dog"]


def demo_captions(folder: Path) -> Path:
    path = folder / "captions.jsonl"
    path.write_text("".join(json.dumps({"caption": c}) + "\n" for c in DEMO))
    return path


def build_store(args: argparse.Namespace, captions: Path, out: Path) -> EmbeddingStore:
    """Encode the captions once (resumes or reuses ``out``); T5 is freed when this returns."""
    dtype = getattr(torch, args.dtype)
    if args.tiny:
        import _tiny  # examples/_tiny.py

        tokenizer = args.t5_tokenizer or _tiny.t5_tokenizer()  # the real T5 vocabulary: real token ids
        tc = TextConditioner.from_pretrained("tiny-pixart-sigma", tokenizer=tokenizer, device=args.device,
                                             dtype=dtype)  # seeded random T5 of width 96
    else:
        tc = TextConditioner.from_pretrained("pixart-sigma", weights=args.pretrained, tokenizer=args.t5_tokenizer,
                                             device=args.device, dtype=dtype)
    precompute(tc, PrecomputeJob(input=captions, out=out, column="caption", progress=not args.tiny))
    return EmbeddingStore(out)


def load_transformer(args: argparse.Namespace, store: EmbeddingStore) -> tuple[PixArtTransformer2DModel,
                                                                               DDPMScheduler]:
    from diffusers import DDPMScheduler, PixArtTransformer2DModel

    if args.tiny:
        import _tiny

        transformer = _tiny.tiny_pixart_transformer(store.spec.sequence_dim)  # caption_channels = T5 width (96)
        # PixArt's training noise schedule (its scheduler/ folder: linear betas 1e-4 to 0.02, 1000 steps).
        scheduler = DDPMScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="linear")
    else:
        transformer = PixArtTransformer2DModel.from_pretrained(args.pretrained, subfolder="transformer")
        scheduler = DDPMScheduler.from_pretrained(args.pretrained, subfolder="scheduler")  # its betas, in DDPM
    # A store of another encoder would fail deep inside the caption projection; say so here instead.
    if transformer.config.caption_channels != store.spec.sequence_dim:
        raise SystemExit(f"store {store.path} holds {store.spec.name} (D {store.spec.sequence_dim}); the transformer "
                         f"wants caption_channels {transformer.config.caption_channels}: wrong encoder for it")
    return transformer.to(args.device).train(), scheduler


class Latents(Dataset):
    """Your image dataset: row r's VAE latent (and, to show who loaded it, the DataLoader worker's id)."""

    def __init__(self, latents: torch.Tensor) -> None:
        self.latents = latents  # [N, 4, h, w]

    def __len__(self) -> int:
        return len(self.latents)

    def __getitem__(self, r: int) -> dict[str, torch.Tensor | int]:
        info = get_worker_info()
        return {"latent": self.latents[r], "worker": -1 if info is None else info.id}  # [4, h, w], int


def load_latents(args: argparse.Namespace, store: EmbeddingStore, transformer: PixArtTransformer2DModel) -> Latents:
    if args.latents is not None:
        latents = torch.load(args.latents, map_location="cpu", weights_only=True)  # [N, 4, h, w]
    else:  # stand-ins for the VAE latents at the transformer's native size (128x128 for 1024 px)
        side = transformer.config.sample_size
        latents = torch.randn((len(store), transformer.config.in_channels, side, side),
                              generator=torch.Generator().manual_seed(args.seed))
    if latents.ndim != 4 or len(latents) != len(store) or latents.shape[1] != transformer.config.in_channels:
        raise SystemExit(f"--latents must be [N, {transformer.config.in_channels}, h, w] with N = {len(store)} "
                         f"(one per caption of the store), got {list(latents.shape)}")
    return Latents(latents)


def diffusion_loss(transformer: PixArtTransformer2DModel, scheduler: DDPMScheduler, x0: torch.Tensor,
                   kwargs: dict[str, torch.Tensor], g: torch.Generator) -> torch.Tensor:
    """Noise ``x0`` to random timesteps, predict the noise, MSE: the standard denoising loss."""
    noise = torch.randn(x0.shape, generator=g, device=x0.device)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (len(x0),), generator=g, device=x0.device)
    pred = transformer(scheduler.add_noise(x0, noise, t),
                       encoder_hidden_states=kwargs["prompt_embeds"],  # [B, L', D]
                       encoder_attention_mask=kwargs["prompt_attention_mask"],  # [B, L'] 1 = attend
                       timestep=t, added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
    if transformer.config.out_channels // 2 == x0.shape[1]:  # learned sigma: [noise, variance], as the pipeline
        pred = pred.chunk(2, dim=1)[0]
    target = noise if scheduler.config.prediction_type == "epsilon" else scheduler.get_velocity(x0, noise, t)
    return F.mse_loss(pred.float(), target.float())


def train(args: argparse.Namespace, store: EmbeddingStore) -> list[float]:
    transformer, scheduler = load_transformer(args, store)
    device = torch.device(args.device)
    g = torch.Generator(device).manual_seed(args.seed)  # noise and timesteps: reproducible
    collate = store.collate(drop_prob=args.drop_prob, seed=args.seed)  # rows -> the stored null, per epoch
    # Row r: your latent + the store's row r (checked), both fetched by the workers; the collate runs here.
    loader = JoinedLoader(load_latents(args, store, transformer), store, batch_size=args.batch_size, shuffle=True,
                          num_workers=args.workers, collate=collate,
                          generator=torch.Generator().manual_seed(args.seed))
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=args.lr)
    max_length = store.spec.t5_max_length  # 300: what a padded row would hold
    losses, epoch = [], 0
    while len(losses) < args.steps:
        collate.set_epoch(epoch)  # a new dropout draw every epoch, the same on every rerun
        workers = set()
        for batch in loader:
            # The store's dtype (bf16 for real runs) to the transformer's: explicit, never silent; the mask stays int.
            c = store.conditioning(batch).to(device, transformer.dtype)
            kwargs = c.pipeline_kwargs()  # prompt_embeds [B, L', D], prompt_attention_mask [B, L']
            embeds, mask = kwargs["prompt_embeds"], kwargs["prompt_attention_mask"]
            if not losses:
                print(f"first batch: prompt_embeds {list(embeds.shape)} prompt_attention_mask {list(mask.shape)} "
                      f"(L' = its longest caption, of {max_length}), kept rows {mask.sum(1).tolist()}, "
                      f"from DataLoader worker {int(batch['worker'][0])} of {args.workers}")
            loss = diffusion_loss(transformer, scheduler, batch["latent"].to(device), kwargs, g)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            workers.update(batch["worker"].tolist())
            print(f"step {len(losses) - 1:3d}  epoch {epoch}  loss {losses[-1]:.4f}  "
                  f"dropped {int(batch['dropped'].sum())}/{len(embeds)}  L' {embeds.shape[1]}")
            if len(losses) == args.steps:
                break
        if epoch == 0:
            print(f"epoch 0: batches from DataLoader workers {sorted(workers)} (num_workers={args.workers})")
        epoch += 1
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny-pixart-sigma and a tiny PixArt transformer on CPU")
    parser.add_argument("--pretrained", default="PixArt-alpha/PixArt-Sigma-XL-2-1024-MS",
                        help="a PixArt-Sigma diffusers pipeline folder or hub id (ignored with --tiny)")
    parser.add_argument("--captions", type=Path, help="JSON lines with a caption each (default: 8 demo captions)")
    parser.add_argument("--latents", type=Path, help="torch.save'd VAE latents [N, 4, h, w] (default: random)")
    parser.add_argument("--store", type=Path, help="the embedding store folder (default: a temporary one)")
    parser.add_argument("--t5-tokenizer", help="a T5 tokenizer folder (default: the pipeline's; --tiny: PyPI's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                        help="T5's and the store's dtype (the transformer trains in float32)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    parser.add_argument("--lr", type=float, default=None, help="AdamW learning rate (tiny: 2e-3, real: 2e-5)")
    parser.add_argument("--drop-prob", type=float, default=0.1, help="caption dropout for CFG")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.lr = args.lr or (2e-3 if args.tiny else 2e-5)
    with tempfile.TemporaryDirectory(prefix="clipcond-pixart-") as tmp:
        captions = args.captions or demo_captions(Path(tmp))
        store = build_store(args, captions, args.store or Path(tmp) / "embeddings")
        print(f"{store!r}")
        losses = train(args, store)
    window = max(1, min(5, len(losses) // 4))  # per-step losses are noisy (random t): compare window means
    first, last = sum(losses[:window]) / window, sum(losses[-window:]) / window
    print(f"first loss {first:.4f}  last loss {last:.4f}  (means of the first and last {window} steps); "
          f"all finite: {all(map(math.isfinite, losses))}")


if __name__ == "__main__":
    main()
