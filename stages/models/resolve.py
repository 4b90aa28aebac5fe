"""From what a user types after ``--model`` to a ``ModelSpec``.

Accepted, in the order they are tried:

* ``SCHEME:LOCATION`` for a scheme in ``SCHEMES``: ``modelscope:DIR`` (万物识别),
  ``timm:NAME`` (with ``weights`` and ``labels``), ``onnx:FILE`` and
  ``openvino:FILE.xml`` (with ``labels``);
* a name in the ``MODELS`` registry, or an alias of one (``ALIASES``);
* a path: a ModelScope folder (holding ``pytorch_model.pt`` and ``meta_info.txt``),
  an ``.onnx`` file, or an ``.xml`` IR.

Nothing here imports a framework, so the job's owner process resolves the model
cheaply; the inference process resolves the same string again to the same spec.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Callable, Sequence

from wanwu.errors import ConfigError, ModelError
from wanwu.specs import Preprocess

from wanwu.stages.models import custom, resnest
from wanwu.stages.models.base import MODELS, ModelSpec

logger = logging.getLogger(__name__)

# scheme -> factory(location, weights, labels) -> ModelSpec
SCHEMES: dict[str, Callable[[str, str, str], ModelSpec]] = {
    "modelscope": lambda location, weights, labels: resnest.general_recognition(location or weights, labels),
    "timm": custom.timm_model,
    "onnx": lambda location, weights, labels: custom.onnx_model(location, labels),
    "openvino": lambda location, weights, labels: custom.openvino_model(location, labels),
}

ALIASES = {
    resnest.MODELSCOPE_ID: resnest.NAME,
    "万物识别": resnest.NAME,
}

# The other ways to name a model, for messages and `wanwu models list`.
OTHER_FORMS = ("modelscope:DIR, timm:NAME --weights FILE --labels FILE, onnx:FILE --labels FILE, "
               "openvino:FILE.xml --labels FILE, or a ModelScope folder")


def resolve_model(
    name: str,
    weights: str = "",
    labels: str = "",
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    resize_shorter: int | None = None,
    crop: int | None = None,
) -> ModelSpec:
    """The spec for ``name`` (see the module docstring), with the given overrides.

    Args:
        name: what the user typed after ``--model``.
        weights: a checkpoint (``timm:``; another one for a registered model) or the
            ModelScope folder for ``general_recognition``; "" for the model's own.
        labels: a label file (.txt or .json) replacing the model's; its length is
            the class count.
        mean, std: per-channel normalisation on [0, 1] values; None keeps the model's.
        resize_shorter, crop: decoder geometry in pixels; None (or 0) keeps the model's.

    Raises:
        ConfigError: ``name`` is none of the accepted forms, or an override is invalid.
        ModelError: the files it names are missing or unreadable.
    """
    spec = _base_spec(name.strip(), weights, labels)
    changes = {key: value for key, value in (("mean", mean), ("std", std), ("resize_shorter", resize_shorter),
                                             ("crop", crop)) if value}
    if not changes:
        return spec
    if "mean" in changes or "std" in changes:
        for key in ("mean", "std"):
            if key in changes:
                changes[key] = tuple(float(v) for v in changes[key])
    if changes.get("crop") and not changes.get("resize_shorter") and changes["crop"] > spec.preprocess.resize_shorter:
        # A bigger crop alone would be rejected; keep the model's ratio of resize to crop instead.
        ratio = spec.preprocess.resize_shorter / spec.preprocess.crop
        changes["resize_shorter"] = round(changes["crop"] * ratio)
    preprocess: Preprocess = dataclasses.replace(spec.preprocess, **changes)
    return dataclasses.replace(spec, preprocess=preprocess)


def _base_spec(name: str, weights: str, labels: str) -> ModelSpec:
    scheme, colon, location = name.partition(":")
    if colon and scheme.lower() in SCHEMES:
        return SCHEMES[scheme.lower()](location, weights, labels)
    registered = ALIASES.get(name, name)
    if registered in MODELS:
        return MODELS.create(registered, weights=weights, labels=labels)
    path = Path(name).expanduser()
    if path.is_dir():
        if resnest.is_modelscope_folder(path):
            return resnest.general_recognition(str(path), labels)
        raise ModelError(
            f"expected a ModelScope folder holding {resnest.CHECKPOINT} and {resnest.LABELS} at {name}, "
            f"got a folder without them"
        )
    if path.suffix.lower() == ".onnx":
        return custom.onnx_model(name, labels)
    if path.suffix.lower() == ".xml":
        return custom.openvino_model(name, labels)
    raise ConfigError(f"unknown model {name!r}; expected a registered model ({', '.join(registered_names())}), "
                      f"{OTHER_FORMS}")


def registered_names() -> list[str]:
    """Registered model names, then their aliases."""
    return MODELS.names() + sorted(ALIASES)
