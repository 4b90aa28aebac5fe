"""Int8 precision (NNCF post-training quantization on OpenVINO), on real photos and the real models.

Calibration sets here are a handful of photos, to keep the tests short; the agreement with
fp32 of the built-in 300-photo calibration is checked in test_precision.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import CAT_CLASSES, COFFEE_CLASSES, REPO, general_label, jpeg_bytes, run_wanwu
from wanwu.errors import ConfigError, EngineError
from wanwu.pipeline.config import PipelineConfig
from wanwu.records import Item
from wanwu.stages.classifier import INT8_SUFFIX, Classifier
from wanwu.stages.engines.base import EngineConfig, create_engine
from wanwu.stages.engines.hw import cpu_precision
from wanwu.stages.engines.quantize import load_calibration
from wanwu.stages.models.base import get_model_spec
from wanwu.stages.models.check import decode_batch, margin_for_agreement
from wanwu.stages.sinks.base import read_records

pytest.importorskip("nncf")

SAMPLES = sorted((REPO / "samples").glob("*.jpg"))


def calibration_folder(folder: Path, photos: dict[str, np.ndarray], n: int = 6) -> Path:
    """``n`` JPEG crops of the real photos: a small calibration set, unique to ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    names = sorted(photos)
    for i in range(n):
        photo = photos[names[i % len(names)]]
        h, w = photo.shape[:2]
        crop = photo[i * h // 40:h - i * h // 40, i * w // 50:]
        (folder / f"cal_{i}.jpg").write_bytes(jpeg_bytes(crop))
    return folder


def _quantized(stderr: str) -> bool:
    return "quantizing efficientnet_lite0 to int8" in stderr


@pytest.mark.slow
def test_int8_runs_end_to_end_reuses_its_cache_and_a_new_calibration_set_invalidates_it(tmp_path, photos):
    # Five photos: no other test calibrates on this set, so the first run finds no cached IR.
    calibration = calibration_folder(tmp_path / "calibration", photos, n=5)
    photo_dir = tmp_path / "photos"
    photo_dir.mkdir()
    for path in SAMPLES:
        shutil.copy(path, photo_dir / path.name)

    def run(name: str) -> tuple[str, list[dict]]:
        out = tmp_path / f"{name}.jsonl"
        proc = run_wanwu("run", str(photo_dir), "--out", str(out), "--precision", "int8+fp32",
                         "--calibration", str(calibration), "--progress", "none", timeout=600)
        assert proc.returncode == 0, proc.stderr
        return proc.stderr, read_records(str(out))

    stderr, records = run("first")
    assert _quantized(stderr), stderr[-3000:]  # the first run says it is quantizing
    by_key = {r["key"]: r for r in records}
    assert len(by_key) == len(SAMPLES) and all(r["error"] is None for r in records)
    # Each record says which precision answered: int8, or fp32 for a near tie recomputed.
    assert {r["model"] for r in records} <= {"efficientnet_lite0", "efficientnet_lite0" + INT8_SUFFIX}
    assert by_key["猫 chelsea.jpg"]["labels"][0]["class_id"] in CAT_CLASSES
    assert by_key["咖啡 coffee.jpg"]["labels"][0]["class_id"] in COFFEE_CLASSES
    assert by_key["咖啡 coffee.jpg"]["model"] == "efficientnet_lite0" + INT8_SUFFIX  # not a near tie

    stderr, again = run("second")
    assert not _quantized(stderr), stderr[-3000:]  # the quantized IR came from the cache
    # By key: records are written as batches finish, and the order of finishing varies.
    assert {r["key"]: r["labels"] for r in again} == {r["key"]: r["labels"] for r in records}

    (calibration / "cal_0.jpg").write_bytes(jpeg_bytes(photos["rocket"]))  # same names, other content
    stderr, _ = run("third")
    assert _quantized(stderr), stderr[-3000:]


def test_int8_logits_are_close_to_fp32_and_the_recheck_returns_fp32_for_near_ties(tmp_path, photos):
    spec = get_model_spec("efficientnet_lite0")
    calibration = str(calibration_folder(tmp_path / "calibration", photos))
    batch = decode_batch(SAMPLES, spec)

    def logits(precision: str, margin: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        cfg = EngineConfig(precision=precision, max_batch_size=len(batch), recheck_margin=margin,
                           calibration=calibration if precision.startswith("int8") else "")
        engine = create_engine("openvino", spec, cfg)
        engine.load()
        out = engine.infer(batch)
        assert engine.precision == precision
        engine.shutdown()
        return out, engine.last_exact

    fp32, _ = logits("fp32")
    int8, exact = logits("int8")
    assert exact.size == 0
    assert not np.array_equal(int8, fp32)  # it is another model
    assert np.corrcoef(int8.ravel(), fp32.ravel())[0, 1] > 0.95
    everything, exact = logits("int8+fp32", margin=float("inf"))
    np.testing.assert_array_equal(everything, fp32)
    assert exact.tolist() == list(range(len(batch)))
    nothing, exact = logits("int8+fp32", margin=0.0)
    np.testing.assert_array_equal(nothing, int8)
    assert exact.size == 0


def test_records_name_the_precision_that_answered(tmp_path, photos):
    spec = get_model_spec("efficientnet_lite0")
    batch = decode_batch(SAMPLES, spec)
    items = [Item(p.name, "samples", 1, 1, 0.0) for p in SAMPLES]
    cfg = EngineConfig(precision="int8+fp32", max_batch_size=len(batch), recheck_margin=float("inf"),
                       calibration=str(calibration_folder(tmp_path / "calibration", photos)))
    classifier = Classifier(spec, "openvino", cfg)
    classifier.load()
    assert [r.model for r in classifier.classify(batch, items)] == ["efficientnet_lite0"] * len(items)
    classifier.engine.cfg = EngineConfig(precision="int8+fp32", max_batch_size=len(batch), recheck_margin=0.0)
    records = classifier.classify(batch, items)
    assert [r.model for r in records] == ["efficientnet_lite0" + INT8_SUFFIX] * len(items)
    assert [r.key for r in records] == [p.name for p in SAMPLES]  # in the batch's order
    classifier.shutdown()


def test_int8_settings_are_checked_before_anything_runs(tmp_path):
    with pytest.raises(ConfigError, match="--calibration applies to --precision int8"):
        PipelineConfig(precision="auto", calibration=str(tmp_path))
    with pytest.raises(ConfigError, match="expected photos in the calibration folder"):
        PipelineConfig(precision="int8", calibration=str(tmp_path))
    with pytest.raises(ConfigError, match="expected --calibration to be a folder"):
        PipelineConfig(precision="int8", calibration=str(tmp_path / "missing"))
    spec = get_model_spec("efficientnet_lite0")
    with pytest.raises(EngineError, match="int8 runs on --engine openvino"):
        create_engine("torch", spec, EngineConfig(precision="int8"))
    # The one precision rule: int8 only when asked, never for auto.
    assert cpu_precision("int8+fp32", "") == "int8" and cpu_precision("auto", "flags : amx_int8 avx512_vnni") == "fp32"


def test_calibration_digest_follows_content_not_dates(tmp_path, photos):
    spec = get_model_spec("efficientnet_lite0")
    folder = calibration_folder(tmp_path / "calibration", photos, n=2)
    first = load_calibration(spec, folder).digest
    (folder / "cal_1.jpg").touch()
    assert load_calibration(spec, folder).digest == first
    (folder / "more.jpg").write_bytes(jpeg_bytes(photos["coffee"]))
    assert load_calibration(spec, folder).digest != first


def test_margin_for_agreement_is_the_smallest_that_reaches_the_target():
    reference = np.array([[1.0, 0.0]] * 10, np.float32)
    logits = reference.copy()
    logits[0] = [0.0, 0.3]  # changed, margin 0.3
    logits[1] = [0.0, 0.1]  # changed, margin 0.1
    margin, share = margin_for_agreement(logits, reference, target=0.9)  # one change may stay
    assert 0.1 < margin <= 0.1001 and share == 0.1
    margin, share = margin_for_agreement(logits, reference, target=1.0)
    assert 0.3 < margin <= 0.3001 and share == 0.2
    assert margin_for_agreement(reference, reference) == (0.0, 0.0)


def test_models_check_prints_the_int8_rows(tmp_path, photos):
    calibration = calibration_folder(tmp_path / "calibration", photos)
    out = tmp_path / "check.json"
    proc = run_wanwu("models", "check", "efficientnet_lite0", "--images", "12", "--engines", "openvino",
                     "--calibration", str(calibration), "--json", str(out), timeout=600)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert any(line.split()[:2] == ["openvino", "int8"] for line in lines), proc.stdout
    assert any(line.split()[:2] == ["openvino", "int8+fp32"] for line in lines), proc.stdout
    assert "openvino int8: 99.5% top-1 agreement needs a recheck margin of" in proc.stdout
    rows = {r["precision"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["int8"]["reference"] == "openvino/fp32" and rows["int8+fp32"]["rechecked"] > 0
    assert 0 <= rows["int8"]["top1_agreement"] <= rows["int8+fp32"]["top1_agreement"]


@pytest.mark.slow
def test_general_recognition_quantizes_and_answers(general_folder, tmp_path, photos):
    """The 54,092-class ResNeSt-101 stand-in (random weights): it loads, quantizes and answers."""
    import openvino as ov

    from wanwu.stages.models.resolve import resolve_model

    spec = resolve_model(f"modelscope:{general_folder}")
    calibration = calibration_folder(tmp_path / "calibration", photos, n=2)
    classifier = Classifier(spec, "openvino", EngineConfig(precision="int8", max_batch_size=4,
                                                           calibration=str(calibration)), top_k=3)
    classifier.load()
    batch = decode_batch(SAMPLES, spec)
    records = classifier.classify(batch, [Item(p.name, "samples", 1, 1, 0.0) for p in SAMPLES])
    classifier.shutdown()
    assert [r.model for r in records] == ["general_recognition" + INT8_SUFFIX] * len(SAMPLES)
    for record in records:
        top = record.labels[0]
        assert top["label"] == general_label(top["class_id"]) and 0 < top["score"] <= 1
    int8_irs = list(Path(EngineConfig().cache_path, "openvino-int8").glob("*/model.xml"))
    quantized = [ov.Core().read_model(str(xml)) for xml in int8_irs]
    assert any(m.output(0).get_partial_shape()[1].get_length() == 54_092
               and any(op.get_type_name() == "FakeQuantize" for op in m.get_ops()) for m in quantized)


def test_result_cache_identity_follows_the_calibration_content(tmp_path, photos):
    spec = get_model_spec("efficientnet_lite0")
    folder = calibration_folder(tmp_path / "calibration", photos, n=2)

    def identity(**fields) -> bytes:
        cache = PipelineConfig(cache=str(tmp_path / "answers"), **fields).open_cache(spec)
        cache.shutdown()
        return cache.identity

    first = identity(precision="int8", calibration=str(folder))
    assert identity(precision="int8", calibration=str(folder)) == first
    assert identity(precision="int8") != first != identity(precision="fp32")
    (folder / "cal_0.jpg").write_bytes(jpeg_bytes(photos["rocket"]))
    assert identity(precision="int8", calibration=str(folder)) != first
