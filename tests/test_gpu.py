"""CUDA checks (fp16 is the production path); skipped on machines without a GPU."""

from __future__ import annotations

import pytest
import torch

from clipcond import TextConditioner

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

ODD = ["", "!!!!!!!!!!!!!!!!!!!!", "a " * 200, "日本語 " * 60, "(((((((((masterpiece)))))))))" * 8, "\u200b\u200b"]


@pytest.mark.parametrize("name", ["tiny-sd15", "tiny-sd2", "tiny-sdxl"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_half_matches_cpu_float32(name, dtype):
    prompts = ["a photo of a cat", "an astronaut riding a horse", *ODD]
    ref = TextConditioner.from_pretrained(name)(prompts)
    tc = TextConditioner.from_pretrained(name, device="cuda", dtype=dtype)
    c = tc(prompts)
    assert c.sequence.device.type == "cuda" and c.sequence.dtype == dtype and not c.sequence.requires_grad
    assert torch.isfinite(c.sequence).all() and torch.isfinite(c.pooled).all()
    torch.testing.assert_close(c.sequence.float().cpu(), ref.sequence, atol=0.05, rtol=0.05)
    assert tc.null(2).sequence.device.type == "cuda"
    d = tc.encode(prompts, drop_prob=0.5, generator=torch.Generator("cuda").manual_seed(0))
    assert d.sequence.shape == c.sequence.shape
