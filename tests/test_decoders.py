"""Decoders driven by hand on real photos (scikit-image's) and real hostile files.

Every decoder is compared with a plain reference: Pillow full decode, EXIF transpose,
alpha over white, resize of the shorter side to 256 (bilinear, antialiased,
torchvision's rounding), center crop 224.
"""

from __future__ import annotations

import io
import pickle
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile, ImageOps
from skimage import data as skdata

from wanwu.errors import DecodeError, InputError, PixelLimitError, StageError
from wanwu.kernels.geometry import jpeg_min_size, resize_crop_box, stored_box
from wanwu.specs import ImageInfo, Preprocess
from wanwu.stages.decoders.base import DECODERS, DecodeConfig, create_decoder

try:
    import nvidia.dali  # noqa: F401

    HAS_DALI = True
except ImportError:
    HAS_DALI = False

NEEDS_DALI = pytest.mark.skipif(not HAS_DALI, reason="nvidia.dali cannot be imported")
DECODER_NAMES = ["turbo", pytest.param("dali", marks=NEEDS_DALI)]
CROP = 224
MAX_MEAN_ABS_DIFF = 4.0  # on 0..255: different JPEG IDCT scalings, not different images


# ---- real images, made on the fly -------------------------------------------------


def photo(name: str = "chelsea", size: tuple[int, int] | None = None) -> Image.Image:
    im = Image.fromarray(getattr(skdata, name)())
    return im.resize(size, Image.Resampling.BICUBIC) if size else im


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def with_alpha(im: Image.Image) -> Image.Image:
    """``im`` with its left third fully transparent."""
    rgba = np.asarray(im.convert("RGBA")).copy()
    rgba[:, : im.width // 3, 3] = 0
    return Image.fromarray(rgba)


def png_of_zeros(width: int, height: int) -> bytes:
    """A valid 1-bit grayscale PNG of zeros, streamed so the pixels never exist here."""

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

    rows = bytes((1 + (width + 7) // 8) * 1000)  # filter byte + packed bits, 1000 rows
    comp = zlib.compressobj(6)
    idat = b"".join(comp.compress(rows) for _ in range(height // 1000)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def reference(data: bytes, resize_shorter: int = 256, crop: int = CROP) -> np.ndarray:
    im = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    if im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info:
        im = Image.alpha_composite(Image.new("RGBA", im.size, "white"), im.convert("RGBA"))
    im = im.convert("RGB")
    w, h = im.size
    rs = resize_shorter
    new = (rs, int(rs * h / w)) if w <= h else (int(rs * w / h), rs)
    im = im.resize(new, Image.Resampling.BILINEAR)
    left, top = int(round((new[0] - crop) / 2)), int(round((new[1] - crop) / 2))
    return np.asarray(im.crop((left, top, left + crop, top + crop)))


def exif_bytes(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


def mad(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def gif_two_frames() -> bytes:
    first, second = photo("chelsea").convert("P"), photo("coffee", (451, 300)).convert("P")
    return encode(first, "GIF", save_all=True, append_images=[second], duration=100)


CAT = photo("chelsea")  # 451x300, not square
CASES = {
    "jpeg": encode(CAT, "JPEG", quality=90),
    "jpeg-progressive": encode(CAT, "JPEG", quality=90, progressive=True),
    "jpeg-gray": encode(CAT.convert("L"), "JPEG", quality=90),
    "jpeg-cmyk": encode(CAT.convert("CMYK"), "JPEG", quality=90),
    "jpeg-1920x1080": encode(photo("coffee", (1920, 1080)), "JPEG", quality=90),
    "png": encode(CAT, "PNG"),
    "png-palette": encode(CAT.convert("P"), "PNG"),
    "png-gray": encode(CAT.convert("L"), "PNG"),
    "png-rgba": encode(with_alpha(CAT), "PNG"),
    "webp": encode(CAT, "WEBP", quality=90),
    "bmp": encode(CAT, "BMP"),
    "tiff": encode(CAT, "TIFF"),
    "gif-2-frames": gif_two_frames(),
}
LARGE_JPEG = encode(photo("astronaut", (4032, 3024)), "JPEG", quality=90)


@pytest.fixture(scope="module", params=DECODER_NAMES)
def decoder(request):
    dec = create_decoder(request.param, DecodeConfig())
    yield dec
    dec.shutdown()


def decode(dec, data: bytes | memoryview) -> tuple[ImageInfo, np.ndarray]:
    out = np.zeros(dec.output_spec().shape, np.uint8)
    return dec.decode_into(data, out), out


# ---- formats --------------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(CASES))
def test_formats_match_reference(decoder, case):
    info, out = decode(decoder, CASES[case])
    ref_im = Image.open(io.BytesIO(CASES[case]))
    assert (info.width, info.height) == ref_im.size
    assert info.format == ref_im.format
    # Same codec as the reference for all but JPEG: then only box rounding differs.
    assert mad(out, reference(CASES[case])) < (MAX_MEAN_ABS_DIFF if "jpeg" in case else 1.0)


def test_large_jpeg_dct_scaled_matches_reference(decoder):
    info, out = decode(decoder, LARGE_JPEG)
    assert info == ImageInfo(4032, 3024, "JPEG")
    assert mad(out, reference(LARGE_JPEG)) < MAX_MEAN_ABS_DIFF


def test_sixteen_bit_png_is_scaled_not_clipped(decoder):
    gray8 = np.asarray(CAT.convert("L"))
    png16 = encode(Image.fromarray(gray8.astype(np.uint16) * 257), "PNG")
    assert Image.open(io.BytesIO(png16)).mode.startswith("I;16")
    _, out16 = decode(decoder, png16)
    _, out8 = decode(decoder, encode(Image.fromarray(gray8), "PNG"))
    assert mad(out16, out8) < 1.0


def test_transparent_area_becomes_white(decoder):
    _, out = decode(decoder, CASES["png-rgba"])
    # Left third of the 451x300 source is transparent; after resize (385x256) and
    # crop (offset 80) that is output columns < 150 * 256 / 300 - 80 = 48.
    assert out[:, :40].min() >= 254
    assert out[:, 60:].mean() < 200  # the cat, not white


def test_gif_first_frame(decoder):
    data = CASES["gif-2-frames"]
    _, out = decode(decoder, data)
    second = Image.open(io.BytesIO(data))
    second.seek(1)
    second_ref = reference(encode(second.convert("RGB"), "PNG"))
    assert mad(out, reference(data)) < 1.0
    assert mad(out, second_ref) > 10.0


@pytest.mark.parametrize(
    "orientation, transpose", [(6, Image.Transpose.ROTATE_270), (8, Image.Transpose.ROTATE_90)]
)
@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "TIFF"])
def test_exif_orientation(decoder, orientation, transpose, fmt):
    info, out = decode(decoder, encode(CAT, fmt, exif=exif_bytes(orientation)))
    assert (info.width, info.height) == (300, 451)
    _, upright = decode(decoder, encode(CAT.transpose(transpose), fmt))
    assert mad(out, upright) < MAX_MEAN_ABS_DIFF


def test_format_comes_from_bytes_not_extension(decoder, tmp_path):
    path = tmp_path / "photo.jpg"
    path.write_bytes(CASES["png"])
    info, out = decode(decoder, memoryview(path.read_bytes()))
    assert info.format == "PNG"
    assert mad(out, reference(CASES["png"])) < 1.0


@pytest.fixture(scope="module")
def turbo_and_dali():
    pair = [create_decoder(name, DecodeConfig()) for name in ("turbo", "dali")]
    yield pair
    for dec in pair:
        dec.shutdown()


@NEEDS_DALI
@pytest.mark.parametrize("case", ["large", "jpeg", "jpeg-1920x1080", "jpeg-cmyk", "png", "tiff"])
def test_turbo_and_dali_agree(turbo_and_dali, case):
    data = LARGE_JPEG if case == "large" else CASES[case]
    (_, a), (_, b) = (decode(dec, data) for dec in turbo_and_dali)
    assert mad(a, b) < MAX_MEAN_ABS_DIFF


# ---- hostile inputs -------------------------------------------------------------

NOT_AN_IMAGE = "no decoder recognises"
BAD_INPUTS = {
    "empty": (b"", "0 bytes"),
    "truncated-jpeg": (CASES["jpeg"][: len(CASES["jpeg"]) // 2], "truncated"),
    "truncated-png": (CASES["png"][: len(CASES["png"]) // 2], "truncated"),
    "random-bytes": (np.random.default_rng(7).bytes(4096), NOT_AN_IMAGE),
    "utf8-text": ("万物识别: not an image\n".encode() * 20, NOT_AN_IMAGE),
    "html": (b"<!DOCTYPE html><html><body><img src='cat.jpg'></body></html>", NOT_AN_IMAGE),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_inputs_raise_input_errors(decoder, case):
    data, words = BAD_INPUTS[case]
    assert not ImageFile.LOAD_TRUNCATED_IMAGES
    with pytest.raises(DecodeError, match=words):
        decode(decoder, data)


def test_decompression_bomb_refused_before_decoding(decoder, monkeypatch):
    bomb = png_of_zeros(12000, 12000)
    assert len(bomb) < 100_000

    def no_pixels(*args, **kwargs):
        raise AssertionError("pixels were decoded before the limit check")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_pixels)
    with pytest.raises(PixelLimitError, match=r"12000x12000.*100,000,000"):
        decode(decoder, bomb)


def test_jpeg_header_over_limit(decoder):
    jpeg = bytearray(CASES["jpeg"])
    sof = jpeg.index(b"\xff\xc0")  # baseline SOF: length(2) precision(1) height(2) width(2)
    jpeg[sof + 5 : sof + 9] = struct.pack(">HH", 60000, 60000)
    with pytest.raises(PixelLimitError, match="60000x60000"):
        decode(decoder, bytes(jpeg))


@pytest.mark.parametrize("name", DECODER_NAMES)
def test_small_pixel_limit(name):
    dec = create_decoder(name, DecodeConfig(max_pixels=1000))
    with pytest.raises(PixelLimitError, match=r"451x300.*1,000"):
        decode(dec, CASES["jpeg"])
    with pytest.raises(PixelLimitError):
        decode(dec, CASES["png"])
    dec.shutdown()


def test_batch_mixes_results_and_errors_in_order(decoder):
    truncated = BAD_INPUTS["truncated-jpeg"][0]
    datas = [CASES["jpeg"], b"hello", CASES["png-rgba"], truncated, CASES["gif-2-frames"], b""]
    outs = [np.zeros((CROP, CROP, 3), np.uint8) for _ in datas]
    results = decoder.decode_batch_into(datas, outs)
    assert [type(r) for r in results] == [ImageInfo, DecodeError] * 3
    assert all(isinstance(r, InputError) for r in results[1::2])
    for k in (0, 2, 4):
        assert mad(outs[k], reference(datas[k])) < MAX_MEAN_ABS_DIFF


@NEEDS_DALI
def test_dali_splits_batches_larger_than_its_pipeline():
    from wanwu.stages.decoders.dali import DaliDecoder

    dec = DaliDecoder(DecodeConfig(), max_batch_size=2)
    datas = [CASES["jpeg"], CASES["png"], CASES["bmp"], b"junk", CASES["jpeg-gray"]]
    outs = [np.zeros((CROP, CROP, 3), np.uint8) for _ in datas]
    results = dec.decode_batch_into(datas, outs)
    assert isinstance(results[3], DecodeError)
    for k in (0, 1, 2, 4):
        assert isinstance(results[k], ImageInfo)
        assert mad(outs[k], reference(datas[k])) < MAX_MEAN_ABS_DIFF
    dec.shutdown()
    dec.shutdown()  # safe twice


# ---- interface --------------------------------------------------------------------


def test_out_buffer_is_checked(decoder):
    for bad in (np.zeros((CROP, CROP, 4), np.uint8), np.zeros((CROP, CROP, 3), np.float32)):
        with pytest.raises(StageError, match="expected an output buffer"):
            decoder.decode_into(CASES["jpeg"], bad)
    with pytest.raises(StageError, match="one output per input"):
        decoder.decode_batch_into([CASES["jpeg"]], [])


def test_custom_geometry(decoder):
    dec = type(decoder)(DecodeConfig(Preprocess(resize_shorter=160, crop=128)))
    info, out = decode(dec, LARGE_JPEG)
    assert out.shape == (128, 128, 3) and info.width == 4032
    assert mad(out, reference(LARGE_JPEG, 160, 128)) < MAX_MEAN_ABS_DIFF
    dec.shutdown()


def test_registry_and_config():
    assert {"turbo", "dali"} <= set(DECODERS.names())
    assert create_decoder("auto", DecodeConfig()).name == "turbo"
    cfg = DecodeConfig(Preprocess(resize_shorter=320, crop=288), max_pixels=5_000_000)
    assert pickle.loads(pickle.dumps(cfg)) == cfg


# ---- geometry kernels -------------------------------------------------------------


def test_resize_crop_box_follows_torchvision_rounding():
    # 4032x3024: resized to 341x256, crop offset round(58.5) = 58 (banker's rounding).
    left, top, right, bottom = resize_crop_box(4032, 3024, 256, 224)
    assert (left, top) == pytest.approx((58 * 4032 / 341, 16 * 3024 / 256))
    assert (right - left, bottom - top) == pytest.approx((224 * 4032 / 341, 224 * 3024 / 256))


def test_jpeg_min_size_picks_power_of_two_scales():
    assert jpeg_min_size(4032, 3024, 256) == (0, 378)  # 1/8
    assert jpeg_min_size(3024, 4032, 256) == (378, 0)
    assert jpeg_min_size(1920, 1080, 256) == (0, 270)  # 1/4
    assert jpeg_min_size(800, 600, 256) == (0, 300)  # 1/2
    assert jpeg_min_size(640, 480, 256) == (0, 0)  # full size


@pytest.mark.parametrize("orientation", range(1, 9))
def test_stored_box_inverts_exif_transpose(orientation):
    src = Image.fromarray(np.arange(7 * 11 * 3, dtype=np.uint8).reshape(7, 11, 3))
    box = (1, 2, 4, 6)
    source = tuple(int(v) for v in stored_box(box, 11, 7, orientation))
    expected = np.asarray(oriented(src, orientation).crop(box))
    np.testing.assert_array_equal(np.asarray(oriented(src.crop(source), orientation)), expected)


def oriented(im: Image.Image, orientation: int) -> Image.Image:
    """``im`` as displayed if it carried EXIF ``orientation`` (ImageOps is the spec)."""
    tagged = im.copy()
    tagged.info["exif"] = exif_bytes(orientation)
    return ImageOps.exif_transpose(tagged)


def test_auto_decoder_on_cuda_falls_back_to_turbo_where_dali_is_not_installed():
    import subprocess
    import sys

    # A real interpreter in which nvidia.dali cannot be imported (as on a GPU image without
    # the 'dali' extra): auto must pick the CPU decoder there rather than fail the job.
    code = ("import sys; sys.modules['nvidia.dali'] = None; "
            "from wanwu.stages.decoders.base import resolve_decoder_name as r; "
            "print(r('auto', 'cuda:0'), r('auto', 'cpu'), r('dali', 'cuda:0'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.split() == ["turbo", "turbo", "dali"]
    if HAS_DALI:
        from wanwu.stages.decoders.base import resolve_decoder_name

        assert resolve_decoder_name("auto", "cuda:0") == "dali"
