"""Model specs and their registry.

A ``ModelSpec`` is light: it names the architecture, where the weights are, the
preprocessing and the labels, but imports no framework. The inference process
calls ``spec.build_torch()`` (which imports torch) only when an engine needs it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from wanwu.errors import ModelError
from wanwu.registry import Registry
from wanwu.specs import Preprocess


@dataclass(frozen=True)
class LabelSet:
    """Class names by class id, in Chinese with English alongside."""

    zh: tuple[str, ...]  # Chinese label of class i, distinct
    en: tuple[str, ...]  # English label of class i ("" where unknown)

    def __post_init__(self) -> None:
        if len(self.zh) != len(self.en):
            raise ModelError(f"expected as many English as Chinese labels, got {len(self.en)} and {len(self.zh)}")

    def __len__(self) -> int:
        return len(self.zh)

    @classmethod
    def from_json(cls, path: str | Path) -> "LabelSet":
        """Read a label file: a JSON list of ``{"class_id", "label", "label_en"}``."""
        items = json.loads(Path(path).read_text(encoding="utf-8"))
        items = sorted(items, key=lambda d: int(d["class_id"]))
        if [int(d["class_id"]) for d in items] != list(range(len(items))):
            raise ModelError(f"expected class ids 0..{len(items) - 1} in {path}")
        return cls(tuple(d["label"] for d in items), tuple(d.get("label_en", "") for d in items))


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to run one model, without importing a framework."""

    name: str  # registry name, written into every record's "model" field
    preprocess: Preprocess  # geometry for decoders, mean/std for engines
    num_classes: int  # width of the logits
    labels_path: str  # label file, see LabelSet.from_json
    builder: Callable[["ModelSpec"], Any]  # returns an eval-mode torch.nn.Module; imports torch
    weights: str = ""  # where the weights come from, for `models show` and cache keys
    license: str = ""  # one-line licence note for weights and labels
    extra: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    def labels(self) -> LabelSet:
        """Load the label set, checking it matches ``num_classes``."""
        labels = LabelSet.from_json(self.labels_path)
        if len(labels) != self.num_classes:
            raise ModelError(
                f"model {self.name!r} has {self.num_classes} classes but its label file "
                f"{self.labels_path} has {len(labels)}"
            )
        return labels

    def build_torch(self) -> Any:
        """The model as an eval-mode ``torch.nn.Module`` in float32 (imports torch)."""
        return self.builder(self)

    def cache_key(self) -> str:
        """A string identifying this model's weights and preprocessing, for engine caches."""
        weights = Path(self.weights)
        stamp = f"{weights.stat().st_size}-{int(weights.stat().st_mtime)}" if weights.is_file() else ""
        return f"{self.name}|{self.weights}|{stamp}|{self.preprocess}|{self.num_classes}"


MODELS: Registry[ModelSpec] = Registry("model")
MODELS.register("efficientnet_lite0", "wanwu.stages.models.efficientnet_lite0:efficientnet_lite0")

DEFAULT_MODEL = "efficientnet_lite0"


def get_model_spec(name: str = DEFAULT_MODEL) -> ModelSpec:
    """The spec registered as ``name``."""
    return MODELS.create(name)
