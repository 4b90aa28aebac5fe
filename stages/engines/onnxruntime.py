"""The ONNX Runtime engine: a portable fp32 fallback (CPU, or CUDA with onnxruntime-gpu).

The uint8-NHWC wrapper (``wrappers.NormalizedInput``) is exported once to ONNX
and kept in the engine cache, so later starts import neither torch nor timm.

Users' ONNX files (``ModelSpec.format == "onnx"``) run as they are: a float32
NCHW input gets the batch normalised and transposed in numpy first; a uint8
NHWC input (preprocessing built in, as ``wanwu models export`` writes) gets the
pixels unchanged.
"""

from __future__ import annotations

import importlib.metadata
import logging
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
INPUT_NAME = "pixels"  # = export.INPUT_NAMES["uint8"]
OUTPUT_NAME = "logits"  # = export.OUTPUT_NAME

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
        self.built_onnx = False  # whether _load exported the model (False: read from cache or a user's file)
        self._input = INPUT_NAME  # the model's input and output names (a user's file has its own)
        self._output = OUTPUT_NAME
        self._normalise: tuple[np.ndarray, np.ndarray] | None = None  # (scale, shift) for float32 NCHW input
        self._one_at_a_time = False  # the file's batch axis is fixed at 1

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
        if self.model.format == "onnx":
            path = Path(self.model.path)
        else:
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
        if self.model.format == "onnx":
            self._bind_user_model(path)
        self.precision = "fp32"
        origin = "user's file" if self.model.format == "onnx" else "exported" if self.built_onnx else "from cache"
        logger.info(
            "onnxruntime engine: %s, fp32, %d threads, %s (ONNX %s)",
            self.model.name, options.intra_op_num_threads, self._session.get_providers()[0], origin,
        )

    def _bind_user_model(self, path: Path) -> None:
        """Learn a user's ONNX file's names and input layout; check its shapes against the spec."""
        inputs, outputs = self._session.get_inputs(), self._session.get_outputs()
        if len(inputs) != 1 or not outputs:
            raise EngineError(f"expected an image classifier with one input in {path}, got {len(inputs)} inputs")
        port, crop = inputs[0], self.model.preprocess.crop
        uint8 = port.type == "tensor(uint8)"
        wanted = ["batch", crop, crop, 3] if uint8 else ["batch", 3, crop, crop]
        shape = list(port.shape)
        fits = len(shape) == 4 and all(not isinstance(have, int) or have == want
                                       for have, want in zip(shape[1:], wanted[1:]))
        if not fits or port.type not in ("tensor(uint8)", "tensor(float)"):
            raise EngineError(
                f"expected {path} to take float32 (n, 3, {crop}, {crop}) or uint8 (n, {crop}, {crop}, 3) "
                f"input (--crop {crop}), got {port.type} {shape}"
            )
        width = outputs[0].shape[-1] if outputs[0].shape else None
        if isinstance(width, int) and width != self.model.num_classes:
            raise EngineError(
                f"expected {path} to output {self.model.num_classes} logits (one per label in "
                f"{self.model.labels_path}), its output shape is {outputs[0].shape}"
            )
        self._input, self._output = port.name, outputs[0].name
        self._one_at_a_time = shape[0] == 1
        if not uint8:
            pre = self.model.preprocess
            scale = np.array([1.0 / (255.0 * s) for s in pre.std], np.float32)
            shift = np.array([-m / s for m, s in zip(pre.mean, pre.std)], np.float32)
            self._normalise = (scale, shift)

    def _export(self, folder: Path) -> None:
        """Export the uint8-NHWC wrapper to ``folder/model.onnx``, batch axis dynamic."""
        from wanwu.stages.models.export import export_onnx

        export_onnx(self.model, folder / "model.onnx", input_kind="uint8", opset=OPSET)

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        if self._normalise is not None:
            scale, shift = self._normalise
            # (p / 255 - mean) / std as one multiply-add, as the exported wrapper does.
            pixels = np.ascontiguousarray((batch * scale + shift).transpose(0, 3, 1, 2), dtype=np.float32)
        else:
            pixels = np.ascontiguousarray(batch)
        # run() returns fresh arrays, so nothing here aliases the session's buffers.
        try:
            if self._one_at_a_time:
                return np.concatenate([self._session.run([self._output], {self._input: pixels[i:i + 1]})[0]
                                       for i in range(len(pixels))])
            return self._session.run([self._output], {self._input: pixels})[0]
        except _ORT_ERRORS as exc:
            raise EngineError(f"onnxruntime failed on a batch of {len(batch)}: {exc}") from exc

    def _shutdown(self) -> None:
        self._session = None
