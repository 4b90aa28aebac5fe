"""Inference engines turn a batch of uint8 NHWC pixels into float32 logits.

Normalisation (mean/std), the cast and the layout change happen inside the
engine, so decoders hand over plain uint8 and the batch crosses shared memory
(and later PCIe) at a quarter of the float32 size.
"""

from __future__ import annotations

import logging
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from wanwu.errors import ConfigError, EngineError
from wanwu.registry import Registry
from wanwu.specs import FrameSpec
from wanwu.stages.engines.hw import PRECISIONS

from wanwu.stages.models.base import ModelSpec

logger = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    """Where engines keep compiled models: ``$WANWU_CACHE_DIR`` or ``~/.cache/wanwu``."""
    env = os.environ.get("WANWU_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "wanwu"


# Top-2 logit margin under which "auto" precision recomputes a bf16 answer in fp32.
# On 300 and 600 real photos (wanwu.stages.models.photos) plain bf16 changed the top-1 class
# of 3% of images for EfficientNet-Lite0, all with bf16 margins under 0.3; 0.25
# rechecks ~15% of images and kept 99.7-100% agreement with fp32.
RECHECK_MARGIN = 0.25
# The same for "int8+fp32". NNCF's int8 (stages/engines/quantize.py) changed 5.3% of
# EfficientNet-Lite0's top-1 answers on 600 held-out photos; 99.5% agreement needed a
# margin of 0.23 there (`wanwu models check` prints it), 100% one of 0.33-0.35 across
# recipes and calibration sizes. 0.3 leaves headroom over 0.23 and rechecks ~19%.
INT8_RECHECK_MARGIN = 0.3
RECHECK_MARGINS = {"bf16": RECHECK_MARGIN, "int8": INT8_RECHECK_MARGIN}


@dataclass(frozen=True)
class EngineConfig:
    """Engine settings, passed explicitly.

    Precision: "fp32"; "bf16" (everything in bf16, fastest, on engines that have
    it); "auto": fp32, or, where the hardware has native bf16 (or on a GPU), bf16
    with the near ties (top-2 logit margin under the recheck margin) recomputed in
    fp32, so that bf16 changes almost no top-1 answer; "int8": the model quantized
    with NNCF (OpenVINO only, needs ``wanwu[int8]``); "int8+fp32": int8 with the
    near ties recomputed in fp32. auto never picks int8 (``hw.cpu_precision``).
    """

    device: str = "cpu"  # "cpu" or "cuda:N"
    precision: str = "auto"  # one of hw.PRECISIONS (see above)
    threads: int = 0  # compute threads; 0 means all cores
    max_batch_size: int = 32  # largest batch infer() will be given
    cache_dir: str = ""  # compiled-model cache; "" means default_cache_dir()
    recheck_margin: float | None = None  # recompute in fp32 below this top-2 logit margin; None: RECHECK_MARGINS
    calibration: str = ""  # int8: folder of calibration photos; "" means the built-in set (quantize.py)

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        margin = 0.0 if self.recheck_margin is None else self.recheck_margin
        if self.max_batch_size <= 0 or self.threads < 0 or margin < 0:
            raise ConfigError(
                f"expected max_batch_size > 0, threads >= 0 and recheck_margin >= 0, got "
                f"{self.max_batch_size}, {self.threads}, {self.recheck_margin}"
            )
        if self.calibration and not self.precision.startswith("int8"):
            raise ConfigError(f"expected --calibration only with --precision int8 or int8+fp32, "
                              f"got --precision {self.precision}")

    @property
    def cache_path(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir else default_cache_dir()

    def margin_for(self, compute: str) -> float:
        """The recheck margin of answers computed in ``compute`` ("bf16" or "int8")."""
        return RECHECK_MARGINS.get(compute, 0.0) if self.recheck_margin is None else self.recheck_margin


# Model formats (ModelSpec.format) each engine runs. Kept here, not on the engine
# classes, so `auto` can choose without importing OpenVINO or torch.
ENGINE_FORMATS: dict[str, tuple[str, ...]] = {
    "openvino": ("torch", "onnx", "openvino"),
    "torch": ("torch",),
    "onnxruntime": ("torch", "onnx"),
}


def check_engine_runs(engine: str, model: ModelSpec) -> None:
    """Raise ``EngineError`` unless ``engine`` can run ``model``'s format (a torch module or a file)."""
    formats = ENGINE_FORMATS.get(engine, ("torch",))
    if model.format not in formats:
        able = [name for name, runs in ENGINE_FORMATS.items() if model.format in runs]
        raise EngineError(
            f"expected a model the {engine} engine can run ({', '.join(formats)}), got {model.name!r}, "
            f"an {model.format} file ({model.path}); use --engine {' or '.join(able)} or auto"
        )


class Engine(ABC):
    """Base of every engine. Subclasses implement ``_load`` and ``_infer``.

    Raises ``EngineError`` on construction when the engine cannot run the model's
    format (see ``ENGINE_FORMATS``).
    """

    name: ClassVar[str] = "base"
    int8: ClassVar[bool] = False  # whether the engine runs the int8 precisions

    def __init__(self, model: ModelSpec, cfg: EngineConfig) -> None:
        check_engine_runs(self.name, model)
        if cfg.precision.startswith("int8") and not self.int8:
            raise EngineError(f"expected precision auto, bf16 or fp32 for the {self.name} engine, got "
                              f"{cfg.precision}; int8 runs on --engine openvino")
        self.model = model
        self.cfg = cfg
        self.precision = "fp32"  # what the engine actually runs in, set by _load ("bf16+fp32": rechecked)
        self.rechecked = 0  # images whose bf16 or int8 answer was recomputed in fp32
        self.last_exact = np.empty(0, np.intp)  # rows of the last batch answered by the fp32 recheck
        self._recheck = False  # set by _load when near ties are recomputed with _infer_exact
        self._loaded = False
        self._closed = False

    @classmethod
    def declare_input(cls, model: ModelSpec, cfg: EngineConfig) -> FrameSpec:
        """One item of the batches ``infer`` takes, known before anything is built.

        Every engine here takes crop x crop x 3 uint8 HWC pixels in host memory (a GPU
        engine copies the batch to its device itself). Planning calls this on the base
        class, so that choosing a plan imports no backend.
        """
        return model.preprocess.frame

    def input_spec(self) -> FrameSpec:
        """One item of the batch ``infer`` takes (``declare_input`` of this engine)."""
        return self.declare_input(self.model, self.cfg)

    def load(self) -> None:
        """Build or load the compiled model and warm it up. Idempotent."""
        if not self._loaded:
            self._load()
            self._loaded = True
            self.infer(np.zeros((1, *self.input_spec().shape), np.uint8))

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """Logits for ``batch``. Do not override: implement ``_infer``.

        Args:
            batch: uint8 array of shape (n, crop, crop, 3), 1 <= n <= max_batch_size.

        Returns:
            float32 array of shape (n, num_classes). With a recheck, the rows listed in
            ``last_exact`` were recomputed in fp32.
        """
        if not self._loaded:
            self.load()
        shape = self.input_spec().shape
        if batch.dtype != np.uint8 or batch.ndim != 4 or batch.shape[1:] != shape:
            raise EngineError(f"expected a uint8 batch of shape (n, {', '.join(map(str, shape))}), got {batch.shape} {batch.dtype}")
        n = batch.shape[0]
        if not 1 <= n <= self.cfg.max_batch_size:
            raise EngineError(f"expected 1 to {self.cfg.max_batch_size} images, got {n}")
        logits = np.asarray(self._infer(batch), dtype=np.float32)
        if logits.shape != (n, self.model.num_classes):
            raise EngineError(f"expected logits of shape {(n, self.model.num_classes)}, got {logits.shape}")
        self.last_exact = np.empty(0, np.intp)
        if self._recheck and self.model.num_classes > 1:
            top2 = np.partition(logits, -2, axis=1)[:, -2:]  # linear in the classes, like top-k
            margin = self.cfg.margin_for(self.precision.partition("+")[0])
            near = np.flatnonzero(top2[:, 1] - top2[:, 0] < margin)
            self.last_exact = near
            if near.size:
                # A copy: logits may be a view of the engine's output buffer.
                logits = np.array(logits)
                logits[near] = self._infer_exact(np.ascontiguousarray(batch[near]))
                self.rechecked += int(near.size)
        return logits

    @abstractmethod
    def _load(self) -> None:
        """Build the compiled model; set ``self.precision``."""

    @abstractmethod
    def _infer(self, batch: np.ndarray) -> np.ndarray:
        """Run the model on a validated batch."""

    def _infer_exact(self, batch: np.ndarray) -> np.ndarray:
        """Run the model in fp32; engines that set ``_recheck`` implement it."""
        raise EngineError(f"the {self.name} engine has no fp32 path to recheck {self.precision} answers")

    def shutdown(self) -> None:
        """Release the model. Safe to call twice."""
        if not self._closed:
            self._closed = True
            self._shutdown()

    def _shutdown(self) -> None:
        """Hook for subclasses holding resources."""


ENGINES: Registry[Engine] = Registry("engine")
ENGINES.register("openvino", "wanwu.stages.engines.openvino:OpenVINOEngine")
ENGINES.register("torch", "wanwu.stages.engines.torch:TorchEngine")
ENGINES.register("onnxruntime", "wanwu.stages.engines.onnxruntime:OnnxRuntimeEngine")

# Fastest first, per device: OpenVINO bf16 runs about 3x torch bf16 on CPUs with AVX512-BF16 or AMX.
_AUTO_ORDER = {"cpu": ("openvino", "torch", "onnxruntime"), "cuda": ("torch", "onnxruntime")}


def resolve_engine_name(name: str, device: str = "cpu", model_format: str = "torch") -> str:
    """Map ``auto`` to the fastest engine for ``device`` that runs ``model_format`` and whose backend imports.

    Raises:
        EngineError: no installed engine runs that format on that device.
    """
    if name != "auto":
        return name
    import importlib.util

    backend = {"openvino": "openvino", "torch": "torch", "onnxruntime": "onnxruntime"}
    order = _AUTO_ORDER["cuda" if device.startswith("cuda") else "cpu"]
    for candidate in order:
        if model_format in ENGINE_FORMATS[candidate] and importlib.util.find_spec(backend[candidate]) is not None:
            return candidate
    able = [c for c in order if model_format in ENGINE_FORMATS[c]]
    raise EngineError(
        f"expected an installed engine that runs {model_format} models on {device} "
        f"({', '.join(able) or 'none does'}), found none"
    )


def create_engine(name: str, model: ModelSpec, cfg: EngineConfig) -> Engine:
    """Build (not load) the engine registered as ``name``; ``auto`` picks one that runs ``model``'s format."""
    return ENGINES.create(resolve_engine_name(name, cfg.device, model.format), model, cfg)
