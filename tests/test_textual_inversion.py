"""Textual inversion: every file format, parity with diffusers' load_textual_inversion."""

from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import save_file

from clipcond import TextConditioner, WeightsError

TOL = {"atol": 1e-5, "rtol": 1e-5}


def a1111_pt(path, vectors):
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors}, "name": path.stem,
                "step": 1000, "sd_checkpoint": "abcd1234", "sd_checkpoint_name": "v1-5"}, path)
    return path


def test_diffusers_learned_embeds_match_load_textual_inversion(tiny, tmp_path):
    vectors = torch.randn(3, 32)  # multi-vector
    file = tmp_path / "learned_embeds.safetensors"
    save_file({"<cat-toy>": vectors}, file)
    pipe = tiny.pipeline("sd15")
    pipe.load_textual_inversion(str(file))
    prompts = ["a photo of <cat-toy> on a mat", "a dog"]
    embeds, _ = pipe.encode_prompt(prompts, "cpu", 1, False)
    tc = TextConditioner.from_pretrained("sd15", weights=tiny.sd15).with_textual_inversion(file)
    ids = tc.tokenize(prompts)[0].ids
    assert ids[0, 4:7].tolist() == [49408, 49409, 49410]
    torch.testing.assert_close(tc(prompts).sequence, embeds, **TOL)


def test_token_changes_only_its_positions_and_frozen_rows(tmp_path):
    base = TextConditioner.from_pretrained("tiny-sd15")
    vectors = torch.randn(2, 32)
    tc = base.with_textual_inversion(a1111_pt(tmp_path / "mystyle.pt", vectors))
    assert tc.added == {"mystyle": 2} and base.added == {}
    table = tc.towers[0].token_embedding.weight
    assert torch.equal(table[:49408], base.towers[0].token_embedding.weight)  # other tokens untouched
    assert torch.equal(table[49408:], vectors)
    assert tc.towers[0].blocks[0] is base.towers[0].blocks[0]  # shared, not copied
    plain = ["a photo of a cat"]
    assert torch.equal(tc(plain).sequence, base(plain).sequence)
    with_token = tc(["a photo of MyStyle cat"])  # matched case-insensitively, like the prompt
    without = base(["a photo of"])
    # Causal attention: rows before the token are the plain prompt's; its own rows are new.
    assert torch.equal(with_token.sequence[:, :4], without.sequence[:, :4])
    assert not torch.allclose(with_token.sequence[:, 4:6], base(["a photo of mystyle"]).sequence[:, 4:6])
    ids = tc.tokenize(["a photo of MyStyle cat"])[0].ids[0, :8].tolist()
    assert ids == [49406, 320, 1125, 539, 49408, 49409, 2368, 49407]
    assert not any(p.requires_grad for p in tc.parameters())


def test_a1111_safetensors_and_sdxl_files(tmp_path):
    save_file({"emb_params": torch.randn(1, 40)}, tmp_path / "sd2style.safetensors")
    tc = TextConditioner.from_pretrained("tiny-sd2").with_textual_inversion(tmp_path / "sd2style.safetensors")
    assert tc.tokenize(["sd2style"])[0].ids[0, :3].tolist() == [49406, 49408, 49407]
    save_file({"clip_l": torch.randn(2, 32), "clip_g": torch.randn(2, 48)}, tmp_path / "xl.safetensors")
    xl = TextConditioner.from_pretrained("tiny-sdxl").with_textual_inversion(tmp_path / "xl.safetensors", token="<xl>")
    for tokens in xl.tokenize(["a <xl> cat"]):
        assert tokens.ids[0, :6].tolist()[:5] == [49406, 320, 49408, 49409, 2368]
    out = xl(["a <xl> cat", "a cat"])
    assert out.sequence.shape == (2, 77, 80) and torch.isfinite(out.sequence).all()


def test_embedding_for_another_encoder_is_refused(tmp_path):
    file = a1111_pt(tmp_path / "sd15only.pt", torch.randn(1, 32))
    with pytest.raises(WeightsError, match=r"no vectors for tower 'tiny-openclip-vit-bigg-14' \(width 48\); "
                                           r"the file holds \{'\*': 32\}: it was trained for another encoder"):
        TextConditioner.from_pretrained("tiny-sdxl").with_textual_inversion(file)
    save_file({"a": torch.zeros(1), "b": torch.zeros(1)}, tmp_path / "odd.safetensors")
    with pytest.raises(WeightsError, match=r"odd\.safetensors: not a textual-inversion file I know"):
        TextConditioner.from_pretrained("tiny-sd15").with_textual_inversion(tmp_path / "odd.safetensors")
    tc = TextConditioner.from_pretrained("tiny-sd15").with_textual_inversion(file)
    with pytest.raises(ValueError, match="token 'sd15only' is already loaded"):
        tc.with_textual_inversion(file)


def test_damaged_safetensors_embedding_is_a_weights_error_naming_the_file(tmp_path):
    """Bug: .safetensors embeddings were read with safetensors' load_file, whose SafetensorError (not a
    WeightsError) named no file; a damaged file now fails in clipcond's one header reader, naming it."""
    path = tmp_path / "learned_embeds.safetensors"
    save_file({"<cat-toy>": torch.randn(2, 32)}, path)
    data = path.read_bytes()
    path.write_bytes(data[:-4])  # truncated: the tensor's data_offsets run past the end
    with pytest.raises(WeightsError, match=re.escape(str(path)) + r": safetensors tensor '<cat-toy>': data_offsets"):
        TextConditioner.from_pretrained("tiny-sd15").with_textual_inversion(path)
    path.write_bytes(b"\x05" + b"\x00" * 7 + b"[1,2]")  # a header that is not a JSON object
    with pytest.raises(WeightsError, match=re.escape(f"{path}: not a safetensors file: its header is JSON list")):
        TextConditioner.from_pretrained("tiny-sd15").with_textual_inversion(path)
