"""Text-encoder files from the Hugging Face hub, through the local cache first: only what a tower needs.

A diffusers pipeline repo gives its ``text_encoder*/`` folders (config and weights), an open_clip repo its
weights file and ``open_clip_config.json``, a transformers repo its config and, of a sharded CLIPModel, only
the shards with text tensors. ``HF_HUB_OFFLINE``, ``HF_HOME`` and ``HF_HUB_CACHE`` are honoured through
huggingface_hub.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

from clipcond.encoders.openclip import OPEN_CLIP_CONFIG, OPEN_CLIP_FILES
from clipcond.errors import WeightsError
from clipcond.specs import EncoderSpec

logger = logging.getLogger(__name__)

HF_WEIGHT_FILES = ("model.safetensors", "model.fp16.safetensors", "pytorch_model.bin", "pytorch_model.fp16.bin")
HF_INDEX_FILES = ("model.safetensors.index.json", "model.fp16.safetensors.index.json", "pytorch_model.bin.index.json")

HF_TEXT_PREFIXES = ("text_model.", "text_projection.", "embeddings.", "encoder.", "final_layer_norm.")


def index_shards(path: Path, wanted: Callable[[str], bool]) -> list[str]:
    """The shard files of a sharded checkpoint's index (``*.index.json``: ``{"weight_map": {tensor: shard}}``)
    that hold a tensor ``wanted`` takes, sorted; ``WeightsError`` naming the index if it is not one."""
    try:
        weight_map = json.loads(path.read_text(encoding="utf-8"))["weight_map"]  # UnicodeDecodeError: a ValueError
        shards = {shard for key, shard in weight_map.items() if wanted(key)}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise WeightsError(f"{path}: not a sharded checkpoint's index ({type(err).__name__}: {err})") from err
    if bad := [s for s in shards if not isinstance(s, str) or Path(s).name != s or not s]:
        raise WeightsError(f"{path}: its weight_map names {bad[0]!r:.80}, not a shard file beside it")
    return sorted(shards)


def hf_files(folder: Path, wanted: Callable[[str], bool]) -> list[Path] | None:
    """A transformers folder's weight files in preference order (an index first, safetensors first): the one file,
    or of a sharded checkpoint the shards holding a tensor ``wanted`` takes; None where it holds none."""
    for name in HF_INDEX_FILES:
        if (folder / name).is_file():
            return [folder / shard for shard in index_shards(folder / name, wanted)]
    return next(([folder / name] for name in HF_WEIGHT_FILES if (folder / name).is_file()), None)


def is_text_key(key: str) -> bool:
    """A text-tower tensor of a transformers CLIP file (of a CLIPModel: not the vision ones)."""
    return key.startswith(HF_TEXT_PREFIXES)


def text_shards(path: Path) -> list[str]:
    """Shards of a sharded transformers checkpoint holding text-tower tensors (of a CLIPModel: not the vision ones)."""
    return index_shards(path, is_text_key)

def download(spec: EncoderSpec, repo: str, *, revision: str | None = None,
             open_clip_files: tuple[str, ...] = OPEN_CLIP_FILES) -> Path:
    """Fetch only the text-encoder files of a hub repo; the local Hugging Face cache first.

    The repo may be a diffusers pipeline (``text_encoder*/``), an open_clip repo (for a single
    open_clip tower: ``open_clip_model.safetensors``, else the ``.bin``), or a transformers repo
    (``config.json`` beside the weights; of a sharded CLIPModel, only the shards with text tensors).
    Returns the snapshot folder, or the open_clip file. Honours ``HF_HUB_OFFLINE``, ``HF_HOME`` and
    ``HF_HUB_CACHE`` through huggingface_hub.
    """
    hub = Hub(repo, revision)
    if len(spec.towers) > 1:
        return hub.pipeline(spec)
    tower = spec.towers[0]
    attempts = [lambda: hub.pipeline(spec)]
    if tower.family == "open_clip":
        attempts.append(lambda: hub.open_clip(open_clip_files))
    attempts.append(hub.transformers)
    for attempt in attempts:
        found = attempt()
        if found is not None:
            return found
    layouts = [f"{tower.hub_subfolder}/config.json", *(open_clip_files if tower.family == "open_clip" else ()),
               "config.json with weights"]
    raise WeightsError(f"{repo}: none of {', '.join(layouts)} found on the hub or in the local Hugging Face cache "
                       f"(HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '0')}); run `clipcond download "
                       f"{spec.name}` with network, or pass weights=PATH")


class Hub:
    """One hub repo at one revision, read through huggingface_hub (cache first)."""

    def __init__(self, repo: str, revision: str | None) -> None:
        self.repo, self.revision = repo, revision

    def get(self, name: str, subfolder: str | None = None) -> Path | None:
        """A file of the repo, from the cache or downloaded; None if the repo (or the cache, offline) lacks it."""
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

        try:
            path = Path(hf_hub_download(self.repo, name, subfolder=subfolder, revision=self.revision))
        except (EntryNotFoundError, LocalEntryNotFoundError):
            return None
        logger.info("%s/%s: %.1f MB at %s", self.repo, f"{subfolder}/{name}" if subfolder else name,
                    path.stat().st_size / 1e6, path)
        return path

    def first(self, names: tuple[str, ...], subfolder: str | None = None) -> Path | None:
        return next((path for name in names if (path := self.get(name, subfolder)) is not None), None)

    def open_clip(self, names: tuple[str, ...]) -> Path | None:
        """An open_clip repo's weights file, and the open_clip_config.json beside it where the repo has one (it
        states the tower's size)."""
        for name in names:
            found = self.get(name)
            if found is not None:
                folder = str(Path(name).parent)
                self.get(OPEN_CLIP_CONFIG, None if folder == "." else folder)
                return found
        return None

    def pipeline(self, spec: EncoderSpec) -> Path | None:
        """A diffusers pipeline's text_encoder*/ folders: config and weights of each, nothing else."""
        root = None
        for tower in spec.towers:
            config = self.get("config.json", tower.hub_subfolder)
            if config is None:
                if len(spec.towers) == 1:
                    return None  # not a pipeline repo: the caller tries other layouts
                raise WeightsError(f"{self.repo}/{tower.hub_subfolder}/config.json: not on the hub, or not in the "
                                   f"local Hugging Face cache (HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '0')})"
                                   f"; run `clipcond download {spec.name}` with network, or pass weights=PATH")
            if self.first(HF_WEIGHT_FILES, tower.hub_subfolder) is None:
                raise WeightsError(f"{self.repo}/{tower.hub_subfolder}: none of {list(HF_WEIGHT_FILES)} found on the "
                                   f"hub or in the cache")
            root = config.parent.parent
        return root

    def transformers(self) -> Path | None:
        """A transformers repo's config and weights; of a sharded checkpoint only the shards with text tensors."""
        config = self.get("config.json")
        if config is None:
            return None
        for name in HF_INDEX_FILES:
            index = self.get(name)
            if index is not None:
                for shard in text_shards(index):
                    if self.get(shard) is None:
                        raise WeightsError(f"{self.repo}/{shard}: listed in {name} but not found")
                return config.parent
        if self.first(HF_WEIGHT_FILES) is None:
            raise WeightsError(f"{self.repo}: config.json but none of {list(HF_WEIGHT_FILES)}")
        return config.parent
