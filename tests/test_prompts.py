"""A1111 emphasis syntax, long-prompt chunking and the two weighting interpretations."""

from __future__ import annotations

import pytest
import torch

from clipcond import TextConditioner
from clipcond.specs import BOS_ID, EOS_ID
from clipcond.text.prompts import parse_emphasis

LONG = ("an extremely detailed matte painting of a sprawling city at dusk, " * 12).strip()  # ~170 tokens


# A1111's own doctests for prompt_parser.parse_prompt_attention.
@pytest.mark.parametrize(("text", "expected"), [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]),
    # Facts of A1111's parser beyond its doctests: BREAK is an entry ["BREAK", -1], which brackets multiply
    # too (then it is the word BREAK); unmatched closers stay text; equal weights merge.
    ("a cat BREAK a dog", [("a cat", 1.0), ("BREAK", -1.0), ("a dog", 1.0)]),
    ("a cat BREAK", [("a cat", 1.0), ("BREAK", -1.0), ("", 1.0)]),
    ("(a BREAK b)", [("a", 1.1), ("BREAK", -1.1), ("b", 1.1)]),
    ("aBREAK b", [("aBREAK b", 1.0)]),
    ("a b)", [("a b)", 1.0)]),
    ("(a:0)", [("a", 0.0)]),
    ("( a ) b", [(" a ", 1.1), (" b", 1.0)]),
    ("", [("", 1.0)]),
])
def test_parse_emphasis_matches_a1111(text, expected):
    assert parse_emphasis(text) == expected


def window_ids(tc: TextConditioner, tower: int, tokens: list[int]) -> torch.Tensor:
    ids = torch.full((1, 77), tc.tokenizers[tower].pad_id)
    ids[0, : len(tokens) + 2] = torch.tensor([BOS_ID, *tokens, EOS_ID])
    return ids


@pytest.mark.parametrize("name", ["tiny-sd15", "tiny-sd2", "tiny-sdxl"])
def test_chunked_long_prompt_equals_manual_concatenation(name):
    tc = TextConditioner.from_pretrained(name, long_prompts="chunk")
    c = tc([LONG, "short"])
    k = c.sequence.shape[1] // 77
    assert c.sequence.shape == (2, 77 * k, tc.sequence_dim) and k == 3
    parts = []
    for i, tower in enumerate(tc.towers):
        bpe = tc.tokenizers[i].encode([LONG])[0]
        windows = [bpe[j: j + 75] for j in range(0, len(bpe), 75)]
        seqs = [tower(window_ids(tc, i, w), torch.tensor([len(w) + 1]))[0] for w in windows]
        parts.append(torch.cat(seqs, dim=1))
    torch.testing.assert_close(c.sequence[:1], torch.cat(parts, dim=-1), atol=1e-6, rtol=1e-6)
    truncated = TextConditioner.from_pretrained(name)([LONG, "short"])
    torch.testing.assert_close(c.pooled, truncated.pooled, atol=1e-6, rtol=1e-6)  # pooled: first window
    torch.testing.assert_close(c.sequence[1:, :77], truncated.sequence[1:], atol=1e-6, rtol=1e-6)
    # The short prompt is padded to k windows with the empty prompt's window.
    torch.testing.assert_close(c.sequence[1, 77:154], tc([""]).sequence[0], atol=1e-6, rtol=1e-6)


def test_chunk_mode_short_prompts_equal_truncate_mode_exactly():
    prompts = ["a photo of a cat", "a dog", ""]
    a = TextConditioner.from_pretrained("tiny-sdxl", long_prompts="chunk")(prompts)
    b = TextConditioner.from_pretrained("tiny-sdxl")(prompts)
    assert torch.equal(a.sequence, b.sequence) and torch.equal(a.pooled, b.pooled)


@pytest.mark.parametrize("name", ["tiny-sd15", "tiny-sdxl"])
@pytest.mark.parametrize("style", ["a1111", "comfy"])
def test_weight_one_equals_plain_encoding_exactly(name, style):
    tc = TextConditioner.from_pretrained(name)
    prompts = ["a photo of a (cat:1.0)", "a dog on a mat", "(house:1)"]
    plain = tc(["a photo of a cat", "a dog on a mat", "house"])
    weighted = tc.weighted(prompts, style=style)
    assert torch.equal(weighted.sequence, plain.sequence) and torch.equal(weighted.pooled, plain.pooled)


@pytest.mark.parametrize("name", ["sd15", "sdxl"])
def test_comfy_up_weighting_equals_compels(tiny, name):
    """ComfyUI's z_empty + w (z - z_empty) (sd1_clip.py encode_token_weights) is compel's up-weighting too; compel
    itself, on the same weights, catches weights on the wrong rows, z_empty from the wrong prompt or tower (SDXL's
    bigG pads with 0) and the arithmetic."""
    compel = pytest.importorskip("compel")
    pipe = tiny.pipeline(name)
    with torch.no_grad():
        if name == "sd15":
            expected = compel.Compel(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder)("a photo of a (cat)1.3")
        else:
            expected = compel.CompelForSDXL(pipe)("a photo of a (red cat)1.3, (on a mat)1.2").embeds
    tc = TextConditioner.from_pretrained(name, weights=getattr(tiny, name))
    prompt = "a photo of a (cat:1.3)" if name == "sd15" else "a photo of a (red cat:1.3), (on a mat:1.2)"
    torch.testing.assert_close(tc.weighted(prompt, style="comfy").sequence, expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("read", ["chunk", "a1111", "comfy"])
def test_windows_pool_at_the_first_eos(tiny, read):
    """transformers' pooler reads the first EOS (these configs' eos_token_id 2: argmax of the ids, whose first
    maximum is the first 49407), and a literal "<|endoftext|>" in the prompt is one. Catches windows pooled at the
    EOS that closes their frame, where a prompt that fits one window is not."""
    prompt = "a cat <|endoftext|> on a mat"
    ids = tiny.tok_l([prompt], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = tiny.clip_l(ids).pooler_output
    if read == "chunk":
        got = TextConditioner.from_pretrained("sd15", weights=tiny.sd15, long_prompts="chunk")(prompt)
    else:
        got = TextConditioner.from_pretrained("sd15", weights=tiny.sd15).weighted(prompt, style=read)
    torch.testing.assert_close(got.pooled, expected, atol=1e-6, rtol=1e-6)


def test_break_starts_a_new_window_and_negative_is_padded():
    tc = TextConditioner.from_pretrained("tiny-sdxl")
    c = tc.weighted(["a cat BREAK a dog"])
    assert c.sequence.shape == (1, 154, 80)
    torch.testing.assert_close(c.sequence[:, :77], tc(["a cat"]).sequence, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(c.sequence[:, 77:], tc(["a dog"]).sequence, atol=1e-6, rtol=1e-6)
    negative = tc.weighted(["blurry"])
    pos, neg = tc.pad_chunks(c, negative)
    assert pos.sequence.shape == neg.sequence.shape == (1, 154, 80)
    assert torch.equal(neg.sequence[:, :77], negative.sequence)
    torch.testing.assert_close(neg.sequence[:, 77:], tc([""]).sequence, atol=0, rtol=0)


def test_encode_with_dropout_in_chunk_mode():
    tc = TextConditioner.from_pretrained("tiny-sd15", long_prompts="chunk")
    d = tc.encode([LONG, "a cat", "a dog"] * 4, drop_prob=0.5, generator=torch.Generator().manual_seed(1))
    null = tc.null(1, chunks=3)
    assert d.sequence.shape == (12, 231, 32)
    dropped = [torch.equal(row, null.sequence[0]) for row in d.sequence]
    assert 0 < sum(dropped) < 12


def test_weighted_rejects_unknown_style():
    tc = TextConditioner.from_pretrained("tiny-sd15")
    with pytest.raises(ValueError, match="style must be 'a1111', 'comfy' or 'compel', got 'invokeai'"):
        tc.weighted(["a"], style="invokeai")
