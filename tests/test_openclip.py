"""``open_clip:MODEL``: any open_clip text tower, against open_clip's own forward and ``encode_text``.

Small configs of each family are registered with ``open_clip.add_model_config`` (as a user adds
their own), built by ``open_clip.create_model`` with random weights, saved as open_clip saves them
(``.safetensors`` and a pickled ``.bin``) and compared on the same prompts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import torch
from conftest import openclip_blocks
from safetensors.torch import save_file

from clipcond import SpecError, TextConditioner, WeightsError, get_spec
from clipcond.cli import main
from clipcond.encoders.openclip import list_open_clip

TOL = {"atol": 1e-5, "rtol": 1e-5}
PROMPTS = ["a photo of a cat", "an astronaut riding a horse on mars, highly detailed", "", "a running dog"]
VISION = {"image_size": 16, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8}
# name -> (text_cfg, top-level config): the families of the models the issue names, at toy size.
FAMILIES = {
    "tiny-oc-gelu": ({"width": 48, "heads": 4, "layers": 4}, {}),  # ViT-H-14 / ViT-bigG-14 / DataComp
    "tiny-oc-quickgelu": ({"width": 32, "heads": 4, "layers": 3}, {"quick_gelu": True}),  # OpenAI, MetaCLIP, DFN
    "tiny-oc-ratio": ({"width": 40, "heads": 4, "layers": 3, "mlp_ratio": 3.7362}, {}),  # a non-4 MLP ratio
    "tiny-oc-custom": ({"width": 32, "heads": 4, "layers": 3}, {"custom_text": True}),  # CustomTextCLIP: text.*
}


@pytest.fixture(scope="module")
def registered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[object, dict[str, Path]]]:
    """Each family registered in open_clip, a random model, and its checkpoint in both file formats."""
    root = tmp_path_factory.mktemp("open_clip")
    out = {}
    for seed, (name, (text_cfg, top)) in enumerate(FAMILIES.items()):
        config = {"embed_dim": 24, "vision_cfg": VISION, "text_cfg": text_cfg, **top}
        (root / f"{name}.json").write_text(json.dumps(config))
        open_clip.add_model_config(root / f"{name}.json")
        torch.manual_seed(seed)
        model = open_clip.create_model(name).eval()
        with torch.no_grad():  # non-identity LayerNorms, so that a skipped or extra norm shows
            for key, param in model.named_parameters():
                if "ln_" in key:
                    param.add_(torch.randn_like(param) * 0.1)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        files = {"safetensors": root / f"{name}.safetensors", "bin": root / f"{name}.bin"}
        save_file(state, files["safetensors"])
        torch.save(state, files["bin"])
        out[name] = (model, files)
    return out


def reference_sequence(model, ids: torch.Tensor, blocks: int, *, final_norm: bool = True) -> torch.Tensor:
    """open_clip's text transformer run for ``blocks`` blocks (CustomTextCLIP keeps it under .text)."""
    tower = getattr(model, "text", model)
    x = openclip_blocks(tower, ids, blocks)
    return tower.ln_final(x) if final_norm else x


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_default_reading_is_encode_text(registered, name, fmt):
    model, files = registered[name]
    tc = TextConditioner.from_pretrained(f"open_clip:{name}", weights=files[fmt])
    ids = open_clip.tokenize(PROMPTS)
    c = tc(PROMPTS)
    torch.testing.assert_close(c.pooled, model.encode_text(ids), **TOL)
    torch.testing.assert_close(c.sequence, reference_sequence(model, ids, tc.spec.towers[0].layers), **TOL)
    torch.testing.assert_close(tc.null(1).sequence, reference_sequence(model, open_clip.tokenize([""]),
                                                                       tc.spec.towers[0].layers), **TOL)
    assert tc.tokenize(PROMPTS)[0].ids.tolist() == ids.tolist()  # open_clip.tokenize: pad 0


def test_custom_text_tokens_equal_open_clip_output_tokens(registered):
    # CustomTextCLIP's own tower returns its token sequence: the reference without our block helper.
    model, files = registered["tiny-oc-custom"]
    ids = open_clip.tokenize(PROMPTS)
    model.text.output_tokens = True
    try:
        pooled, tokens = model.text(ids)
    finally:
        model.text.output_tokens = False
    c = TextConditioner.from_pretrained("open_clip:tiny-oc-custom", weights=files["safetensors"])(PROMPTS)
    torch.testing.assert_close(c.sequence, tokens, **TOL)
    torch.testing.assert_close(c.pooled, pooled, **TOL)


def test_overrides_move_the_sequence_not_the_pooled_vector(registered):
    model, files = registered["tiny-oc-gelu"]
    ids = open_clip.tokenize(PROMPTS)
    skip = TextConditioner.from_pretrained("open_clip:tiny-oc-gelu", weights=files["safetensors"], clip_skip=1)
    raw = TextConditioner.from_pretrained("open_clip:tiny-oc-gelu", weights=files["safetensors"], hidden_layer=-2,
                                          final_norm=False)
    unprojected = TextConditioner.from_pretrained("open_clip:tiny-oc-gelu", weights=files["safetensors"],
                                                  pooled="final_eos")
    torch.testing.assert_close(skip(PROMPTS).sequence, reference_sequence(model, ids, 3), **TOL)
    torch.testing.assert_close(raw(PROMPTS).sequence, reference_sequence(model, ids, 3, final_norm=False), **TOL)
    # encode_text's projected EOS vector whatever layer the sequence is read at.
    torch.testing.assert_close(skip(PROMPTS).pooled, model.encode_text(ids), **TOL)
    eos = [row.index(49407) for row in ids.tolist()]
    full = reference_sequence(model, ids, 4)
    torch.testing.assert_close(unprojected(PROMPTS).pooled, full[torch.arange(len(PROMPTS)), eos], **TOL)


def test_spec_comes_from_open_clips_own_config():
    # The bundled configs, offline: ViT-L-14's text tower, and the -quickgelu variant's activation.
    tower = get_spec("open_clip:ViT-L-14").towers[0]
    assert (tower.width, tower.layers, tower.heads, tower.mlp_width, tower.projection_dim) == (768, 12, 12, 3072, 768)
    assert tower.activation == "gelu" and get_spec("open_clip:ViT-L-14-quickgelu").towers[0].activation == "quick_gelu"
    big = get_spec("open_clip:ViT-bigG-14").towers[0]
    assert (big.width, big.layers, big.heads, big.mlp_width, big.projection_dim) == (1280, 32, 20, 5120, 1280)
    # The preset is ViT-L-14 laion2b_s32b_b82k with encode_text's reading.
    preset = get_spec("openclip-vit-l-14")
    assert preset.towers[0].replace(name="ViT-L-14") == tower
    assert preset.hub_repo == "laion/CLIP-ViT-L-14-laion2B-s32B-b82K"
    assert open_clip.get_pretrained_cfg("ViT-L-14", "laion2b_s32b_b82k")["hf_hub"].rstrip("/") == preset.hub_repo


@pytest.mark.parametrize(("model", "why"), [
    ("ViT-B-16-SigLIP", "tokenizes with 'timm/ViT-B-16-SigLIP', not the CLIP BPE"),
    ("xlm-roberta-base-ViT-B-32", "is the transformers model 'xlm-roberta-base', not a CLIP text transformer"),
    ("coca_ViT-B-32", "appends a CLS embedding"),
    ("ViT-B-16-SigLIP", "attends without the causal mask"),
])
def test_models_that_do_not_qualify_say_which_part(model, why):
    with pytest.raises(SpecError, match=f"open_clip model '{model}' cannot be a clipcond encoder: its text tower .*"
                                        f"{why.replace('(', r'[(]').replace(')', r'[)]')}"):
        get_spec(f"open_clip:{model}")


def test_unknown_model_and_tag_errors_list_what_exists():
    with pytest.raises(KeyError, match="unknown open_clip model 'ViT-Q-99'; open_clip.list_models\\(\\): .*ViT-L-14"):
        get_spec("open_clip:ViT-Q-99")
    with pytest.raises(KeyError, match="no pretrained tag 'nope' for 'ViT-L-14'; its tags: .*laion2b_s32b_b82k"):
        TextConditioner.from_pretrained("open_clip:ViT-L-14", pretrained="nope")
    # open_clip itself only warns and runs exact GELU on QuickGELU-trained weights.
    with pytest.raises(SpecError, match="ViT-L-14 'openai' was trained with QuickGELU.*open_clip:ViT-L-14-quickgelu"):
        TextConditioner.from_pretrained("open_clip:ViT-L-14", pretrained="openai")
    with pytest.raises(ValueError, match="pretrained='openai' is an open_clip tag; encoder 'clip-vit-l-14' is not"):
        TextConditioner.from_pretrained("sd15", pretrained="openai")


def test_list_open_clip_marks_the_named_models_as_qualifying(capsys):
    rows = {m.name: m for m in list_open_clip()}
    for name in ("ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-L-14-quickgelu", "ViT-H-14", "ViT-g-14", "ViT-bigG-14"):
        assert rows[name].problems == (), (name, rows[name].problems)
    assert rows["ViT-B-16-SigLIP"].problems and "laion2b_s32b_b82k" in rows["ViT-L-14"].tags
    assert main(["list", "--open-clip"]) == 0
    out = capsys.readouterr().out
    assert any(line.split()[:2] == ["ViT-L-14", "yes"] for line in out.splitlines())
    assert any(line.startswith("ViT-B-16-SigLIP ") and " no " in line for line in out.splitlines())


def test_pretrained_tag_resolves_through_the_table_and_the_hf_cache(registered, tmp_path):
    # A tag of the user's model, in open_clip's table, served offline from a fake HF cache: the real path.
    _, files = registered["tiny-oc-gelu"]
    commit = "c" * 40
    snapshot = tmp_path / "hub" / "models--test-org--tiny-oc" / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "open_clip_model.safetensors").write_bytes(files["safetensors"].read_bytes())
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text(commit)
    out = tmp_path / "out.pt"
    code = (
        "import open_clip, torch\nfrom open_clip import pretrained\n"
        f"open_clip.add_model_config({str(files['safetensors'].with_suffix('.json'))!r})\n"
        "pretrained._PRETRAINED['tiny-oc-gelu'] = {'test_tag': pretrained._pcfg(hf_hub='test-org/tiny-oc/')}\n"
        "from clipcond import TextConditioner\n"
        "tc = TextConditioner.from_pretrained('open_clip:tiny-oc-gelu', pretrained='test_tag')\n"
        f"c = tc({PROMPTS!r}); torch.save({{'s': c.sequence, 'p': c.pooled}}, {str(out)!r})\n"
    )
    env = {**os.environ, "HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    got = torch.load(out, weights_only=True)
    ref = TextConditioner.from_pretrained("open_clip:tiny-oc-gelu", weights=files["safetensors"])(PROMPTS)
    assert torch.equal(got["s"], ref.sequence) and torch.equal(got["p"], ref.pooled)


def test_open_clip_repo_folder_prefers_the_open_clip_file(registered, tmp_path):
    # laion's repos hold an open_clip file beside a transformers copy; an open_clip tower reads its own file.
    model, files = registered["tiny-oc-gelu"]
    (tmp_path / "open_clip_model.safetensors").write_bytes(files["safetensors"].read_bytes())
    (tmp_path / "config.json").write_text("{}")  # a transformers config that would not even load
    c = TextConditioner.from_pretrained("open_clip:tiny-oc-gelu", weights=tmp_path)(PROMPTS)
    torch.testing.assert_close(c.pooled, model.encode_text(open_clip.tokenize(PROMPTS)), **TOL)


def test_wrong_size_checkpoint_names_the_tensors(registered):
    _, files = registered["tiny-oc-quickgelu"]
    with pytest.raises(WeightsError, match="holds 3 transformer blocks, tower 'tiny-oc-gelu' expects 4"):
        TextConditioner.from_pretrained("open_clip:tiny-oc-gelu", weights=files["safetensors"])


def test_cli_reads_a_users_open_clip_config(tmp_path, capsys):
    # --open-clip-config registers a config open_clip has never seen, then open_clip:NAME resolves it.
    config = {"embed_dim": 16, "vision_cfg": VISION, "text_cfg": {"width": 32, "heads": 4, "layers": 2}}
    (tmp_path / "lab-clip-v3.json").write_text(json.dumps(config))
    torch.manual_seed(0)
    open_clip.add_model_config(tmp_path / "lab-clip-v3.json")
    model = open_clip.create_model("lab-clip-v3").eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "lab.safetensors")
    open_clip.factory._MODEL_CONFIGS.pop("lab-clip-v3")  # as in a fresh process: only the flag registers it
    with pytest.raises(KeyError, match="unknown open_clip model 'lab-clip-v3'"):
        get_spec("open_clip:lab-clip-v3")
    assert main(["encode", "--encoder", "open_clip:lab-clip-v3", "--open-clip-config",
                 str(tmp_path / "lab-clip-v3.json"), "--weights", str(tmp_path / "lab.safetensors"), "a cat"]) == 0
    out = capsys.readouterr().out
    assert "encoder open_clip:lab-clip-v3" in out and "pooled (1, 16)" in out
    expected = model.encode_text(open_clip.tokenize(["a cat"]))[0].norm()
    assert f"|pooled| {expected:.4f}" in out
