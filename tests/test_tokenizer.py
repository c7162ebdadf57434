"""Exact token ids against transformers' CLIPTokenizer and open_clip.tokenize, same vocabulary."""

from __future__ import annotations

import random

import open_clip
import pytest
import torch

from clipcond import ClipTokenizer, TextConditioner
from clipcond.text.tokenizer import open_clip_clean, write_hf_tokenizer

WORDS = ("a photo of the cat dog running astronaut horse mars portrait oil painting by greg rutkowski "
         "trending on artstation 4k 8k hdr masterpiece best quality lowres bad anatomy it's we're you'll "
         "they've i'm she'd isn't CamelCase UPPER MiXeD café naïve Zürich São Paulo Ελληνικά русский "
         "日本語 中文 한국어 😀 🐱 🐶 ❤️ — – … “quoted” ‘single’ 1 2 3 42 3.14 1/2 100% $5 #tag @user "
         "http://example.com/path?q=1 foo_bar foo-bar (word:1.3) [word] {word} <lora:x:1> | \\ / ~ ` ^ * + = "
         "!!! ?! ... ,,, ;; :: 'quote' \"dq\" &amp; &lt;b&gt; &#39; ﬁ ligature Ⅻ ½ ²").split()
SPACES = [" ", " ", " ", "  ", "\t", "\n", " \u00a0", "\u3000"]


def varied_prompts(n: int, seed: int = 0) -> list[str]:
    """Deterministic, varied prompts: words, punctuation, scripts, odd spacing, some over 77 tokens."""
    rng = random.Random(seed)
    prompts = ["", " ", "a running dog", "A RUNNING DOG", "a photo of a cat", "<|endoftext|>", "hello!",
               "word " * 100]
    while len(prompts) < n:
        length = rng.choice([1, 3, 8, 20, 40, 90])
        words = [rng.choice(WORDS) for _ in range(length)]
        prompts.append("".join(w + rng.choice(SPACES) for w in words).strip(rng.choice(["", " "])))
    return prompts


def hf_ids(tokenizer, prompts: list[str]) -> torch.Tensor:
    return tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


def test_a_running_dog():
    for kind, pad in (("hf", 49407), ("open_clip", 0)):
        ids = ClipTokenizer(kind, pad_id=pad)("a running dog").ids[0]
        assert ids[:5].tolist() == [49406, 320, 2761, 1929, 49407]
        assert (ids[5:] == pad).all()


def test_hf_flavour_equals_transformers_clip_tokenizer(tiny):
    prompts = varied_prompts(600)
    ours = ClipTokenizer("hf", pad_id=49407)(prompts)
    assert torch.equal(ours.ids, hf_ids(tiny.tok_l, prompts))
    assert ours.ids.shape == (600, 77) and ours.ids.dtype == torch.long


@pytest.mark.parametrize("pad_token", ["<|endoftext|>", "!"])
def test_written_hf_tokenizer_folder_equals_the_published_one(tiny, tmp_path, pad_token):
    """write_hf_tokenizer's folder (what examples/ and bench/ load), read by transformers, against the tokenizer
    conftest builds from open_clip's SimpleTokenizer tables: catches a token or merge out of order, and a pad token
    other than the SD repos' ("!" for SD 2.x and SDXL's tokenizer_2, where a literal "!" is then id 0)."""
    from transformers import CLIPTokenizer

    written = CLIPTokenizer.from_pretrained(write_hf_tokenizer(tmp_path, pad_token=pad_token))
    reference = tiny.tok_l if pad_token == "<|endoftext|>" else tiny.tok_bang
    prompts = varied_prompts(300, seed=3)
    assert torch.equal(hf_ids(written, prompts), hf_ids(reference, prompts))


def test_bang_pad_equals_the_sd2_transformers_tokenizer(tiny):
    """compel reads SD 2.x / SDXL tower 2 through their transformers tokenizers, where "!" is the pad token (id 0,
    diffusers#4153): catches "!" read as "!</w>" 256 there."""
    prompts = ["wow!", "a cat!! on a mat", *varied_prompts(200, seed=4)]
    ours = ClipTokenizer("hf", pad_id=0, bang_pad=True)(prompts).ids
    assert torch.equal(ours, hf_ids(tiny.tok_bang, prompts))
    assert ours[0, :4].tolist() == [49406, 2781, 0, 49407]  # "wow" then "!" as the pad id


def test_open_clip_flavour_equals_open_clip_tokenize():
    prompts = varied_prompts(600, seed=1)
    ours = ClipTokenizer("open_clip", pad_id=0)(prompts)
    assert torch.equal(ours.ids, open_clip.tokenize(prompts))


# Prompt -> its first EOS position, counted by hand: BOS, then the prompt's BPE tokens (75 at most).
FIRST_EOS = {"": 1, "a running dog": 4, "a photo of a cat": 6, "word " * 100: 76}
LITERAL_EOS = {"hf": "a cat <|endoftext|> on a mat", "open_clip": "a cat <end_of_text> on a mat"}  # first EOS: 3


@pytest.mark.parametrize(("kind", "pad"), [("hf", 49407), ("open_clip", 0)])
def test_eos_is_first_eos_position_and_truncation_keeps_eos_last(tiny, kind, pad):
    # Catches eos read at the last EOS or at BOS + length: a literal end-of-text in the prompt ends it there.
    prompts = [*FIRST_EOS, LITERAL_EOS[kind], *varied_prompts(200, seed=2)]
    tokens = ClipTokenizer(kind, pad_id=pad)(prompts)
    reference = hf_ids(tiny.tok_l, prompts) if kind == "hf" else open_clip.tokenize(prompts)
    assert torch.equal(tokens.ids, reference)
    first_eos = [row.index(49407) for row in reference.tolist()]
    assert first_eos[:5] == [*FIRST_EOS.values(), 3]
    assert reference[4, 3:8].tolist() == [49407, 525, 320, 9063, 49407]  # "on a mat" follows the literal EOS
    assert tokens.eos.tolist() == first_eos
    long_rows = [row for row, _ in tokens.truncated]
    assert 3 in long_rows and all(tokens.ids[r, 76] == 49407 and tokens.eos[r] == 76 for r in long_rows)
    assert (tokens.ids[:, 0] == 49406).all()


def test_truncated_text_is_the_dropped_tail():
    tokens = ClipTokenizer("hf", pad_id=49407)("one two three " * 30 + "finalword")
    (row, dropped), = tokens.truncated
    assert row == 0 and dropped.endswith("finalword") and len(dropped.split()) == 91 - 75


@pytest.mark.parametrize(("prompt", "hf_differs"), [
    ("fish &amp; chips", True),  # open_clip unescapes HTML entities
    ("cafÃ© mojibake", True),  # ftfy repairs mojibake
    ("a\u00a0b non-breaking space", False),
    ("<start_of_text> literal", True),  # each flavour's own literal special tokens
])
def test_documented_flavour_differences(tiny, prompt, hf_differs):
    hf = ClipTokenizer("hf", pad_id=49407)(prompt).ids
    oc = ClipTokenizer("open_clip", pad_id=49407)(prompt).ids
    assert torch.equal(hf, hf_ids(tiny.tok_l, [prompt]))
    assert torch.equal(oc.masked_fill(oc == 49407, 0), open_clip.tokenize([prompt]).masked_fill(
        open_clip.tokenize([prompt]) == 49407, 0))
    assert (not torch.equal(hf, oc)) == hf_differs


def test_open_clip_clean_fast_path_agrees_with_ftfy():
    import html

    import ftfy

    for text in ["plain ascii text, with punctuation!", "tabs\tand\r\nnewlines", "ctrl\x07char", "a & b"]:
        slow = " ".join(html.unescape(html.unescape(ftfy.fix_text(text))).split()).lower()
        assert open_clip_clean(text) == slow


def test_sdxl_tokenize_gives_each_tower_its_ids():
    tc = TextConditioner.from_pretrained("tiny-sdxl")
    l_ids, g_ids = tc.tokenize(["a running dog!"])
    assert l_ids.ids[0, :7].tolist() == [49406, 320, 2761, 1929, 256, 49407, 49407]
    assert g_ids.ids[0, :7].tolist() == [49406, 320, 2761, 1929, 256, 49407, 0]


def test_unknown_kind():
    with pytest.raises(ValueError, match="tokenizer kind must be one of"):
        ClipTokenizer("sentencepiece", pad_id=0)
