"""Small frozen value types that stages declare and the pipeline plans with."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from wanwu.errors import ConfigError


@dataclass(frozen=True)
class FrameSpec:
    """What one item a stage produces looks like, declared before it runs.

    The pipeline sizes its shared-memory slots once from these.
    """

    shape: tuple[int, ...]  # per-item shape, e.g. (224, 224, 3) for HWC uint8 pixels
    dtype: str = "uint8"  # numpy dtype name
    device: str = "cpu"  # "cpu" or "cuda:N": where the producer leaves the data

    def __post_init__(self) -> None:
        if not self.shape or any(int(d) <= 0 for d in self.shape):
            raise ConfigError(f"FrameSpec shape must be positive dims, got {self.shape!r}")
        np.dtype(self.dtype)  # raises TypeError on an unknown dtype name

    @property
    def nbytes(self) -> int:
        """Bytes one item takes."""
        return int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize


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
        """The decoder's output for this preprocessing: crop x crop x 3 uint8, HWC."""
        return FrameSpec((self.crop, self.crop, 3), "uint8")


@dataclass(frozen=True)
class ImageInfo:
    """What a decoder learnt about one image."""

    width: int  # of the original image as displayed (after EXIF orientation), in pixels
    height: int  # likewise
    format: str = ""  # e.g. "JPEG", "PNG"
