"""Compare NNCF quantization recipes by top-1 agreement with fp32: ``python -m wanwu.bench.int8_recipes``.

How the recipe of ``stages/engines/quantize.py`` was chosen (README, Precision, Int8). Each
recipe quantizes the float32 IR the OpenVINO engine converts, calibrated on the built-in
calibration photos, and is measured on the check corpus (other crops: held-out photos):
top-1 agreement with fp32, the recheck margin 99.5% and 100% agreement need (with the share
99.5% recomputes), ms/image and the time quantizing took. One JSON line per recipe.

``accuracy-control`` is ``nncf.quantize_with_accuracy_control`` with agreement with fp32 as
its metric, on a third set of crops (neither calibration nor check), at most 0.5% lost.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any, Callable

import numpy as np

RECIPES = ("default", "mixed", "float-ends", "mixed+float-ends", "full-bias", "float-ends+full-bias",
           "mixed+float-ends+full-bias", "accuracy-control")


def _kwargs(recipe: str, model: Any) -> dict:
    import nncf

    from wanwu.stages.engines.quantize import float_scope

    kw: dict = {}
    if "mixed" in recipe:
        kw["preset"] = nncf.QuantizationPreset.MIXED
    if "float-ends" in recipe:
        kw["ignored_scope"] = nncf.IgnoredScope(names=float_scope(model), validate=False)
    if "full-bias" in recipe:
        kw["fast_bias_correction"] = False
    return kw


def _runner(model: Any, threads: int) -> Callable[[np.ndarray], tuple[np.ndarray, float]]:
    import openvino as ov

    request = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32",
                                                     "INFERENCE_NUM_THREADS": threads}).create_infer_request()

    def run(pixels: np.ndarray) -> tuple[np.ndarray, float]:
        request.infer({0: pixels[:32]})  # warm-up
        out, start = [], time.perf_counter()
        for i in range(0, len(pixels), 32):
            request.infer({0: pixels[i:i + 32]})
            out.append(request.get_output_tensor(0).data.copy())
        return np.concatenate(out), (time.perf_counter() - start) * 1000 / len(pixels)

    return run


def _quantize(recipe: str, model: Any, calibration: np.ndarray, validation: np.ndarray) -> Any:
    import nncf
    import openvino as ov

    dataset = nncf.Dataset([calibration[i:i + 1] for i in range(len(calibration))])
    if recipe != "accuracy-control":
        return nncf.quantize(model, dataset, subset_size=len(calibration), **_kwargs(recipe, model))
    reference = _runner(model, 0)(validation)[0].argmax(1)
    items = [(validation[i:i + 1], int(reference[i])) for i in range(len(validation))]

    def agreement(compiled: ov.CompiledModel, data) -> float:
        output = compiled.outputs[0]
        return float(np.mean([compiled(pixels)[output].argmax() == label for pixels, label in data]))

    return nncf.quantize_with_accuracy_control(
        model, dataset, nncf.Dataset(items), validation_fn=agreement, max_drop=0.005,
        subset_size=len(calibration), fast_bias_correction=False)


def main(argv: list[str] | None = None) -> int:
    import openvino as ov

    from wanwu.stages.engines.base import EngineConfig
    from wanwu.stages.engines.openvino import OpenVINOEngine
    from wanwu.stages.engines.quantize import builtin_calibration_folder, load_calibration
    from wanwu.stages.models.check import decode_batch, margin_for_agreement
    from wanwu.stages.models.photos import CHECK_PHOTOS, build_corpus
    from wanwu.stages.models.resolve import resolve_model

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="efficientnet_lite0")
    p.add_argument("--images", type=int, default=600, help="held-out check photos")
    p.add_argument("--validation", type=int, default=200, help="accuracy-control's own photos")
    p.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=RECIPES)
    p.add_argument("--workdir", default="/tmp/wanwu-int8-recipes")
    args = p.parse_args(argv)
    spec = resolve_model(args.model)
    engine = OpenVINOEngine(spec, EngineConfig(precision="fp32"))
    engine.load()  # converts (or finds) the float32 IR
    model = ov.Core().read_model(str(engine.ir_path()))
    calibration = load_calibration(spec, builtin_calibration_folder(engine.cfg.cache_path)).pixels(spec)
    check = decode_batch(build_corpus(f"{args.workdir}/check-{args.images}", args.images), spec)
    validation = decode_batch(build_corpus(f"{args.workdir}/validation-{args.validation}", args.validation,
                                           seed=11, photos=CHECK_PHOTOS), spec)
    reference, fp32_ms = _runner(model, 0)(check)
    for recipe in args.recipes:
        start = time.perf_counter()
        quantized = _quantize(recipe, model, calibration, validation)
        seconds = time.perf_counter() - start
        logits, ms = _runner(quantized, 0)(check)
        needs_995, share = margin_for_agreement(logits, reference)
        print(json.dumps({
            "recipe": recipe, "top1_agreement": float((logits.argmax(1) == reference.argmax(1)).mean()),
            "margin_for_99.5%": round(needs_995, 3), "recomputed_at_that_margin": round(share, 3),
            "margin_for_100%": round(margin_for_agreement(logits, reference, 1.0)[0], 3),
            "ms_per_image": round(ms, 2), "fp32_ms_per_image": round(fp32_ms, 2), "quantize_s": round(seconds, 1),
            "calibration_photos": len(calibration), "check_photos": len(check)}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
