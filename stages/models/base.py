"""Model specs and their registry.

A ``ModelSpec`` is light: it names the architecture, where the weights are, the
preprocessing and the labels, but imports no framework. The inference process
calls ``spec.build_torch()`` (which imports torch) only when an engine needs it;
specs of ONNX or OpenVINO files have no torch module and engines read ``path``.

Adding a model takes a factory returning its ``ModelSpec`` and one line in the
``MODELS`` table below (see ``efficientnet_lite0.py``). ``resolve.py`` turns what
users type (a registered name, ``modelscope:DIR``, ``timm:NAME``, ``onnx:FILE``,
``openvino:FILE.xml`` or a bare path) into a spec.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from wanwu.errors import ModelError
from wanwu.registry import Registry
from wanwu.specs import Preprocess

from wanwu.stages.models.labels import LabelSet, read_labels

__all__ = ["DEFAULT_MODEL", "FORMATS", "IMAGENET_MEAN", "IMAGENET_STD", "LabelSet", "MODELS", "ModelSpec",
           "get_model_spec"]

logger = logging.getLogger(__name__)

FORMATS = ("torch", "onnx", "openvino")  # what a spec's model is: a torch builder, or a file engines read
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to run one model, without importing a framework.

    Picklable (it travels to the inference process), as long as ``builder`` is a
    module-level function.
    """

    name: str  # registry name, written into every record's "model" field
    preprocess: Preprocess  # geometry for decoders, mean/std for engines
    num_classes: int  # width of the logits
    labels_path: str  # label file, see labels.read_labels (.json or .txt)
    builder: Callable[["ModelSpec"], Any] | None = None  # eval-mode torch.nn.Module; imports torch; None for files
    weights: str = ""  # where the weights come from, for `models show` and cache keys
    license: str = ""  # one-line licence note for weights and labels
    extra: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    format: str = "torch"  # one of FORMATS; "onnx"/"openvino": engines read `path`, float32 NCHW or uint8 NHWC input
    path: str = ""  # the .onnx or .xml file for the file formats

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ModelError(f"expected a model format in {FORMATS}, got {self.format!r}")
        if self.format != "torch" and not self.path:
            raise ModelError(f"model {self.name!r}: expected the path of its {self.format} file, got none")
        if self.num_classes <= 0:
            raise ModelError(f"model {self.name!r}: expected at least one class, got {self.num_classes}")

    def labels(self) -> LabelSet:
        """Load the label set, checking it matches ``num_classes``."""
        labels = read_labels(self.labels_path)
        if len(labels) != self.num_classes:
            raise ModelError(
                f"model {self.name!r} has {self.num_classes} classes but its label file "
                f"{self.labels_path} has {len(labels)}"
            )
        return labels

    def build_torch(self) -> Any:
        """The model as an eval-mode ``torch.nn.Module`` in float32 (imports torch).

        Raises:
            ModelError: the spec is an ONNX or OpenVINO file, which has no torch module.
        """
        if self.builder is None and self.format != "torch":
            raise ModelError(
                f"expected a torch model, got model {self.name!r} which is an {self.format} file ({self.path}); "
                "only the openvino and onnxruntime engines run files"
            )
        if self.builder is None:
            raise ModelError(f"expected a builder for the torch model {self.name!r}, got none")
        return self.builder(self)

    def cache_key(self) -> str:
        """A string identifying this model's weights and preprocessing, for engine caches."""
        stamps = []
        for location in (self.weights, self.path):
            file = Path(location)
            stamps.append(f"{file.stat().st_size}-{int(file.stat().st_mtime)}" if location and file.is_file() else "")
        return (f"{self.name}|{self.weights}|{stamps[0]}|{self.preprocess}|{self.num_classes}"
                + (f"|{self.format}|{self.path}|{stamps[1]}" if self.format != "torch" else ""))


# name -> factory(weights: str = "", labels: str = "") -> ModelSpec, imported when asked for.
MODELS: Registry[ModelSpec] = Registry("model")
MODELS.register("efficientnet_lite0", "wanwu.stages.models.efficientnet_lite0:efficientnet_lite0")
MODELS.register("general_recognition", "wanwu.stages.models.resnest:general_recognition")

DEFAULT_MODEL = "efficientnet_lite0"


def get_model_spec(name: str = DEFAULT_MODEL, **options: Any) -> ModelSpec:
    """The spec for ``name``: a registered name, alias, ``scheme:location`` or path.

    Same as ``resolve.resolve_model(name, **options)``; see there for the options
    (``weights``, ``labels``, ``mean``, ``std``, ``resize_shorter``, ``crop``).
    """
    from wanwu.stages.models.resolve import resolve_model  # resolve imports this module

    return resolve_model(name, **options)
