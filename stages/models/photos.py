"""Real photos for checks, calibration and benchmarks: a deterministic corpus of JPEGs at camera sizes.

30% 640x480, 30% 1280x720, 30% 1920x1080, 10% 4032x3024; a third portrait;
JPEG quality 80 to 95. Content: random crops of the photos scikit-image ships
(real photos, not noise), resized to the target size.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

SIZES = ((640, 480, 0.3), (1280, 720, 0.3), (1920, 1080, 0.3), (4032, 3024, 0.1))  # (w, h, share)


def _photos() -> list[np.ndarray]:
    import skimage.data as data

    return [data.chelsea(), data.coffee(), data.astronaut(), data.rocket()]


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


def build_corpus(folder: str | Path, n: int = 300) -> list[Path]:
    """Write ``n`` JPEGs into ``folder`` (reusing files already there); return their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(2024)
    photos = _photos()
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
