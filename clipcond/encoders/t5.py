"""The T5 encoder of SD3, Flux, PixArt and Chroma (transformers' ``T5EncoderModel``) and AuraFlow's UMT5
(``UMT5EncoderModel``), with clipcond's weights reading, dtype policy and tokenization around it.

The forward is transformers' (a well-kept implementation; the pipelines run exactly it). clipcond owns:

- the weights: a diffusers pipeline's ``text_encoder_3/`` (SD3), ``text_encoder_2/`` (Flux) or
  ``text_encoder/`` (PixArt), or a transformers T5 folder; sharded safetensors through their index, only the
  shards holding encoder tensors opened; read strictly (missing or unexpected keys name themselves);
- the dtype policy: with float16 the feed-forward output projections (``wo``) stay float32 whatever the
  caller casts afterwards. T5 v1.1's ``wo`` outputs overflow float16 (transformers#20287); transformers keeps
  them float32 only while loading with ``torch_dtype`` (``_keep_in_fp32_modules``), and a later ``.half()``
  brings the overflow back (diffusers#8604: corrupted images). ``T5Tower._apply`` restores them;
- fp8 files (ComfyUI's ``t5xxl_fp8_e4m3fn.safetensors`` and its scaled variant): the Linear weights stay fp8 in
  memory and each block's are upcast for that block's forward only (``Fp8Blocks``), as ComfyUI computes them;
- the tokenization (clipcond/text/t5_tokens.py): the pipeline's own tokenizer called as diffusers calls it.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from clipcond._files import SafetensorsHeader, read_safetensors_header, read_tensor
from clipcond.encoders.convert import summary
from clipcond.encoders.hub import HF_INDEX_FILES, HF_WEIGHT_FILES, hf_files
from clipcond.encoders.weights import load_pickle
from clipcond.errors import WeightsError
from clipcond.specs import T5TowerSpec

logger = logging.getLogger(__name__)

# In preference order (transformers' names, as every CLIP folder); the pickles (google/t5-v1_1-xxl's main branch
# holds only those) through torch.load(weights_only=True), memory-mapped.
WEIGHT_FILES, INDEX_FILES = HF_WEIGHT_FILES, HF_INDEX_FILES
# Tensors of a full T5 (T5ForConditionalGeneration: google/t5-v1_1-xxl) that an encoder never reads.
IGNORED_PREFIXES = ("decoder.", "lm_head.")
# Tied to shared.weight in T5EncoderModel: files hold either key (transformers saves one of them).
TIED = "encoder.embed_tokens.weight"
# ComfyUI's fp8 text-encoder files. Plain fp8 (t5xxl_fp8_e4m3fn.safetensors): the Linear weights are F8_E4M3, the
# embedding and norms F16. Scaled fp8 (t5xxl_fp8_e4m3fn_scaled.safetensors): also a "scaled_fp8" marker tensor (its
# dtype names the fp8 type) and, per Linear, "<linear>.scale_weight", a float32 scalar: the weight is
# fp8.to(compute) * scale_weight.to(compute) (ComfyUI's scaled_fp8_ops; a Linear without one has scale 1).
# "<linear>.scale_input" scales activations only on ComfyUI's fp8-matmul path: not read.
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
SCALED_FP8_MARKER = "scaled_fp8"
LINEAR_WEIGHT = re.compile(r"\.(SelfAttention\.[qkvo]|DenseReluDense\.(wi|wi_0|wi_1|wo))\.weight$")
CONFIG_SIZES = {"vocab_size": "vocab_size", "d_model": "d_model", "layers": "num_layers", "heads": "num_heads",
                "d_kv": "d_kv", "d_ff": "d_ff", "relative_attention_num_buckets": "relative_attention_num_buckets",
                "relative_attention_max_distance": "relative_attention_max_distance",
                "layer_norm_eps": "layer_norm_epsilon"}


GEMMA_CONFIG_SIZES = {"vocab_size": "vocab_size", "d_model": "hidden_size", "layers": "num_hidden_layers",
                      "heads": "num_attention_heads", "kv_heads": "num_key_value_heads", "d_kv": "head_dim",
                      "d_ff": "intermediate_size", "layer_norm_eps": "rms_norm_eps"}


def t5_config(tower: T5TowerSpec):  # noqa: ANN201 (transformers' T5Config / UMT5Config, imported lazily)
    from transformers import T5Config, UMT5Config

    if tower.architecture == "gemma2":
        return gemma2_config(tower)
    sizes = {key: getattr(tower, field) for field, key in CONFIG_SIZES.items()}
    config = {"t5": T5Config, "umt5": UMT5Config}[tower.architecture]
    # dropout 0: frozen anyway; sdpa: what from_pretrained picks, so that the pipelines' numbers are ours.
    return config(**sizes, feed_forward_proj=tower.feed_forward, dropout_rate=0.0, is_encoder_decoder=False,
                    use_cache=False, pad_token_id=tower.pad_id, eos_token_id=tower.eos_id,
                    attn_implementation="sdpa")


def gemma2_config(tower: T5TowerSpec, base: dict | None = None):  # noqa: ANN201 (transformers' Gemma2Config)
    """A Gemma2Config of the tower's sizes over ``base`` (a folder's config.json: its rotary, sliding-window and
    soft-capping settings) or Gemma-2 2B's defaults; the query scale is the head size, as Gemma-2 2B's."""
    from transformers import Gemma2Config

    sizes = {key: getattr(tower, field) for field, key in GEMMA_CONFIG_SIZES.items()}
    sizes["num_key_value_heads"] = tower.kv_heads or tower.heads
    config = {"query_pre_attn_scalar": tower.d_kv, **(base or {}), **sizes, "pad_token_id": tower.pad_id,
              "eos_token_id": tower.eos_id, "use_cache": False}
    config.pop("model_type", None)
    return Gemma2Config(**config)


def keeps_fp32(key: str, dtype: torch.dtype) -> bool:
    """Whether tensor ``key`` of a T5EncoderModel stays float32 in a ``dtype`` model: the feed-forward ``wo``
    under float16 (T5DenseGatedActDense.wo / T5DenseActDense.wo, transformers' _keep_in_fp32_modules)."""
    return dtype == torch.float16 and key.endswith(".DenseReluDense.wo.weight")


class T5Tower(nn.Module):
    """``T5EncoderModel`` (UMT5's) of ``spec``: ``forward(ids [B, L], mask [B, L] | None) -> [B, L, d_model]``."""

    def __init__(self, spec: T5TowerSpec, config: object = None) -> None:
        """``config``: the transformers config to build (a folder's), else one of the spec's sizes."""
        super().__init__()
        from transformers import Gemma2Model, T5EncoderModel, UMT5EncoderModel

        self.spec = spec
        classes = {"t5": T5EncoderModel, "umt5": UMT5EncoderModel, "gemma2": Gemma2Model}
        self.model = classes[spec.architecture](config if config is not None else t5_config(spec))
        self.fp8: Fp8Blocks | None = None  # set by use_fp8() when a file's Linear weights are fp8

    @property
    def embedding(self) -> torch.Tensor:
        """The token embedding table (T5's ``shared``, Gemma's ``embed_tokens``): the tower's dtype and device."""
        return self.model.get_input_embeddings().weight

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is None or self.spec.architecture != "t5" or self.model.config._attn_implementation != "sdpa":
            return self.model(input_ids=ids, attention_mask=mask).last_hidden_state  # [B, L, d_model]
        return self._masked_forward(ids, mask)

    def _masked_forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``T5Stack.forward`` with the mask folded into the position bias once, not once per block.

        With a padding mask, transformers' SDPA path (``create_position_bias_mask``) builds
        ``where(mask, position_bias, min)`` as a new [B, H, L, L] tensor in every block, although T5 shares block
        0's bias across blocks: a third of a masked forward at d_model 512 on a CPU (PixArt, Chroma). Here that
        tensor is built once, exactly as transformers builds it, and handed to every block as the position bias
        with no mask, which SDPA then receives unchanged: the same bits, once. UMT5 (a bias per block) and other
        attention implementations keep transformers' own forward.
        """
        stack = self.model.encoder
        hidden = stack.dropout(stack.embed_tokens(ids))  # [B, L, d]
        length = ids.shape[1]
        bias = stack.block[0].layer[0].SelfAttention.compute_bias(length, length, device=ids.device)  # [1, H, L, L]
        # transformers' fill: the lowest value both the keys' dtype (the model's) and the bias's dtype hold
        low = max(torch.finfo(self.model.shared.weight.dtype).min, torch.finfo(bias.dtype).min)
        bias = torch.where(mask.bool()[:, None, None, :], bias, low).contiguous()  # [B, H, L, L]
        for block in stack.block:
            hidden = block(hidden, None, bias)[0]  # [B, L, d]
        return stack.dropout(stack.final_layer_norm(hidden))  # [B, L, d_model]

    def _wo(self) -> list[nn.Linear]:
        return [m for name, m in self.model.named_modules()
                if name.endswith("DenseReluDense.wo") and m.weight.dtype not in FP8_DTYPES]

    def use_fp8(self) -> None:
        """Compute with the fp8 Linear weights upcast block by block (see Fp8Blocks)."""
        self.fp8 = Fp8Blocks(self)

    def _apply(self, fn, recurse=True):  # noqa: ANN001, ANN202 (torch's private signature)
        # .half() / .to(float16) cast every parameter; under float16 the wo projections go back to float32,
        # from their values before the cast (a float32 weight is not rounded through float16 on the way).
        # fp8 weights and their float32 scales only move: a cast would undo the memory they save.
        if self.fp8 is not None:
            fn = self.fp8.keeping_dtypes(fn)
        before = [m.weight.data for m in self._wo()]
        out = super()._apply(fn, recurse)
        if self.embedding.dtype == torch.float16:
            for m, old in zip(self._wo(), before, strict=True):
                if m.weight.dtype != torch.float32:
                    m.weight = nn.Parameter(old.to(m.weight.device, torch.float32), requires_grad=False)
        return out


class Fp8Blocks:
    """Forward hooks on each encoder block that upcast its fp8 Linear weights for that block's forward and put the
    fp8 tensors back after it: memory holds fp8 (half of float16) plus one block's weights in the compute dtype.

    Upcast to the model's dtype, and ``wo`` to float32 under float16 (``keeps_fp32``), as ComfyUI's manual cast
    computes them: ``fp8.to(dtype) * scale_weight.to(dtype)``. Swapping the weight itself (not a Linear subclass)
    keeps transformers' code unchanged: its feed-forward casts its input to ``wo.weight.dtype``, which must be the
    compute dtype, never fp8.
    """

    def __init__(self, tower: T5Tower) -> None:
        self.tower = tower
        self.weights = {m: m.weight for _, m in self.linears()}  # module -> its stored (fp8) Parameter
        for block in tower.model.encoder.block:
            block.register_forward_pre_hook(self._upcast)
            block.register_forward_hook(self._restore, always_call=True)

    def linears(self) -> list[tuple[str, nn.Linear]]:
        return [(name, m) for name, m in self.tower.model.named_modules()
                if isinstance(m, nn.Linear) and m.weight.dtype in FP8_DTYPES]

    def keeping_dtypes(self, fn):  # noqa: ANN001, ANN202 (Module._apply's function)
        keep = {id(t) for m in self.weights for t in (m._parameters["weight"], m._buffers.get("scale_weight"))}

        def apply(t: torch.Tensor) -> torch.Tensor:
            return t.to(fn(t.new_empty(0)).device) if id(t) in keep else fn(t)

        return apply

    def _upcast(self, block: nn.Module, args: object) -> None:
        dtype = self.tower.embedding.dtype
        for name, m in block.named_modules():
            if m in self.weights:
                stored = m._parameters["weight"]
                self.weights[m] = stored
                compute = torch.float32 if keeps_fp32(f".{name}.weight", dtype) else dtype
                weight = stored.to(compute)  # [out, in]
                if m._buffers.get("scale_weight") is not None:
                    weight = weight * m._buffers["scale_weight"].to(compute)
                m._parameters["weight"] = weight  # transient: this block's forward only

    def _restore(self, block: nn.Module, args: object, output: object) -> None:
        for m in block.modules():
            if m in self.weights:
                m._parameters["weight"] = self.weights[m]


def random_t5(tower: T5TowerSpec, *, seed: int) -> T5Tower:
    """Seeded random weights without touching the global RNG (tiny specs, demos): embeddings N(0, 1) as
    T5's, projections N(0, 0.05), RMSNorm gains near 1 and the final one near 0.2 (outputs ~1)."""
    generator = torch.Generator().manual_seed(seed)
    model = T5Tower(tower)
    with torch.no_grad():
        for name, param in model.model.named_parameters():
            if tower.architecture == "gemma2":  # RMSNorms scale by 1 + weight; the embedding is scaled by sqrt(d)
                param.normal_(0.0, 0.05 if "norm" in name else 0.02, generator=generator)
            elif name.endswith("layer_norm.weight"):
                param.normal_(0.0, 0.1, generator=generator).add_(0.2 if "final" in name else 1.0)
            else:
                param.normal_(0.0, 1.0 if name == "shared.weight" else 0.05, generator=generator)
    return model


def tower_from_config(tower: T5TowerSpec, folder: Path) -> T5TowerSpec:
    """The tower's sizes from a transformers T5 ``config.json``: a name fixes semantics, not size."""
    path = folder / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise WeightsError(f"{path}: cannot read a transformers config: {err}") from err
    if config.get("model_type", "t5") != tower.architecture:
        raise WeightsError(f"{path}: model_type {config.get('model_type')!r}, but tower {tower.name!r} is a "
                           f"{tower.architecture!r} encoder: these weights belong to another encoder")
    if tower.architecture == "gemma2":
        try:
            return tower.replace(**{field: config[key] for field, key in GEMMA_CONFIG_SIZES.items()})
        except KeyError as err:
            raise WeightsError(f"{path}: config has no {err.args[0]!r}") from err
    ff = config.get("feed_forward_proj", "relu")
    if ff != tower.feed_forward:
        raise WeightsError(f"{path}: feed_forward_proj {ff!r}, but tower {tower.name!r} is {tower.feed_forward!r} "
                           f"(T5 v1.1 is gated-gelu): these weights belong to another encoder")
    try:  # sizes every T5 config.json states; the relative-attention table and eps keep the spec's otherwise
        return tower.replace(**{field: config[key] for field, key in CONFIG_SIZES.items()
                                if key in config or field in ("vocab_size", "d_model", "layers", "heads", "d_kv",
                                                              "d_ff")})
    except KeyError as err:
        raise WeightsError(f"{path}: config has no {err.args[0]!r}") from err


def weight_files(folder: Path) -> list[Path]:
    """A T5 folder's weight files; of a sharded checkpoint, only the shards holding encoder tensors."""
    files = hf_files(folder, lambda key: not key.startswith(IGNORED_PREFIXES))
    if files is None:
        raise WeightsError(f"{folder}: no T5 weights; expected one of {list(INDEX_FILES + WEIGHT_FILES)}")
    return files


def read_state(tower: T5TowerSpec, files: Sequence[Path], dtype: torch.dtype, config: object = None
               ) -> dict[str, torch.Tensor]:
    """Every encoder tensor of ``files``, checked against ``tower`` (names and shapes), cast one at a time.

    fp8 Linear weights stay fp8, each with its ``<linear>.scale_weight`` (float32) where a scaled-fp8 file has one;
    every other tensor is cast to ``dtype`` (a scale of a weight that is not fp8 is folded into it)."""
    with torch.device("meta"):
        expected = {k: v.shape for k, v in T5Tower(tower, config).model.state_dict().items()}
    where = {}  # key in the file -> (file, data start, TensorInfo), or for a pickle (file, None, the tensor)
    for file in files:
        if file.suffix == ".bin":
            state = load_pickle(file)  # memory-mapped: a tensor's pages are read when it is cast
            where.update({k: (file, None, v) for k, v in state.items() if isinstance(v, torch.Tensor)})
            continue
        with open(file, "rb") as f:
            try:
                header = read_safetensors_header(f, file)
            except ValueError as err:
                raise WeightsError(str(err)) from err
        where.update({k: (file, header.data_start, info) for k, info in header.tensors.items()})
    if "shared.weight" not in where and TIED in where:
        where["shared.weight"] = where[TIED]
    where.pop(TIED, None)
    source = ", ".join(map(str, files))
    scales = scale_keys(tower, where, source)
    unexpected = sorted(k for k in where
                        if k not in expected and k not in scales and not k.startswith(IGNORED_PREFIXES))
    missing = sorted(k for k in expected if k not in where and k != TIED)
    for what, keys in (("missing", missing), ("unexpected", unexpected)):
        if keys:
            raise WeightsError(f"{source}: {len(keys)} {what} T5 encoder tensor(s) for tower {tower.name!r}: "
                               f"{summary(keys)}")
    state = {}
    for key in expected:
        if key == TIED:
            continue
        tensor = read_one(tower, where[key], key, expected[key])
        scale_key = key.removesuffix("weight") + "scale_weight"
        scale = read_one(tower, where[scale_key], scale_key, ()).float() if scale_key in scales else None
        if tensor.dtype in FP8_DTYPES and LINEAR_WEIGHT.search(key):  # kept fp8, upcast per block at compute
            state[key] = tensor
            if scale is not None:
                state[key.removesuffix("weight") + "scale_weight"] = scale
            continue
        if scale is not None:
            tensor = tensor.float() * scale
        state[key] = tensor.to(torch.float32 if keeps_fp32(key, dtype) else dtype)
    if TIED in expected:
        state[TIED] = state["shared.weight"]
    return state


def scale_keys(tower: T5TowerSpec, where: dict[str, tuple], source: str) -> set[str]:
    """The scaled-fp8 keys of a file (its marker, ``scale_weight`` and ``scale_input`` tensors), checked: scales
    only with the marker and only of Linear weights the file holds."""
    keys = {k for k in where if k == SCALED_FP8_MARKER or k.endswith((".scale_weight", ".scale_input"))}
    if keys and SCALED_FP8_MARKER not in where:
        raise WeightsError(f"{source}: {sorted(keys)[:3]} ... scale tensors without the {SCALED_FP8_MARKER!r} marker "
                           f"of a scaled-fp8 file, for T5 tower {tower.name!r}: a damaged or foreign file")
    for key in keys - {SCALED_FP8_MARKER}:
        weight = key.rsplit(".", 1)[0] + ".weight"
        if not LINEAR_WEIGHT.search(weight) or weight not in where:
            raise WeightsError(f"{source}: {key!r} scales no Linear weight of T5 tower {tower.name!r}")
        if tuple(where[key][2].shape) not in ((), (1,)):
            raise WeightsError(f"{source}: {key!r} is {list(where[key][2].shape)}, a per-tensor scale is [] "
                               f"(T5 tower {tower.name!r})")
    return keys


def read_one(tower: T5TowerSpec, place: tuple, key: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Tensor ``key`` at ``place`` (file, data start, TensorInfo; or a pickle's tensor), checked to be floating
    point of ``shape``."""
    file, start, info = place
    if tuple(info.shape) != tuple(shape) and not (shape == () and tuple(info.shape) == (1,)):
        raise WeightsError(f"{file}: tensor {key!r} is {info.dtype} {list(info.shape)}, tower {tower.name!r} "
                           f"expects floating point {list(shape)}: another size or a damaged file")
    if not info.dtype.is_floating_point:
        raise WeightsError(f"{file}: tensor {key!r} is {info.dtype} {list(info.shape)}, tower {tower.name!r} "
                           f"expects floating point {list(shape)}: another size or a damaged file")
    if start is None:  # a pickle's tensor, loaded already
        return info.reshape(shape)
    with open(file, "rb") as f:
        try:
            tensor = read_tensor(f, SafetensorsHeader({key: info}, {}, start), key, file)
        except ValueError as err:  # cut short: the file changed while it was read
            raise WeightsError(str(err)) from err
    return tensor.reshape(shape)


def tower_from_state(tower: T5TowerSpec, state: dict[str, torch.Tensor], config: object = None) -> T5Tower:
    """Built on the meta device, adopting the loaded tensors (no second copy); the embedding stays tied. fp8
    Linear weights stay fp8, their scales become ``scale_weight`` buffers, and the tower computes through
    ``Fp8Blocks``."""
    scales = {k.removesuffix(".scale_weight"): state.pop(k) for k in [k for k in state if k.endswith(".scale_weight")]}
    with torch.device("meta"):
        model = T5Tower(tower, config)
    model.model.load_state_dict(state, strict=True, assign=True)
    if tower.architecture == "gemma2":  # its computed buffers are no weights: made here, not on the meta device
        gemma = model.model
        gemma.rotary_emb = type(gemma.rotary_emb)(gemma.config)  # inv_freq
        embed = gemma.embed_tokens
        embed.register_buffer("embed_scale", torch.tensor(embed.scalar_embed_scale), persistent=False)  # sqrt(d)
        return model.requires_grad_(False)
    model.model.encoder.embed_tokens = model.model.shared
    model.model.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight.requires_grad_(False)
    for name, scale in scales.items():
        model.model.get_submodule(name).register_buffer("scale_weight", scale)
    if any(p.dtype in FP8_DTYPES for p in model.parameters()):
        model.use_fp8()
    return model


def load_folder(tower: T5TowerSpec, folder: Path, dtype: torch.dtype) -> T5Tower:
    """A T5 tower from a transformers T5 folder (``config.json`` + safetensors), sized by its config."""
    sized = tower_from_config(tower, folder)
    config = None
    if tower.architecture == "gemma2":  # built from the folder's config: its rotary and soft-capping settings
        config = gemma2_config(sized, json.loads((folder / "config.json").read_text()))
    return tower_from_state(sized, read_state(sized, weight_files(folder), dtype, config), config)
