"""Prompts as A1111 and ComfyUI read them, prompt schedules and blends.

Expected values come from each tool's documented behaviour: A1111's parser and scheduler doctests,
its ``tokenize_line`` chunking rules and emphasis modes (``sd_hijack_clip.py``, ``sd_emphasis.py``),
ComfyUI's ``token_weights`` docstring examples and its chunk rule (``sd1_clip.py``). The plain
encodings they are built from are checked against diffusers in test_conditioner.py.
"""

from __future__ import annotations

import logging

import open_clip
import pytest
import torch
from safetensors.torch import save_file

from clipcond import TextConditioner
from clipcond.text.prompts import comfy_weights
from clipcond.text.schedules import prompt_schedule, split_and
from clipcond.text.tokenizer import Tokens

TOL = {"atol": 1e-6, "rtol": 1e-6}


def windows(*conds) -> torch.Tensor:
    return torch.cat([c.sequence for c in conds], dim=1)


def multipliers(*rows: list[float]) -> torch.Tensor:
    """A1111's per-token multipliers of a chunk batch, [B, 77]: 1.0 on BOS, then each row's tokens, then 1.0."""
    out = torch.ones(len(rows), 77)
    for i, row in enumerate(rows):
        out[i, 1 : len(row) + 1] = torch.tensor(row)
    return out


def a1111_original(z: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """sd_emphasis.py ``EmphasisOriginal.after_transformers`` on one chunk batch ``z`` [B, 77, D]: every row times its
    multiplier, then the whole batch scaled back to the mean it had (one mean over all B texts of the batch)."""
    weighted = z * m[..., None]
    return weighted * (z.mean() / weighted.mean())


# --- A1111 chunking: sd_hijack_clip.py tokenize_line -------------------------------------------------
def test_a1111_emits_no_empty_trailing_chunk_and_break_rules(sd15):
    assert torch.equal(sd15.weighted("a cat BREAK").sequence, sd15("a cat").sequence)  # 1 chunk, not 2
    torch.testing.assert_close(sd15.weighted("BREAK a cat").sequence, windows(sd15(""), sd15("a cat")), **TOL)
    torch.testing.assert_close(sd15.weighted("a BREAK BREAK b").sequence, windows(sd15("a"), sd15(""), sd15("b")),
                               **TOL)
    # A BREAK inside brackets is the word "BREAK" at weight -1.1, in the same chunk.
    expected = a1111_original(sd15("a break b").sequence, multipliers([1.1, -1.1, 1.1]))
    torch.testing.assert_close(sd15.weighted("(a BREAK b)").sequence, expected, **TOL)


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


# parse_prompt_attention's doctest: "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky)))." is a 1.0, house
# 1.5730000000000004, " " 1.1, on 1.0, " a " 1.1, hill 0.55, ", sun, " 1.1, sky 1.4641000000000006, "." 1.1;
# each word and mark one token.
DOCTEST = "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky)))."
DOCTEST_MULTIPLIERS = [1.0, 1.5730000000000004, 1.0, 1.1, 0.55, 1.1, 1.1, 1.1, 1.4641000000000006, 1.1]


@pytest.mark.parametrize("emphasis", ["original", "no_norm"])
def test_a1111_emphasis_modes_on_the_parse_prompt_attention_doctest(sd15, sdxl, emphasis):
    """A1111's numbers on A1111's example: catches weights on the wrong tokens, a mean restored over the wrong span
    (SDXL: each tower is its own hijacked embedder, its own mean) or not at all, and a restore under "No norm"."""
    m = multipliers(DOCTEST_MULTIPLIERS)
    for tc, towers in ((sd15, [slice(0, 32)]), (sdxl, [slice(0, 32), slice(32, 80)])):
        z = tc("a house on a hill, sun, sky.").sequence
        expected = [a1111_original(z[..., t], m) if emphasis == "original" else z[..., t] * m[..., None]
                    for t in towers]
        torch.testing.assert_close(tc.weighted(DOCTEST, emphasis=emphasis).sequence,
                                   torch.cat(expected, dim=-1), **TOL)


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


def test_comfy_on_sdxl_tokenizes_with_transformers_on_both_towers(tiny, sdxl):
    """ComfyUI's SDTokenizer is transformers' CLIPTokenizer (its sd1_tokenizer folder, pad token <|endoftext|>) for
    bigG too, padding with 0 there (SDXLClipGTokenizer: pad_with_end=False). Catches bigG read through open_clip's
    tokenizer, which unescapes "&amp;" to one "&", and a "!" read as SD2's pad token."""
    prompt = "fish &amp; chips!"
    ids = tiny.tok_l([prompt], padding="max_length", max_length=77, return_tensors="pt").input_ids
    eos = ids[0].tolist().index(49407)
    padded_0 = ids.clone()
    padded_0[0, eos + 1 :] = 0
    expected = sdxl.encode_tokens([Tokens(ids, torch.tensor([eos]), ()), Tokens(padded_0, torch.tensor([eos]), ())])
    got = sdxl.weighted(prompt, style="comfy")
    torch.testing.assert_close(got.sequence, expected.sequence, **TOL)
    torch.testing.assert_close(got.pooled, expected.pooled, **TOL)
    assert not torch.equal(padded_0, open_clip.tokenize([prompt]))


# ComfyUI's SDTokenizer.tokenize_with_weights and _try_get_embedding (comfy/sd1_clip.py), as facts:
# - each weighted segment is cut at every " embedding:" and "\nembedding:" (re.split(' {0}|\n{0}'), a space or a
#   newline only), and every resulting word that STARTS with "embedding:" is an embedding, the segment's first
#   word included;
# - the name runs to the first whitespace (str.split()); what follows is tokenized as text;
# - a name not found is looked up again with its commas stripped (str.strip(",")); the text left is then
#   name[len(stripped):] + " " + the rest (so ",lab" finds "lab" and leaves "b": its quirk, kept for parity);
# - a name found by neither is dropped with a logged warning ("embedding:NAME does not exist, ignoring") and
#   the text after it is still tokenized;
# - the vectors carry the segment's weight, applied as z_empty + w * (z - z_empty) (encode_token_weights).
@pytest.fixture(scope="module")
def easy(sd15, tmp_path_factory):
    """sd15 with a 2-vector A1111 embedding named after its file, as ComfyUI finds files by name."""
    file = tmp_path_factory.mktemp("ti") / "EasyNegative.safetensors"
    save_file({"emb_params": torch.randn(2, 32, generator=torch.Generator().manual_seed(0))}, file)
    return sd15.with_textual_inversion(file)


@pytest.mark.parametrize(("prompt", "same_as"), [
    ("a photo of embedding:EasyNegative cat", "a photo of EasyNegative cat"),
    ("a photo of embedding:EasyNegative, cat", "a photo of EasyNegative , cat"),  # the comma stays text
    # The bug: a segment's first word was read as text ("embedding", ":", "easy", ...), so the embedding was lost.
    ("embedding:EasyNegative, ugly", "EasyNegative , ugly"),
    ("embedding:EasyNegative ugly embedding:EasyNegative", "EasyNegative ugly EasyNegative"),
    ("(embedding:EasyNegative), ugly", None),  # weighted below
    ("embedding:EasyNegative<lora:x:1> ugly", "ugly"),  # the name ends at whitespace only: no such embedding
    ("ugly\tembedding:EasyNegative", None),  # a tab does not cut the segment: all text, below
    ("embedding:,EasyNegative ugly", "EasyNegative e ugly"),  # strip(",") and its leftover arithmetic
])
def test_comfy_embedding_anywhere_in_a_segment(easy, sd15, prompt, same_as):
    if "\t" in prompt:  # ComfyUI splits at " embedding:" and "\nembedding:" only (re.split in tokenize_with_weights)
        expected = sd15(prompt).sequence  # the word "ugly\tembedding:EasyNegative" as text
    elif same_as is None:
        expected = comfy_expected(easy, "EasyNegative , ugly", {1: 1.1, 2: 1.1})
    else:
        expected = easy(same_as).sequence
    torch.testing.assert_close(easy.weighted(prompt, style="comfy").sequence, expected, **TOL)


def test_comfy_embedding_needs_whitespace_before_it(easy, sd15):
    # No whitespace before "embedding:": ComfyUI tokenizes the word as text, with a tokenizer that knows no added
    # words (sd15 is easy without the embedding's rows).
    torch.testing.assert_close(easy.weighted("uglyembedding:EasyNegative", style="comfy").sequence,
                               sd15("uglyembedding:EasyNegative").sequence, **TOL)


@pytest.mark.parametrize(("prompt", "text", "weights"), [
    ("(embedding:EasyNegative:1.2), ugly", "EasyNegative , ugly", {1: 1.2, 2: 1.2}),
    ("ugly, (embedding:EasyNegative:0.8)", "ugly , EasyNegative", {3: 0.8, 4: 0.8}),
    ("(bad embedding:EasyNegative:1.3) hands", "bad EasyNegative hands", {1: 1.3, 2: 1.3, 3: 1.3}),
])
def test_comfy_group_weight_moves_the_embedding_vectors_from_the_empty_prompt(easy, prompt, text, weights):
    """Catches the weight of a group that starts with an embedding landing on literal text, or not at all."""
    torch.testing.assert_close(easy.weighted(prompt, style="comfy").sequence, comfy_expected(easy, text, weights),
                               **TOL)


@pytest.mark.parametrize(("prompt", "same_as"), [
    ("a embedding:missing cat", "a cat"),
    ("embedding:missing cat", "cat"),  # at the start too: dropped with a warning, not read as text
    ("embedding:missing, cat", ", cat"),  # the commas stripped, still missing: the comma stays text
])
def test_comfy_missing_embedding_is_dropped_with_a_warning(easy, caplog, prompt, same_as):
    with caplog.at_level(logging.WARNING):
        got = easy.weighted(prompt, style="comfy").sequence
    torch.testing.assert_close(got, easy(same_as).sequence, **TOL)
    assert "embedding:missing" in caplog.text and "not loaded" in caplog.text


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
    # Its start rule, (prompt | /[][():]/+)*, takes only stray brackets and colons: a "|" outside brackets or a
    # lone trailing backslash fails the whole parse, and the prompt is kept as written, its schedules too.
    ("a cat | a dog, [red:blue:5]", [[10, "a cat | a dog, [red:blue:5]"]]),
    ("[cat|dog] | x", [[10, "[cat|dog] | x"]]),
    ("photo of a [cat:dog:0.5] \\", [[10, "photo of a [cat:dog:0.5] \\"]]),
    ("photo of a [cat:dog:0.5] \\(x\\)", [[5, "photo of a cat \\(x\\)"], [10, "photo of a dog \\(x\\)"]]),
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


def test_schedule_texts_share_one_emphasis_mean_per_chunk(sd15):
    """A1111 encodes all texts of one prompt's schedule as one batch (prompt_parser.get_learned_conditioning calls
    model.get_learned_conditioning(texts); sd_hijack_clip's forward: "the only time when texts is an array with more
    than one element is when you do prompt editing"), so EmphasisOriginal restores one mean over all of them, chunk
    by chunk. Catches each segment restored to its own mean, as a batch of separate prompts is."""
    segments = sd15.schedule("a [(red:1.3) cat:dog:0.4] on a mat", 20)
    assert [end for end, _ in segments] == [8, 20]
    z = torch.cat([sd15("a red cat on a mat").sequence, sd15("a dog on a mat").sequence])
    expected = a1111_original(z, multipliers([1.0, 1.3], []))  # the dog's segment moves too
    torch.testing.assert_close(torch.cat([c.sequence for _, c in segments]), expected, **TOL)
    assert torch.equal(segments[1][1].pooled, sd15("a dog on a mat").pooled)  # pooled: unweighted, its own text
    # A text with fewer chunks gets empty ones in the batch (forward's empty_chunk()); a chunk without emphasis in
    # any text keeps its values (the mean restored is its own).
    (_, cat), (_, grass) = sd15.schedule("[(cat:1.2):" + "grass " * 80 + ":3]", 10)
    first = a1111_original(torch.cat([sd15("cat").sequence, sd15("grass " * 75).sequence]), multipliers([1.2], []))
    loose = {"atol": 1e-5, "rtol": 1e-5}  # a mean over 2 x 77 x 32 floats, summed in another order
    torch.testing.assert_close(cat.sequence, torch.cat([first[:1], sd15("").sequence], dim=1), **loose)
    torch.testing.assert_close(grass.sequence, torch.cat([first[1:], sd15("grass " * 5).sequence], dim=1), **loose)


def test_schedule_and_weights_follow_a1111(sdxl):
    [(w1, s1), (w2, s2)] = sdxl.schedule("a cat AND a [dog:bird:5] :1.5", 10, style="comfy")
    assert (w1, w2) == (1.0, 1.5) and [e for e, _ in s1] == [10] and [e for e, _ in s2] == [5, 10]
    torch.testing.assert_close(s2[1][1].sequence, sdxl(" a bird ").sequence, **TOL)  # no weights: the plain text


@pytest.mark.parametrize(("blend", "compel_prompt"), [
    ((["a cat", "a dog"], [0.7, 0.6]), '("a cat", "a dog").blend(0.7, 0.6, no_normalize)'),
    ((["word " * 100, "a (cat:1.2)"], [0.5, 0.5]), '("' + "word " * 100 + '", "a (cat)1.2").blend(0.5, 0.5)'),
])
def test_blend_equals_compels_blend(tiny, blend, compel_prompt):
    """compel's ``.blend()`` on the same weights: catches normalised weights, and a shorter prompt padded with
    anything but the empty prompt's windows (compel#45). Its up-weighting is ComfyUI's (z_empty + w (z - z_empty))."""
    compel = pytest.importorskip("compel")
    pipe = tiny.pipeline("sd15")
    reference = compel.Compel(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, truncate_long_prompts=False)
    with torch.no_grad():
        expected = reference(compel_prompt)
    tc = TextConditioner.from_pretrained("sd15", weights=tiny.sd15)
    torch.testing.assert_close(tc.blend(*blend, style="comfy").sequence, expected, **TOL)


def test_blend_pooled_is_comfys_conditioning_average(sdxl):
    # ComfyUI's ConditioningAverage: pooled_output_to * w + pooled_output_from * (1 - w).
    to, other = sdxl("a cat").pooled, sdxl("a dog").pooled
    torch.testing.assert_close(sdxl.blend(["a cat", "a dog"], [0.3, 0.7]).pooled, to * 0.3 + other * 0.7, **TOL)
    with pytest.raises(ValueError, match="one weight per prompt"):
        sdxl.blend(["a"], [0.5, 0.5])


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
    "a (red)1.2 cat.swap(small dog, s_start=0.5) on a mat",  # compel's conditioning: the swap's original
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
