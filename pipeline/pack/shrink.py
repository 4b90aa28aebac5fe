"""Shrinking large encoded images to JPEG, for packing archives."""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass

import numpy as np
import simplejpeg
from PIL import Image

from wanwu.errors import ConfigError
from wanwu.stages.decoders.probe import EXIF_TRANSPOSE

logger = logging.getLogger(__name__)

_ORIENTATION_TAG = 0x0112


@dataclass(frozen=True)
class Shrink:
    """Turns encoded images whose shorter side exceeds ``shorter`` into smaller JPEGs.

    Calling it returns ``(value, problem)``: the JPEG bytes of the image upright
    (EXIF orientation applied, no EXIF kept) with its shorter side exactly
    ``shorter``, or the input unchanged when the image is small enough (problem
    ``None``) or cannot be decoded (problem says why). Picklable, for pool workers.
    """

    shorter: int  # target shorter side, in pixels
    quality: int = 90  # JPEG quality, 1-100

    def __post_init__(self) -> None:
        if self.shorter < 1 or not 1 <= self.quality <= 100:
            raise ConfigError(
                f"expected shorter >= 1 and 1 <= quality <= 100, got {self.shorter}, {self.quality}"
            )

    def __call__(self, data: bytes) -> tuple[bytes, str | None]:
        try:
            return shrink_image(data, self.shorter, self.quality), None
        # Pillow raises many types on hostile bytes (OSError, ValueError,
        # SyntaxError, struct.error, DecompressionBombError, ...). Any of them
        # means "keep the bytes": wanwu run then reports the same error.
        except Exception as exc:  # noqa: BLE001
            return data, f"not decodable, stored unchanged: {type(exc).__name__}: {exc}"


def shrink_image(data: bytes, shorter: int, quality: int) -> bytes:
    """``data`` re-encoded as an upright RGB JPEG with shorter side ``shorter``.

    Returns ``data`` itself when its shorter side is already ``<= shorter``.
    Raises whatever Pillow raises for bytes it cannot decode.
    """
    with Image.open(io.BytesIO(data)) as image:
        width, height = image.size
        side = min(width, height)
        if side <= shorter:
            return data
        # The stored (not yet upright) size; rotating later swaps it as needed,
        # and the shorter side is exactly `shorter` because round(side*k/side) == k.
        size = (max(1, round(width * shorter / side)), max(1, round(height * shorter / side)))
        orientation = image.getexif().get(_ORIENTATION_TAG, 1)
        # JPEG only: decode at 1/2, 1/4 or 1/8 scale in the DCT, never below `size`.
        image.draft("RGB", size)
        # BILINEAR in Pillow widens its kernel when shrinking, so it antialiases.
        small = image.convert("RGB").resize(size, Image.Resampling.BILINEAR)
    upright = EXIF_TRANSPOSE.get(orientation)
    if upright is not None:
        small = small.transpose(upright)
    return simplejpeg.encode_jpeg(np.asarray(small), quality=quality, colorspace="RGB")
