"""The OpenVINO engine, the fastest on x86 CPUs (bf16 on AVX-512 BF16 / AMX).

The torch model is converted once to OpenVINO IR with the uint8-NHWC input,
cast and normalisation built into the graph, and saved in the engine cache;
later starts read the IR without importing torch or timm, and OpenVINO's own
``CACHE_DIR`` keeps the compiled blob so compilation is skipped too.

Users' ONNX files and IRs (``ModelSpec.format`` "onnx" / "openvino") are read as
they are; one taking float32 NCHW gets the same uint8-NHWC front, one taking
uint8 NHWC already has its preprocessing built in.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import openvino as ov

from wanwu.errors import EngineError

from wanwu.stages.models.base import ModelSpec
from wanwu.stages.engines.base import Engine, EngineConfig
from wanwu.stages.engines.cache import cache_key, cached_file
from wanwu.stages.engines.hw import cpu_count, cpu_precision, cpuinfo_text

logger = logging.getLogger(__name__)

IR_FORMAT = "u8-nhwc-1"  # bump when the converted graph changes, to invalidate caches
PERFORMANCE_HINTS = ("LATENCY", "THROUGHPUT")


class OpenVINOEngine(Engine):
    """Runs an OpenVINO IR on the CPU, one synchronous infer request per batch.

    Int8 precisions run the model quantized by NNCF (``quantize.quantized_ir``, cached;
    the first start quantizes, which takes a minute for a small model); ``int8+fp32``
    also compiles the float32 model, to recompute the near ties.

    ``performance_hint`` is ``LATENCY`` (one stream using every thread) or
    ``THROUGHPUT`` (``num_streams`` streams, each with a share of the threads).
    With one synchronous request per batch only one stream works at a time, so
    LATENCY is the default: on 2 Sapphire Rapids cores at batch 32 it ran
    ~310 images/s in bf16 against ~160 for THROUGHPUT with 2 streams.
    """

    name = "openvino"
    int8 = True

    def __init__(
        self,
        model: ModelSpec,
        cfg: EngineConfig,
        *,
        performance_hint: str = "LATENCY",
        num_streams: int = 2,
    ) -> None:
        super().__init__(model, cfg)
        if performance_hint not in PERFORMANCE_HINTS:
            raise EngineError(f"expected performance_hint in {PERFORMANCE_HINTS}, got {performance_hint!r}")
        self.performance_hint = performance_hint
        self.num_streams = num_streams
        self.built_ir = False  # whether _load converted the model (False: read from cache)

    def ir_path(self) -> Path:
        """Where this model's IR lives in the cache (it may not exist yet)."""
        key = cache_key(self.model.cache_key(), ov.get_version(), IR_FORMAT)
        return self.cfg.cache_path / "openvino" / key / "model.xml"

    def _load(self) -> None:
        if self.cfg.device != "cpu":
            raise EngineError(f"expected device cpu for the openvino engine, got {self.cfg.device!r}")
        if self.model.format == "torch":
            xml = self.ir_path()
            xml, self.built_ir = cached_file(xml.parent.parent, xml.parent.name, xml.name, self._convert)
            source: str | ov.Model = str(xml)
        else:
            xml, source = Path(self.model.path), read_model_file(self.model)
        compute = cpu_precision(self.cfg.precision, cpuinfo_text())
        bf16 = compute == "bf16"
        self._recheck = (bf16 and self.cfg.precision == "auto") or self.cfg.precision == "int8+fp32"
        self.precision = f"{compute}+fp32" if self._recheck else compute
        threads = self.cfg.threads or cpu_count()
        if compute == "int8":
            from wanwu.stages.engines.quantize import quantized_ir

            int8_xml, quantized = quantized_ir(self.model, source, self.cfg.cache_path, self.cfg.calibration,
                                               (IR_FORMAT, ov.get_version()))
            logger.info("openvino engine: int8 IR %s (%s)", int8_xml, "quantized now" if quantized else "from cache")
            # The layers NNCF keeps in float run in f32: a bf16 hint would add its own changes.
            self._request = self._compile(str(int8_xml), int8_xml, "f32", threads)
        else:
            self._request = self._compile(source, xml, "bf16" if bf16 else "f32", threads)
        # auto and int8+fp32 recompute near ties in fp32 (Engine.infer): a second compiled model.
        self._exact = self._compile(source, xml, "f32", threads) if self._recheck else None
        origin = ("IR converted" if self.built_ir else "IR from cache") if self.model.format == "torch" \
            else f"{self.model.format} file"
        logger.info(
            "openvino engine: %s, %s, %d threads, %s (%s)",
            self.model.name, self.precision, threads, self.performance_hint, origin,
        )

    def _compile(self, source: str | ov.Model, xml: Path, precision: str, threads: int) -> ov.InferRequest:
        config = {
            "INFERENCE_PRECISION_HINT": precision,
            "INFERENCE_NUM_THREADS": threads,
            "PERFORMANCE_HINT": self.performance_hint,
            "CACHE_DIR": str(self.cfg.cache_path / "openvino" / "blobs"),
        }
        if self.performance_hint == "THROUGHPUT":
            config["NUM_STREAMS"] = self.num_streams
        try:
            return ov.Core().compile_model(source, "CPU", config).create_infer_request()
        except RuntimeError as exc:
            raise EngineError(f"expected OpenVINO to compile {xml} for CPU ({precision}), got: {exc}") from exc

    def _convert(self, folder: Path) -> None:
        """Convert the torch model to IR with uint8 NHWC input; save it in ``folder``."""
        convert_to_ir(self.model, folder / "model.xml")

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        return self._run(self._request, batch)

    def _infer_exact(self, batch: np.ndarray) -> np.ndarray:
        return self._run(self._exact, batch)

    @staticmethod
    def _run(request: ov.InferRequest, batch: np.ndarray) -> np.ndarray:
        # share_inputs wraps the (contiguous) batch without a copy; the output
        # buffer belongs to the request and is overwritten by the next batch, so
        # it is copied out.
        try:
            request.infer({0: np.ascontiguousarray(batch)}, share_inputs=True, share_outputs=True)
        except RuntimeError as exc:  # OpenVINO raises RuntimeError for its own failures
            raise EngineError(f"openvino failed on a batch of {len(batch)}: {exc}") from exc
        return request.get_output_tensor(0).data.copy()

    def _shutdown(self) -> None:
        self._request = None
        self._exact = None


def convert_to_ir(spec: ModelSpec, xml: Path) -> None:
    """Convert ``spec``'s torch model to an IR at ``xml`` (and its .bin) taking uint8 NHWC pixels."""
    import torch  # only on a cold cache: warm starts never import torch or timm

    pre = spec.preprocess
    with torch.no_grad(), warnings.catch_warnings():
        # convert_model traces with torch.jit.trace, which torch marks deprecated;
        # the warning is about OpenVINO's internals, not ours.
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit")
        model = ov.convert_model(spec.build_torch(), example_input=torch.zeros(1, 3, pre.crop, pre.crop))
    model.reshape({model.input(0): ov.PartialShape([-1, 3, pre.crop, pre.crop])})
    # fp16 compression would halve the file but change the fp32 results.
    ov.save_model(add_uint8_input(model, spec), str(xml), compress_to_fp16=False)


def add_uint8_input(model: ov.Model, spec: ModelSpec) -> ov.Model:
    """``model`` (float32 NCHW normalised input) behind a uint8 NHWC input: cast, mean/std, layout."""
    from openvino.preprocess import PrePostProcessor

    pre = spec.preprocess
    ppp = PrePostProcessor(model)
    ppp.input().tensor().set_element_type(ov.Type.u8).set_layout(ov.Layout("NHWC"))
    ppp.input().model().set_layout(ov.Layout("NCHW"))
    (ppp.input().preprocess()
        .convert_element_type(ov.Type.f32)
        .mean([m * 255.0 for m in pre.mean])
        .scale([s * 255.0 for s in pre.std]))
    ppp.output().tensor().set_element_type(ov.Type.f32)
    return ppp.build()


def takes_uint8_nhwc(shape: ov.PartialShape, element_type: ov.Type) -> bool:
    """True for an input of uint8 pixels, channels last: preprocessing is built into the model."""
    return element_type == ov.Type.u8 and shape.rank.is_static and shape.rank.get_length() == 4 \
        and shape[3].is_static and shape[3].get_length() == 3


def read_model_file(spec: ModelSpec) -> ov.Model:
    """Read ``spec.path`` (ONNX or IR) so that it takes a uint8 NHWC batch of any size.

    A float32 NCHW input gets ``add_uint8_input``; a uint8 NHWC one is used as it is.

    Raises:
        EngineError: the file is unreadable, has other than one input and one
            output, or its shapes do not fit ``spec`` (crop size, class count).
    """
    crop, path = spec.preprocess.crop, spec.path
    try:
        model = ov.Core().read_model(path)
    except RuntimeError as exc:
        raise EngineError(f"expected OpenVINO to read the model file {path}, got: {exc}") from exc
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise EngineError(
            f"expected an image classifier with one input and one output in {path}, "
            f"got {len(model.inputs)} inputs and {len(model.outputs)} outputs"
        )
    port = model.input(0)
    shape = port.get_partial_shape()
    uint8 = takes_uint8_nhwc(shape, port.get_element_type())
    wanted = [-1, crop, crop, 3] if uint8 else [-1, 3, crop, crop]
    try:
        # A file exported with a fixed batch of 1 still runs whole batches.
        model.reshape({port: ov.PartialShape(wanted)})
    except RuntimeError as exc:
        layout = "uint8 NHWC" if uint8 else "float32 NCHW"
        raise EngineError(
            f"expected {path} to take {layout} input of shape {wanted} (--crop {crop}), "
            f"its input is {shape} {port.get_element_type()}: {exc}"
        ) from exc
    out = model.output(0).get_partial_shape()
    if out.rank.is_static and out[out.rank.get_length() - 1].is_static \
            and out[out.rank.get_length() - 1].get_length() != spec.num_classes:
        raise EngineError(
            f"expected {path} to output {spec.num_classes} logits (one per label in {spec.labels_path}), "
            f"its output shape is {out}"
        )
    if uint8:
        logger.info("%s takes uint8 NHWC pixels: its preprocessing is built in, --mean/--std do not apply", path)
        return model
    return add_uint8_input(model, spec)
