"""Tiny random CLIP text towers, built from the ``tiny-*`` specs and saved in real published layouts.

Every folder/file here is written the way the real checkpoints are on the hub: diffusers
pipeline folders whose ``text_encoder*/model.safetensors`` carry ``text_model.*`` keys (as
SD 1.5 / SD 2.1 / SDXL publish them, not as transformers 5 saves them), a truncated 23-of-24
style SD2 encoder, tokenizer folders with the pad tokens of the real repos (``!`` for
SD2 and SDXL's second tokenizer), open_clip ``state_dict()`` checkpoints and SD single files.
"""

from __future__ import annotations

import contextlib
import functools
import json
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import clipcond

BASE_PROMPTS = [
    "a photo of a cat",
    "a running dog",
    "",
    "An astronaut riding a horse on Mars, highly detailed, 8k",
    "  Multiple   spaces\tand\nnewlines  ",
    "CamelCase and UPPER case words, it's what we're told",
    "numbers 1234567890 and 3.14159, 1/2",
    "emoji 🐱🐶 and accents: café naïve Zürich",
    "日本語のプロンプト 和 中文 한국어",
    "(masterpiece:1.2), [blurry], {braces} <angle> | pipes",
    "a very long prompt " + "with many repeated words " * 30,
]


def hf_tokenizer(folder: Path, pad_token: str):
    """transformers' CLIPTokenizer over a folder written as the SD repos publish it.

    The files come from open_clip's own BPE tables, not clipcond's writer, so that the reference
    cannot share a bug with the code it checks.
    """
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizer

    oc = SimpleTokenizer()
    names = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}  # the HF spelling
    vocab = {names.get(token, token): i for token, i in oc.encoder.items()}
    assert (vocab["<|startoftext|>"], vocab["<|endoftext|>"], len(vocab)) == (49406, 49407, 49408)
    merges = [" ".join(pair) for pair, _ in sorted(oc.bpe_ranks.items(), key=lambda item: item[1])]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("\n".join(["#version: 0.2", *merges]) + "\n", encoding="utf-8")
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True,
              "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
              "pad_token": pad_token}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return CLIPTokenizer.from_pretrained(folder)


def hf_text_model(tower: clipcond.TowerSpec, *, layers: int, projection: bool, seed: int):
    """A random transformers CLIP text model with the tower's sizes, LayerNorms randomised too."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=tower.vocab_size, hidden_size=tower.width, intermediate_size=tower.mlp_width,
        num_hidden_layers=layers, num_attention_heads=tower.heads, max_position_embeddings=tower.context_length,
        hidden_act=tower.activation, projection_dim=tower.projection_dim or tower.width,
        # The published SD configs carry the pre-#24773 ids (eos 2: pooled by argmax of ids).
        bos_token_id=0, eos_token_id=2, pad_token_id=1,
    )
    torch.manual_seed(seed)
    model = (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:  # non-identity LayerNorms, so that a skipped or extra norm shows
                param.add_(torch.randn_like(param) * 0.1)
    return model


def save_published(model, folder: Path, *, extra: dict[str, torch.Tensor] | None = None) -> Path:
    """save_pretrained, then rewrite the keys the way the real SD repos publish them (text_model.*)."""
    model.save_pretrained(folder)
    file = folder / "model.safetensors"
    state = load_file(file)
    state = {k if k.startswith(("text_model.", "text_projection")) else f"text_model.{k}": v for k, v in state.items()}
    state.update(extra or {})
    save_file(state, file, metadata={"format": "pt"})
    return folder


def openclip_state(hf_model, tower: clipcond.TowerSpec) -> dict[str, torch.Tensor]:
    """The same weights in open_clip's CLIP.state_dict() layout (in_proj fused, projection [W, P])."""
    sd = {k.removeprefix("text_model."): v for k, v in hf_model.state_dict().items()}
    out = {"token_embedding.weight": sd["embeddings.token_embedding.weight"],
           "positional_embedding": sd["embeddings.position_embedding.weight"],
           "ln_final.weight": sd["final_layer_norm.weight"], "ln_final.bias": sd["final_layer_norm.bias"],
           "logit_scale": torch.tensor(4.6052)}
    for i in range(hf_model.config.num_hidden_layers):
        src, dst = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for p in ("weight", "bias"):
            out[dst + f"attn.in_proj_{p}"] = torch.cat([sd[src + f"self_attn.{n}_proj.{p}"] for n in "qkv"])
            for a, b in [("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
                         ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")]:
                out[dst + f"{b}.{p}"] = sd[src + f"{a}.{p}"]
    if "text_projection.weight" in sd:
        out["text_projection"] = sd["text_projection.weight"].T.contiguous()
    else:
        out["text_projection"] = torch.randn(tower.width, tower.projection_dim or tower.width)
    return {k: v.contiguous() for k, v in out.items()}


def openclip_model(hf_model, tower: clipcond.TowerSpec):
    """An open_clip ``CLIP`` (tiny image tower) holding ``hf_model``'s text weights."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    model = CLIP(embed_dim=tower.projection_dim,
                 vision_cfg=CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=8, image_size=16),
                 text_cfg=CLIPTextCfg(width=tower.width, heads=tower.heads, layers=tower.layers,
                                      mlp_ratio=tower.mlp_width / tower.width),
                 quick_gelu=tower.activation == "quick_gelu")
    state = model.state_dict()
    text = openclip_state(hf_model, tower)
    assert set(text) <= set(state), set(text) - set(state)
    model.load_state_dict(state | text, strict=True)
    return model.eval()


def openclip_blocks(model, ids: torch.Tensor, blocks: int) -> torch.Tensor:
    """ldm/sgm FrozenOpenCLIPEmbedder's text_transformer_forward: the first ``blocks`` resblocks."""
    x = model.token_embedding(ids) + model.positional_embedding
    for block in model.transformer.resblocks[:blocks]:
        x = block(x, attn_mask=model.attn_mask)
    return x


class TinyModels:
    """Reference models (transformers) and the folders/files they were saved to."""

    def __init__(self, root: Path) -> None:
        spec = clipcond.get_spec
        self.root = root
        self.l_tower = spec("tiny-sd15").towers[0]
        self.h_tower = spec("tiny-sd2").towers[0]
        self.g_tower = spec("tiny-sdxl-refiner").towers[0]
        self.clip_l = hf_text_model(self.l_tower, layers=self.l_tower.layers, projection=False, seed=1)
        # The full 4-block H tower (open_clip checkpoint) and diffusers' truncated 3-block copy.
        self.clip_h_full = hf_text_model(self.h_tower, layers=self.h_tower.layers, projection=True, seed=2)
        self.clip_h = hf_text_model(self.h_tower, layers=self.h_tower.layers - 1, projection=False, seed=2)
        self.clip_h.load_state_dict(
            {k.removeprefix("text_model."): v for k, v in self.clip_h_full.state_dict().items()
             if "text_projection" not in k and f"layers.{self.h_tower.layers - 1}." not in k})
        self.clip_g = hf_text_model(self.g_tower, layers=self.g_tower.layers, projection=True, seed=3)
        self.tok_l = hf_tokenizer(root / "tokenizer_l", "<|endoftext|>")
        self.tok_bang = hf_tokenizer(root / "tokenizer_bang", "!")  # SD2 and SDXL tokenizer_2 pad with "!"
        self.sd15 = self._pipeline("sd15", [("text_encoder", self.clip_l, self.tok_l)])
        self.sd2 = self._pipeline("sd2", [("text_encoder", self.clip_h, self.tok_bang)])
        self.sdxl = self._pipeline("sdxl", [("text_encoder", self.clip_l, self.tok_l),
                                            ("text_encoder_2", self.clip_g, self.tok_bang)])

    def _pipeline(self, name: str, parts: list) -> Path:
        folder = self.root / name
        classes = {"sd15": "StableDiffusionPipeline", "sd2": "StableDiffusionPipeline",
                   "sdxl": "StableDiffusionXLPipeline"}
        index = {"_class_name": classes[name], "_diffusers_version": "0.42.1"}
        for sub, model, tok in parts:
            position_ids = {"text_model.embeddings.position_ids": torch.arange(77)[None]} if name == "sd15" else None
            save_published(model, folder / sub, extra=position_ids)
            hf_tokenizer(folder / sub.replace("text_encoder", "tokenizer"), tok.pad_token)
            index[sub] = ["transformers", type(model).__name__]
            index[sub.replace("text_encoder", "tokenizer")] = ["transformers", "CLIPTokenizer"]
        (folder / "model_index.json").write_text(json.dumps(index, indent=2))
        return folder

    @functools.cached_property
    def openclip_h(self):
        return openclip_model(self.clip_h_full, self.h_tower)

    @functools.cached_property
    def openclip_g(self):
        return openclip_model(self.clip_g, self.g_tower)

    @functools.cached_property
    def files(self) -> dict[str, Path]:
        """open_clip checkpoints and SD single files, written from the same weights as the folders."""
        root = self.root / "files"
        root.mkdir()
        h = {k: v for k, v in self.openclip_h.state_dict().items() if not k.startswith("visual.")}
        g = {k: v for k, v in self.openclip_g.state_dict().items() if not k.startswith("visual.")}
        l_hf = load_file(self.sd15 / "text_encoder" / "model.safetensors")  # published text_model.* keys
        # Stand-ins for what a single file holds besides the text encoders (never read).
        unet_vae = {"model.diffusion_model.input_blocks.0.0.weight": torch.randn(8, 4, 3, 3),
                    "first_stage_model.decoder.conv_in.weight": torch.randn(8, 4, 3, 3)}
        states = {
            "openclip_h.safetensors": self.openclip_h.state_dict(),
            "openclip_g.safetensors": self.openclip_g.state_dict(),
            "sd15.safetensors": {**unet_vae, **{f"cond_stage_model.transformer.{k}": v for k, v in l_hf.items()}},
            "sd2.safetensors": {**unet_vae, **{f"cond_stage_model.model.{k}": v for k, v in h.items()}},
            "sdxl.safetensors": {**unet_vae,
                                 **{f"conditioner.embedders.0.transformer.{k}": v for k, v in l_hf.items()},
                                 **{f"conditioner.embedders.1.model.{k}": v for k, v in g.items()}},
        }
        out = {}
        for name, state in states.items():
            save_file({k: v.contiguous() for k, v in state.items()}, root / name)
            out[name] = root / name
        torch.save(self.openclip_h.state_dict(), root / "open_clip_pytorch_model.bin")  # as laion publishes it
        torch.save({"state_dict": states["sd15.safetensors"]}, root / "sd15.ckpt")  # ldm's pickled layout
        out["open_clip_pytorch_model.bin"] = root / "open_clip_pytorch_model.bin"
        out["sd15.ckpt"] = root / "sd15.ckpt"
        return out

    def pipeline(self, name: str):
        """The diffusers pipeline over the saved folder's text parts (no UNet/VAE needed to encode)."""
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        folder = getattr(self, name)
        load = {"text_encoder": CLIPTextModel, "text_encoder_2": CLIPTextModelWithProjection}
        parts = {}
        for sub, cls in load.items():
            if (folder / sub).is_dir():
                parts[sub] = cls.from_pretrained(folder / sub).eval()
                tok = sub.replace("text_encoder", "tokenizer")
                parts[tok] = CLIPTokenizer.from_pretrained(folder / tok)
        if name == "sdxl":
            return StableDiffusionXLPipeline(vae=None, unet=None, scheduler=None, **parts)
        return StableDiffusionPipeline(vae=None, unet=None, scheduler=None, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False, **parts)



@contextlib.contextmanager
def time_limit(seconds: int, what: str) -> Iterator[None]:
    """TimeoutError if the block runs over ``seconds`` (SIGALRM): a fuzzed file must never make a reader hang."""
    def hang(*_: object) -> None:
        raise TimeoutError(f"{what} took over {seconds} s")

    previous = signal.signal(signal.SIGALRM, hang)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)

@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyModels:
    return TinyModels(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def prompts() -> list[str]:
    return list(BASE_PROMPTS)


@pytest.fixture(scope="module")
def sd15() -> clipcond.TextConditioner:
    """The tiny SD 1.5 conditioner (random weights, the real tokenizer), loaded once per test module."""
    return clipcond.TextConditioner.from_pretrained("tiny-sd15")


@pytest.fixture(scope="module")
def sdxl() -> clipcond.TextConditioner:
    """The tiny SDXL conditioner, loaded once per test module."""
    return clipcond.TextConditioner.from_pretrained("tiny-sdxl")


# --- T5 recipes (tests/t5_fixtures.py) ---------------------------------------------------------------------

@pytest.fixture(scope="session")
def t5_vocab() -> dict[str, Path]:
    """The real SD3 / Flux T5 tokenizer folders, from PyPI's diffsynth wheel (downloaded once, never imported)."""
    from t5_fixtures import t5_vocabulary

    return t5_vocabulary()


@pytest.fixture(scope="session")
def t5_pipes(tiny, t5_vocab, tmp_path_factory: pytest.TempPathFactory):
    """Tiny Flux, SD3 and PixArt pipeline folders in the real diffusers layouts."""
    from t5_fixtures import T5Pipelines

    return T5Pipelines(tmp_path_factory.mktemp("t5"), tiny, t5_vocab)
