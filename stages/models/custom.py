"""Users' own models: a timm architecture with a checkpoint, an ONNX file, an OpenVINO IR.

Each needs a label file, whose length is the class count. Preprocessing is
ImageNet's (shorter side 256, center crop 224, ImageNet mean/std) unless
overridden (``resolve_model``'s ``mean``, ``std``, ``resize_shorter``, ``crop``).

ONNX and IR files take, by convention, float32 NCHW input already normalised
with ``mean``/``std``; a file whose input is uint8 NHWC (as ``wanwu models
export`` writes for Triton and OpenVINO) has its preprocessing built in, and
engines feed it the pixels as they are. Either way the output must be logits.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from wanwu.errors import ConfigError, ModelError
from wanwu.specs import Preprocess

from wanwu.stages.models.base import IMAGENET_MEAN, IMAGENET_STD, ModelSpec
from wanwu.stages.models.labels import read_labels
from wanwu.stages.models.weights import load_by_name, load_state_dict_file, strip_prefix

logger = logging.getLogger(__name__)

DEFAULT_PREPROCESS = Preprocess(resize_shorter=256, crop=224, mean=IMAGENET_MEAN, std=IMAGENET_STD)


def _labels(labels: str, model: str) -> tuple[str, int]:
    """The label file as an absolute path (workers may run elsewhere) and its class count."""
    if not labels:
        raise ConfigError(f"expected --labels FILE (.txt or .json) for {model}, got none")
    return str(Path(labels).expanduser().resolve()), len(read_labels(labels))


def _existing(path: str, what: str) -> Path:
    file = Path(path).expanduser()
    if not file.is_file():
        raise ModelError(f"expected {what} at {path}, found no file there")
    return file.resolve()


def timm_model(arch: str, weights: str = "", labels: str = "") -> ModelSpec:
    """A timm architecture (``timm:NAME``) with the user's checkpoint and labels.

    The checkpoint is a state dict in timm's naming (``{"state_dict": ...}`` and
    ``module.`` prefixes are accepted); its classifier must have one row per label.

    Raises:
        ConfigError: ``arch``, ``weights`` or ``labels`` is missing.
        ModelError: a file is missing or unreadable.
    """
    if not arch:
        raise ConfigError("expected a timm architecture after timm:, e.g. timm:convnext_tiny, got none")
    if not weights:
        raise ConfigError(f"expected --weights FILE for timm:{arch} (a state dict in timm naming), got none")
    checkpoint = _existing(weights, f"the checkpoint for timm:{arch}")
    labels_path, num_classes = _labels(labels, f"timm:{arch}")
    return ModelSpec(
        name=arch,
        preprocess=DEFAULT_PREPROCESS,
        num_classes=num_classes,
        labels_path=labels_path,
        builder=build_timm,
        weights=str(checkpoint),
        license="user-supplied weights and labels",
        extra={"architecture": arch},
    )


def build_timm(spec: ModelSpec) -> Any:
    """timm's ``spec.extra["architecture"]`` with ``spec.weights`` loaded by name, eval mode, float32.

    Raises:
        ModelError: timm lacks the architecture, or the checkpoint does not fit it.
    """
    try:
        import timm
    except ImportError as exc:
        raise ModelError(f"expected timm to build {spec.name}: {exc}") from exc
    arch = spec.extra["architecture"]
    if not timm.is_model(arch):
        raise ModelError(f"expected a timm architecture name (see timm.list_models()), got {arch!r}")
    state = strip_prefix(load_state_dict_file(spec.weights))
    # pretrained=False: the weights come only from the user's checkpoint, never the network.
    # Built for real, not on the meta device: some timm architectures compute
    # non-persistent buffers at construction that no checkpoint holds.
    module = timm.create_model(arch, pretrained=False, num_classes=spec.num_classes)
    return load_by_name(module, state, f"timm {arch} with {spec.num_classes} classes").eval()


def onnx_model(path: str, labels: str = "") -> ModelSpec:
    """An ONNX file (``onnx:FILE``) with its labels; engines read the file directly.

    Raises:
        ConfigError: no label file was given.
        ModelError: a file is missing or unreadable.
    """
    file = _existing(path, "an ONNX model file")
    labels_path, num_classes = _labels(labels, f"onnx:{path}")
    return ModelSpec(
        name=file.stem, preprocess=DEFAULT_PREPROCESS, num_classes=num_classes,
        labels_path=labels_path, format="onnx", path=str(file), license="user-supplied model and labels",
    )


def openvino_model(path: str, labels: str = "") -> ModelSpec:
    """An OpenVINO IR (``openvino:FILE.xml``, its ``.bin`` beside it) with its labels.

    Raises:
        ConfigError: no label file was given.
        ModelError: the .xml or the .bin is missing, or the labels are unreadable.
    """
    file = _existing(path, "an OpenVINO IR .xml file")
    if file.suffix.lower() != ".xml" or not file.with_suffix(".bin").is_file():
        raise ModelError(f"expected an OpenVINO IR: a .xml file with its .bin beside it, got {path}")
    labels_path, num_classes = _labels(labels, f"openvino:{path}")
    return ModelSpec(
        name=file.stem, preprocess=DEFAULT_PREPROCESS, num_classes=num_classes,
        labels_path=labels_path, format="openvino", path=str(file), license="user-supplied model and labels",
    )
