"""The T5 recipes' tokenization: the pipeline's own tokenizer (``T5TokenizerFast``, AuraFlow's Llama-style one,
Sana's Gemma-2) called exactly as diffusers calls it, PixArt's caption preprocessing, and the mask that follows.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from clipcond.errors import WeightsError
from clipcond.specs import EncoderSpec
from clipcond.text.tokenizer import Tokens, check_prompts

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "spiece.model")


class T5Prompts:
    """The pipeline's T5 tokenizer, called as diffusers calls it: ``padding="max_length"``, truncation keeping
    EOS last, no BOS. ``tok(prompts) -> Tokens`` whose ``eos`` is the closing EOS's position (the mask is
    ``arange(L) <= eos``: transformers' ``attention_mask`` under right padding)."""

    def __init__(self, tokenizer: object, spec: EncoderSpec) -> None:
        assert spec.t5 is not None
        pad, eos = getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)
        # With the mask into T5 (PixArt, Chroma, AuraFlow) the pad id reaches no output: only eos must agree there.
        if eos != spec.t5.eos_id or (pad != spec.t5.pad_id and not spec.t5_mask):
            raise WeightsError(f"T5 tokenizer {type(tokenizer).__name__} has pad id {pad} and eos id {eos}; tower "
                               f"{spec.t5.name!r} expects {spec.t5.pad_id} and {spec.t5.eos_id}: another vocabulary")
        self.tokenizer, self.max_length, self.preprocess = tokenizer, spec.t5_max_length, spec.preprocess
        self.pad_id, self.eos_id = spec.t5.pad_id, spec.t5.eos_id

    def texts(self, prompts: Sequence[str]) -> list[str]:
        """The text T5 is given: PixArt's ``_text_preprocessing`` (``lower().strip()``, or with
        ``clean_caption=True`` its cleaning twice), or the prompts as they are."""
        if self.preprocess == "clean_caption":
            clean = clean_caption()
            return [clean(clean(p)) for p in prompts]
        return [p.lower().strip() for p in prompts] if self.preprocess == "lower_strip" else list(prompts)

    def __call__(self, prompts: str | Sequence[str], *, instruct: bool = True) -> Tokens:
        """``instruct``: an instruction recipe's prompt (GemmaPrompts); T5 recipes have none."""
        texts = self.texts(check_prompts(prompts))
        length = self.max_length
        rows = self.tokenizer(texts, add_special_tokens=True, verbose=False).input_ids if texts else []  # untruncated
        truncated = tuple((i, self.tokenizer.decode(r[length - 1 : -1]))
                          for i, r in enumerate(rows) if len(r) > length)
        rows = [r if len(r) <= length else [*r[: length - 1], self.eos_id] for r in rows]
        ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)  # [B, L]
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        eos = torch.tensor([len(r) - 1 for r in rows], dtype=torch.long)  # [B]
        return Tokens(ids=ids, eos=eos, truncated=truncated)


class GemmaPrompts(T5Prompts):
    """Sana's Gemma-2 tokenizer as ``SanaPipeline._get_gemma_prompt_embeds`` calls it: the instruction before each
    prompt (``spec.instruction``), BOS first, no EOS, right padding to ``n + L - 2`` tokens (n: the instruction's
    own tokens, BOS included; L: ``t5_max_length``), cut at the end. Of the output the pipeline keeps row 0 (BOS)
    and the last L - 1 (its ``select_index``): ``Tokens.prefix`` = n - 2 rows after the first are cut. Without the
    instruction (``instruct=False``: the negative and null prompts, as the pipeline encodes them) L tokens, none
    cut."""

    def __init__(self, tokenizer: object, spec: EncoderSpec) -> None:
        super().__init__(tokenizer, spec)
        self.instruction = spec.instruction
        self.instruction_tokens = len(tokenizer.encode(self.instruction)) if self.instruction else 0

    def __call__(self, prompts: str | Sequence[str], *, instruct: bool = True) -> Tokens:
        texts = self.texts(check_prompts(prompts))
        n = self.instruction_tokens if instruct else 0
        if n:
            texts = [self.instruction + t for t in texts]
        length = n + self.max_length - 2 if n else self.max_length
        rows = self.tokenizer(texts, add_special_tokens=True, verbose=False).input_ids if texts else []  # untruncated
        truncated = tuple((i, self.tokenizer.decode(r[length:])) for i, r in enumerate(rows) if len(r) > length)
        ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)  # [B, L']
        for i, r in enumerate(rows):
            ids[i, : min(len(r), length)] = torch.tensor(r[:length], dtype=torch.long)
        eos = torch.tensor([min(len(r), length) - 1 for r in rows], dtype=torch.long)  # [B]: the last real token
        return Tokens(ids=ids, eos=eos, truncated=truncated, prefix=max(n - 2, 0))


def clean_caption() -> Callable[[str], str]:
    """PixArt's caption cleaning (``clean_caption=True``: URLs, HTML, @names, CJK, punctuation runs, file names
    ... removed; DeepFloyd IF's rules), diffusers' own function: clipcond does not keep a second copy of its
    ~70 rules. Needs diffusers, beautifulsoup4 and ftfy (``pip install clipcond[pixart]``); without them the
    pipeline falls back to ``lower().strip()`` with a warning, clipcond refuses (another conditioning, silently,
    is worse)."""
    import importlib.util

    missing = [name for name, module in (("diffusers", "diffusers"), ("beautifulsoup4", "bs4"), ("ftfy", "ftfy"))
               if importlib.util.find_spec(module) is None]
    if missing:
        raise ImportError(f"preprocess='clean_caption' (PixArt's clean_caption=True) runs diffusers' caption "
                          f"cleaning, which needs {', '.join(missing)}: pip install clipcond[pixart]")
    from diffusers import PixArtAlphaPipeline

    # An unbound method whose only use of self is the class attribute bad_punct_regex: the class serves as self.
    return functools.partial(PixArtAlphaPipeline._clean_caption, PixArtAlphaPipeline)


def token_mask(tokens: Tokens) -> torch.Tensor:
    """[B, L] int64: 1 up to and including the closing EOS (transformers' attention_mask, right padding)."""
    return (torch.arange(tokens.ids.shape[1]) <= tokens.eos[:, None]).long()


def load_tokenizer(source: object, spec: EncoderSpec) -> T5Prompts:
    """``source``: a tokenizer folder (AutoTokenizer: T5TokenizerFast from tokenizer.json) or a tokenizer."""
    if isinstance(source, (str, Path)):
        from transformers import AutoTokenizer

        folder = Path(source)
        if not any((folder / f).is_file() for f in TOKENIZER_FILES):
            raise WeightsError(f"{folder}: no T5 tokenizer ({', '.join(TOKENIZER_FILES)}); pass tokenizer=PATH to a "
                               f"pipeline's tokenizer folder (e.g. FLUX.1-dev/tokenizer_2)")
        source = AutoTokenizer.from_pretrained(folder)
    return (GemmaPrompts if spec.t5.architecture == "gemma2" else T5Prompts)(source, spec)
