"""The Triton ensemble export (``--format triton-ensemble``), checked without Triton or a GPU.

The DALI pipeline Triton would run is serialized with DALI's "mixed" (GPU) decoder,
which cannot be built here. So: (1) the same definition with the "cpu" decoder runs
on real photos and is compared with wanwu's decoders and with ``wanwu run``; (2) the
serialized ``model.dali`` is parsed as DALI's protobuf and its graph compared with the
CPU one; (3) the three ``config.pbtxt`` parse with Triton's own protobuf definitions
and chain tensor by tensor. A ``gpu`` test runs the serialized file itself on a GPU.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from google.protobuf import text_format
from PIL import Image

from conftest import CAT_CLASSES, COFFEE_CLASSES, jpeg_bytes, run_wanwu
from wanwu.errors import ConfigError
from wanwu.kernels.cuda import cuda_unavailable_reason
from wanwu.specs import Preprocess
from wanwu.stages.decoders.base import DecodeConfig, create_decoder
from wanwu.stages.models import triton_dali
from wanwu.stages.models.resolve import resolve_model
from wanwu.stages.models.triton_ensemble import dali_config

pytest.importorskip("nvidia.dali", reason="nvidia.dali cannot be imported")
ort = pytest.importorskip("onnxruntime")
mc = pytest.importorskip("tritonclient.grpc.model_config_pb2")

PHOTOS = ("chelsea", "coffee", "astronaut", "rocket")
BATCH = 8
PRE = Preprocess()  # efficientnet_lite0's geometry: 256 then 224
# Different IDCT scalings (libjpeg-turbo's DCT-domain downscale, Pillow's resampler):
# the bound test_decoders holds wanwu's two decoders to.
MAX_MEAN_ABS_DIFF = 4.0


def mad(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


@pytest.fixture(scope="module")
def jpegs(photos) -> dict[str, bytes]:
    return {name: jpeg_bytes(photos[name], quality=95) for name in PHOTOS}


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    out = tmp_path_factory.mktemp("triton-ensemble")
    proc = run_wanwu("models", "export", "efficientnet_lite0", "--format", "triton-ensemble", "--out", str(out),
                     "--max-batch-size", str(BATCH), "--queue-delay-us", "200", "--dali-threads", "3")
    assert proc.returncode == 0, proc.stderr
    assert "tritonserver --model-repository=" in proc.stdout
    return out


@pytest.fixture(scope="module")
def cpu_pipe():
    pipe = triton_dali.build_pipeline(PRE, "cpu", max_batch_size=BATCH, num_threads=2)
    pipe.build()
    return pipe


@pytest.fixture(scope="module")
def frames(cpu_pipe, jpegs) -> np.ndarray:
    return triton_dali.run_batch(cpu_pipe, [jpegs[n] for n in PHOTOS])


def decode_with(name: str, datas: list[bytes]) -> np.ndarray:
    dec = create_decoder(name, DecodeConfig(preprocess=PRE))
    try:
        out = np.empty((len(datas), *PRE.frame.shape), np.uint8)
        for i, data in enumerate(datas):
            dec.decode_into(data, out[i])
        return out
    finally:
        dec.shutdown()


def encode(arr: np.ndarray, size: tuple[int, int], orientation: int = 1) -> bytes:
    im = Image.fromarray(arr).resize(size, Image.BICUBIC)
    buf = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = orientation
    im.save(buf, "JPEG", quality=92, exif=exif.tobytes())
    return buf.getvalue()


# ---- (1) the pipeline's pixels, on CPU -------------------------------------------


def test_frames_equal_wanwus_dali_decoder_on_real_photos(frames, jpegs):
    # wanwu's DALI decoder computes the crop box on the host (kernels.geometry); the
    # ensemble computes it in the graph. Same box, same DALI kernels: same pixels.
    assert frames.shape == (len(PHOTOS), 224, 224, 3) and frames.dtype == np.uint8
    np.testing.assert_array_equal(frames, decode_with("dali", [jpegs[n] for n in PHOTOS]))


# Sizes that exercise the geometry: portrait and landscape, an odd (size - crop) whose
# half torchvision rounds to even (333x257 -> 331 wide: offset 53.5 -> 54; 300x451 ->
# 384 high: even), a square, and an image smaller than the crop (upscaled).
SIZES = [(451, 300), (300, 451), (333, 257), (257, 333), (1800, 1200), (500, 500), (150, 97), (1023, 257)]


@pytest.mark.parametrize("size", SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
def test_in_graph_crop_box_is_the_decoders_at_awkward_sizes(cpu_pipe, photos, size):
    data = encode(photos["astronaut"], size)
    got = triton_dali.run_batch(cpu_pipe, [data])
    np.testing.assert_array_equal(got, decode_with("dali", [data]))


@pytest.mark.parametrize("orientation, transpose", [(6, Image.Transpose.ROTATE_270), (8, Image.Transpose.ROTATE_90)])
def test_exif_orientation_is_applied_before_the_box(cpu_pipe, photos, orientation, transpose):
    # peek_image_shape must report the displayed (rotated) size, or the box is cut from the wrong axes.
    stored = encode(photos["chelsea"], (451, 300), orientation)
    got = triton_dali.run_batch(cpu_pipe, [stored])
    np.testing.assert_array_equal(got, decode_with("dali", [stored]))
    upright = Image.open(io.BytesIO(encode(photos["chelsea"], (451, 300)))).transpose(transpose)
    buf = io.BytesIO()
    upright.save(buf, "JPEG", quality=92)
    assert mad(got[0], triton_dali.run_batch(cpu_pipe, [buf.getvalue()])[0]) < MAX_MEAN_ABS_DIFF


def test_frames_close_to_wanwus_default_cpu_decoder(frames, jpegs):
    turbo = decode_with("turbo", [jpegs[n] for n in PHOTOS])
    for name, a, b in zip(PHOTOS, frames, turbo):
        assert mad(a, b) < MAX_MEAN_ABS_DIFF, name


def test_onnx_model_on_the_frames_answers_as_wanwu_run(repo, frames, jpegs, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in PHOTOS:
        (folder / f"{name}.jpg").write_bytes(jpegs[name])
    out = tmp_path / "out.jsonl"
    proc = run_wanwu("run", str(folder), "--out", str(out), "--progress", "none", "--precision", "fp32")
    assert proc.returncode == 0, proc.stderr
    records = {json.loads(line)["key"]: json.loads(line) for line in out.read_text("utf-8").splitlines()}
    want = [records[f"{name}.jpg"]["labels"][0]["class_id"] for name in PHOTOS]

    session = ort.InferenceSession(str(repo / "efficientnet_lite0" / "1" / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    logits = session.run(["logits"], {"pixels": frames})[0]
    assert logits.argmax(1).tolist() == want
    assert want[0] in CAT_CLASSES and want[1] in COFFEE_CLASSES


def test_one_bad_image_fails_the_whole_dali_batch(jpegs):
    # Documented in the README: Triton answers the batch with an error, unlike wanwu's
    # decoders, which turn a bad image into an error record and spare the others.
    pipe = triton_dali.build_pipeline(PRE, "cpu", max_batch_size=2, num_threads=1)
    pipe.build()
    with pytest.raises(RuntimeError):
        triton_dali.run_batch(pipe, [jpegs["chelsea"], b"not an image at all" * 10])


# ---- (2) the serialized pipeline -------------------------------------------------


@pytest.fixture(scope="module")
def model_dali(repo):
    return triton_dali.read_pipeline_def((repo / "efficientnet_lite0_dali" / "1" / "model.dali").read_bytes())


def _values(arg) -> list:
    if arg.is_vector:  # DALI stores a list argument as one extra_arg per element
        return [v for extra in arg.extra_args for v in _values(extra)]
    return list(arg.strings) or list(arg.floats) or list(arg.ints) or list(arg.bools)


def _args(op) -> dict:
    return {a.name: _values(a) for a in op.args if not a.name.startswith("_")}


def test_model_dali_decodes_on_the_gpu(model_dali):
    assert model_dali.batch_size == BATCH and model_dali.num_threads == 3
    devices = triton_dali.op_devices(model_dali)
    assert devices["ExternalSource"] == "cpu" and devices["PeekImageShape"] == "cpu"
    assert devices["decoders__Image"] == "mixed" and devices["Resize"] == "gpu"
    (decoder,) = [op for op in model_dali.op if op.name == "decoders__Image"]
    args = _args(decoder)
    assert args["hw_decoder_load"] == [pytest.approx(triton_dali.HW_DECODER_LOAD)]
    assert args["preallocate_width_hint"] == [4032] and args["preallocate_height_hint"] == [3024]
    assert args["device_memory_padding"] == [48 << 20] and args["host_memory_padding"] == [16 << 20]
    assert args["adjust_orientation"] == [True] and args["jpeg_fancy_upsampling"] == [True]
    assert [(i.name, i.device) for i in decoder.input] == [("IMAGE", "cpu")]
    (source,) = [op for op in model_dali.op if op.name == "ExternalSource"]
    assert [o.name for o in source.output] == ["IMAGE"]
    (out,) = model_dali.pipe_outputs
    assert out.device == "gpu" and out.dtype == 0 and out.ndim == 3  # DALIDataType.UINT8 == 0
    (resize,) = [op for op in model_dali.op if op.name == "Resize"]
    assert {i.arg_name for i in resize.input if i.is_argument_input} == {"roi_start", "roi_end"}
    assert _args(resize)["size"] == [224.0, 224.0] and _args(resize)["antialias"] == [True]


def test_model_dali_is_the_cpu_graph_with_the_decoder_on_the_gpu(model_dali, cpu_pipe):
    cpu = triton_dali.read_pipeline_def(cpu_pipe.serialize())
    assert [op.name for op in model_dali.op] == [op.name for op in cpu.op]
    for gpu_op, cpu_op in zip(model_dali.op, cpu.op):
        if gpu_op.name == "decoders__Image":
            hints = {"hw_decoder_load", "preallocate_width_hint", "preallocate_height_hint",
                     "device_memory_padding", "host_memory_padding"}
            want = {**_args(cpu_op), "device": ["mixed"]}
            assert {k: v for k, v in _args(gpu_op).items() if k not in hints} == want
        elif gpu_op.name != "Resize":  # the Resize runs where its input is: "gpu" there, "cpu" here
            assert _args(gpu_op) == _args(cpu_op), gpu_op.name


def test_serialized_cpu_twin_deserializes_and_runs(cpu_pipe, frames, jpegs):
    # A mixed pipeline needs CUDA to deserialize; its CPU twin round-trips through the
    # same serializer, arithmetic on shapes and argument inputs included.
    from nvidia.dali import Pipeline

    pipe = Pipeline.deserialize(serialized_pipeline=cpu_pipe.serialize(), device_id=None, batch_size=BATCH,
                                num_threads=2)
    pipe.build()
    np.testing.assert_array_equal(triton_dali.run_batch(pipe, [jpegs[n] for n in PHOTOS]), frames)


# ---- (3) the Triton configs ------------------------------------------------------


def _config(repo, name: str):
    return text_format.Parse((repo / name / "config.pbtxt").read_text("utf-8"), mc.ModelConfig())


def test_repository_layout(repo):
    assert sorted(p.name for p in repo.iterdir()) == [
        "efficientnet_lite0", "efficientnet_lite0_dali", "efficientnet_lite0_ensemble"]
    assert sorted(p.name for p in (repo / "efficientnet_lite0_dali").iterdir()) == ["1", "config.pbtxt"]
    assert [p.name for p in (repo / "efficientnet_lite0_dali" / "1").iterdir()] == ["model.dali"]
    ensemble = repo / "efficientnet_lite0_ensemble"
    assert sorted(p.name for p in ensemble.iterdir()) == ["1", "config.pbtxt", "labels.txt"]
    assert list((ensemble / "1").iterdir()) == []  # Triton wants the version folder, even empty
    assert (ensemble / "labels.txt").read_bytes() == (repo / "efficientnet_lite0" / "labels.txt").read_bytes()


def test_dali_config(repo):
    config = _config(repo, "efficientnet_lite0_dali")
    assert (config.name, config.backend, config.platform, config.max_batch_size) == (
        "efficientnet_lite0_dali", "dali", "", BATCH)
    (inp,) = config.input
    assert (inp.name, inp.data_type, list(inp.dims), inp.allow_ragged_batch) == ("IMAGE", mc.TYPE_UINT8, [-1], True)
    (out,) = config.output
    assert (out.name, out.data_type, list(out.dims)) == ("pixels", mc.TYPE_UINT8, [224, 224, 3])
    (group,) = config.instance_group
    assert group.kind == mc.ModelInstanceGroup.KIND_GPU and group.count == 1
    assert config.parameters["num_threads"].string_value == "3"
    assert config.dynamic_batching.max_queue_delay_microseconds == 200


def test_ensemble_chains_tensors_from_image_to_logits(repo):
    ensemble = _config(repo, "efficientnet_lite0_ensemble")
    assert ensemble.platform == "ensemble" and ensemble.max_batch_size == BATCH
    # Walk the steps as Triton's ensemble scheduler checks them: every input a step
    # reads exists with the composing model's dtype and dims; the outputs come out.
    tensors = {i.name: (i.data_type, list(i.dims)) for i in ensemble.input}
    assert tensors == {"IMAGE": (mc.TYPE_UINT8, [-1])}
    steps = list(ensemble.ensemble_scheduling.step)
    assert [s.model_name for s in steps] == ["efficientnet_lite0_dali", "efficientnet_lite0"]
    for step in steps:
        model = _config(repo, step.model_name)
        assert model.max_batch_size >= ensemble.max_batch_size, step.model_name
        inputs = {i.name: (i.data_type, list(i.dims)) for i in model.input}
        outputs = {o.name: (o.data_type, list(o.dims)) for o in model.output}
        assert set(step.input_map) == set(inputs), step.model_name
        for model_input, tensor in step.input_map.items():
            assert tensors[tensor] == inputs[model_input], (step.model_name, model_input)
        for model_output, tensor in step.output_map.items():
            tensors[tensor] = outputs[model_output]
    (out,) = ensemble.output
    assert tensors[out.name] == (out.data_type, list(out.dims)) == (mc.TYPE_FP32, [1000])
    assert out.label_filename == "labels.txt"


def test_onnx_file_matches_the_config_the_ensemble_feeds(repo):
    config = _config(repo, "efficientnet_lite0")
    session = ort.InferenceSession(str(repo / "efficientnet_lite0" / "1" / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    (port,) = session.get_inputs()
    assert (port.name, port.type, port.shape[1:]) == ("pixels", "tensor(uint8)", list(config.input[0].dims))


def test_bad_values_are_refused_naming_what_came():
    spec = resolve_model("efficientnet_lite0")
    with pytest.raises(ConfigError, match="num_threads >= 1.*got 0"):
        dali_config(spec, "m_dali", num_threads=0)
    with pytest.raises(ConfigError, match="max_batch_size >= 1.*got 0"):
        dali_config(spec, "m_dali", max_batch_size=0)
    with pytest.raises(ConfigError, match="decoder device in.*got 'gpu'"):
        triton_dali.build_pipeline(PRE, "gpu")
    with pytest.raises(ConfigError, match="serialized DALI pipeline"):
        triton_dali.read_pipeline_def(b"\xff\xff\xff not a pipeline")


# ---- on a GPU ----------------------------------------------------------------------


NO_CUDA = cuda_unavailable_reason()


@pytest.mark.gpu
@pytest.mark.skipif(NO_CUDA is not None, reason=f"needs a CUDA device: {NO_CUDA}")
def test_model_dali_on_the_gpu_matches_the_cpu_pipeline(repo, frames, jpegs):
    # What Triton's DALI backend does: create the pipeline from model.dali with the
    # instance's device, batch size and threads (daliCreatePipeline), then run it.
    from nvidia.dali import Pipeline

    data = (repo / "efficientnet_lite0_dali" / "1" / "model.dali").read_bytes()
    pipe = Pipeline.deserialize(serialized_pipeline=data, device_id=0, batch_size=BATCH, num_threads=2)
    pipe.build()
    got = triton_dali.run_batch(pipe, [jpegs[n] for n in PHOTOS])
    assert got.shape == frames.shape and got.dtype == np.uint8
    # nvJPEG's and the hardware decoder's IDCTs differ from libjpeg-turbo's by a level or two.
    for name, a, b in zip(PHOTOS, got, frames):
        assert mad(a, b) < 1.5, name
    session = ort.InferenceSession(str(repo / "efficientnet_lite0" / "1" / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    top1 = [session.run(["logits"], {"pixels": x})[0].argmax(1).tolist() for x in (got, frames)]
    assert top1[0] == top1[1]
