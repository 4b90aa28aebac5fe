"""The model registry and resolver: label files, names and schemes, overrides, users' timm / ONNX /
OpenVINO models (on real photos, through the real CLI), and engines chosen by model format."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest

from conftest import CAT_CLASSES, COFFEE_CLASSES, REPO, run_wanwu
from wanwu.errors import ConfigError, EngineError, ModelError
from wanwu.stages.engines.base import EngineConfig, create_engine, resolve_engine_name
from wanwu.stages.models.base import MODELS, get_model_spec
from wanwu.stages.models.check import decode_batch
from wanwu.stages.models.labels import LabelSet, read_labels
from wanwu.stages.models.resolve import resolve_model
from wanwu.stages.sinks.base import read_records

torch = pytest.importorskip("torch")

LITE0_MEAN_STD = ["--mean", "0.5", "0.5", "0.5", "--std", "0.5", "0.5", "0.5"]


# --- label files ------------------------------------------------------------------------------

def test_text_labels_plain_and_indexed(tmp_path):
    plain = tmp_path / "plain.txt"
    plain.write_text("猫\n狗\n\n", encoding="utf-8")  # a trailing blank line is not a class
    assert read_labels(plain) == LabelSet(("猫", "狗"), ("", ""))
    indexed = tmp_path / "meta_info.txt"
    indexed.write_text("0\t猫\n1\t狗 \n", encoding="utf-8")
    assert read_labels(indexed).zh == ("猫", "狗")


@pytest.mark.parametrize("text,match", [("0\t猫\n2\t狗\n", "expected index 1 on line 2"),
                                        ("猫\n\n狗\n", "empty line"), ("", "at least one label")])
def test_bad_text_labels_say_where(tmp_path, text, match):
    path = tmp_path / "labels.txt"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ModelError, match=match):
        read_labels(path)


def test_json_labels_and_missing_files(tmp_path):
    path = tmp_path / "labels.json"
    path.write_text(json.dumps([{"class_id": 1, "label": "狗", "label_en": "dog"},
                                {"class_id": 0, "label": "猫"}], ensure_ascii=False), encoding="utf-8")
    assert read_labels(path) == LabelSet(("猫", "狗"), ("", "dog"))
    with pytest.raises(ModelError, match="expected a label file"):
        read_labels(tmp_path / "nope.txt")


# --- names, schemes and overrides -----------------------------------------------------------------

def test_registry_lists_the_models_and_get_model_spec_still_works():
    assert {"efficientnet_lite0", "general_recognition"} <= set(MODELS.names())
    assert get_model_spec("efficientnet_lite0") == resolve_model("efficientnet_lite0")
    assert get_model_spec("efficientnet_lite0", crop=200).preprocess.crop == 200


def test_unknown_names_list_what_is_accepted():
    with pytest.raises(ConfigError, match=r"unknown model 'resnet9000'.*efficientnet_lite0.*onnx:FILE"):
        resolve_model("resnet9000")
    with pytest.raises(ConfigError, match="--labels"):
        resolve_model(f"onnx:{REPO / 'README.md'}")
    with pytest.raises(ConfigError, match="--weights"):
        resolve_model("timm:resnet18", labels=str(REPO / "README.md"))


def test_preprocess_overrides():
    spec = resolve_model("efficientnet_lite0", mean=(0.1, 0.2, 0.3), std=[1, 1, 1], resize_shorter=300, crop=260)
    assert spec.preprocess.mean == (0.1, 0.2, 0.3) and spec.preprocess.std == (1.0, 1.0, 1.0)
    assert (spec.preprocess.resize_shorter, spec.preprocess.crop) == (300, 260)
    assert resolve_model("efficientnet_lite0", crop=320).preprocess.resize_shorter == 366  # keeps 256:224
    with pytest.raises(ConfigError, match="crop <= resize_shorter"):
        resolve_model("efficientnet_lite0", resize_shorter=100, crop=224)
    assert spec.cache_key() != resolve_model("efficientnet_lite0").cache_key()


def test_cli_models_list_and_show():
    proc = run_wanwu("models", "list")
    assert proc.returncode == 0, proc.stderr
    assert "efficientnet_lite0" in proc.stdout and "general_recognition" in proc.stdout
    assert "damo/cv_resnest101_general_recognition -> general_recognition" in proc.stdout
    proc = run_wanwu("models", "show", "efficientnet_lite0", "--json")
    info = json.loads(proc.stdout)
    assert info["classes"] == 1000 and info["architecture"] == "tf_efficientnet_lite0"
    assert info["preprocess"]["crop"] == 224 and info["first_labels"][0].startswith("丁鲷")


# --- users' models -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def timm_checkpoint(tmp_path_factory):
    """The embedded model's weights re-saved in timm naming, as a user's fine-tune would be."""
    path = tmp_path_factory.mktemp("timm") / "lite0-timm.pth"
    state = get_model_spec("efficientnet_lite0").build_torch().state_dict()
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    return path


def test_timm_model_reproduces_the_embedded_one(timm_checkpoint, lite0_exports):
    spec = resolve_model("timm:tf_efficientnet_lite0", weights=str(timm_checkpoint),
                         labels=str(lite0_exports["labels"]), mean=(0.5,) * 3, std=(0.5,) * 3)
    assert spec.name == "tf_efficientnet_lite0" and spec.num_classes == 1000 and spec.format == "torch"
    assert pickle.loads(pickle.dumps(spec)) == spec
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(spec.build_torch()(x), get_model_spec("efficientnet_lite0").build_torch()(x))


def test_timm_model_with_wrong_checkpoint_or_name(timm_checkpoint, lite0_exports):
    labels = str(lite0_exports["labels"])
    with pytest.raises(ModelError, match=r"missing \(first: conv1\.weight.*unexpected \(first: conv_stem\.weight"):
        resolve_model("timm:resnet18", weights=str(timm_checkpoint), labels=labels).build_torch()
    with pytest.raises(ModelError, match="timm architecture name"):
        resolve_model("timm:not_a_network", weights=str(timm_checkpoint), labels=labels).build_torch()


def test_file_models_resolve_by_scheme_or_extension(lite0_exports):
    labels = str(lite0_exports["labels"])
    onnx = resolve_model(f"onnx:{lite0_exports['onnx_f32']}", labels=labels)
    assert (onnx.format, onnx.name, onnx.num_classes) == ("onnx", "lite0", 1000)
    assert resolve_model(str(lite0_exports["onnx_f32"]), labels=labels) == onnx
    ir = resolve_model(str(lite0_exports["ir"]), labels=labels)
    assert ir.format == "openvino" and pickle.loads(pickle.dumps(ir)) == ir
    with pytest.raises(ModelError, match="torch model"):
        ir.build_torch()


def test_engines_are_chosen_by_format(lite0_exports):
    labels = str(lite0_exports["labels"])
    onnx = resolve_model(f"onnx:{lite0_exports['onnx_f32']}", labels=labels)
    ir = resolve_model(f"openvino:{lite0_exports['ir']}", labels=labels)
    assert resolve_engine_name("auto", "cpu", "onnx") == "openvino"
    assert resolve_engine_name("auto", "cuda:0", "onnx") == "onnxruntime"
    assert resolve_engine_name("auto", "cpu", "openvino") == "openvino"
    with pytest.raises(EngineError, match="runs openvino models on cuda:0"):
        resolve_engine_name("auto", "cuda:0", "openvino")
    with pytest.raises(EngineError, match="torch engine can run.*--engine openvino or onnxruntime"):
        create_engine("torch", onnx, EngineConfig())
    with pytest.raises(EngineError, match="--engine openvino or auto"):
        create_engine("onnxruntime", ir, EngineConfig())


@pytest.mark.parametrize("kind,engine", [("onnx_f32", "openvino"), ("onnx_f32", "onnxruntime"),
                                         ("onnx_u8", "onnxruntime"), ("ir", "openvino")])
def test_file_engines_match_the_embedded_model(lite0_exports, kind, engine, tmp_path):
    """By hand: a user's file on each engine that runs it gives the embedded model's fp32 logits."""
    batch = decode_batch([REPO / "samples" / "猫 chelsea.jpg", REPO / "samples" / "咖啡 coffee.jpg"],
                         get_model_spec("efficientnet_lite0"))
    scheme = "openvino" if kind == "ir" else "onnx"
    spec = resolve_model(f"{scheme}:{lite0_exports[kind]}", labels=str(lite0_exports["labels"]),
                         mean=(0.5,) * 3, std=(0.5,) * 3)
    cfg = EngineConfig(precision="fp32", max_batch_size=2, cache_dir=str(tmp_path))
    got = create_engine(engine, spec, cfg)
    want = create_engine("torch", get_model_spec("efficientnet_lite0"), cfg)
    np.testing.assert_allclose(got.infer(batch), want.infer(batch), rtol=1e-3, atol=1e-3)
    got.shutdown()
    want.shutdown()


def test_file_model_with_wrong_labels_or_crop_fails_clearly(lite0_exports, tmp_path):
    ten = tmp_path / "ten.txt"
    ten.write_text("".join(f"类{i}\n" for i in range(10)), encoding="utf-8")
    for engine in ("openvino", "onnxruntime"):
        spec = resolve_model(f"onnx:{lite0_exports['onnx_f32']}", labels=str(ten))
        with pytest.raises(EngineError, match="expected .* to output 10 logits"):
            create_engine(engine, spec, EngineConfig(cache_dir=str(tmp_path))).load()
    spec = resolve_model(f"onnx:{lite0_exports['onnx_u8']}", labels=str(lite0_exports["labels"]), crop=200)
    with pytest.raises(EngineError, match=r"uint8 \(n, 200, 200, 3\)"):
        create_engine("onnxruntime", spec, EngineConfig(cache_dir=str(tmp_path))).load()


@pytest.fixture(scope="module")
def sample_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("embedded") / "results.jsonl"
    proc = run_wanwu("run", str(REPO / "samples"), "--out", str(out), "--precision", "fp32", "--progress", "none")
    assert proc.returncode == 0, proc.stderr
    return {r["key"]: r for r in read_records(str(out))}


@pytest.mark.parametrize("kind,extra", [
    ("onnx_f32", LITE0_MEAN_STD),  # auto engine (OpenVINO) on a float32 ONNX file
    ("onnx_f32", LITE0_MEAN_STD + ["--engine", "onnxruntime"]),
    ("ir", []),  # uint8 IR: preprocessing built in
])
def test_cli_runs_users_files_like_the_embedded_model(lite0_exports, sample_run, kind, extra, tmp_path):
    scheme = "openvino" if kind == "ir" else "onnx"
    out = tmp_path / "results.jsonl"
    proc = run_wanwu("run", str(REPO / "samples"), "--out", str(out), "--model", f"{scheme}:{lite0_exports[kind]}",
                     "--labels", str(lite0_exports["labels"]), "--precision", "fp32", "--progress", "none", *extra)
    assert proc.returncode == 0, proc.stderr
    records = {r["key"]: r for r in read_records(str(out))}
    assert set(records) == set(sample_run)
    for key, rec in records.items():
        want = sample_run[key]["labels"][0]
        assert rec["labels"][0]["class_id"] == want["class_id"] and rec["labels"][0]["label"] == want["label"]
        assert abs(rec["labels"][0]["score"] - want["score"]) < 1e-3, key
    assert records["猫 chelsea.jpg"]["labels"][0]["class_id"] in CAT_CLASSES
    assert records["咖啡 coffee.jpg"]["labels"][0]["class_id"] in COFFEE_CLASSES


def test_cli_rejects_an_engine_that_cannot_run_the_file(lite0_exports, tmp_path):
    proc = run_wanwu("run", str(REPO / "samples"), "--out", str(tmp_path / "r.jsonl"), "--engine", "torch",
                     "--model", f"onnx:{lite0_exports['onnx_f32']}", "--labels", str(lite0_exports["labels"]))
    assert proc.returncode == 1 and "use --engine openvino or onnxruntime" in proc.stderr
    assert not (tmp_path / "r.jsonl").exists()  # refused before any process started
    proc = run_wanwu("run", str(REPO / "samples"), "--out", str(tmp_path / "r.jsonl"), "--model", "nope")
    assert proc.returncode == 2 and "unknown model 'nope'" in proc.stderr
