"""万物识别 general-domain Chinese recognition: ModelScope's ``damo/cv_resnest101_general_recognition``.

A ResNeSt-101 (radix 2, deep stem of width 64, average-pool downsampling, avd)
with 54,092 Chinese labels. ModelScope keeps a downloaded model as a folder
holding ``pytorch_model.pt`` (a state dict of the original ResNeSt code) and
``meta_info.txt`` (``index<TAB>label``, one class a line). Its pipeline resizes
the shorter side to 256, center-crops 224 and normalises with ImageNet mean/std.

Key mapping. timm's ``resnest101e`` was written to load the original ResNeSt
release, so it keeps the original module names: the deep stem ``conv1.{0,1,3,4,6}``,
``bn1``, blocks ``layerN.M.{conv1,bn1,conv3,bn3}``, split attention
``layerN.M.conv2.{conv,bn0,fc1,bn1,fc2}``, ``downsample.{1,2}`` after the
(parameterless) average pool, and ``fc``. What differs between checkpoints is the
wrapping: ``{"state_dict": ...}``, ``module.`` prefixes from DataParallel, and
``.module.`` inside names; ``from_original_names`` undoes those (as ModelScope's
own loader does), and unlike that loader, which silently skips tensors that do not
fit, loading fails with a ``ModelError`` naming them.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping

from wanwu.errors import ModelError
from wanwu.specs import Preprocess

from wanwu.stages.models.base import IMAGENET_MEAN, IMAGENET_STD, ModelSpec
from wanwu.stages.models.labels import read_labels
from wanwu.stages.models.weights import empty_module, load_by_name, load_state_dict_file, strip_prefix

logger = logging.getLogger(__name__)

NAME = "general_recognition"
MODELSCOPE_ID = "damo/cv_resnest101_general_recognition"
ARCHITECTURE = "resnest101e"  # timm name
NUM_CLASSES = 54_092  # of the released model; the label file decides for other checkpoints
CHECKPOINT = "pytorch_model.pt"
LABELS = "meta_info.txt"
LICENSE = f"weights and labels: ModelScope {MODELSCOPE_ID} (Alibaba DAMO Academy); see the licence on its model card"


def is_modelscope_folder(path: str | Path) -> bool:
    """True when ``path`` is a folder holding ``pytorch_model.pt`` and ``meta_info.txt``."""
    path = Path(path)
    return (path / CHECKPOINT).is_file() and (path / LABELS).is_file()


def _cache_candidates() -> list[Path]:
    # ModelScope has kept downloads under <cache>/hub/<id> and, since 1.14,
    # <cache>/hub/models/<id>; MODELSCOPE_CACHE moves <cache> (or, in old releases, the hub).
    roots = [Path(os.environ["MODELSCOPE_CACHE"])] if os.environ.get("MODELSCOPE_CACHE") else []
    roots.append(Path.home() / ".cache" / "modelscope")
    return [root / sub / MODELSCOPE_ID for root in roots for sub in ("hub/models", "hub", "models", ".")]


def find_checkpoint(location: str = "") -> Path:
    """The ``pytorch_model.pt`` for ``location``: a ModelScope folder, the file itself, or "" for the cache.

    Raises:
        ModelError: nothing usable there; the message lists where it looked.
    """
    if location:
        path = Path(location).expanduser()
        if path.is_dir():
            path = path / CHECKPOINT
        if not path.is_file():
            raise ModelError(
                f"expected {MODELSCOPE_ID} as a ModelScope folder holding {CHECKPOINT} and {LABELS}, "
                f"or the {CHECKPOINT} file, got {location}, which is neither"
            )
        return path.resolve()
    for folder in _cache_candidates():
        if is_modelscope_folder(folder):
            return folder / CHECKPOINT
    looked = ", ".join(str(p) for p in _cache_candidates())
    raise ModelError(
        f"expected the weights of {MODELSCOPE_ID} in the ModelScope cache, found none (looked in {looked}); "
        f"pass the folder: --model modelscope:/path/to/cv_resnest101_general_recognition"
    )


def general_recognition(weights: str = "", labels: str = "") -> ModelSpec:
    """The spec of 万物识别 general recognition.

    Args:
        weights: the ModelScope folder or its ``pytorch_model.pt``; "" to look in the
            ModelScope cache.
        labels: a label file; "" for ``meta_info.txt`` beside the checkpoint. Its
            length is the class count (54,092 for the released model).

    Raises:
        ModelError: the checkpoint or the label file cannot be found or read.
    """
    checkpoint = find_checkpoint(weights)
    labels_path = Path(labels).expanduser().resolve() if labels else checkpoint.parent / LABELS
    num_classes = len(read_labels(labels_path))
    if num_classes != NUM_CLASSES:
        logger.info("%s: %d labels in %s (the released model has %d)", NAME, num_classes, labels_path, NUM_CLASSES)
    return ModelSpec(
        name=NAME,
        preprocess=Preprocess(resize_shorter=256, crop=224, mean=IMAGENET_MEAN, std=IMAGENET_STD),
        num_classes=num_classes,
        labels_path=str(labels_path),
        builder=build_general_recognition,
        weights=str(checkpoint),
        license=LICENSE,
        extra={"architecture": ARCHITECTURE, "modelscope_id": MODELSCOPE_ID},
    )


def from_original_names(state: Mapping[str, Any]) -> dict[str, Any]:
    """Rename a checkpoint of the original ResNeSt code to timm ``resnest101e`` names.

    Strips ``module.`` prefixes and squashes ``.module.`` inside names; the module
    names themselves already agree (see the module docstring).
    """
    return {key.replace(".module.", "."): value for key, value in strip_prefix(state).items()}


def build_general_recognition(spec: ModelSpec) -> Any:
    """timm's ``resnest101e`` with ``spec.num_classes`` outputs and ``spec.weights``, eval mode, float32.

    Raises:
        ModelError: timm is missing, or the checkpoint is unreadable or does not fit
            (naming the missing, unexpected and mis-shaped keys).
    """
    try:
        import timm
    except ImportError as exc:
        raise ModelError(f"expected timm to build {spec.name}: {exc}") from exc
    state = from_original_names(load_state_dict_file(spec.weights))
    # pretrained=False: the weights come only from the user's checkpoint, never the network;
    # on the meta device: every tensor comes from the checkpoint, none is initialised first.
    module = empty_module(timm.create_model, ARCHITECTURE, pretrained=False, num_classes=spec.num_classes)
    what = f"ResNeSt-101 ({ARCHITECTURE}, {spec.num_classes} classes, from {spec.weights})"
    return load_by_name(module, state, what).eval()
