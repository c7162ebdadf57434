"""The registry holds DESIGN.md's table; variants come from overrides; bad ones name the field."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from clipcond import SpecError, get_spec, list_encoders
from clipcond.registry import REGISTRY

# DESIGN.md: name -> (per tower: hidden_layer, final LN, pad id), D, P, null
TABLE = {
    "clip-vit-l-14": ([(-1, True, 49407)], 768, 768, "empty"),
    "openclip-vit-h-14": ([(-2, True, 0)], 1024, 1024, "empty"),
    "openclip-vit-bigg-14": ([(-2, False, 0)], 1280, 1280, "empty"),
    "sdxl": ([(-2, False, 49407), (-2, False, 0)], 2048, 1280, "zeros"),
}
ALIASES = {"sd15": "clip-vit-l-14", "sd1": "clip-vit-l-14", "sd2": "openclip-vit-h-14", "sd21": "openclip-vit-h-14",
           "sdxl-refiner": "openclip-vit-bigg-14", "SDXL": "sdxl"}
SIZE_FIELDS = {"name", "width", "layers", "heads", "mlp_width", "projection_dim"}


@pytest.mark.parametrize("name", sorted(TABLE))
def test_registry_matches_design_table(name):
    spec = get_spec(name)
    towers, d, p, null = TABLE[name]
    assert [(t.hidden_layer, t.final_norm, t.pad_id) for t in spec.towers] == towers
    assert (spec.sequence_dim, spec.pooled_dim, spec.null, spec.max_length) == (d, p, null, 77)
    assert all(t.vocab_size == 49408 and t.context_length == 77 for t in spec.towers)


@pytest.mark.parametrize(("alias", "name"), sorted(ALIASES.items()))
def test_aliases(alias, name):
    assert get_spec(alias) is REGISTRY[name]
    assert alias in list_encoders() or alias != alias.lower()


@pytest.mark.parametrize("name", sorted(TABLE))
def test_tiny_specs_keep_the_semantics(name):
    real, tiny = get_spec(name), get_spec(f"tiny-{name}")
    assert (real.null, real.pooled_towers, real.max_length) == (tiny.null, tiny.pooled_towers, tiny.max_length)
    for r, t in zip(real.towers, tiny.towers, strict=True):
        differ = {f.name for f in dataclasses.fields(r) if getattr(r, f.name) != getattr(t, f.name)}
        assert differ <= SIZE_FIELDS, differ
        assert t.width < 64 and t.layers == 4


def test_pooled_sources_and_blocks_needed():
    sd15, sd2, bigg, sdxl = (get_spec(n) for n in ("sd15", "sd2", "sdxl-refiner", "sdxl"))
    assert sd15.towers[0].pooled == "final_eos" and sd15.towers[0].blocks_needed == 12
    assert sd2.towers[0].pooled == "sequence_eos" and sd2.towers[0].blocks_needed == 23  # never the 24th
    assert bigg.towers[0].pooled == "projected" and bigg.towers[0].blocks_needed == 32
    assert sdxl.towers[0].pooled is None and sdxl.towers[0].blocks_needed == 11  # penultimate, no pooled
    assert sdxl.pooled_towers == (1,) and sdxl.towers[1] == bigg.towers[0]


def test_overrides_derive_variants_without_touching_the_registry():
    sdxl = get_spec("sdxl")
    skip = sdxl.replace(clip_skip=1)
    assert [t.hidden_layer for t in skip.towers] == [-3, -3]  # diffusers: hidden_states[-(clip_skip + 2)]
    assert [t.hidden_layer for t in sdxl.towers] == [-2, -2]
    assert get_spec("sd15").replace(clip_skip=1).towers[0].hidden_layer == -2  # A1111 "clip skip 2"
    assert get_spec("sd15").replace(hidden_layer=-3).towers[0].hidden_layer == -3
    assert get_spec("sd2").replace(pooled="projected").pooled_dim == 1024
    assert sdxl.replace(null="empty").null == "empty"
    assert get_spec("sd15").replace(pad_id=0).towers[0].pad_id == 0
    assert get_spec("sd15").replace(max_length=32).max_length == 32
    assert sdxl.replace(long_prompts="chunk").long_prompts == "chunk"
    with pytest.raises(dataclasses.FrozenInstanceError):
        sdxl.null = "empty"


@pytest.mark.parametrize(("overrides", "message"), [
    ({"clip_skip": 12}, r"tower spec 'clip-vit-l-14': hidden_layer must be in \[-12, -1\] .*got -13"),
    ({"clip_skip": -1}, r"encoder spec 'clip-vit-l-14': clip_skip must be >= 0, got -1"),
    ({"clip_skip": 1, "hidden_layer": -2}, "give clip_skip or hidden_layer, not both"),
    ({"pooled": "mean"}, r"pooled must be one of \('final_eos', 'sequence_eos', 'projected', None\), got 'mean'"),
    ({"null": "random"}, r"null must be one of \('empty', 'zeros'\), got 'random'"),
    ({"max_length": 100}, r"max_length must be in \[2, 77\]"),
    ({"pad_id": 50000}, r"pad_id must be a token id in \[0, 49408\), got 50000"),
    ({"long_prompts": "wrap"}, r"long_prompts must be one of \('truncate', 'chunk'\)"),
    ({"layer": -2}, r"unknown override\(s\) \['layer'\]; known: \[.*'clip_skip'.*'hidden_layer'.*\]"),
])
def test_bad_overrides_name_spec_and_field(overrides, message):
    with pytest.raises(SpecError, match=message):
        get_spec("sd15").replace(**overrides)


def test_unknown_name_lists_registered():
    with pytest.raises(KeyError, match=r"unknown encoder 'sd9'; registered: auraflow, chroma, clip-vit-l-14, "
                                      r".*sdxl-refiner"):
        get_spec("sd9")
    with pytest.raises(TypeError, match="encoder name must be str or EncoderSpec, got int"):
        get_spec(15)


def test_specs_and_list_import_no_torch():
    code = "import sys, clipcond; clipcond.list_encoders(); clipcond.get_spec('sdxl'); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr
