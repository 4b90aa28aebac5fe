"""Shared fixtures: real photos (shipped by scikit-image), hostile files, and a way to run the CLI."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parent.parent

# ImageNet classes a correct model gives these photos (top-1).
CAT_CLASSES = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
COFFEE_CLASSES = {967, 968}  # espresso, cup


@pytest.fixture(scope="session", autouse=True)
def _engine_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """One compiled-model cache per test session, shared by the CLI's processes."""
    os.environ.setdefault("WANWU_CACHE_DIR", str(tmp_path_factory.mktemp("wanwu-cache")))


@pytest.fixture(scope="session")
def photos() -> dict[str, np.ndarray]:
    """Real photos as RGB uint8 arrays."""
    import skimage.data as data

    return {"chelsea": data.chelsea(), "coffee": data.coffee(), "astronaut": data.astronaut(),
            "rocket": data.rocket()}


def jpeg_bytes(arr: np.ndarray, quality: int = 90, size: tuple[int, int] | None = None) -> bytes:
    im = Image.fromarray(arr)
    if size:
        im = im.resize(size, Image.BICUBIC)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def bomb_png() -> bytes:
    """A real, valid PNG of 12000 x 12000 black pixels: a few hundred kB, 144 megapixels."""
    buf = io.BytesIO()
    Image.new("L", (12000, 12000)).save(buf, "PNG", optimize=False)
    return buf.getvalue()


def write_hostile(folder: Path, photos: dict[str, np.ndarray]) -> dict[str, str]:
    """Bad inputs, each named by key, with the error type each must produce."""
    folder.mkdir(parents=True, exist_ok=True)
    good = jpeg_bytes(photos["coffee"])
    files = {
        "empty.jpg": (b"", "ReadError"),
        "truncated.jpg": (good[: len(good) // 2], "DecodeError"),
        "notes.jpg": ("这不是图片 this is not an image\n".encode(), "DecodeError"),
        "random.png": (np.random.default_rng(0).bytes(5000), "DecodeError"),
        "bomb.png": (bomb_png(), "PixelLimitError"),
    }
    for name, (data, _) in files.items():
        (folder / name).write_bytes(data)
    return {name: err for name, (_, err) in files.items()}


def write_photos(folder: Path, photos: dict[str, np.ndarray]) -> dict[str, str]:
    """Good photos under awkward names; returns key -> photo name."""
    (folder / "子目录 sub").mkdir(parents=True, exist_ok=True)
    layout = {
        "猫 chelsea.jpg": ("chelsea", jpeg_bytes(photos["chelsea"])),
        "子目录 sub/coffee big.JPG": ("coffee", jpeg_bytes(photos["coffee"], size=(1800, 1200))),
        "astronaut.png": ("astronaut", png_bytes(photos["astronaut"])),
        "coffee-really-png.jpg": ("coffee", png_bytes(photos["coffee"])),  # wrong extension, still an image
        "rocket.webp": ("rocket", _encode(photos["rocket"], "WEBP")),
    }
    for key, (_, data) in layout.items():
        (folder / key).write_bytes(data)
    return {key: name for key, (name, _) in layout.items()}


def _encode(arr: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt)
    return buf.getvalue()


def make_corpus(folder: Path, photos: dict[str, np.ndarray], n: int) -> list[str]:
    """``n`` JPEGs of varied sizes cropped from the real photos; returns their keys."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    names = sorted(photos)
    keys = []
    for i in range(n):
        arr = photos[names[i % len(names)]]
        h, w = arr.shape[:2]
        ch, cw = int(h * rng.uniform(0.6, 1.0)), int(w * rng.uniform(0.6, 1.0))
        y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        scale = rng.uniform(0.8, 2.5)
        crop = arr[y:y + ch, x:x + cw]
        key = f"{i // 50:02d}/img_{i:05d}.jpg"
        (folder / key).parent.mkdir(exist_ok=True)
        (folder / key).write_bytes(jpeg_bytes(crop, size=(int(cw * scale), int(ch * scale))))
        keys.append(key)
    return keys


def wanwu_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "wanwu", *args]


def run_wanwu(*args: str, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    """Run the real CLI in a child process."""
    return subprocess.run(wanwu_cmd(*args), capture_output=True, text=True, timeout=timeout, **kwargs)
