"""Loading checkpoints whose key names differ from the model's but whose order matches.

Ports of a model (e.g. an EfficientNet checkpoint in lukemelas naming, loaded
into timm) often keep the same tensors in the same order under other names.
``map_in_order`` pairs them up by position and checks that the pairing is
plausible: same count, same shape at every position.
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
