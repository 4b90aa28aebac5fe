"""万物识别 general recognition: a full-size stand-in of the ModelScope folder (54,092 classes,
random weights in the original ResNeSt naming) loaded, run through `wanwu run` on every engine,
and the engines compared; plus fast checks of the key mapping on small ResNeSt variants."""

from __future__ import annotations

import pickle
import time

import numpy as np
import pytest

from conftest import (GENERAL_CLASSES, general_label, original_resnest_shapes, random_resnest_state,
                      run_wanwu, write_general_recognition)
from wanwu.errors import ModelError
from wanwu.kernels.topk import softmax_topk
from wanwu.stages.engines.base import EngineConfig, create_engine
from wanwu.stages.models import resnest
from wanwu.stages.models.base import IMAGENET_MEAN, IMAGENET_STD
from wanwu.stages.models.check import decode_batch
from wanwu.stages.models.resolve import resolve_model
from wanwu.stages.models.weights import check_fit, load_by_name
from wanwu.stages.sinks.base import read_records

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

ENGINES = ("torch", "openvino", "onnxruntime")


# --- the key mapping, on small variants (seconds) ---------------------------------------------

@pytest.mark.parametrize("arch,layers,stem", [("resnest14d", (1, 1, 1, 1), 32), ("resnest26d", (2, 2, 2, 2), 32)])
def test_original_names_map_onto_timm(arch, layers, stem):
    module = timm.create_model(arch, pretrained=False, num_classes=10)
    state = random_resnest_state(original_resnest_shapes(10, layers, stem))
    wrapped = {f"module.{k}": v for k, v in state.items()}
    load_by_name(module, resnest.from_original_names(wrapped), arch)
    torch.testing.assert_close(module.layer1[0].conv2.fc1.weight, state["layer1.0.conv2.fc1.weight"])
    torch.testing.assert_close(module.layer1[0].downsample[1].weight, state["layer1.0.downsample.1.weight"])


def test_inner_module_wrappers_and_old_checkpoints_load():
    module = timm.create_model("resnest14d", pretrained=False, num_classes=10)
    state = random_resnest_state(original_resnest_shapes(10, (1, 1, 1, 1), 32))
    # ".module." inside names (a wrapped submodule) and no num_batches_tracked (PyTorch < 0.4.1).
    odd = {k.replace("layer1.0.conv2.", "layer1.0.conv2.module."): v for k, v in state.items()
           if not k.endswith("num_batches_tracked")}
    load_by_name(module, resnest.from_original_names(odd), "resnest14d")
    torch.testing.assert_close(module.layer1[0].conv2.conv.weight, state["layer1.0.conv2.conv.weight"])


def test_mismatched_checkpoints_name_the_keys():
    target = timm.create_model("resnest14d", pretrained=False, num_classes=10).state_dict()
    state = random_resnest_state(original_resnest_shapes(10, (1, 1, 1, 1), 32))
    del state["layer2.0.conv2.fc1.bias"]
    state["layer9.0.extra.weight"] = torch.zeros(1)
    state["fc.weight"] = torch.zeros(1000, 2048)
    with pytest.raises(ModelError) as info:
        check_fit(state, target, "ResNeSt-14")
    message = str(info.value)
    assert "1 missing (first: layer2.0.conv2.fc1.bias)" in message
    assert "1 unexpected (first: layer9.0.extra.weight)" in message
    assert "fc.weight (1000, 2048) where the model has (10, 2048)" in message


@pytest.fixture(scope="module")
def small_folder(tmp_path_factory):
    """ResNeSt-101 with 10 classes: the real architecture, a small classifier (fast to build)."""
    return write_general_recognition(tmp_path_factory.mktemp("small") / "cv_resnest101_general_recognition", 10)


def test_small_folder_builds_and_rejects_a_foreign_checkpoint(small_folder, tmp_path):
    spec = resolve_model(str(small_folder))
    assert spec.name == "general_recognition" and spec.num_classes == 10
    module = spec.build_torch()
    assert not module.training and module.fc.out_features == 10
    with torch.no_grad():
        assert torch.isfinite(module(torch.zeros(1, 3, 224, 224))).all()
    # A plain ResNet-50 checkpoint is not a ResNeSt: the error names what is wrong.
    foreign = tmp_path / "resnet50"
    foreign.mkdir()
    torch.save(timm.create_model("resnet50", num_classes=10).state_dict(), foreign / "pytorch_model.pt")
    (foreign / "meta_info.txt").write_text("".join(f"{i}\t类{i}\n" for i in range(10)), encoding="utf-8")
    with pytest.raises(ModelError, match=r"626 missing \(first: conv1\.0\.weight.*117 unexpected \(first: conv1\.weight"):
        resolve_model(f"modelscope:{foreign}").build_torch()


def test_missing_folder_and_cache_explain_themselves(tmp_path, monkeypatch):
    with pytest.raises(ModelError, match="neither"):
        resolve_model(f"modelscope:{tmp_path / 'nowhere'}")
    monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(ModelError, match="modelscope:/path/to/cv_resnest101_general_recognition"):
        resolve_model("damo/cv_resnest101_general_recognition")


def test_modelscope_cache_is_found_by_alias(small_folder, tmp_path, monkeypatch):
    hub = tmp_path / "hub" / "models" / "damo"
    hub.mkdir(parents=True)
    (hub / "cv_resnest101_general_recognition").symlink_to(small_folder)
    monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path))
    for name in ("general_recognition", "damo/cv_resnest101_general_recognition", "万物识别"):
        assert resolve_model(name).weights.endswith("pytorch_model.pt")


# --- the full-size stand-in (54,092 classes) ---------------------------------------------------

def test_full_size_spec(general_folder):
    spec = resolve_model(f"modelscope:{general_folder}")
    assert spec.num_classes == GENERAL_CLASSES == resnest.NUM_CLASSES
    assert (spec.preprocess.resize_shorter, spec.preprocess.crop) == (256, 224)
    assert spec.preprocess.mean == IMAGENET_MEAN and spec.preprocess.std == IMAGENET_STD
    labels = spec.labels()
    assert len(labels) == GENERAL_CLASSES and labels.zh[54_091] == general_label(54_091)
    assert pickle.loads(pickle.dumps(spec)) == spec
    assert resolve_model(str(general_folder)) == spec  # the bare folder
    assert resolve_model(f"modelscope:{general_folder / 'pytorch_model.pt'}").num_classes == GENERAL_CLASSES


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory):
    import shutil

    from conftest import REPO

    folder = tmp_path_factory.mktemp("photos")
    for path in (REPO / "samples").glob("*.jpg"):
        shutil.copy(path, folder / path.name)
    return folder


@pytest.fixture(scope="module")
def runs(general_folder, photo_dir, tmp_path_factory):
    """`wanwu run` on the four sample photos with each engine, in fp32: engine -> records by key."""
    out = {}
    for engine in ENGINES:
        path = tmp_path_factory.mktemp(f"run-{engine}") / "results.jsonl"
        proc = run_wanwu("run", str(photo_dir), "--out", str(path), "--model", f"modelscope:{general_folder}",
                         "--engine", engine, "--precision", "fp32", "--progress", "none")
        assert proc.returncode == 0, proc.stderr
        out[engine] = {r["key"]: r for r in read_records(str(path))}
    return out


def test_every_engine_runs_the_full_model(runs, photo_dir):
    for engine, records in runs.items():
        assert set(records) == {p.name for p in photo_dir.iterdir()}, engine
        for rec in records.values():
            assert rec["error"] is None and rec["model"] == "general_recognition"
            labels = rec["labels"]
            assert len(labels) == 5 and all(0 <= l["class_id"] < GENERAL_CLASSES for l in labels)
            assert all(l["label"] == general_label(l["class_id"]) and l["label_en"] == "" for l in labels)
            scores = [l["score"] for l in labels]
            assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1


def test_engines_agree_end_to_end(runs):
    reference = runs["torch"]
    for engine in ("openvino", "onnxruntime"):
        for key, rec in runs[engine].items():
            want = reference[key]["labels"]
            assert rec["labels"][0]["class_id"] == want[0]["class_id"], (engine, key)
            np.testing.assert_allclose([l["score"] for l in rec["labels"]], [l["score"] for l in want],
                                       rtol=1e-3, err_msg=f"{engine} {key}")


def test_default_engine_and_precision_on_the_bare_folder(general_folder, photo_dir, runs, tmp_path):
    path = tmp_path / "auto.jsonl"
    proc = run_wanwu("run", str(photo_dir), "--out", str(path), "--model", str(general_folder), "--progress", "none")
    assert proc.returncode == 0, proc.stderr
    for rec in read_records(str(path)):
        assert rec["labels"][0]["class_id"] == runs["torch"][rec["key"]]["labels"][0]["class_id"], rec["key"]


def test_engine_logits_agree_and_topk_is_cheap(general_folder, runs, photo_dir):
    """In process, from the caches the CLI runs filled: fp32 logits of every engine, and the top-k
    over 54,092 classes against the model's own batch time."""
    spec = resolve_model(f"modelscope:{general_folder}")
    crops = decode_batch(sorted(photo_dir.iterdir()), spec)
    logits, ms_per_image = {}, {}
    for name in ENGINES:
        engine = create_engine(name, spec, EngineConfig(precision="fp32", max_batch_size=len(crops)))
        engine.load()
        start = time.perf_counter()
        logits[name] = engine.infer(crops)
        ms_per_image[name] = (time.perf_counter() - start) * 1000 / len(crops)
        engine.shutdown()
    ref = logits["torch"]
    assert ref.shape == (len(crops), GENERAL_CLASSES) and ref.std() > 0.1
    for name in ("openvino", "onnxruntime"):
        assert (logits[name].argmax(1) == ref.argmax(1)).all(), name
        assert np.abs(logits[name] - ref).max() < 1e-3 * np.abs(ref).max(), name

    batch = np.random.default_rng(0).normal(0, 1, (32, GENERAL_CLASSES)).astype(np.float32)
    topk_ms = min(_time_ms(lambda: softmax_topk(batch, 5)) for _ in range(5))
    batch_ms = 32 * ms_per_image["openvino"]
    print(f"\ntop-5 of 32 x {GENERAL_CLASSES}: {topk_ms:.1f} ms; ResNeSt-101 fp32 batch of 32 (OpenVINO, "
          f"estimated from {len(crops)}): {batch_ms:.0f} ms; {topk_ms / batch_ms:.2%}")
    assert topk_ms < 0.02 * batch_ms


def _time_ms(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1000
