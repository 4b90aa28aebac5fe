"""Exports of the embedded model: ONNX (float32 and uint8 input) checked with onnxruntime against
torch on real photos, an OpenVINO IR with uint8 NHWC input, and a Triton model repository whose
config parses with Triton's own protobuf definitions."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import CAT_CLASSES, COFFEE_CLASSES, run_wanwu
from wanwu.errors import ModelError
from wanwu.stages.models import export
from wanwu.stages.models.check import decode_batch
from wanwu.stages.models.resolve import resolve_model

ort = pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")

PHOTOS = ("chelsea", "coffee", "astronaut", "rocket")


@pytest.fixture(scope="module")
def spec():
    return resolve_model("efficientnet_lite0")


@pytest.fixture(scope="module")
def crops(spec, photos, tmp_path_factory):
    """The real photos as the pipeline decodes them: uint8 (4, 224, 224, 3), in PHOTOS order."""
    from conftest import jpeg_bytes

    folder = tmp_path_factory.mktemp("export-photos")
    paths = []
    for name in PHOTOS:
        (folder / f"{name}.jpg").write_bytes(jpeg_bytes(photos[name], quality=95))
        paths.append(folder / f"{name}.jpg")
    return decode_batch(paths, spec)


def _check_recognised(logits: np.ndarray) -> None:
    assert logits[0].argmax() in CAT_CLASSES and logits[1].argmax() in COFFEE_CLASSES, logits.argmax(1)


@pytest.mark.parametrize("kind", ["float32", "uint8"])
def test_onnx_matches_torch_on_real_photos(spec, crops, lite0_exports, kind):
    path = lite0_exports["onnx_f32" if kind == "float32" else "onnx_u8"]
    report = export.verify_onnx(spec, path, crops, kind)
    assert report["images"] == 4 and report["top1_agreement"] == 1.0
    assert report["max_abs_diff"] < 1e-3 * report["max_logit"], report
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (port,) = session.get_inputs()
    assert port.name == export.INPUT_NAMES[kind] and isinstance(port.shape[0], str)  # dynamic batch
    feed = crops if kind == "uint8" else export.normalised_nchw(crops, spec)
    whole = session.run([export.OUTPUT_NAME], {port.name: feed})[0]
    _check_recognised(whole)
    one = session.run([export.OUTPUT_NAME], {port.name: feed[1:2]})[0]
    np.testing.assert_allclose(one[0], whole[1], rtol=1e-4, atol=1e-4)


def test_openvino_ir_takes_uint8_nhwc(spec, crops, lite0_exports):
    ov = pytest.importorskip("openvino")
    model = ov.Core().read_model(lite0_exports["ir"])
    port = model.input(0)
    assert port.get_element_type() == ov.Type.u8
    assert str(port.get_partial_shape()) == "[?,224,224,3]"
    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    logits = compiled(crops)[0]
    _check_recognised(logits)
    with torch.inference_mode():
        from wanwu.stages.engines.wrappers import NormalizedInput

        want = NormalizedInput(spec.build_torch(), spec.preprocess.mean, spec.preprocess.std)(torch.from_numpy(crops))
    np.testing.assert_allclose(logits, want.numpy(), rtol=1e-3, atol=1e-3)


def test_cli_onnx_export_verifies_and_prints_how_to_run(tmp_path):
    proc = run_wanwu("models", "export", "efficientnet_lite0", "--format", "onnx", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "efficientnet_lite0.onnx").is_file() and (tmp_path / "labels.json").is_file()
    assert "top-1 agreement 100%" in proc.stdout
    assert "--model onnx:" in proc.stdout and "--mean 0.5 0.5 0.5 --std 0.5 0.5 0.5" in proc.stdout


def test_files_cannot_be_exported_again(lite0_exports):
    onnx_spec = resolve_model(f"onnx:{lite0_exports['onnx_f32']}", labels=str(lite0_exports["labels"]))
    with pytest.raises(ModelError, match="already an onnx file"):
        export.export_onnx(onnx_spec, "unused.onnx")


@pytest.fixture(scope="module")
def triton_repo(tmp_path_factory):
    out = tmp_path_factory.mktemp("triton")
    proc = run_wanwu("models", "export", "efficientnet_lite0", "--format", "triton", "--out", str(out),
                     "--max-batch-size", "16", "--queue-delay-us", "500", "--kind", "cpu", "--instances", "2")
    assert proc.returncode == 0, proc.stderr
    return out


def test_triton_config_parses_with_tritons_protobuf(triton_repo):
    mc = pytest.importorskip("tritonclient.grpc.model_config_pb2")
    from google.protobuf import text_format

    folder = triton_repo / "efficientnet_lite0"
    assert sorted(p.name for p in folder.iterdir()) == ["1", "config.pbtxt", "labels.txt"]
    config = text_format.Parse((folder / "config.pbtxt").read_text("utf-8"), mc.ModelConfig())
    assert config.name == "efficientnet_lite0" and config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == 16
    (inp,) = config.input
    assert (inp.name, inp.data_type, list(inp.dims)) == ("pixels", mc.TYPE_UINT8, [224, 224, 3])
    assert inp.format == mc.ModelInput.FORMAT_NHWC
    (out,) = config.output
    assert (out.name, out.data_type, list(out.dims)) == ("logits", mc.TYPE_FP32, [1000])
    assert out.label_filename == "labels.txt"
    assert config.dynamic_batching.max_queue_delay_microseconds == 500
    assert list(config.dynamic_batching.preferred_batch_size) == [8, 16]
    (group,) = config.instance_group
    assert group.count == 2 and group.kind == mc.ModelInstanceGroup.KIND_CPU


def test_triton_model_and_labels_agree_with_the_config(triton_repo, crops):
    mc = pytest.importorskip("tritonclient.grpc.model_config_pb2")
    from google.protobuf import text_format

    folder = triton_repo / "efficientnet_lite0"
    config = text_format.Parse((folder / "config.pbtxt").read_text("utf-8"), mc.ModelConfig())
    session = ort.InferenceSession(str(folder / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    (port,), (result,) = session.get_inputs(), session.get_outputs()
    assert (port.name, port.type, port.shape[1:]) == (config.input[0].name, "tensor(uint8)", list(config.input[0].dims))
    assert (result.name, result.shape[1:]) == (config.output[0].name, list(config.output[0].dims))
    labels = (folder / "labels.txt").read_text("utf-8").splitlines()
    assert len(labels) == 1000 and labels[285] == "埃及猫" and labels[967] == "意大利浓咖啡"
    # What Triton's classification extension does with label_filename: line i names class i.
    logits = session.run([result.name], {port.name: crops})[0]
    assert labels[int(logits[1].argmax())] in {labels[c] for c in COFFEE_CLASSES}
    assert labels[int(logits[0].argmax())] in {labels[c] for c in CAT_CLASSES}
