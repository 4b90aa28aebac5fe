"""What people write instead of wanwu, each configured as its users would on this CPU.

* ``naive``: a for-loop: Pillow, torchvision transforms, the torch model, one image at a time.
* ``dataloader``: a torch DataLoader (batch 32) with Pillow and torchvision transforms
  feeding the torch model.
* ``openvino dataloader``: the same DataLoader feeding an OpenVINO compiled model of
  the same network, as an OpenVINO user writes it. wanwu's ratio against this row is
  the gain of its architecture (processes, DCT-domain decode, shared memory, uint8
  input), not of its engine.

``baseline_settings`` decides every setting from the CPU alone, by the rules the
libraries' documentation gives, with the precision from the engines' own rule
(``hw.cpu_precision``), so no baseline is handicapped on a CPU that lacks bf16.
Each baseline loads (or compiles) its model and runs it once on a zero batch
before the clock starts, as wanwu's engine warms up before its gate opens.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from wanwu.stages.engines.hw import cpu_precision

logger = logging.getLogger(__name__)

BASELINES = ("naive", "dataloader", "openvino dataloader")
BATCH_SIZE = 32


@dataclass(frozen=True)
class Settings:
    """How one baseline runs; ``describe()`` is what its row states."""

    precision: str  # "bf16" or "fp32": hw.cpu_precision("auto", cpuinfo), the engines' rule
    threads: int  # the model's threads: torch.set_num_threads, or OpenVINO's INFERENCE_NUM_THREADS
    workers: int = 0  # DataLoader worker processes (each runs torch with 1 thread); 0: no DataLoader
    batch_size: int = 1
    channels_last: bool = False  # torch rows: model and input in channels_last memory format
    engine: str = "torch"  # "torch" or "openvino"
    hint: str = ""  # OpenVINO PERFORMANCE_HINT

    def describe(self) -> str:
        """One line: precision, threads, workers, batch, layout, e.g. ``fp32, 2 threads, 2 workers, ...``."""
        parts = [f"{self.engine} {self.precision}", f"{self.threads} threads"]
        if self.workers:
            parts.append(f"{self.workers} workers")
        parts.append(f"batch {self.batch_size}")
        if self.engine == "torch":
            parts.append("channels_last" if self.channels_last else "NCHW")
        if self.hint:
            parts.append(f"{self.hint} hint")
        return ", ".join(parts)


def baseline_settings(name: str, cpuinfo_text: str, cores: int) -> Settings:
    """The settings of baseline ``name`` on the CPU ``cpuinfo_text`` describes, with ``cores`` cores.

    * Precision: the engines' ``auto`` rule, bf16 only with AMX or AVX512-BF16;
      torch emulates bf16 elsewhere (about 5x slower than fp32 on a Zen 3).
    * Threads: one per core for the model (torch's CPU tuning guide; OpenVINO's
      default for INFERENCE_NUM_THREADS is the same). DataLoader workers: one
      per core; torch sets each worker to one thread, so decoding and the model
      share the cores as in wanwu.
    * channels_last: on for the torch rows, where it helps in both precisions
      (efficientnet_lite0, 2 Sapphire Rapids cores: batch 32 fp32 29 -> 53 and
      bf16 58 -> 124 images/s; batch 1 fp32 36 -> 52, bf16 42 -> 65). OpenVINO
      picks its own internal layout, so it does not apply there.
    * OpenVINO: the LATENCY hint (one stream with every thread), since the loop
      runs one synchronous request per batch; THROUGHPUT's streams would sit idle.

    Raises:
        ValueError: ``name`` is not one of ``BASELINES``.
    """
    precision = cpu_precision("auto", cpuinfo_text)
    if name == "naive":
        return Settings(precision, threads=cores, channels_last=True)
    if name == "dataloader":
        return Settings(precision, threads=cores, workers=cores, batch_size=BATCH_SIZE, channels_last=True)
    if name == "openvino dataloader":
        return Settings(precision, threads=cores, workers=cores, batch_size=BATCH_SIZE, engine="openvino",
                        hint="LATENCY")
    raise ValueError(f"expected a baseline in {BASELINES}, got {name!r}")


def _transform(preprocess):  # noqa: ANN001, ANN202 - torchvision types are imported lazily
    from torchvision import transforms as T

    return T.Compose([
        T.Resize(preprocess.resize_shorter),
        T.CenterCrop(preprocess.crop),
        T.ToTensor(),
        T.Normalize(preprocess.mean, preprocess.std),
    ])


def _torch_model(model_name: str, settings: Settings):  # noqa: ANN202
    """(spec, model, run): ``run(x)`` gives logits in ``settings``' precision and layout, warmed up."""
    import contextlib

    import torch

    from wanwu.stages.models.base import get_model_spec

    torch.set_num_threads(settings.threads)
    spec = get_model_spec(model_name)
    model = spec.build_torch().eval()
    layout = torch.channels_last if settings.channels_last else torch.contiguous_format
    model = model.to(memory_format=layout)

    def run(x):  # noqa: ANN001, ANN202
        cast = torch.autocast("cpu", dtype=torch.bfloat16) if settings.precision == "bf16" \
            else contextlib.nullcontext()
        with torch.inference_mode(), cast:
            return model(x.contiguous(memory_format=layout)).float()

    crop = spec.preprocess.crop
    run(torch.zeros(settings.batch_size, 3, crop, crop))
    return spec, run


def naive(paths: Sequence[Path], model_name: str, settings: Settings) -> float:
    """Images/s of the per-image for-loop."""
    from PIL import Image

    spec, run = _torch_model(model_name, settings)
    transform = _transform(spec.preprocess)
    t0 = time.perf_counter()
    for path in paths:
        x = transform(Image.open(path).convert("RGB")).unsqueeze(0)
        run(x).softmax(-1).topk(5)
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


def _loader(paths: Sequence[Path], spec, settings: Settings):  # noqa: ANN001, ANN202
    from torch.utils.data import DataLoader

    return DataLoader(_Files(paths, _transform(spec.preprocess)), batch_size=settings.batch_size,
                      num_workers=settings.workers, persistent_workers=False)


def dataloader(paths: Sequence[Path], model_name: str, settings: Settings) -> float:
    """Images/s of a DataLoader feeding the torch model."""
    spec, run = _torch_model(model_name, settings)
    loader = _loader(paths, spec, settings)
    t0 = time.perf_counter()
    for x in loader:
        run(x).softmax(-1).topk(5)
    return len(paths) / (time.perf_counter() - t0)


def openvino_dataloader(paths: Sequence[Path], model_name: str, settings: Settings) -> float:
    """Images/s of a DataLoader feeding an OpenVINO compiled model (float32 NCHW normalised input)."""
    import warnings

    import openvino as ov
    import torch

    from wanwu.stages.models.base import get_model_spec

    spec = get_model_spec(model_name)
    crop = spec.preprocess.crop
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit")  # OpenVINO's tracing
        model = ov.convert_model(spec.build_torch().eval(), example_input=torch.zeros(1, 3, crop, crop),
                                 input=ov.PartialShape([-1, 3, crop, crop]))
    compiled = ov.Core().compile_model(model, "CPU", {
        "PERFORMANCE_HINT": settings.hint,
        "INFERENCE_PRECISION_HINT": "bf16" if settings.precision == "bf16" else "f32",
        "INFERENCE_NUM_THREADS": settings.threads,
    })
    request = compiled.create_infer_request()
    request.infer({0: torch.zeros(settings.batch_size, 3, crop, crop).numpy()})
    loader = _loader(paths, spec, settings)
    t0 = time.perf_counter()
    for x in loader:
        logits = request.infer({0: x.numpy()})[compiled.output(0)]
        torch.from_numpy(logits).softmax(-1).topk(5)
    return len(paths) / (time.perf_counter() - t0)


RUNNERS = {"naive": naive, "dataloader": dataloader, "openvino dataloader": openvino_dataloader}
