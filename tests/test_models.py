"""Model specs, the packaged label file and ordered weight loading."""

from __future__ import annotations

import dataclasses
import json
import pickle
from pathlib import Path

import pytest

from wanwu.errors import ModelError
from wanwu.stages.models import make_labels
from wanwu.stages.models.base import MODELS, LabelSet, get_model_spec
from wanwu.stages.models.efficientnet_lite0 import LABELS_PATH
from wanwu.stages.models.weights import map_in_order

torch = pytest.importorskip("torch")

DATA_DIR = Path("/work/shared/data")


@pytest.fixture(scope="module")
def spec():
    return get_model_spec("efficientnet_lite0")


def test_label_file_has_1000_distinct_chinese_labels():
    items = json.loads(LABELS_PATH.read_text(encoding="utf-8"))
    assert [d["class_id"] for d in items] == list(range(1000))
    labels = [d["label"] for d in items]
    assert len(set(labels)) == 1000
    assert all(label and label == label.strip() for label in labels)
    assert all(d["label_en"] for d in items)
    assert (LABELS_PATH.parent / make_labels.LICENSE_NAME).is_file()


def test_label_corrections_present():
    labels = LabelSet.from_json(LABELS_PATH)
    expected = {92: "食蜂鸟", 309: "蜜蜂", 93: "犀鸟", 96: "巨嘴鸟",
                438: "烧杯", 572: "高脚杯", 450: "雪橇", 802: "雪地摩托"}
    assert {i: labels.zh[i] for i in expected} == expected
    assert labels.en[96] == "toucan"


@pytest.mark.skipif(not DATA_DIR.is_dir(), reason="upstream label tables not here")
def test_make_labels_reproduces_packaged_file(tmp_path):
    out = tmp_path / "labels.json"
    assert make_labels.main([str(DATA_DIR), str(out)]) == 0
    assert json.loads(out.read_text("utf-8")) == json.loads(LABELS_PATH.read_text("utf-8"))


def test_build_labels_rejects_repeats():
    zh = {str(i): f"类{i}" for i in range(1000)}
    en = {str(i): f"class {i}" for i in range(1000)}
    zh["5"] = zh["6"]
    with pytest.raises(ModelError, match="repeats"):
        make_labels.build_labels(zh, en)


def test_spec_is_registered_and_pickles(spec):
    assert "efficientnet_lite0" in MODELS.names()
    assert spec.num_classes == 1000 and spec.preprocess.crop == 224
    assert spec.preprocess.resize_shorter == 256 and spec.preprocess.mean == (0.5, 0.5, 0.5)
    assert Path(spec.weights).is_file() and spec.license
    again = pickle.loads(pickle.dumps(spec))
    assert again == spec and again.builder is spec.builder
    assert again.cache_key() == spec.cache_key()
    assert len(spec.labels()) == 1000


def test_builder_loads_weights(spec):
    module = spec.build_torch()
    assert not module.training
    # The classifier bias is trained, not timm's zero initialisation.
    assert module.classifier.bias.abs().sum() > 0
    with torch.no_grad():
        out = module(torch.zeros(1, 3, 224, 224))
    assert out.shape == (1, 1000) and torch.isfinite(out).all()


def test_map_in_order_renames_by_position():
    source = {"a.w": torch.zeros(2, 3), "a.b": torch.ones(2)}
    target = {"x.weight": torch.empty(2, 3), "x.bias": torch.empty(2)}
    mapped = map_in_order(source, target)
    assert list(mapped) == ["x.weight", "x.bias"]
    assert mapped["x.bias"] is source["a.b"]


def test_map_in_order_names_mismatched_keys():
    source = {"_fc.weight": torch.zeros(10, 4), "_fc.bias": torch.zeros(10)}
    target = {"classifier.weight": torch.empty(1000, 4), "classifier.bias": torch.empty(1000)}
    with pytest.raises(ModelError, match=r"_fc\.weight.*classifier\.weight"):
        map_in_order(source, target)
    with pytest.raises(ModelError, match="2 tensors.*got 1"):
        map_in_order({"_fc.weight": source["_fc.weight"]}, target)


def test_builder_rejects_a_wrong_checkpoint(spec, tmp_path):
    bad = tmp_path / "bad.pth"
    torch.save({f"t{i}": torch.zeros(i + 1) for i in range(296)}, bad)
    with pytest.raises(ModelError, match=r"t0 \(1,\) -> conv_stem\.weight"):
        dataclasses.replace(spec, weights=str(bad)).build_torch()
    with pytest.raises(ModelError, match="readable"):
        dataclasses.replace(spec, weights=str(tmp_path / "missing.pth")).build_torch()
