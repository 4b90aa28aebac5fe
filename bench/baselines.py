"""What people write instead of wanwu, measured on the same corpus and model.

* ``naive``: a for-loop: Pillow, torchvision transforms, float32 model, one image at a time.
* ``dataloader``: a torch DataLoader (workers = cores, batch 32) with Pillow and
  torchvision transforms, the model in bf16 autocast and channels_last.

Both load the model before the clock starts, as ``wanwu``'s figure excludes start-up.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Sequence

logger = logging.getLogger(__name__)


def _transform(preprocess):  # noqa: ANN001, ANN202 - torchvision types are imported lazily
    from torchvision import transforms as T

    return T.Compose([
        T.Resize(preprocess.resize_shorter),
        T.CenterCrop(preprocess.crop),
        T.ToTensor(),
        T.Normalize(preprocess.mean, preprocess.std),
    ])


def _model(model_name: str):  # noqa: ANN202
    from wanwu.stages.models.base import get_model_spec

    spec = get_model_spec(model_name)
    return spec, spec.build_torch().eval()


def naive(paths: Sequence[Path], model_name: str, threads: int) -> float:
    """Images/s of the per-image float32 for-loop."""
    import torch
    from PIL import Image

    torch.set_num_threads(threads)
    spec, model = _model(model_name)
    transform = _transform(spec.preprocess)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for path in paths:
            x = transform(Image.open(path).convert("RGB")).unsqueeze(0)
            model(x).softmax(-1).topk(5)
    return len(paths) / (time.perf_counter() - t0)


class _Files:
    """A map-style dataset of image files, decoded with Pillow and torchvision transforms."""

    def __init__(self, paths: Sequence[Path], transform) -> None:  # noqa: ANN001
        self.paths, self.transform = list(paths), transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):  # noqa: ANN204
        from PIL import Image

        return self.transform(Image.open(self.paths[i]).convert("RGB"))


def dataloader(paths: Sequence[Path], model_name: str, threads: int, workers: int, batch_size: int = 32) -> float:
    """Images/s of a DataLoader feeding a bf16-autocast, channels_last model."""
    import torch
    from torch.utils.data import DataLoader

    torch.set_num_threads(threads)
    spec, model = _model(model_name)
    model = model.to(memory_format=torch.channels_last)
    loader = DataLoader(_Files(paths, _transform(spec.preprocess)), batch_size=batch_size,
                        num_workers=workers, persistent_workers=False)
    t0 = time.perf_counter()
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        for x in loader:
            model(x.contiguous(memory_format=torch.channels_last)).float().softmax(-1).topk(5)
    return len(paths) / (time.perf_counter() - t0)
