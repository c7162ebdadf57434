"""The T5 recipes (SD3, Flux, PixArt, plain T5) against diffusers 0.42's pipelines and transformers, on tiny
random weights saved in the real pipeline layouts, with the real T5 vocabulary; the float16 policy."""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from t5_fixtures import t5_model

import clipcond
from clipcond import Conditioning, SpecError, TextConditioner, WeightsError, get_spec
from clipcond.registry import REGISTRY
from clipcond.specs import spec_from_dict

TOL = {"atol": 1e-5, "rtol": 0}  # float32, CPU: the bound, max abs error <= 1e-5
PROMPTS = ["a photo of a cat", "a running dog", "", "An Astronaut riding a HORSE on Mars, 8k  ",
           "numbers 1234567890 and 3.14159, café naïve", "a very long prompt " + "with many repeated words " * 100]
NEGATIVES = ["blurry", "", "LOW quality, ugly", "a", "jpeg artifacts", "watermark"]


# --- specs --------------------------------------------------------------------------------------------------

def test_clip_spec_dicts_keep_their_pre_t5_keys():
    """Bug: new recipe fields written into every spec dict change the CLIP specs' fingerprints and make every
    existing store refuse to grow ('holds a store made differently')."""
    keys = {"name", "towers", "pooled_towers", "null", "max_length", "long_prompts", "hub_repo", "source"}
    for name, spec in REGISTRY.items():
        if spec.t5 is None:
            assert set(spec.to_dict()) == keys, name
        assert spec_from_dict(spec.to_dict()) == spec, name


def test_recipe_table():
    """Bug: a preset with the wrong T5 length, mask, padding or combination (OneTrainer tokenizes SD3's T5 at 77)."""
    table = {  # name: (t5 length, mask into T5, padding, lower-case, combine, sequence [L, D], pooled P, pipeline)
        "sd3": (256, False, "raw", "none", "tokens", (333, 4096), 2048, "StableDiffusion3Pipeline"),
        "flux": (512, False, "raw", "none", "t5", (512, 4096), 768, "FluxPipeline"),
        "flux-schnell": (256, False, "raw", "none", "t5", (256, 4096), 768, "FluxPipeline"),
        "pixart-sigma": (300, True, "masked", "lower_strip", "t5", (300, 4096), 0, "PixArtSigmaPipeline"),
        "pixart-alpha": (120, True, "masked", "lower_strip", "t5", (120, 4096), 0, "PixArtAlphaPipeline"),
        "t5-xxl": (512, False, "raw", "none", "t5", (512, 4096), 0, None),
        "chroma": (512, True, "masked", "none", "t5", (512, 4096), 0, "ChromaPipeline"),
        "auraflow": (256, True, "zero", "none", "t5", (256, 2048), 0, "AuraFlowPipeline"),
        "sana": (300, True, "masked", "lower_strip", "t5", (300, 2304), 0, "SanaPipeline"),
    }
    for name, row in table.items():
        s = get_spec(name)
        assert (s.t5_max_length, s.t5_mask, s.padding, s.preprocess, s.combine, (s.sequence_length, s.sequence_dim),
                s.pooled_dim, s.pipeline) == row, name
        ids = {"auraflow": (1, 2)}.get(name, (0, 1))  # pile-T5: pad 1, eos 2; Gemma: pad 0, eos 1 (BOS 2 first)
        vocab = 256000 if name == "sana" else 32128
        assert s.null == "empty" and s.t5.vocab_size == vocab and (s.t5.pad_id, s.t5.eos_id) == ids, name
        architecture = {"auraflow": "umt5", "sana": "gemma2"}.get(name, "t5")
        assert s.mask_pads == (name == "chroma") and s.t5.architecture == architecture
        assert s.instruction.startswith("Given a user prompt") == (name == "sana")
        tiny = get_spec(f"tiny-{name}")
        differ = {f.name for f in dataclasses.fields(s) if getattr(s, f.name) != getattr(tiny, f.name)}
        assert differ <= {"name", "towers", "t5", "hub_repo"}, differ  # a tiny twin keeps the recipe
    assert get_spec("sd3.5") is get_spec("sd3") and get_spec("flux-dev") is get_spec("flux")
    assert get_spec("flux").text_ids and not get_spec("sd3").text_ids


@pytest.mark.parametrize(("changes", "message"), [
    ({"t5_max_length": 600}, r"encoder spec 'flux': t5_max_length must be in \[1, 512\], got 600"),
    ({"padding": "masked"}, r"encoder spec 'flux': padding is 'masked', which needs t5_mask=True"),
    ({"combine": "features"}, r"encoder spec 'flux': combine is 'features'"),
    ({"preprocess": "upper"},
     r"encoder spec 'flux': preprocess must be one of \('none', 'lower_strip', 'clean_caption'\)"),
    ({"long_prompts": "chunk"}, r"encoder spec 'flux': long_prompts must be 'truncate' for a T5 recipe"),
    ({"pad_to": "longest"}, r"encoder spec 'flux': pad_to is 'longest', which needs padding='masked'"),
])
def test_bad_recipe_fields_name_spec_and_field(changes, message):
    """Bug: an inconsistent recipe (masked padding without a mask into T5) accepted and silently wrong."""
    with pytest.raises(SpecError, match=message):
        get_spec("flux").replace(**changes)
    with pytest.raises(SpecError, match=r"spec 'clip-vit-l-14': t5_mask is a T5 recipe field, but the spec has no t5"):
        get_spec("sd15").replace(t5_mask=True)
    with pytest.raises(SpecError, match=r"T5 tower spec 't5-v1_1-xxl': eos_id must differ from pad_id 0"):
        get_spec("flux").t5.replace(eos_id=0)


# --- tokenization -------------------------------------------------------------------------------------------

def test_t5_vocabulary_facts(t5_vocab):
    """Bug: a BOS added, EOS dropped by truncation, or a mask that misses the EOS row (the issue's facts)."""
    tc = TextConditioner.from_pretrained("tiny-flux", tokenizer=t5_vocab["flux"])
    tokens = tc.tokenize(["a running dog", ""])[-1]
    assert tokens.ids[0, :6].tolist() == [3, 9, 1180, 1782, 1, 0]
    assert tokens.ids[1, :3].tolist() == [1, 0, 0] and tokens.ids.shape == (2, 512)
    c = tc(["a running dog", ""])
    assert c.mask is None  # Flux passes no mask
    pix = TextConditioner.from_pretrained("tiny-pixart-sigma", tokenizer=t5_vocab["sd3"])
    assert pix(["a running dog", ""]).mask.tolist() == [[1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]  # to the batch's longest


@pytest.mark.parametrize("which", ["sd3", "flux"])
def test_t5_tokens_equal_the_pipelines_tokenizer_call(t5_vocab, which):
    """Bug: clipcond's own truncation (EOS kept last) or padding differing from tokenizer(padding="max_length",
    truncation=True) on long prompts."""
    from transformers import T5TokenizerFast

    ref = T5TokenizerFast.from_pretrained(t5_vocab[which])
    for name in ("tiny-flux-schnell", "tiny-pixart-alpha"):
        tc = TextConditioner.from_pretrained(name, tokenizer=t5_vocab[which])
        texts = tc.t5_tokenizer.texts(PROMPTS)
        expected = ref(texts, padding="max_length", max_length=tc.spec.t5_max_length, truncation=True,
                       add_special_tokens=True, return_tensors="pt")
        tokens = tc.tokenize(PROMPTS)[-1]
        assert torch.equal(tokens.ids, expected.input_ids)
        assert tokens.truncated and tokens.truncated[0][0] == len(PROMPTS) - 1
        if tc.spec.t5_mask:
            assert torch.equal(tc(PROMPTS).mask, expected.attention_mask)


# --- parity with the pipelines ------------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "length"), [("flux", 512), ("flux-schnell", 256)])
def test_flux_equals_flux_pipeline(t5_pipes, tiny, name, length):
    """Bug: Flux's T5 at the wrong length, given a mask, or its pooled vector not CLIP-L's pooler_output."""
    pipe = t5_pipes.flux_pipeline(tiny)
    tc = TextConditioner.from_pretrained(name, weights=t5_pipes.flux)
    for prompts in (PROMPTS, NEGATIVES):  # FluxPipeline encodes a negative (true_cfg_scale > 1) the same way
        embeds, pooled, text_ids = pipe.encode_prompt(prompts, device="cpu", max_sequence_length=length)
        c = tc(prompts)
        assert c.sequence.shape == (len(prompts), length, 96) and c.pooled.shape == (len(prompts), 32)
        torch.testing.assert_close(c.sequence, embeds, **TOL)
        torch.testing.assert_close(c.pooled, pooled, **TOL)
        assert torch.equal(c.text_ids, text_ids) and c.mask is None
    empty, empty_pooled, _ = pipe.encode_prompt([""] * 3, device="cpu", max_sequence_length=length)
    torch.testing.assert_close(tc.null(3).sequence, empty, **TOL)  # Flux's null: "" encoded
    torch.testing.assert_close(tc.null(3).pooled, empty_pooled, **TOL)


def test_sd3_equals_stable_diffusion_3_pipeline(t5_pipes):
    """Bug: SD3's CLIP rows not zero-padded to T5's width, concatenated along features instead of tokens, T5 at 77,
    or the pooled halves in the wrong order."""
    pipe = t5_pipes.sd3_pipeline()
    seq, neg, pooled, neg_pooled = pipe.encode_prompt(PROMPTS, None, None, device="cpu", negative_prompt=NEGATIVES,
                                                      do_classifier_free_guidance=True)
    tc = TextConditioner.from_pretrained("sd3.5", weights=t5_pipes.sd3)
    c, n = tc(PROMPTS), tc(NEGATIVES)
    assert c.sequence.shape == (len(PROMPTS), 77 + 256, 96) and c.pooled.shape == (len(PROMPTS), 32 + 48)
    assert not c.sequence[:, :77, 80:].any()  # the CLIP rows' padding columns
    for got, ref in ((c.sequence, seq), (c.pooled, pooled), (n.sequence, neg), (n.pooled, neg_pooled)):
        torch.testing.assert_close(got, ref, **TOL)
    _, null, _, null_pooled = pipe.encode_prompt(PROMPTS[:2], None, None, device="cpu")  # negative defaults to ""
    torch.testing.assert_close(tc.null(2).sequence, null, **TOL)
    torch.testing.assert_close(tc.null(2).pooled, null_pooled, **TOL)


def test_sd3_clip_skip_equals_the_pipeline(t5_pipes):
    """Bug: clip_skip applied to T5 (which has no such notion) or not to both CLIP towers."""
    pipe = t5_pipes.sd3_pipeline()
    seq, _, pooled, _ = pipe.encode_prompt(PROMPTS, None, None, device="cpu", clip_skip=1,
                                           do_classifier_free_guidance=False)
    c = TextConditioner.from_pretrained("sd3", weights=t5_pipes.sd3, clip_skip=1)(PROMPTS)
    torch.testing.assert_close(c.sequence, seq, **TOL)
    torch.testing.assert_close(c.pooled, pooled, **TOL)


@pytest.mark.parametrize(("name", "pipeline", "length"), [("pixart-sigma", "PixArtSigmaPipeline", 300),
                                                          ("pixart-alpha", "PixArtAlphaPipeline", 120)])
def test_pixart_equals_pixart_pipeline(t5_pipes, name, pipeline, length):
    """Bug: PixArt's prompts not lower-cased and stripped, its mask not given to T5, or the mask returned wrong."""
    pipe = t5_pipes.pixart_pipeline(pipeline)
    embeds, mask, neg, neg_mask = pipe.encode_prompt(PROMPTS, negative_prompt=NEGATIVES, device="cpu",
                                                     max_sequence_length=length)
    tc = TextConditioner.from_pretrained(name, weights=t5_pipes.pixart)
    full = TextConditioner.from_pretrained(name, weights=t5_pipes.pixart, pad_to="max_length")
    c, n = tc(PROMPTS), tc(NEGATIVES)
    longest = int(mask.sum(1).max())  # pad_to="longest" (the preset): the batch's longest prompt
    assert c.sequence.shape == (len(PROMPTS), longest, 96) and c.pooled.shape == (len(PROMPTS), 0)
    assert longest == length and tc(PROMPTS[:-1]).sequence.shape[1] == int(mask[:-1].sum(1).max()) < length
    for got, ref, ref_mask in ((c, embeds, mask), (n, neg, neg_mask), (full(PROMPTS), embeds, mask)):
        width = got.sequence.shape[1]
        assert torch.equal(got.mask, ref_mask[:, :width]) and got.mask.dtype == ref_mask.dtype
        torch.testing.assert_close(got.sequence[got.mask.bool()], ref[ref_mask.bool()], **TOL)  # the rows attended
        assert not got.sequence[~got.mask.bool()].any()  # the rest: zeros, never diffusers' unread pad outputs
    assert full(PROMPTS).sequence.shape == (len(PROMPTS), length, 96)
    alone = tc(PROMPTS[0])  # batched to its own length: the same row as in the batch, padded
    assert alone.sequence.shape[1] == int(mask[0].sum())
    torch.testing.assert_close(alone.padded(longest).sequence, c.sequence[:1], **TOL)
    upper = TextConditioner.from_pretrained(name, weights=t5_pipes.pixart, preprocess="none")(PROMPTS)
    assert not torch.allclose(upper.sequence[3], embeds[3], atol=1e-3)  # "An Astronaut ... HORSE": case matters
    _, _, null, null_mask = pipe.encode_prompt(PROMPTS[:2], device="cpu", max_sequence_length=length)
    assert tc.null(2).sequence.shape[1] == 1 and torch.equal(full.null(2).mask, null_mask)  # "": its EOS alone
    torch.testing.assert_close(tc.null(2).sequence, null[:, :1], **TOL)


def test_chroma_equals_chroma_pipeline(t5_pipes):
    """Bug: Chroma's mask without the one pad after the EOS that its transformer attends to, T5 run without the
    tokenizer's mask (or with Chroma's longer one), the kept pad's row zeroed, or its mask handed to the pipeline as
    int64 (ChromaPipeline returns it in the embeddings' dtype and SDPA refuses int64 masks)."""
    pipe = t5_pipes.chroma_pipeline()
    embeds, text_ids, mask, neg, neg_ids, neg_mask = pipe.encode_prompt(PROMPTS, negative_prompt=NEGATIVES,
                                                                        device="cpu", max_sequence_length=512)
    tc = TextConditioner.from_pretrained("chroma", weights=t5_pipes.chroma)
    c, n = tc(PROMPTS), tc(NEGATIVES)
    assert c.sequence.shape[1] < 512  # the batch's longest prompt and its kept pad
    c, n = c.padded(512), n.padded(512)
    tokenizer_mask = t5_pipes.tokenizer("sd3")(PROMPTS, padding="max_length", max_length=512, truncation=True,
                                               return_tensors="pt").attention_mask
    lengths = torch.clamp(tokenizer_mask.sum(1) + 1, max=512)  # one pad kept; a 512-token prompt has none to keep
    assert torch.equal(c.mask.sum(1), lengths) and c.mask.dtype == torch.int64
    for got, ref, ref_mask in ((c, embeds, mask), (n, neg, neg_mask)):
        assert torch.equal(got.mask, ref_mask.long())
        torch.testing.assert_close(got.sequence[got.mask.bool()], ref[ref_mask.bool()], **TOL)  # rows attended to
        assert not got.sequence[~got.mask.bool()].any()  # the others: zeros (diffusers leaves unread pad outputs)
    assert torch.equal(c.text_ids, text_ids) and torch.equal(n.text_ids, neg_ids)
    kwargs = c.pipeline_kwargs(negative=n)
    assert kwargs["prompt_attention_mask"].dtype == mask.dtype and torch.equal(kwargs["prompt_attention_mask"], mask)
    assert torch.equal(kwargs["negative_prompt_attention_mask"], neg_mask)
    _, _, _, null, _, null_mask = pipe.encode_prompt(PROMPTS[:2], device="cpu")  # negative defaults to ""
    assert tc.null(2).mask.tolist() == [[1, 1], [1, 1]]  # "": its EOS and the kept pad
    torch.testing.assert_close(tc.null(2).sequence, null[:, :2], **TOL)
    assert torch.equal(tc.null(2).padded(512).mask, null_mask.long())


def test_auraflow_equals_auraflow_pipeline(t5_pipes):
    """Bug: AuraFlow's UMT5 read as a T5 (one relative-attention table instead of one per block), run without its
    mask, its padding rows left unzeroed, or its mask in the [B, L * D] form encode_prompt returns it in."""
    pipe = t5_pipes.aura_pipeline()
    embeds, mask, neg, neg_mask = pipe.encode_prompt(PROMPTS, negative_prompt=NEGATIVES, device="cpu")
    tc = TextConditioner.from_pretrained("auraflow", weights=t5_pipes.aura)
    assert type(tc.t5.model).__name__ == "UMT5EncoderModel"
    c, n = tc(PROMPTS), tc(NEGATIVES)
    assert c.sequence.shape == (len(PROMPTS), 256, 96) and c.pooled.shape == (len(PROMPTS), 0)
    for got, ref, ref_mask in ((c, embeds, mask), (n, neg, neg_mask)):
        assert ref_mask.shape == (len(PROMPTS), 256 * 96)  # diffusers' mask, expanded over the features
        assert torch.equal(got.mask, ref_mask.reshape(len(PROMPTS), 256, 96)[..., 0])
        torch.testing.assert_close(got.sequence, ref, **TOL)
        assert not got.sequence[~got.mask.bool()].any() and got.sequence[got.mask.bool()].abs().amax() > 0.01
    assert c.mask[-1].all()  # the long prompt: truncated to 256 tokens, EOS last
    assert tc.tokenize(PROMPTS)[-1].ids[-1, -1] == 2 and tc.tokenize(["a"])[-1].ids[0, 2:].eq(1).all()  # pad 1
    _, _, null, _ = pipe.encode_prompt(PROMPTS[:2], device="cpu")
    torch.testing.assert_close(tc.null(2).sequence, null, **TOL)
    kwargs = c.pipeline_kwargs(negative=n)  # what AuraFlowPipeline.__call__ requires with prompt_embeds
    pipe.check_inputs(None, 1024, 1024, None, **kwargs)
    assert set(kwargs) == {"prompt_embeds", "prompt_attention_mask", "negative_prompt_embeds",
                           "negative_prompt_attention_mask"}


def test_t5_xxl_equals_t5_encoder_model(t5_pipes, t5_vocab):
    """Bug: the plain tower read through a mask or at another length than T5EncoderModel(ids).last_hidden_state."""
    tc = TextConditioner.from_pretrained("t5-xxl", weights=t5_pipes.pixart / "text_encoder", tokenizer=t5_vocab["sd3"])
    ids = t5_pipes.tokenizer("sd3")(PROMPTS, padding="max_length", max_length=512, truncation=True,
                                    return_tensors="pt").input_ids
    with torch.no_grad():
        ref = t5_pipes.reference_t5(t5_pipes.pixart, "text_encoder")(ids).last_hidden_state
    torch.testing.assert_close(tc(PROMPTS).sequence, ref, **TOL)


def test_pipeline_kwargs_are_the_pipelines_call_keywords(t5_pipes, tiny):
    """Bug: keyword names the pipeline does not take (pipe(**kwargs) raises) or a mask under the wrong name."""
    import diffusers

    for name, weights in (("sd3", t5_pipes.sd3), ("flux", t5_pipes.flux), ("pixart-sigma", t5_pipes.pixart),
                          ("pixart-alpha", t5_pipes.pixart), ("chroma", t5_pipes.chroma),
                          ("auraflow", t5_pipes.aura)):
        tc = TextConditioner.from_pretrained(name, weights=weights)
        c = tc(PROMPTS[:2])
        kwargs = c.pipeline_kwargs(negative=tc.null(2))
        accepted = inspect.signature(getattr(diffusers, tc.spec.pipeline).__call__).parameters
        assert set(kwargs) <= set(accepted), set(kwargs) - set(accepted)
        assert kwargs["prompt_embeds"] is c.sequence and kwargs["negative_prompt_embeds"].shape == c.sequence.shape
        if c.mask is not None:
            assert torch.equal(kwargs["prompt_attention_mask"].long(), c.mask)
            assert "negative_prompt_attention_mask" in kwargs
        else:
            assert kwargs["pooled_prompt_embeds"] is c.pooled and "negative_pooled_prompt_embeds" in kwargs
    with pytest.raises(ValueError, match="pipeline_kwargs: this Conditioning names pipeline None"):
        TextConditioner.from_pretrained("tiny-sd15")("a").pipeline_kwargs()


def test_pipeline_kwargs_without_a_negative_meet_the_pipelines_own_negative(t5_pipes):
    """With CFG and no negative embeddings, PixArt's and Sana's pipelines encode their own negative and
    concatenate it with the prompt's along the batch. Bug: Sana's own negative is 300 rows whatever the prompt
    (max_sequence_length), so a batch at its longest row fails in torch.cat ("Expected size 300 but got 6")."""
    for name, weights, pipe in (("sana", t5_pipes.sana, t5_pipes.sana_pipeline()),
                                ("pixart-sigma", t5_pipes.pixart, t5_pipes.pixart_pipeline("PixArtSigmaPipeline"))):
        tc = TextConditioner.from_pretrained(name, weights=weights)
        c = tc(PROMPTS[:2])
        kwargs = c.pipeline_kwargs()
        positive, mask, negative, negative_mask = pipe.encode_prompt(None, do_classifier_free_guidance=True,
                                                                     device="cpu", **kwargs)
        both = torch.cat([negative, positive])  # the pipeline's __call__ does this
        assert both.shape[1] == negative.shape[1] and torch.cat([negative_mask, mask]).shape == both.shape[:2]
        length = c.sequence.shape[1]
        assert torch.equal(positive[:, :length], c.sequence) and not positive[:, length:].any()
        assert torch.equal(mask[:, :length].long(), c.mask) and not mask[:, length:].any()


# --- Conditioning, null and dropout -------------------------------------------------------------------------

def test_conditioning_carries_mask_and_text_ids(t5_pipes):
    """Bug: cat, indexing or .to() dropping the mask, casting it to float16, or batching Flux's text_ids."""
    pix = TextConditioner.from_pretrained("pixart-alpha", weights=t5_pipes.pixart)
    c = pix(PROMPTS[:3])
    both = Conditioning.cat([pix.null(2), c])  # the null's one row padded to the captions' longest
    assert both.mask.shape == (5, c.sequence.shape[1]) and torch.equal(both.mask[2:], c.mask)
    assert both.mask[:2].sum(1).tolist() == [1, 1] and not both.sequence[:2, 1:].any()
    assert both.pipeline == "PixArtAlphaPipeline"
    assert torch.equal(c[1].mask, c.mask[1:2]) and torch.equal(c[[2, 0]].mask, c.mask[[2, 0]])
    half = c.to(torch.float16)
    assert half.sequence.dtype == torch.float16 and half.mask.dtype == torch.int64
    flux = TextConditioner.from_pretrained("flux-schnell", weights=t5_pipes.flux)
    f = Conditioning.cat([flux("a"), flux(["b", "c"])])
    assert f.text_ids.shape == (256, 3) and f[0].text_ids.shape == (256, 3)
    with pytest.raises(ValueError, match="some items have a mask and some do not"):
        Conditioning.cat([c, flux("a")])


def test_caption_dropout_keeps_masks(t5_pipes):
    """Bug: rows dropped to the null keeping the caption's mask (PixArt would attend to the caption's length)."""
    tc = TextConditioner.from_pretrained("pixart-sigma", weights=t5_pipes.pixart)
    g = torch.Generator().manual_seed(0)
    d = tc.encode(PROMPTS, drop_prob=0.5, generator=g)
    dropped = (torch.rand(len(PROMPTS), generator=torch.Generator().manual_seed(0)) < 0.5).tolist()
    assert 0 < sum(dropped) < len(PROMPTS)
    full = tc(PROMPTS)
    assert d.sequence.shape[1] == full.sequence.shape[1]
    for i, drop in enumerate(dropped):
        ref = tc.null(1).padded(full.sequence.shape[1]) if drop else full[i]
        assert torch.equal(d.mask[i], ref.mask[0])
        torch.testing.assert_close(d.sequence[i], ref.sequence[0], **TOL)


def sd3_towers(pipe, prompts):
    """SD3's three encodings, each from diffusers' own per-tower helper: (L [B, 77, W_L], L pooled), (G ...), T5."""
    l_seq, l_pooled = pipe._get_clip_prompt_embeds(prompts, device="cpu", clip_model_index=0)
    g_seq, g_pooled = pipe._get_clip_prompt_embeds(prompts, device="cpu", clip_model_index=1)
    return (l_seq, l_pooled), (g_seq, g_pooled), pipe._get_t5_prompt_embeds(prompts, max_sequence_length=256,
                                                                             device="cpu")


def test_sd3_caption_dropout_per_tower_as_kohya(t5_pipes):
    """Bug: per-encoder caption dropout (kohya's --clip_l/--clip_g/--t5_dropout_rate) replacing a tower's part with
    the empty prompt's encoding instead of zeros, zeroing the wrong columns (CLIP-G's 48 are after CLIP-L's 32), the
    wrong pooled half, or T5 rows of rows whose T5 was kept. The reference is assembled by hand from diffusers'
    per-tower helpers, as kohya's strategy_sd3 concatenates them (zeros for a dropped tower, then L ⊕ G padded to
    T5's width, then T5's rows)."""
    pipe = t5_pipes.sd3_pipeline()
    tc = TextConditioner.from_pretrained("sd3", weights=t5_pipes.sd3)
    (l_seq, l_pooled), (g_seq, g_pooled), t5 = sd3_towers(pipe, PROMPTS)
    probs = {"clip_l": 0.5, "clip_g": 0.5, "t5": 0.5}
    d = tc.encode(PROMPTS, drop_prob=probs, generator=torch.Generator().manual_seed(0))
    draws = torch.Generator().manual_seed(0)  # clipcond's documented draws: one torch.rand(B) per tower, in order
    drop = {k: torch.rand(len(PROMPTS), generator=draws) < p for k, p in probs.items()}
    assert all(0 < int(v.sum()) < len(PROMPTS) for v in drop.values())  # every tower dropped in some rows only
    l_seq[drop["clip_l"]], l_pooled[drop["clip_l"]] = 0, 0
    g_seq[drop["clip_g"]], g_pooled[drop["clip_g"]] = 0, 0
    t5[drop["t5"]] = 0
    clip = torch.nn.functional.pad(torch.cat([l_seq, g_seq], dim=-1), (0, 96 - 80))
    torch.testing.assert_close(d.sequence, torch.cat([clip, t5], dim=-2), **TOL)
    torch.testing.assert_close(d.pooled, torch.cat([l_pooled, g_pooled], dim=-1), **TOL)
    only_t5 = tc.encode(PROMPTS, drop_prob={"clip_l": 0, "clip_g": 0, "t5": 1})
    full = tc(PROMPTS)
    assert torch.equal(only_t5.sequence[:, :77], full.sequence[:, :77]) and not only_t5.sequence[:, 77:].any()
    assert torch.equal(only_t5.pooled, full.pooled)
    with pytest.raises(ValueError, match=r"sd3: drop_prob=\{...\} needs a probability in \[0, 1\] for each of "
                                         r"\['clip_l', 'clip_g', 't5'\]"):
        tc.encode(PROMPTS, drop_prob={"clip_l": 0.1, "t5": 0.1})


def test_flux_caption_dropout_per_tower(t5_pipes):
    """Bug: Flux's CLIP-L dropout touching the T5 sequence (its CLIP-L gives only the pooled vector), or a masked
    recipe given per-tower dropout and left with an all-zero mask (its transformer would attend to nothing)."""
    tc = TextConditioner.from_pretrained("flux-schnell", weights=t5_pipes.flux)
    full = tc(PROMPTS[:3])
    d = tc.encode(PROMPTS[:3], drop_prob={"clip_l": 1.0, "t5": 0.0})
    assert torch.equal(d.sequence, full.sequence) and not d.pooled.any()
    d = tc.encode(PROMPTS[:3], drop_prob={"clip_l": 0.0, "t5": 1.0})
    assert torch.equal(d.pooled, full.pooled) and not d.sequence.any()
    pix = TextConditioner.from_pretrained("pixart-sigma", weights=t5_pipes.pixart)
    with pytest.raises(ValueError, match="pixart-sigma: drop_prob per tower is for unmasked recipes"):
        pix.encode(PROMPTS, drop_prob={"t5": 0.5})


# --- float16 ------------------------------------------------------------------------------------------------

def overflowing_t5(tower):
    """A T5 whose first feed-forward output exceeds float16's 65504 (random weights alone never do): its gated
    product stays ~1e3, representable, and wo sums it to ~1e5, as T5 v1.1-XXL's wo does on real prompts."""
    model = t5_model(tower, seed=5)
    ff = model.encoder.block[0].layer[1].DenseReluDense
    with torch.no_grad():
        for linear, std in ((ff.wi_0, 3.0), (ff.wi_1, 3.0), (ff.wo, 20.0)):  # |wi x| ~ 30 on normalised x
            linear.weight.mul_(std / linear.weight.std())
    return model


def test_float16_keeps_wo_in_float32_after_half(t5_pipes, t5_vocab, tmp_path):
    """Bug (diffusers#8604): .half() / .to(float16) after loading casts T5's wo to float16 and the feed-forward
    overflows: inf, NaN or values clamped to ±64504, far from float32 (corrupted images)."""
    folder = tmp_path / "t5"
    model = overflowing_t5(get_spec("tiny-t5-xxl").t5)
    model.save_pretrained(folder)
    ids = t5_pipes.tokenizer("sd3")(PROMPTS, padding="max_length", max_length=512, truncation=True,
                                    return_tensors="pt").input_ids
    ff, norm = model.encoder.block[0].layer[1].DenseReluDense, model.encoder.block[0].layer[1].layer_norm
    with torch.no_grad():
        x = norm(model.shared(ids))
        gated = ff.act(ff.wi_0(x)) * ff.wi_1(x)
        assert gated.abs().max() < 65504 < ff.wo(gated).abs().max()  # the overflow is wo's, as in T5 v1.1-XXL
        ref = model(ids).last_hidden_state  # float32
        plain = model.half()(ids).last_hidden_state.float()  # transformers' model, cast after loading
    assert not torch.isfinite(plain).all() or (plain - ref).abs().max() > 0.1
    tc = TextConditioner.from_pretrained("t5-xxl", weights=folder, tokenizer=t5_vocab["sd3"])
    casts = {"dtype=float16": TextConditioner.from_pretrained("t5-xxl", weights=folder, tokenizer=t5_vocab["sd3"],
                                                               dtype=torch.float16),
             ".half()": TextConditioner.from_pretrained("t5-xxl", weights=folder, tokenizer=t5_vocab["sd3"]).half(),
             ".to(float16)": tc.to(torch.float16)}
    for how, half in casts.items():
        wo = [p for n, p in half.named_parameters() if n.endswith("DenseReluDense.wo.weight")]
        assert wo and all(p.dtype == torch.float32 for p in wo), how
        assert half.t5.model.shared.weight.dtype == torch.float16 and half.dtype == torch.float16
        out = half(PROMPTS).sequence
        assert out.dtype == torch.float16 and torch.isfinite(out).all(), how
        torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2, msg=how)
    exact = TextConditioner.from_pretrained("t5-xxl", weights=folder, tokenizer=t5_vocab["sd3"]).half()
    wo = exact.t5.model.encoder.block[0].layer[1].DenseReluDense.wo.weight
    assert torch.equal(wo, load_file(folder / "model.safetensors")["encoder.block.0.layer.1.DenseReluDense.wo.weight"])


# --- weights ------------------------------------------------------------------------------------------------

def test_t5_weights_are_read_strictly(t5_pipes, tmp_path):
    """Bug: a T5 file missing tensors (or holding another model's) loaded with random or default values."""
    import shutil

    folder = tmp_path / "t5"
    shutil.copytree(t5_pipes.pixart / "text_encoder", folder)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    key = "encoder.block.1.layer.0.SelfAttention.q.weight"
    shard = folder / index["weight_map"][key]
    state = load_file(shard)
    state["encoder.block.1.layer.0.SelfAttention.qq.weight"] = state.pop(key)
    save_file(state, shard)
    with pytest.raises(WeightsError, match=r"1 missing T5 encoder tensor\(s\) .*: encoder.block.1.layer.0.Self"):
        TextConditioner.from_pretrained("t5-xxl", weights=folder, tokenizer=t5_pipes.vocab["sd3"])
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "feed_forward_proj": "relu"}))
    with pytest.raises(WeightsError, match=r"feed_forward_proj 'relu', but tower 't5-v1_1-xxl' is 'gated-gelu'"):
        TextConditioner.from_pretrained("t5-xxl", weights=folder, tokenizer=t5_pipes.vocab["sd3"])


def test_full_t5_folder_reads_only_the_encoder(t5_pipes, t5_vocab, tmp_path):
    """Bug: a transformers T5ForConditionalGeneration folder (google/t5-v1_1-xxl's layout) refused for its decoder
    tensors, or its shared embedding missed."""
    from transformers import T5ForConditionalGeneration

    full = T5ForConditionalGeneration(t5_pipes.t5.config.__class__(**{**t5_pipes.t5.config.to_dict(),
                                                                     "is_encoder_decoder": True}))
    full.encoder.load_state_dict(t5_pipes.t5.encoder.state_dict())
    full.shared.load_state_dict(t5_pipes.t5.shared.state_dict())
    full.save_pretrained(tmp_path / "full")
    tc = TextConditioner.from_pretrained("t5-xxl", weights=tmp_path / "full", tokenizer=t5_vocab["sd3"])
    ref = TextConditioner.from_pretrained("t5-xxl", weights=t5_pipes.pixart / "text_encoder",
                                          tokenizer=t5_vocab["sd3"])
    assert torch.equal(tc(PROMPTS).sequence, ref(PROMPTS).sequence) and tc.fingerprint == ref.fingerprint


def hub_snapshot(tmp_path: Path, repo: str) -> Path:
    """An empty snapshot folder of ``repo`` in a Hugging Face cache under ``tmp_path`` (HF_HOME), ``main`` at it."""
    commit = "c" * 40
    snapshot = tmp_path / "hub" / f"models--{repo.replace('/', '--')}" / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text(commit)
    return snapshot


def offline_encode(tmp_path: Path, name: str, prompts: list[str]) -> tuple[dict[str, torch.Tensor], str]:
    """``TextConditioner.from_pretrained(name)(prompts)`` in a fresh process offline, with ``tmp_path`` as HF_HOME:
    its sequence and pooled tensors, and its stderr."""
    out = tmp_path / "out.safetensors"
    code = ("import clipcond; from safetensors.torch import save_file\n"
            f"c = clipcond.TextConditioner.from_pretrained({name!r})({prompts!r})\n"
            f"save_file({{'s': c.sequence, 'p': c.pooled}}, {str(out)!r})")
    env = {**os.environ, "HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return load_file(out), result.stderr


def test_flux_from_the_hub_cache_offline(t5_pipes, tmp_path):
    """Bug: a hub id resolving only the CLIP half (text_encoder/), or downloading more than the text encoders."""
    repo = "black-forest-labs/FLUX.1-dev"
    snapshot = hub_snapshot(tmp_path, repo)
    for sub in ("text_encoder", "text_encoder_2", "tokenizer_2"):
        (snapshot / sub).mkdir()
        for file in (t5_pipes.flux / sub).iterdir():
            (snapshot / sub / file.name).write_bytes(file.read_bytes())
    got, _ = offline_encode(tmp_path, "flux", PROMPTS[:3])
    ref = TextConditioner.from_pretrained("flux", weights=t5_pipes.flux)(PROMPTS[:3])
    assert torch.equal(got["s"], ref.sequence) and torch.equal(got["p"], ref.pooled)


def test_t5_xxl_from_a_hub_cache_holding_only_pickles(t5_pipes, t5_vocab, tmp_path):
    """Bug: google/t5-v1_1-xxl's main branch (a full T5 as pytorch_model.bin, no safetensors) refused, its decoder
    tensors read, or the pickle loaded with code execution allowed."""
    from transformers import T5ForConditionalGeneration

    full = T5ForConditionalGeneration(t5_pipes.t5.config.__class__(**{**t5_pipes.t5.config.to_dict(),
                                                                     "is_encoder_decoder": True}))
    full.encoder.load_state_dict(t5_pipes.t5.encoder.state_dict())
    full.shared.load_state_dict(t5_pipes.t5.shared.state_dict())
    snapshot = hub_snapshot(tmp_path, "google/t5-v1_1-xxl")
    full.config.save_pretrained(snapshot)
    torch.save(full.state_dict(), snapshot / "pytorch_model.bin")
    for file in t5_vocab["sd3"].iterdir():
        (snapshot / file.name).write_bytes(file.read_bytes())
    got, stderr = offline_encode(tmp_path, "t5-xxl", PROMPTS[:3])
    assert "pickled weights; prefer .safetensors" in stderr
    ref = TextConditioner.from_pretrained("t5-xxl", weights=t5_pipes.pixart / "text_encoder",
                                          tokenizer=t5_vocab["sd3"])
    assert torch.equal(got["s"], ref(PROMPTS[:3]).sequence)


def test_random_tiny_recipe_needs_a_tokenizer():
    """Bug: a tiny T5 recipe without weights silently tokenizing with some other vocabulary."""
    with pytest.raises(WeightsError, match=r"tiny-flux: random weights, but no T5 tokenizer: pass tokenizer=PATH"):
        TextConditioner.from_pretrained("tiny-flux")
    assert clipcond.list_encoders().count("flux-dev") == 1


def test_per_tower_files_as_a_mapping(t5_pipes, t5_vocab, tmp_path):
    """Bug: ComfyUI / kohya standalone files (clip_l.safetensors, t5xxl_fp16.safetensors) refused, read into the
    wrong tower, or a float16 file's wo left in float16 under dtype=float16."""
    state = {k: v for k, v in t5_pipes.t5.state_dict().items() if k != "encoder.embed_tokens.weight"}
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "t5xxl.safetensors")
    save_file({k: v.half().contiguous() for k, v in state.items()}, tmp_path / "t5xxl_fp16.safetensors")
    clip_l = t5_pipes.flux / "text_encoder" / "model.safetensors"
    ref = TextConditioner.from_pretrained("tiny-flux", weights=t5_pipes.flux)
    tc = TextConditioner.from_pretrained("tiny-flux", weights={"clip_l": clip_l, "t5": tmp_path / "t5xxl.safetensors"},
                                         tokenizer=t5_vocab["flux"])
    c, r = tc(PROMPTS), ref(PROMPTS)
    assert torch.equal(c.sequence, r.sequence) and torch.equal(c.pooled, r.pooled)
    half = TextConditioner.from_pretrained("tiny-flux", dtype=torch.float16, tokenizer=t5_vocab["flux"],
                                           weights={"clip_l": clip_l, "t5": tmp_path / "t5xxl_fp16.safetensors"})
    assert half.t5.model.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == torch.float32
    torch.testing.assert_close(half(PROMPTS).sequence.float(), r.sequence, atol=1e-2, rtol=1e-2)
    with pytest.raises(ValueError, match=r"tiny-flux: weights=\{...\} needs exactly the keys \['clip_l', 't5'\]"):
        TextConditioner.from_pretrained("tiny-flux", weights={"t5": tmp_path / "t5xxl.safetensors"})
    with pytest.raises(WeightsError, match="a single T5 file has no tokenizer beside it; pass tokenizer=PATH"):
        TextConditioner.from_pretrained("tiny-flux", weights={"clip_l": clip_l, "t5": tmp_path / "t5xxl.safetensors"})


def test_precompute_of_an_unmasked_t5_recipe_stores_what_tc_gives(t5_vocab, tmp_path, capsys):
    """`clipcond precompute --encoder flux` (issue 18, done-when): the CLI takes the T5 tokenizer (--tokenizer) and
    the store holds each caption's [512, D] sequence and pooled vector exactly as tc() computes them; a masked
    recipe (PixArt) stores its mask with its rows (issue 19; tests/test_t5_store.py)."""
    from clipcond import EmbeddingStore
    from clipcond.cli import main

    captions = ["a cat", "a running dog", "a cat", "the sea at night"]
    (tmp_path / "captions.txt").write_text("\n".join(captions) + "\n")
    base = ["precompute", "--input", str(tmp_path / "captions.txt"), "--tokenizer", str(t5_vocab["flux"])]
    assert main([*base, "--encoder", "tiny-flux", "--out", str(tmp_path / "flux")]) == 0, capsys.readouterr().err
    store = EmbeddingStore(tmp_path / "flux")
    tc = TextConditioner.from_pretrained("tiny-flux", tokenizer=t5_vocab["flux"])
    expected = tc(captions)
    assert len(store) == 4 and store.manifest.sequence_shape == (512, expected.sequence.shape[-1])
    for i in range(len(captions)):
        torch.testing.assert_close(store[i]["sequence"], expected.sequence[i], atol=1e-6, rtol=0)
        torch.testing.assert_close(store[i]["pooled"], expected.pooled[i], atol=1e-6, rtol=0)
    assert main([*base, "--encoder", "tiny-pixart-sigma", "--out", str(tmp_path / "pixart")]) == 0
    pixart = TextConditioner.from_pretrained("tiny-pixart-sigma", tokenizer=t5_vocab["flux"], pad_to="max_length")
    assert torch.equal(EmbeddingStore(tmp_path / "pixart")[1]["mask"], pixart(captions).mask[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_masked_t5_forward_is_transformers_forward_bit_for_bit(dtype):
    """The masked forward builds T5's position bias plus padding mask once for all blocks (transformers'
    SDPA path rebuilt it in every block): a wrong fill value, dtype or broadcast would change the rows, so it
    must equal ``T5EncoderModel(input_ids, attention_mask)`` exactly, ragged masks and an all-ones mask too."""
    from clipcond.encoders.t5 import random_t5

    spec = clipcond.get_spec("tiny-pixart-sigma").t5.replace(d_model=64, heads=4, d_kv=16, layers=3)
    tower = random_t5(spec, seed=1).to(dtype)
    ids = torch.randint(2, 32000, (4, 40), generator=torch.Generator().manual_seed(0))
    mask = (torch.arange(40)[None] < torch.tensor([1, 7, 40, 23])[:, None]).long()
    ids[mask == 0] = 0
    with torch.no_grad():
        for m in (mask, torch.ones_like(mask), mask[1:2]):
            got = tower(ids[: len(m)], m)
            want = tower.model(input_ids=ids[: len(m)], attention_mask=m).last_hidden_state
            assert torch.equal(got, want), (dtype, m.sum(1).tolist())


def test_pixart_clean_caption_equals_the_pipeline_s(t5_pipes):
    """Bug: clean_caption=True (the PixArt pipelines' __call__ default) not applied, applied once instead of twice,
    or not to the negative prompt; or a missing dependency making it silently lower-case only."""
    pipe = t5_pipes.pixart_pipeline("PixArtSigmaPipeline")
    prompts = ["A <b>Red</b> CAT at https://example.com/cat.jpg #cute @someone", "  Photo: IMG_1234.JPG ***SALE***  ",
               "a dog   running &amp; jumping -- 100% free!!!", "日本語 a cat"]
    negatives = ["<i>blurry</i>, www.bad.com", "", "LOW quality", "a"]
    embeds, mask, neg, neg_mask = pipe.encode_prompt(prompts, negative_prompt=negatives, device="cpu",
                                                     max_sequence_length=300, clean_caption=True)
    tc = TextConditioner.from_pretrained("pixart-sigma", weights=t5_pipes.pixart, preprocess="clean_caption",
                                         pad_to="max_length")
    assert tc.t5_tokenizer.texts(prompts[:1]) == ["a red cat at cute"]  # the rules' effect, as facts
    for got, ref, ref_mask in ((tc(prompts), embeds, mask), (tc(negatives), neg, neg_mask)):
        assert torch.equal(got.mask, ref_mask)
        torch.testing.assert_close(got.sequence[got.mask.bool()], ref[ref_mask.bool()], **TOL)
    plain = TextConditioner.from_pretrained("pixart-sigma", weights=t5_pipes.pixart, pad_to="max_length")
    assert not torch.equal(plain(prompts).mask, mask)  # lower-casing alone keeps the URL's tokens


def test_clean_caption_without_its_dependencies_is_refused_not_skipped(t5_pipes, monkeypatch):
    """Bug: diffusers' silent fallback (lower-case only, a warning) taken over: another conditioning than asked."""
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bs4" else find_spec(name, *a))
    tc = TextConditioner.from_pretrained("pixart-sigma", weights=t5_pipes.pixart, preprocess="clean_caption")
    with pytest.raises(ImportError, match=r"needs beautifulsoup4: pip install clipcond\[pixart\]"):
        tc(["a cat"])


def test_sana_equals_sana_pipeline(t5_pipes):
    """Bug: Sana's instruction left out (or put before the negative prompt), its rows not cut to SanaPipeline's
    select_index ([0] + the last 299), the BOS row dropped, Gemma-2 run without its mask or padded on the left
    (Gemma's tokenizer default), its null encoded with the instruction, or a word of the instruction other than
    the default of SanaPipeline.__call__."""
    from diffusers import SanaPipeline

    pipe = t5_pipes.sana_pipeline()
    instruction = inspect.signature(SanaPipeline.__call__).parameters["complex_human_instruction"].default
    assert isinstance(instruction, list) and len(instruction) > 5  # the pipeline's own words, not clipcond's
    embeds, mask, neg, neg_mask = pipe.encode_prompt(PROMPTS, negative_prompt=NEGATIVES, device="cpu",
                                                     complex_human_instruction=instruction)
    assert embeds.shape == (len(PROMPTS), 300, 96) and neg.shape == (len(PROMPTS), 300, 96)
    tc = TextConditioner.from_pretrained("sana", weights=t5_pipes.sana)
    full = TextConditioner.from_pretrained("sana", weights=t5_pipes.sana, pad_to="max_length")
    assert tc.spec.t5.d_model == 96 and tc.spec.t5.vocab_size == 600  # sized by the folder's config.json
    for got, ref, ref_mask in ((tc(PROMPTS), embeds, mask), (tc.negative(NEGATIVES), neg, neg_mask),
                               (full(PROMPTS), embeds, mask)):
        width = got.sequence.shape[1]
        assert not ref_mask[:, width:].any() and torch.equal(got.mask, ref_mask[:, :width])
        torch.testing.assert_close(got.sequence[got.mask.bool()], ref[ref_mask.bool()], **TOL)
        assert not got.sequence[~got.mask.bool()].any()
    assert tc(PROMPTS[:-1]).sequence.shape[1] < 300 and full(PROMPTS[:-1]).sequence.shape[1] == 300
    _, _, null, null_mask = pipe.encode_prompt(PROMPTS[:2], device="cpu", complex_human_instruction=instruction)
    assert tc.null(2).mask.tolist() == [[1], [1]] and torch.equal(full.null(2).mask, null_mask)  # "": BOS alone
    torch.testing.assert_close(tc.null(2).sequence, null[:, :1], **TOL)
    plain, _, _, _ = pipe.encode_prompt(PROMPTS[:2], device="cpu", do_classifier_free_guidance=False)
    assert not torch.allclose(tc(PROMPTS[:2]).padded(300).sequence, plain, atol=1e-3)  # the instruction matters
    kwargs = tc(PROMPTS).pipeline_kwargs(negative=tc.negative(NEGATIVES))
    assert set(kwargs) == {"prompt_embeds", "prompt_attention_mask", "negative_prompt_embeds",
                           "negative_prompt_attention_mask"}


def test_blend_and_schedule_on_t5_recipes(t5_pipes):
    """Bug: a blend of masked prompts of different lengths refused or cut to the shorter one's mask (rows the longer
    prompt attends to lost), Flux's text_ids or pipeline dropped by a blend, or schedules refusing T5 recipes."""
    pix = TextConditioner.from_pretrained("pixart-sigma", weights=t5_pipes.pixart)
    short, long = pix("a cat"), pix("an astronaut riding a horse on mars")
    b = pix.blend(["a cat", "an astronaut riding a horse on mars"], [0.7, 0.3])
    assert torch.equal(b.mask, long.mask) and b.pipeline == "PixArtSigmaPipeline"  # the union: the longer's rows
    k = short.sequence.shape[1]
    torch.testing.assert_close(b.sequence[:, :k], 0.7 * short.sequence + 0.3 * long.sequence[:, :k])
    torch.testing.assert_close(b.sequence[:, k:], 0.3 * long.sequence[:, k:])
    flux = TextConditioner.from_pretrained("flux-schnell", weights=t5_pipes.flux)
    f = flux.blend(["a cat", "a dog"], [0.25, 0.75])
    cat, dog = flux("a cat"), flux("a dog")
    torch.testing.assert_close(f.sequence, 0.25 * cat.sequence + 0.75 * dog.sequence)
    torch.testing.assert_close(f.pooled, 0.25 * cat.pooled + 0.75 * dog.pooled)
    assert f.text_ids.shape == (256, 3) and f.pipeline == "FluxPipeline"
    segments = pix.schedule("a [cat:astronaut riding a horse:0.5] on mars", 10, style=None)
    assert [end for end, _ in segments] == [5, 10]
    expected = pix(["a cat on mars", "a astronaut riding a horse on mars"])
    for i, (_, c) in enumerate(segments):
        assert torch.equal(c.mask, expected.mask[i : i + 1])
        torch.testing.assert_close(c.sequence, expected.sequence[i : i + 1])
    with pytest.raises(NotImplementedError, match=r"prompt weighting \(style='a1111'\) of T5 recipes .*style=None"):
        pix.schedule("a [cat:dog:0.5]", 10)


def test_compel_style_on_flux_equals_compel_for_flux(t5_pipes, tiny):
    """Bug: compel's T5 arithmetic for Flux not followed: a weight applied to unweighted tokens (compel keeps z
    itself where w == 1), the down-weighted fragment not masked out of T5's attention for its blend partner, the
    EOS or padding placed otherwise (compel pads to 512, flux-schnell included), z_empty run with a mask, or the
    pooled vector read from the raw string with its syntax (compel joins the fragments' text)."""
    from compel import CompelForFlux

    pipe = t5_pipes.flux_pipeline(tiny)
    compel = CompelForFlux(pipe)
    prompts = ["a photo of a cat", "a (red)1.3 cat on a mat", "a red-- cat, blue++ sky", "(a dog)0.5 and a cat",
               "a (very long prompt with many words)0.8 " * 40]
    for name in ("flux", "flux-schnell"):
        tc = TextConditioner.from_pretrained(name, weights=t5_pipes.flux)
        got = tc.weighted(prompts, style="compel")
        ref = compel(prompts)
        assert got.sequence.shape == ref.embeds.shape == (len(prompts), 512, 96)  # schnell too: compel's 512
        torch.testing.assert_close(got.sequence, ref.embeds, **TOL)
        torch.testing.assert_close(got.pooled, ref.pooled_embeds, **TOL)
        assert got.text_ids.shape == (512, 3) and got.pipeline == "FluxPipeline"
    plain = tc.weighted(["a photo of a cat"], style="compel")
    assert not torch.equal(plain.sequence, tc.weighted(["a (photo)1.5 of a cat"], style="compel").sequence)
    blend = tc.weighted(['("a cat", "a dog").blend(0.7, 0.3)'], style="compel")
    cat, dog = tc.weighted(["a cat"], style="compel"), tc.weighted(["a dog"], style="compel")
    torch.testing.assert_close(blend.sequence, 0.7 * cat.sequence + 0.3 * dog.sequence, **TOL)
    torch.testing.assert_close(blend.pooled, 0.7 * cat.pooled + 0.3 * dog.pooled, **TOL)  # clipcond's choice
    with pytest.raises(NotImplementedError, match=r"done for style='compel' on Flux and Sana and style='comfy' on "
                                                  r"Flux only"):
        TextConditioner.from_pretrained("pixart-sigma", weights=t5_pipes.pixart).weighted(["a cat"], style="compel")


def test_compel_style_on_sana_equals_compel_for_sana(t5_pipes):
    """Bug: CompelForSana's own rules missed: the prompt not lower-cased, an EOS appended (it suppresses Gemma's),
    BOS not first, the padding attended (its mask value is 0), or SanaPipeline's instruction put before the prompt
    (compel puts none)."""
    from compel import CompelForSana

    compel = CompelForSana(t5_pipes.sana_pipeline())
    prompts = ["A Photo of a Cat", "a (red)1.3 cat on a mat", "a red-- cat, blue++ sky", "(a dog)0.5 and a cat"]
    tc = TextConditioner.from_pretrained("sana", weights=t5_pipes.sana)
    got, ref = tc.weighted(prompts, style="compel"), compel(prompts)
    assert got.sequence.shape == ref.embeds.shape == (len(prompts), 300, 96)
    assert torch.equal(got.mask, ref.attention_mask.long())
    torch.testing.assert_close(got.sequence[got.mask.bool()], ref.embeds[ref.attention_mask.bool()], **TOL)
    assert not got.sequence[~got.mask.bool()].any() and got.pooled.shape == (len(prompts), 0)


def test_comfy_style_on_flux_follows_comfyui_s_t5_rules(t5_pipes):
    """ComfyUI's Flux text encoding (comfy/text_encoders/flux.py, comfy/sd1_clip.py) as facts: each weighted segment
    tokenized whole by T5 without its EOS, one EOS, padding with 0 to at least 256 rows and no truncation, T5 run
    without a mask, z_empty + (z - z_empty) * w on the weighted rows with z_empty = [EOS, pad...] at that length,
    the pooled vector CLIP-L's of the parsed text. Bug: windows of 77, diffusers' 512, a mask into T5, or weights
    applied to every row."""
    tc = TextConditioner.from_pretrained("flux", weights=t5_pipes.flux)
    t5, tok = t5_pipes.reference_t5(t5_pipes.flux, "text_encoder_2"), t5_pipes.tokenizer("flux")
    segments = [("a ", 1.0), ("red", 1.5), (" cat on a mat", 1.0)]  # "a (red:1.5) cat on a mat", as ComfyUI reads it
    ids = [i for text, _ in segments for i in tok(text).input_ids[:-1]]
    weights = [w for text, w in segments for _ in tok(text).input_ids[:-1]]
    ids, weights = ids + [1] + [0] * (255 - len(ids)), weights + [1.0] * (256 - len(weights))
    with torch.no_grad():
        z = t5(torch.tensor([ids])).last_hidden_state
        z_empty = t5(torch.tensor([[1] + [0] * 255])).last_hidden_state
    w = torch.tensor(weights)[None, :, None]
    expected = torch.where(w == 1, z, z_empty + (z - z_empty) * w)
    got = tc.weighted(["a (red:1.5) cat on a mat"], style="comfy")
    assert got.sequence.shape == (1, 256, 96) and got.text_ids.shape == (256, 3)
    torch.testing.assert_close(got.sequence, expected, **TOL)
    torch.testing.assert_close(got.pooled, tc("a red cat on a mat").pooled, **TOL)  # unweighted, syntax parsed out
    schnell = TextConditioner.from_pretrained("flux-schnell", weights=t5_pipes.flux)  # T5 at 256 without a mask
    torch.testing.assert_close(tc.weighted(["a photo of a cat"], style="comfy").sequence,
                               schnell("a photo of a cat").sequence, **TOL)
    long = "word " * 300
    assert tc.weighted([long], style="comfy").sequence.shape[1] == len(tok(long).input_ids)  # no truncation
    with pytest.raises(ValueError, match=r"encode to different lengths \[256, 301\]"):
        tc.weighted(["a cat", long], style="comfy")
