"""Prompts as A1111 and ComfyUI read them, prompt schedules and blends.

Expected values come from each tool's documented behaviour: A1111's parser and scheduler doctests,
its ``tokenize_line`` chunking rules and emphasis modes (``sd_hijack_clip.py``, ``sd_emphasis.py``),
ComfyUI's ``token_weights`` docstring examples and its chunk rule (``sd1_clip.py``). The plain
encodings they are built from are checked against diffusers in test_conditioner.py.
"""

from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import save_file

from clipcond import TextConditioner
from clipcond.text.prompts import comfy_weights
from clipcond.text.schedules import prompt_schedule, split_and
from clipcond.text.tokenizer import ClipTokenizer

TOL = {"atol": 1e-6, "rtol": 1e-6}


def windows(*conds) -> torch.Tensor:
    return torch.cat([c.sequence for c in conds], dim=1)


# --- A1111 chunking: sd_hijack_clip.py tokenize_line -------------------------------------------------
def test_a1111_emits_no_empty_trailing_chunk_and_break_rules(sd15):
    assert torch.equal(sd15.weighted("a cat BREAK").sequence, sd15("a cat").sequence)  # 1 chunk, not 2
    torch.testing.assert_close(sd15.weighted("BREAK a cat").sequence, windows(sd15(""), sd15("a cat")), **TOL)
    torch.testing.assert_close(sd15.weighted("a BREAK BREAK b").sequence, windows(sd15("a"), sd15(""), sd15("b")),
                               **TOL)
    # A BREAK inside brackets is the word "BREAK" at weight -1.1, in the same chunk.
    z = sd15("a break b").sequence  # tokens: BOS a break b EOS
    w = torch.tensor([1.0, 1.1, -1.1, 1.1] + [1.0] * 73)[None, :, None]
    torch.testing.assert_close(sd15.weighted("(a BREAK b)").sequence, z * w * (z.mean() / (z * w).mean()), **TOL)


@pytest.mark.parametrize(("before", "after", "backtrack", "first"), [
    (55, 30, 20, 56),  # the comma 20 tokens from the chunk's end: text after it moves on
    (54, 31, 20, 75),  # 21 tokens: out of reach, a plain cut at 75
    (55, 30, 0, 75),  # back-tracking off
    (60, 25, 10, 75),  # 15 > 10
    (66, 19, 10, 67),
])
def test_a1111_comma_backtracking(sd15, before, after, backtrack, first):
    # One token a word: "cat" x before, ",", "dog" x after. A1111 closes a chunk when a token arrives at a
    # full one; the text after the last comma moves to the next chunk when the comma is within
    # comma_padding_backtrack tokens of the end (the comma stays).
    tokens = ["cat"] * before + [","] + ["dog"] * after
    c = sd15.weighted(" ".join(tokens), comma_backtrack=backtrack)
    expected = windows(sd15(" ".join(tokens[:first])), sd15(" ".join(tokens[first:])))
    torch.testing.assert_close(c.sequence, expected, **TOL)


def test_a1111_never_splits_a_textual_inversion_word(tmp_path, sd15):
    save_file({"<lab>": torch.randn(3, 32)}, tmp_path / "learned_embeds.safetensors")
    tc = sd15.with_textual_inversion(tmp_path / "learned_embeds.safetensors")
    c = tc.weighted("cat " * 74 + "<lab>")  # 74 + 3 vectors > 75: the word moves whole to chunk 2
    torch.testing.assert_close(c.sequence, windows(tc("cat " * 74), tc("<lab>")), **TOL)


def test_a1111_emphasis_modes(sd15):
    z = sd15("a photo of a cat").sequence  # "cat" at position 5
    w = torch.ones(1, 77, 1)
    w[0, 5] = 1.5
    # sd_emphasis.py "Original": multiply, then scale back to the chunk's original mean; "No norm": multiply.
    original = sd15.weighted("a photo of a (cat:1.5)", emphasis="original").sequence
    torch.testing.assert_close(original, z * w * (z.mean() / (z * w).mean()), **TOL)
    torch.testing.assert_close(sd15.weighted("a photo of a (cat:1.5)", emphasis="no_norm").sequence, z * w, **TOL)


def test_a1111_reads_each_prompt_of_a_batch_as_its_own(sdxl):
    # webui encodes one prompt at a time, so each prompt's chunks have their own mean, per tower.
    prompts = ["a (red:1.4) cat", "[blurry] photo of a (dog:0.8), " + "grass " * 80]
    batch = sdxl.weighted(prompts)
    one = sdxl.weighted(prompts[0])
    two = sdxl.weighted(prompts[1])
    assert batch.sequence.shape[1] == two.sequence.shape[1] == 154
    torch.testing.assert_close(batch.sequence[1:], two.sequence, **TOL)
    torch.testing.assert_close(batch.sequence[:1, :77], one.sequence, **TOL)
    # SDXL: each tower is its own hijacked embedder, with its own mean.
    z = sdxl("a red cat").sequence
    w = torch.ones(1, 77, 1)
    w[0, 2] = 1.4
    expected = torch.cat([part * w * (part.mean() / (part * w).mean()) for part in (z[..., :32], z[..., 32:])], -1)
    torch.testing.assert_close(one.sequence, expected, **TOL)
    torch.testing.assert_close(one.pooled, sdxl("a red cat").pooled, **TOL)  # the first chunk's, unweighted


# --- ComfyUI: sd1_clip.py ------------------------------------------------------------------------------
@pytest.mark.parametrize(("text", "expected"), [  # token_weights' docstring examples
    ("(foo)", [("foo", 1.1)]),
    ("(foo)(bar)", [("foo", 1.1), ("bar", 1.1)]),
    ("(foo:2.0)", [("foo", 2.0)]),
    ("((foo))", [("foo", 1.2100000000000002)]),
    ("((foo):1.1)", [("foo", 1.2100000000000002)]),
    ("((foo:1.1))", [("foo", 1.1)]),
    ("(foo:0.0)", [("foo", 0.0)]),
    ("((foo:1.0):0.0)", [("foo", 1.0)]),
    ("foo ((((lol (cat:666) attack:100)))) baz",
     [("foo ", 1.0), ("lol ", 100.0), ("cat", 666.0), (" attack", 100.0), (" baz", 1.0)]),
    ("foo ((((lol (cat:666) attack):100))) baz",
     [("foo ", 1.0), ("lol ", 110.00000000000001), ("cat", 666.0), (" attack", 110.00000000000001), (" baz", 1.0)]),
    ("((a:1.5))", [("a", 1.5)]),  # an explicit weight replaces the outer 1.1
    ("[x] y", [("[x] y", 1.0)]),  # no [x] de-emphasis
    ("a (b", [("a ", 1.0), ("(b", 1.0)]),  # an unclosed ( is text
    ("(a BREAK b)", [("a BREAK b", 1.1)]),  # no BREAK
    ("\\(foo\\)(bar)", [("(foo)", 1.0), ("bar", 1.1)]),  # its only escapes
])
def test_comfy_parser(text, expected):
    assert comfy_weights(text) == expected


def comfy_expected(tc: TextConditioner, text: str, weights: dict[int, float]) -> torch.Tensor:
    """ComfyUI's encode_token_weights: z_empty + w (z - z_empty) at weighted positions, z elsewhere."""
    z, empty = tc(text).sequence, tc("").sequence
    out = z.clone()
    for position, w in weights.items():
        out[:, position] = empty[:, position] + w * (z[:, position] - empty[:, position])
    return out


def test_comfy_inner_weight_replaces_and_groups_tokenize_apart(sd15):
    torch.testing.assert_close(sd15.weighted("((a:1.5) b)", style="comfy").sequence,
                               comfy_expected(sd15, "a b", {1: 1.5, 2: 1.1}), **TOL)
    # (red)(car): two pieces, tokenized apart ("red</w>", "car</w>"); A1111 merges them into "redcar".
    torch.testing.assert_close(sd15.weighted("(red)(car)", style="comfy").sequence,
                               comfy_expected(sd15, "red car", {1: 1.1, 2: 1.1}), **TOL)
    assert sd15.tokenizers[0].encode(["redcar"])[0] != sd15.tokenizers[0].encode(["red car"])[0]
    assert torch.equal(sd15.weighted("[x] y", style="comfy").sequence, sd15("[x] y").sequence)


@pytest.mark.parametrize(("piece", "first"), [
    ("(a b c d e:1.2)", 71),  # 71 + 5 > 75 and 5 tokens < 8: the piece moves whole to the next window
    ("(a b c d e f g h i j:1.2)", 75),  # 10 tokens: it fills the window and goes on in the next
])
def test_comfy_keeps_short_weighted_pieces_whole(sd15, piece, first):
    words = ["cat"] * 71 + piece[1:-5].split()
    c = sd15.weighted("cat " * 71 + piece, style="comfy").sequence
    head, tail = words[:first], words[first:]
    expected_first = comfy_expected(sd15, " ".join(head), {1 + p: 1.2 for p in range(71, len(head))})
    expected_second = comfy_expected(sd15, " ".join(tail), {1 + p: 1.2 for p in range(len(tail))})
    torch.testing.assert_close(c, torch.cat([expected_first, expected_second], dim=1), **TOL)


def test_comfy_on_sdxl_and_sd2_tokenizes_like_transformers(sdxl):
    # ComfyUI's SDTokenizer is transformers' CLIPTokenizer on every tower: "&amp;" stays three tokens for
    # bigG too (open_clip would unescape it); padding stays each tower's (49407 and 0).
    prompt = "fish &amp; chips"
    tokens = [ClipTokenizer("hf", pad_id=t.pad_id)([prompt]) for t in sdxl.spec.towers]
    expected = sdxl.encode_tokens(tokens)
    got = sdxl.weighted(prompt, style="comfy")
    torch.testing.assert_close(got.sequence, expected.sequence, **TOL)
    torch.testing.assert_close(got.pooled, expected.pooled, **TOL)
    a1111 = sdxl.weighted(prompt).sequence[..., 32:]  # A1111: bigG through open_clip's tokenizer
    assert not torch.allclose(a1111, expected.sequence[..., 32:])


def test_comfy_embedding_syntax(tmp_path, sd15, caplog):
    save_file({"emb_params": torch.randn(2, 32)}, tmp_path / "lab.safetensors")  # A1111 file: token = its stem
    tc = sd15.with_textual_inversion(tmp_path / "lab.safetensors")
    torch.testing.assert_close(tc.weighted("a photo of embedding:lab cat", style="comfy").sequence,
                               tc("a photo of lab cat").sequence, **TOL)
    torch.testing.assert_close(tc.weighted("a photo of embedding:lab, cat", style="comfy").sequence,
                               tc("a photo of lab , cat").sequence, **TOL)
    with caplog.at_level(logging.WARNING):
        tc.weighted("a embedding:missing cat", style="comfy")
    assert "embedding:missing is not loaded" in caplog.text


# --- schedules: prompt_parser.get_learned_conditioning_prompt_schedules ------------------------------
@pytest.mark.parametrize(("prompt", "expected"), [  # A1111's doctests (all but one lark itself cannot parse)
    ("test", [[10, "test"]]),
    ("a [b:3]", [[3, "a "], [10, "a b"]]),
    ("a [b: 3]", [[3, "a "], [10, "a b"]]),
    ("a [[[b]]:2]", [[2, "a "], [10, "a [[b]]"]]),
    ("[(a:2):3]", [[3, ""], [10, "(a:2)"]]),
    ("a [b : c : 1] d", [[1, "a b  d"], [10, "a  c  d"]]),
    ("a[b:[c:d:2]:1]e", [[1, "abe"], [2, "ace"], [10, "ade"]]),
    ("a [unbalanced", [[10, "a [unbalanced"]]),
    ("a [b:.5] c", [[5, "a  c"], [10, "a b c"]]),
    ("((a][:b:c [d:3]", [[3, "((a][:b:c "], [10, "((a][:b:c d"]]),
    ("[a|(b:1.1)]", [[s, "a" if s % 2 else "(b:1.1)"] for s in range(1, 11)]),
    ("[fe|]male", [[s, "female" if s % 2 else "male"] for s in range(1, 11)]),
    ("[fe|||]male", [[s, "female" if s % 4 == 1 else "male"] for s in range(1, 11)]),
    # Facts of its step arithmetic: a dot makes a fraction (even 1.0), truncated; < 1 never switches.
    ("a [b:c:1.0] d", [[10, "a b d"]]),
    ("[a:b:1]", [[1, "a"], [10, "b"]]),
    ("[cat:dog:0.25]", [[2, "cat"], [10, "dog"]]),
    ("a [b:c:0] d", [[10, "a c d"]]),
    ("a [b:c:25] d", [[10, "a b d"]]),
])
def test_schedule_matches_a1111(prompt, expected):
    assert [list(s) for s in prompt_schedule(prompt, 10)] == expected


def test_hires_schedule_matches_a1111():
    assert [list(s) for s in prompt_schedule("a [b:.5] c", 10, hires_steps=10)] == [[10, "a b c"]]
    assert [list(s) for s in prompt_schedule("a [b:1.5] c", 10, hires_steps=10)] == [[5, "a  c"], [10, "a b c"]]


def test_and_weights_match_a1111():
    assert split_and("a cat AND a dog :1.2") == [(1.0, "a cat"), (1.2, " a dog")]
    assert split_and("a cat :0.5 AND a dog") == [(0.5, "a cat"), (1.0, " a dog")]
    assert split_and("cat ANDdog") == [(1.0, "cat ANDdog")]
    assert split_and("a:b AND c : -0.3") == [(1.0, "a:b"), (-0.3, " c")]


def test_tc_schedule_segments_are_weighted_encodings(sdxl):
    segments = sdxl.schedule("a [(red:1.3) cat:dog:0.4] on a mat", 20)
    assert [end for end, _ in segments] == [8, 20]
    torch.testing.assert_close(segments[0][1].sequence, sdxl.weighted("a (red:1.3) cat on a mat").sequence, **TOL)
    torch.testing.assert_close(segments[1][1].pooled, sdxl.weighted("a dog on a mat").pooled, **TOL)
    [(w1, s1), (w2, s2)] = sdxl.schedule("a cat AND a [dog:bird:5] :1.5", 10, style="comfy")
    assert (w1, w2) == (1.0, 1.5) and [e for e, _ in s1] == [10] and [e for e, _ in s2] == [5, 10]
    torch.testing.assert_close(s2[1][1].sequence, sdxl.weighted(" a bird ", style="comfy").sequence, **TOL)


def test_blend_is_the_weighted_sum_as_given(sd15):
    b = sd15.blend(["a cat", "a dog"], [0.7, 0.6])  # not normalised
    torch.testing.assert_close(b.sequence, 0.7 * sd15("a cat").sequence + 0.6 * sd15("a dog").sequence, **TOL)
    torch.testing.assert_close(b.pooled, 0.7 * sd15("a cat").pooled + 0.6 * sd15("a dog").pooled, **TOL)
    long = "grass " * 100
    c = sd15.blend([long, "a (cat:1.2)"], [0.5, 0.5], style="a1111")
    padded = torch.cat([sd15.weighted("a (cat:1.2)").sequence, sd15("").sequence], dim=1)
    torch.testing.assert_close(c.sequence, 0.5 * sd15.weighted(long).sequence + 0.5 * padded, **TOL)
    with pytest.raises(ValueError, match="one weight per prompt"):
        sd15.blend(["a"], [0.5, 0.5])


def test_truncation_warning_names_a_multi_vector_word(tmp_path, sd15, caplog):
    save_file({"<lab>": torch.randn(4, 32)}, tmp_path / "learned_embeds.safetensors")
    tc = sd15.with_textual_inversion(tmp_path / "learned_embeds.safetensors")
    with caplog.at_level(logging.WARNING):
        tc("cat " * 73 + "<lab> on a mat")  # 73 + 4 vectors: the cut falls inside the word
    assert "'<lab> on a mat'" in caplog.text


# --- compel, compared with compel itself on the same weights ---------------------------------------
COMPEL_PROMPTS = [
    "a cat++ on a mat", "a (red cat)1.3 on a mat", "a cat-- on a mat", "fire (flames)0.2 and smoke",
    "a (red)0.5 (cat)1.2, (blurry)--", '("a cat", "a dog").blend(0.7, 0.3)',
    '("a cat", "a dog").blend(1, 1, no_normalize)',
    '("a cat", "a (dog)++").and()', '("a cat", "a dog").and(1, 0.5)',
    "a photo of a cat. " * 20 + "(red)0.5 dog",  # chunked after the last "." within 75 tokens
    "a photo, of a cat, " * 18 + "dog++",  # no ".": after the last ","
    "word " * 160 + "(end)0.7",  # neither: after a word end
    "wow! a (cat)1.2!!",  # SDXL's tokenizer_2 pads with "!": there a literal "!" is id 0 (diffusers#4153)
]


@pytest.mark.parametrize("prompt", COMPEL_PROMPTS)
def test_compel_style_equals_compel_sd15(tiny, prompt):
    compel = pytest.importorskip("compel")
    pipe = tiny.pipeline("sd15")
    reference = compel.Compel(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, truncate_long_prompts=False)
    with torch.no_grad():
        expected = reference(prompt)
    got = TextConditioner.from_pretrained("sd15", weights=tiny.sd15).weighted(prompt, style="compel")
    torch.testing.assert_close(got.sequence, expected, **TOL)


@pytest.mark.parametrize("prompt", [p for p in COMPEL_PROMPTS if "and(" not in p])
def test_compel_style_equals_compel_for_sdxl_pooled_included(tiny, prompt):
    compel = pytest.importorskip("compel")
    with torch.no_grad():
        expected = compel.CompelForSDXL(tiny.pipeline("sdxl"))(prompt)
    got = TextConditioner.from_pretrained("sdxl", weights=tiny.sdxl).weighted(prompt, style="compel")
    torch.testing.assert_close(got.sequence, expected.embeds, **TOL)
    # compel#96: compel's pooled vector is the raw string's, syntax included, not the parsed text's.
    torch.testing.assert_close(got.pooled, expected.pooled_embeds, **TOL)


def test_compel_pooled_quirk_is_the_raw_string(sdxl):
    pytest.importorskip("compel")
    assert not torch.allclose(sdxl.weighted("(test)0.9", style="compel").pooled, sdxl("test").pooled)
    assert torch.equal(sdxl.weighted("test", style="compel").pooled, sdxl("test").pooled)
