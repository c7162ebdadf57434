"""clipcond: the frozen text conditioning of latent diffusion models, done once, right.

Names that need torch are imported on first use (PEP 562), so ``clipcond list`` stays instant.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import TYPE_CHECKING

from clipcond._version import __version__
from clipcond.encoders.names import get_spec
from clipcond.errors import WeightsError
from clipcond.registry import list_encoders, register_encoder
from clipcond.specs import EncoderSpec, SpecError, TowerSpec

if TYPE_CHECKING:
    from clipcond.conditioning import Conditioning
    from clipcond.encoders.conditioner import TextConditioner
    from clipcond.store.join import JoinedDataset, JoinedLoader, LengthGroupedSampler
    from clipcond.store.reader import EmbeddingStore
    from clipcond.text.tokenizer import ClipTokenizer, Tokens
    from clipcond.time_ids import added_cond_kwargs, sdxl_refiner_time_ids, sdxl_time_ids


_LAZY = {
    "TextConditioner": "clipcond.encoders.conditioner",
    "Conditioning": "clipcond.conditioning",
    "EmbeddingStore": "clipcond.store.reader",
    "JoinedDataset": "clipcond.store.join",
    "JoinedLoader": "clipcond.store.join",
    "LengthGroupedSampler": "clipcond.store.join",
    "ClipTokenizer": "clipcond.text.tokenizer",
    "Tokens": "clipcond.text.tokenizer",
    "added_cond_kwargs": "clipcond.time_ids",
    "sdxl_refiner_time_ids": "clipcond.time_ids",
    "sdxl_time_ids": "clipcond.time_ids",
}

__all__ = [
    "ClipTokenizer",
    "Conditioning",
    "EmbeddingStore",
    "EncoderSpec",
    "JoinedDataset",
    "JoinedLoader",
    "LengthGroupedSampler",
    "SpecError",
    "TextConditioner",
    "Tokens",
    "TowerSpec",
    "WeightsError",
    "__version__",
    "added_cond_kwargs",
    "get_spec",
    "list_encoders",
    "register_encoder",
    "sdxl_refiner_time_ids",
    "sdxl_time_ids",
]


def __getattr__(name: str) -> object:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'clipcond' has no attribute {name!r}")


def __dir__() -> list[str]:
    """The public names and the sub-modules imported so far; not this module's own imports."""
    modules = {n for n, v in globals().items() if isinstance(v, ModuleType) and v.__name__ == f"clipcond.{n}"}
    return sorted({*__all__, *(n for n in modules if not n.startswith("_"))})
