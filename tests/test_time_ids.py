"""SDXL time_ids equal diffusers' own ``_get_add_time_ids`` (base and refiner), on pipelines whose tiny
UNets make diffusers run its own embedding-size checks; and the error paths of clipcond.time_ids."""

from __future__ import annotations

import pytest
import torch

import clipcond
from clipcond import Conditioning, added_cond_kwargs, sdxl_refiner_time_ids, sdxl_time_ids

TIME_DIM = 8  # addition_time_embed_dim (SDXL: 256)
POOLED = 48  # tiny-sdxl pooled dim (SDXL: 1280)
SEQUENCE = 80  # tiny-sdxl sequence dim (SDXL: 2048)

CASES = [  # (original_size, crops_coords_top_left, target_size): pipeline defaults, crops, odd and large sizes
    ((1024, 1024), (0, 0), (1024, 1024)),
    ((512, 768), (16, 32), (1024, 1024)),
    ((1023, 4097), (3, 257), (896, 1152)),  # not representable in bf16/fp16: the rounding must match too
    ((1, 1), (0, 0), (8, 8)),
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def tiny_xl_unet(values: int):
    """A tiny SDXL-style UNet whose add_embedding takes ``values`` time ids and the pooled vector."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32,), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",),
        cross_attention_dim=SEQUENCE, attention_head_dim=8, norm_num_groups=8, addition_embed_type="text_time",
        addition_time_embed_dim=TIME_DIM, projection_class_embeddings_input_dim=values * TIME_DIM + POOLED,
    ).eval()


def xl_pipeline(cls_name: str, values: int, **config: object):
    import diffusers

    parts = dict.fromkeys(["vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"])
    return getattr(diffusers, cls_name)(unet=tiny_xl_unet(values), **parts, **config)


@pytest.fixture(scope="module")
def base_pipe():
    return xl_pipeline("StableDiffusionXLPipeline", 6)


@pytest.fixture(scope="module")
def refiner_pipe():
    return xl_pipeline("StableDiffusionXLImg2ImgPipeline", 5, requires_aesthetics_score=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("original", "crop", "target"), CASES)
def test_base_time_ids_equal_stable_diffusion_xl_pipeline(base_pipe, original, crop, target, dtype):
    expected = base_pipe._get_add_time_ids(original, crop, target, dtype=dtype, text_encoder_projection_dim=POOLED)
    ours = sdxl_time_ids(original, crop, target, dtype=dtype)
    assert ours.shape == (1, 6) and ours.dtype == dtype
    assert torch.equal(ours, expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("original", "crop", "target"), CASES)
def test_refiner_time_ids_equal_img2img_pipeline(refiner_pipe, original, crop, target, dtype):
    # requires_aesthetics_score=True (the refiner): diffusers' defaults 6.0 / 2.5, and odd scores.
    for score, negative_score in [(6.0, 2.5), (5.3, 1.1)]:
        positive, negative = refiner_pipe._get_add_time_ids(
            original, crop, target, score, negative_score, target, (0, 0), original, dtype=dtype,
            text_encoder_projection_dim=POOLED)
        assert torch.equal(sdxl_refiner_time_ids(original, crop, score, dtype=dtype), positive)
        assert torch.equal(sdxl_refiner_time_ids(target, (0, 0), negative_score, dtype=dtype), negative)


@pytest.mark.parametrize(("original", "crop", "target"), CASES)
def test_img2img_without_aesthetic_score_uses_base_layout(original, crop, target):
    pipe = xl_pipeline("StableDiffusionXLImg2ImgPipeline", 6, requires_aesthetics_score=False)
    positive, _ = pipe._get_add_time_ids(original, crop, target, 6.0, 2.5, original, crop, target,
                                         dtype=torch.float32, text_encoder_projection_dim=POOLED)
    assert torch.equal(sdxl_time_ids(original, crop, target), positive)


def test_per_row_arguments_equal_stacked_single_rows(base_pipe):
    originals, crops = [(512, 768), (1024, 1024), (640, 480)], torch.tensor([[0, 0], [16, 32], [5, 7]])
    ours = sdxl_time_ids(originals, crops, (1024, 1024), dtype=torch.float16)
    rows = [base_pipe._get_add_time_ids(o, tuple(c.tolist()), (1024, 1024), dtype=torch.float16,
                                        text_encoder_projection_dim=POOLED)
            for o, c in zip(originals, crops, strict=True)]
    assert torch.equal(ours, torch.cat(rows))
    scores = sdxl_refiner_time_ids(originals, (0, 0), torch.tensor([6.0, 2.5, 4.0]))
    assert scores[:, 4].tolist() == [6.0, 2.5, 4.0] and scores[:, :2].tolist() == [list(o) for o in originals]
    assert sdxl_time_ids((64, 64), (0, 0), (64, 64), batch_size=4).shape == (4, 6)
    assert sdxl_time_ids((64, 64), (0, 0), (64, 64), batch_size=0).shape == (0, 6)
    broadcast = sdxl_time_ids(torch.tensor([64, 32]), [(1, 2)], (64, 64), batch_size=3)
    assert broadcast.tolist() == [[64, 32, 1, 2, 64, 64]] * 3


def test_device_and_dtype_follow_arguments():
    ids = sdxl_time_ids((64, 64), (0, 0), (64, 64), device="meta", dtype=torch.bfloat16)
    assert ids.device.type == "meta" and ids.dtype == torch.bfloat16


def test_added_cond_kwargs_feed_the_tiny_xl_unet(base_pipe):
    tc = clipcond.TextConditioner.from_pretrained("tiny-sdxl")
    assert (tc.sequence_dim, tc.pooled_dim) == (SEQUENCE, POOLED)
    cond = Conditioning.cat([tc.null(2), tc(["a photo of a cat", "a dog"])])  # a CFG batch
    kwargs = added_cond_kwargs(cond, sdxl_time_ids((64, 64), (0, 0), (64, 64)))
    assert kwargs["text_embeds"] is cond.pooled and kwargs["time_ids"].shape == (4, 6)
    with torch.no_grad():
        out = base_pipe.unet(torch.randn(4, 4, 8, 8), 10, encoder_hidden_states=cond.sequence,
                             added_cond_kwargs=kwargs).sample
    assert out.shape == (4, 4, 8, 8) and torch.isfinite(out).all()
    # Refiner ids on a base UNet are a size error inside the UNet, not a silent mismatch.
    with pytest.raises(RuntimeError):
        base_pipe.unet(torch.randn(4, 4, 8, 8), 10, encoder_hidden_states=cond.sequence,
                       added_cond_kwargs=added_cond_kwargs(cond, sdxl_refiner_time_ids((64, 64), (0, 0), 6.0)))
    half = added_cond_kwargs(cond.to(torch.float16), sdxl_time_ids([(64, 64)] * 4, (0, 0), (64, 64)))
    assert half["time_ids"].dtype == torch.float16 and half["time_ids"].shape == (4, 6)


@pytest.mark.parametrize(("args", "error", "match"), [
    (((0, 64), (0, 0), (64, 64)), ValueError, r"original_size must be positive \(height, width\).*got \(0, 64\)"),
    (((64, 64), (0, 0), [(64, 64), (64, -1)]), ValueError, r"target_size\[1\] must be positive.*got \(64, -1\)"),
    (((64, 64), (-1, 0), (64, 64)), ValueError, r"crops_coords_top_left must be a \(top, left\) pixel offset >= 0"),
    (((64.0, 64), (0, 0), (64, 64)), TypeError, r"original_size\[0\] must be int \(pixels\), got float 64.0"),
    (((64, 64, 3), (0, 0), (64, 64)), TypeError, r"original_size\[0\] must be a \(height, width\) pair of ints"),
    ((64, (0, 0), (64, 64)), TypeError, r"original_size must be a \(height, width\) pair of ints, .*got int 64"),
    (("64x64", (0, 0), (64, 64)), TypeError, r"original_size must be .*got str"),
    (((True, 64), (0, 0), (64, 64)), TypeError, r"original_size\[0\] must be int \(pixels\), got bool"),
    ((torch.tensor([64.0, 64.0]), (0, 0), (64, 64)), TypeError, r"original_size must be an integer tensor.*float32"),
    ((torch.zeros(2, 3, dtype=torch.long), (0, 0), (64, 64)), ValueError, r"got a tensor of shape \(2, 3\)"),
    (([torch.tensor([64, 32]), torch.tensor([64, 48])], (0, 0), (64, 64)), TypeError,
     r"default_collate.*torch.stack\(original_size, dim=1\)"),
    (([(64, 64)] * 2, (0, 0), [(64, 64)] * 3), ValueError, r"disagree on the batch size: \{'original_size': 2, "
                                                         r"'target_size': 3\}"),
])
def test_time_ids_errors_name_argument_and_expectation(args, error, match):
    with pytest.raises(error, match=match):
        sdxl_time_ids(*args)


def test_refiner_score_batch_and_dtype_errors():
    with pytest.raises(TypeError, match=r"aesthetic_score must be a number \(diffusers: 6.0, negative 2.5\)"):
        sdxl_refiner_time_ids((64, 64), (0, 0), "6")
    with pytest.raises(TypeError, match=r"aesthetic_score\[1\] must be a number, got NoneType"):
        sdxl_refiner_time_ids((64, 64), (0, 0), [6.0, None])
    with pytest.raises(ValueError, match=r"aesthetic_score must be finite, got \[nan\]"):
        sdxl_refiner_time_ids((64, 64), (0, 0), float("nan"))
    with pytest.raises(ValueError, match="aesthetic_score is empty"):
        sdxl_refiner_time_ids((64, 64), (0, 0), [])
    with pytest.raises(ValueError, match=r"batch_size is 2 but these arguments have other row counts: "
                                         r"\{'aesthetic_score': 3\}"):
        sdxl_refiner_time_ids((64, 64), (0, 0), [6.0, 6.0, 2.5], batch_size=2)
    with pytest.raises(ValueError, match=r"batch_size must be an int >= 0, got -1"):
        sdxl_time_ids((64, 64), (0, 0), (64, 64), batch_size=-1)
    with pytest.raises(TypeError, match=r"dtype must be a floating torch.dtype \(the UNet's\), got torch.int64"):
        sdxl_time_ids((64, 64), (0, 0), (64, 64), dtype=torch.int64)


def test_added_cond_kwargs_errors():
    cond = Conditioning(torch.zeros(3, 77, SEQUENCE), torch.zeros(3, POOLED))
    with pytest.raises(TypeError, match="time_ids must be a tensor .*got tuple"):
        added_cond_kwargs(cond, (64, 64, 0, 0, 64, 64))
    with pytest.raises(ValueError, match=r"time_ids must have shape \[B, 6\] \(base\) or \[B, 5\] \(refiner\), "
                                         r"got \(1, 4\)"):
        added_cond_kwargs(cond, torch.zeros(1, 4))
    with pytest.raises(ValueError, match="time_ids has 2 rows but the conditioning has 3"):
        added_cond_kwargs(cond, torch.zeros(2, 6))
