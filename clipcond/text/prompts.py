"""Prompt syntax and 77-token windows, each as the tool people copy prompts from reads them.

- A1111 (``modules/prompt_parser.py``, ``sd_hijack_clip.py``): ``parse_emphasis`` is
  ``parse_prompt_attention`` (``(word)`` x1.1, ``[word]`` /1.1, ``(word:1.3)``, ``\\(`` escapes, ``BREAK``,
  its quirks included); ``a1111_windows`` its ``tokenize_line``: 75-token chunks, comma back-tracking,
  ``BREAK``, a textual-inversion word never split, no empty trailing chunk.
- ComfyUI (``comfy/sd1_clip.py``): ``comfy_weights`` is its ``token_weights`` (an explicit weight
  replaces the outer one; no ``[x]``, no ``BREAK``; only ``\\(``/``\\)`` escape); ``comfy_windows`` its
  chunk rule (a weighted piece of fewer than 8 tokens is never split).
- ``frame``: each window framed BOS ... EOS and padded like a prompt of its own.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from clipcond.specs import BOS_ID, EOS_ID
from clipcond.text.tokenizer import first_eos

WeightStyle = Literal["a1111", "comfy", "compel"]
Emphasis = Literal["original", "no_norm"]
ROOM = 75  # tokens a window holds between its BOS and EOS

# --- A1111 ------------------------------------------------------------------------------------
_ATTENTION = re.compile(r"""
\\\(|\\\)|\\\[|\\]|\\\\|\\|
\(|\[|
:\s*([+-]?[.\d]+)\s*\)|
\)|]|
[^\\()\[\]:]+|
:
""", re.X)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)
ROUND, SQUARE = 1.1, 1 / 1.1  # A1111's multipliers for ( ) and [ ]
BREAK = ("BREAK", -1.0)  # A1111's marker; brackets multiply its weight too, and then it is the word BREAK


def is_break(fragment: tuple[str, float]) -> bool:
    return fragment[0] == "BREAK" and fragment[1] == -1.0


def parse_emphasis(text: str) -> list[tuple[str, float]]:
    """``"a (red:1.3) cat"`` -> ``[("a ", 1.0), ("red", 1.3), (" cat", 1.0)]``; ``BREAK`` is ``("BREAK", -1.0)``."""
    res: list[list] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def multiply(start: int, factor: float) -> None:
        for item in res[start:]:
            item[1] *= factor  # a BREAK inside brackets too: A1111 then reads it as text (its quirk)

    for m in _ATTENTION.finditer(text):
        chunk, weight = m.group(0), m.group(1)
        if chunk.startswith("\\"):
            res.append([chunk[1:], 1.0])
        elif chunk == "(":
            round_open.append(len(res))
        elif chunk == "[":
            square_open.append(len(res))
        elif weight is not None and round_open:
            multiply(round_open.pop(), float(weight))
        elif chunk == ")" and round_open:
            multiply(round_open.pop(), ROUND)
        elif chunk == "]" and square_open:
            multiply(square_open.pop(), SQUARE)
        else:
            for i, part in enumerate(_BREAK.split(chunk)):
                if i:
                    res.append(list(BREAK))
                res.append([part, 1.0])
    for start in round_open:  # unbalanced brackets still apply, as in A1111
        multiply(start, ROUND)
    for start in square_open:
        multiply(start, SQUARE)
    merged: list[list] = []
    for item in res or [["", 1.0]]:
        if merged and merged[-1][1] == item[1]:
            merged[-1][0] += item[0]
        else:
            merged.append(item)
    return [(t, w) for t, w in merged]


Window = list[tuple[int, float]]  # (token id, weight), at most ROOM of them


def a1111_windows(segments: Sequence[tuple[list[int] | None, float]], *, comma: int, backtrack: int,
                  groups: dict[int, int]) -> list[Window]:
    """A1111's ``tokenize_line`` over tokenized segments (``None`` ids: a BREAK).

    A window closes when a token arrives at a full one; if a comma sits within ``backtrack`` tokens
    of its end, the tokens after that comma move on with it (the comma stays). ``groups`` maps the
    first id of a textual-inversion word to its vector count: such a word moves whole to a new window
    rather than be cut. A BREAK closes the window (an empty one too); the last window is kept only
    if it holds tokens, or is the only one.
    """
    windows: list[Window] = []
    window: Window = []
    last_comma = -1

    def close() -> None:
        nonlocal window, last_comma
        windows.append(window)
        window, last_comma = [], -1

    for ids, weight in segments:
        if ids is None:
            close()
            continue
        position = 0
        while position < len(ids):
            token = ids[position]
            if token == comma:
                last_comma = len(window)
            elif backtrack and len(window) == ROOM and last_comma != -1 and len(window) - last_comma <= backtrack:
                moved = window[last_comma + 1 :]
                window = window[: last_comma + 1]
                close()
                window = moved
            if len(window) == ROOM:
                close()
            n = groups.get(token, 1)
            if n > 1 and len(window) + n > ROOM:
                close()
            window.extend((t, weight) for t in ids[position : position + n])
            position += n
    if window or not windows:
        close()
    return windows


# --- ComfyUI ----------------------------------------------------------------------------------
_ESCAPES = (("\\)", "\0\1"), ("\\(", "\0\2"))  # ComfyUI's only escapes, hidden from the bracket parser


def _top_level(text: str) -> list[str]:
    """Split at top-level parenthesised groups, ComfyUI's nesting count (an unclosed "(" stays text)."""
    items, current, depth = [], "", 0
    for char in text:
        if char == "(" and depth == 0:
            if current:
                items.append(current)
            current = "("
            depth += 1
        elif char == "(":
            current += char
            depth += 1
        elif char == ")":
            depth -= 1
            if depth == 0:
                items.append(current + ")")
                current = ""
            else:
                current += char
        else:
            current += char
    if current:
        items.append(current)
    return items


def _comfy_weights(text: str, weight: float) -> list[tuple[str, float]]:
    out = []
    for item in _top_level(text):
        if len(item) >= 2 and item[0] == "(" and item[-1] == ")":
            inner, inner_weight = item[1:-1], weight * 1.1
            colon = inner.rfind(":")
            if colon > 0:
                try:  # an explicit weight replaces the group's (it does not multiply)
                    inner_weight, inner = float(inner[colon + 1 :]), inner[:colon]
                except ValueError:
                    pass
            out += _comfy_weights(inner, inner_weight)
        else:
            out.append((item, weight))
    return out


def comfy_weights(text: str) -> list[tuple[str, float]]:
    """ComfyUI's reading of a prompt: ``"((a:1.5) b)"`` -> ``[("a", 1.5), (" b", 1.1)]``."""
    for escape, hidden in _ESCAPES:
        text = text.replace(escape, hidden)
    out = []
    for piece, weight in _comfy_weights(text, 1.0):
        for escape, hidden in _ESCAPES:
            piece = piece.replace(hidden, escape[1])
        out.append((piece, weight))
    return out


COMFY_WHOLE = 8  # ComfyUI's max_word_length: a piece shorter than this never straddles two windows


def comfy_windows(pieces: Sequence[Window]) -> list[Window]:
    """ComfyUI's chunking: a piece that does not fit moves whole to a new window if it is shorter than
    8 tokens; a longer one fills the window and goes on in the next."""
    windows: list[Window] = []
    window: Window = []
    for piece in pieces:
        large, piece = len(piece) >= COMFY_WHOLE, list(piece)
        while piece:
            if len(piece) + len(window) > ROOM:
                if large:
                    room = ROOM - len(window)
                    window, piece = window + piece[:room], piece[room:]
                windows.append(window)
                window = []
            else:
                window, piece = window + piece, []
    windows.append(window)
    return windows


# --- windows as token ids --------------------------------------------------------------------
def plain_windows(ids: list[int]) -> list[Window]:
    """Unweighted text in windows of 75 tokens (``long_prompts="chunk"``)."""
    return [[(t, 1.0) for t in ids[a : a + ROOM]] for a in range(0, max(len(ids), 1), ROOM)]


@dataclass(frozen=True, slots=True)
class Windows:
    """A batch cut into the same number of windows of ``length`` tokens per prompt."""

    ids: torch.Tensor  # [B * k, L], window-major within each prompt
    eos: torch.Tensor  # [B * k]
    weights: torch.Tensor  # [B * k, L] float32, 1.0 on BOS/EOS/padding


def frame(per_prompt: Sequence[list[Window]], *, length: int, pad_id: int, k: int) -> Windows:
    """Each window framed as a prompt of its own, BOS ... EOS pad; every prompt padded to ``k`` windows
    with empty ones (BOS EOS pad: the empty prompt)."""
    ids = torch.full((len(per_prompt) * k, length), pad_id, dtype=torch.long)
    weights = torch.ones(len(per_prompt) * k, length)
    for p, windows in enumerate(per_prompt):
        for j in range(k):
            row, window = p * k + j, windows[j] if j < len(windows) else []
            ids[row, : len(window) + 2] = torch.tensor([BOS_ID, *(t for t, _ in window), EOS_ID])
            weights[row, 1 : len(window) + 1] = torch.tensor([w for _, w in window])
    # The first EOS, as for a prompt that fits one window: a literal "<|endoftext|>" comes before the frame's.
    return Windows(ids=ids, eos=first_eos(ids), weights=weights)


def apply_weights(z: torch.Tensor, weights: torch.Tensor, *, style: WeightStyle, empty: torch.Tensor,
                  emphasis: Emphasis = "original", batch: int | None = None) -> torch.Tensor:
    """Per-token prompt weights on ``z`` [N, L, W] (``weights`` [N, L], ``empty`` [1, L, W]).

    A1111's "Original" emphasis restores the mean of the batch it encodes, window by window: ``batch=None``
    when that is each window alone (one prompt at a time); ``batch=B`` when the rows are B prompts' k windows
    each (window-major within each prompt) encoded together, as A1111 encodes the texts of one prompt's schedule.
    """
    w = weights.to(z.dtype)[..., None]  # [N, L, 1]
    if style != "a1111":
        # Weight 1 keeps z bit-exact: z_empty + 1 * (z - z_empty) is not z in floating point.
        return torch.where(w == 1, z, empty + w * (z - empty))
    z, w = z.unflatten(0, (batch or z.shape[0], -1)), w.unflatten(0, (batch or w.shape[0], -1))  # [B, k, L, *]
    together = (0, 2, 3) if batch else (2, 3)  # what shares one mean: window j of every prompt, or one window
    weighted = z * w
    if emphasis == "original":
        weighted = weighted * (z.mean(dim=together, keepdim=True) / weighted.mean(dim=together, keepdim=True))
    # Windows without emphasis stay bit-exact (and a zero-mean window cannot turn into NaN).
    return torch.where((w == 1).all(dim=together, keepdim=True), z, weighted).flatten(0, 1)
