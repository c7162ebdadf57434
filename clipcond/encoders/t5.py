"""The T5 encoder of SD3, Flux and PixArt: transformers' ``T5EncoderModel``, with clipcond's weights reading,
dtype policy and tokenization around it.

The forward is transformers' (a well-kept implementation; the pipelines run exactly it). clipcond owns:

- the weights: a diffusers pipeline's ``text_encoder_3/`` (SD3), ``text_encoder_2/`` (Flux) or
  ``text_encoder/`` (PixArt), or a transformers T5 folder; sharded safetensors through their index, only the
  shards holding encoder tensors opened; read strictly (missing or unexpected keys name themselves);
- the dtype policy: with float16 the feed-forward output projections (``wo``) stay float32 whatever the
  caller casts afterwards. T5 v1.1's ``wo`` outputs overflow float16 (transformers#20287); transformers keeps
  them float32 only while loading with ``torch_dtype`` (``_keep_in_fp32_modules``), and a later ``.half()``
  brings the overflow back (diffusers#8604: corrupted images). ``T5Tower._apply`` restores them;
- the tokenization: the pipeline's own ``T5TokenizerFast`` called as diffusers calls it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from clipcond._files import raw_bytes, read_safetensors_header
from clipcond.errors import WeightsError
from clipcond.specs import EncoderSpec, T5TowerSpec
from clipcond.text.tokenizer import Tokens, check_prompts

logger = logging.getLogger(__name__)

WEIGHT_FILES = ("model.safetensors", "model.fp16.safetensors")  # in preference order
INDEX_FILES = ("model.safetensors.index.json", "model.fp16.safetensors.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "spiece.model")
# Tensors of a full T5 (T5ForConditionalGeneration: google/t5-v1_1-xxl) that an encoder never reads.
IGNORED_PREFIXES = ("decoder.", "lm_head.")
# Tied to shared.weight in T5EncoderModel: files hold either key (transformers saves one of them).
TIED = "encoder.embed_tokens.weight"
CONFIG_SIZES = {"vocab_size": "vocab_size", "d_model": "d_model", "layers": "num_layers", "heads": "num_heads",
                "d_kv": "d_kv", "d_ff": "d_ff", "relative_attention_num_buckets": "relative_attention_num_buckets",
                "relative_attention_max_distance": "relative_attention_max_distance",
                "layer_norm_eps": "layer_norm_epsilon"}


def t5_config(tower: T5TowerSpec):  # noqa: ANN201 (transformers' T5Config, imported lazily)
    from transformers import T5Config

    sizes = {key: getattr(tower, field) for field, key in CONFIG_SIZES.items()}
    # dropout 0: frozen anyway; sdpa: what from_pretrained picks, so that the pipelines' numbers are ours.
    return T5Config(**sizes, feed_forward_proj=tower.feed_forward, dropout_rate=0.0, is_encoder_decoder=False,
                    use_cache=False, pad_token_id=tower.pad_id, eos_token_id=tower.eos_id,
                    attn_implementation="sdpa")


def keeps_fp32(key: str, dtype: torch.dtype) -> bool:
    """Whether tensor ``key`` of a T5EncoderModel stays float32 in a ``dtype`` model: the feed-forward ``wo``
    under float16 (T5DenseGatedActDense.wo / T5DenseActDense.wo, transformers' _keep_in_fp32_modules)."""
    return dtype == torch.float16 and key.endswith(".DenseReluDense.wo.weight")


class T5Tower(nn.Module):
    """``T5EncoderModel`` of ``spec``: ``forward(ids [B, L], mask [B, L] | None) -> [B, L, d_model]``."""

    def __init__(self, spec: T5TowerSpec) -> None:
        super().__init__()
        from transformers import T5EncoderModel

        self.spec = spec
        self.model = T5EncoderModel(t5_config(spec))

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids=ids, attention_mask=mask).last_hidden_state  # [B, L, d_model]

    def _wo(self) -> list[nn.Linear]:
        return [m for name, m in self.model.named_modules() if name.endswith("DenseReluDense.wo")]

    def _apply(self, fn, recurse=True):  # noqa: ANN001, ANN202 (torch's private signature)
        # .half() / .to(float16) cast every parameter; under float16 the wo projections go back to float32,
        # from their values before the cast (a float32 weight is not rounded through float16 on the way).
        before = [m.weight.data for m in self._wo()]
        out = super()._apply(fn, recurse)
        if self.model.shared.weight.dtype == torch.float16:
            for m, old in zip(self._wo(), before, strict=True):
                if m.weight.dtype != torch.float32:
                    m.weight = nn.Parameter(old.to(m.weight.device, torch.float32), requires_grad=False)
        return out


def random_t5(tower: T5TowerSpec, *, seed: int) -> T5Tower:
    """Seeded random weights without touching the global RNG (tiny specs, demos): embeddings N(0, 1) as
    T5's, projections N(0, 0.05), RMSNorm gains near 1 and the final one near 0.2 (outputs ~1)."""
    generator = torch.Generator().manual_seed(seed)
    model = T5Tower(tower)
    with torch.no_grad():
        for name, param in model.model.named_parameters():
            if name.endswith("layer_norm.weight"):
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
    if config.get("model_type", "t5") != "t5":
        raise WeightsError(f"{path}: model_type {config.get('model_type')!r}, but tower {tower.name!r} is a T5 "
                           f"(T5EncoderModel): these weights belong to another encoder")
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
    """A T5 folder's safetensors files; of a sharded checkpoint, only the shards holding encoder tensors."""
    for name in INDEX_FILES:
        if (folder / name).is_file():
            try:
                weight_map = json.loads((folder / name).read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as err:
                raise WeightsError(f"{folder / name}: not a safetensors index ({err})") from err
            shards = {shard for key, shard in weight_map.items() if not key.startswith(IGNORED_PREFIXES)}
            return [folder / shard for shard in sorted(shards)]
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return [folder / name]
    raise WeightsError(f"{folder}: no T5 weights; expected one of {list(INDEX_FILES + WEIGHT_FILES)}")


def read_state(tower: T5TowerSpec, files: Sequence[Path], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every encoder tensor of ``files``, checked against ``tower`` (names and shapes), cast one at a time."""
    with torch.device("meta"):
        expected = {k: v.shape for k, v in T5Tower(tower).model.state_dict().items()}
    where = {}  # key in the file -> (file, data start, TensorInfo)
    for file in files:
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
    unexpected = sorted(k for k in where if k not in expected and not k.startswith(IGNORED_PREFIXES))
    missing = sorted(k for k in expected if k not in where and k != TIED)
    for what, keys in (("missing", missing), ("unexpected", unexpected)):
        if keys:
            raise WeightsError(f"{source}: {len(keys)} {what} T5 encoder tensor(s) for tower {tower.name!r}: "
                               f"{keys[:10]}{' ...' if len(keys) > 10 else ''}")
    state = {}
    for key in expected:
        if key == TIED:
            continue
        file, start, info = where[key]
        if tuple(info.shape) != tuple(expected[key]) or not info.dtype.is_floating_point:
            raise WeightsError(f"{file}: tensor {key!r} is {info.dtype} {list(info.shape)}, tower {tower.name!r} "
                               f"expects floating point {list(expected[key])}: another size or a damaged file")
        tensor = torch.empty(info.shape, dtype=info.dtype)
        with open(file, "rb") as f:
            f.seek(start + info.begin)
            if f.readinto(raw_bytes(tensor)) != info.end - info.begin:
                raise WeightsError(f"{file}: tensor {key!r} is cut short: the file changed while it was read")
        state[key] = tensor.to(torch.float32 if keeps_fp32(key, dtype) else dtype)
    state[TIED] = state["shared.weight"]
    return state


def tower_from_state(tower: T5TowerSpec, state: dict[str, torch.Tensor]) -> T5Tower:
    """Built on the meta device, adopting the loaded tensors (no second copy); the embedding stays tied."""
    with torch.device("meta"):
        model = T5Tower(tower)
    model.model.load_state_dict(state, strict=True, assign=True)
    model.model.encoder.embed_tokens = model.model.shared
    model.model.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight.requires_grad_(False)
    return model


def load_folder(tower: T5TowerSpec, folder: Path, dtype: torch.dtype) -> T5Tower:
    """A T5 tower from a transformers T5 folder (``config.json`` + safetensors), sized by its config."""
    sized = tower_from_config(tower, folder)
    return tower_from_state(sized, read_state(sized, weight_files(folder), dtype))


class T5Prompts:
    """The pipeline's T5 tokenizer, called as diffusers calls it: ``padding="max_length"``, truncation keeping
    EOS last, no BOS. ``tok(prompts) -> Tokens`` whose ``eos`` is the closing EOS's position (the mask is
    ``arange(L) <= eos``: transformers' ``attention_mask`` under right padding)."""

    def __init__(self, tokenizer: object, spec: EncoderSpec) -> None:
        assert spec.t5 is not None
        pad, eos = getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)
        if (pad, eos) != (spec.t5.pad_id, spec.t5.eos_id):
            raise WeightsError(f"T5 tokenizer {type(tokenizer).__name__} has pad id {pad} and eos id {eos}; tower "
                               f"{spec.t5.name!r} expects {spec.t5.pad_id} and {spec.t5.eos_id}: another vocabulary")
        self.tokenizer, self.max_length, self.preprocess = tokenizer, spec.t5_max_length, spec.preprocess
        self.pad_id, self.eos_id = spec.t5.pad_id, spec.t5.eos_id

    def texts(self, prompts: Sequence[str]) -> list[str]:
        """The text T5 is given (PixArt's _text_preprocessing with clean_caption=False: lower().strip())."""
        return [p.lower().strip() for p in prompts] if self.preprocess == "lower_strip" else list(prompts)

    def __call__(self, prompts: str | Sequence[str]) -> Tokens:
        texts = self.texts(check_prompts(prompts))
        length = self.max_length
        rows = self.tokenizer(texts, add_special_tokens=True, verbose=False).input_ids if texts else []  # untruncated
        truncated = tuple((i, self.tokenizer.decode(r[length - 1 : -1]))
                          for i, r in enumerate(rows) if len(r) > length)
        rows = [r if len(r) <= length else [*r[: length - 1], self.eos_id] for r in rows]
        ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)  # [B, L]
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        eos = torch.tensor([len(r) - 1 for r in rows], dtype=torch.long)  # [B]
        return Tokens(ids=ids, eos=eos, truncated=truncated)


def token_mask(tokens: Tokens) -> torch.Tensor:
    """[B, L] int64: 1 up to and including the closing EOS (transformers' attention_mask, right padding)."""
    return (torch.arange(tokens.ids.shape[1]) <= tokens.eos[:, None]).long()


def load_tokenizer(source: object, spec: EncoderSpec) -> T5Prompts:
    """``source``: a tokenizer folder (AutoTokenizer: T5TokenizerFast from tokenizer.json) or a tokenizer."""
    if isinstance(source, (str, Path)):
        from transformers import AutoTokenizer

        folder = Path(source)
        if not any((folder / f).is_file() for f in TOKENIZER_FILES):
            raise WeightsError(f"{folder}: no T5 tokenizer ({', '.join(TOKENIZER_FILES)}); pass tokenizer=PATH to a "
                               f"pipeline's tokenizer folder (e.g. FLUX.1-dev/tokenizer_2)")
        source = AutoTokenizer.from_pretrained(folder)
    return T5Prompts(source, spec)
