"""Find and read text-encoder weights wherever users keep them.

Resolution order (DESIGN.md): ``weights=`` a local diffusers pipeline folder, transformers
folder, open_clip checkpoint or SD 1.x / 2.x / SDXL single file; else the spec's hub repo,
served from the local Hugging Face cache when present, downloading only the text-encoder
files otherwise. ``.safetensors`` is read lazily (a 7 GB SDXL file costs only its text
tensors); pickles only through ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch

from clipcond._files import read_safetensors_header, read_tensor
from clipcond.encoders.convert import (
    HF_TEXT,
    OPENCLIP_IGNORED_PREFIXES,
    OPENCLIP_TEXT,
    Rule,
    convert_state,
    count_blocks,
)
from clipcond.encoders.hub import HF_INDEX_FILES, HF_WEIGHT_FILES, download, hf_files, is_text_key
from clipcond.encoders.openclip import OPEN_CLIP_CONFIG, OPEN_CLIP_FILES, text_tower_problems, text_tower_sizes
from clipcond.errors import WeightsError
from clipcond.specs import VOCAB_SIZE, EncoderSpec, TowerSpec

logger = logging.getLogger(__name__)

SAFE_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


@dataclass(frozen=True, slots=True)
class Component:
    """One text tower inside a checkpoint: its model family, key prefix and key layout."""

    family: str  # a TowerSpec.family, or "*": any tower (a file of one unnamed tower)
    prefix: str
    layout: str  # "hf" or "open_clip": the key table


# Format detection: one table of signature key prefixes, checked in order.
FORMATS: dict[str, tuple[str, str, tuple[Component, ...]]] = {
    "sdxl": ("an SDXL single-file checkpoint", "conditioner.embedders.1.model.", (
        Component("clip", "conditioner.embedders.0.transformer.", "hf"),
        Component("open_clip", "conditioner.embedders.1.model.", "open_clip"))),
    "sd2": ("an SD 2.x single-file checkpoint", "cond_stage_model.model.", (
        Component("open_clip", "cond_stage_model.model.", "open_clip"),)),
    "sd1": ("an SD 1.x single-file checkpoint", "cond_stage_model.transformer.", (
        Component("clip", "cond_stage_model.transformer.", "hf"),)),
    "open_clip": ("an open_clip checkpoint", "transformer.resblocks.", (
        Component("*", "", "open_clip"),)),
    # open_clip's CustomTextCLIP (custom_text=True configs: EVA, ViTamin, MobileCLIP) keeps the tower under text.
    "open_clip_custom_text": ("an open_clip checkpoint (CustomTextCLIP)", "text.transformer.resblocks.", (
        Component("*", "text.", "open_clip"),)),
    "hf": ("a transformers CLIP text-model file", "text_model.encoder.layers.", (Component("*", "", "hf"),)),
    "hf5": ("a transformers CLIP text-model file", "encoder.layers.", (Component("*", "", "hf"),)),
}
TABLES: dict[str, dict[str, Rule | None]] = {"hf": HF_TEXT, "open_clip": OPENCLIP_TEXT}
HF_ANY = Component("*", "", "hf")  # a transformers file or folder: any tower, in HF layout
# Full CLIP checkpoints hold the image tower too; a conditioner ignores it.
IGNORED_PREFIXES = {"hf": ("vision_model.", "visual_projection.", "logit_scale"),
                    "open_clip": OPENCLIP_IGNORED_PREFIXES}
FAMILY_NAMES = {"clip": "CLIP ViT-L", "open_clip": "OpenCLIP"}


def detect_format(keys: list[str], source: str) -> str:
    """The FORMATS name whose signature prefix some key carries."""
    for name, (_, signature, _) in FORMATS.items():
        if any(k.startswith(signature) for k in keys):
            return name
    raise WeightsError(f"{source}: not a CLIP text-encoder checkpoint I know: no key starts with any of "
                       f"{[sig for _, sig, _ in FORMATS.values()]} (first keys: {keys[:5]})")


class SafetensorsFile:
    """Tensors of a ``.safetensors`` file, each read on demand with plain reads into its own memory.

    Not memory-mapped: a mapping keeps every page read resident in the process, so the pieces
    that are converted (q, k and v fused into one tensor, a dtype cast) would be held twice, as
    the new tensor and as mapped file pages. Read this way, the loaded weights are the only copy.
    """

    def __init__(self, path: Path) -> None:
        self.path, self.file = path, open(path, "rb")  # noqa: SIM115 (closed by close())
        try:
            header = read_safetensors_header(self.file, path)
        except ValueError as err:  # a damaged or foreign file: its message names the file and the tensor
            self.file.close()
            raise WeightsError(str(err)) from err
        self.header, self.tensors = header, header.tensors

    def keys(self) -> list[str]:
        return list(self.tensors)

    def read(self, key: str) -> torch.Tensor:
        try:
            return read_tensor(self.file, self.header, key, self.path)
        except ValueError as err:
            raise WeightsError(str(err)) from err

    def close(self) -> None:
        self.file.close()


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a small ``.safetensors`` file (an embedding), read as ``SafetensorsFile`` reads them."""
    handle = SafetensorsFile(path)
    try:
        return {key: handle.read(key) for key in handle.keys()}
    finally:
        handle.close()


class StateReader:
    """Lazy, read-only access to the tensors of one or more checkpoint files (shards)."""

    def __init__(self, files: list[Path], stack: ExitStack) -> None:
        self._read: dict[str, Callable[[], torch.Tensor]] = {}
        for file in files:
            self._open(file, stack)

    def _open(self, file: Path, stack: ExitStack) -> None:
        if file.suffix in SAFE_SUFFIXES:
            handle = SafetensorsFile(file)
            stack.callback(handle.close)
            readers = {key: lambda k=key, h=handle: h.read(k) for key in handle.keys()}
        elif file.suffix in PICKLE_SUFFIXES:
            state = load_pickle(file)
            readers = {key: lambda v=value: v for key, value in state.items() if isinstance(value, torch.Tensor)}
        else:
            raise WeightsError(f"{file}: unknown weights file type {file.suffix!r}; "
                               f"expected one of {SAFE_SUFFIXES + PICKLE_SUFFIXES}")
        if not readers:  # said here, not as a tower of the wrong size or an unknown format
            raise WeightsError(f"{file}: the file holds no tensors")
        self._read.update(readers)

    def keys(self) -> list[str]:
        return list(self._read)

    def read(self, key: str) -> torch.Tensor:
        return self._read[key]()


def load_pickle(file: Path) -> dict[str, object]:
    """A pickled state dict, refusing anything but tensors and plain containers."""
    logger.warning("%s: pickled weights; prefer .safetensors (loading with weights_only=True)", file)
    try:
        try:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # a legacy (non-zip) file cannot be memory-mapped
            state = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # the weights-only unpickler's error (a damaged pickle can raise it too)
        raise WeightsError(f"{file}: refused: the pickle holds more than tensors (would run code on load); "
                           f"convert it to .safetensors from a trusted copy") from err
    except (RuntimeError, ValueError, KeyError, EOFError) as err:  # what a damaged zip or pickle raises in torch.load
        raise WeightsError(f"{file}: not a readable torch.save file ({type(err).__name__}: {err})") from err
    for wrapper in ("state_dict", "model"):  # ldm checkpoints, some open_clip training checkpoints
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise WeightsError(f"{file}: expected a state dict (names to tensors), got {type(state).__name__}"
                           f"{'' if not isinstance(state, dict) else ' with keys that are not str'}")
    if state and all(k.startswith("module.") for k in state):  # saved from DistributedDataParallel
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def hf_weight_files(folder: Path) -> list[Path]:
    """The weight file(s) of a transformers model folder, safetensors first; of shards, those with text tensors."""
    files = hf_files(folder, is_text_key)
    if files is not None:
        return files
    raise WeightsError(f"{folder}: no weights file; expected one of {list(HF_WEIGHT_FILES + HF_INDEX_FILES)}")


def tower_from_hf_config(tower: TowerSpec, folder: Path, reader: StateReader | None) -> TowerSpec:
    """The tower's sizes from a transformers ``config.json``: a name fixes semantics, not size. With no
    ``reader`` the config describes another copy of the same full tower (a laion repo's open_clip file)."""
    path = folder / "config.json"
    try:
        full = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise WeightsError(f"{path}: cannot read a transformers config: {err}") from err
    config = full.get("text_config", full) if isinstance(full, dict) else None  # CLIPModel: projection at the top
    if not isinstance(config, dict):
        raise WeightsError(f"{path}: a transformers config is a JSON object, got {type(config).__name__}")
    act = config.get("hidden_act", "quick_gelu")
    if act != tower.activation:
        # The one architectural fact that tells OpenAI CLIP (SD 1.x) from OpenCLIP (SD 2.x, SDXL bigG).
        raise WeightsError(f"{path}: hidden_act {act!r}, but tower {tower.name!r} is trained with "
                           f"{tower.activation!r}: these weights belong to another encoder")
    try:
        stored, width = config["num_hidden_layers"], config["hidden_size"]
        dropped = 0 if reader is None else dropped_layers(tower, stored, width, folder, reader)
        return tower.replace(
            width=width, layers=stored + dropped, hf_dropped_layers=dropped,
            heads=config["num_attention_heads"], mlp_width=config["intermediate_size"],
            vocab_size=config.get("vocab_size", VOCAB_SIZE), context_length=config.get("max_position_embeddings", 77),
            projection_dim=full.get("projection_dim", tower.projection_dim) if tower.projection_dim else None,
        )
    except KeyError as err:
        raise WeightsError(f"{path}: config has no {err.args[0]!r}") from err


def dropped_layers(tower: TowerSpec, stored: int, width: int, folder: Path, reader: StateReader) -> int:
    """How many final blocks a transformers folder leaves out: diffusers' SD2 copy 1, a full tower 0.

    From the weights: a reference-size tower says it by its block count (ViT-H: 23 or 24); a
    text projection is never in diffusers' copy (a CLIPTextModel); a folder of a diffusers pipeline
    (model_index.json beside it) is that copy. Anything else cannot be told apart: an error.
    """
    if tower.hf_dropped_layers is not None:  # the spec's fact, or the user's override
        return tower.hf_dropped_layers
    if width == tower.width and stored in (tower.layers, tower.layers - 1):
        return tower.layers - stored
    if any(k.removeprefix("text_model.").startswith("text_projection.") for k in reader.keys()):
        return 0
    if (folder.parent / "model_index.json").is_file():
        return 1
    raise WeightsError(
        f"{folder}: a {stored}-block, {width}-wide transformers tower for {tower.name!r}, which diffusers ships "
        f"without its last block (SD 2.x text_encoder/); these weights cannot tell whether that block was left out. "
        f"Pass hf_dropped_layers=1 if they are such a copy (read at its last block), hf_dropped_layers=0 if they are "
        f"the full tower (read at its penultimate block)")


@dataclass(frozen=True, slots=True)
class TowerSource:
    """Where one tower's tensors are: files, key prefix, layout, and the tower sized to them."""

    tower: TowerSpec
    files: tuple[Path, ...]
    component: Component
    description: str


def load_towers(
    spec: EncoderSpec, weights: str | os.PathLike[str] | None, *, dtype: torch.dtype, revision: str | None = None,
    open_clip_files: tuple[str, ...] = OPEN_CLIP_FILES,
) -> list[tuple[TowerSpec, dict[str, torch.Tensor]]] | None:
    """Each tower of ``spec`` sized to the weights found, with its canonical state dict.

    ``None`` when ``spec`` names no weights at all (the ``tiny-*`` specs without ``weights=``).
    ``open_clip_files``: the file names an open_clip hub repo is searched for (a tag may name one).
    """
    if weights is None:
        if spec.hub_repo is None:
            return None
        weights = spec.hub_repo
    path = Path(weights).expanduser()
    if not path.exists():
        if not isinstance(weights, str) or weights.count("/") != 1 or weights.startswith((".", "/", "~")):
            raise WeightsError(f"weights={str(weights)!r}: no such file or folder, and not a hub repo id ('org/name')")
        path = download(spec, weights, revision=revision, open_clip_files=open_clip_files)
    with ExitStack() as stack:
        readers: dict[tuple[Path, ...], StateReader] = {}

        def reader(files: tuple[Path, ...]) -> StateReader:
            if files not in readers:
                readers[files] = StateReader(list(files), stack)
            return readers[files]

        if path.is_file() and len(spec.towers) == 1 and path.name in open_clip_files:
            # an open_clip repo's file, downloaded or in a clone: sized by the configs beside it, as the folder is
            spec = spec.replace(towers=(open_clip_folder_tower(spec.towers[0], path.parent, reader((path,))),))

        sources = folder_sources(spec, path, reader) if path.is_dir() else file_sources(spec, path, reader((path,)))
        return [(src.tower, read_tower(src, reader(src.files), dtype)) for src in sources]


def folder_sources(spec: EncoderSpec, folder: Path, reader: Callable[[tuple[Path, ...]], StateReader]
                   ) -> list[TowerSource]:
    """Towers of a diffusers pipeline folder (``text_encoder*/``), a transformers model folder (CLIPModel
    included) or a folder holding an open_clip checkpoint (a clone of an open_clip hub repo)."""
    subfolders = [folder / t.hub_subfolder for t in spec.towers]
    if len(spec.towers) == 1 and not subfolders[0].is_dir():
        single = single_tower_file(spec, folder)
        if single is not None:
            tower = open_clip_folder_tower(spec.towers[0], folder, reader((single,)))
            return file_sources(spec.replace(towers=(tower,)), single, reader((single,)))
        if (folder / "config.json").is_file():
            files = tuple(hf_weight_files(folder))
            tower = tower_from_hf_config(spec.towers[0], folder, reader(files))
            return [TowerSource(tower, files, HF_ANY, f"{', '.join(map(str, files))} (a transformers folder)")]
    sources = []
    for tower, sub in zip(spec.towers, subfolders, strict=True):
        if not (sub / "config.json").is_file():
            raise WeightsError(
                f"{folder}: no {sub.name}/config.json for tower {tower.name!r} of encoder {spec.name!r}; expected a "
                f"diffusers pipeline folder ({', '.join(t.hub_subfolder + '/' for t in spec.towers)}), a "
                f"transformers model folder (config.json) or an open_clip checkpoint ({', '.join(OPEN_CLIP_FILES)})")
        files = tuple(hf_weight_files(sub))
        sources.append(TowerSource(tower_from_hf_config(tower, sub, reader(files)), files, HF_ANY,
                                   ", ".join(map(str, files))))
    return sources


def single_tower_file(spec: EncoderSpec, folder: Path) -> Path | None:
    """The open_clip checkpoint of a folder that is a clone of an open_clip hub repo, for open_clip towers.

    Such repos (laion's) also hold a transformers copy: an open_clip tower reads open_clip's own file.
    """
    if spec.towers[0].family != "open_clip" and (folder / "config.json").is_file():
        return None
    return next((folder / f for f in OPEN_CLIP_FILES if (folder / f).is_file()), None)


def open_clip_folder_tower(tower: TowerSpec, folder: Path, reader: StateReader) -> TowerSpec:
    """The tower of an open_clip checkpoint in a folder (``reader``: the checkpoint), sized by the
    open_clip_config.json beside it (laion's repos), else by the CLIPModel config.json there where it states the
    checkpoint's own block count and width (a laion clone: the same model in transformers' layout; not another
    model's config in a shared folder); else by the spec, as a lone checkpoint file."""
    config = folder / OPEN_CLIP_CONFIG
    if config.is_file():
        return tower_from_open_clip_config(tower, config)
    if not is_clip_model_config(folder / "config.json"):
        return tower
    try:
        sized = tower_from_hf_config(tower, folder, None)
    except WeightsError:  # another encoder's config: it says nothing of this file
        return tower
    return sized if (sized.layers, sized.width) == open_clip_text_shape(reader) else tower


def open_clip_text_shape(reader: StateReader) -> tuple[int, int] | None:
    """(blocks, width) of an open_clip checkpoint's text tower, from its keys and ``ln_final``; None if unknown."""
    blocks = [int(m[1]) for key in reader.keys() if (m := _RESBLOCK.match(key))]
    final = next((key for key in ("ln_final.weight", "text.ln_final.weight") if key in reader.keys()), None)
    return (max(blocks) + 1, reader.read(final).shape[0]) if blocks and final else None


_RESBLOCK = re.compile(r"(?:text\.)?transformer\.resblocks\.(\d+)\.")


def is_clip_model_config(path: Path) -> bool:
    """Whether ``path`` is a transformers CLIPModel config (one with a ``text_config``), which states the sizes."""
    try:
        return isinstance(json.loads(path.read_text()).get("text_config"), dict)
    except (OSError, ValueError, AttributeError):  # absent, not JSON, not an object: it states nothing
        return False


def tower_from_open_clip_config(tower: TowerSpec, path: Path) -> TowerSpec:
    """The tower's sizes from an open_clip hub repo's ``open_clip_config.json``, as from a ``config.json``."""
    try:
        model_cfg = json.loads(path.read_text()).get("model_cfg")
    except (OSError, ValueError, AttributeError) as err:  # JSONDecodeError is a ValueError
        raise WeightsError(f"{path}: cannot read an open_clip config: {err}") from err
    if not isinstance(model_cfg, dict) or not isinstance(model_cfg.get("text_cfg"), dict):
        raise WeightsError(f"{path}: an open_clip config holds {{'model_cfg': {{'text_cfg': {{...}}, ...}}}}, got "
                           f"model_cfg {model_cfg!r:.80}")
    problems = text_tower_problems(model_cfg)
    if problems:
        raise WeightsError(f"{path}: its text tower {'; '.join(problems)} (clipcond runs CLIP text transformers "
                           f"with the CLIP BPE)")
    sizes = text_tower_sizes(model_cfg)
    if sizes["activation"] != tower.activation:
        raise WeightsError(f"{path}: activation {sizes['activation']!r}, but tower {tower.name!r} is trained with "
                           f"{tower.activation!r}: these weights belong to another encoder")
    return tower.replace(**sizes | {"projection_dim": sizes["projection_dim"] if tower.projection_dim else None})


def file_sources(spec: EncoderSpec, file: Path, reader: StateReader) -> list[TowerSource]:
    """Towers of one checkpoint file, matched to the spec's towers by embedder kind."""
    description, _, components = FORMATS[detect_format(reader.keys(), str(file))]
    held = " + ".join(FAMILY_NAMES[c.family] for c in components if c.family != "*")
    sources, free = [], list(components)
    for tower in spec.towers:
        match = next((c for c in free if c.family in ("*", tower.family)), None)
        if match is None:
            needs = " + ".join(FAMILY_NAMES[t.family] for t in spec.towers)
            raise WeightsError(f"{file} is {description} (text towers: {held or 'one, unnamed'}); "
                               f"encoder {spec.name!r} needs {needs}: these weights belong to another encoder")
        free.remove(match)
        sources.append(TowerSource(tower, (file,), match, f"{file} ({description})"))
    return sources


def read_tower(src: TowerSource, reader: StateReader, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Convert one tower's tensors into the canonical layout, cast to ``dtype`` one at a time."""
    from clipcond.encoders.model import TextTransformer

    layout, prefix = src.component.layout, src.component.prefix
    keys = {}  # layout key -> key in the file
    for key in reader.keys():
        if key.startswith(prefix):
            # Published HF files say text_model.embeddings...; transformers 5 saves embeddings...
            keys[key[len(prefix):].removeprefix("text_model.") if layout == "hf" else key[len(prefix):]] = key
    table = TABLES[layout]
    present = count_blocks(keys, table)
    stored = src.tower.layers - (src.tower.hf_dropped_layers or 0 if layout == "hf" else 0)
    if present != stored:
        raise WeightsError(f"{src.description}: holds {present} transformer blocks, tower {src.tower.name!r} "
                           f"expects {stored}: these weights belong to another encoder or size")
    with torch.device("meta"):
        expected = {k: v.shape for k, v in TextTransformer(src.tower).state_dict().items()}

    def read(key: str) -> torch.Tensor:
        tensor = reader.read(keys[key])
        if not tensor.is_floating_point():  # cast silently, an I32 for F32 would be wrong numbers (a damaged dtype)
            raise WeightsError(f"{src.description}: tensor {keys[key]!r} is {tensor.dtype}, not floating point")
        return tensor.to(dtype)

    return convert_state(keys, read, table, expected, source=src.description,
                         ignored_prefixes=IGNORED_PREFIXES[layout] if not prefix else ())
