"""clipcond: the frozen CLIP text conditioning of Stable Diffusion 1.x, 2.x and SDXL, done once, right.

Names that need torch are imported on first use (PEP 562), so ``clipcond list`` stays instant.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from clipcond.errors import WeightsError
from clipcond.specs import EncoderSpec, SpecError, TowerSpec, get_spec, list_encoders

if TYPE_CHECKING:
    from clipcond.conditioner import TextConditioner
    from clipcond.conditioning import Conditioning
    from clipcond.dataset import EmbeddingStore
    from clipcond.sdxl import added_cond_kwargs, sdxl_refiner_time_ids, sdxl_time_ids
    from clipcond.tokenizer import ClipTokenizer, Tokens

__version__ = "0.1.0"

_LAZY = {
    "TextConditioner": "clipcond.conditioner",
    "Conditioning": "clipcond.conditioning",
    "EmbeddingStore": "clipcond.dataset",
    "ClipTokenizer": "clipcond.tokenizer",
    "Tokens": "clipcond.tokenizer",
    "added_cond_kwargs": "clipcond.sdxl",
    "sdxl_refiner_time_ids": "clipcond.sdxl",
    "sdxl_time_ids": "clipcond.sdxl",
}

__all__ = [
    "ClipTokenizer",
    "Conditioning",
    "EmbeddingStore",
    "EncoderSpec",
    "SpecError",
    "TextConditioner",
    "Tokens",
    "TowerSpec",
    "WeightsError",
    "__version__",
    "added_cond_kwargs",
    "get_spec",
    "list_encoders",
    "sdxl_refiner_time_ids",
    "sdxl_time_ids",
]


def __getattr__(name: str) -> object:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'clipcond' has no attribute {name!r}")
