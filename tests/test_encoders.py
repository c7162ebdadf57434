"""Encoders beyond the four SD ones: full ViT-H towers for SD 2.x, full CLIP repos, the CLIP halves
of SD3 and Flux, user specs. Each against the library that defines it, on the same small weights."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import torch
from conftest import hf_text_model, hf_tokenizer, save_published
from safetensors.torch import load_file

import clipcond
from clipcond import EmbeddingStore, SpecError, TextConditioner, WeightsError, get_spec
from clipcond.cli import main
from clipcond.encoders.weights import StateReader
from clipcond.registry import REGISTRY, register_encoder

TOL = {"atol": 1e-5, "rtol": 1e-5}
PROMPTS = ["a photo of a cat", "an astronaut riding a horse on mars, highly detailed", "", "a running dog"]


def hidden(model, ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        return model(ids, output_hidden_states=True).hidden_states


def final_ln(model):
    return getattr(model, "text_model", model).final_layer_norm  # transformers 5 keeps CLIPTextModel flat


# --- SD 2.x on a full ViT-H tower -------------------------------------------------------------------

@pytest.fixture(scope="module")
def full_h(tiny, tmp_path_factory):
    """The tiny ViT-H tower with all its blocks, in transformers layout, with and without a projection."""
    root = tmp_path_factory.mktemp("full_h")
    with_proj = save_published(tiny.clip_h_full, root / "with_projection")
    bare = hf_text_model(tiny.h_tower, layers=tiny.h_tower.layers, projection=False, seed=2)
    bare.load_state_dict({k.removeprefix("text_model."): v for k, v in tiny.clip_h_full.state_dict().items()
                          if "text_projection" not in k})
    return tiny.clip_h_full, with_proj, save_published(bare, root / "bare")


def test_full_vit_h_tower_reads_penultimate_for_sd2(tiny, full_h):
    # The bug: hf_dropped_layers=1 as a constant read the last block of a full tower.
    model, folder, _ = full_h
    ids = open_clip.tokenize(PROMPTS)  # SD 2.x's tokenizer
    tc = TextConditioner.from_pretrained("sd2", weights=folder)
    c = tc(PROMPTS)
    expected = final_ln(model)(hidden(model, ids)[-2])  # penultimate + final LN, as SD 2.x
    torch.testing.assert_close(c.sequence, expected, **TOL)
    eos = [row.index(49407) for row in ids.tolist()]
    torch.testing.assert_close(c.pooled, expected[torch.arange(len(PROMPTS)), eos], **TOL)
    torch.testing.assert_close(tc.null(1).sequence, TextConditioner.from_pretrained("sd2", weights=tiny.sd2).null(1)
                               .sequence, **TOL)  # diffusers' 23-of-24 copy of the same weights
    projected = TextConditioner.from_pretrained("sd2", weights=folder, pooled="projected")
    with torch.no_grad():
        text_embeds = model(ids).text_embeds  # text_projection(final_ln(last block)[EOS])
    torch.testing.assert_close(projected(PROMPTS).pooled, text_embeds, **TOL)


def test_diffusers_sd2_folder_reads_as_before_and_equals_the_full_tower(tiny, full_h):
    _, folder, _ = full_h
    pipeline = TextConditioner.from_pretrained("sd2", weights=tiny.sd2)
    assert pipeline.spec.towers[0].hf_dropped_layers == 1 and len(pipeline.towers[0].blocks) == 3
    full = TextConditioner.from_pretrained("sd2", weights=folder)
    assert full.spec.towers[0].hf_dropped_layers == 0
    torch.testing.assert_close(full(PROMPTS).sequence, pipeline(PROMPTS).sequence, **TOL)


def test_a_tower_the_weights_cannot_place_is_an_error_naming_the_argument(tiny, full_h):
    model, _, bare = full_h  # 4 blocks, no projection, no pipeline around it, not ViT-H's size
    with pytest.raises(WeightsError, match="cannot tell whether that block was left out. Pass hf_dropped_layers=1"):
        TextConditioner.from_pretrained("sd2", weights=bare)
    ids = open_clip.tokenize(PROMPTS)
    full = TextConditioner.from_pretrained("sd2", weights=bare, hf_dropped_layers=0)(PROMPTS)
    torch.testing.assert_close(full.sequence, final_ln(model)(hidden(model, ids)[-2]), **TOL)
    copy = TextConditioner.from_pretrained("sd2", weights=bare, hf_dropped_layers=1)(PROMPTS)
    torch.testing.assert_close(copy.sequence, final_ln(model)(hidden(model, ids)[-1]), **TOL)
    # At the reference size the block count decides: tiny-sd2's reference tower has 4 blocks.
    assert TextConditioner.from_pretrained("tiny-sd2", weights=bare).spec.towers[0].hf_dropped_layers == 0


# --- full CLIP repos (CLIPModel: both towers in one file) ---------------------------------------------

@pytest.fixture(scope="module")
def clip_model(tiny, tmp_path_factory):
    """A transformers CLIPModel with the tiny CLIP-L text tower, saved whole and sharded."""
    from transformers import CLIPConfig, CLIPModel

    text = tiny.clip_l.config.to_dict()
    # Vision blocks large enough to fill shards of their own at 100 KB, which a text load must not open.
    vision = {"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4,
              "image_size": 32, "patch_size": 8, "hidden_act": "quick_gelu"}
    torch.manual_seed(5)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=24)).eval()
    model.text_model.load_state_dict(tiny.clip_l.text_model.state_dict() if hasattr(tiny.clip_l, "text_model")
                                     else tiny.clip_l.state_dict())
    root = tmp_path_factory.mktemp("clip_model")
    model.save_pretrained(root / "whole")
    model.save_pretrained(root / "sharded", max_shard_size="100KB")
    return model, root / "whole", root / "sharded"


def test_clip_model_folder_equals_its_text_model(tiny, clip_model):
    model, whole, sharded = clip_model
    tok = tiny.tok_l(PROMPTS, padding="max_length", max_length=77, return_tensors="pt").input_ids
    for folder in (whole, sharded):
        c = TextConditioner.from_pretrained("sd15", weights=folder)(PROMPTS)
        with torch.no_grad():
            out = model.text_model(tok)
        torch.testing.assert_close(c.sequence, out.last_hidden_state, **TOL)
        torch.testing.assert_close(c.pooled, out.pooler_output, **TOL)
    projected = TextConditioner.from_pretrained("sd15", weights=whole, pooled="projected")
    assert projected.pooled_dim == 24  # CLIPConfig.projection_dim, not the text_config default
    with torch.no_grad():
        features = model.get_text_features(tok)  # transformers 5: an output whose pooler_output is projected
    features = features if isinstance(features, torch.Tensor) else features.pooler_output
    torch.testing.assert_close(projected(PROMPTS).pooled, features, **TOL)


def test_clip_model_reads_only_text_tensors_and_text_shards(clip_model, monkeypatch):
    _, whole, sharded = clip_model
    index = json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]
    vision_only = {s for s in index.values()} - {s for k, s in index.items() if not k.startswith(("vision", "visual"))}
    assert vision_only, "the fixture should leave some shard with vision tensors only"
    opened, read = [], []
    original_open, original_read = StateReader._open, StateReader.read
    monkeypatch.setattr(StateReader, "_open", lambda self, file, stack: opened.append(file.name)
                        or original_open(self, file, stack))
    monkeypatch.setattr(StateReader, "read", lambda self, key: read.append(key) or original_read(self, key))
    TextConditioner.from_pretrained("sd15", weights=sharded)
    TextConditioner.from_pretrained("sd15", weights=whole)
    assert read and not any(k.startswith(("vision_model.", "visual_projection", "logit_scale")) for k in read)
    assert not set(opened) & vision_only


@pytest.mark.parametrize(("content", "message"), [
    (b"not json", r"JSONDecodeError: Expecting value"),
    (b"{}", r"KeyError: 'weight_map'"),
    (b"[]", r"TypeError: list indices"),
    (b'{"weight_map": "x"}', r"AttributeError: 'str' object has no attribute 'items'"),
    (b"\xe9\xe9", r"UnicodeDecodeError: 'utf-8' codec can't decode byte 0xe9"),
    (b'{"weight_map": {"text_model.x": "../model.safetensors"}}', r"names '../model.safetensors', not a shard file"),
])
def test_a_damaged_shard_index_is_an_error_naming_it(clip_model, tmp_path, capsys, content, message):
    """Bug: a CLIP folder's damaged model.safetensors.index.json failed with a bare "Expecting value: line 1
    column 1", "weight_map" (a KeyError) or a TypeError, naming no file (T5 folders named it: two readers)."""
    import shutil

    folder = tmp_path / "sharded"
    shutil.copytree(clip_model[2], folder)
    index = folder / "model.safetensors.index.json"
    index.write_bytes(content)
    assert main(["encode", "--encoder", "sd15", "--weights", str(folder), "a cat"]) == 2
    err = capsys.readouterr().err
    assert re.search(re.escape(f"{index}: ") + r"(not a sharded checkpoint's index \(" + message + "|its weight_map "
                     + message + ")", err), err


def test_clip_repo_id_from_the_hf_cache(tiny, clip_model, tmp_path):
    # from_pretrained("sd15", weights="openai/clip-vit-large-patch14"), served offline from the cache layout.
    model, whole, _ = clip_model
    commit = "d" * 40
    cache = tmp_path / "hub" / "models--openai--clip-vit-large-patch14"
    (cache / "snapshots" / commit).mkdir(parents=True)
    for file in ("config.json", "model.safetensors"):
        (cache / "snapshots" / commit / file).write_bytes((whole / file).read_bytes())
    (cache / "refs").mkdir()
    (cache / "refs" / "main").write_text(commit)
    out = tmp_path / "out.safetensors"
    code = ("import clipcond; from safetensors.torch import save_file\n"
            "tc = clipcond.TextConditioner.from_pretrained('sd15', weights='openai/clip-vit-large-patch14')\n"
            f"c = tc({PROMPTS!r}); save_file({{'s': c.sequence, 'p': c.pooled}}, {str(out)!r})")
    env = {**os.environ, "HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    with torch.no_grad():
        ref = model.text_model(tiny.tok_l(PROMPTS, padding="max_length", max_length=77, return_tensors="pt").input_ids)
    got = load_file(out)
    torch.testing.assert_close(got["s"], ref.last_hidden_state, **TOL)
    torch.testing.assert_close(got["p"], ref.pooler_output, **TOL)


# --- the CLIP halves of SD3 and Flux ---------------------------------------------------------------

@pytest.fixture(scope="module")
def sd3_folder(tiny, tmp_path_factory):
    """A diffusers SD3 pipeline folder's CLIP parts: two CLIPTextModelWithProjection, tokenizer_2 pads with '!'."""
    spec = get_spec("tiny-sd3-clip")
    root = tmp_path_factory.mktemp("sd3")
    models = [hf_text_model(t, layers=t.layers, projection=True, seed=10 + i) for i, t in enumerate(spec.towers)]
    for model, sub, pad in zip(models, ("text_encoder", "text_encoder_2"), ("<|endoftext|>", "!"), strict=True):
        save_published(model, root / sub)
        hf_tokenizer(root / sub.replace("text_encoder", "tokenizer"), pad)
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    return root, models


def sd3_pipeline(root: Path, models):
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTokenizer

    # A toy transformer: encode_prompt reads joint_attention_dim to pad CLIP to the (absent) T5's width.
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8,
                                        num_attention_heads=1, joint_attention_dim=96, caption_projection_dim=8,
                                        pooled_projection_dim=80, out_channels=4)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=None, vae=None, text_encoder=models[0], text_encoder_2=models[1],
        text_encoder_3=None, tokenizer=CLIPTokenizer.from_pretrained(root / "tokenizer"),
        tokenizer_2=CLIPTokenizer.from_pretrained(root / "tokenizer_2"), tokenizer_3=None)


@pytest.mark.parametrize("clip_skip", [None, 1])
def test_sd3_clip_equals_stable_diffusion_3_encode_prompt(sd3_folder, clip_skip):
    root, models = sd3_folder
    pipe = sd3_pipeline(root, models)
    seq, neg, pooled, neg_pooled = pipe.encode_prompt(PROMPTS, None, None, device="cpu", clip_skip=clip_skip,
                                                      do_classifier_free_guidance=True)
    tc = TextConditioner.from_pretrained("sd3-clip", weights=root, clip_skip=clip_skip)
    c = tc(PROMPTS)
    assert c.sequence.shape == (4, 77, 80) and c.pooled.shape == (4, 32 + 48)
    # The pipeline pads CLIP's 80 features to 96 with zeros and appends T5's 256 rows after the first 77.
    torch.testing.assert_close(c.sequence, seq[:, :77, :80], **TOL)
    torch.testing.assert_close(c.pooled, pooled, **TOL)
    if clip_skip is None:
        torch.testing.assert_close(tc.null(4).sequence, neg[:, :77, :80], **TOL)  # "" encoded, not zeros
        torch.testing.assert_close(tc.null(4).pooled, neg_pooled, **TOL)
    else:
        # diffusers encodes the negative prompt with clip_skip=None whatever clip_skip is; clipcond reads the
        # null at the prompts' layer (README), which is diffusers' own _get_clip_prompt_embeds with clip_skip.
        parts = [pipe._get_clip_prompt_embeds([""] * 4, device="cpu", clip_skip=clip_skip, clip_model_index=i)
                 for i in (0, 1)]
        torch.testing.assert_close(tc.null(4).sequence, torch.cat([p[0] for p in parts], dim=-1), **TOL)
        torch.testing.assert_close(tc.null(4).pooled, torch.cat([p[1] for p in parts], dim=-1), **TOL)
        assert not torch.allclose(tc.null(4).sequence, neg[:, :77, :80])


def test_flux_clip_pooled_equals_flux_pipeline(tiny):
    from diffusers import FluxPipeline

    pipe = FluxPipeline(scheduler=None, vae=None, text_encoder=tiny.clip_l, tokenizer=tiny.tok_l,
                        text_encoder_2=None, tokenizer_2=None, transformer=None)
    pooled = pipe._get_clip_prompt_embeds(PROMPTS, device="cpu")
    tc = TextConditioner.from_pretrained("flux-clip", weights=tiny.sd15)
    c = tc(PROMPTS)
    torch.testing.assert_close(c.pooled, pooled, **TOL)
    with torch.no_grad():
        last = tiny.clip_l(tiny.tok_l(PROMPTS, padding="max_length", max_length=77, return_tensors="pt").input_ids)
    torch.testing.assert_close(c.sequence, last.last_hidden_state, **TOL)


@pytest.mark.parametrize("final_norm", [True, False])
@pytest.mark.parametrize("name", ["tiny-clip-vit-l-14", "tiny-openclip-vit-h-14", "tiny-openclip-vit-bigg-14",
                                  "tiny-sdxl", "tiny-sd3-clip", "tiny-flux-clip", "tiny-openclip-vit-l-14"])
def test_final_norm_override_for_every_spec(tiny, sd3_folder, tmp_path, name, final_norm):
    """Each family's sequence with and without its final LayerNorm, at the spec's layer, on every tower. Catches an
    override that sets the field but is not read (or only for one tower of two), a norm applied twice or at the
    wrong layer. References on the same weights: transformers' hidden_states and final_layer_norm, open_clip's
    resblocks and ln_final."""
    from conftest import openclip_blocks, openclip_model
    from safetensors.torch import save_file

    def hf(model, tok, layer: int) -> torch.Tensor:
        x = hidden(model, tok(PROMPTS, padding="max_length", max_length=77, return_tensors="pt").input_ids)[layer]
        return final_ln(model)(x) if final_norm else x

    def oc(model, blocks: int) -> torch.Tensor:
        with torch.no_grad():
            x = openclip_blocks(model, open_clip.tokenize(PROMPTS), blocks)
            return model.ln_final(x) if final_norm else x

    def openclip_l() -> tuple[Path, list[torch.Tensor]]:  # an open_clip ViT-L-14 (gelu) holding clip_l's weights
        model = openclip_model(tiny.clip_l, get_spec(name).towers[0])
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "openclip_l.safetensors")
        return tmp_path / "openclip_l.safetensors", [oc(model, 4)]

    root, sd3 = sd3_folder
    cases = {  # name -> (weights, each tower's reference sequence); the tiny towers have 4 blocks
        "tiny-clip-vit-l-14": lambda: (tiny.sd15, [hf(tiny.clip_l, tiny.tok_l, -1)]),
        "tiny-flux-clip": lambda: (tiny.sd15, [hf(tiny.clip_l, tiny.tok_l, -1)]),
        "tiny-openclip-vit-h-14": lambda: (tiny.files["openclip_h.safetensors"], [oc(tiny.openclip_h, 3)]),
        "tiny-openclip-vit-bigg-14": lambda: (tiny.files["openclip_g.safetensors"], [oc(tiny.openclip_g, 3)]),
        # SDXL's bigG reads open_clip.tokenize's ids: tok_bang's for these prompts (no "!").
        "tiny-sdxl": lambda: (tiny.sdxl, [hf(tiny.clip_l, tiny.tok_l, -2), hf(tiny.clip_g, tiny.tok_bang, -2)]),
        "tiny-sd3-clip": lambda: (root, [hf(sd3[0], tiny.tok_l, -2), hf(sd3[1], tiny.tok_bang, -2)]),
        "tiny-openclip-vit-l-14": openclip_l,
    }
    weights, expected = cases[name]()
    tc = TextConditioner.from_pretrained(name, weights=weights, final_norm=final_norm)
    assert [t.final_norm for t in tc.spec.towers] == [final_norm] * len(expected)
    torch.testing.assert_close(tc(PROMPTS).sequence, torch.cat(expected, dim=-1), **TOL)


# --- user-defined encoders ---------------------------------------------------------------------------

def test_register_encoder_and_spec_json_round_trip(tmp_path, capsys):
    ours = get_spec("tiny-sd15").replace(name="lab-encoder", clip_skip=1, null="zeros")
    try:
        register_encoder(ours, aliases=("lab",))
        assert get_spec("lab") is ours and "lab-encoder" in clipcond.list_encoders()
        with pytest.raises(SpecError, match=r"encoder name\(s\) \['lab-encoder'\] already registered"):
            register_encoder(ours.replace(null="empty"))
        assert main(["list", "--json", "lab"]) == 0
        path = tmp_path / "lab.json"
        path.write_text(capsys.readouterr().out)
        assert get_spec(str(path)) == ours and get_spec(path) == ours
    finally:
        REGISTRY.pop("lab-encoder", None)
        clipcond.registry.ALIASES.pop("lab", None)
    assert main(["encode", "--encoder", str(path), "a cat"]) == 0
    assert "encoder lab-encoder" in capsys.readouterr().out
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**json.loads(path.read_text()), "null": "random"}))
    with pytest.raises(SpecError, match=r"bad.json: encoder spec 'lab-encoder': null must be one of"):
        get_spec(str(bad))


def test_activation_and_family_are_validated():
    # activation was the one Literal field left unchecked: "relu" built a GELU tower without a word.
    with pytest.raises(SpecError, match=r"tower spec 'clip-vit-l-14': activation must be one of \('quick_gelu', 'gel"):
        get_spec("sd15").towers[0].replace(activation="relu")
    with pytest.raises(SpecError, match="family must be one of"):
        get_spec("sd15").towers[0].replace(family="t5")


def test_precompute_with_a_spec_file_stores_and_reads_it_back(tmp_path, capsys):
    spec_file = tmp_path / "spec.json"
    spec = get_spec("tiny-sd3-clip").replace(name="my-sd3")
    spec_file.write_text(json.dumps(spec.to_dict()))
    captions = tmp_path / "captions.txt"
    captions.write_text("a cat\na dog\na cat\n")
    assert main(["precompute", "--encoder", str(spec_file), "--input", str(captions), "--out",
                 str(tmp_path / "store")]) == 0
    store = EmbeddingStore(tmp_path / "store")
    assert store.spec == spec
    tc = TextConditioner.from_pretrained(spec_file)
    torch.testing.assert_close(store[1]["pooled"], tc(["a dog"]).pooled[0], **TOL)
    assert store[1]["pooled"].shape == (80,)  # both projected vectors, concatenated
