"""Prompts to weighted 77-token windows, per tower, the way each tool reads them (clipcond/text/prompts.py).

- ``None`` (``long_prompts="chunk"``): the tower's own tokenizer, plain 75-token windows.
- ``"a1111"``: A1111's parser; each segment tokenized on its own by the tower's tokenizer (A1111's
  hijack tokenizes SD 2.x and SDXL's bigG through open_clip's), then ``tokenize_line``'s chunking.
- ``"comfy"``: ComfyUI's parser; each weighted piece tokenized whole by transformers' CLIPTokenizer
  on every tower (ComfyUI's SDTokenizer, also for SD 2.x and bigG; padding stays the tower's),
  ``embedding:name`` for textual inversion, ComfyUI's chunk rule.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Literal

from clipcond.text.prompts import (
    Window,
    a1111_windows,
    comfy_weights,
    comfy_windows,
    is_break,
    parse_emphasis,
    plain_windows,
)
from clipcond.text.tokenizer import ClipTokenizer

logger = logging.getLogger(__name__)

Style = Literal["a1111", "comfy"] | None
_EMBEDDING = re.compile(r"(?<=\s)embedding:")  # ComfyUI splits a piece only where whitespace precedes it
_NAME_END = re.compile(r"[<\[]")


def read_windows(prompts: Sequence[str], tokenizer: ClipTokenizer, *, style: Style, comma_backtrack: int = 20,
                 plain: ClipTokenizer | None = None) -> list[list[Window]]:
    """Each prompt's windows of (token id, weight) for one tower. ``plain``: the tower's tokenizer without
    added words, in the hf flavour (what ComfyUI tokenizes with; its textual inversion is ``embedding:``)."""
    if style is None:
        return [plain_windows(ids) for ids in tokenizer.encode(list(prompts))]
    if style == "a1111":
        return [_a1111(p, tokenizer, comma_backtrack) for p in prompts]
    if style == "comfy":
        return [_comfy(p, plain, tokenizer) for p in prompts]
    raise ValueError(f"style must be 'a1111', 'comfy' or None, got {style!r}")


def _a1111(prompt: str, tokenizer: ClipTokenizer, comma_backtrack: int) -> list[Window]:
    segments = parse_emphasis(prompt)
    texts = [text for text, weight in segments if not is_break((text, weight))]
    encoded = iter(tokenizer.encode(texts))
    tokens = [(None if is_break((text, weight)) else next(encoded), weight) for text, weight in segments]
    return a1111_windows(tokens, comma=tokenizer.comma, backtrack=comma_backtrack, groups=tokenizer.groups())


def _comfy(prompt: str, plain: ClipTokenizer, tokenizer: ClipTokenizer) -> list[Window]:
    """ComfyUI's pieces: each weighted segment, cut where ``embedding:name`` starts; an embedding is a piece."""
    pieces: list[Window] = []
    for text, weight in comfy_weights(prompt):
        parts = _EMBEDDING.split(text)
        items: list[str | tuple[int, ...]] = [parts[0]]  # texts and embeddings' vector ids, in order
        for part in parts[1:]:
            name, leftover = _embedding_name(part)
            vectors = tokenizer.added.get(name)
            if vectors is None and name.rstrip(",") != name:  # "embedding:lab," : the comma stays text
                name, leftover = name.rstrip(","), name[len(name.rstrip(",")) :] + leftover
                vectors = tokenizer.added.get(name)
            if vectors is None:
                logger.warning("embedding:%s is not loaded (with_textual_inversion); ignored, as ComfyUI ignores it",
                               name)
            else:
                items.append(tuple(vectors))
            items.append(leftover)
        encoded = iter(plain.encode([item for item in items if isinstance(item, str)]))
        pieces += [[(i, weight) for i in (next(encoded) if isinstance(item, str) else item)] for item in items]
    return comfy_windows([piece for piece in pieces if piece])


def _embedding_name(text: str) -> tuple[str, str]:
    """``"name<lora> rest"`` -> ``("name", "<lora> rest")``: the name ends at whitespace, ``<`` or ``[``."""
    word, *rest = re.split(r"(\s)", text, maxsplit=1)
    cut = _NAME_END.search(word)
    if cut is None:
        return word, "".join(rest)
    return word[: cut.start()], word[cut.start() :] + "".join(rest)
