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
from collections.abc import Callable, Mapping, Sequence
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
IDENTIFIER = "embedding:"  # ComfyUI's embedding_identifier
_EMBEDDING = re.compile(r"(?<=[ \n])(?=embedding:)")  # ComfyUI cuts a segment where a space or newline precedes it


def read_windows(prompts: Sequence[str], tokenizer: ClipTokenizer, *, style: Style, comma_backtrack: int = 20
                 ) -> list[list[Window]]:
    """Each prompt's windows of (token id, weight) for the tower ``tokenizer`` belongs to."""
    if style is None:
        return [plain_windows(ids) for ids in tokenizer.encode(list(prompts))]
    if style == "a1111":
        return [_a1111(p, tokenizer, comma_backtrack) for p in prompts]
    if style == "comfy":
        # ComfyUI's SDTokenizer: transformers' tokenization on every tower, the tower's padding, no added words
        # (its textual inversion is "embedding:name").
        plain = ClipTokenizer("hf", pad_id=tokenizer.pad_id, max_length=tokenizer.max_length)
        return [comfy_windows(comfy_pieces(p, plain.encode, tokenizer.added)) for p in prompts]
    raise ValueError(f"style must be 'a1111', 'comfy' or None, got {style!r}")


def _a1111(prompt: str, tokenizer: ClipTokenizer, comma_backtrack: int) -> list[Window]:
    segments = parse_emphasis(prompt)
    texts = [text for text, weight in segments if not is_break((text, weight))]
    encoded = iter(tokenizer.encode(texts))
    tokens = [(None if is_break((text, weight)) else next(encoded), weight) for text, weight in segments]
    return a1111_windows(tokens, comma=tokenizer.comma, backtrack=comma_backtrack, groups=tokenizer.groups())


def comfy_pieces(prompt: str, encode: Callable[[list[str]], list[list[int]]],
                 added: Mapping[str, tuple[int, ...]]) -> list[Window]:
    """ComfyUI's pieces of (token id, weight): each weighted segment's words (``_comfy_words``), each tokenized on
    its own by ``encode`` (texts -> ids without start and end tokens), ``embedding:name`` as ``added``'s vectors."""
    pieces: list[Window] = []
    for text, weight in comfy_weights(prompt):
        items = _comfy_words(text, added)
        encoded = iter(encode([item for item in items if isinstance(item, str)]))
        pieces += [[(i, weight) for i in (next(encoded) if isinstance(item, str) else item)] for item in items]
    return [piece for piece in pieces if piece]


def _comfy_words(text: str, added: Mapping[str, tuple[int, ...]]) -> list[str | tuple[int, ...]]:
    """A segment cut before each ``embedding:`` that follows a space or a newline; every word that starts with
    ``embedding:`` (the first one too) gives the embedding's vector ids, then the text left after its name."""
    items: list[str | tuple[int, ...]] = []
    for word in _EMBEDDING.split(text):
        if word.startswith(IDENTIFIER):
            vectors, word = _embedding(word[len(IDENTIFIER) :], added)
            if vectors is not None:
                items.append(vectors)
        if word:
            items.append(word)
    return items


def _embedding(text: str, added: Mapping[str, tuple[int, ...]]) -> tuple[tuple[int, ...] | None, str]:
    """``"name rest"`` -> (name's vector ids, ``"rest"``), ComfyUI's ``_try_get_embedding``: the name ends at
    whitespace; one not loaded is tried with its commas stripped, else dropped."""
    words = text.strip("\n").split()
    name, rest = (words[0] if words else ""), " ".join(words[1:])
    vectors = added.get(name)
    stripped = name.strip(",")
    if vectors is None and stripped != name:
        # ComfyUI keeps name[len(stripped):] as text: "lab," leaves ",", and ",lab" leaves "b" (its quirk).
        vectors, rest = added.get(stripped), f"{name[len(stripped) :]} {rest}"
    if vectors is None:
        logger.warning("embedding:%s is not loaded (with_textual_inversion); ignored, as ComfyUI ignores it", name)
    return vectors, rest
