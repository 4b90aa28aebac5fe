"""What bf16 does to the embedded model's answers, measured with `wanwu models check` on 300 real
photos; and the auto precision's fp32 recheck of near ties, driven by hand."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import REPO, run_wanwu
from wanwu.stages.engines.base import INT8_RECHECK_MARGIN, RECHECK_MARGIN, EngineConfig, create_engine
from wanwu.stages.engines.hw import cpu_has_bf16
from wanwu.stages.models.base import get_model_spec
from wanwu.stages.models.check import compare, decode_batch

pytest.importorskip("skimage")

IMAGES = 300


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("check") / "check.json"
    proc = run_wanwu("models", "check", "efficientnet_lite0", "--images", str(IMAGES), "--json", str(out),
                     "--min-agreement", "0.9", timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    print("\n" + proc.stdout)  # the table, for the record (pytest -s)
    return json.loads(out.read_text())


def _rows(report, engine, precision):
    return [r for r in report["rows"] if r["engine"] == engine and r["precision"] == precision]


def test_engines_agree_in_fp32(report):
    assert report["images"] == IMAGES
    fp32 = [r for r in report["rows"] if r["precision"] == "fp32"]
    assert {r["engine"] for r in fp32} == {"openvino", "torch", "onnxruntime"}
    for row in fp32:
        assert row["top1_agreement"] >= 0.99 and row["max_abs_diff"] < 1e-3, row


@pytest.mark.skipif(not cpu_has_bf16(), reason="auto precision is fp32 without native bf16")
@pytest.mark.parametrize("engine", ["openvino", "torch"])
def test_auto_precision_keeps_99_percent_of_top1_answers(report, engine):
    (auto,) = _rows(report, engine, "bf16+fp32")
    (plain,) = _rows(report, engine, "bf16")
    assert auto["top1_agreement"] >= 0.99, auto
    # Plain bf16 is what auto improves on: it changes more answers, rechecking costs a minority.
    assert plain["top1_agreement"] <= auto["top1_agreement"]
    assert 0 < auto["rechecked"] < 0.5, auto


def test_int8_with_its_recheck_keeps_99_5_percent_of_top1_answers(report):
    """The built-in calibration (other crops than these photos) and INT8_RECHECK_MARGIN meet the
    bound the margin was chosen for; plain int8 changes more answers, and says what it would need."""
    pytest.importorskip("nncf")
    (rechecked,) = _rows(report, "openvino", "int8+fp32")
    (plain,) = _rows(report, "openvino", "int8")
    assert rechecked["top1_agreement"] >= 0.995, rechecked
    assert plain["top1_agreement"] <= rechecked["top1_agreement"]
    assert 0 < rechecked["rechecked"] < 0.35, rechecked
    needed_margin, share = plain["needed_margin"]
    assert needed_margin <= INT8_RECHECK_MARGIN and share <= rechecked["rechecked"], plain


def test_recheck_margin_spans_plain_bf16_to_fp32(tmp_path):
    spec = get_model_spec("efficientnet_lite0")
    batch = decode_batch(sorted((REPO / "samples").glob("*.jpg")), spec)

    def logits(precision: str, margin: float = RECHECK_MARGIN) -> tuple[np.ndarray, int]:
        engine = create_engine("openvino", spec, EngineConfig(precision=precision, max_batch_size=len(batch),
                                                              cache_dir=str(tmp_path), recheck_margin=margin))
        engine.load()
        engine.rechecked = 0
        out = engine.infer(batch)
        engine.shutdown()
        return out, engine.rechecked

    fp32, _ = logits("fp32")
    everything, rechecked = logits("auto", margin=float("inf"))
    if cpu_has_bf16():
        assert rechecked == len(batch)
    np.testing.assert_array_equal(everything, fp32)
    nothing, rechecked = logits("auto", margin=0.0)
    assert rechecked == 0
    np.testing.assert_array_equal(nothing, logits("bf16")[0])


def test_compare_counts_agreement_and_overlap():
    ref = np.array([[3.0, 2.0, 1.0, 0, 0, 0], [0, 1.0, 2.0, 3.0, 4.0, 5.0]], np.float32)
    other = ref.copy()
    other[0, 1] = 4.0  # top-1 changes in row 0; the top 5 stay the same set
    agree, overlap, diff = compare(other, ref)
    assert (agree, overlap, diff) == (0.5, 1.0, 2.0)


def test_padded_rows_keep_the_recheck_to_a_few_shapes():
    from wanwu.stages.engines.torch_cuda import padded_rows

    def padded(rows: list[int], limit: int) -> list[int]:
        return padded_rows(np.array(rows, np.intp), limit).tolist()

    assert padded([5], 32) == [5]
    assert padded([1, 4, 6], 32) == [1, 4, 6, 1]  # to the next power of two, with the first row
    assert padded([0, 1, 2, 3, 4], 6) == [0, 1, 2, 3, 4, 0]  # at most the batch
    assert padded(list(range(7)), 6) == list(range(7))  # never fewer rows than asked for
    assert padded([], 8) == []


@pytest.mark.parametrize("limit", [1, 6, 8, 32, 33])
def test_the_warmed_recheck_sizes_are_every_size_the_padding_makes(limit):
    # warm_recheck runs these sizes before the first batch; a size it missed would pay
    # for a new cuDNN shape in the middle of a job.
    from wanwu.stages.engines.torch_cuda import padded_rows, recheck_sizes

    made = {padded_rows(np.arange(k, dtype=np.intp), limit).size for k in range(1, limit + 1)}
    assert made == set(recheck_sizes(limit))
    assert len(recheck_sizes(limit)) <= limit.bit_length() + 1


def test_the_device_recheck_recomputes_exactly_the_near_ties_in_fp32(tmp_path):
    # recheck_device is the GPU feed's; it runs the same on a CPU device, so its row
    # selection and padding are checked here (a GPU run checks the device itself).
    import torch

    spec = get_model_spec("efficientnet_lite0")
    batch = decode_batch(sorted((REPO / "samples").glob("*.jpg")), spec)[:4]
    engine = create_engine("torch", spec, EngineConfig(precision="auto", max_batch_size=4, cache_dir=str(tmp_path),
                                                       recheck_margin=0.5))
    engine.load()
    try:
        if engine.precision == "fp32":
            pytest.skip("this CPU has no native bf16: auto runs fp32 and nothing is rechecked")
        exact = engine._infer_exact(batch)
        seen: list[int] = []
        hook = engine._module.register_forward_hook(lambda _m, args, _out: seen.append(args[0].shape[0]))
        engine.warm_recheck(4)
        hook.remove()
        assert seen == [1, 2, 4]  # every row count the padded recheck can run, once, before any batch
        logits = np.zeros((4, spec.num_classes), np.float32)
        logits[:, :2] = [[1.0, 0.9], [1.0, 0.8], [2.0, 0.1], [1.0, 0.95]]  # rows 0, 1 and 3 are near ties
        out = engine.recheck_device(torch.from_numpy(batch), logits)
    finally:
        engine.shutdown()
    assert engine.last_exact.tolist() == [0, 1, 3]  # three rows, run as four (padded)
    np.testing.assert_allclose(out[[0, 1, 3]], exact[[0, 1, 3]], rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(out[2], logits[2])
