"""Prompt syntax and 77-token windows: A1111 emphasis, ``BREAK``, and long-prompt chunking.

``parse_emphasis`` is AUTOMATIC1111's ``prompt_parser.parse_prompt_attention`` (``(word)`` x1.1,
``[word]`` /1.1, ``(word:1.3)``, ``\\(`` escapes, ``BREAK``). ``token_windows`` splits token ids into
75-token windows, each later framed by BOS/EOS and padded like a prompt of its own, as A1111,
ComfyUI and compel do for prompts beyond 77 tokens.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from clipcond.specs import BOS_ID, EOS_ID

WeightStyle = Literal["a1111", "comfy"]
BREAK = None  # a fragment weight of None marks A1111's BREAK: start a new window

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


def parse_emphasis(text: str) -> list[tuple[str, float | None]]:
    """``"a (red:1.3) cat"`` -> ``[("a ", 1.0), ("red", 1.3), (" cat", 1.0)]``; BREAK gives ``("", None)``."""
    res: list[list] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def multiply(start: int, factor: float) -> None:
        for item in res[start:]:
            if item[1] is not BREAK:
                item[1] *= factor

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
                    res.append(["", BREAK])
                res.append([part, 1.0])
    for start in round_open:  # unbalanced brackets still apply, as in A1111
        multiply(start, ROUND)
    for start in square_open:
        multiply(start, SQUARE)
    merged: list[list] = []
    for item in res or [["", 1.0]]:
        if merged and merged[-1][1] == item[1] and item[1] is not BREAK:
            merged[-1][0] += item[0]
        else:
            merged.append(item)
    return [(t, w) for t, w in merged]


def plain_text(fragments: Sequence[tuple[str, float | None]]) -> str:
    """The prompt without its syntax (the pooled vector is read from this, compel#96)."""
    return " ".join(" ".join(t for t, w in fragments if w is not BREAK).split())


@dataclass(frozen=True, slots=True)
class Windows:
    """A batch cut into ``k`` windows of ``length`` tokens per prompt."""

    ids: torch.Tensor  # [B * k, L], window-major within each prompt
    eos: torch.Tensor  # [B * k]
    weights: torch.Tensor  # [B * k, L] float32, 1.0 on BOS/EOS/padding
    k: int


def split_windows(
    fragments: Sequence[tuple[list[int], float | None]], room: int
) -> list[tuple[list[int], list[float]]]:
    """Token-id fragments with weights -> windows of at most ``room`` tokens (BREAK closes one)."""
    windows: list[tuple[list[int], list[float]]] = [([], [])]
    for ids, weight in fragments:
        if weight is BREAK:
            windows.append(([], []))
            continue
        for token in ids:
            if len(windows[-1][0]) == room:
                windows.append(([], []))
            windows[-1][0].append(token)
            windows[-1][1].append(weight)
    return windows


def token_windows(
    prompts: Sequence[Sequence[tuple[str, float | None]]],
    encode: Callable[[list[str]], list[list[int]]],
    *,
    length: int,
    pad_id: int,
    k: int | None = None,
) -> Windows:
    """Tokenize fragments with ``encode`` and frame each window as its own prompt: BOS ... EOS pad."""
    texts = [text for fragments in prompts for text, w in fragments if w is not BREAK]
    encoded = iter(encode(texts))
    per_prompt = [split_windows([([] if w is BREAK else next(encoded), w) for _, w in fragments], length - 2)
                  for fragments in prompts]
    k = max([k or 1, *(len(w) for w in per_prompt)])
    ids = torch.full((len(prompts) * k, length), pad_id, dtype=torch.long)
    weights = torch.ones(len(prompts) * k, length)
    for p, windows in enumerate(per_prompt):
        for j, (tokens, token_weights) in enumerate(windows):
            row = p * k + j
            ids[row, : len(tokens) + 2] = torch.tensor([BOS_ID, *tokens, EOS_ID])
            weights[row, 1 : len(tokens) + 1] = torch.tensor(token_weights)
        for j in range(len(windows), k):  # pad the batch to k windows with empty ones
            ids[p * k + j, :2] = torch.tensor([BOS_ID, EOS_ID])
    eos = (ids == EOS_ID).int().argmax(dim=1)
    return Windows(ids=ids, eos=eos, weights=weights, k=k)


def apply_weights(z: torch.Tensor, weights: torch.Tensor, *, style: WeightStyle, empty: torch.Tensor) -> torch.Tensor:
    """Per-token prompt weights on ``z`` [N, L, W] (``weights`` [N, L], ``empty`` [1, L, W])."""
    w = weights.to(z.dtype)[..., None]  # [N, L, 1]
    if style == "a1111":
        mean = z.mean(dim=(1, 2), keepdim=True)  # [N, 1, 1]
        weighted = z * w
        weighted = weighted * (mean / weighted.mean(dim=(1, 2), keepdim=True))
        # Windows without emphasis stay bit-exact (and a zero-mean window cannot turn into NaN).
        return torch.where((w == 1).all(dim=1, keepdim=True), z, weighted)
    # Weight 1 keeps z bit-exact: z_empty + 1 * (z - z_empty) is not z in floating point.
    return torch.where(w == 1, z, empty + w * (z - empty))
