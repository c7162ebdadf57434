"""Any open_clip model whose text tower is a CLIP text transformer, as an ``EncoderSpec``.

The architecture comes from open_clip's own config (``open_clip.get_model_config``: the bundled
JSON files and any added with ``open_clip.add_model_config``), offline. ``pretrained=TAG`` resolves
through open_clip's pretrained table to the hub repo holding ``open_clip_model.safetensors`` (else
``open_clip_pytorch_model.bin``), as ``open_clip.create_model`` downloads it. The default reading is
``CLIP.encode_text``'s: sequence = ``ln_final`` of the last block, pooled = its first-EOS row
through ``text_projection``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from clipcond.errors import WeightsError
from clipcond.registry import OPEN_CLIP_PREFIX
from clipcond.specs import EOS_ID, VOCAB_SIZE, EncoderSpec, SpecError, TowerSpec

# What open_clip's create_model downloads for a tag: safetensors first.
OPEN_CLIP_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
# Beside them in an open_clip hub repo: {"model_cfg": <a model config>, "preprocess_cfg": {...}}.
OPEN_CLIP_CONFIG = "open_clip_config.json"


def text_tower_problems(config: dict[str, Any]) -> list[str]:
    """Why a model config's text tower is not a CLIP text transformer clipcond runs exactly (empty: it is)."""
    from open_clip.model import CLIPTextCfg

    try:
        text = CLIPTextCfg(**config.get("text_cfg", {}))
    except TypeError as err:
        return [f"has a text_cfg open_clip's CLIPTextCfg does not read ({err})"]
    problems = []
    if text.hf_model_name:
        problems.append(f"is the transformers model {text.hf_model_name!r}, not a CLIP text transformer")
    if text.hf_tokenizer_name:
        problems.append(f"tokenizes with {text.hf_tokenizer_name!r}, not the CLIP BPE")
    if text.vocab_size != VOCAB_SIZE:
        problems.append(f"has a vocabulary of {text.vocab_size}, not the CLIP BPE's {VOCAB_SIZE}")
    if text.tokenizer_kwargs or text.tokenizer_mode:
        problems.append(f"cleans text with {text.tokenizer_kwargs or text.tokenizer_mode}, not open_clip.tokenize's "
                        f"default")
    if text.no_causal_mask:
        problems.append("attends without the causal mask")
    if text.pool_type not in ("argmax", "eos") or (text.pool_type == "eos" and text.eos_id != EOS_ID):
        problems.append(f"pools with pool_type={text.pool_type!r} (eos_id {text.eos_id}), not at the EOS token")
    if text.embed_cls or "multimodal_cfg" in config:
        problems.append("appends a CLS embedding (CoCa)")
    if text.ls_init_value is not None:
        problems.append("has layer scale (ls_init_value)")
    if text.act_kwargs or text.norm_kwargs:
        problems.append(f"changes the activation or LayerNorm ({text.act_kwargs or text.norm_kwargs})")
    if text.proj_bias or text.proj_type not in ("linear", "none"):
        problems.append(f"has a {text.proj_type!r} text projection{' with bias' if text.proj_bias else ''}")
    custom = ("qk_norm", "scaled_cosine_attn", "scale_heads", "scale_attn_inner", "scale_attn", "scale_fc")
    if text.block_type not in (None, "default") or any(getattr(text, f) for f in custom):
        problems.append(f"uses custom attention blocks ({[f for f in custom if getattr(text, f)] or text.block_type})")
    return problems


def model_config(model: str) -> dict[str, Any]:
    import open_clip

    config = open_clip.get_model_config(model)
    if config is None:
        known = ", ".join(open_clip.list_models())
        raise KeyError(f"unknown open_clip model {model!r}; open_clip.list_models(): {known} "
                       f"(or add a config with open_clip.add_model_config / --open-clip-config)")
    return config


def open_clip_spec(model: str) -> EncoderSpec:
    """``open_clip:MODEL`` read as ``encode_text``; an error says which part of the tower does not qualify."""
    from open_clip.model import CLIPTextCfg

    config = model_config(model)
    problems = text_tower_problems(config)
    if problems:
        raise SpecError(f"open_clip model {model!r} cannot be a clipcond encoder: its text tower "
                        f"{'; '.join(problems)} (clipcond runs CLIP text transformers with the CLIP BPE; "
                        f"`clipcond list --open-clip` shows the models that qualify)")
    text = CLIPTextCfg(**config["text_cfg"])
    sizes = text_tower_sizes(config)
    tower = TowerSpec(
        name=model, **sizes, family="open_clip", tokenizer="open_clip", pad_id=text.pad_id,
        hidden_layer=-1, final_norm=True, pooled="projected" if sizes["projection_dim"] else "final_eos",
    )
    return EncoderSpec(name=f"{OPEN_CLIP_PREFIX}{model}", towers=(tower,), pooled_towers=(0,), null="empty",
                       max_length=min(77, text.context_length), source=f"open_clip {model}: CLIP.encode_text")


def text_tower_sizes(config: dict[str, Any]) -> dict[str, Any]:
    """The sizes and activation of a model config's text tower, as the ``TowerSpec`` fields of the same names."""
    from open_clip.model import CLIPTextCfg

    text = CLIPTextCfg(**config.get("text_cfg", {}))
    projected = text.proj_type != "none" and bool(config.get("embed_dim"))
    return {"width": text.width, "layers": text.layers, "heads": text.heads,
            "mlp_width": int(text.width * text.mlp_ratio),  # as open_clip's TextTransformer sizes its MLP
            "activation": "quick_gelu" if config.get("quick_gelu") else "gelu",
            "projection_dim": config["embed_dim"] if projected else None,
            "vocab_size": text.vocab_size, "context_length": text.context_length}


def pretrained_source(spec: EncoderSpec, tag: str) -> tuple[str, tuple[str, ...]]:
    """The hub repo and file names that open_clip's pretrained table gives ``tag`` of ``spec``'s model."""
    import open_clip

    if not spec.name.startswith(OPEN_CLIP_PREFIX):
        raise ValueError(f"pretrained={tag!r} is an open_clip tag; encoder {spec.name!r} is not an "
                         f"{OPEN_CLIP_PREFIX}MODEL name (pass weights= instead)")
    model = spec.name[len(OPEN_CLIP_PREFIX):]
    cfg = open_clip.get_pretrained_cfg(model, tag)
    if not cfg:
        raise KeyError(f"open_clip has no pretrained tag {tag!r} for {model!r}; its tags: "
                       f"{open_clip.list_pretrained_tags_by_model(model)}")
    trained_quick = bool(cfg.get("quick_gelu", False))
    if trained_quick != (spec.towers[0].activation == "quick_gelu"):
        # open_clip only warns here and computes with the wrong activation; that is never what a user wants.
        other = f"{model}-quickgelu" if trained_quick else model.removesuffix("-quickgelu")
        raise SpecError(f"{model} {tag!r} was trained with {'QuickGELU' if trained_quick else 'exact GELU'}, "
                        f"but the {model} config uses {spec.towers[0].activation}: use {OPEN_CLIP_PREFIX}{other}")
    hub = cfg.get("hf_hub", "")
    if not hub:
        raise WeightsError(f"{model} {tag!r}: open_clip's table has no hub repo for it (only {cfg.get('url')!r}); "
                           f"download the file and pass weights=PATH")
    # 'org/name/' is a repo with open_clip's default file names; 'org/name/file.bin' names the file.
    org, name, *file = hub.strip("/").split("/")
    return f"{org}/{name}", ("/".join(file),) if file else OPEN_CLIP_FILES


@dataclasses.dataclass(frozen=True, slots=True)
class OpenClipModel:
    """One row of ``clipcond list --open-clip``."""

    name: str
    tags: tuple[str, ...]
    problems: tuple[str, ...]


def list_open_clip() -> list[OpenClipModel]:
    """Every ``open_clip.list_models()`` name, its pretrained tags and why it does not qualify (if not)."""
    import open_clip

    return [OpenClipModel(m, tuple(open_clip.list_pretrained_tags_by_model(m)),
                          tuple(text_tower_problems(open_clip.get_model_config(m))))
            for m in open_clip.list_models()]
