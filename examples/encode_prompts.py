"""Encode prompts and print what a user needs to see: shapes, dtypes, norms, where weights come from.

Runs offline on a built-in ``tiny-*`` spec (seeded random weights, real tokenizer):

    python examples/encode_prompts.py                       # tiny-sdxl
    python examples/encode_prompts.py --encoder sd15 --weights /path/to/stable-diffusion-v1-5

Then one T5 recipe (``--t5-encoder``, default tiny-flux): it needs the T5 tokenizer, which no tiny spec carries;
give a pipeline's T5 tokenizer folder (``--t5-tokenizer FLUX.1-dev/tokenizer_2``), else that part is skipped:

    python examples/encode_prompts.py --t5-tokenizer /path/to/FLUX.1-dev/tokenizer_2
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
parser.add_argument("--t5-encoder", default="tiny-flux", help="a T5 recipe: flux, sd3, pixart-sigma, chroma, ...")
parser.add_argument("--t5-weights", default=None, help="its weights (default: seeded random for tiny-*)")
parser.add_argument("--t5-tokenizer", default=None, help="a T5 tokenizer folder (e.g. FLUX.1-dev/tokenizer_2)")
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

# --- a T5 recipe ---------------------------------------------------------------------------------------------
if args.t5_tokenizer is None and args.t5_weights is None:
    print(f"T5 recipe {args.t5_encoder}: skipped: no T5 tokenizer (pass --t5-tokenizer PATH to a pipeline's T5 "
          "tokenizer folder, e.g. FLUX.1-dev/tokenizer_2)")
    raise SystemExit(0)
t5 = clipcond.TextConditioner.from_pretrained(args.t5_encoder, weights=args.t5_weights, tokenizer=args.t5_tokenizer,
                                              device=args.device, dtype=getattr(torch, args.dtype))
s5 = t5.spec
print(f"T5 recipe {s5.name}  ({s5.source})")
print(f"  T5 {s5.t5.name}: d_model {s5.t5.d_model}, {s5.t5.layers} blocks, max length {s5.t5_max_length}, "
      f"mask into T5 {s5.t5_mask}, padding {s5.padding}, combine {s5.combine}")
c5 = t5(prompts)
print(f"sequence  {tuple(c5.sequence.shape)} {c5.sequence.dtype}  pooled {tuple(c5.pooled.shape)}  "
      f"mask {None if c5.mask is None else tuple(c5.mask.shape)}  "
      f"text_ids {None if c5.text_ids is None else tuple(c5.text_ids.shape)}")
t5_ids = t5.tokenize(prompts)[-1]
for i, prompt in enumerate(prompts):
    print(f"  [{i}] {prompt!r}: T5 ids {t5_ids.ids[i, : int(t5_ids.eos[i]) + 1].tolist()}")
if s5.pipeline is not None:
    print(f"pipe(**c.pipeline_kwargs(negative=tc.null(B))) keywords for {s5.pipeline}: "
          f"{sorted(c5.pipeline_kwargs(negative=t5.null(len(prompts))))}")
