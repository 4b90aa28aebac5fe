"""softmax_topk against a torch reference."""

from __future__ import annotations

import time

import numpy as np
import pytest

from wanwu.errors import ConfigError
from wanwu.kernels.topk import softmax_topk

torch = pytest.importorskip("torch")


def reference(logits: np.ndarray, k: int):
    probs = torch.from_numpy(logits).double().softmax(dim=1)
    values, ids = probs.topk(min(k, logits.shape[1]), dim=1)
    return values.numpy(), ids.numpy()


@pytest.mark.parametrize("n,classes,k", [(1, 10, 1), (4, 1000, 5), (3, 7, 7), (64, 54_092, 5)])
def test_matches_reference(n, classes, k):
    logits = np.random.default_rng(n + classes).normal(0, 4, (n, classes)).astype(np.float32)
    scores, ids = softmax_topk(logits, k)
    ref_scores, ref_ids = reference(logits, k)
    assert scores.dtype == np.float32 and ids.dtype == np.int64
    assert scores.shape == ids.shape == (n, k)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-7)
    assert (np.diff(scores, axis=1) <= 0).all()


def test_k_above_classes_clamps():
    logits = np.array([[1.0, 3.0, 2.0]], np.float32)
    scores, ids = softmax_topk(logits, 10)
    assert ids.tolist() == [[1, 2, 0]]
    np.testing.assert_allclose(scores.sum(), 1.0, rtol=1e-6)


def test_numerically_stable_for_huge_logits():
    logits = np.array([[1e4, 1e4 - 1.0, -1e4], [-1e30, 0.0, 88.0]], np.float32)
    scores, ids = softmax_topk(logits, 2)
    assert np.isfinite(scores).all()
    assert ids[:, 0].tolist() == [0, 2]
    np.testing.assert_allclose(scores[0], [1 / (1 + np.exp(-1)), np.exp(-1) / (1 + np.exp(-1))], rtol=1e-5)


def test_ties_give_equal_scores_and_distinct_ids():
    logits = np.zeros((2, 6), np.float32)
    scores, ids = softmax_topk(logits, 3)
    np.testing.assert_allclose(scores, 1 / 6, rtol=1e-6)
    assert all(len(set(row)) == 3 for row in ids.tolist())


def test_rejects_bad_arguments():
    with pytest.raises(ConfigError):
        softmax_topk(np.zeros((2, 3), np.float32), 0)
    with pytest.raises(ConfigError):
        softmax_topk(np.zeros(3, np.float32), 1)


def test_large_label_space_is_fast():
    logits = np.random.default_rng(0).normal(size=(64, 54_092)).astype(np.float32)
    timings = []
    for _ in range(3):  # best of 3: the first call also pays for page faults
        start = time.perf_counter()
        softmax_topk(logits, 5)
        timings.append(time.perf_counter() - start)
    # A full argsort takes ~0.24 s on 2 Sapphire Rapids cores; argpartition ~40 ms.
    assert min(timings) < 0.15
