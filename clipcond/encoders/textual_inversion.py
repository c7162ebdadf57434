"""Textual-inversion embedding files: A1111 ``.pt``/``.safetensors``, diffusers ``learned_embeds``, SDXL.

Formats, as A1111's ``textual_inversion.py`` and diffusers' ``load_textual_inversion`` read them:
A1111 ``.pt`` (``string_to_param["*"]`` [n, W]), A1111 ``.safetensors`` (``emb_params``),
diffusers ``learned_embeds.safetensors``/``.bin`` (``{"<token>": [W] or [n, W]}``) and SDXL files
(``clip_l`` [n, 768] and ``clip_g`` [n, 1280]).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from clipcond.encoders.weights import PICKLE_SUFFIXES, load_pickle, load_safetensors
from clipcond.errors import WeightsError
from clipcond.specs import FAMILY_KEYS, TowerSpec


@dataclass(frozen=True, slots=True)
class Embedding:
    """The vectors of one new word, per tower kind ("clip_l", "clip_g") or by width ("*")."""

    token: str  # the trigger word; A1111 uses the file name, diffusers its key
    vectors: dict[str, torch.Tensor]  # [n, W] each

    def rows_for(self, tower: TowerSpec, path: object) -> torch.Tensor:
        """The vectors that belong to ``tower`` [n, W]: SDXL-style files by the tower's family, others by width."""
        key = FAMILY_KEYS[tower.family]
        candidates = [v for k, v in self.vectors.items() if k == key or (k == "*" and v.shape[-1] == tower.width)]
        if not candidates:
            widths = {k: v.shape[-1] for k, v in self.vectors.items()}
            raise WeightsError(f"{path}: no vectors for tower {tower.name!r} (width {tower.width}); the file holds "
                               f"{widths}: it was trained for another encoder")
        return candidates[0]


def load_embedding(path: str | os.PathLike[str], token: str | None = None) -> Embedding:
    """Read a textual-inversion file; ``token`` overrides the trigger word."""
    path = Path(path)
    if path.suffix == ".safetensors":
        state: dict[str, object] = dict(load_safetensors(path))
    elif path.suffix in PICKLE_SUFFIXES:
        state = load_pickle(path)
    else:
        raise WeightsError(f"{path}: unknown embedding file type {path.suffix!r}; expected .safetensors or "
                           f"one of {PICKLE_SUFFIXES}")
    name, found = path.stem, None  # found: {"*" or a FAMILY_KEYS value: (the key in the file, its value)}
    if isinstance(state.get("string_to_param"), dict):  # A1111 .pt
        found = {"*": ("string_to_param['*']", state["string_to_param"].get("*"))}
    elif "emb_params" in state:  # A1111 .safetensors
        found = {"*": ("emb_params", state["emb_params"])}
    elif {"clip_l", "clip_g"} <= set(state):  # SDXL
        found = {k: (k, state[k]) for k in ("clip_l", "clip_g")}
    elif len(state) == 1:  # diffusers learned_embeds: {"<token>": vectors}
        (name, vector), = state.items()
        found = {"*": (name, vector)}
    if found is None:
        raise WeightsError(f"{path}: not a textual-inversion file I know (keys: {sorted(map(str, state))[:10]}); "
                           f"expected string_to_param, emb_params, clip_l + clip_g, or one '<token>' key")
    for key, v in found.values():
        if not isinstance(v, torch.Tensor) or v.ndim not in (1, 2) or not v.numel():
            got = f"a tensor shaped {list(v.shape)}" if isinstance(v, torch.Tensor) else type(v).__name__
            raise WeightsError(f"{path}: {key!r} must hold vectors [W] or [n, W], got {got}")
    vectors = {k: v.detach().reshape(-1, v.shape[-1]) for k, (_, v) in found.items()}  # [W] -> [1, W]
    return Embedding(token=token or name, vectors=vectors)
