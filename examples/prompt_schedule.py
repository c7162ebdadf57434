"""A1111 prompt editing in a diffusers pipeline: ``tc.schedule`` segments switched by ``callback_on_step_end``.

``"a photo of a [cat:dog:0.5] on a mat"`` at 20 steps: A1111 conditions denoiser calls 0..10 on
"a photo of a cat on a mat" and calls 11..19 on "... dog ...". ``tc.schedule`` gives those segments
(``[(10, c_cat), (20, c_dog)]``, ``end_step`` inclusive); the callback, called after each step,
writes the next step's segment into ``prompt_embeds`` (which, with classifier-free guidance, is the
``[negative; positive]`` batch the UNet sees) and logs the schedule it applied.

    python examples/prompt_schedule.py --tiny           # a tiny SD 1.5 pipeline, CPU, seconds
    python examples/prompt_schedule.py --pretrained stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --device cuda --dtype float16 --prompt "a photo of a [cat:dog:0.5] on a mat, [red|blue] collar"
"""

from __future__ import annotations

import argparse
import tempfile

import torch

from clipcond import Conditioning, TextConditioner
from clipcond.text.schedules import prompt_schedule


def segment_at(segments: list[tuple[int, Conditioning]], step: int) -> Conditioning:
    """A1111's rule: the first segment whose end step is >= the (0-based) step."""
    return next(c for end, c in segments if step <= end)


def run(pipe, tc: TextConditioner, prompt: str, steps: int, seed: int, *, switch: bool  # noqa: ANN001
        ) -> tuple[torch.Tensor, list[tuple[int, str]]]:
    segments = tc.schedule(prompt, steps)
    texts = prompt_schedule(prompt, steps)  # the same segments as text, for the log
    negative = tc.null(1).sequence
    applied = [(0, texts[0][1])]

    def on_step_end(pipe, i: int, t, kwargs: dict) -> dict:  # noqa: ANN001
        nxt = i + 1  # the step the next UNet call computes
        if switch and nxt < steps and segment_at(segments, nxt) is not segment_at(segments, i):
            kwargs["prompt_embeds"] = torch.cat([negative, segment_at(segments, nxt).sequence]).to(
                kwargs["prompt_embeds"])
            applied.append((nxt, next(text for end, text in texts if nxt <= end)))
        return kwargs

    first = segment_at(segments, 0)
    image = pipe(prompt_embeds=first.sequence, negative_prompt_embeds=negative, num_inference_steps=steps,
                 guidance_scale=7.0, generator=torch.Generator().manual_seed(seed), output_type="pt",
                 callback_on_step_end=on_step_end, callback_on_step_end_tensor_inputs=["prompt_embeds"]).images
    return image, applied


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pretrained", help="an SD 1.5 pipeline folder or hub id")
    parser.add_argument("--prompt", default="a photo of a [cat:dog:0.5] on a mat")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    parser.add_argument("--tiny", action="store_true", help="a tiny random SD 1.5 pipeline (offline)")
    args = parser.parse_args()
    from diffusers import StableDiffusionPipeline

    dtype = getattr(torch, args.dtype)
    with tempfile.TemporaryDirectory() as tmp:
        if args.tiny:
            from _tiny import write_tiny_pipeline

            args.pretrained = str(write_tiny_pipeline("sd15", tmp))
        elif args.pretrained is None:
            parser.error("--pretrained is needed (or --tiny)")
        pipe = StableDiffusionPipeline.from_pretrained(args.pretrained, torch_dtype=dtype, safety_checker=None,
                                                       requires_safety_checker=False).to(args.device)
        pipe.set_progress_bar_config(disable=True)
        tc = TextConditioner.from_pretrained("sd15", weights=args.pretrained, device=args.device, dtype=dtype)
        plan = prompt_schedule(args.prompt, args.steps)
        print(f"prompt {args.prompt!r}, {args.steps} steps: {len(plan)} segments")
        for end, text in plan:
            print(f"  {text!r} until step {end} (inclusive: 0-based denoiser calls <= {end})")
        seen = []  # what the UNet was conditioned on, call by call: the positive half of its batch
        hook = pipe.unet.register_forward_pre_hook(
            lambda module, args, kwargs: seen.append(kwargs["encoder_hidden_states"][1:].clone()), with_kwargs=True)
        image, applied = run(pipe, tc, args.prompt, args.steps, seed=0, switch=True)
        hook.remove()
        print("applied: " + "; ".join(f"from call {s}: {text!r}" for s, text in applied))
        segments = tc.schedule(args.prompt, args.steps)
        right = sum(torch.equal(x, segment_at(segments, i).sequence.to(x)) for i, x in enumerate(seen))
        print(f"{right} of {len(seen)} UNet calls conditioned on their A1111 segment")
        if len(plan) > 1:
            fixed, _ = run(pipe, tc, args.prompt, args.steps, seed=0, switch=False)
            print(f"switching changed the image: max |difference| {float((image - fixed).abs().max()):.4f} "
                  f"against keeping the first segment throughout")


if __name__ == "__main__":
    main()
