"""Tiny random T5 recipes saved in the real diffusers pipeline layouts, and the real T5 vocabulary.

AuraFlow's tokenizer (pile-T5's Llama-style SentencePiece, fal/AuraFlow's tokenizer/) is not available offline:
``aura_tokenizer`` trains a small BPE in the same format (tokenizers' tokenizer.json with a Metaspace
pre-tokenizer, loaded by transformers' LlamaTokenizer) with AuraFlow's special ids: <unk> 0, <s> 1, </s> 2, no BOS,
EOS appended, padding with id 1 (ComfyUI's pile-T5 facts). Only ids and the EOS rule matter to the recipe.

The SD3 / Flux T5 tokenizer (``T5TokenizerFast``: tokenizer.json, spiece.model, configs) ships in the PyPI
wheel ``diffsynth==1.1.9`` (Apache-2.0). It is fetched once with ``pip download --no-deps`` into
``~/.cache/clipcond-test`` (``CLIPCOND_TEST_CACHE`` overrides) and read with zipfile: diffsynth is never
imported or installed, and the vocabulary is never committed here.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from conftest import hf_text_model, hf_tokenizer, save_published

import clipcond

FINAL_NORM_GAIN = 0.2  # keeps outputs ~0.2-1: SDPA and eager attention already differ by ~1e-5 at output scale 5


def t5_vocabulary() -> dict[str, Path]:
    """{"sd3": tokenizer_3 folder, "flux": tokenizer_2 folder} of the real pipelines' T5 tokenizer
    (examples/_tiny.py fetches it once for the tests, benches and examples); skips when pip cannot get it."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    from _tiny import t5_tokenizers

    try:
        return t5_tokenizers()
    except SystemExit as err:
        pytest.skip(str(err))


def t5_model(tower: clipcond.specs.T5TowerSpec, *, seed: int):
    """A random transformers T5EncoderModel (UMT5EncoderModel for a "umt5" tower) of the tower's sizes,
    transformers' own init, final gain ~0.2."""
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    classes = {"t5": (T5Config, T5EncoderModel), "umt5": (UMT5Config, UMT5EncoderModel)}
    config_cls, model_cls = classes[tower.architecture]
    config = config_cls(vocab_size=tower.vocab_size, d_model=tower.d_model, d_kv=tower.d_kv, d_ff=tower.d_ff,
                      num_layers=tower.layers, num_heads=tower.heads, feed_forward_proj=tower.feed_forward,
                      relative_attention_num_buckets=tower.relative_attention_num_buckets,
                      relative_attention_max_distance=tower.relative_attention_max_distance,
                      layer_norm_epsilon=tower.layer_norm_eps, dropout_rate=0.1, is_encoder_decoder=False,
                      pad_token_id=tower.pad_id, eos_token_id=tower.eos_id)
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("layer_norm.weight"):  # non-identity norms, so that a skipped or extra norm shows
                gain = FINAL_NORM_GAIN if "final" in name else 1.0
                param.copy_(gain * (1 + 0.1 * torch.randn_like(param)))
    return model


AURA_CORPUS = ("a photo of a cat", "a running dog", "an astronaut riding a horse on mars, 8k",
               "numbers 1234567890 and 3.14159, café naïve", "a very long prompt with many repeated words",
               "blurry, low quality, ugly")


def aura_tokenizer(folder: Path) -> Path:
    """A small tokenizer in AuraFlow's format (see the module docstring), saved as tokenizer.json + config."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    tok.train_from_iterator(AURA_CORPUS, trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"],
                                                             show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 2)])
    folder.mkdir(parents=True)
    tok.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "LlamaTokenizerFast", "add_bos_token": False, "add_eos_token": True,
              "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<s>",
              "model_max_length": 512, "padding_side": "right", "legacy": False}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return folder


def gemma_tokenizer(folder: Path) -> Path:
    """A small tokenizer in Sana's (gemma-2-2b-it's, gated on the hub) format: GemmaTokenizerFast from a
    tokenizer.json with <pad> 0, <eos> 1, <bos> 2, <unk> 3, BOS first and no EOS appended, trained on the
    instruction Sana puts before every prompt and a few captions. Only ids and the BOS rule matter to the recipe."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    corpus = [*clipcond.registry.SANA_INSTRUCTION.split("\n"), *AURA_CORPUS]
    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=600, special_tokens=specials, show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    folder.mkdir(parents=True)
    tok.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "GemmaTokenizer", "add_bos_token": True, "add_eos_token": False,
              "bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>", "pad_token": "<pad>",
              "model_max_length": 8192, "padding_side": "left"}  # left, as Gemma's: SanaPipeline sets right
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return folder


def gemma_model(*, seed: int):
    """A random transformers Gemma2Model of tiny-sana's sizes (transformers' own init), vocabulary 600."""
    from transformers import Gemma2Config, Gemma2Model

    t = clipcond.get_spec("tiny-sana").t5
    torch.manual_seed(seed)
    config = Gemma2Config(vocab_size=600, hidden_size=t.d_model, intermediate_size=t.d_ff, num_hidden_layers=t.layers,
                          num_attention_heads=t.heads, num_key_value_heads=t.kv_heads, head_dim=t.d_kv,
                          query_pre_attn_scalar=t.d_kv, sliding_window=64, pad_token_id=0, eos_token_id=1,
                          bos_token_id=2)
    return Gemma2Model(config).eval()


def copy_tokenizer(source: Path, folder: Path) -> Path:
    shutil.copytree(source, folder)
    return folder


class T5Pipelines:
    """Tiny Flux, SD3 and PixArt pipeline folders (model_index.json, text_encoder*/, tokenizer*/) and the
    transformers models written into them. T5 weights are sharded, with their index, as the hub has them."""

    def __init__(self, root: Path, tiny, vocab: dict[str, Path]) -> None:
        self.root, self.vocab = root, vocab
        spec = clipcond.get_spec
        self.t5 = t5_model(spec("tiny-flux").t5, seed=20)
        self.flux = root / "flux"
        save_published(tiny.clip_l, self.flux / "text_encoder")
        hf_tokenizer(self.flux / "tokenizer", "<|endoftext|>")
        self._t5(self.flux, "text_encoder_2", "tokenizer_2", vocab["flux"],
                 {"_class_name": "FluxPipeline", "text_encoder": ["transformers", "CLIPTextModel"],
                  "tokenizer": ["transformers", "CLIPTokenizer"], "text_encoder_2": ["transformers", "T5EncoderModel"],
                  "tokenizer_2": ["transformers", "T5TokenizerFast"]})
        self.sd3 = root / "sd3"
        sd3 = spec("tiny-sd3")
        self.sd3_clip = [hf_text_model(t, layers=t.layers, projection=True, seed=21 + i)
                         for i, t in enumerate(sd3.towers)]
        subs, pads = ("text_encoder", "text_encoder_2"), ("<|endoftext|>", "!")
        for model, sub, pad in zip(self.sd3_clip, subs, pads, strict=True):
            save_published(model, self.sd3 / sub)
            hf_tokenizer(self.sd3 / sub.replace("text_encoder", "tokenizer"), pad)
        self._t5(self.sd3, "text_encoder_3", "tokenizer_3", vocab["sd3"],
                 {"_class_name": "StableDiffusion3Pipeline", "text_encoder_3": ["transformers", "T5EncoderModel"]})
        self.pixart = root / "pixart"
        self._t5(self.pixart, "text_encoder", "tokenizer", vocab["sd3"],
                 {"_class_name": "PixArtSigmaPipeline", "text_encoder": ["transformers", "T5EncoderModel"],
                  "tokenizer": ["transformers", "T5Tokenizer"]})
        self.chroma = root / "chroma"
        self._t5(self.chroma, "text_encoder", "tokenizer", vocab["sd3"],
                 {"_class_name": "ChromaPipeline", "text_encoder": ["transformers", "T5EncoderModel"],
                  "tokenizer": ["transformers", "T5TokenizerFast"]})
        self.aura = root / "auraflow"
        self.umt5 = t5_model(spec("tiny-auraflow").t5, seed=22)
        self.umt5.save_pretrained(self.aura / "text_encoder")
        aura_tokenizer(self.aura / "tokenizer")
        (self.aura / "model_index.json").write_text(json.dumps(
            {"_class_name": "AuraFlowPipeline", "text_encoder": ["transformers", "UMT5EncoderModel"],
             "tokenizer": ["transformers", "LlamaTokenizerFast"], "_diffusers_version": "0.42.1"}, indent=2))
        self.sana = root / "sana"
        gemma_model(seed=23).save_pretrained(self.sana / "text_encoder", max_shard_size="200KB")
        gemma_tokenizer(self.sana / "tokenizer")
        (self.sana / "model_index.json").write_text(json.dumps(
            {"_class_name": "SanaPipeline", "text_encoder": ["transformers", "Gemma2Model"],
             "tokenizer": ["transformers", "GemmaTokenizerFast"], "_diffusers_version": "0.42.1"}, indent=2))

    def _t5(self, folder: Path, sub: str, tok: str, vocab: Path, index: dict) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.t5.save_pretrained(folder / sub, max_shard_size="4MB")  # 12 MB of weights: sharded, with an index
        assert (folder / sub / "model.safetensors.index.json").is_file()
        copy_tokenizer(vocab, folder / tok)
        (folder / "model_index.json").write_text(json.dumps({**index, "_diffusers_version": "0.42.1"}, indent=2))

    def tokenizer(self, which: str):
        from transformers import T5TokenizerFast

        return T5TokenizerFast.from_pretrained(self.vocab[which])

    def reference_t5(self, folder: Path, sub: str):
        from transformers import T5EncoderModel

        return T5EncoderModel.from_pretrained(folder / sub).eval()

    def flux_pipeline(self, tiny):
        from diffusers import FluxPipeline

        return FluxPipeline(scheduler=None, vae=None, text_encoder=tiny.clip_l, tokenizer=tiny.tok_l,
                            text_encoder_2=self.reference_t5(self.flux, "text_encoder_2"),
                            tokenizer_2=self.tokenizer("flux"), transformer=None)

    def sd3_pipeline(self):
        from diffusers import StableDiffusion3Pipeline
        from transformers import CLIPTokenizer

        return StableDiffusion3Pipeline(
            transformer=None, scheduler=None, vae=None, text_encoder=self.sd3_clip[0], text_encoder_2=self.sd3_clip[1],
            tokenizer=CLIPTokenizer.from_pretrained(self.sd3 / "tokenizer"),
            tokenizer_2=CLIPTokenizer.from_pretrained(self.sd3 / "tokenizer_2"),
            text_encoder_3=self.reference_t5(self.sd3, "text_encoder_3"), tokenizer_3=self.tokenizer("sd3"))

    def chroma_pipeline(self):
        from diffusers import ChromaPipeline

        return ChromaPipeline(scheduler=None, vae=None, text_encoder=self.reference_t5(self.chroma, "text_encoder"),
                              tokenizer=self.tokenizer("sd3"), transformer=None)

    def aura_pipeline(self):
        from diffusers import AuraFlowPipeline
        from transformers import AutoTokenizer, UMT5EncoderModel

        return AuraFlowPipeline(tokenizer=AutoTokenizer.from_pretrained(self.aura / "tokenizer"),
                                text_encoder=UMT5EncoderModel.from_pretrained(self.aura / "text_encoder").eval(),
                                vae=None, transformer=None, scheduler=None)

    def sana_pipeline(self):
        from diffusers import SanaPipeline
        from transformers import AutoTokenizer, Gemma2Model

        return SanaPipeline(tokenizer=AutoTokenizer.from_pretrained(self.sana / "tokenizer"),
                            text_encoder=Gemma2Model.from_pretrained(self.sana / "text_encoder").eval(),
                            vae=None, transformer=None, scheduler=None)

    def pixart_pipeline(self, cls_name: str):
        import diffusers

        cls = getattr(diffusers, cls_name)
        return cls(tokenizer=self.tokenizer("sd3"), text_encoder=self.reference_t5(self.pixart, "text_encoder"),
                   vae=None, transformer=None, scheduler=None)
