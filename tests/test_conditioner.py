"""Parity with diffusers' encode_prompt on the same tiny weights, and the frozen-module contract."""

from __future__ import annotations

import logging

import open_clip
import pytest
import torch
from safetensors.torch import save_file

import clipcond
from clipcond import Conditioning, TextConditioner

TOL = {"atol": 1e-5, "rtol": 1e-5}  # float32, CPU; the bound is max abs error <= 1e-5


def no_bang(prompts: list[str]) -> list[str]:
    # HF tokenizers of SD2/SDXL-2 make "!" their pad id (diffusers#4153); open_clip does not.
    return [p for p in prompts if "!" not in p]


def test_sd15_matches_stable_diffusion_pipeline(tiny, prompts):
    pipe = tiny.pipeline("sd15")
    embeds, negative = pipe.encode_prompt(prompts, "cpu", 1, True)
    tc = TextConditioner.from_pretrained("sd15", weights=tiny.sd15)
    c = tc(prompts)
    torch.testing.assert_close(c.sequence, embeds, **TOL)
    torch.testing.assert_close(tc.null(len(prompts)).sequence, negative, **TOL)
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    torch.testing.assert_close(c.pooled, pipe.text_encoder(ids).pooler_output, **TOL)
    assert (tc.sequence_dim, tc.pooled_dim, tc.max_length) == (32, 32, 77)


def test_sd2_matches_stable_diffusion_pipeline(tiny, prompts):
    prompts = no_bang(prompts)
    pipe = tiny.pipeline("sd2")
    assert pipe.text_encoder.config.num_hidden_layers == 3  # diffusers' truncated SD2 encoder
    embeds, negative = pipe.encode_prompt(prompts, "cpu", 1, True)
    tc = TextConditioner.from_pretrained("sd2", weights=tiny.sd2)
    c = tc(prompts)
    torch.testing.assert_close(c.sequence, embeds, **TOL)
    torch.testing.assert_close(tc.null(len(prompts)).sequence, negative, **TOL)
    ids = open_clip.tokenize(prompts)
    torch.testing.assert_close(c.pooled, tiny.clip_h(ids).pooler_output, **TOL)


def test_sd2_bang_prompts_follow_open_clip_tokenization(tiny):
    prompts = ["wow!", "stop! hammer time!!", "a cat!!! on a mat"]
    tc = TextConditioner.from_pretrained("sd2", weights=tiny.sd2)
    ids = open_clip.tokenize(prompts)
    assert torch.equal(tc.tokenize(prompts)[0].ids, ids)
    torch.testing.assert_close(tc(prompts).sequence, tiny.clip_h(ids).last_hidden_state, **TOL)
    # ... and they are exactly where the SD2 HF tokenizer differs (pad token "!" is id 0).
    hf_ids = tiny.tok_bang(prompts, padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert not torch.equal(hf_ids, ids)


def test_sdxl_matches_stable_diffusion_xl_pipeline(tiny, prompts):
    prompts = no_bang(prompts)
    pipe = tiny.pipeline("sdxl")
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt(prompts, device="cpu")
    tc = TextConditioner.from_pretrained("sdxl", weights=tiny.sdxl)
    c = tc(prompts)
    assert c.sequence.shape == (len(prompts), 77, 32 + 48) and c.pooled.shape == (len(prompts), 48)
    torch.testing.assert_close(c.sequence, embeds, **TOL)
    torch.testing.assert_close(c.pooled, pooled, **TOL)
    n = tc.null(len(prompts))
    assert torch.equal(n.sequence, negative) and torch.equal(n.pooled, negative_pooled)
    assert not n.sequence.any() and not n.pooled.any()  # force_zeros_for_empty_prompt


def test_sdxl_refiner_tower_matches_text_encoder_2(tiny, prompts):
    prompts = no_bang(prompts)
    tc = TextConditioner.from_pretrained("sdxl-refiner", weights=tiny.sdxl)
    ids = open_clip.tokenize(prompts)
    out = tiny.clip_g(ids, output_hidden_states=True)
    c = tc(prompts)
    torch.testing.assert_close(c.sequence, out.hidden_states[-2], **TOL)
    torch.testing.assert_close(c.pooled, out.text_embeds, **TOL)
    torch.testing.assert_close(tc.null(1).sequence, tc([""]).sequence, atol=0, rtol=0)


def test_transformers_folder_loads_with_spec_semantics(tiny, prompts):
    # A name fixes semantics, not size: a 32-wide transformers folder loads as SD1.5.
    tc = TextConditioner.from_pretrained("sd15", weights=tiny.sd15 / "text_encoder")
    ids = tiny.tok_l(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    torch.testing.assert_close(tc(prompts).sequence, tiny.clip_l(ids).last_hidden_state, **TOL)
    assert tc.spec.towers[0].width == 32 and tc.spec.towers[0].hidden_layer == -1


@pytest.mark.parametrize("clip_skip", [1, 2])
def test_clip_skip_matches_hidden_states(tiny, prompts, clip_skip):
    # diffusers' encode_prompt(clip_skip=k): final_layer_norm(hidden_states[-(k + 1)]) for SD1.x.
    tc = TextConditioner.from_pretrained("sd15", weights=tiny.sd15, clip_skip=clip_skip)
    ids = tiny.tok_l(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    out = tiny.clip_l(ids, output_hidden_states=True)
    expected = tiny.clip_l.final_layer_norm(out.hidden_states[-(clip_skip + 1)])
    torch.testing.assert_close(tc(prompts).sequence, expected, **TOL)
    assert tc.null(1).sequence.shape == (1, 77, 32)
    torch.testing.assert_close(tc.null(1).sequence, tc([""]).sequence, atol=0, rtol=0)  # same layer for null


def test_penultimate_spec_builds_no_last_block(tiny):
    tc = TextConditioner.from_pretrained("sdxl", weights=tiny.sdxl)
    assert len(tc.towers[0].blocks) == 3  # CLIP-L: penultimate of 4, no pooled needed
    assert len(tc.towers[1].blocks) == 4  # bigG: pooled needs the last block
    assert tc.towers[0].text_projection is None


@pytest.mark.parametrize("name", ["tiny-sd15", "tiny-sd2", "tiny-sdxl-refiner", "tiny-sdxl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dtype_device_and_frozen_contract(name, dtype):
    tc = TextConditioner.from_pretrained(name, dtype=dtype)
    tc.train()
    assert not tc.training and not any(m.training for m in tc.modules())
    assert not any(p.requires_grad for p in tc.parameters())
    with torch.enable_grad():
        c = tc(["a photo of a cat", "a dog"])
    assert c.sequence.dtype == c.pooled.dtype == dtype
    assert c.sequence.device.type == "cpu"
    assert not c.sequence.requires_grad and not torch.is_inference(c.sequence)
    assert torch.isfinite(c.sequence).all() and torch.isfinite(c.pooled).all()
    assert c.sequence.shape == (2, 77, tc.sequence_dim) and c.pooled.shape == (2, tc.pooled_dim)
    # Usable in a training graph (no_grad output, not inference_mode output).
    w = torch.ones((), dtype=dtype, requires_grad=True)
    (c.sequence * w).float().sum().backward()
    assert w.grad is not None


def test_half_precision_follows_float32(tiny, prompts):
    ref = TextConditioner.from_pretrained("sdxl", weights=tiny.sdxl)(prompts)
    for dtype in (torch.float16, torch.bfloat16):
        c = TextConditioner.from_pretrained("sdxl", weights=tiny.sdxl, dtype=dtype)(prompts)
        torch.testing.assert_close(c.sequence.float(), ref.sequence, atol=0.05, rtol=0.05)


def test_null_is_cached_and_follows_dtype():
    tc = TextConditioner.from_pretrained("tiny-sd15")
    a = tc.null(2)
    assert tc._null is not None
    assert a.sequence.shape == (2, 77, 32)
    a.sequence.zero_()  # callers may write into what they get; the cache must not change
    assert tc.null(1).sequence.abs().sum() > 0
    fingerprint = tc.fingerprint
    tc.to(torch.float16)
    assert tc.null(3).sequence.dtype == torch.float16
    assert tc.fingerprint != fingerprint  # the weights' dtype is part of it


def test_encode_drop_prob_statistics_and_reproducibility():
    tc = TextConditioner.from_pretrained("tiny-sd15")
    prompts = [f"prompt number {i}" for i in range(400)]
    g = torch.Generator().manual_seed(0)
    d = tc.encode(prompts, drop_prob=0.25, generator=g)
    null = tc.null(1).sequence[0]
    dropped = torch.tensor([torch.equal(row, null) for row in d.sequence])
    assert 60 <= int(dropped.sum()) <= 140  # Binomial(400, 0.25): mean 100, sd 8.7
    expected = torch.rand(400, generator=torch.Generator().manual_seed(0)) < 0.25
    assert torch.equal(dropped, expected)
    kept = ~dropped
    torch.testing.assert_close(d.sequence[kept], tc([p for p, k in zip(prompts, kept, strict=True) if k]).sequence)
    d2 = tc.encode(prompts, drop_prob=0.25, generator=torch.Generator().manual_seed(0))
    assert torch.equal(d.sequence, d2.sequence)
    assert torch.equal(tc.encode(prompts[:5], drop_prob=1.0).sequence, tc.null(5).sequence)
    assert torch.equal(tc.encode(prompts[:5], drop_prob=0.0).sequence, tc(prompts[:5]).sequence)
    with pytest.raises(ValueError, match=r"drop_prob must be in \[0, 1\], got 1.5"):
        tc.encode(prompts, drop_prob=1.5)


def test_a_truncation_warning_under_dropout_names_the_callers_row(caplog):
    """Bug: encode(drop_prob=...) encodes the kept rows only, and the warning counted within them: with row 1
    dropped, the long row 2 was reported as "prompt[1]"."""
    tc = TextConditioner.from_pretrained("tiny-sd15")
    prompts = ["a cat", "a dog", "word " * 80 + "END"]
    seed = next(s for s in range(100) if (torch.rand(3, generator=torch.Generator().manual_seed(s)) < 0.5).tolist()
                == [False, True, False])  # row 1 dropped, rows 0 and 2 kept
    with caplog.at_level(logging.WARNING, logger="clipcond"):
        tc.encode(prompts, drop_prob=0.5, generator=torch.Generator().manual_seed(seed))
    assert "prompt[2] was truncated" in caplog.text and "prompt[1]" not in caplog.text, caplog.text


def test_a_conditioning_iterates_its_rows_and_refuses_a_row_past_its_end():
    """Bug: c[2] of a 2-row Conditioning was an empty batch, not an IndexError, so `for row in c` never ended."""
    c = TextConditioner.from_pretrained("tiny-sd15")(["a", "b"])
    rows = list(c)
    assert len(rows) == 2 and all(torch.equal(r.sequence, c.sequence[i : i + 1]) for i, r in enumerate(rows))
    assert torch.equal(c[-2].sequence, c.sequence[:1])
    for i in (2, -3):
        with pytest.raises(IndexError, match=rf"row {i} of a Conditioning of 2 rows"):
            c[i]  # noqa: B018


def test_bad_prompts_raise_naming_index_and_type():
    tc = TextConditioner.from_pretrained("tiny-sd15")
    with pytest.raises(TypeError, match=r"prompt\[2\] must be str, got int"):
        tc(["a", "b", 3])
    with pytest.raises(TypeError, match=r"prompt\[0\] must be str, got NoneType"):
        tc.encode([None])
    with pytest.raises(TypeError, match="prompts must be a str or a sequence of str, got int"):
        tc(7)


def test_single_string_and_empty_batch():
    tc = TextConditioner.from_pretrained("tiny-sdxl")
    assert len(tc("a cat")) == 1
    for c in (tc([]), tc.encode([], drop_prob=0.5), tc.null(0)):
        assert c.sequence.shape == (0, 77, 80) and c.pooled.shape == (0, 48)


def test_long_prompt_truncates_with_warning_naming_dropped_text(caplog):
    tc = TextConditioner.from_pretrained("tiny-sd15")
    prompt = "word " * 80 + "tailmarker"
    with caplog.at_level(logging.WARNING, logger="clipcond"):
        c = tc(["short", prompt])
    assert "prompt[1] was truncated" in caplog.text and "tailmarker" in caplog.text
    tokens = tc.tokenize([prompt])[0]
    assert tokens.ids[0, -1] == 49407 and tokens.eos[0] == 76
    assert c.sequence.shape == (2, 77, 32)


def test_conditioning_rows_to_and_cat():
    tc = TextConditioner.from_pretrained("tiny-sdxl")
    c = tc(["a", "b", "c"])
    assert len(c) == 3 and len(c[1:]) == 2 and c[0].sequence.shape == (1, 77, 80)
    assert torch.equal(c[-1].pooled, c.pooled[2:])
    assert torch.equal(c[torch.tensor([2, 0])].sequence, c.sequence[[2, 0]])
    both = Conditioning.cat([tc.null(3), c])
    assert len(both) == 6 and torch.equal(both[3:].sequence, c.sequence)
    half = c.to(torch.float16)
    assert half.sequence.dtype == half.pooled.dtype == torch.float16
    with pytest.raises(ValueError, match="rows differ"):
        Conditioning(c.sequence, c.pooled[:2])
    with pytest.raises(AttributeError):
        c.sequence = c.sequence  # frozen


def test_pooled_reads_first_eos_not_argmax(tiny, tmp_path):
    # Catches pooling at argmax(ids) (transformers' legacy pooler): textual-inversion ids above 49407 win it.
    vectors = torch.randn(2, 32)  # multi-vector: ids 49408, 49409
    file = tmp_path / "learned_embeds.safetensors"
    save_file({"<tok>": vectors}, file)
    prompts = ["a photo of <tok> on a mat", "<tok>", "a cat"]
    tc = TextConditioner.from_pretrained("sd15", weights=tiny.sd15).with_textual_inversion(file)
    # The reference: diffusers' own textual inversion on the saved pipeline, read at the first EOS by hand.
    pipe = tiny.pipeline("sd15")
    pipe.load_textual_inversion(str(file))
    ids = pipe.tokenizer(pipe.maybe_convert_prompt(prompts, pipe.tokenizer), padding="max_length", max_length=77,
                         truncation=True, return_tensors="pt").input_ids
    assert torch.equal(tc.tokenize(prompts)[0].ids, ids) and ids.max() == 49409
    first_eos = [row.index(49407) for row in ids.tolist()]
    assert first_eos == [9, 3, 3] and ids.argmax(1).tolist() == [5, 2, 3]  # argmax moves the read on TI rows
    expected = pipe.text_encoder(ids).last_hidden_state[torch.arange(3), first_eos]  # after final_layer_norm
    torch.testing.assert_close(tc(prompts).pooled, expected, **TOL)


def test_list_encoders_and_from_pretrained_unknown_name():
    names = clipcond.list_encoders()
    assert {"sd15", "sd1", "sd2", "sd21", "sdxl", "sdxl-refiner", "clip-vit-l-14", "openclip-vit-h-14",
            "openclip-vit-bigg-14", "tiny-sdxl"} <= set(names)
    with pytest.raises(KeyError, match="unknown encoder 'sd9'; registered: .*sdxl"):
        TextConditioner.from_pretrained("sd9")


def test_public_tower_interface_equals_diffusers_sdxl(tiny):
    """empty(), feature_slice() and run_tower(), which readers (text/compel_style.py) build on, against diffusers'
    SDXL encode_prompt and text_encoder_2: catches empty() returning SDXL's zero null, a slice off by a tower's
    width, and run_tower running another tower, layer or pooled vector."""
    pipe = tiny.pipeline("sdxl")
    embeds, _, pooled, _ = pipe.encode_prompt([""], device="cpu", do_classifier_free_guidance=False)
    tc = TextConditioner.from_pretrained("sdxl", weights=tiny.sdxl)
    torch.testing.assert_close(tc.empty().sequence, embeds, **TOL)
    torch.testing.assert_close(tc.empty().pooled, pooled, **TOL)
    assert (tc.feature_slice(0), tc.feature_slice(1)) == (slice(0, 32), slice(32, 80))
    ids = pipe.tokenizer_2(["a photo of a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    sequence, projected = tc.run_tower(1, ids, torch.tensor([6]))
    with torch.no_grad():
        out = pipe.text_encoder_2(ids, output_hidden_states=True)
    torch.testing.assert_close(sequence, out.hidden_states[-2], **TOL)
    torch.testing.assert_close(projected, out.text_embeds, **TOL)
