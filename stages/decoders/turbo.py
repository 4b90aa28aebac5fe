"""CPU decoder: libjpeg-turbo (simplejpeg) with DCT-domain downscaling, Pillow for the rest.

A 12 MP camera JPEG needs 224x224 pixels out; decoding it at 1/8 scale in the DCT
domain and resizing only the box that survives the center crop is what makes this
decoder several times faster than a full decode. Everything libjpeg-turbo cannot
do (CMYK, arithmetic coding, non-JPEG formats) goes through Pillow, whose header is
read lazily so the pixel limit is enforced before any pixel buffer exists.
"""

from __future__ import annotations

import logging
import struct
import zlib

import numpy as np
import simplejpeg
from PIL import Image

from wanwu.errors import DecodeError
from wanwu.kernels.geometry import (
    Box,
    clamp_box,
    displayed_size,
    jpeg_min_size,
    resize_crop_box,
    resized_size,
    scale_box,
    stored_box,
)
from wanwu.specs import ImageInfo
from wanwu.stages.decoders.base import Decoder
from wanwu.stages.decoders.probe import (
    EXIF_TRANSPOSE,
    check_pixels,
    jpeg_orientation,
    open_pillow,
    pillow_has_alpha,
    sniff_format,
    unrecognised,
)

logger = logging.getLogger(__name__)

# libjpeg-turbo's TurboJPEG API cannot turn these into RGB correctly (Adobe's
# inverted CMYK in particular); Pillow can.
_PILLOW_JPEG_COLORSPACES = frozenset({"CMYK", "YCCK"})
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
# What Pillow raises on corrupt or truncated pixel data.
_PILLOW_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error)


class TurboDecoder(Decoder):
    """Decodes JPEG with simplejpeg (DCT-scaled) and other formats with Pillow, on CPU."""

    name = "turbo"

    def _decode(self, data: bytes | memoryview, out: np.ndarray) -> ImageInfo:
        fmt = sniff_format(data)
        if fmt is None:
            raise unrecognised(data)
        if fmt == "JPEG":
            info = self._decode_jpeg(data, out)
            if info is not None:
                return info
        return self._decode_pillow(data, fmt, out)

    def _decode_jpeg(self, data: bytes | memoryview, out: np.ndarray) -> ImageInfo | None:
        """Decode with libjpeg-turbo; None means "not for libjpeg-turbo, ask Pillow"."""
        try:
            height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
        except ValueError as exc:
            logger.debug("simplejpeg cannot read the header (%s); trying Pillow", exc)
            return None
        check_pixels(width, height, self.cfg.max_pixels)
        if colorspace in _PILLOW_JPEG_COLORSPACES:
            return None
        orientation = jpeg_orientation(data)
        shown, box = self._box(width, height, orientation)
        min_width, min_height = jpeg_min_size(width, height, self.cfg.preprocess.resize_shorter)
        gray = colorspace == "Gray"  # decode one channel, widen only the crop
        try:
            arr = simplejpeg.decode_jpeg(
                data,
                colorspace="GRAY" if gray else "RGB",
                min_width=min_width,
                min_height=min_height,
            )
        except ValueError as exc:
            # strict=True turns libjpeg's "premature end" warning (grey fill) into an error.
            if "premature end" in str(exc).lower():
                raise DecodeError(
                    f"truncated JPEG: {len(data)} bytes end before the image data does ({exc})"
                ) from exc
            logger.debug("simplejpeg failed (%s); trying Pillow", exc)
            return None
        decoded = Image.fromarray(arr[:, :, 0] if gray else arr)
        box = scale_box(box, (width, height), decoded.size)
        _resize_into(decoded, box, orientation, out)
        return ImageInfo(shown[0], shown[1], "JPEG")

    def _decode_pillow(self, data: bytes | memoryview, fmt: str, out: np.ndarray) -> ImageInfo:
        """Decode any whitelisted format with Pillow (first frame of animations)."""
        im = open_pillow(data, fmt, self.cfg.max_pixels)
        width, height = im.size
        try:
            if fmt == "JPEG":
                # DCT scaling by 1/2, 1/4 or 1/8 while keeping >= the resized size.
                im.draft("RGB", resized_size(width, height, self.cfg.preprocess.resize_shorter))
            im.load()
            orientation = im.getexif().get(0x0112, 1)
            im = _to_rgb_l_or_rgba(im)
        except _PILLOW_ERRORS as exc:
            raise _pillow_error(fmt, data, exc) from exc
        if not (isinstance(orientation, int) and 1 <= orientation <= 8):
            orientation = 1
        shown, box = self._box(width, height, orientation)
        _resize_into(im, scale_box(box, (width, height), im.size), orientation, out)
        return ImageInfo(shown[0], shown[1], fmt)

    def _box(self, width: int, height: int, orientation: int) -> tuple[tuple[int, int], Box]:
        """Displayed size, and the box of stored pixels that becomes the output crop."""
        pre = self.cfg.preprocess
        shown = displayed_size(width, height, orientation)
        box = resize_crop_box(*shown, pre.resize_shorter, pre.crop)
        return shown, stored_box(box, width, height, orientation)


def _pillow_error(fmt: str, data: bytes | memoryview, exc: BaseException) -> DecodeError:
    what = "truncated" if "truncated" in str(exc) else "corrupt"
    return DecodeError(f"{what} {fmt} image ({len(data)} bytes): {type(exc).__name__}: {exc}")


def _to_rgb_l_or_rgba(im: Image.Image) -> Image.Image:
    """Convert a loaded image to 8-bit RGB, L, or RGBA (alpha still to composite).

    L stays one channel (3x less to resize) and alpha is composited after the resize
    (cheaper on 224x224; Pillow resizes RGBA premultiplied, so this is equivalent).
    """
    mode = im.mode
    if mode in ("RGB", "L") and "transparency" not in im.info:
        return im
    if mode in _SIXTEEN_BIT_MODES:
        # Scale 0..65535 to 0..255 (v >> 8 maps 257*k to k exactly); Pillow's own
        # convert("L") clips instead, turning most 16-bit images white.
        arr = np.clip(np.asarray(im), 0, 65535).astype(np.uint16)
        return Image.fromarray((arr >> 8).astype(np.uint8))
    if mode == "F":
        # Float images carry no range; treat <= 1.0 as [0, 1], else as [0, 255].
        arr = np.nan_to_num(np.asarray(im, dtype=np.float32))
        scale = 255.0 if arr.size and float(arr.max()) <= 1.0 else 1.0
        return Image.fromarray(np.clip(arr * scale + 0.5, 0, 255).astype(np.uint8))
    if mode == "1":
        return im.convert("L")
    if pillow_has_alpha(im):
        return im.convert("RGBA")
    return im.convert("RGB")  # P, CMYK (Adobe inversion handled by Pillow), YCbCr, LAB, ...


def _resize_into(im: Image.Image, box: Box, orientation: int, out: np.ndarray) -> None:
    """Resize ``box`` of ``im`` to ``out``'s size, orient it and write 8-bit RGB into ``out``."""
    side = out.shape[0]
    small = im.resize((side, side), Image.Resampling.BILINEAR, box=clamp_box(box, im.size))
    if orientation in EXIF_TRANSPOSE:
        small = small.transpose(EXIF_TRANSPOSE[orientation])
    arr = np.asarray(small)
    if small.mode == "L":
        out[...] = arr[:, :, None]
    elif small.mode == "RGBA":
        rgb = arr[:, :, :3].astype(np.uint16)
        alpha = arr[:, :, 3:].astype(np.uint16)
        out[...] = (rgb * alpha + 255 * (255 - alpha) + 127) // 255  # over white
    else:
        out[...] = arr
