"""Header probing shared by decoders: format by magic bytes, size, orientation, limit.

Everything here reads headers only and allocates nothing in proportion to the
image, so hostile inputs (text, truncated files, decompression bombs) are refused
before any codec sees them. Format is decided by magic bytes, never by file name.
"""

from __future__ import annotations

import io
import logging
import struct
from dataclasses import dataclass

import simplejpeg
from PIL import Image, features

from wanwu.errors import DecodeError, PixelLimitError

logger = logging.getLogger(__name__)

# EXIF orientation -> the transpose that shows the image upright (as ImageOps.exif_transpose).
EXIF_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}

# We check sizes ourselves (PixelLimitError, per-job limit); Pillow's process-wide
# guard would otherwise warn above 89 MP and raise above 179 MP regardless of config.
Image.MAX_IMAGE_PIXELS = None

# Formats we hand to Pillow. A whitelist, because Pillow also "recognises" formats
# with weak or no magic (TGA, XBM text, EPS that shells out to Ghostscript).
PILLOW_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP", "PPM", "JPEG2000")
if features.check("avif"):
    PILLOW_FORMATS += ("AVIF",)

_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"BM", "BMP"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG2000"),
    (b"\xff\x4f\xff\x51", "JPEG2000"),  # raw J2K codestream
)
_AVIF_BRANDS = (b"avif", b"avis")
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "La", "RGBa"})


@dataclass(frozen=True)
class Probe:
    """What the header of one input says."""

    format: str  # "JPEG", "PNG", ... (Pillow's format names)
    width: int  # stored width, before EXIF orientation, in pixels
    height: int  # stored height
    orientation: int = 1  # EXIF orientation tag, 1..8 (1: as stored)
    has_alpha: bool = False  # transparency to composite over white
    colorspace: str = ""  # JPEG only: simplejpeg's "YCbCr", "Gray", "CMYK", ...

    @property
    def display_size(self) -> tuple[int, int]:
        """``(width, height)`` as displayed, after EXIF orientation."""
        if self.orientation in (5, 6, 7, 8):
            return self.height, self.width
        return self.width, self.height


def sniff_format(data: bytes | memoryview) -> str | None:
    """The image format named by the leading magic bytes, or None."""
    head = bytes(data[:16])
    for magic, fmt in _MAGIC:
        if head.startswith(magic):
            return fmt
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if len(head) >= 3 and head[0:1] == b"P" and head[1:2] in b"123456" and head[2:3].isspace():
        return "PPM"
    if head[4:8] == b"ftyp" and head[8:12] in _AVIF_BRANDS and "AVIF" in PILLOW_FORMATS:
        return "AVIF"
    return None


def unrecognised(data: bytes | memoryview) -> DecodeError:
    """The error for bytes no decoder recognises, quoting how they start."""
    return DecodeError(
        f"expected an image, got {len(data)} bytes starting with {bytes(data[:16])!r} "
        "that no decoder recognises"
    )


def check_pixels(width: int, height: int, max_pixels: int) -> None:
    """Raise ``PixelLimitError`` if ``width x height`` exceeds ``max_pixels``."""
    if width * height > max_pixels:
        raise PixelLimitError(
            f"image is {width}x{height} = {width * height:,} pixels, over the limit of "
            f"{max_pixels:,} pixels (max_pixels); refused before decoding"
        )


def open_pillow(data: bytes | memoryview, fmt: str, max_pixels: int) -> Image.Image:
    """Open ``data`` lazily with Pillow (header only) and check the pixel limit.

    Raises:
        DecodeError: Pillow cannot parse the header as ``fmt``.
        PixelLimitError: the image is over ``max_pixels``.
    """
    try:
        im = Image.open(io.BytesIO(data), formats=[fmt])
    except MemoryError:
        raise
    except Exception as exc:  # Pillow's plugins raise many types on hostile headers
        raise DecodeError(
            f"could not read the {fmt} header of {len(data)} bytes: {type(exc).__name__}: {exc}"
        ) from exc
    check_pixels(im.width, im.height, max_pixels)
    return im


def probe(data: bytes | memoryview, max_pixels: int) -> Probe:
    """Read the header of ``data``: format, size, orientation; enforce the pixel limit.

    Raises:
        DecodeError: not a recognised image, or an unreadable header.
        PixelLimitError: the image is over ``max_pixels``.
    """
    fmt = sniff_format(data)
    if fmt is None:
        raise unrecognised(data)
    if fmt == "JPEG":
        try:
            height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
        except ValueError:
            pass  # libjpeg-turbo cannot read some JPEGs (e.g. arithmetic coding): ask Pillow
        else:
            check_pixels(width, height, max_pixels)
            return Probe("JPEG", width, height, jpeg_orientation(data), False, colorspace)
    im = open_pillow(data, fmt, max_pixels)
    return Probe(fmt, im.width, im.height, pillow_orientation(im), pillow_has_alpha(im))


def pillow_has_alpha(im: Image.Image) -> bool:
    """Whether ``im`` (opened, maybe not loaded) carries transparency."""
    return im.mode in _ALPHA_MODES or "transparency" in im.info


def pillow_orientation(im: Image.Image) -> int:
    """EXIF orientation of a lazily opened image, without decoding its pixels.

    PNG's ``getexif()`` would decode the whole image to find an eXIf chunk placed
    after the pixel data; we only read one that precedes it (the common layout).
    """
    if im.format == "PNG" and "exif" not in im.info:
        return 1
    value = im.getexif().get(0x0112, 1)
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def jpeg_orientation(data: bytes | memoryview) -> int:
    """EXIF orientation (1..8) from a JPEG's APP1 segment; 1 when absent or unreadable.

    Walks the marker segments up to the first scan, which is a few dozen bytes of
    work for a typical camera file: much cheaper than ``PIL.Image.open(...).getexif()``.
    """
    n = len(data)
    i = 2  # after SOI
    while i + 4 <= n:
        if data[i] != 0xFF:
            return 1  # lost sync: malformed header, let the codec complain
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0xDA, 0xD9):  # start of scan / end of image: no metadata follows
            return 1
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            i += 2
            continue
        length = (data[i + 2] << 8) | data[i + 3]
        if marker == 0xE1 and bytes(data[i + 4 : i + 10]) == b"Exif\x00\x00":
            return _tiff_orientation(bytes(data[i + 10 : i + 2 + length]))
        i += 2 + length
    return 1


def _tiff_orientation(tiff: bytes) -> int:
    """The Orientation tag (0x0112) of IFD0 in an EXIF TIFF block; 1 if absent."""
    if tiff[:4] == b"II*\x00":
        order = "<"
    elif tiff[:4] == b"MM\x00*":
        order = ">"
    else:
        return 1
    try:
        (ifd,) = struct.unpack_from(order + "I", tiff, 4)
        (count,) = struct.unpack_from(order + "H", tiff, ifd)
        for k in range(count):
            tag, typ, _, value = struct.unpack_from(order + "HHIH", tiff, ifd + 2 + 12 * k)
            if tag == 0x0112:
                return value if typ == 3 and 1 <= value <= 8 else 1
    except struct.error:  # offsets past the end: a truncated or bogus EXIF block
        return 1
    return 1
