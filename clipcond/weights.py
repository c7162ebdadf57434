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
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch

from clipcond.convert import HF_TEXT, OPENCLIP_IGNORED_PREFIXES, OPENCLIP_TEXT, Rule, convert_state, count_blocks
from clipcond.errors import WeightsError
from clipcond.specs import EncoderSpec, TowerSpec
from clipcond.store import SAFETENSORS_DTYPES, raw_bytes

logger = logging.getLogger(__name__)

SAFE_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
# In preference order: safetensors first, full precision before the fp16 variant.
HF_WEIGHT_FILES = ("model.safetensors", "model.fp16.safetensors", "pytorch_model.bin", "pytorch_model.fp16.bin")
HF_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


@dataclass(frozen=True, slots=True)
class Component:
    """One text tower inside a checkpoint: which embedder, under which key prefix, in which layout."""

    kind: str  # "hf": ldm/sgm FrozenCLIPEmbedder (CLIP ViT-L); "open_clip": FrozenOpenCLIPEmbedder(2)
    prefix: str
    layout: str  # "hf" or "open_clip": the key table


# Format detection: one table of signature key prefixes, checked in order.
FORMATS: dict[str, tuple[str, str, tuple[Component, ...]]] = {
    "sdxl": ("an SDXL single-file checkpoint", "conditioner.embedders.1.model.", (
        Component("hf", "conditioner.embedders.0.transformer.", "hf"),
        Component("open_clip", "conditioner.embedders.1.model.", "open_clip"))),
    "sd2": ("an SD 2.x single-file checkpoint", "cond_stage_model.model.", (
        Component("open_clip", "cond_stage_model.model.", "open_clip"),)),
    "sd1": ("an SD 1.x single-file checkpoint", "cond_stage_model.transformer.", (
        Component("hf", "cond_stage_model.transformer.", "hf"),)),
    "open_clip": ("an open_clip checkpoint", "transformer.resblocks.", (
        Component("open_clip", "", "open_clip"),)),
    "hf": ("a transformers CLIP text-model file", "text_model.encoder.layers.", (Component("*", "", "hf"),)),
    "hf5": ("a transformers CLIP text-model file", "encoder.layers.", (Component("*", "", "hf"),)),
}
TABLES: dict[str, dict[str, Rule | None]] = {"hf": HF_TEXT, "open_clip": OPENCLIP_TEXT}
HF_ANY = Component("*", "", "hf")  # a transformers file or folder: any tower, in HF layout
# Full CLIP checkpoints hold the image tower too; a conditioner ignores it.
IGNORED_PREFIXES = {"hf": ("vision_model.", "visual_projection.", "logit_scale"),
                    "open_clip": OPENCLIP_IGNORED_PREFIXES}


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
        size = os.fstat(self.file.fileno()).st_size
        try:
            n = int.from_bytes(self.file.read(8), "little")
            if not 2 <= n <= size - 8:
                raise ValueError(f"header length {n} does not fit the file's {size} bytes")
            header = json.loads(self.file.read(n))
            self.start = 8 + n
            codes = {code: dtype for dtype, code in SAFETENSORS_DTYPES.items()}
            self.tensors = {key: (codes[v["dtype"]], tuple(v["shape"]), tuple(v["data_offsets"]))
                            for key, v in header.items() if key != "__metadata__"}
        except (ValueError, KeyError, TypeError) as err:  # JSONDecodeError is a ValueError
            self.file.close()
            raise WeightsError(f"{path}: not a readable safetensors file ({type(err).__name__}: {err})") from err
        for key, (dtype, shape, (begin, end)) in self.tensors.items():
            if end - begin != dtype.itemsize * torch.Size(shape).numel() or self.start + end > size:
                self.file.close()
                raise WeightsError(f"{path}: tensor {key!r} ({dtype}, {list(shape)}) at bytes {begin}:{end} does not "
                                   f"fit the file ({size - self.start} data bytes): truncated or damaged")

    def keys(self) -> list[str]:
        return list(self.tensors)

    def read(self, key: str) -> torch.Tensor:
        dtype, shape, (begin, end) = self.tensors[key]
        out = torch.empty(shape, dtype=dtype)
        self.file.seek(self.start + begin)
        if self.file.readinto(raw_bytes(out)) != end - begin:  # straight into out's memory
            raise WeightsError(f"{self.path}: tensor {key!r} is cut short: the file changed while it was read")
        return out

    def close(self) -> None:
        self.file.close()


class StateReader:
    """Lazy, read-only access to the tensors of one or more checkpoint files (shards)."""

    def __init__(self, files: list[Path], stack: ExitStack) -> None:
        self.source = ", ".join(str(f) for f in files)
        self._read: dict[str, Callable[[], torch.Tensor]] = {}
        for file in files:
            self._open(file, stack)

    def _open(self, file: Path, stack: ExitStack) -> None:
        if file.suffix in SAFE_SUFFIXES:
            handle = SafetensorsFile(file)
            stack.callback(handle.close)
            for key in handle.keys():
                self._read[key] = lambda k=key, h=handle: h.read(k)
            return
        if file.suffix not in PICKLE_SUFFIXES:
            raise WeightsError(f"{file}: unknown weights file type {file.suffix!r}; "
                               f"expected one of {SAFE_SUFFIXES + PICKLE_SUFFIXES}")
        state = load_pickle(file)
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                self._read[key] = lambda v=value: v

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
    except pickle.UnpicklingError as err:
        raise WeightsError(f"{file}: refused: the pickle holds more than tensors (would run code on load); "
                           f"convert it to .safetensors from a trusted copy") from err
    for wrapper in ("state_dict", "model"):  # ldm checkpoints, some open_clip training checkpoints
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict):
        raise WeightsError(f"{file}: expected a state dict, got {type(state).__name__}")
    if state and all(k.startswith("module.") for k in state):  # saved from DistributedDataParallel
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def hf_weight_files(folder: Path) -> list[Path]:
    """The weight file(s) of a transformers model folder, safetensors first; shards via the index."""
    for name in HF_INDEX_FILES:
        if (folder / name).is_file():
            shards = sorted(set(json.loads((folder / name).read_text())["weight_map"].values()))
            return [folder / s for s in shards]
    for name in HF_WEIGHT_FILES:
        if (folder / name).is_file():
            return [folder / name]
    raise WeightsError(f"{folder}: no weights file; expected one of {list(HF_WEIGHT_FILES + HF_INDEX_FILES)}")


def tower_from_hf_config(tower: TowerSpec, folder: Path) -> TowerSpec:
    """The tower's sizes from a transformers ``config.json``: a name fixes semantics, not size."""
    path = folder / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise WeightsError(f"{path}: cannot read a transformers config: {err}") from err
    config = config.get("text_config", config)  # a full CLIPModel folder
    act = config.get("hidden_act", "quick_gelu")
    if act != tower.activation:
        # The one architectural fact that tells OpenAI CLIP (SD 1.x) from OpenCLIP (SD 2.x, SDXL bigG).
        raise WeightsError(f"{path}: hidden_act {act!r}, but tower {tower.name!r} is trained with "
                           f"{tower.activation!r}: these weights belong to another encoder")
    try:
        return tower.replace(
            width=config["hidden_size"], layers=config["num_hidden_layers"] + tower.hf_dropped_layers,
            heads=config["num_attention_heads"], mlp_width=config["intermediate_size"],
            vocab_size=config.get("vocab_size", 49408), context_length=config.get("max_position_embeddings", 77),
            projection_dim=config.get("projection_dim", tower.projection_dim) if tower.projection_dim else None,
        )
    except KeyError as err:
        raise WeightsError(f"{path}: config has no {err.args[0]!r}") from err


@dataclass(frozen=True, slots=True)
class TowerSource:
    """Where one tower's tensors are: files, key prefix, layout, and the tower sized to them."""

    tower: TowerSpec
    files: tuple[Path, ...]
    component: Component
    description: str


def load_towers(
    spec: EncoderSpec, weights: str | os.PathLike[str] | None, *, dtype: torch.dtype, revision: str | None = None
) -> list[tuple[TowerSpec, dict[str, torch.Tensor]]] | None:
    """Each tower of ``spec`` sized to the weights found, with its canonical state dict.

    ``None`` when ``spec`` names no weights at all (the ``tiny-*`` specs without ``weights=``).
    """
    if weights is None:
        if spec.hub_repo is None:
            return None
        weights = spec.hub_repo
    path = Path(weights).expanduser()
    if not path.exists():
        if not isinstance(weights, str) or weights.count("/") != 1 or weights.startswith((".", "/", "~")):
            raise WeightsError(f"weights={str(weights)!r}: no such file or folder, and not a hub repo id ('org/name')")
        path = download(spec, weights, revision=revision)
    with ExitStack() as stack:
        readers: dict[tuple[Path, ...], StateReader] = {}

        def reader(files: tuple[Path, ...]) -> StateReader:
            if files not in readers:
                readers[files] = StateReader(list(files), stack)
            return readers[files]

        sources = folder_sources(spec, path) if path.is_dir() else file_sources(spec, path, reader((path,)))
        return [(src.tower, read_tower(src, reader(src.files), dtype)) for src in sources]


def folder_sources(spec: EncoderSpec, folder: Path) -> list[TowerSource]:
    """Towers of a diffusers pipeline folder (``text_encoder*/``) or of one transformers model folder."""
    subfolders = [folder / t.hub_subfolder for t in spec.towers]
    if len(spec.towers) == 1 and (folder / "config.json").is_file() and not subfolders[0].is_dir():
        tower = tower_from_hf_config(spec.towers[0], folder)
        return [TowerSource(tower, tuple(hf_weight_files(folder)), HF_ANY, f"transformers folder {folder}")]
    sources = []
    for tower, sub in zip(spec.towers, subfolders, strict=True):
        if not (sub / "config.json").is_file():
            raise WeightsError(
                f"{folder}: no {sub.name}/config.json for tower {tower.name!r} of encoder {spec.name!r}; expected a "
                f"diffusers pipeline folder ({', '.join(t.hub_subfolder + '/' for t in spec.towers)}) "
                f"or a transformers model folder (config.json)")
        sources.append(TowerSource(tower_from_hf_config(tower, sub), tuple(hf_weight_files(sub)), HF_ANY, str(sub)))
    return sources


def file_sources(spec: EncoderSpec, file: Path, reader: StateReader) -> list[TowerSource]:
    """Towers of one checkpoint file, matched to the spec's towers by embedder kind."""
    description, _, components = FORMATS[detect_format(reader.keys(), str(file))]
    held = " + ".join("OpenCLIP" if c.kind == "open_clip" else "CLIP ViT-L" for c in components if c.kind != "*")
    sources, free = [], list(components)
    for tower in spec.towers:
        match = next((c for c in free if c.kind in ("*", tower.tokenizer)), None)
        if match is None:
            needs = " + ".join("OpenCLIP" if t.tokenizer == "open_clip" else "CLIP ViT-L" for t in spec.towers)
            raise WeightsError(f"{file} is {description} (text towers: {held or 'one, unnamed'}); "
                               f"encoder {spec.name!r} needs {needs}: these weights belong to another encoder")
        free.remove(match)
        sources.append(TowerSource(tower, (file,), match, f"{file} ({description})"))
    return sources


def read_tower(src: TowerSource, reader: StateReader, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Convert one tower's tensors into the canonical layout, cast to ``dtype`` one at a time."""
    from clipcond.model import TextTransformer

    layout, prefix = src.component.layout, src.component.prefix
    keys = {}  # layout key -> key in the file
    for key in reader.keys():
        if key.startswith(prefix):
            # Published HF files say text_model.embeddings...; transformers 5 saves embeddings...
            keys[key[len(prefix):].removeprefix("text_model.") if layout == "hf" else key[len(prefix):]] = key
    table = TABLES[layout]
    present = count_blocks(keys, table)
    stored = src.tower.layers - (src.tower.hf_dropped_layers if layout == "hf" else 0)
    if present != stored:
        raise WeightsError(f"{src.description}: holds {present} transformer blocks, tower {src.tower.name!r} "
                           f"expects {stored}: these weights belong to another encoder or size")
    with torch.device("meta"):
        expected = {k: v.shape for k, v in TextTransformer(src.tower).state_dict().items()}
    return convert_state(keys, lambda k: reader.read(keys[k]).to(dtype), table, expected, source=src.description,
                         ignored_prefixes=IGNORED_PREFIXES[layout] if not prefix else ())



def download(spec: EncoderSpec, repo: str, *, revision: str | None = None) -> Path:
    """Fetch only the text-encoder config and weights of a diffusers pipeline repo; cache first.

    Honours ``HF_HUB_OFFLINE``, ``HF_HOME`` and ``HF_HUB_CACHE`` through huggingface_hub.
    Returns the snapshot folder, laid out as a (partial) diffusers pipeline folder.
    """
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    root = None
    for tower in spec.towers:
        sub = tower.hub_subfolder
        try:
            root = Path(hf_hub_download(repo, "config.json", subfolder=sub, revision=revision)).parent.parent
        except LocalEntryNotFoundError as err:
            raise WeightsError(f"{repo}/{sub}: not in the local Hugging Face cache and the hub cannot be reached "
                               f"(HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '0')}); run "
                               f"`clipcond download {spec.name}` with network, or pass weights=PATH") from err
        for name in HF_WEIGHT_FILES:
            try:
                path = hf_hub_download(repo, name, subfolder=sub, revision=revision)
            except (EntryNotFoundError, LocalEntryNotFoundError):
                continue
            logger.info("%s/%s/%s: %.1f MB at %s", repo, sub, name, os.path.getsize(path) / 1e6, path)
            break
        else:
            raise WeightsError(f"{repo}/{sub}: none of {list(HF_WEIGHT_FILES)} found on the hub or in the cache")
    assert root is not None  # spec.towers is never empty
    return root
