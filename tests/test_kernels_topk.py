"""softmax_topk's total order by hand (ties, NaN, -0.0, k), then the CUDA kernel against it.

tests/test_topk.py checks the same function against torch on random logits.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from wanwu.errors import ConfigError
from wanwu.kernels import cuda
from wanwu.kernels.topk import MAX_K_CUDA, order_keys, softmax_topk, softmax_topk_cuda

NO_CUDA = cuda.cuda_unavailable_reason()
requires_cuda = pytest.mark.skipif(NO_CUDA is not None, reason=f"needs a CUDA device: {NO_CUDA}")
CLASSES = 54_092  # 万物识别's label space


def test_order_keys_by_hand():
    values = np.array([0.0, -0.0, 1.0, -1.0, np.inf, -np.inf, np.nan, -np.nan], np.float32)
    # +x: bits | 0x80000000; -x: ~bits. 1.0 is 0x3F800000, inf 0x7F800000; NaN is the top key.
    assert order_keys(values).tolist() == [
        0x80000000, 0x80000000, 0xBF800000, 0x407FFFFF, 0xFF800000, 0x007FFFFF, 0xFFFFFFFF, 0xFFFFFFFF]


def test_order_keys_keep_the_order_of_the_floats():
    values = np.sort(np.random.default_rng(0).normal(0, 1e3, 1000).astype(np.float32))
    values = np.concatenate([[-np.inf, np.finfo(np.float32).min], values, [np.finfo(np.float32).max, np.inf]])
    keys = order_keys(values.astype(np.float32))
    assert (np.diff(keys.astype(np.int64)) >= 0).all()
    assert keys.dtype == np.uint32


def test_ties_go_to_the_lower_class_id():
    logits = np.array([[1.0, 3.0, 3.0, 2.0, 3.0]], np.float32)
    scores, ids = softmax_topk(logits, 4)
    assert ids.tolist() == [[1, 2, 4, 3]]
    denom = 3 * math.exp(3) + math.exp(2) + math.exp(1)
    np.testing.assert_allclose(scores[0], [math.exp(3) / denom] * 3 + [math.exp(2) / denom], rtol=1e-6)
    assert softmax_topk(logits, 2)[1].tolist() == [[1, 2]]


def test_a_tie_at_the_k_th_place_in_a_large_row_takes_the_lowest_ids():
    # argpartition alone picks any of the 54,090 zeros; the order wants 0, 1, 2.
    logits = np.zeros((2, CLASSES), np.float32)
    logits[0, [100, 5000]] = 1.0
    logits[1, 7] = -1.0
    _, ids = softmax_topk(logits, 5)
    assert ids.tolist() == [[100, 5000, 0, 1, 2], [0, 1, 2, 3, 4]]


def test_a_wide_row_with_a_nan_past_its_last_block_or_ties_at_the_threshold():
    # Wide rows are cut by a threshold from block maxima; the last columns lie past
    # every block, and a value tied with the k-th may sit anywhere.
    logits = np.random.default_rng(5).normal(0, 1, (3, CLASSES)).astype(np.float32)
    logits[0, CLASSES - 1] = np.nan
    logits[1, [9, 40_000, 3, CLASSES - 2]] = [7.0, 6.0, 6.0, 6.0]
    logits[2, 1:100] = -5.0
    logits[2, 100:] = -9.0
    logits[2, [CLASSES - 1, 0]] = [-0.0, 0.0]
    scores, ids = softmax_topk(logits, 3)
    assert ids[0].tolist()[0] == CLASSES - 1 and np.isnan(scores[0]).all()
    assert ids[1].tolist() == [9, 3, 40_000]
    assert ids[2].tolist() == [0, CLASSES - 1, 1]


def test_minus_zero_ties_with_zero():
    _, ids = softmax_topk(np.array([[-1.0, -0.0, 0.0]], np.float32), 3)
    assert ids.tolist() == [[1, 2, 0]]


def test_nan_ranks_first_and_makes_the_row_nan():
    logits = np.array([[1.0, np.nan, 5.0, -np.nan], [1.0, 2.0, 3.0, 4.0]], np.float32)
    scores, ids = softmax_topk(logits, 3)
    assert ids.tolist() == [[1, 3, 2], [3, 2, 1]]
    assert np.isnan(scores[0]).all() and np.isfinite(scores[1]).all()


def test_k_equal_to_the_classes_orders_them_all():
    scores, ids = softmax_topk(np.array([[2.0, 0.0, 2.0, 1.0]], np.float32), 4)
    assert ids.tolist() == [[0, 2, 3, 1]]
    np.testing.assert_allclose(scores.sum(), 1.0, rtol=1e-6)


def test_the_launcher_refuses_host_arrays():
    pytest.importorskip("cupy", reason="CuPy (the 'gpu' extra) is not installed")
    with pytest.raises(ConfigError, match="cupy.ndarray"):
        softmax_topk_cuda(np.zeros((1, 3), np.float32), 1)


# ---- on a GPU: the same ids as the reference, scores to float32 rounding ----------

def _logits(kind: str, n: int, classes: int) -> np.ndarray:
    rng = np.random.default_rng(n * classes)
    if kind == "normal":
        return rng.normal(0, 4, (n, classes)).astype(np.float32)
    if kind == "ties":  # a few distinct values: the threshold key is shared by thousands
        return rng.integers(-3, 3, (n, classes)).astype(np.float32)
    logits = rng.normal(0, 4, (n, classes)).astype(np.float32)
    logits[0, [classes - 1, 0]] = np.nan  # both NaNs first, the lower id ahead
    logits[1, :] = -0.0  # a row of zeros, one sign or the other: all tie
    logits[1, ::3] = 0.0
    logits[2, classes // 2] = np.inf  # inf - inf: a NaN row, as on the CPU
    return logits


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("kind", ["normal", "ties", "special"])
@pytest.mark.parametrize("n, classes, k", [(32, CLASSES, 5), (64, CLASSES, 1), (3, CLASSES, MAX_K_CUDA),
                                           (4, 1000, 5), (3, 7, 7), (3, 7, 10), (5, 1, 1), (3, 2049, 1000)])
def test_gpu_matches_the_reference(kind, n, classes, k):
    import cupy

    logits = _logits(kind, n, classes)
    scores, ids = softmax_topk_cuda(cupy.asarray(logits), k)
    with np.errstate(invalid="ignore"):  # inf - inf in the "special" rows
        ref_scores, ref_ids = softmax_topk(logits, k)
    np.testing.assert_array_equal(ids.get(), ref_ids)
    np.testing.assert_allclose(scores.get(), ref_scores, rtol=1e-5, atol=1e-8)  # NaNs compare equal


@pytest.mark.gpu
@requires_cuda
def test_gpu_reads_rows_of_a_wider_array():
    import cupy

    wide = np.random.default_rng(3).normal(size=(8, 1200)).astype(np.float32)
    _, ids = softmax_topk_cuda(cupy.asarray(wide)[:, :1000], 5)
    np.testing.assert_array_equal(ids.get(), softmax_topk(wide[:, :1000], 5)[1])


@pytest.mark.gpu
@requires_cuda
def test_gpu_refuses_what_the_kernel_cannot_do():
    import cupy

    logits = cupy.zeros((2, CLASSES), np.float32)
    with pytest.raises(ConfigError, match="k"):
        softmax_topk_cuda(logits, MAX_K_CUDA + 1)
    with pytest.raises(ConfigError, match="float32"):
        softmax_topk_cuda(logits.astype(np.float16), 5)
    with pytest.raises(ConfigError, match="contiguous rows"):
        softmax_topk_cuda(logits[:, ::2], 5)
