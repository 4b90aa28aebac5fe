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

from wanwu.stages.models.base import ModelSpec

logger = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    """Where engines keep compiled models: ``$WANWU_CACHE_DIR`` or ``~/.cache/wanwu``."""
    env = os.environ.get("WANWU_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "wanwu"


@dataclass(frozen=True)
class EngineConfig:
    """Engine settings, passed explicitly."""

    device: str = "cpu"  # "cpu" or "cuda:N"
    precision: str = "auto"  # "auto" (bf16 where the hardware has it), "bf16" or "fp32"
    threads: int = 0  # compute threads; 0 means all cores
    max_batch_size: int = 32  # largest batch infer() will be given
    cache_dir: str = ""  # compiled-model cache; "" means default_cache_dir()

    def __post_init__(self) -> None:
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ConfigError(f"precision must be auto, bf16 or fp32, got {self.precision!r}")
        if self.max_batch_size <= 0 or self.threads < 0:
            raise ConfigError(
                f"expected max_batch_size > 0 and threads >= 0, got {self.max_batch_size}, {self.threads}"
            )

    @property
    def cache_path(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir else default_cache_dir()


class Engine(ABC):
    """Base of every engine. Subclasses implement ``_load`` and ``_infer``."""

    name: ClassVar[str] = "base"

    def __init__(self, model: ModelSpec, cfg: EngineConfig) -> None:
        self.model = model
        self.cfg = cfg
        self.precision = "fp32"  # what the engine actually runs in, set by _load
        self._loaded = False
        self._closed = False

    def input_spec(self) -> FrameSpec:
        """One item of the batch ``infer`` takes: crop x crop x 3 uint8 (HWC)."""
        return self.model.preprocess.frame

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
            float32 array of shape (n, num_classes).
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
        return logits

    @abstractmethod
    def _load(self) -> None:
        """Build the compiled model; set ``self.precision``."""

    @abstractmethod
    def _infer(self, batch: np.ndarray) -> np.ndarray:
        """Run the model on a validated batch."""

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


def resolve_engine_name(name: str, device: str = "cpu") -> str:
    """Map ``auto`` to the fastest engine whose backend imports on this machine."""
    if name != "auto":
        return name
    import importlib.util

    backend = {"openvino": "openvino", "torch": "torch", "onnxruntime": "onnxruntime"}
    for candidate in _AUTO_ORDER["cuda" if device.startswith("cuda") else "cpu"]:
        if importlib.util.find_spec(backend[candidate]) is not None:
            return candidate
    raise EngineError("no inference backend is installed: expected openvino, torch or onnxruntime")


def create_engine(name: str, model: ModelSpec, cfg: EngineConfig) -> Engine:
    """Build (not load) the engine registered as ``name`` (``auto`` resolved)."""
    return ENGINES.create(resolve_engine_name(name, cfg.device), model, cfg)
