"""Encode prompts and print what a user needs to see: shapes, dtypes, norms, where weights come from.

Runs offline on a built-in ``tiny-*`` spec (seeded random weights, real tokenizer):

    python examples/encode_prompts.py                       # tiny-sdxl
    python examples/encode_prompts.py --encoder sd15 --weights /path/to/stable-diffusion-v1-5
"""

from __future__ import annotations

import argparse

import torch

import clipcond

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--encoder", default="tiny-sdxl", help=f"one of {clipcond.list_encoders()}")
parser.add_argument("--weights", default=None, help="local folder/file or hub repo id (default: the name's source)")
parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
args = parser.parse_args()

prompts = ["a photo of a cat", "an astronaut riding a horse on mars, highly detailed", "a running dog"]
tc = clipcond.TextConditioner.from_pretrained(args.encoder, weights=args.weights, device=args.device,
                                              dtype=getattr(torch, args.dtype))
spec = tc.spec
print(f"encoder   {spec.name}  ({spec.source})")
for t in spec.towers:
    print(f"  tower   {t.name}: width {t.width}, {t.layers} blocks, hidden_layer {t.hidden_layer}, "
          f"final LN on sequence {t.final_norm}, pad id {t.pad_id}, tokenizer {t.tokenizer}, pooled {t.pooled}")
print(f"weights   {args.weights or spec.hub_repo or 'seeded random (tiny spec: no published weights)'}")
print("          real weights: see weights.md; e.g. from_pretrained('sdxl') reads "
      "stabilityai/stable-diffusion-xl-base-1.0 text_encoder/ + text_encoder_2/")

c = tc(prompts)
print(f"sequence  {tuple(c.sequence.shape)} {c.sequence.dtype} on {c.sequence.device}  "
      f"(UNet encoder_hidden_states, D = {tc.sequence_dim})")
print(f"pooled    {tuple(c.pooled.shape)} {c.pooled.dtype}  "
      f"(SDXL added_cond_kwargs['text_embeds'], P = {tc.pooled_dim})")
ids = tc.tokenize(prompts)
for i, prompt in enumerate(prompts):
    first = ids[0].ids[i, : int(ids[0].eos[i]) + 1].tolist()
    print(f"  [{i}] {prompt!r}\n      ids {first}\n      |sequence| {c.sequence[i].float().norm():.4f}  "
          f"|pooled| {c.pooled[i].float().norm():.4f}")
n = tc.null(len(prompts))
print(f"null      {spec.null!r}: |sequence| {n.sequence[0].float().norm():.4f}, "
      f"|pooled| {n.pooled[0].float().norm():.4f}  (classifier-free guidance's unconditional branch)")
d = tc.encode(prompts, drop_prob=0.5, generator=torch.Generator().manual_seed(0))
dropped = [bool(torch.equal(d.sequence[i], n.sequence[i])) for i in range(len(prompts))]
print(f"encode(drop_prob=0.5, seed 0) dropped rows: {dropped}")
print(f"fingerprint {tc.fingerprint[:16]}")
