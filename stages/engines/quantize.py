"""Int8 post-training quantization of an OpenVINO IR with NNCF, cached beside the compiled models.

``quantized_ir`` turns the float32 IR the OpenVINO engine converted (uint8 NHWC input,
normalisation built in) into an int8 IR with ``nncf.quantize``, once: the result is kept
under ``<cache>/openvino-int8/<key>/model.xml``, where the key names the model and its
weights, the OpenVINO and NNCF versions, the recipe and the calibration set's content.
A changed calibration photo, a new NNCF or a new recipe gives a new key, never a stale IR.

The recipe is the best of what was measured on EfficientNet-Lite0 (300 calibration photos,
600 held-out photos, Sapphire Rapids; README, Precision): default PTQ changed 12% of the
top-1 answers; keeping the first convolution and the classifier in float and using full
bias correction instead of the fast one brought that to about 5%, so the fp32 recheck of
near ties (``--precision int8+fp32``) needs a modest share of images.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import xxhash

from wanwu.errors import ConfigError, EngineError
from wanwu.stages.engines.cache import cache_key, cached_file
from wanwu.stages.models.base import ModelSpec

logger = logging.getLogger(__name__)

# Bump when the quantization changes, to invalidate cached int8 IRs.
RECIPE = "ptq-2:performance,bias-correction,float-first-conv-and-classifier"
CALIBRATION_IMAGES = 300  # the built-in set: NNCF's default subset size; fewer changed more answers
CALIBRATION_SEED = 7  # other crops than the check corpus (seed 2024), so checks run on held-out photos
NNCF_HINT = "pip install 'wanwu[int8]'"


@dataclass(frozen=True)
class Calibration:
    """A calibration set: its photos and the digest that names it in cache keys."""

    files: tuple[Path, ...]  # the photos, in a stable order
    digest: str  # xxh3-128 of the files' names and bytes and the model's preprocessing
    source: str  # the folder, for messages

    def pixels(self, spec: ModelSpec) -> np.ndarray:
        """The photos decoded as the pipeline would (turbo decoder): uint8 (n, crop, crop, 3).

        Raises:
            DecodeError: a file is not a decodable image (calibration wants every one).
        """
        from wanwu.stages.models.check import decode_batch

        return decode_batch(self.files, spec)


def nncf_version() -> str:
    """NNCF's installed version, read without importing it (the import takes seconds).

    Raises:
        ConfigError: NNCF is not installed; the message names the extra that installs it.
    """
    if importlib.util.find_spec("nncf") is None:
        raise ConfigError(f"expected NNCF for int8 precision ({NNCF_HINT}), got no nncf package")
    return importlib.metadata.version("nncf")


def calibration_files(folder: str | Path) -> list[Path]:
    """The images under ``folder`` (recursively, by extension), in a stable order.

    Raises:
        ConfigError: ``folder`` is not a folder or holds no image.
    """
    from wanwu.stages.sources.base import IMAGE_EXTENSIONS

    root = Path(folder)
    if not root.is_dir():
        raise ConfigError(f"expected --calibration to be a folder of photos, got {str(folder)!r}")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise ConfigError(f"expected photos in the calibration folder {str(folder)!r}, found no image files")
    return files


def builtin_calibration_folder(cache_dir: Path, n: int = CALIBRATION_IMAGES) -> Path:
    """The built-in calibration photos, written once into the cache (``photos.build_corpus``).

    Raises:
        ConfigError: scikit-image, whose photos they are cropped from, is not installed.
    """
    from wanwu.stages.models import photos

    def build(folder: Path) -> None:
        try:
            photos.build_corpus(folder, n, seed=CALIBRATION_SEED, photos=photos.CALIBRATION_PHOTOS)
        except ImportError as exc:
            raise ConfigError(f"expected scikit-image for the built-in calibration photos ({NNCF_HINT}), "
                              f"or --calibration DIR: {exc}") from exc
        (folder / "complete").touch()

    key = cache_key("calibration", str(n), str(CALIBRATION_SEED), ",".join(photos.CALIBRATION_PHOTOS))
    done, _ = cached_file(cache_dir / "calibration", key, "complete", build)
    return done.parent


def load_calibration(spec: ModelSpec, folder: str | Path) -> Calibration:
    """The photos of ``folder`` and their digest (reading every byte: a changed photo is a new set).

    Raises:
        ConfigError: no photos there.
    """
    files = calibration_files(folder)
    digest = xxhash.xxh3_128(repr(spec.preprocess).encode())
    for path in files:
        data = path.read_bytes()
        digest.update(f"{path.relative_to(folder)}\0{len(data)}\0".encode())
        digest.update(data)
    return Calibration(tuple(files), digest.hexdigest(), str(folder))


def answer_identity(spec: ModelSpec, calibration_dir: str) -> str:
    """What besides the model makes int8 answers what they are, for the result cache's identity:
    NNCF's version, the recipe, and the calibration set (its content for a folder; the built-in
    set is fixed by its constants).

    Raises:
        ConfigError: NNCF is missing, or no photos in ``calibration_dir``.
    """
    if calibration_dir:
        calibration = load_calibration(spec, calibration_dir).digest
    else:
        calibration = f"built-in {CALIBRATION_IMAGES} seed {CALIBRATION_SEED}"
    return f"nncf {nncf_version()}|{RECIPE}|{calibration}"


def int8_key(spec: ModelSpec, calibration: Calibration, *parts: str) -> str:
    """The cache entry of ``spec`` quantized on ``calibration`` (``parts``: the IR format, OpenVINO's version)."""
    return cache_key(spec.cache_key(), *parts, f"nncf {nncf_version()}", RECIPE, calibration.digest)


def float_scope(model: object) -> list[str]:
    """Names of the operations kept in float: the first convolution and the last MatMul (the classifier).

    The first convolution sees the normalised pixels, whose range a per-tensor int8 scale
    fits worst; the classifier's logits are what the top-1 answer is read from.
    """
    ops = model.get_ordered_ops()  # type: ignore[attr-defined]
    convs = [op.get_friendly_name() for op in ops if op.get_type_name() == "Convolution"]
    matmuls = [op.get_friendly_name() for op in ops if op.get_type_name() == "MatMul"]
    return convs[:1] + matmuls[-1:]


def quantize_ir(source: str | Any, pixels: np.ndarray, out_xml: Path) -> None:
    """Quantize ``source`` (an IR's path, or an ``ov.Model``) on the uint8 crops ``pixels``; save the
    int8 IR at ``out_xml``. The model must take uint8 NHWC pixels, as the engine feeds it.

    Raises:
        EngineError: NNCF failed on the model.
    """
    import nncf
    import openvino as ov

    # A clone: the engine compiles the caller's model in float32 too.
    model = ov.Core().read_model(source) if isinstance(source, str) else source.clone()
    # NNCF logs a line per operation it leaves in float; its progress bars say enough.
    nncf.set_log_level(logging.WARNING)
    dataset = nncf.Dataset([pixels[i:i + 1] for i in range(len(pixels))])
    try:
        quantized = nncf.quantize(
            model, dataset, subset_size=len(pixels), preset=nncf.QuantizationPreset.PERFORMANCE,
            ignored_scope=nncf.IgnoredScope(names=float_scope(model), validate=False),
            # Full bias correction took twice as long as the fast one and halved the changed answers.
            fast_bias_correction=False,
        )
    except (RuntimeError, ValueError, nncf.InternalError) as exc:
        raise EngineError(f"expected NNCF to quantize {model.get_friendly_name()}, got: {exc}") from exc
    ov.save_model(quantized, str(out_xml), compress_to_fp16=False)


def quantized_ir(spec: ModelSpec, source: str | Any, cache_dir: Path, calibration_dir: str,
                 parts: Sequence[str]) -> tuple[Path, bool]:
    """The int8 IR of ``spec`` (from the cache, or quantized now and cached).

    Args:
        spec: the model; its ``cache_key`` is part of the entry's key.
        source: its float32 model taking uint8 NHWC pixels: an IR's path or an ``ov.Model``.
        cache_dir: the engine cache; entries go under ``openvino-int8/``.
        calibration_dir: a folder of photos, or "" for the built-in set (EfficientNet-Lite0's
            ImageNet photos; other models should be given their own).
        parts: more strings for the key (the IR format, OpenVINO's version).

    Returns:
        ``(path, built)``: the int8 IR, and whether this call quantized it.

    Raises:
        ConfigError: NNCF (or, for the built-in set, scikit-image) is missing, or no photos.
        EngineError: quantization failed or the cache cannot be written.
    """
    nncf_version()
    folder = calibration_dir or builtin_calibration_folder(cache_dir)
    calibration = load_calibration(spec, folder)
    key = int8_key(spec, calibration, *parts)

    def build(tmp: Path) -> None:
        logger.warning("quantizing %s to int8 with NNCF on %d calibration photos from %s (once: it is cached)",
                       spec.name, len(calibration.files), calibration.source)
        quantize_ir(source, calibration.pixels(spec), tmp / "model.xml")

    return cached_file(cache_dir / "openvino-int8", key, "model.xml", build)
