"""Small frozen value types that stages declare and the pipeline plans with."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from wanwu.errors import ConfigError, PlanError


@dataclass(frozen=True)
class FrameSpec:
    """What one item a stage produces or consumes looks like, declared before it runs.

    The pipeline chains these (source -> decoder -> classifier), refuses a mismatch
    before any process starts, and sizes its shared-memory slots once from them.
    """

    shape: tuple[int, ...]  # per-item shape, e.g. (224, 224, 3) for HWC uint8 pixels
    dtype: str = "uint8"  # numpy dtype name
    device: str = "cpu"  # "cpu" or "cuda:N": where the producer leaves the data (the consumer takes it)
    layout: str = "HWC"  # axis order of ``shape``: "HWC" pixels, "CHW" planes

    def __post_init__(self) -> None:
        if not self.shape or any(int(d) <= 0 for d in self.shape):
            raise ConfigError(f"FrameSpec shape must be positive dims, got {self.shape!r}")
        np.dtype(self.dtype)  # raises TypeError on an unknown dtype name
        if len(self.layout) != len(self.shape):
            raise ConfigError(f"FrameSpec layout {self.layout!r} must name each of the {len(self.shape)} axes "
                              f"of {self.shape!r}")
        if self.device != "cpu" and not self.device.startswith("cuda"):
            raise ConfigError(f"FrameSpec device must be 'cpu' or 'cuda:N', got {self.device!r}")

    @property
    def nbytes(self) -> int:
        """Bytes one item takes."""
        return int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize

    def describe(self) -> str:
        """E.g. ``(224, 224, 3) uint8 HWC on cpu``, for messages."""
        return f"{tuple(self.shape)} {self.dtype} {self.layout} on {self.device}"


def require_match(producer: str, produced: FrameSpec, consumer: str, consumed: FrameSpec) -> None:
    """Check that what ``producer`` hands over is exactly what ``consumer`` takes.

    Args:
        producer: who makes the frames, for the message, e.g. ``"decoder 'turbo'"``.
        produced: its declared output.
        consumer: who takes them, e.g. ``"classifier 'efficientnet_lite0' (openvino)"``.
        consumed: its declared input.

    Raises:
        PlanError: they differ in shape, dtype, layout or device; the message names both sides.
    """
    if produced != consumed:
        differ = [name for name in ("shape", "dtype", "layout", "device")
                  if getattr(produced, name) != getattr(consumed, name)]
        raise PlanError(f"{producer} produces frames of {produced.describe()}, but {consumer} takes "
                        f"{consumed.describe()} (they differ in {', '.join(differ)})")


@dataclass(frozen=True)
class Preprocess:
    """How a model wants its pixels: resize the shorter side, center-crop, normalise.

    Decoders apply the geometry (``resize_shorter``, ``crop``) and hand over uint8 RGB;
    engines apply ``mean``/``std`` inside their graph.
    """

    resize_shorter: int = 256  # shorter side after resize, in pixels
    crop: int = 224  # side of the square center crop, in pixels
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)  # per channel, on [0, 1] values
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)  # per channel, on [0, 1] values

    def __post_init__(self) -> None:
        if self.crop <= 0 or self.resize_shorter < self.crop:
            raise ConfigError(
                f"expected 0 < crop <= resize_shorter, got crop={self.crop}, "
                f"resize_shorter={self.resize_shorter}"
            )
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ConfigError(f"expected 3 means and 3 positive stds, got {self.mean}, {self.std}")

    @property
    def frame(self) -> FrameSpec:
        """The decoder's output for this preprocessing: crop x crop x 3 uint8, HWC, in host memory."""
        return FrameSpec((self.crop, self.crop, 3), "uint8", "cpu", "HWC")


@dataclass(frozen=True)
class ImageInfo:
    """What a decoder learnt about one image."""

    width: int  # of the original image as displayed (after EXIF orientation), in pixels
    height: int  # likewise
    format: str = ""  # e.g. "JPEG", "PNG"
