"""Train a Flux.1 transformer from a precomputed T5 + CLIP-L ``EmbeddingStore`` read by 2 DataLoader workers.

The conditioning part of a Flux.1 fine-tuning step (diffusers' ``examples/dreambooth/train_dreambooth_flux.py``, a
plain fine-tune: no LoRA), with clipcond as both text encoders:

1. ``precompute`` encodes the captions once with the ``flux-schnell`` recipe (``FluxPipeline.encode_prompt`` with
   ``max_sequence_length=256``; ``flux``, FLUX.1-dev's, at 512) into a store folder: T5-XXL's rows ``[256, 4096]``
   and CLIP-L's ``pooler_output`` ``[768]`` per caption, so neither text encoder (9.5 GB + 250 MB in bf16) sits
   beside the 12B transformer. Flux lets T5 attend to its padding and its transformer takes no mask: the store keeps
   every row, and every batch is ``[B, 256, D]``;
2. your latents dataset (``Latents``: a VAE latent per row) and the store are read together by
   ``JoinedLoader(latents, store)``: the ``num_workers=2`` DataLoader workers load the latents and fetch each
   batch's store rows in one checked copy, into shared memory they reuse;
   ``store.collate(drop_prob={"clip_l": 0.1, "t5": 0.1}, seed=0)``
   drops each text encoder's part of a row on its own, zeroed (a row may lose its CLIP-L pooled vector, its T5 rows,
   both or neither: kohya sd-scripts' ``--clip_l_dropout_rate`` / ``--t5_dropout_rate``, which it offers for SD3;
   one number instead replaces whole rows by the stored ``""`` encoding, as a caption dropout to ``""`` does);
3. ``store.conditioning(batch)`` is the batch as ``FluxPipeline`` takes it: ``.pipeline_kwargs()`` gives
   ``prompt_embeds [B, 256, D]`` and ``pooled_prompt_embeds [B, P]``, and ``.text_ids`` the ``txt_ids [256, 3]``
   that ``encode_prompt`` returns beside them (zeros);
4. the transformer is called exactly as ``FluxPipeline.__call__`` calls it: the latents packed in 2x2 patches
   (``FluxPipeline._pack_latents``: ``[B, C, h, w]`` to ``[B, h/2 * w/2, 4C]``), ``img_ids`` from
   ``FluxPipeline._prepare_latent_image_ids(B, h/2, w/2)``, ``timestep / 1000``, ``guidance`` a tensor of the
   guidance scale for guidance-distilled models (FLUX.1-dev, ``guidance_embeds=True``) and None for FLUX.1-schnell,
   ``pooled_projections`` and ``encoder_hidden_states``;
5. the loss is diffusers' rectified-flow loss (``train_dreambooth_flux.py``): ``u`` drawn by
   ``compute_density_for_timestep_sampling`` (``--weighting-scheme none``: uniform), the timestep and sigma at
   ``u * 1000`` of the pipeline's ``FlowMatchEulerDiscreteScheduler`` (its training schedule: FLUX.1-schnell's
   ``shift`` 1.0, so sigma = timestep / 1000), ``noisy = (1 - sigma) * latents + sigma * noise``, the prediction
   unpacked (``FluxPipeline._unpack_latents``) and compared with ``target = noise - latents``.

The latents are fixed random stand-ins unless ``--latents`` is given (spatially correlated, as VAE latents are:
``smooth_latents``), so the printed loss must fall: a smoke test of the wiring, not a recipe.

    python examples/train_flux.py --tiny    # tiny-flux-schnell (T5 width 96, CLIP-L 32), a tiny Flux transformer

``--tiny`` needs the real T5 tokenizer, which no tiny spec carries: ``--t5-tokenizer PATH``, else FLUX.1's
``tokenizer_2`` is taken from PyPI's ``diffsynth==1.1.9`` wheel (downloaded once into ~/.cache/clipcond-test, as the
tests do). ``--tiny --recipe flux`` is the FLUX.1-dev variant: 512 T5 rows and a guidance-embedding transformer.

Real weights (a local pipeline folder or hub id; ``transformer/``, ``scheduler/``, ``text_encoder/``,
``text_encoder_2/``, ``tokenizer/`` and ``tokenizer_2/`` are read; the 12B transformer with AdamW in float32 needs
about 200 GB: on one GPU, use a LoRA, an 8-bit optimizer, gradient checkpointing or FSDP around this step):

    python examples/train_flux.py --pretrained black-forest-labs/FLUX.1-schnell \\
        --captions my_captions.jsonl --latents my_latents.pt --store embeddings/ \\
        --device cuda --dtype bfloat16 --lr 1e-5

``--captions``: JSON lines ``{"caption": ...}``, one per image. ``--latents``: ``torch.save`` of a float tensor
``[N, 16, h, w]``, row r the image of caption line r, made once with the pipeline's VAE as
``(vae.encode(images).latent_dist.sample() - vae.config.shift_factor) * vae.config.scaling_factor`` (1024 px
images: ``[N, 16, 128, 128]``; h and w even; one size for all, or batches bucketed by aspect ratio). ``--store`` is
precomputed once (the same as ``clipcond precompute --encoder flux-schnell --weights PIPELINE --dtype bfloat16
--input my_captions.jsonl --out embeddings/``) and reused on later runs. The recipe follows the transformer:
``flux`` (512 rows) for a guidance-distilled one (FLUX.1-dev), ``flux-schnell`` (256) otherwise; ``--recipe``
overrides it.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch.utils.data import Dataset, get_worker_info

import clipcond
from clipcond import EmbeddingStore, JoinedLoader, TextConditioner
from clipcond.precompute.job import PrecomputeJob, precompute

if TYPE_CHECKING:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

# Demo captions of different lengths (every one padded to 256 T5 rows), one repeated (encoded and stored once).
DEMO = ["a photo of a cat", "a red bicycle leaning on a wall", "an astronaut riding a horse on mars, 8k",
        "a photo of a cat", "a bowl of soup", "a lighthouse at dusk, waves crashing on the rocks below, long exposure",
        "a portrait of an old man with a white beard, oil painting, dramatic light, museum quality", "a running dog"]
# FluxPipeline.vae_scale_factor (2 ** (len(vae.config.block_out_channels) - 1)): pixels per latent; _unpack_latents
# takes the image's pixel size, so the prediction is unpacked as the pipeline unpacks its latents.
VAE_SCALE_FACTOR = 8


def demo_captions(folder: Path) -> Path:
    path = folder / "captions.jsonl"
    path.write_text("".join(json.dumps({"caption": c}) + "\n" for c in DEMO))
    return path


def choose_recipe(args: argparse.Namespace) -> str:
    """``flux`` (FLUX.1-dev's 512 T5 rows) for a guidance-distilled transformer, ``flux-schnell`` (256) otherwise."""
    if args.recipe is None:
        if args.tiny:
            args.recipe = "flux-schnell"
        else:
            from diffusers import FluxTransformer2DModel

            config = FluxTransformer2DModel.load_config(args.pretrained, subfolder="transformer")
            args.recipe = "flux" if config.get("guidance_embeds") else "flux-schnell"
    return f"tiny-{args.recipe}" if args.tiny else args.recipe


def build_store(args: argparse.Namespace, captions: Path, out: Path) -> EmbeddingStore:
    """Encode the captions once (resumes or reuses ``out``); T5 and CLIP-L are freed when this returns."""
    dtype = getattr(torch, args.dtype)
    name = choose_recipe(args)
    if args.tiny:
        import _tiny  # examples/_tiny.py

        tokenizer = args.t5_tokenizer or _tiny.t5_tokenizers()["flux"]  # the real T5 vocabulary: real token ids
        tc = TextConditioner.from_pretrained(name, tokenizer=tokenizer, device=args.device,
                                             dtype=dtype)  # seeded random T5 (width 96) and CLIP-L (width 32)
    else:
        tc = TextConditioner.from_pretrained(name, weights=args.pretrained, tokenizer=args.t5_tokenizer,
                                             device=args.device, dtype=dtype)
    precompute(tc, PrecomputeJob(input=captions, out=out, column="caption", progress=not args.tiny))
    return EmbeddingStore(out)


def load_transformer(args: argparse.Namespace, store: EmbeddingStore) -> tuple[FluxTransformer2DModel,
                                                                               FlowMatchEulerDiscreteScheduler]:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    if store.spec.pipeline != "FluxPipeline":
        raise SystemExit(f"store {store.path} holds {store.spec.name} (for {store.spec.pipeline}), not a Flux recipe "
                         f"(flux-schnell, flux): precompute it with one, or pass another --store")
    if args.tiny:
        import _tiny

        transformer = _tiny.tiny_flux_transformer(store.spec.sequence_dim, store.spec.pooled_dim,
                                                  guidance_embeds=args.recipe == "flux")  # dev: guidance-distilled
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)  # FLUX.1-schnell's
    else:
        transformer = FluxTransformer2DModel.from_pretrained(args.pretrained, subfolder="transformer")
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(args.pretrained, subfolder="scheduler")
    # A store of another encoder would fail deep inside the context embedder; say so here instead.
    config = transformer.config
    if (config.joint_attention_dim, config.pooled_projection_dim) != (store.spec.sequence_dim, store.spec.pooled_dim):
        raise SystemExit(f"store {store.path} holds {store.spec.name} (D {store.spec.sequence_dim}, P "
                         f"{store.spec.pooled_dim}); the transformer wants joint_attention_dim "
                         f"{config.joint_attention_dim}, pooled_projection_dim {config.pooled_projection_dim}")
    return transformer.to(args.device).train(), scheduler


class Latents(Dataset):
    """Your image dataset: row r's VAE latent (and, to show who loaded it, the DataLoader worker's id)."""

    def __init__(self, latents: torch.Tensor) -> None:
        self.latents = latents  # [N, C, h, w]

    def __len__(self) -> int:
        return len(self.latents)

    def __getitem__(self, r: int) -> dict[str, torch.Tensor | int]:
        info = get_worker_info()
        return {"latent": self.latents[r], "worker": -1 if info is None else info.id}  # [C, h, w], int


def load_latents(args: argparse.Namespace, store: EmbeddingStore, transformer: FluxTransformer2DModel) -> Latents:
    channels = transformer.config.in_channels // 4  # packed 2x2: FLUX.1 64 = 16 VAE channels x 4
    if args.latents is not None:
        latents = torch.load(args.latents, map_location="cpu", weights_only=True)  # [N, C, h, w]
    else:  # stand-ins for the VAE latents: 1024 px images (128x128), tiny 8x8
        side = 8 if args.tiny else 128
        latents = smooth_latents(len(store), channels, side, args.seed)
    if (latents.ndim != 4 or len(latents) != len(store) or latents.shape[1] != channels
            or latents.shape[2] % 2 or latents.shape[3] % 2):
        raise SystemExit(f"--latents must be [N, {channels}, h, w] with N = {len(store)} (one per caption of the "
                         f"store) and h, w even (2x2 patches), got {list(latents.shape)}")
    return Latents(latents)


def smooth_latents(n: int, channels: int, side: int, seed: int) -> torch.Tensor:
    """Random stand-ins ``[n, channels, side, side]`` of unit variance, spatially correlated as real VAE latents are
    (white noise at half the side, bilinearly upsampled). White-noise latents would make a poor smoke test for
    rectified flow: the best timestep-blind linear guess of ``noise - x0`` from ``noisy`` is then 0 (its sign flips
    at sigma 0.5), so a tiny transformer shows no progress for its first ~100 steps; with neighbours alike, the
    part of the noise that differs within a 2x2 patch is predictable at every sigma, and the loss falls at once."""
    coarse = torch.randn((n, channels, side // 2, side // 2), generator=torch.Generator().manual_seed(seed))
    latents = torch.nn.functional.interpolate(coarse, size=(side, side), mode="bilinear")
    return latents / latents.std()


def flow_matching_loss(transformer: FluxTransformer2DModel, scheduler: FlowMatchEulerDiscreteScheduler,
                       x0: torch.Tensor, c: clipcond.Conditioning, g: torch.Generator,
                       args: argparse.Namespace) -> tuple[torch.Tensor, dict[str, list[int] | None]]:
    """Rectified flow as ``train_dreambooth_flux.py``: noise ``x0`` to a sigma of the training schedule, predict the
    velocity ``noise - x0`` with the transformer called as ``FluxPipeline.__call__`` calls it, weighted MSE."""
    from diffusers import FluxPipeline
    from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

    b, channels, h, w = x0.shape
    noise = torch.randn(x0.shape, generator=g, device=x0.device, dtype=x0.dtype)
    u = compute_density_for_timestep_sampling(args.weighting_scheme, b, logit_mean=args.logit_mean,
                                              logit_std=args.logit_std, mode_scale=args.mode_scale,
                                              device=x0.device, generator=g)  # [B] in [0, 1]
    n = scheduler.config.num_train_timesteps
    indices = (u * n).long().clamp(0, n - 1)  # "mode" can reach u = 1
    timesteps = scheduler.timesteps.to(x0.device)[indices]  # [B] in (0, 1000]
    sigmas = scheduler.sigmas.to(x0.device, x0.dtype)[indices].view(b, 1, 1, 1)  # get_sigmas(timesteps): the same
    noisy = (1.0 - sigmas) * x0 + sigmas * noise  # [B, C, h, w]
    packed = FluxPipeline._pack_latents(noisy, b, channels, h, w)  # [B, h/2 * w/2, 4C]
    img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, x0.device, x0.dtype)  # [h/2 * w/2, 3]
    guidance = (torch.full([b], args.guidance_scale, device=x0.device, dtype=torch.float32)
                if transformer.config.guidance_embeds else None)  # FLUX.1-dev: distilled guidance; schnell: None
    kwargs = c.pipeline_kwargs()  # prompt_embeds [B, L, D], pooled_prompt_embeds [B, P]
    pred = transformer(hidden_states=packed, timestep=timesteps.to(x0.dtype) / 1000, guidance=guidance,
                       pooled_projections=kwargs["pooled_prompt_embeds"],  # [B, P] CLIP-L's pooler_output
                       encoder_hidden_states=kwargs["prompt_embeds"],  # [B, L, D] T5's rows
                       txt_ids=c.text_ids,  # [L, 3] zeros, what encode_prompt returns beside prompt_embeds
                       img_ids=img_ids, return_dict=False)[0]  # [B, h/2 * w/2, 4C]
    pred = FluxPipeline._unpack_latents(pred, height=h * VAE_SCALE_FACTOR, width=w * VAE_SCALE_FACTOR,
                                        vae_scale_factor=VAE_SCALE_FACTOR)  # [B, C, h, w]
    weighting = compute_loss_weighting_for_sd3(args.weighting_scheme, sigmas)  # "none": ones
    target = noise - x0  # the velocity of (1 - sigma) * x0 + sigma * noise
    loss = torch.mean((weighting.float() * (pred.float() - target.float()) ** 2).reshape(b, -1), 1).mean()
    shapes = {"hidden_states": list(packed.shape), "img_ids": list(img_ids.shape),
              "guidance": None if guidance is None else list(guidance.shape)}
    return loss, shapes


def train(args: argparse.Namespace, store: EmbeddingStore) -> list[float]:
    transformer, scheduler = load_transformer(args, store)
    device = torch.device(args.device)
    g = torch.Generator(device).manual_seed(args.seed)  # noise and timesteps: reproducible
    drop_prob = {"clip_l": args.clip_l_drop_prob, "t5": args.t5_drop_prob}  # per text encoder, zeroed
    collate = store.collate(drop_prob=drop_prob, seed=args.seed)  # parts of rows zeroed, a new draw per epoch
    # Row r: your latent + the store's row r (checked), both fetched by the workers; the collate runs here.
    loader = JoinedLoader(load_latents(args, store, transformer), store, batch_size=args.batch_size, shuffle=True,
                          num_workers=args.workers, collate=collate,
                          generator=torch.Generator().manual_seed(args.seed))
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=args.lr)
    losses, epoch, seen = [], 0, 0
    dropped_total = dict.fromkeys(drop_prob, 0)
    while len(losses) < args.steps:
        collate.set_epoch(epoch)  # a new dropout draw every epoch, the same on every rerun
        workers = set()
        for batch in loader:
            # The store's dtype (bf16 for real runs) to the transformer's: explicit, never silent.
            c = store.conditioning(batch).to(device, transformer.dtype)  # sequence, pooled, text_ids [L, 3]
            loss, shapes = flow_matching_loss(transformer, scheduler, batch["latent"].to(device, transformer.dtype),
                                              c, g, args)
            if not losses:
                kwargs = c.pipeline_kwargs()
                print(f"first batch: prompt_embeds {list(kwargs['prompt_embeds'].shape)} pooled_prompt_embeds "
                      f"{list(kwargs['pooled_prompt_embeds'].shape)} txt_ids {list(c.text_ids.shape)} (of "
                      f"{store.spec.t5_max_length} T5 rows, all kept), hidden_states {shapes['hidden_states']} "
                      f"img_ids {shapes['img_ids']} guidance {shapes['guidance']}, "
                      f"from DataLoader worker {int(batch['worker'][0])} of {args.workers}")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(transformer.parameters(), args.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            workers.update(batch["worker"].tolist())
            dropped = {key: int(rows.sum()) for key, rows in batch["dropped_towers"].items()}  # {"clip_l": n, ...}
            seen += len(c)
            for key, n in dropped.items():
                dropped_total[key] += n
            print(f"step {len(losses) - 1:3d}  epoch {epoch}  loss {losses[-1]:.4f}  dropped "
                  + "  ".join(f"{key} {n}/{len(c)}" for key, n in dropped.items()))
            if len(losses) == args.steps:
                break
        if epoch == 0:
            print(f"epoch 0: batches from DataLoader workers {sorted(workers)} (num_workers={args.workers})")
        epoch += 1
    print("caption dropout per text encoder: " + ", ".join(f"{key} dropped {n} of {seen} rows (p {drop_prob[key]})"
                                                           for key, n in dropped_total.items()))
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny-flux-schnell and a tiny Flux transformer on CPU")
    parser.add_argument("--pretrained", default="black-forest-labs/FLUX.1-schnell",
                        help="a Flux.1 diffusers pipeline folder or hub id (ignored with --tiny)")
    parser.add_argument("--recipe", choices=["flux-schnell", "flux"],
                        help="the text recipe: flux-schnell (256 T5 rows), flux (FLUX.1-dev: 512); default: flux "
                             "for a guidance-distilled transformer, else flux-schnell (--tiny: flux-schnell)")
    parser.add_argument("--captions", type=Path, help="JSON lines with a caption each (default: 8 demo captions)")
    parser.add_argument("--latents", type=Path, help="torch.save'd VAE latents [N, 16, h, w] (default: random)")
    parser.add_argument("--store", type=Path, help="the embedding store folder (default: a temporary one)")
    parser.add_argument("--t5-tokenizer", help="a T5 tokenizer folder (default: the pipeline's; --tiny: PyPI's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                        help="the text encoders' and the store's dtype (the transformer trains in float32)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    parser.add_argument("--lr", type=float, default=None, help="AdamW learning rate (tiny: 2e-3, real: 1e-5)")
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--clip-l-drop-prob", type=float, default=0.1, help="CLIP-L pooled dropout (zeroed)")
    parser.add_argument("--t5-drop-prob", type=float, default=0.1, help="T5 rows dropout (zeroed)")
    parser.add_argument("--guidance-scale", type=float, default=3.5,
                        help="the distilled guidance a guidance_embeds transformer (FLUX.1-dev) trains with")
    parser.add_argument("--weighting-scheme", default="none",
                        choices=["none", "sigma_sqrt", "logit_normal", "mode", "cosmap"],
                        help="timestep sampling / loss weighting (diffusers' compute_density_for_timestep_sampling)")
    parser.add_argument("--logit-mean", type=float, default=0.0)
    parser.add_argument("--logit-std", type=float, default=1.0)
    parser.add_argument("--mode-scale", type=float, default=1.29)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.lr = args.lr or (2e-3 if args.tiny else 1e-5)
    with tempfile.TemporaryDirectory(prefix="clipcond-flux-") as tmp:
        captions = args.captions or demo_captions(Path(tmp))
        store = build_store(args, captions, args.store or Path(tmp) / "embeddings")
        print(f"{store!r}")
        losses = train(args, store)
    window = max(1, min(5, len(losses) // 4))  # per-step losses are noisy (random sigma): compare window means
    first, last = sum(losses[:window]) / window, sum(losses[-window:]) / window
    print(f"first loss {first:.4f}  last loss {last:.4f}  (means of the first and last {window} steps); "
          f"all finite: {all(map(math.isfinite, losses))}")


if __name__ == "__main__":
    main()
