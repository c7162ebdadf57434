"""``tc.compile()``: torch.compile of the towers gives the eager outputs, and compiles each shape once."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from clipcond import TextConditioner

PROMPTS = ["a photo of a cat", "", "an astronaut riding a horse " * 9, "(masterpiece:1.3), a dog", "日本語"]
TOL = {"atol": 2e-5, "rtol": 2e-5}  # inductor fuses and reorders float32 reductions


@pytest.fixture(scope="module")
def pair() -> tuple[TextConditioner, TextConditioner]:
    eager = TextConditioner.from_pretrained("tiny-sdxl")
    compiled = TextConditioner.from_pretrained("tiny-sdxl").compile(dynamic=None)
    return eager, compiled


def assert_same(a, b) -> None:
    torch.testing.assert_close(a.sequence, b.sequence, **TOL)
    torch.testing.assert_close(a.pooled, b.pooled, **TOL)


def test_compiled_towers_match_eager_and_keep_their_names(pair):
    eager, compiled = pair
    assert all(t._compiled_call_impl is not None for t in compiled.towers)
    assert list(compiled.state_dict()) == list(eager.state_dict())
    assert compiled.fingerprint == eager.fingerprint
    for batch in (PROMPTS[:3], PROMPTS):  # two batch sizes: the second makes the batch dimension dynamic
        assert_same(compiled(batch), eager(batch))
    with torch._dynamo.config.patch(error_on_recompile=True):  # every later size reuses that graph
        for batch in (PROMPTS[:3], PROMPTS, PROMPTS[:4], PROMPTS[:2]):
            assert_same(compiled(batch), eager(batch))
    assert_same(compiled.null(2), eager.null(2))
    assert_same(compiled.weighted(PROMPTS), eager.weighted(PROMPTS))


def test_textual_inversion_on_a_compiled_conditioner_is_compiled_and_correct(tmp_path):
    eager = TextConditioner.from_pretrained("tiny-sd15")
    compiled = TextConditioner.from_pretrained("tiny-sd15").compile()
    path = tmp_path / "style.safetensors"
    save_file({"emb_params": torch.randn(2, eager.sequence_dim, generator=torch.Generator().manual_seed(0))}, path)
    plain = eager
    eager, compiled = eager.with_textual_inversion(path), compiled.with_textual_inversion(path)
    assert compiled._compiled == {} and compiled.towers[0]._compiled_call_impl is not None
    prompts = ["a cat in style", "plain"]
    assert_same(compiled(prompts), eager(prompts))
    assert not torch.allclose(compiled(prompts).sequence[0], plain(prompts).sequence[0])  # its new rows are read


def test_precompute_with_compile_stores_the_eager_rows(tmp_path):
    from clipcond import EmbeddingStore
    from clipcond.cli import main

    path = tmp_path / "captions.txt"
    path.write_text("\n".join(PROMPTS[:4] + PROMPTS[:2]) + "\n")
    out = tmp_path / "store"
    assert main(["precompute", "--encoder", "tiny-sd15", "--input", str(path), "--out", str(out),
                 "--batch-size", "2", "--compile"]) == 0
    store = EmbeddingStore(out)
    expected = TextConditioner.from_pretrained("tiny-sd15")(PROMPTS[:4] + PROMPTS[:2])
    rows = [store[i] for i in range(len(store))]
    torch.testing.assert_close(torch.stack([r["sequence"] for r in rows]), expected.sequence, **TOL)
    torch.testing.assert_close(torch.stack([r["pooled"] for r in rows]), expected.pooled, **TOL)
