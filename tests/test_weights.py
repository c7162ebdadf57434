"""Every weights format into every encoder that can hold it, against the reference forward."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path

import open_clip
import pytest
import torch
from conftest import openclip_blocks
from safetensors.torch import load_file, save_file

from clipcond import TextConditioner, WeightsError
from clipcond.cli import main
from clipcond.encoders.weights import StateReader

TOL = {"atol": 1e-5, "rtol": 1e-5}
PROMPTS = ["a photo of a cat", "a running dog!", "", "an astronaut riding a horse on mars, highly detailed"]


@pytest.mark.parametrize("file", ["openclip_h.safetensors", "open_clip_pytorch_model.bin"])
def test_open_clip_checkpoint_sd2_matches_open_clip_forward(tiny, file):
    model = tiny.openclip_h
    ids = open_clip.tokenize(PROMPTS)
    tc = TextConditioner.from_pretrained("tiny-sd2", weights=tiny.files[file])
    c = tc(PROMPTS)
    # SD 2.x FrozenOpenCLIPEmbedder(layer="penultimate"): ln_final of the penultimate block.
    torch.testing.assert_close(c.sequence, model.ln_final(openclip_blocks(model, ids, 3)), **TOL)
    torch.testing.assert_close(c.pooled, c.sequence[torch.arange(4), ids.argmax(-1)], **TOL)
    projected = TextConditioner.from_pretrained("tiny-sd2", weights=tiny.files[file], pooled="projected")
    torch.testing.assert_close(projected(PROMPTS).pooled, model.encode_text(ids), **TOL)
    assert projected.pooled_dim == 40 and len(projected.towers[0].blocks) == 4 and len(tc.towers[0].blocks) == 3


def test_open_clip_checkpoint_equals_diffusers_sd2_folder(tiny):
    prompts = [p for p in PROMPTS if "!" not in p]
    a = TextConditioner.from_pretrained("tiny-sd2", weights=tiny.files["openclip_h.safetensors"])(prompts)
    b = TextConditioner.from_pretrained("sd2", weights=tiny.sd2)(prompts)
    torch.testing.assert_close(a.sequence, b.sequence, **TOL)
    torch.testing.assert_close(a.pooled, b.pooled, **TOL)


def test_open_clip_checkpoint_bigg_matches_open_clip_forward(tiny):
    model = tiny.openclip_g
    ids = open_clip.tokenize(PROMPTS)
    c = TextConditioner.from_pretrained("tiny-sdxl-refiner", weights=tiny.files["openclip_g.safetensors"])(PROMPTS)
    # SDXL FrozenOpenCLIPEmbedder2: penultimate without ln_final; pooled = encode_text.
    torch.testing.assert_close(c.sequence, openclip_blocks(model, ids, 3), **TOL)
    torch.testing.assert_close(c.pooled, model.encode_text(ids), **TOL)


@pytest.mark.parametrize(("name", "file", "folder"), [
    ("sd15", "sd15.safetensors", "sd15"), ("sd15", "sd15.ckpt", "sd15"),
    ("sd2", "sd2.safetensors", "sd2"), ("sdxl", "sdxl.safetensors", "sdxl"),
    ("sdxl-refiner", "sdxl.safetensors", "sdxl"),
    ("sd15", "sdxl.safetensors", "sd15"),  # SDXL's first tower is OpenAI's CLIP ViT-L: it can serve SD 1.x
])
def test_single_file_equals_pipeline_folder(tiny, name, file, folder):
    prompts = [p for p in PROMPTS if "!" not in p]
    tiny_name = {"sd15": "tiny-sd15", "sd2": "tiny-sd2", "sdxl": "tiny-sdxl", "sdxl-refiner": "tiny-sdxl-refiner"}
    a = TextConditioner.from_pretrained(tiny_name[name], weights=tiny.files[file])
    b = TextConditioner.from_pretrained(name, weights=getattr(tiny, folder))
    ca, cb = a(prompts), b(prompts)
    torch.testing.assert_close(ca.sequence, cb.sequence, **TOL)
    torch.testing.assert_close(ca.pooled, cb.pooled, **TOL)
    torch.testing.assert_close(a.null(2).sequence, b.null(2).sequence, **TOL)


def test_single_file_reads_only_text_tensors(tiny, monkeypatch):
    read = []
    original = StateReader.read
    monkeypatch.setattr(StateReader, "read", lambda self, key: read.append(key) or original(self, key))
    tc = TextConditioner.from_pretrained("tiny-sdxl", weights=tiny.files["sdxl.safetensors"])
    assert read and all(k.startswith(("conditioner.embedders.0.", "conditioner.embedders.1.")) for k in read)
    # The first tower stops at the penultimate block: its last block is never read either.
    assert not any(k.startswith("conditioner.embedders.0.transformer.text_model.encoder.layers.3.") for k in read)
    assert tc(["x"]).sequence.shape == (1, 77, 80)


def test_transformers_folder_with_vision_tower_and_new_key_names(tiny, tmp_path):
    from transformers import CLIPConfig, CLIPModel

    tower = tiny.l_tower
    config = CLIPConfig(text_config=tiny.clip_l.config.to_dict(),
                        vision_config={"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1,
                                       "num_attention_heads": 4, "image_size": 16, "patch_size": 8},
                        projection_dim=tower.width)
    full = CLIPModel(config)
    full.text_model.load_state_dict(tiny.clip_l.state_dict())
    full.save_pretrained(tmp_path / "clip")
    tc = TextConditioner.from_pretrained("sd15", weights=tmp_path / "clip")
    ids = tiny.tok_l(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    torch.testing.assert_close(tc(PROMPTS).sequence, tiny.clip_l(ids).last_hidden_state, **TOL)
    # transformers 5 saves CLIPTextModel without the text_model. prefix; both spellings load.
    tiny.clip_l.save_pretrained(tmp_path / "t5")
    assert not any(k.startswith("text_model.") for k in load_file(tmp_path / "t5" / "model.safetensors"))
    torch.testing.assert_close(TextConditioner.from_pretrained("sd15", weights=tmp_path / "t5")(PROMPTS).sequence,
                               tc(PROMPTS).sequence, atol=0, rtol=0)


def test_sharded_transformers_folder(tiny, tmp_path):
    tiny.clip_g.save_pretrained(tmp_path / "g", max_shard_size="2MB")
    assert (tmp_path / "g" / "model.safetensors.index.json").is_file()
    a = TextConditioner.from_pretrained("sdxl-refiner", weights=tmp_path / "g")(PROMPTS)
    b = TextConditioner.from_pretrained("sdxl-refiner", weights=tiny.sdxl)(PROMPTS)
    torch.testing.assert_close(a.pooled, b.pooled, atol=0, rtol=0)


def _fake_hub_cache(home: Path, repo: str, folder: Path, subfolders: list[str], commit: str) -> Path:
    """The layout huggingface_hub writes: models--org--name/{refs/main, snapshots/<commit>/...}."""
    cache = home / "hub" / f"models--{repo.replace('/', '--')}"
    snapshot = cache / "snapshots" / commit
    for sub in subfolders:
        (snapshot / sub).mkdir(parents=True)
        for file in ("config.json", "model.safetensors"):
            (snapshot / sub / file).write_bytes((folder / sub / file).read_bytes())
    (cache / "refs").mkdir(exist_ok=True)
    (cache / "refs" / "main").write_text(commit)
    return snapshot


def _offline(home: Path, code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


def test_hub_cache_resolves_offline(tiny, tmp_path):
    _fake_hub_cache(tmp_path, "stabilityai/stable-diffusion-xl-base-1.0", tiny.sdxl,
                    ["text_encoder", "text_encoder_2"], "a" * 40)
    out = tmp_path / "out.safetensors"
    code = ("import clipcond; from safetensors.torch import save_file\n"
            "tc = clipcond.TextConditioner.from_pretrained('sdxl')\n"
            f"c = tc({PROMPTS!r}); save_file({{'s': c.sequence, 'p': c.pooled}}, {str(out)!r})")
    result = _offline(tmp_path, code)
    assert result.returncode == 0, result.stderr[-2000:]
    ref = TextConditioner.from_pretrained("sdxl", weights=tiny.sdxl)(PROMPTS)
    got = load_file(out)
    assert torch.equal(got["s"], ref.sequence) and torch.equal(got["p"], ref.pooled)
    cli = subprocess.run([sys.executable, "-m", "clipcond", "download", "sdxl"], capture_output=True, text=True,
                         env={**os.environ, "HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert cli.returncode == 0, cli.stderr[-2000:]
    assert "text_encoder_2/model.safetensors" in cli.stdout and " MB " in cli.stdout


def test_hub_revision_and_missing_cache_error(tiny, tmp_path):
    _fake_hub_cache(tmp_path, "org/sd15-copy", tiny.sd15, ["text_encoder"], "b" * 40)
    code = ("import clipcond\n"
            f"tc = clipcond.TextConditioner.from_pretrained('sd15', weights='org/sd15-copy', revision='{'b' * 40}')\n"
            "print(tuple(tc(['a']).sequence.shape))\n"
            "try:\n    clipcond.TextConditioner.from_pretrained('sd2')\n"
            "except clipcond.WeightsError as e:\n    print('ERR', e)")
    result = _offline(tmp_path, code)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "(1, 77, 32)" in result.stdout
    assert ("ERR stabilityai/stable-diffusion-2-1: none of text_encoder/config.json, open_clip_model.safetensors, "
            "open_clip_pytorch_model.bin, config.json with weights found on the hub or in the local Hugging Face "
            "cache") in result.stdout
    assert "HF_HUB_OFFLINE=1" in result.stdout


def test_download_fetches_only_text_encoder_files(monkeypatch, tmp_path):
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError

    from clipcond import get_spec
    from clipcond.encoders.hub import download

    asked = []

    def fake_download(repo, filename, *, subfolder=None, revision=None):
        asked.append(f"{subfolder}/{filename}")
        if filename == "model.safetensors" and subfolder == "text_encoder":
            raise EntryNotFoundError("not in this repo")
        path = tmp_path / "snap" / subfolder / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"{}")
        return str(path)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    root = download(get_spec("sdxl"), "stabilityai/stable-diffusion-xl-base-1.0")
    assert root == tmp_path / "snap"
    assert asked == ["text_encoder/config.json", "text_encoder/model.safetensors",
                     "text_encoder/model.fp16.safetensors",
                     "text_encoder_2/config.json", "text_encoder_2/model.safetensors"]


class Evil:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ.get('CLIPCOND_PWNED', '/tmp/clipcond-pwned')}",))


def test_malicious_pickle_is_refused(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("CLIPCOND_PWNED", str(marker))
    file = tmp_path / "open_clip_pytorch_model.bin"
    torch.save({"token_embedding.weight": torch.zeros(2), "payload": Evil()}, file)
    with pytest.raises(WeightsError, match=r"open_clip_pytorch_model\.bin: refused: .*more than tensors"):
        TextConditioner.from_pretrained("tiny-sd2", weights=file)
    assert not marker.exists()


def test_wrong_checkpoints_are_recognised(tiny):
    with pytest.raises(WeightsError, match=r"sd15\.safetensors is an SD 1\.x single-file checkpoint .*CLIP ViT-L.*"
                                           r"encoder 'tiny-sdxl' needs CLIP ViT-L \+ OpenCLIP"):
        TextConditioner.from_pretrained("tiny-sdxl", weights=tiny.files["sd15.safetensors"])
    with pytest.raises(WeightsError, match=r"hidden_act 'quick_gelu', but tower 'openclip-vit-h-14' is trained "
                                           r"with 'gelu': these weights belong to another encoder"):
        TextConditioner.from_pretrained("sd2", weights=tiny.sd15)
    with pytest.raises(WeightsError, match=r"no text_encoder_2/config.json for tower 'openclip-vit-bigg-14' "
                                           r"of encoder 'sdxl'"):
        TextConditioner.from_pretrained("sdxl", weights=tiny.sd15)
    with pytest.raises(WeightsError, match=r"\(an open_clip checkpoint\): holds 4 transformer blocks, tower "
                                           r"'openclip-vit-h-14' expects 24"):
        TextConditioner.from_pretrained("sd2", weights=tiny.files["openclip_h.safetensors"])
    with pytest.raises(WeightsError, match=r"tensor shape mismatch: .*token_embedding.weight: "
                                           r"expected \(49408, 1024\), got \(49408, 40\)"):
        TextConditioner.from_pretrained(clipcond_spec("sd2", layers=4), weights=tiny.files["openclip_h.safetensors"])


def test_missing_unexpected_and_misshapen_tensors_are_named(tiny, tmp_path):
    state = load_file(tiny.files["openclip_g.safetensors"])
    broken = {k: v for k, v in state.items() if k != "ln_final.bias"}
    save_file(broken, tmp_path / "missing.safetensors")
    with pytest.raises(WeightsError, match=r"missing\.safetensors .*missing tensor\(s\): final_norm\.bias"):
        TextConditioner.from_pretrained("tiny-sdxl-refiner", weights=tmp_path / "missing.safetensors")
    save_file({**state, "transformer.resblocks.0.attn.extra": torch.zeros(1)}, tmp_path / "extra.safetensors")
    with pytest.raises(WeightsError, match=r"unexpected tensor\(s\) .*transformer\.resblocks\.0\.attn\.extra"):
        TextConditioner.from_pretrained("tiny-sdxl-refiner", weights=tmp_path / "extra.safetensors")
    save_file({**state, "ln_final.weight": torch.zeros(7)}, tmp_path / "shape.safetensors")
    with pytest.raises(WeightsError, match=r"final_norm\.weight: expected \(48,\), got \(7,\)"):
        TextConditioner.from_pretrained("tiny-sdxl-refiner", weights=tmp_path / "shape.safetensors")
    with pytest.raises(WeightsError, match=r"holds 4 transformer blocks, tower 'tiny-openclip-vit-h-14' expects 5"):
        TextConditioner.from_pretrained(
            clipcond_spec("tiny-sd2", layers=5), weights=tiny.files["openclip_h.safetensors"])
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(WeightsError, match=r"notes\.txt: unknown weights file type '\.txt'"):
        TextConditioner.from_pretrained("tiny-sd2", weights=tmp_path / "notes.txt")
    with pytest.raises(WeightsError, match=r"weights='/nonexistent/x': no such file or folder, and not a hub repo id"):
        TextConditioner.from_pretrained("tiny-sd2", weights="/nonexistent/x")


def test_safetensors_reader_equals_the_library_and_names_damage(tmp_path):
    # clipcond reads .safetensors with plain reads (no memory map: see SafetensorsFile).
    from clipcond.encoders.weights import SafetensorsFile

    g = torch.Generator().manual_seed(0)
    tensors = {"f32": torch.randn(3, 4, generator=g), "f16": torch.randn(5, generator=g).half(),
               "bf16": torch.randn(2, 3, generator=g).bfloat16(), "i64": torch.arange(7), "scalar": torch.tensor(2.5),
               "empty": torch.zeros(0, 4)}
    path = tmp_path / "all.safetensors"
    save_file(tensors, path, metadata={"format": "pt"})
    with ExitStack() as stack:
        reader = StateReader([path], stack)
        assert sorted(reader.keys()) == sorted(tensors)
        for key, expected in load_file(path).items():
            got = reader.read(key)
            assert got.dtype == expected.dtype and torch.equal(got, expected), key
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-10])
    with pytest.raises(WeightsError, match=r"cut\.safetensors: safetensors tensor '\w+': data_offsets must be "
                                           r"\[begin, end\] within the file's \d+ data bytes"):
        SafetensorsFile(tmp_path / "cut.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x10" + b"\x00" * 7 + b"not json at all!")
    with pytest.raises(WeightsError, match=r"junk\.safetensors: not a safetensors file: its header is not UTF-8 JSON"):
        SafetensorsFile(tmp_path / "junk.safetensors")
    (tmp_path / "tiny.safetensors").write_bytes(b"\xff" * 4)
    with pytest.raises(WeightsError, match=r"tiny\.safetensors: not a safetensors file: header length"):
        TextConditioner.from_pretrained("tiny-sd2", weights=tmp_path / "tiny.safetensors")


def _with_header(tmp_path: Path, name: str, header: object, data: bytes) -> Path:
    """A safetensors file whose JSON header is ``header``, however wrong, followed by ``data``."""
    text = json.dumps(header).encode()
    path = tmp_path / name
    path.write_bytes(len(text).to_bytes(8, "little") + text + data)
    return path


def test_damaged_safetensors_headers_are_weights_errors_naming_file_and_tensor(tmp_path):
    """Bugs: a header that is a JSON list raised AttributeError ("has no attribute 'items'"); a one-value
    data_offsets raised "not enough values to unpack" naming no file; data_offsets shifted onto a neighbour's
    bytes loaded them silently as the tensor; a header of no tensors was blamed as weights of another size.
    Header lengths or offsets that leave spare data bytes (the data read shifted) and shapes torch cannot allocate
    were not caught either. Each now fails in SafetensorsFile with the file and the tensor named."""
    data = torch.arange(8, dtype=torch.float32).numpy().tobytes()  # 32 bytes: two [4] float32 tensors
    good = {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
            "b": {"dtype": "F32", "shape": [4], "data_offsets": [16, 32]}}
    cases = {
        "list.safetensors": ([good], r"its header is JSON list, not an object"),
        "one.safetensors": ({**good, "b": {**good["b"], "data_offsets": [16]}},
                            r"tensor 'b': data_offsets must be \[begin, end\]"),
        "overlap.safetensors": ({**good, "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                                 "b": {**good["b"], "data_offsets": [4, 20]}}, r"tensors 'a' and 'b' overlap"),
        "dtype.safetensors": ({**good, "b": {**good["b"], "dtype": "F33"}}, r"tensor 'b': unknown dtype 'F33'"),
        "shape.safetensors": ({**good, "b": {**good["b"], "shape": [-4]}}, r"tensor 'b': shape must be a list of"),
        "huge.safetensors": ({**good, "c": {"dtype": "F32", "shape": [0, 1 << 63], "data_offsets": [32, 32]}},
                             r"tensor 'c': shape \[0, 9223372036854775808\] is too large for torch"),
        "spare.safetensors": ({"a": good["a"]}, r"tensors end at data byte 16 of 32: a wrong header length"),
        "empty.safetensors": ({}, r"the file holds no tensors"),
    }
    for name, (header, message) in cases.items():
        path = _with_header(tmp_path, name, header, data)
        with pytest.raises(WeightsError, match=re.escape(str(path)) + r":.*" + message):
            TextConditioner.from_pretrained("sd15", weights=path)
    # A header length one short that still ends in JSON (its padding space): the data would start a byte early.
    text = json.dumps(good).encode() + b" "
    (tmp_path / "early.safetensors").write_bytes((len(text) - 1).to_bytes(8, "little") + text + data)
    with pytest.raises(WeightsError, match=r"early\.safetensors: the safetensors tensors end at data byte 32 of 33"):
        TextConditioner.from_pretrained("sd15", weights=tmp_path / "early.safetensors")
    # fp8 text encoders (F8_E4M3 / F8_E5M2) read as torch's float8 dtypes, bit for bit.
    fp8 = {"e4m3": torch.randn(3, 5).to(torch.float8_e4m3fn), "e5m2": torch.randn(2).to(torch.float8_e5m2)}
    save_file(fp8, tmp_path / "fp8.safetensors")
    with ExitStack() as stack:
        reader = StateReader([tmp_path / "fp8.safetensors"], stack)
        for key, expected in fp8.items():
            got = reader.read(key)
            assert got.dtype == expected.dtype and torch.equal(got.view(torch.uint8), expected.view(torch.uint8))


def test_damaged_pickles_are_weights_errors_naming_the_file(tiny, tmp_path):
    """Bug: a truncated or damaged torch.save file (.bin/.ckpt) raised torch's RuntimeError ("PytorchStreamReader
    failed ..."), UnicodeDecodeError or EOFError, not a WeightsError naming the file."""
    data = tiny.files["open_clip_pytorch_model.bin"].read_bytes()
    path = tmp_path / "open_clip_pytorch_model.bin"
    for cut in (0, 10, 100, len(data) // 2, len(data) - 30):
        path.write_bytes(data[:cut])
        with pytest.raises(WeightsError, match=re.escape(str(path)) + r": (not a readable torch\.save file|refused)"):
            TextConditioner.from_pretrained("tiny-sd2", weights=path)
    torch.save({1: torch.zeros(2)}, path)
    with pytest.raises(WeightsError, match=r"expected a state dict \(names to tensors\), got dict with keys that"):
        TextConditioner.from_pretrained("tiny-sd2", weights=path)


def test_laion_folder_with_both_layouts_is_sized_by_the_folder(tiny, tmp_path, capsys):
    """Bug: a clone of a laion repo (transformers config.json + model.safetensors beside open_clip_config.json +
    open_clip_model.safetensors) was read through the open_clip file at the preset's size, so a tower of another
    size failed ("holds 4 transformer blocks, tower 'openclip-vit-h-14' expects 24"). Its size now comes from
    open_clip_config.json (model_cfg.text_cfg), or without one from the transformers config.json beside it,
    for the folder and for its open_clip file named alone."""
    from transformers import CLIPConfig, CLIPModel

    tower, hf_text = tiny.h_tower, tiny.clip_h_full  # 40 wide, 4 blocks; open_clip copy: tiny.openclip_h
    vision = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1, "num_attention_heads": 4,
              "image_size": 16, "patch_size": 8}
    full = CLIPModel(CLIPConfig(text_config=hf_text.config.to_dict(), vision_config=vision,
                                projection_dim=tower.projection_dim))
    full.text_model.load_state_dict(hf_text.text_model.state_dict())
    full.text_projection.load_state_dict(hf_text.text_projection.state_dict())
    full.save_pretrained(tmp_path)
    model = tiny.openclip_h
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "open_clip_model.safetensors")
    text_cfg = {"context_length": 77, "vocab_size": 49408, "width": tower.width, "heads": tower.heads,
                "layers": tower.layers, "mlp_ratio": tower.mlp_width / tower.width}
    (tmp_path / "open_clip_config.json").write_text(json.dumps({  # as laion's repos publish it
        "model_cfg": {"embed_dim": tower.projection_dim, "text_cfg": text_cfg,
                      "vision_cfg": {"image_size": 16, "layers": 1, "width": 32, "patch_size": 8}},
        "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]},
    }))
    ids = open_clip.tokenize(PROMPTS)
    # SD 2.x: ln_final of the penultimate block, pooled at the first EOS; open_clip's and transformers' forward.
    expected = model.ln_final(openclip_blocks(model, ids, tower.layers - 1))
    hf_out = full.text_model(ids, output_hidden_states=True)
    torch.testing.assert_close(full.text_model.final_layer_norm(hf_out.hidden_states[-2]), expected, **TOL)
    tc = TextConditioner.from_pretrained("sd2", weights=tmp_path)
    assert (tc.towers[0].spec.width, tc.towers[0].spec.layers) == (tower.width, tower.layers)
    c = tc(PROMPTS)
    torch.testing.assert_close(c.sequence, expected, **TOL)
    torch.testing.assert_close(c.pooled, expected[torch.arange(len(PROMPTS)), ids.argmax(-1)], **TOL)
    projected = TextConditioner.from_pretrained("sd2", weights=tmp_path, pooled="projected")
    torch.testing.assert_close(projected(PROMPTS).pooled, model.encode_text(ids), **TOL)
    torch.testing.assert_close(projected(PROMPTS).pooled, full.text_projection(hf_out.pooler_output), **TOL)
    cat = open_clip.tokenize(["a cat"])
    norm = model.ln_final(openclip_blocks(model, cat, tower.layers - 1))[0, cat.argmax(-1)].norm()
    for config in ("open_clip_config.json", "config.json"):  # the clone's open_clip file named alone, by the CLI
        assert main(["encode", "--encoder", "sd2", "--weights", str(tmp_path / "open_clip_model.safetensors"),
                     "a cat"]) == 0, config
        assert f"|pooled| {norm.item():.4f}" in capsys.readouterr().out
        if config == "open_clip_config.json":
            (tmp_path / config).rename(tmp_path / "open_clip_config.json.away")  # config.json states the size
    sized = TextConditioner.from_pretrained("sd2", weights=tmp_path)
    assert (sized.towers[0].spec.width, sized.towers[0].spec.layers) == (tower.width, tower.layers)
    torch.testing.assert_close(sized(PROMPTS).sequence, expected, **TOL)
    text_cfg["hf_model_name"] = "roberta-base"  # a config whose text tower is not a CLIP text transformer
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": {"text_cfg": text_cfg}}))
    with pytest.raises(WeightsError, match=r"open_clip_config\.json: its text tower is the transformers model "
                                           r"'roberta-base', not a CLIP text transformer \(clipcond runs"):
        TextConditioner.from_pretrained("sd2", weights=tmp_path)


def test_another_models_clip_config_beside_an_open_clip_file_is_not_read(tiny, tmp_path):
    """Bug: an open_clip file in a shared folder beside another model's CLIPModel config.json was sized by that
    config, or refused ("hidden_act 'quick_gelu', but tower ... these weights belong to another encoder"). A
    config.json sizes an open_clip file only where it states the file's own block count and width."""
    from transformers import CLIPConfig

    tower, model = tiny.h_tower, tiny.openclip_h  # tiny-sd2's own size: 40 wide, 4 blocks
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "open_clip_model.safetensors")
    ids = open_clip.tokenize(PROMPTS)
    expected = model.ln_final(openclip_blocks(model, ids, tower.layers - 1))
    vision = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1, "num_attention_heads": 4}
    others = [tiny.clip_l.config.to_dict(),  # openai's CLIP-L text config (quick_gelu, 32 wide)
              {**tiny.clip_h_full.config.to_dict(), "hidden_size": 48, "intermediate_size": 96}]  # gelu, 48 wide
    for text in others:
        CLIPConfig(text_config=text, vision_config=vision).to_json_file(tmp_path / "config.json")
        for weights in (tmp_path, tmp_path / "open_clip_model.safetensors"):
            got = TextConditioner.from_pretrained("tiny-sd2", weights=weights)(PROMPTS)
            torch.testing.assert_close(got.sequence, expected, **TOL)


def test_laion_repo_id_from_the_hf_cache_is_sized_by_its_open_clip_config(tiny, tmp_path):
    """Bug: a laion open_clip repo given by hub id (`weights="laion/..."`) was downloaded without its
    open_clip_config.json, so a tower of another size than the preset's failed as for a lone file; the config
    is fetched beside the weights and sizes the tower, as for a clone of the repo."""
    tower, model = tiny.h_tower, tiny.openclip_h
    commit = "d" * 40
    cache = tmp_path / "hub" / "models--laion--tiny-vit-h"
    snapshot = cache / "snapshots" / commit
    snapshot.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, snapshot / "open_clip_model.safetensors")
    text_cfg = {"context_length": 77, "vocab_size": 49408, "width": tower.width, "heads": tower.heads,
                "layers": tower.layers, "mlp_ratio": tower.mlp_width / tower.width}
    (snapshot / "open_clip_config.json").write_text(json.dumps({"model_cfg": {"embed_dim": tower.projection_dim,
                                                                              "text_cfg": text_cfg}}))
    (cache / "refs").mkdir()
    (cache / "refs" / "main").write_text(commit)
    out = tmp_path / "out.safetensors"
    code = ("import clipcond; from safetensors.torch import save_file\n"
            "tc = clipcond.TextConditioner.from_pretrained('sd2', weights='laion/tiny-vit-h')\n"
            f"c = tc({PROMPTS!r}); save_file({{'s': c.sequence, 'p': c.pooled}}, {str(out)!r})")
    result = _offline(tmp_path, code)
    assert result.returncode == 0, result.stderr[-2000:]
    got = load_file(out)
    ids = open_clip.tokenize(PROMPTS)
    expected = model.ln_final(openclip_blocks(model, ids, tower.layers - 1))  # SD 2.x: penultimate block + LN
    torch.testing.assert_close(got["s"], expected, **TOL)
    torch.testing.assert_close(got["p"], expected[torch.arange(len(PROMPTS)), ids.argmax(-1)], **TOL)


def clipcond_spec(name: str, **tower_changes):
    from clipcond import get_spec

    spec = get_spec(name)
    return spec.replace(towers=tuple(t.replace(**tower_changes) for t in spec.towers))


def test_fingerprint_is_stable_across_formats_and_changes_with_weights_spec_dtype(tiny):
    folder = TextConditioner.from_pretrained("tiny-sd15", weights=tiny.sd15)
    single = TextConditioner.from_pretrained("tiny-sd15", weights=tiny.files["sd15.safetensors"])
    assert folder.fingerprint == single.fingerprint and len(folder.fingerprint) == 64
    folder = TextConditioner.from_pretrained("sd15", weights=tiny.sd15)
    assert folder.fingerprint != single.fingerprint  # another spec name: another fingerprint
    skip = TextConditioner.from_pretrained("sd15", weights=tiny.sd15, clip_skip=1)
    half = TextConditioner.from_pretrained("sd15", weights=tiny.sd15, dtype=torch.float16)
    other = TextConditioner.from_pretrained("tiny-sd15")
    assert len({folder.fingerprint, skip.fingerprint, half.fingerprint, other.fingerprint}) == 4


def test_inspect_cli_names_the_format(tiny):
    out = subprocess.run([sys.executable, "-m", "clipcond", "inspect", str(tiny.files["sdxl.safetensors"])],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "an SDXL single-file checkpoint" in out.stdout and "conditioner.embedders.1.model." in out.stdout
    index = json.loads((tiny.sdxl / "model_index.json").read_text())
    assert index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
