"""Standalone T5 files as ComfyUI and kohya keep them (clipcond/encoders/t5.py: read_state, Fp8Blocks):
t5xxl_fp16.safetensors, t5xxl_fp8_e4m3fn.safetensors and the scaled-fp8 variant, against transformers'
T5EncoderModel on the same weights upcast.

Facts of the formats, from ComfyUI's loaders (comfy/text_encoders/sd3_clip.py, comfy/ops.py scaled_fp8_ops):
- keys are transformers' T5EncoderModel keys (``encoder.block.0.layer.0.SelfAttention.q.weight``, ``shared.weight``),
  without the decoder;
- fp8 files hold the Linear weights as F8_E4M3, embedding and norms as F16;
- a scaled-fp8 file also holds a ``scaled_fp8`` marker tensor whose dtype is the fp8 type, and per Linear a float32
  scalar ``<linear>.scale_weight``: the weight is ``fp8.to(dtype) * scale_weight.to(dtype)``; ``scale_input``
  tensors only scale activations on ComfyUI's fp8-matmul path.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from t5_fixtures import t5_model
from test_t5 import PROMPTS

from clipcond import TextConditioner, WeightsError, get_spec

TOL = {"atol": 1e-5, "rtol": 0}
FP8 = torch.float8_e4m3fn
LINEARS = ("SelfAttention.q", "SelfAttention.k", "SelfAttention.v", "SelfAttention.o", "DenseReluDense.wi_0",
           "DenseReluDense.wi_1", "DenseReluDense.wo")


def is_linear(key: str) -> bool:
    return key.endswith(tuple(f"{name}.weight" for name in LINEARS))


@pytest.fixture(scope="module")
def model():
    return t5_model(get_spec("tiny-t5-xxl").t5, seed=31)


def encoder_state(model) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if k != "encoder.embed_tokens.weight"}


def reference(model, state: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    """transformers' T5EncoderModel with ``state`` (the file's weights upcast to float32) loaded into it."""
    ref = type(model)(model.config).eval()
    ref.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    with torch.no_grad():
        return ref(ids).last_hidden_state


def ids_of(t5_pipes) -> torch.Tensor:
    return t5_pipes.tokenizer("sd3")(PROMPTS, padding="max_length", max_length=512, truncation=True,
                                     return_tensors="pt").input_ids


def load(path, t5_vocab, **kw) -> TextConditioner:
    return TextConditioner.from_pretrained("tiny-t5-xxl", weights=path, tokenizer=t5_vocab["sd3"], **kw)


def linear_bytes(tc: TextConditioner) -> int:
    return sum(p.nbytes for n, p in tc.named_parameters() if is_linear(n))


def test_comfyui_fp16_file_with_either_embedding_key(model, t5_pipes, t5_vocab, tmp_path):
    """Bug: a t5xxl_fp16.safetensors whose embedding is stored as encoder.embed_tokens.weight (transformers saves one
    of the two tied keys) refused as missing shared.weight, or read into the wrong tensor."""
    state = encoder_state(model)
    assert "encoder.block.0.layer.0.SelfAttention.q.weight" in state and "shared.weight" in state  # ComfyUI's keys
    renamed = {("encoder.embed_tokens.weight" if k == "shared.weight" else k): v.half() for k, v in state.items()}
    save_file(renamed, tmp_path / "t5xxl_fp16.safetensors")
    got = load(tmp_path / "t5xxl_fp16.safetensors", t5_vocab)(PROMPTS).sequence
    torch.testing.assert_close(got, reference(model, {k: v.half() for k, v in state.items()}, ids_of(t5_pipes)), **TOL)


def test_fp8_file_stays_fp8_and_equals_its_upcast_weights(model, t5_pipes, t5_vocab, tmp_path):
    """Bug: t5xxl_fp8_e4m3fn.safetensors upcast whole at load (twice the memory of fp8, as much as fp16), computed in
    fp8 (activations cast to wo's fp8 dtype by transformers' feed-forward), or cast back by .half()/.to()."""
    state = {k: (v.to(FP8) if is_linear(k) else v.half()) for k, v in encoder_state(model).items()}
    save_file(state, tmp_path / "t5xxl_fp8_e4m3fn.safetensors")
    save_file({k: v.half() for k, v in encoder_state(model).items()}, tmp_path / "t5xxl_fp16.safetensors")
    ids = ids_of(t5_pipes)
    tc = load(tmp_path / "t5xxl_fp8_e4m3fn.safetensors", t5_vocab)
    assert {p.dtype for n, p in tc.named_parameters() if is_linear(n)} == {FP8}
    torch.testing.assert_close(tc(PROMPTS).sequence, reference(model, state, ids), **TOL)
    half = load(tmp_path / "t5xxl_fp16.safetensors", t5_vocab, dtype=torch.float16)
    fp8_half = load(tmp_path / "t5xxl_fp8_e4m3fn.safetensors", t5_vocab, dtype=torch.float16)
    assert linear_bytes(fp8_half) * 2 == linear_bytes(half) - sum(  # wo is float32 under float16 in the fp16 tower
        p.nbytes // 2 for n, p in half.named_parameters() if n.endswith("DenseReluDense.wo.weight"))
    # T5-XXL: 4.76e9 Linear parameters of 4.89e9 (embedding 32128 x 4096): fp8 holds 0.51x of bfloat16.
    bf16, fp8_bf16 = (load(tmp_path / f, t5_vocab, dtype=torch.bfloat16)
                      for f in ("t5xxl_fp16.safetensors", "t5xxl_fp8_e4m3fn.safetensors"))
    assert linear_bytes(fp8_bf16) * 2 == linear_bytes(bf16)
    for how, cast in {"dtype=float16": fp8_half, ".half()": load(tmp_path / "t5xxl_fp8_e4m3fn.safetensors",
                                                                  t5_vocab).half()}.items():
        assert {p.dtype for n, p in cast.named_parameters() if is_linear(n)} == {FP8}, how
        out = cast(PROMPTS).sequence
        assert out.dtype == torch.float16 and torch.isfinite(out).all(), how
        torch.testing.assert_close(out.float(), reference(model, state, ids), atol=2e-2, rtol=2e-2, msg=how)


def scaled(model) -> dict[str, torch.Tensor]:
    """A scaled-fp8 file as ComfyUI's converters write it: per Linear, scale = absmax / 448 and fp8 = w / scale."""
    out = {"scaled_fp8": torch.empty(0, dtype=FP8)}
    for k, v in encoder_state(model).items():
        if is_linear(k):
            scale = (v.abs().amax() / 448).float()
            out[k] = (v / scale).to(FP8)
            out[k.removesuffix("weight") + "scale_weight"] = scale
            out[k.removesuffix("weight") + "scale_input"] = torch.ones(())  # fp8-matmul only: not read
        else:
            out[k] = v.half()
    return out


def test_scaled_fp8_file_applies_each_scale(model, t5_pipes, t5_vocab, tmp_path):
    """Bug: a scaled-fp8 file read without its scale_weight (every Linear off by its ~1e-4 scale), the scale applied
    twice, or its scale_input mistaken for an unexpected tensor."""
    state = scaled(model)
    save_file(state, tmp_path / "t5xxl_fp8_e4m3fn_scaled.safetensors")
    upcast = {k: v.float() * state[k.removesuffix("weight") + "scale_weight"] if is_linear(k) else v
              for k, v in state.items() if k != "scaled_fp8" and not k.endswith(("scale_weight", "scale_input"))}
    ref = reference(model, upcast, ids_of(t5_pipes))
    tc = load(tmp_path / "t5xxl_fp8_e4m3fn_scaled.safetensors", t5_vocab)
    assert {p.dtype for n, p in tc.named_parameters() if is_linear(n)} == {FP8}
    torch.testing.assert_close(tc(PROMPTS).sequence, ref, **TOL)
    assert (ref - reference(model, encoder_state(model), ids_of(t5_pipes))).abs().max() < 0.05  # fp8 ~ the fp32 model
    half = load(tmp_path / "t5xxl_fp8_e4m3fn_scaled.safetensors", t5_vocab, dtype=torch.bfloat16)
    torch.testing.assert_close(half(PROMPTS).sequence.float(), ref, atol=3e-2, rtol=3e-2)


def test_scaled_fp8_errors_name_tower_and_file(model, t5_vocab, tmp_path):
    """Bug: scales without the scaled_fp8 marker (a damaged or foreign file) silently ignored or applied, or a scale
    of a tensor that is no Linear weight (a norm) accepted; errors that name neither the file nor the tower."""
    state = scaled(model)
    del state["scaled_fp8"]
    save_file(state, tmp_path / "no_marker.safetensors")
    with pytest.raises(WeightsError, match=r"no_marker.safetensors: .* scale tensors without the 'scaled_fp8' marker"
                                           r" of a scaled-fp8 file, for T5 tower 'tiny-t5-v1_1-xxl'"):
        load(tmp_path / "no_marker.safetensors", t5_vocab)
    state = scaled(model)
    state["encoder.final_layer_norm.scale_weight"] = torch.ones(())
    save_file(state, tmp_path / "norm_scale.safetensors")
    with pytest.raises(WeightsError, match=r"norm_scale.safetensors: 'encoder.final_layer_norm.scale_weight' scales "
                                           r"no Linear weight of T5 tower 'tiny-t5-v1_1-xxl'"):
        load(tmp_path / "norm_scale.safetensors", t5_vocab)


def test_fp8_t5_in_a_flux_mapping(model, t5_pipes, t5_vocab, tmp_path):
    """Bug: an fp8 T5 file given per tower (weights={"clip_l": ..., "t5": ...}) read as another tower or upcast."""
    save_file(scaled(model), tmp_path / "t5xxl_fp8_e4m3fn_scaled.safetensors")
    clip_l = t5_pipes.flux / "text_encoder" / "model.safetensors"
    tc = TextConditioner.from_pretrained("tiny-flux", tokenizer=t5_vocab["flux"], weights={
        "clip_l": clip_l, "t5": tmp_path / "t5xxl_fp8_e4m3fn_scaled.safetensors"})
    assert tc.t5.model.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == FP8
    ref = load(tmp_path / "t5xxl_fp8_e4m3fn_scaled.safetensors", t5_vocab)
    tokens = tc.tokenize(PROMPTS[:2])[-1]
    torch.testing.assert_close(tc(PROMPTS[:2]).sequence, ref.t5(tokens.ids), **TOL)
