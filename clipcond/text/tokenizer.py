"""Exact CLIP BPE tokenization on the Rust ``tokenizers`` backend, from open_clip's vocabulary.

Two flavours, because each UNet was trained through a different one:

- ``"hf"`` matches transformers' ``CLIPTokenizer`` (SD 1.x, SDXL's first tower): NFC,
  whitespace runs -> one space, lower-case, ``<|startoftext|>``/``<|endoftext|>`` literal.
- ``"open_clip"`` matches ``open_clip.tokenize`` (SD 2.x, SDXL's bigG): ``ftfy.fix_text``,
  ``html.unescape`` twice, ``str.split`` whitespace, ``str.lower``; pad id 0.

Where the two disagree (rare input): HTML entities (``&amp;`` is one ``&`` for open_clip,
three tokens for HF), mojibake and odd Unicode that ftfy repairs, ``<start_of_text>`` versus
``<|startoftext|>`` as literal special tokens, and the HF tokenizers shipped with SD 2.x and
SDXL's second tower, whose pad token ``"!"`` makes every literal ``!`` id 0 instead of
``!</w>`` 256 (diffusers#4153); clipcond follows open_clip there, as the UNet was trained.
"""

from __future__ import annotations

import gzip
import html
import importlib.util
import itertools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from clipcond.specs import BOS_ID, EOS_ID, TokenizerKind

if TYPE_CHECKING:
    import torch
    from tokenizers import Tokenizer


_SPECIALS: dict[str, tuple[str, str]] = {
    "hf": ("<|startoftext|>", "<|endoftext|>"),
    "open_clip": ("<start_of_text>", "<end_of_text>"),
}
_WORD_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
# Text that ftfy and html.unescape provably leave alone: printable ASCII without '&'.
_PLAIN = re.compile(r"[\x20-\x25\x27-\x7e\t\n\r]*")


def bpe_path() -> Path:
    """open_clip's ``bpe_simple_vocab_16e6.txt.gz``, found without importing open_clip (and torchvision)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the CLIP vocabulary ships in open_clip_torch: pip install open_clip_torch")
    return Path(next(iter(spec.submodule_search_locations))) / "bpe_simple_vocab_16e6.txt.gz"


@lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2/CLIP's reversible byte -> printable-character table.
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    for b in range(256):
        if b not in bs:  # unprintable bytes map past 255, in byte order
            bs.append(b)
            cs.append(256 + len(cs) - 188)
    return dict(zip(bs, map(chr, cs), strict=True))


@lru_cache(maxsize=1)
def clip_vocab() -> tuple[list[str], list[tuple[str, str]]]:
    """The 49,406 BPE tokens (specials excluded) and 48,894 merges, in CLIP's id order."""
    lines = gzip.open(bpe_path()).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    chars = list(_bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges]
    return tokens, merges  # type: ignore[return-value]


def write_hf_tokenizer(folder: str | Path, *, pad_token: str = "<|endoftext|>") -> Path:
    """A transformers ``CLIPTokenizer`` folder as the SD repos publish it, offline, from open_clip's vocabulary.

    ``vocab.json``, ``merges.txt``, ``tokenizer_config.json``; ``pad_token`` is ``<|endoftext|>`` for
    SD 1.x (and SDXL's first tokenizer), ``!`` for SD 2.x and SDXL's ``tokenizer_2``.
    """
    import json

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokens, merges = clip_vocab()
    vocab = {tok: i for i, tok in enumerate(tokens)} | {_SPECIALS["hf"][0]: BOS_ID, _SPECIALS["hf"][1]: EOS_ID}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True,
              "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
              "pad_token": pad_token}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return folder


@lru_cache(maxsize=2)
def _rust_tokenizer(kind: TokenizerKind) -> Tokenizer:
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE

    bos, eos = _SPECIALS[kind]
    tokens, merges = clip_vocab()
    vocab = {tok: i for i, tok in enumerate(tokens)} | {bos: BOS_ID, eos: EOS_ID}
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, continuing_subword_prefix="", end_of_word_suffix="</w>",
                        fuse_unk=False, unk_token=eos))
    if kind == "hf":
        # transformers' CLIPTokenizer normalizer, verbatim.
        tok.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    # open_clip text is cleaned and lower-cased in Python first (ftfy has no Rust twin).
    special = "|".join(re.escape(s) for s in (bos, eos))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(special + "|" + _WORD_PATTERN), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([bos, eos])
    return tok


def open_clip_clean(text: str) -> str:
    """open_clip's ``_clean_lower``: ftfy, html.unescape twice, whitespace, lower-case."""
    if _PLAIN.fullmatch(text) is None:
        import ftfy

        text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return " ".join(text.split()).lower()


@dataclass(frozen=True, slots=True)
class Tokens:
    """Token ids as one tower sees them; the caller decides whether truncation is worth a warning."""

    ids: torch.Tensor  # [B, L] int64, BOS ... EOS pad
    eos: torch.Tensor  # [B] int64, position of the first EOS id (where the pooled vector is read)
    truncated: tuple[tuple[int, str], ...]  # (row, dropped text) for prompts longer than L
    # Rows of an instruction before the prompt that the output leaves out, but the first (Sana: rows 1 to prefix
    # of the encoder's output are cut); 0: none.
    prefix: int = 0


def check_prompts(prompts: str | Sequence[str]) -> list[str]:
    """Normalise a prompt or prompts to a list, naming the first non-string by index."""
    if isinstance(prompts, str):
        return [prompts]
    if not isinstance(prompts, Sequence):
        raise TypeError(f"prompts must be a str or a sequence of str, got {type(prompts).__name__}")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise TypeError(f"prompt[{i}] must be str, got {type(prompt).__name__}")
    return list(prompts)


class ClipTokenizer:
    """CLIP BPE tokenizer of one flavour: ``tok(prompts) -> Tokens`` of ``[B, max_length]`` ids."""

    def __init__(
        self,
        kind: TokenizerKind,
        *,
        pad_id: int,
        max_length: int = 77,
        added: Mapping[str, Sequence[int]] | None = None,
        bang_pad: bool = False,
    ) -> None:
        """``added`` maps new words (textual-inversion tokens) to the ids they expand to. ``bang_pad``:
        ``"!"`` is a special token, as in the transformers tokenizers shipped with SD 2.x and SDXL's
        ``tokenizer_2`` (their pad token), so every literal ``!`` is id 0 (diffusers#4153; compel reads so)."""
        if kind not in _SPECIALS:
            raise ValueError(f"tokenizer kind must be one of {sorted(_SPECIALS)}, got {kind!r}")
        self.kind, self.pad_id, self.max_length = kind, pad_id, max_length
        self.added = {word: tuple(ids) for word, ids in (added or {}).items()}
        self._tok, self._expand = _rust_tokenizer(kind), {}
        if self.added or bang_pad:
            from tokenizers import AddedToken, Tokenizer

            self._tok = Tokenizer.from_str(self._tok.to_str())  # the shared instance stays untouched
        if bang_pad:
            self._tok.add_special_tokens([AddedToken("!", normalized=False)])  # "!" is id 0 in the vocabulary
        if self.added:
            # Both flavours lower-case before matching, so the word is matched lower-cased.
            self._tok.add_tokens([AddedToken(word.lower(), normalized=True) for word in self.added])
            self._expand = {self._tok.token_to_id(word.lower()): ids for word, ids in self.added.items()}

    def encode(self, prompts: Sequence[str]) -> list[list[int]]:
        """BPE ids of each prompt without BOS/EOS, untruncated."""
        texts = [open_clip_clean(p) for p in prompts] if self.kind == "open_clip" else list(prompts)
        # encode_batch_fast (tokenizers >= 0.21) skips the character offsets, which are never read.
        encode_batch = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        rows = [enc.ids for enc in encode_batch(texts, add_special_tokens=False)]
        if self._expand:  # one placeholder id per added word -> its (multi-vector) ids
            rows = [[i for t in row for i in self._expand.get(t, (t,))] for row in rows]
        return rows

    def decode(self, ids: Sequence[int]) -> str:
        """Text of BPE ids; the vectors of an added word read as the word (once, however many it has)."""
        words = {i: word for word, vector_ids in self.added.items() for i in vector_ids}
        first = {word: vector_ids[0] for word, vector_ids in self.added.items() if vector_ids}
        parts, run, previous = [], [], None
        for i in ids:
            word = words.get(i)
            if word is None:
                run.append(i)
            elif i == first[word] or word != previous:  # a word's first vector, or a word cut before it
                parts += [self._tok.decode(run, skip_special_tokens=False), word + "</w>"]
                run = []
            previous = word
        parts.append(self._tok.decode(run, skip_special_tokens=False))
        return " ".join("".join(parts).replace("</w>", " ").split())

    def tokens(self, ids: Sequence[int]) -> list[str]:
        """The BPE strings of ``ids`` (``"cat</w>"``), as transformers' ``convert_ids_to_tokens``."""
        return [self._tok.id_to_token(i) or "" for i in ids]

    @property
    def comma(self) -> int:
        """The id of ``,</w>``, where A1111 lets a full window break (comma back-tracking)."""
        return self._tok.token_to_id(",</w>")

    def groups(self) -> dict[int, int]:
        """The first vector id of each added word -> its vector count (words A1111 never splits)."""
        return {ids[0]: len(ids) for ids in self.added.values() if ids}

    def __call__(self, prompts: str | Sequence[str]) -> Tokens:
        import torch

        prompts = check_prompts(prompts)
        room = self.max_length - 2  # BOS and EOS always present: truncation keeps EOS last
        rows, truncated = [], []
        for row, bpe in enumerate(self.encode(prompts)):
            if len(bpe) > room:
                truncated.append((row, self.decode(bpe[room:])))
                bpe = bpe[:room]
            rows.append((BOS_ID, *bpe, EOS_ID))
        # One masked fill: a tensor and a slice assignment per row would cost ~27% of the call.
        lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)  # [B]
        ids = torch.full((len(rows), self.max_length), self.pad_id, dtype=torch.long)  # [B, L]
        ids[torch.arange(self.max_length) < lengths[:, None]] = torch.tensor(
            list(itertools.chain.from_iterable(rows)), dtype=torch.long)
        return Tokens(ids=ids, eos=first_eos(ids), truncated=tuple(truncated))


def first_eos(ids: torch.Tensor) -> torch.Tensor:
    """[B, L] ids -> [B], the position of each row's first EOS id, where the pooled vector is read: as HF's
    pooler reads it (not ``argmax(ids)``, which a textual-inversion id above 49407 would win); a literal
    ``<|endoftext|>`` in a prompt comes before the EOS that closes it."""
    return (ids == EOS_ID).int().argmax(dim=1)
