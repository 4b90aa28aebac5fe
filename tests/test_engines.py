"""Every engine on real photos, against a plain Pillow preprocessing reference."""

from __future__ import annotations

import dataclasses
import importlib.util

import numpy as np
import pytest
from PIL import Image

from wanwu.errors import EngineError
from wanwu.stages.engines.base import EngineConfig, create_engine, resolve_engine_name
from wanwu.stages.engines.cache import cache_key, cached_file
from wanwu.stages.engines.hw import cpu_count, cpu_has_bf16
from wanwu.stages.models.base import get_model_spec

skimage_data = pytest.importorskip("skimage.data")

CATS = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO, CUP = 967, 968
ENGINES = [
    name for name, module in [("torch", "torch"), ("openvino", "openvino"), ("onnxruntime", "onnxruntime")]
    if importlib.util.find_spec(module) is not None
]
MAX_BATCH = 4


def reference_crop(image: np.ndarray, shorter: int = 256, crop: int = 224) -> np.ndarray:
    """Resize the shorter side to ``shorter`` (bilinear), center-crop ``crop``: uint8 HWC."""
    img = Image.fromarray(image).convert("RGB")
    scale = shorter / min(img.size)
    img = img.resize((round(img.width * scale), round(img.height * scale)), Image.BILINEAR)
    left, top = (img.width - crop) // 2, (img.height - crop) // 2
    return np.asarray(img.crop((left, top, left + crop, top + crop)))


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("engine-cache")


@pytest.fixture(scope="session")
def spec():
    return get_model_spec("efficientnet_lite0")


@pytest.fixture(scope="session")
def photo_batch():
    """chelsea (a cat) and coffee (an espresso), as a (2, 224, 224, 3) uint8 batch."""
    return np.stack([reference_crop(skimage_data.chelsea()), reference_crop(skimage_data.coffee())])


@pytest.fixture(scope="session")
def engines(spec, cache_dir):
    """One loaded engine per backend (default precision), shut down at the end."""
    cfg = EngineConfig(max_batch_size=MAX_BATCH, cache_dir=str(cache_dir))
    loaded = {}
    for name in ENGINES:
        loaded[name] = create_engine(name, spec, cfg)
        loaded[name].load()
    yield loaded
    for engine in loaded.values():
        engine.shutdown()
        engine.shutdown()  # twice is safe


@pytest.mark.parametrize("name", ENGINES)
def test_engine_recognises_photos(engines, photo_batch, name):
    logits = engines[name].infer(photo_batch)
    assert logits.shape == (2, 1000) and logits.dtype == np.float32
    top1 = logits.argmax(axis=1)
    assert top1[0] in CATS, f"{name}: chelsea gave class {top1[0]}"
    assert top1[1] in (ESPRESSO, CUP), f"{name}: coffee gave class {top1[1]}"


def test_engines_agree_on_top1(engines, photo_batch):
    top1 = {name: engine.infer(photo_batch).argmax(axis=1).tolist() for name, engine in engines.items()}
    assert len({tuple(t) for t in top1.values()}) == 1, top1


@pytest.mark.parametrize("name", ENGINES)
def test_batch_of_one_and_of_max(engines, photo_batch, name):
    engine = engines[name]
    batch = np.concatenate([photo_batch] * (MAX_BATCH // 2))
    full = engine.infer(batch)
    one = engine.infer(photo_batch[1:2])
    assert full.shape == (MAX_BATCH, 1000) and one.shape == (1, 1000)
    # The same image gives the same class whatever the batch around it.
    assert one.argmax() == full[1].argmax() == full[3].argmax()
    # The engine copied its output: a later call does not change an earlier result.
    before = full.copy()
    engine.infer(batch[::-1].copy())
    np.testing.assert_array_equal(full, before)


@pytest.mark.parametrize("name", ENGINES)
def test_bad_batches_raise(engines, photo_batch, name):
    engine = engines[name]
    with pytest.raises(EngineError, match="uint8"):
        engine.infer(photo_batch.astype(np.float32))
    with pytest.raises(EngineError, match="shape"):
        engine.infer(photo_batch[:, :200])
    with pytest.raises(EngineError, match=f"1 to {MAX_BATCH}"):
        engine.infer(np.zeros((MAX_BATCH + 1, 224, 224, 3), np.uint8))


@pytest.mark.skipif("torch" not in ENGINES, reason="torch not installed")
def test_torch_fp32_and_bf16_agree(spec, photo_batch, cache_dir):
    results = {}
    for precision in ("fp32", "bf16"):
        engine = create_engine("torch", spec, EngineConfig(precision=precision, cache_dir=str(cache_dir)))
        engine.load()
        results[engine.precision] = engine.infer(photo_batch)
        engine.shutdown()
    assert set(results) == {"fp32", "bf16"}
    np.testing.assert_array_equal(results["fp32"].argmax(1), results["bf16"].argmax(1))


def test_auto_precision_follows_hardware(engines):
    expected = "bf16+fp32" if cpu_has_bf16() else "fp32"  # auto: bf16, near ties recomputed in fp32
    for name in ("torch", "openvino"):
        if name in engines:
            assert engines[name].precision == expected
    if "onnxruntime" in engines:
        assert engines["onnxruntime"].precision == "fp32"


@pytest.mark.skipif("openvino" not in ENGINES, reason="openvino not installed")
def test_auto_picks_openvino_on_cpu(spec, cache_dir):
    assert resolve_engine_name("auto", "cpu") == "openvino"
    engine = create_engine("auto", spec, EngineConfig(cache_dir=str(cache_dir)))
    assert engine.name == "openvino"


@pytest.mark.skipif("openvino" not in ENGINES, reason="openvino not installed")
def test_openvino_reuses_cached_ir(engines, spec, photo_batch):
    first = engines["openvino"]
    xml = first.ir_path()
    assert xml.is_file() and xml.with_suffix(".bin").is_file()
    mtime = xml.stat().st_mtime_ns

    def no_torch(_spec):
        raise AssertionError("a warm start must not build the torch model")

    # Same cache key (name, weights, preprocessing), but a builder that fails:
    # loading proves the IR came from the cache.
    cached_spec = dataclasses.replace(spec, builder=no_torch)
    second = create_engine("openvino", cached_spec, first.cfg)
    second.load()
    assert not second.built_ir and second.ir_path() == xml
    assert xml.stat().st_mtime_ns == mtime
    np.testing.assert_allclose(second.infer(photo_batch), first.infer(photo_batch), rtol=1e-4, atol=1e-4)
    second.shutdown()


@pytest.mark.skipif("onnxruntime" not in ENGINES, reason="onnxruntime not installed")
def test_onnxruntime_reuses_cached_model(engines, spec, photo_batch):
    first = engines["onnxruntime"]
    path = first.onnx_path()
    mtime = path.stat().st_mtime_ns
    second = create_engine("onnxruntime", dataclasses.replace(spec, builder=None), first.cfg)
    second.load()
    assert not second.built_onnx and path.stat().st_mtime_ns == mtime
    np.testing.assert_array_equal(second.infer(photo_batch), first.infer(photo_batch))


def test_cpu_count_is_positive():
    assert cpu_count() >= 1


@pytest.mark.parametrize("flags,expected", [
    ("fpu avx512f avx512_bf16 avx512_vnni", True),
    ("fpu amx_bf16 amx_tile", True),
    ("fpu avx2 avx512f", False),
])
def test_cpu_has_bf16_reads_flags(tmp_path, flags, expected):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n")
    assert cpu_has_bf16(str(cpuinfo)) is expected
    assert cpu_has_bf16(str(tmp_path / "missing")) is False


@pytest.mark.parametrize("name", ENGINES)
def test_unavailable_device_raises(spec, cache_dir, name):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    engine = create_engine(name, spec, EngineConfig(device="cuda:0", cache_dir=str(cache_dir)))
    with pytest.raises(EngineError, match="cuda"):
        engine.load()


def test_cached_file_builds_once(tmp_path):
    calls = []

    def build(folder):
        calls.append(folder)
        (folder / "m.xml").write_text("ir")
        (folder / "m.bin").write_text("weights")

    key = cache_key("model", "version")
    path, built = cached_file(tmp_path, key, "m.xml", build)
    assert built and path == tmp_path / key / "m.xml" and path.read_text() == "ir"
    assert (tmp_path / key / "m.bin").is_file()
    assert cached_file(tmp_path, key, "m.xml", build) == (path, False)
    assert len(calls) == 1 and not calls[0].exists()  # the temporary folder is gone
    assert sorted(p.name for p in tmp_path.iterdir()) == [key]


def test_cached_file_loses_a_race_gracefully(tmp_path):
    def build(folder):
        # Another job finishes the same entry while this one is still building.
        (tmp_path / "k").mkdir()
        (tmp_path / "k" / "m.xml").write_text("theirs")
        (folder / "m.xml").write_text("ours")

    path, built = cached_file(tmp_path, "k", "m.xml", build)
    assert not built and path.read_text() == "theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k"]


def test_cached_file_rejects_a_builder_that_writes_nothing(tmp_path):
    with pytest.raises(EngineError, match="m.xml"):
        cached_file(tmp_path, "k", "m.xml", lambda folder: None)
    assert list(tmp_path.iterdir()) == []
