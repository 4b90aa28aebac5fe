"""Real photos for checks, calibration and benchmarks: a deterministic corpus of JPEGs at camera sizes.

30% 640x480, 30% 1280x720, 30% 1920x1080, 10% 4032x3024; a third portrait;
JPEG quality 80 to 95. Content: random crops of the photos scikit-image ships
(real photos, not noise), resized to the target size.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

SIZES = ((640, 480, 0.3), (1280, 720, 0.3), (1920, 1080, 0.3), (4032, 3024, 0.1))  # (w, h, share)


# The photos the check corpus crops from; calibration adds others (see ``CALIBRATION_PHOTOS``).
CHECK_PHOTOS = ("chelsea", "coffee", "astronaut", "rocket")
# Calibration for int8 (stages/engines/quantize.py) crops these with another seed than the
# check corpus, so that the agreement `wanwu models check` measures is on held-out photos.
CALIBRATION_PHOTOS = (*CHECK_PHOTOS, "stereo_motorcycle")


def _photos(names: Sequence[str] = CHECK_PHOTOS) -> list[np.ndarray]:
    import skimage.data as data

    # stereo_motorcycle is a (left, right, disparity) triple: its left view is a photo.
    loaded = [getattr(data, name)() for name in names]
    return [photo[0] if isinstance(photo, tuple) else photo for photo in loaded]


def corpus_sizes(n: int) -> list[tuple[int, int]]:
    """The (width, height) of each of ``n`` images, deterministic, in corpus order."""
    rng = np.random.default_rng(12345)
    sizes = []
    for w, h, share in SIZES:
        sizes += [(w, h)] * round(n * share)
    sizes = (sizes + [SIZES[0][:2]] * n)[:n]
    order = rng.permutation(n)
    sizes = [sizes[i] for i in order]
    return [(h, w) if i % 3 == 0 else (w, h) for i, (w, h) in enumerate(sizes)]


def build_corpus(folder: str | Path, n: int = 300, seed: int = 2024,
                 photos: Sequence[str] = CHECK_PHOTOS) -> list[Path]:
    """Write ``n`` JPEGs into ``folder`` (reusing files already there); return their paths.

    Args:
        folder: where the JPEGs go; a file already there under the same name is kept, so a
            folder must hold one corpus (one ``seed`` and ``photos``) only.
        n: how many.
        seed: the crops and JPEG qualities; the default gives the check and benchmark corpus.
        photos: names of scikit-image's photos to crop from, in turn.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    photos = _photos(photos)
    paths = []
    for i, (w, h) in enumerate(corpus_sizes(n)):
        photo = photos[i % len(photos)]
        quality = int(rng.integers(80, 96))
        crop_frac = rng.uniform(0.55, 1.0)
        path = folder / f"{i:05d}_{w}x{h}.jpg"
        paths.append(path)
        if path.exists():
            continue
        ph, pw = photo.shape[:2]
        # Crop to the target aspect ratio, then resize to the target size.
        ch = int(min(ph, pw * h / w) * crop_frac)
        cw = int(ch * w / h)
        y = int(rng.integers(0, ph - ch + 1))
        x = int(rng.integers(0, pw - cw + 1))
        im = Image.fromarray(photo[y:y + ch, x:x + cw]).resize((w, h), Image.BICUBIC)
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=quality)
        path.write_bytes(buf.getvalue())
    return paths
