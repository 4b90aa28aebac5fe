"""Softmax top-k over logits: the NumPy contract and its CUDA kernel (``topk.cu``).

Selection is linear in the number of classes, so a 54,092-class label space at
batch 64 costs a few milliseconds instead of a full sort: a wide row is cut to the
few logits that reach a threshold from its block maxima, a narrow one (or one with
many ties) goes through ``np.argpartition``, and only the k winners are then
sorted. The order is total, so the CPU and the
GPU pick the same classes: by logit, best first, every NaN above every number (as
NumPy sorts them), -0.0 equal to +0.0, and ties to the lower class id.
:func:`order_keys` spells that order out as unsigned integers, as the kernel does.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from wanwu.errors import ConfigError
from wanwu.kernels import cuda

logger = logging.getLogger(__name__)

SOURCE = "topk.cu"
MAX_K_CUDA = 1024  # the kernel ranks its k winners one per thread of a 1,024-thread block
_THREADS = 1024  # the kernel's BLOCK


def order_keys(logits: np.ndarray) -> np.ndarray:
    """uint32 keys whose unsigned order is the top-k order of float32 ``logits``.

    Positive floats keep their bits with the sign bit set; negative floats are
    complemented, so larger values give larger keys. Every NaN becomes the largest
    key, and -0.0 the key of +0.0. ``topk.cu``'s ``order_key`` is the same mapping.
    """
    # Adding +0.0 turns -0.0 into +0.0 (round to nearest) and leaves the rest alone.
    values = np.asarray(logits, np.float32) + np.float32(0.0)
    bits = values.view(np.uint32)
    # The arithmetic shift spreads the sign bit: all ones for a negative float.
    flip = (values.view(np.int32) >> 31).view(np.uint32) | np.uint32(0x80000000)
    keys = bits ^ flip
    nan = np.isnan(values)
    if nan.any():
        keys[nan] = 0xFFFFFFFF
    return keys


def _select(keys: np.ndarray, k: int) -> np.ndarray:
    """Column indices (n, k), in no order, of each row's k largest keys; ties to the lower index."""
    n, num_classes = keys.shape
    if k == num_classes:
        return np.broadcast_to(np.arange(num_classes), (n, num_classes))
    ids = np.argpartition(keys, num_classes - k, axis=1)[:, num_classes - k:]
    chosen = np.take_along_axis(keys, ids, axis=1)
    kth = chosen.min(axis=1, keepdims=True)
    # argpartition breaks a tie at the k-th key arbitrarily. Rows that left out a key
    # equal to the k-th are selected again with the complemented index under each key,
    # which makes every value distinct and puts the lower index above.
    unsure = np.flatnonzero((keys == kth).sum(axis=1) != (chosen == kth).sum(axis=1))
    if unsure.size:
        low_first = np.uint64(0xFFFFFFFF) - np.arange(num_classes, dtype=np.uint64)
        ranked = (keys[unsure].astype(np.uint64) << np.uint64(32)) | low_first
        ids[unsure] = np.argpartition(ranked, num_classes - k, axis=1)[:, num_classes - k:]
    return ids


def _ranked(logits: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """``ids`` (n, m) reordered best first: key descending, then class id ascending."""
    keys = order_keys(np.take_along_axis(logits, ids, axis=1))
    # lexsort's last key is the primary one.
    return np.take_along_axis(ids, np.lexsort((ids, ~keys), axis=1), axis=1)


def _partition_ids(logits: np.ndarray, k: int) -> np.ndarray:
    """Each row's k best class ids, best first, for k < C (rows without a NaN).

    argpartition on the floats themselves (linear; -0.0 == +0.0 there too) keeps the
    k + 1 largest, which are then ranked as numbers. A row is done unless its
    (k + 1)-th equals its k-th: then a logit equal to the k-th may be left out, and the
    row keeps those ranked ahead of the k-th plus the lowest ids among the logits equal
    to it. Rows with a NaN come out in some order, without failing, for the caller to redo.
    """
    n, num_classes = logits.shape
    rows = np.arange(n)[:, None]
    ids = np.argpartition(logits, num_classes - k - 1, axis=1)[:, num_classes - k - 1:]
    values = logits[rows, ids]
    # Descending logit, then ascending id (lexsort's last key is the primary one);
    # the sort compares floats, so -0.0 == +0.0 there too.
    order = np.lexsort((ids, -values), axis=1)
    ids, values = ids[rows, order], values[rows, order]
    tied = np.flatnonzero(values[:, k - 1] == values[:, k])
    ids = ids[:, :k]
    for row in tied:
        kth = values[row, k - 1]
        above = np.count_nonzero(logits[row, ids[row]] != kth)  # ranked ahead of the k-th
        ids[row, above:] = np.flatnonzero(logits[row] == kth)[:k - above]
    return ids


def _top_ids(logits: np.ndarray, k: int) -> np.ndarray:
    """Each row's k best class ids, best first, for k < C (rows without a NaN).

    A wide row gets a threshold first: cut it into blocks (at least 8 (k + 1)) and take
    the (k + 1)-th largest block maximum. At least k + 1 logits reach it, so the k best
    and every logit tied with the k-th do; they are usually a handful, found in one
    comparison pass and ranked exactly. Rows where many logits reach it (ties) or
    fewer than k + 1 (a NaN), and narrow rows, go to :func:`_partition_ids`.
    """
    n, num_classes = logits.shape
    blocks = max(128, 8 * (k + 1))
    if num_classes < 32 * blocks:
        return _partition_ids(logits, k)
    width = num_classes // blocks
    maxima = logits[:, :blocks * width].reshape(n, blocks, width).max(axis=2)
    threshold = np.partition(maxima, blocks - k - 1, axis=1)[:, blocks - k - 1:blocks - k]
    rows, cols = np.divmod(np.flatnonzero(logits >= threshold), num_classes)
    counts = np.bincount(rows, minlength=n)
    fast = (counts > k) & (counts <= 16 * (k + 1))
    keep = fast[rows]
    rows, cols = rows[keep], cols[keep]
    # Row ascending, then key descending, then class id ascending: the total order.
    order = np.lexsort((cols, ~order_keys(logits[rows, cols]), rows))
    kept = np.where(fast, counts, 0)
    starts = np.cumsum(kept) - kept
    ids = np.empty((n, k), np.intp)
    fast_rows = np.flatnonzero(fast)
    ids[fast_rows] = cols[order[starts[fast_rows, None] + np.arange(k)]]
    slow = np.flatnonzero(~fast)
    if slow.size:
        ids[slow] = _partition_ids(logits[slow], k)
    return ids


def _exp_sum(logits: np.ndarray, row_max: np.ndarray) -> np.ndarray:
    """(n, 1) float64 sums of ``exp(logits - row_max)``, a few rows at a time in one buffer."""
    n, num_classes = logits.shape
    step = max(1, (1 << 18) // num_classes)  # about 1 MiB of float32 at a time
    if step >= n:
        shifted = logits - row_max
        return np.exp(shifted, out=shifted).sum(axis=1, keepdims=True, dtype=np.float64)
    buffer = np.empty((step, num_classes), np.float32)
    sums = np.empty((n, 1), np.float64)
    for start in range(0, n, step):
        part = buffer[:min(step, n - start)]
        np.subtract(logits[start:start + step], row_max[start:start + step], out=part)
        np.exp(part, out=part)
        part.sum(axis=1, keepdims=True, dtype=np.float64, out=sums[start:start + step])
    return sums


def softmax_topk(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` most probable classes of each row and their softmax probabilities.

    Args:
        logits: float array of shape (n, C), C >= 1.
        k: how many classes to keep, >= 1; values above C are clamped to C.

    Returns:
        ``(scores, class_ids)``: float32 (n, k) probabilities in [0, 1], best first,
        and int64 (n, k) class ids; among equal logits the lower class id first, and
        a NaN logit ranks above every number (its row's scores are then all NaN).

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
    if k == num_classes:
        ids = _ranked(logits, np.broadcast_to(np.arange(num_classes), (n, num_classes)))
    else:
        ids = _top_ids(logits, k)
    rows = np.arange(n)[:, None]
    top = logits[rows, ids]

    # Subtracting the row maximum keeps exp() from overflowing; the maximum is top[:, 0].
    row_max = top[:, :1]
    denom = _exp_sum(logits, row_max)
    # A NaN anywhere in a row makes its sum NaN (so do infinities, whose ids are right),
    # so only those rows are searched for one. A NaN row is selected again by its keys,
    # which put every NaN above every number; its scores stay NaN.
    if k < num_classes and np.isnan(denom).any():
        suspects = np.flatnonzero(np.isnan(denom[:, 0]))
        nan_rows = suspects[np.isnan(logits[suspects]).any(axis=1)]
        if nan_rows.size:
            odd = logits[nan_rows]
            ids[nan_rows] = _ranked(odd, _select(order_keys(odd), k))
            top[nan_rows] = np.take_along_axis(odd, ids[nan_rows], axis=1)
    scores = (np.exp(top - row_max) / denom).astype(np.float32)
    return scores, ids.astype(np.int64, copy=False)


def softmax_topk_cuda(logits: Any, k: int) -> tuple[Any, Any]:
    """:func:`softmax_topk` on the GPU, on CuPy's current stream, without a sort.

    Same results as :func:`softmax_topk` (the same class ids, in the same order;
    scores to float32 rounding of the sum), from one block per row: a radix select
    finds the k-th largest logit, one more pass gathers the winners and the softmax
    denominator, and only ``n * k`` values leave the kernel.

    Args:
        logits: float32 ``cupy.ndarray`` (n, C) whose rows are contiguous.
        k: 1..1024; values above C are clamped to C.

    Returns:
        ``(scores, class_ids)`` as ``cupy.ndarray``: float32 and int64 (n, k).

    Raises:
        ConfigError: bad shape, dtype, layout or ``k``.
    """
    import cupy

    logits = cuda.as_device_array(logits, "logits")
    if logits.ndim != 2 or min(logits.shape) == 0 or logits.dtype != np.float32:
        raise ConfigError(f"expected float32 logits of shape (n, C), got {logits.dtype} {logits.shape}")
    if logits.strides[1] != logits.itemsize:
        raise ConfigError(f"expected logits with contiguous rows, got strides {logits.strides}")
    n, num_classes = logits.shape
    if k < 1 or min(k, num_classes) > MAX_K_CUDA:
        raise ConfigError(f"expected 1 <= k <= {MAX_K_CUDA} (after clamping to C), got {k}")
    k = min(int(k), num_classes)
    scores = cupy.empty((n, k), np.float32)
    ids = cupy.empty((n, k), np.int64)
    kernel = cuda.load_function(SOURCE, "softmax_topk_f32")
    row_stride = logits.strides[0] // logits.itemsize
    kernel((n,), (_THREADS,), (logits, np.int64(row_stride), np.int32(num_classes), np.int32(k), scores, ids))
    return scores, ids
