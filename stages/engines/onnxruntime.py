"""The ONNX Runtime engine: a portable fp32 fallback (CPU, or CUDA with onnxruntime-gpu).

The uint8-NHWC wrapper (``wrappers.NormalizedInput``) is exported once to ONNX
and kept in the engine cache, so later starts import neither torch nor timm.
"""

from __future__ import annotations

import importlib.metadata
import logging
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as _ort_state

from wanwu.errors import EngineError

from wanwu.stages.models.base import ModelSpec
from wanwu.stages.engines.base import Engine, EngineConfig
from wanwu.stages.engines.cache import cache_key, cached_file
from wanwu.stages.engines.hw import cpu_count

logger = logging.getLogger(__name__)

OPSET = 17
ONNX_FORMAT = "u8-nhwc-1"  # bump when the exported graph changes, to invalidate caches
INPUT_NAME = "pixels"
OUTPUT_NAME = "logits"

# onnxruntime's own exceptions (Fail, InvalidProtobuf, ...) derive from Exception
# directly, not from RuntimeError; these are the ones a load or a run can raise.
_ORT_ERRORS: tuple[type[Exception], ...] = (RuntimeError, ValueError) + tuple(
    getattr(_ort_state, name)
    for name in ("Fail", "InvalidArgument", "NoSuchFile", "NoModel", "EngineError",
                 "RuntimeException", "InvalidProtobuf", "ModelLoaded", "NotImplemented",
                 "InvalidGraph", "EPFail")
    if isinstance(getattr(_ort_state, name, None), type)
)


def _torch_version() -> str:
    # The exporter's version shapes the graph; reading it from the package
    # metadata avoids importing torch on a warm start.
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return "no-torch"


class OnnxRuntimeEngine(Engine):
    """Runs the exported model in an ``onnxruntime.InferenceSession``, fp32 only."""

    name = "onnxruntime"

    def __init__(self, model: ModelSpec, cfg: EngineConfig) -> None:
        super().__init__(model, cfg)
        self.built_onnx = False  # whether _load exported the model (False: read from cache)

    def onnx_path(self) -> Path:
        """Where this model's ONNX file lives in the cache (it may not exist yet)."""
        key = cache_key(self.model.cache_key(), _torch_version(), f"opset{OPSET}", ONNX_FORMAT)
        return self.cfg.cache_path / "onnxruntime" / key / "model.onnx"

    def _providers(self) -> list:
        if not self.cfg.device.startswith("cuda"):
            return ["CPUExecutionProvider"]
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise EngineError(
                f"expected onnxruntime with CUDAExecutionProvider for {self.cfg.device!r}, "
                f"got providers {ort.get_available_providers()}"
            )
        _, _, index = self.cfg.device.partition(":")
        return [("CUDAExecutionProvider", {"device_id": int(index or 0)}), "CPUExecutionProvider"]

    def _load(self) -> None:
        providers = self._providers()  # fail before a costly export
        path = self.onnx_path()
        path, self.built_onnx = cached_file(path.parent.parent, path.parent.name, path.name, self._export)
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.cfg.threads or cpu_count()
        # One model, one request at a time: parallelism lives inside each op.
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            self._session = ort.InferenceSession(str(path), options, providers=providers)
        except _ORT_ERRORS as exc:
            raise EngineError(f"expected onnxruntime to load {path}, got: {exc}") from exc
        self.precision = "fp32"
        logger.info(
            "onnxruntime engine: %s, fp32, %d threads, %s (ONNX %s)",
            self.model.name, options.intra_op_num_threads, self._session.get_providers()[0],
            "exported" if self.built_onnx else "from cache",
        )

    def _export(self, folder: Path) -> None:
        """Export the uint8-NHWC wrapper to ``folder/model.onnx``, batch axis dynamic."""
        import torch

        from wanwu.stages.engines.wrappers import NormalizedInput

        pre = self.model.preprocess
        module = NormalizedInput(self.model.build_torch(), pre.mean, pre.std).eval()
        example = torch.zeros(1, pre.crop, pre.crop, 3, dtype=torch.uint8)
        with torch.no_grad(), warnings.catch_warnings():
            # The TorchScript exporter (dynamo=False) is deprecated, but the new one
            # needs onnxscript, which is not a dependency; this one writes a single
            # self-contained file with a dynamic batch axis.
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            torch.onnx.export(
                module, (example,), str(folder / "model.onnx"),
                input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                opset_version=OPSET, dynamo=False,
            )

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        # run() returns fresh arrays, so nothing here aliases the session's buffers.
        try:
            return self._session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(batch)})[0]
        except _ORT_ERRORS as exc:
            raise EngineError(f"onnxruntime failed on a batch of {len(batch)}: {exc}") from exc

    def _shutdown(self) -> None:
        self._session = None
