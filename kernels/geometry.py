"""Pure geometry for "resize the shorter side, then center-crop", shared by decoders.

Every box is ``(left, top, right, bottom)`` in continuous pixel coordinates of some
image (pixel ``i`` covers ``[i, i + 1)``), the convention of Pillow's
``Image.resize(box=...)``. No numpy, no codecs: these functions only do arithmetic
and are cheap enough to call once per image.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

Box = tuple[float, float, float, float]

# libjpeg-turbo scales by M/8 in the DCT domain.
_DCT_DENOMINATOR = 8

def resized_size(width: int, height: int, resize_shorter: int) -> tuple[int, int]:
    """Size after resizing the shorter side to ``resize_shorter``, torchvision style.

    The longer side is ``int(resize_shorter * long / short)`` (truncated, as
    ``torchvision.transforms.functional.resize`` computes it).
    """
    _check_size(width, height)
    if width <= height:
        return resize_shorter, int(resize_shorter * height / width)
    return int(resize_shorter * width / height), resize_shorter


def resize_crop_box(width: int, height: int, resize_shorter: int, crop: int) -> Box:
    """The source box whose resize to ``crop x crop`` equals resize-then-center-crop.

    Resizing the whole ``width x height`` image so its shorter side is
    ``resize_shorter`` and then taking the centered ``crop x crop`` square (torchvision
    ``CenterCrop`` offsets: ``int(round((size - crop) / 2))``) samples exactly the
    same points as resizing only this box to ``crop x crop``; the pixels outside it
    are never resized. Requires ``crop <= resize_shorter``.

    Returns:
        ``(left, top, right, bottom)`` in source-pixel coordinates, floats.
    """
    if crop <= 0 or crop > resize_shorter:
        raise ValueError(f"expected 0 < crop <= resize_shorter, got {crop}, {resize_shorter}")
    new_w, new_h = resized_size(width, height, resize_shorter)
    scale_x, scale_y = width / new_w, height / new_h
    left = int(round((new_w - crop) / 2.0))
    top = int(round((new_h - crop) / 2.0))
    return (left * scale_x, top * scale_y, (left + crop) * scale_x, (top + crop) * scale_y)


def scale_box(box: Box, from_size: tuple[int, int], to_size: tuple[int, int]) -> Box:
    """Map ``box`` from an image of ``from_size`` to the same image stored at ``to_size``.

    Used when a codec decoded a smaller copy (DCT scaling, Pillow ``draft``).
    """
    sx = to_size[0] / from_size[0]
    sy = to_size[1] / from_size[1]
    left, top, right, bottom = box
    return (left * sx, top * sy, right * sx, bottom * sy)


def clamp_box(box: Box, size: tuple[int, int]) -> Box:
    """``box`` clipped to an image of ``size``, absorbing float rounding at the edges.

    Pillow refuses a box that pokes out of the image by even 1e-12 of a pixel.
    """
    width, height = size
    left, top, right, bottom = box
    return (max(0.0, left), max(0.0, top), min(float(width), right), min(float(height), bottom))


def jpeg_min_size(width: int, height: int, resize_shorter: int) -> tuple[int, int]:
    """``(min_width, min_height)`` for simplejpeg's DCT-domain downscaling.

    simplejpeg decodes at the smallest libjpeg-turbo factor ``M/8`` (``M`` in 1..8)
    whose scaled size (``ceil(side * M / 8)``) is at least ``min_width`` wide and
    ``min_height`` high (``0``: no constraint); it never upscales. We ask for the
    smallest power-of-two factor (1/8, 1/4, 1/2, 1) that keeps the shorter side
    ``>= resize_shorter``: the odd factors 3/8..7/8 use slow generic IDCTs, measured
    slower than a full decode, and blur more. Constraining only the shorter side
    suffices, as the longer side scales by the same factor.

    Returns:
        ``(0, 0)`` when no factor below 1 keeps the shorter side large enough.
    """
    _check_size(width, height)
    short = min(width, height)
    for m in (1, 2, 4):
        scaled_short = -(-short * m // _DCT_DENOMINATOR)  # ceil, as libjpeg-turbo
        if scaled_short >= resize_shorter:
            break
    else:
        return 0, 0
    return (scaled_short, 0) if width <= height else (0, scaled_short)


# EXIF orientation -> how a box in the displayed image maps to the stored image.
# ``w``/``h`` are the stored size. The formulas invert the Pillow transpose that
# ``ImageOps.exif_transpose`` applies for each tag (2: FLIP_LEFT_RIGHT, 3: ROTATE_180,
# 4: FLIP_TOP_BOTTOM, 5: TRANSPOSE, 6: ROTATE_270, 7: TRANSVERSE, 8: ROTATE_90).
_ORIENT_BOX = {
    1: lambda l, t, r, b, w, h: (l, t, r, b),
    2: lambda l, t, r, b, w, h: (w - r, t, w - l, b),
    3: lambda l, t, r, b, w, h: (w - r, h - b, w - l, h - t),
    4: lambda l, t, r, b, w, h: (l, h - b, r, h - t),
    5: lambda l, t, r, b, w, h: (t, l, b, r),
    6: lambda l, t, r, b, w, h: (t, h - r, b, h - l),
    7: lambda l, t, r, b, w, h: (w - b, h - r, w - t, h - l),
    8: lambda l, t, r, b, w, h: (w - b, l, w - t, r),
}


def displayed_size(width: int, height: int, orientation: int) -> tuple[int, int]:
    """Size as displayed: EXIF orientations 5-8 swap width and height."""
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def stored_box(box: Box, width: int, height: int, orientation: int) -> Box:
    """Map a box in the displayed (EXIF-rotated) image back to the stored image.

    Resizing the returned box of the stored pixels and then applying the
    orientation's transpose to the (small) result equals cropping ``box`` out of the
    fully transposed image, so only ``crop x crop`` pixels are ever rotated.

    Args:
        box: in displayed coordinates.
        width: stored width (before orientation).
        height: stored height.
        orientation: EXIF tag value 1..8; anything else is treated as 1.
    """
    fn = _ORIENT_BOX.get(orientation, _ORIENT_BOX[1])
    return fn(*box, width, height)


def _check_size(width: int, height: int) -> None:
    if width <= 0 or height <= 0:
        raise ValueError(f"expected a positive image size, got {width}x{height}")
