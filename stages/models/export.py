"""Export a model for other runtimes: ONNX, OpenVINO IR, a Triton model repository.

Two input conventions:

* ``float32``: NCHW, already normalised with the model's mean/std, the usual
  convention for ONNX classifiers (``wanwu run --model onnx:FILE`` reads it back
  with ``--mean/--std``);
* ``uint8``: NHWC pixels as the decoder leaves them (resized and cropped), the
  cast, normalisation and layout change built into the graph. Four times fewer
  bytes per image over a network, and clients need no numerics: what the engine
  cache holds, what OpenVINO exports get and what Triton repositories use.

Every export has a dynamic batch axis and outputs float32 logits.
"""

from __future__ import annotations

import logging
import shutil
import warnings
from pathlib import Path

import numpy as np

from wanwu.errors import ConfigError, ModelError

from wanwu.stages.models.base import ModelSpec

logger = logging.getLogger(__name__)

OPSET = 17
INPUT_KINDS = ("float32", "uint8")
INPUT_NAMES = {"float32": "input", "uint8": "pixels"}
OUTPUT_NAME = "logits"


def _check_exportable(spec: ModelSpec, input_kind: str) -> None:
    if input_kind not in INPUT_KINDS:
        raise ConfigError(f"expected an input kind in {INPUT_KINDS}, got {input_kind!r}")
    if spec.format != "torch":
        raise ModelError(
            f"expected a torch model to export (a registered name, modelscope: or timm:), got {spec.name!r}, "
            f"which is already an {spec.format} file ({spec.path})"
        )


def export_onnx(spec: ModelSpec, path: str | Path, input_kind: str = "float32", opset: int = OPSET) -> Path:
    """Write ``spec``'s model as ONNX at ``path``; input ``INPUT_NAMES[input_kind]``, output ``logits``.

    Args:
        spec: a torch-format model spec.
        path: the ``.onnx`` file to write (its folder must exist).
        input_kind: "float32" (NCHW, normalised) or "uint8" (NHWC pixels); see the module docstring.
        opset: ONNX opset version.

    Returns:
        ``path``, as a ``Path``.

    Raises:
        ConfigError: an unknown ``input_kind``.
        ModelError: ``spec`` is not a torch model, or it cannot be built.
    """
    _check_exportable(spec, input_kind)
    import torch

    from wanwu.stages.engines.wrappers import NormalizedInput

    pre, path = spec.preprocess, Path(path)
    module = spec.build_torch()
    if input_kind == "uint8":
        module = NormalizedInput(module, pre.mean, pre.std).eval()
        example = torch.zeros(1, pre.crop, pre.crop, 3, dtype=torch.uint8)
    else:
        example = torch.zeros(1, 3, pre.crop, pre.crop)
    name = INPUT_NAMES[input_kind]
    with torch.no_grad(), warnings.catch_warnings():
        # The TorchScript exporter (dynamo=False) is deprecated, but the new one
        # needs onnxscript, which is not a dependency; this one writes a single
        # self-contained file with a dynamic batch axis.
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        torch.onnx.export(
            module, (example,), str(path), input_names=[name], output_names=[OUTPUT_NAME],
            dynamic_axes={name: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}, opset_version=opset, dynamo=False,
        )
    logger.info("exported %s to %s (%s input, %.0f MB)", spec.name, path, input_kind, path.stat().st_size / 1e6)
    return path


def export_openvino(spec: ModelSpec, xml: str | Path) -> Path:
    """Write ``spec``'s model as an OpenVINO IR at ``xml`` (and its ``.bin``), taking uint8 NHWC pixels.

    Raises:
        ModelError: ``spec`` is not a torch model, or it cannot be built.
    """
    _check_exportable(spec, "uint8")
    from wanwu.stages.engines.openvino import convert_to_ir

    xml = Path(xml)
    convert_to_ir(spec, xml)
    logger.info("exported %s to %s", spec.name, xml)
    return xml


def copy_labels(spec: ModelSpec, folder: str | Path) -> Path:
    """Copy ``spec``'s label file into ``folder`` under its own extension as ``labels.*``."""
    source = Path(spec.labels_path)
    target = Path(folder) / f"labels{source.suffix.lower() if source.suffix.lower() == '.json' else '.txt'}"
    shutil.copyfile(source, target)
    return target


def normalised_nchw(pixels: np.ndarray, spec: ModelSpec) -> np.ndarray:
    """uint8 NHWC crops as the float32 NCHW, mean/std-normalised input of a ``float32`` export."""
    pre = spec.preprocess
    x = (pixels.astype(np.float32) / 255.0 - np.array(pre.mean, np.float32)) / np.array(pre.std, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype=np.float32)


def verify_onnx(spec: ModelSpec, path: str | Path, pixels: np.ndarray, input_kind: str = "float32") -> dict:
    """Run the exported file in onnxruntime and ``spec``'s torch model on the same crops; compare.

    Args:
        spec: the spec the file was exported from.
        path: the exported ``.onnx`` file.
        pixels: uint8 (n, crop, crop, 3) crops.
        input_kind: the kind the file was exported with.

    Returns:
        ``{"images", "top1_agreement", "max_abs_diff", "max_logit"}``; float32
        exports agree with torch to about 1e-5 of the logit range.
    """
    import onnxruntime as ort
    import torch

    from wanwu.stages.engines.wrappers import NormalizedInput

    pre = spec.preprocess
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = pixels if input_kind == "uint8" else normalised_nchw(pixels, spec)
    got = session.run([OUTPUT_NAME], {INPUT_NAMES[input_kind]: np.ascontiguousarray(feed)})[0]
    module = NormalizedInput(spec.build_torch(), pre.mean, pre.std).eval()
    with torch.inference_mode():
        want = module(torch.from_numpy(np.ascontiguousarray(pixels))).numpy()
    return {
        "images": int(len(pixels)),
        "top1_agreement": float((got.argmax(1) == want.argmax(1)).mean()),
        "max_abs_diff": float(np.abs(got - want).max()),
        "max_logit": float(np.abs(want).max()),
    }
