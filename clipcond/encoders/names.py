"""Encoder names to specs: the registry (clipcond/registry.py) and ``open_clip:MODEL`` names.

``open_clip:MODEL`` specs are built from open_clip's bundled configs, which imports open_clip (and torch):
only when such a name is asked for, so that ``clipcond list`` stays instant.
"""

from __future__ import annotations

import os

from clipcond.registry import OPEN_CLIP_PREFIX, lookup_spec
from clipcond.specs import EncoderSpec


def get_spec(name: str | os.PathLike[str] | EncoderSpec) -> EncoderSpec:
    """The spec for ``name``: a registered name or alias, ``open_clip:MODEL`` (any qualifying
    ``open_clip.list_models()`` name), or a spec JSON file; a spec passes through unchanged."""
    if isinstance(name, str) and name.lower().startswith(OPEN_CLIP_PREFIX):
        from clipcond.encoders.openclip import open_clip_spec

        return open_clip_spec(name[len(OPEN_CLIP_PREFIX):])
    return lookup_spec(name)
