"""The classifier stage driven by hand: frames in, records out, with no process around it."""

from __future__ import annotations

import time

import numpy as np
import pytest

from conftest import CAT_CLASSES, COFFEE_CLASSES, jpeg_bytes
from wanwu.errors import EngineError, StageError
from wanwu.records import Item, Record
from wanwu.stages.classifier import Classifier
from wanwu.stages.decoders.base import DecodeConfig, create_decoder
from wanwu.stages.engines.base import EngineConfig
from wanwu.stages.models.base import get_model_spec

MODEL = get_model_spec("efficientnet_lite0")


@pytest.fixture(scope="module")
def classifier():
    classifier = Classifier(MODEL, "auto", EngineConfig(precision="fp32", max_batch_size=4), top_k=3)
    classifier.load()
    yield classifier
    classifier.shutdown()
    classifier.shutdown()


def test_it_declares_its_input_before_anything_is_built():
    unloaded = Classifier(MODEL, "onnxruntime", EngineConfig())
    assert unloaded.input_spec() == MODEL.preprocess.frame == Classifier.declare_input(MODEL, EngineConfig())
    assert unloaded.describe() == "classifier 'efficientnet_lite0' (onnxruntime)"
    with pytest.raises(StageError, match="expected load"):
        unloaded.logits(np.zeros((1, 224, 224, 3), np.uint8))


def test_real_photos_become_records_with_chinese_labels(classifier, photos):
    decoder = create_decoder("turbo", DecodeConfig(MODEL.preprocess))
    batch = np.empty((2, 224, 224, 3), np.uint8)
    infos = decoder.decode_batch_into([jpeg_bytes(photos["chelsea"]), jpeg_bytes(photos["coffee"])], list(batch))
    t0 = time.time()
    items = [Item(f"{name}.jpg", "photos", info.width, info.height, t0) for name, info in zip(("cat", "coffee"), infos)]
    cat, coffee = classifier.classify(batch, items)
    assert isinstance(cat, Record) and (cat.key, cat.source, cat.width, cat.height) == ("cat.jpg", "photos", 451, 300)
    assert cat.labels[0]["class_id"] in CAT_CLASSES and coffee.labels[0]["class_id"] in COFFEE_CLASSES
    assert len(cat.labels) == 3 and cat.model == "efficientnet_lite0" and cat.error is None and cat.elapsed_ms >= 0
    assert "猫" in cat.labels[0]["label"] and cat.labels[0]["label_en"]
    scores = [label["score"] for label in cat.labels]
    assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1.0001


def test_a_batch_that_is_not_its_input_is_refused(classifier):
    with pytest.raises(EngineError, match="expected a uint8 batch"):
        classifier.classify(np.zeros((1, 256, 256, 3), np.uint8), [Item("k", "s", 1, 1, 0.0)])


def test_top_k_is_clamped_to_the_classes():
    assert Classifier(MODEL, "auto", EngineConfig(), top_k=5000).top_k == 1000
