"""Loading checkpoints into torch modules, by position or by name.

Ports of a model (e.g. an EfficientNet checkpoint in lukemelas naming, loaded
into timm) often keep the same tensors in the same order under other names.
``map_in_order`` pairs them up by position and checks that the pairing is
plausible: same count, same shape at every position.

Checkpoints whose names match the module (after stripping wrappers such as
DataParallel's ``module.``) load with ``load_by_name``, which names every
missing, unexpected or mis-shaped tensor instead of loading half a model.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

from wanwu.errors import ModelError

logger = logging.getLogger(__name__)

_SHOWN = 3  # mismatched pairs named in an error message


def map_in_order(source: Mapping[str, Any], target: Mapping[str, Any]) -> dict[str, Any]:
    """Rename ``source`` tensors to ``target``'s keys, position by position.

    Args:
        source: checkpoint state dict, in the order it was saved.
        target: the model's own ``state_dict()``, giving the names and shapes wanted.

    Returns:
        A dict with ``target``'s keys (in its order) holding ``source``'s tensors,
        ready for ``module.load_state_dict(..., strict=True)``.

    Raises:
        ModelError: the counts differ, or some position's shapes differ; the
            message names the first mismatched keys on both sides.
    """
    if len(source) != len(target):
        raise ModelError(
            f"expected a checkpoint with {len(target)} tensors to map in order, got {len(source)}"
        )
    mapped: dict[str, Any] = {}
    mismatched: list[str] = []
    for (src_key, src), (dst_key, dst) in zip(source.items(), target.items()):
        src_shape, dst_shape = tuple(src.shape), tuple(dst.shape)
        if src_shape != dst_shape:
            mismatched.append(f"{src_key} {src_shape} -> {dst_key} {dst_shape}")
        mapped[dst_key] = src
    if mismatched:
        raise ModelError(
            f"expected checkpoint shapes to match the model in order; {len(mismatched)} "
            f"differ, first: {'; '.join(mismatched[:_SHOWN])}"
        )
    return mapped


def load_state_dict_file(path: str | Path) -> dict[str, Any]:
    """Read a PyTorch checkpoint of plain tensors (``weights_only``; never runs pickled code).

    Raises:
        ModelError: the file is missing, unreadable or not a state dict.
    """
    import torch

    try:
        state = torch.load(Path(path), map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError) as exc:
        raise ModelError(f"expected a readable PyTorch checkpoint at {path}: {exc}") from exc
    if isinstance(state, Mapping) and "state_dict" in state:  # a training checkpoint
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise ModelError(f"expected a state dict in {path}, got {type(state).__name__}")
    return dict(state)


def load_in_order(module: Any, path: str | Path) -> Any:
    """Load the checkpoint at ``path`` into ``module`` by position; returns ``module``.

    Raises:
        ModelError: see ``map_in_order`` and ``load_state_dict_file``.
    """
    mapped = map_in_order(load_state_dict_file(path), module.state_dict())
    module.load_state_dict(mapped, strict=True)
    logger.debug("loaded %d tensors from %s into %s", len(mapped), path, type(module).__name__)
    return module


def strip_prefix(state: Mapping[str, Any], prefix: str = "module.") -> dict[str, Any]:
    """``state`` with ``prefix`` removed from the front of every key that has it (repeatedly).

    DataParallel and DistributedDataParallel save ``module.``-prefixed names, and a
    model wrapped twice saves ``module.module.``.
    """
    out: dict[str, Any] = {}
    for key, value in state.items():
        while key.startswith(prefix):
            key = key[len(prefix):]
        out[key] = value
    return out


def check_fit(state: Mapping[str, Any], target: Mapping[str, Any], what: str) -> None:
    """Raise unless ``state`` has exactly ``target``'s tensor names and shapes.

    BatchNorm's ``num_batches_tracked`` counters may be absent (checkpoints from
    before PyTorch 0.4.1 lack them; inference never reads them).

    Raises:
        ModelError: naming the first missing, unexpected and mis-shaped keys and how many of each.
    """
    missing = [k for k in target if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in target]
    mismatched = [
        f"{k} {tuple(state[k].shape)} where the model has {tuple(target[k].shape)}"
        for k in target if k in state and tuple(state[k].shape) != tuple(target[k].shape)
    ]
    problems = [
        f"{len(keys)} {kind} (first: {', '.join(keys[:_SHOWN])})"
        for kind, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", mismatched)) if keys
    ]
    if problems:
        raise ModelError(f"expected a checkpoint that fits {what} tensor for tensor, got {'; '.join(problems)}")


def load_by_name(module: Any, state: Mapping[str, Any], what: str) -> Any:
    """Load ``state`` into ``module`` by name after ``check_fit``; returns ``module``.

    ``module`` may live on the ``meta`` device (see ``empty_module``): its tensors
    are then replaced by the checkpoint's, which skips initialising weights that are
    about to be overwritten (seconds for a 150M-parameter model).

    Args:
        module: the torch module to fill.
        state: tensors keyed by ``module``'s own names (wrappers already stripped).
        what: how messages name the model, e.g. "timm resnest101e (54092 classes)".

    Raises:
        ModelError: see ``check_fit``; or a meta-device module kept tensors the
            checkpoint cannot provide.
    """
    import torch

    target = module.state_dict()
    check_fit(state, target, what)
    full = {key: state[key] if key in state else torch.zeros_like(target[key], device="cpu") for key in target}
    on_meta = any(t.is_meta for t in target.values())
    module.load_state_dict(full, strict=True, assign=on_meta)
    left = [name for name, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if left:
        raise ModelError(f"expected every tensor of {what} to come from the checkpoint, {len(left)} did not "
                         f"(first: {', '.join(left[:_SHOWN])})")
    logger.debug("loaded %d tensors by name into %s", len(state), what)
    return module


def empty_module(factory: Any, *args: Any, **kwargs: Any) -> Any:
    """``factory(*args, **kwargs)`` built on the meta device: shapes without memory or initialisation."""
    import torch

    with torch.device("meta"):
        return factory(*args, **kwargs)
