"""Fused uint8 NHWC -> normalised NCHW half precision, on the GPU and in NumPy.

For a model whose graph does not normalise its input: one pass over the decoded
frames does the uint8 -> float conversion, ``(x / 255 - mean) / std``, the channel
selection (e.g. BGR -> RGB), the NHWC -> NCHW transpose and the rounding to fp16
or bf16, instead of four framework ops with three float32 intermediates.

:func:`normalize_reference` is the contract; :func:`normalize_cuda` (``normalize.cu``)
must equal it bit for bit. bf16 results are ``uint16`` arrays of bf16 bit patterns,
as neither NumPy nor CuPy has a bf16 dtype; ``torch.from_dlpack(out).view(torch.bfloat16)``
reads them without a copy.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from wanwu.errors import ConfigError
from wanwu.kernels import cuda

logger = logging.getLogger(__name__)

SOURCE = "normalize.cu"
_FUNCTIONS = {"float16": "nhwc_u8_to_nchw_f16", "bfloat16": "nhwc_u8_to_nchw_bf16"}
_THREADS = 256  # the kernels' __launch_bounds__
_MAX_BLOCKS_PER_IMAGE = 4096  # enough to fill an H100 several times; the kernel loops past it
_MAX_IMAGES = 65_535  # gridDim.y


@dataclass(frozen=True)
class Normalize:
    """What the fused kernel computes; validated here so a launch cannot be misconfigured.

    ``out[n, c, h, w] = half(x * scale[c] + bias[c])`` with ``x = frames[n, h, w, channels[c]]``,
    ``scale = 1 / (255 std)`` and ``bias = -mean / std`` in float32: that is
    ``(x / 255 - mean) / std`` up to float32 rounding, then rounded to nearest even.
    """

    mean: tuple[float, float, float]  # per output channel, on [0, 1] values
    std: tuple[float, float, float]  # per output channel, on [0, 1] values, > 0
    dtype: str = "float16"  # "float16", or "bfloat16" (returned as uint16 bit patterns)
    channels: tuple[int, int, int] = (0, 1, 2)  # input channel of each output channel; (2, 1, 0) swaps BGR/RGB

    def __post_init__(self) -> None:
        if self.dtype not in _FUNCTIONS:
            raise ConfigError(f"expected dtype float16 or bfloat16, got {self.dtype!r}")
        for name in ("mean", "std", "channels"):
            if len(getattr(self, name)) != 3:
                raise ConfigError(f"expected 3 values for {name}, got {getattr(self, name)!r}")
        if not all(np.isfinite(self.mean)) or not all(np.isfinite(s) and s > 0 for s in self.std):
            raise ConfigError(f"expected finite mean and positive finite std, got {self.mean}, {self.std}")
        if any(not isinstance(c, int) or c < 0 for c in self.channels):
            raise ConfigError(f"expected non-negative channel indices, got {self.channels}")

    @property
    def scale(self) -> np.ndarray:
        """float32 (3,): ``1 / (255 std)``, computed in float64 and rounded once."""
        return (1.0 / (255.0 * np.asarray(self.std, np.float64))).astype(np.float32)

    @property
    def bias(self) -> np.ndarray:
        """float32 (3,): ``-mean / std``, computed in float64 and rounded once."""
        return (-np.asarray(self.mean, np.float64) / np.asarray(self.std, np.float64)).astype(np.float32)

    @property
    def out_dtype(self) -> np.dtype:
        """``float16``, or ``uint16`` holding bf16 bit patterns."""
        return np.dtype(np.float16 if self.dtype == "float16" else np.uint16)

    def output_shape(self, frames_shape: tuple[int, ...]) -> tuple[int, int, int, int]:
        """``(n, 3, h, w)`` for frames of ``frames_shape`` ``(n, h, w, c)``.

        Raises:
            ConfigError: not 4-D, an empty axis, more than 4 or fewer channels than
                ``channels`` reads, or more than 65,535 images (the grid's y axis).
        """
        if len(frames_shape) != 4 or min(frames_shape) < 1:
            raise ConfigError(f"expected frames of shape (n, h, w, c), got {tuple(frames_shape)}")
        n, h, w, c = frames_shape
        if c > 4 or max(self.channels) >= c:
            raise ConfigError(f"expected 1..4 channels covering channels={self.channels}, got c={c}")
        if n > _MAX_IMAGES:
            raise ConfigError(f"expected at most {_MAX_IMAGES} images per launch, got {n}")
        return n, 3, h, w


def float32_to_bfloat16_bits(values: np.ndarray) -> np.ndarray:
    """uint16 bf16 bit patterns of finite float32 ``values``, rounded to nearest even.

    Adding ``0x7FFF`` plus the lowest kept bit before truncating rounds ties to the
    even neighbour, which is what ``cvt.rn.bf16.f32`` does; a carry out of the
    mantissa correctly bumps the exponent (and overflows to infinity at the top).
    """
    bits = np.ascontiguousarray(values, np.float32).view(np.uint32).astype(np.uint64)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def normalize_reference(frames: np.ndarray, plan: Normalize) -> np.ndarray:
    """NumPy reference of the fused kernel: uint8 ``(n, h, w, c)`` -> ``(n, 3, h, w)``.

    Returns:
        float16, or uint16 bf16 bit patterns when ``plan.dtype == "bfloat16"``.

    Raises:
        ConfigError: ``frames`` is not uint8 or its shape does not fit ``plan``.
    """
    frames = np.asarray(frames)
    if frames.dtype != np.uint8:
        raise ConfigError(f"expected uint8 frames, got {frames.dtype}")
    plan.output_shape(frames.shape)
    picked = frames[..., list(plan.channels)].astype(np.float32)  # (n, h, w, 3)
    # float32 multiply then float32 add, each rounded: what the kernel does.
    values = (picked * plan.scale + plan.bias).transpose(0, 3, 1, 2)
    if plan.dtype == "float16":
        return np.ascontiguousarray(values.astype(np.float16))
    return float32_to_bfloat16_bits(values)


def normalize_cuda(frames: Any, plan: Normalize, out: Any = None) -> Any:
    """The fused kernel on CuPy's current stream; equals :func:`normalize_reference`.

    Args:
        frames: C-contiguous uint8 ``cupy.ndarray`` of shape ``(n, h, w, c)``.
        plan: what to compute.
        out: optional C-contiguous ``cupy.ndarray`` of ``plan.output_shape`` and
            ``plan.out_dtype`` to write into (e.g. a slot of a preallocated pool).

    Returns:
        ``out``, or a new array; the launch is asynchronous on the current stream.

    Raises:
        ConfigError: an argument does not fit the plan or is not on the device.
    """
    import cupy

    frames = cuda.as_device_array(frames, "frames")
    if frames.dtype != np.uint8 or not frames.flags.c_contiguous:
        raise ConfigError(f"expected C-contiguous uint8 frames, got {frames.dtype}, strides {frames.strides}")
    shape = plan.output_shape(frames.shape)
    if out is None:
        out = cupy.empty(shape, plan.out_dtype)
    out = cuda.as_device_array(out, "out")
    if out.shape != shape or out.dtype != plan.out_dtype or not out.flags.c_contiguous:
        raise ConfigError(f"expected out C-contiguous {shape} {plan.out_dtype}, got {out.shape} {out.dtype}")
    n, h, w, c = frames.shape
    pixels = h * w
    blocks = min(-(-pixels // _THREADS), _MAX_BLOCKS_PER_IMAGE)
    kernel = cuda.load_function(SOURCE, _FUNCTIONS[plan.dtype])
    scale, bias = plan.scale, plan.bias
    kernel(
        (blocks, n), (_THREADS,),
        (frames, out, np.int64(pixels), np.int32(c), *(np.int32(i) for i in plan.channels),
         *(np.float32(s) for s in scale), *(np.float32(b) for b in bias)),
    )
    return out
