"""Softmax top-k over logits, on the CPU with numpy.

Selecting with ``np.argpartition`` is linear in the number of classes, so a
54,092-class label space at batch 64 costs a few milliseconds instead of a full
sort; only the k winners are then sorted.
"""

from __future__ import annotations

import logging

import numpy as np

from wanwu.errors import ConfigError

logger = logging.getLogger(__name__)


def softmax_topk(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` most probable classes of each row and their softmax probabilities.

    Args:
        logits: float array of shape (n, C), C >= 1.
        k: how many classes to keep, >= 1; values above C are clamped to C.

    Returns:
        ``(scores, class_ids)``: float32 (n, k) probabilities in [0, 1], best first,
        and int64 (n, k) class ids. Among equal logits the order is unspecified.

    Raises:
        ConfigError: ``k < 1`` or ``logits`` is not a non-empty 2-D array.
    """
    logits = np.asarray(logits)
    if logits.ndim != 2 or logits.shape[1] == 0:
        raise ConfigError(f"expected logits of shape (n, C) with C >= 1, got {logits.shape}")
    if k < 1:
        raise ConfigError(f"expected k >= 1, got {k}")
    logits = logits.astype(np.float32, copy=False)
    n, num_classes = logits.shape
    k = min(int(k), num_classes)

    # Softmax is monotonic, so the top k of the logits are the top k of the probabilities.
    if k < num_classes:
        ids = np.argpartition(logits, num_classes - k, axis=1)[:, num_classes - k:]
    else:
        ids = np.broadcast_to(np.arange(num_classes), (n, num_classes))
    top = np.take_along_axis(logits, ids, axis=1)
    order = np.argsort(-top, axis=1, kind="stable")
    ids = np.take_along_axis(ids, order, axis=1).astype(np.int64)
    top = np.take_along_axis(top, order, axis=1)

    # Subtracting the row maximum keeps exp() from overflowing; the maximum is top[:, 0].
    row_max = top[:, :1]
    denom = np.exp(logits - row_max).sum(axis=1, keepdims=True, dtype=np.float64)
    scores = (np.exp(top - row_max) / denom).astype(np.float32)
    return scores, ids
