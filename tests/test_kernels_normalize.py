"""The fused uint8 NHWC -> NCHW half kernel: its NumPy reference by hand, then the GPU against it."""

from __future__ import annotations

import numpy as np
import pytest

from wanwu.errors import ConfigError
from wanwu.kernels import cuda
from wanwu.kernels.normalize import Normalize, float32_to_bfloat16_bits, normalize_cuda, normalize_reference

NO_CUDA = cuda.cuda_unavailable_reason()
requires_cuda = pytest.mark.skipif(NO_CUDA is not None, reason=f"needs a CUDA device: {NO_CUDA}")

# std = 1/255 and mean = 0 make scale 1 and bias 0: the output is the pixel itself,
# exact in fp16 and bf16 up to 255, so layout and channel order read off by eye.
IDENTITY = dict(mean=(0.0, 0.0, 0.0), std=(1 / 255,) * 3)
# scale 0.5 and bias 1024 put every odd pixel on a tie between two fp16 neighbours
# (fp16 spacing is 1 in [1024, 2048)); bias 128 does the same for bf16 (spacing 1 in [128, 256)).
HALF_TIES = dict(mean=(-1024 * 2 / 255,) * 3, std=(2 / 255,) * 3)
BF16_TIES = dict(mean=(-128 * 2 / 255,) * 3, std=(2 / 255,) * 3)


def test_layout_is_nchw_and_channels_pick_the_input_channel():
    frames = np.arange(1 * 2 * 2 * 3, dtype=np.uint8).reshape(1, 2, 2, 3)  # pixel (h, w) = 6h + 3w + (0, 1, 2)
    out = normalize_reference(frames, Normalize(**IDENTITY))
    assert out.dtype == np.float16 and out.shape == (1, 3, 2, 2)
    assert out[0].tolist() == [[[0, 3], [6, 9]], [[1, 4], [7, 10]], [[2, 5], [8, 11]]]
    swapped = normalize_reference(frames, Normalize(**IDENTITY, channels=(2, 1, 0)))
    assert swapped[0, 0].tolist() == [[2, 5], [8, 11]] and swapped[0, 2].tolist() == [[0, 3], [6, 9]]


def test_grayscale_and_four_channel_frames():
    gray = np.array([[[[7], [200]]]], np.uint8)  # (1, 1, 2, 1)
    out = normalize_reference(gray, Normalize(**IDENTITY, channels=(0, 0, 0)))
    assert out[0, :, 0].tolist() == [[7, 200]] * 3
    bgra = np.array([[[[1, 2, 3, 255]]]], np.uint8)
    out = normalize_reference(bgra, Normalize(**IDENTITY, channels=(2, 1, 0)))
    assert out.reshape(3).tolist() == [3, 2, 1]


def test_imagenet_values_by_hand():
    plan = Normalize(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    frames = np.array([[[[0, 0, 0], [255, 255, 255]]]], np.uint8)
    out = normalize_reference(frames, plan).astype(np.float32)
    # (0 - 0.485) / 0.229 = -2.1179; (1 - 0.485) / 0.229 = 2.2489; fp16 keeps 3 decimals here.
    expected = [[-2.1179, 2.2489], [-2.0357, 2.4286], [-1.8044, 2.6400]]
    np.testing.assert_allclose(out[0, :, 0], expected, atol=2e-3)


def test_fp16_rounds_ties_to_even():
    plan = Normalize(**HALF_TIES)
    assert plan.scale.tolist() == [0.5] * 3 and plan.bias.tolist() == [1024.0] * 3
    frames = np.array([0, 1, 2, 3, 5, 255], np.uint8).reshape(1, 1, 6, 1)
    out = normalize_reference(frames, Normalize(**HALF_TIES, channels=(0, 0, 0)))
    # 1024.5 -> 1024, 1025.5 -> 1026, 1026.5 -> 1026, 1151.5 -> 1152: the even neighbour.
    assert out[0, 0, 0].tolist() == [1024, 1024, 1025, 1026, 1026, 1152]


def test_bf16_is_bit_patterns_rounded_ties_to_even():
    frames = np.array([0, 1, 2, 3, 5, 255], np.uint8).reshape(1, 1, 6, 1)
    out = normalize_reference(frames, Normalize(**BF16_TIES, dtype="bfloat16", channels=(0, 0, 0)))
    assert out.dtype == np.uint16
    # 128 = 0x4300; 128.5 -> 128; 129 = 0x4301; 129.5 -> 130 = 0x4302; 130.5 -> 130; 255.5 -> 256 = 0x4380.
    assert out[0, 0, 0].tolist() == [0x4300, 0x4300, 0x4301, 0x4302, 0x4302, 0x4380]


def test_float32_to_bfloat16_bits_by_hand():
    values = np.array([1.0, 1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-8 + 2**-20, -2.0, 0.0, 3.4028235e38], np.float32)
    # ties 1 + 2^-8 -> 1 (even), 1 + 3 * 2^-8 -> 1 + 2^-6 (even); just above a tie rounds up;
    # the largest float32 overflows to +inf (0x7F80).
    assert float32_to_bfloat16_bits(values).tolist() == [0x3F80, 0x3F80, 0x3F82, 0x3F81, 0xC000, 0x0000, 0x7F80]


def test_reference_is_within_half_an_ulp_of_exact_arithmetic():
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (2, 5, 7, 3), dtype=np.uint8)
    plan = Normalize(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    exact = (frames / 255.0 - np.array(plan.mean)) / np.array(plan.std)
    out = normalize_reference(frames, plan).astype(np.float64)
    # fp16 keeps 11 significant bits: half an ulp is 2^-11 relative, plus float32 slack.
    np.testing.assert_allclose(out, exact.transpose(0, 3, 1, 2), rtol=2**-11 + 1e-6, atol=1e-6)


@pytest.mark.parametrize("bad", [
    dict(IDENTITY, dtype="float32"),
    dict(mean=(0.0, 0.0), std=(1.0, 1.0, 1.0)),
    dict(mean=(0.0,) * 3, std=(1.0, 0.0, 1.0)),
    dict(mean=(0.0, float("nan"), 0.0), std=(1.0,) * 3),
    dict(IDENTITY, channels=(0, -1, 2)),
])
def test_plan_rejects_what_cannot_be_computed(bad):
    with pytest.raises(ConfigError):
        Normalize(**bad)


def test_frames_must_be_uint8_with_the_channels_the_plan_reads():
    plan = Normalize(**IDENTITY, channels=(0, 1, 3))
    with pytest.raises(ConfigError, match="channels"):
        normalize_reference(np.zeros((1, 2, 2, 3), np.uint8), plan)
    with pytest.raises(ConfigError, match="uint8"):
        normalize_reference(np.zeros((1, 2, 2, 3), np.float32), Normalize(**IDENTITY))
    with pytest.raises(ConfigError, match="shape"):
        normalize_reference(np.zeros((2, 2, 3), np.uint8), Normalize(**IDENTITY))


def test_the_launcher_refuses_host_arrays():
    pytest.importorskip("cupy", reason="CuPy (the 'gpu' extra) is not installed")
    with pytest.raises(ConfigError, match="cupy.ndarray"):
        normalize_cuda(np.zeros((1, 2, 2, 3), np.uint8), Normalize(**IDENTITY))


# ---- on a GPU: bit-identical to the reference -------------------------------------

@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("shape, channels", [
    ((4, 224, 224, 3), (0, 1, 2)),
    ((3, 17, 31, 4), (2, 1, 0)),  # odd sizes, BGRA -> RGB
    ((1, 1, 1, 1), (0, 0, 0)),
])
@pytest.mark.gpu
@requires_cuda
def test_gpu_equals_reference(dtype, shape, channels):
    import cupy

    frames = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
    plan = Normalize(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), dtype=dtype, channels=channels)
    got = normalize_cuda(cupy.asarray(frames), plan).get()
    np.testing.assert_array_equal(got.view(np.uint16), normalize_reference(frames, plan).view(np.uint16))


@pytest.mark.gpu
@requires_cuda
def test_gpu_writes_into_a_given_slot_and_checks_it():
    import cupy

    frames = np.random.default_rng(2).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    plan = Normalize(**HALF_TIES)
    pool = cupy.zeros((3, 2, 3, 8, 8), np.float16)
    result = normalize_cuda(cupy.asarray(frames), plan, out=pool[1])
    assert result.data.ptr == pool[1].data.ptr
    np.testing.assert_array_equal(pool[1].get(), normalize_reference(frames, plan))
    assert not pool[0].any() and not pool[2].any()
    with pytest.raises(ConfigError, match="out"):
        normalize_cuda(cupy.asarray(frames), plan, out=cupy.zeros((2, 3, 8, 8), np.float32))
