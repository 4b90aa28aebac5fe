"""Measure what precision and engine choices do to a model's answers.

``check_model`` decodes real photos into one batch of crops, runs every engine
that can run the model in float32, and where the engine has bf16 also in plain
bf16 and in ``auto`` precision (bf16 with near ties recomputed in fp32, see
``EngineConfig``), and on OpenVINO, when asked, in int8 and int8+fp32 (NNCF's
quantization, near ties recomputed in fp32); it compares top-1 classes: each against the same engine's
float32, and each engine's float32 against the first engine's. Without
ground-truth labels this bounds the accuracy change: a precision that changes the
top-1 class of a fraction ``d`` of the images moves top-1 accuracy by at most ``d``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from wanwu.errors import DecodeError, InputError

from wanwu.stages.classifier import Classifier
from wanwu.stages.decoders.base import DecodeConfig, create_decoder
from wanwu.stages.engines.base import ENGINE_FORMATS, EngineConfig
from wanwu.stages.models.base import ModelSpec

logger = logging.getLogger(__name__)

BF16_ENGINES = ("openvino", "torch")  # ONNX Runtime's CPU provider runs float32 only
INT8_ENGINES = ("openvino",)  # NNCF's quantized IR
AGREEMENT_TARGET = 0.995  # the top-1 agreement a recheck margin is chosen for
ENGINE_ORDER = ("openvino", "torch", "onnxruntime")


@dataclass(frozen=True)
class Comparison:
    """One engine and precision against a reference run on the same images."""

    engine: str  # engine that ran
    precision: str  # what it actually ran in ("bf16+fp32": auto, near ties recomputed in fp32)
    reference: str  # "engine/precision" it is compared with
    top1_agreement: float  # share of images with the same top-1 class, 0..1
    top5_overlap: float  # mean share of the reference's top 5 also in this run's top 5, 0..1
    max_abs_diff: float  # largest logit difference
    ms_per_image: float  # inference time per image in this run, for scale
    rechecked: float = 0.0  # share of images recomputed in fp32 (auto, int8+fp32)
    # Plain bf16/int8 rows: the smallest recheck margin reaching AGREEMENT_TARGET here, and the share it recomputes.
    needed_margin: tuple[float, float] | None = None


def decode_batch(paths: Sequence[str | Path], spec: ModelSpec, decoder: str = "turbo") -> np.ndarray:
    """Decode ``paths`` as the pipeline would: uint8 (n, crop, crop, 3) crops.

    Raises:
        DecodeError: a file is not a decodable image (a check wants every photo).
    """
    dec = create_decoder(decoder, DecodeConfig(preprocess=spec.preprocess))
    out = np.empty((len(paths), *spec.preprocess.frame.shape), np.uint8)
    try:
        for i, path in enumerate(paths):
            try:
                dec.decode_into(Path(path).read_bytes(), out[i])
            except (OSError, InputError) as exc:
                raise DecodeError(f"expected a decodable photo at {path}: {exc}") from exc
    finally:
        dec.shutdown()
    return out


@dataclass(frozen=True)
class _Run:
    logits: np.ndarray
    precision: str
    ms_per_image: float
    rechecked: float


def _run(engine_name: str, precision: str, spec: ModelSpec, pixels: np.ndarray, batch_size: int,
         cache_dir: str, calibration: str = "") -> _Run:
    classifier = Classifier(spec, engine_name, EngineConfig(precision=precision, max_batch_size=batch_size,
                                                            cache_dir=cache_dir, calibration=calibration))
    try:
        classifier.load()
        classifier.engine.rechecked = 0  # not the warm-up's
        start = time.perf_counter()
        logits = np.concatenate([classifier.logits(pixels[i:i + batch_size])
                                 for i in range(0, len(pixels), batch_size)])
        ms = (time.perf_counter() - start) * 1000.0 / len(pixels)
        return _Run(logits, classifier.precision, ms, classifier.engine.rechecked / len(pixels))
    finally:
        classifier.shutdown()


def _needed(run: _Run, ref: _Run) -> tuple[float, float] | None:
    return None if "+" in run.precision else margin_for_agreement(run.logits, ref.logits)


def compare(logits: np.ndarray, reference: np.ndarray) -> tuple[float, float, float]:
    """``(top1_agreement, top5_overlap, max_abs_diff)`` of two (n, C) logit arrays."""
    agree = float((logits.argmax(1) == reference.argmax(1)).mean())
    k = min(5, logits.shape[1])
    top = np.argpartition(-logits, k - 1, axis=1)[:, :k]
    ref = np.argpartition(-reference, k - 1, axis=1)[:, :k]
    overlap = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(top.tolist(), ref.tolist())]))
    return agree, overlap, float(np.abs(logits - reference).max())


def margin_for_agreement(logits: np.ndarray, reference: np.ndarray,
                         target: float = AGREEMENT_TARGET) -> tuple[float, float]:
    """The smallest recheck margin at which ``logits`` with its near ties recomputed agree with
    ``reference`` on at least ``target`` of the top-1 classes; and the share it recomputes.

    A near tie (top-2 margin under the margin) gets the reference's answer, so it agrees;
    the margin must exceed the margins of all but ``floor((1 - target) * n)`` of the changed answers.
    """
    top2 = np.sort(np.partition(logits, -2, axis=1)[:, -2:], axis=1)
    margins = top2[:, 1] - top2[:, 0]
    changed = np.sort(margins[logits.argmax(1) != reference.argmax(1)])[::-1]
    allowed = int(np.floor((1.0 - target) * len(logits) + 1e-9))
    margin = float(np.nextafter(changed[allowed], np.inf)) if len(changed) > allowed else 0.0
    return margin, float((margins < margin).mean())


def check_model(
    spec: ModelSpec,
    pixels: np.ndarray,
    engines: Sequence[str] = ENGINE_ORDER,
    batch_size: int = 32,
    cache_dir: str = "",
    int8: bool = False,
    calibration: str = "",
) -> list[Comparison]:
    """Compare precisions and engines on ``pixels`` (uint8 crops, see ``decode_batch``).

    Args:
        spec: the model.
        pixels: uint8 (n, crop, crop, 3).
        engines: engines to try, in order; those that cannot run ``spec``'s format are skipped.
            The first one's float32 run is the reference between engines.
        batch_size: images per inference call.
        cache_dir: engine cache ("" for the default).
        int8: also int8 and int8+fp32 on the engines that have them (needs NNCF).
        calibration: int8's calibration photos ("" for the built-in set); they should
            not be among ``pixels``, so that agreement is measured on held-out photos.

    Returns:
        One ``Comparison`` per bf16, auto, int8 and int8+fp32 run (against the same
        engine's float32; auto is left out where it means float32) and per float32 run
        of each engine (against the first engine's; the first's own row shows its speed).
    """
    fp32: dict[str, _Run] = {}
    results: list[Comparison] = []
    for name in [e for e in engines if spec.format in ENGINE_FORMATS[e]]:
        fp32[name] = ref = _run(name, "fp32", spec, pixels, batch_size, cache_dir)
        precisions = [*(("bf16", "auto") if name in BF16_ENGINES else ()),
                      *(("int8", "int8+fp32") if int8 and name in INT8_ENGINES else ())]
        for precision in precisions:
            run = _run(name, precision, spec, pixels, batch_size, cache_dir,
                       calibration if precision.startswith("int8") else "")
            if run.precision != "fp32":
                results.append(Comparison(name, run.precision, f"{name}/fp32", *compare(run.logits, ref.logits),
                                          run.ms_per_image, run.rechecked, _needed(run, ref)))
    names = list(fp32)
    for name in names:  # the first against itself too: its row gives the fp32 speed
        run = fp32[name]
        results.append(Comparison(name, run.precision, f"{names[0]}/fp32",
                                  *compare(run.logits, fp32[names[0]].logits), run.ms_per_image))
    for row in results:
        logger.info("check %s: %s", spec.name, asdict(row))
    return results
