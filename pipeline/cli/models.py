"""``wanwu models list|show|export|check``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

from wanwu.errors import ConfigError, ModelError
from wanwu.pipeline.cli.options import MODEL_HELP, add_model_options, model_options
from wanwu.stages.engines.base import ENGINES
from wanwu.stages.models.check import AGREEMENT_TARGET, ENGINE_ORDER

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}


def _resolve(args: argparse.Namespace) -> Any:
    from wanwu.stages.models.resolve import resolve_model

    return resolve_model(args.model, **model_options(args))


def add_models_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``models`` and its subcommands to the ``wanwu`` parser's subcommands."""
    p = sub.add_parser("models", help="list, show, export and check models",
                       description="Models wanwu can run, exports for other runtimes, and precision checks.")
    msub = p.add_subparsers(dest="models_command", required=True)
    msub.add_parser("list", help="registered models and the other ways to name one").set_defaults(func=_cmd_list)

    show = msub.add_parser("show", help="a model's architecture, weights, labels and preprocessing")
    show.add_argument("model", help=MODEL_HELP)
    show.add_argument("--json", action="store_true", help="print JSON")
    add_model_options(show)
    show.set_defaults(func=_cmd_show)

    exp = msub.add_parser("export", help="export to ONNX, OpenVINO IR or a Triton model repository (with a DALI "
                                         "ensemble that takes encoded images)",
                          formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    exp.add_argument("model", help=MODEL_HELP)
    exp.add_argument("--format", required=True, choices=["onnx", "openvino", "triton", "triton-ensemble"])
    exp.add_argument("--out", required=True, help="folder to write into (for triton: the model repository)")
    exp.add_argument("--input", choices=["float32", "uint8"], default=None,
                     help="ONNX input: float32 NCHW normalised (default for onnx) or uint8 NHWC pixels "
                          "(always for openvino and triton)")
    exp.add_argument("--name", default="", help="file or Triton model name (default: the model's)")
    exp.add_argument("--max-batch-size", type=int, default=32, help="triton: largest batch")
    exp.add_argument("--instances", type=int, default=1, help="triton: instances per device")
    exp.add_argument("--kind", choices=["auto", "cpu", "gpu"], default="auto", help="triton: instance kind")
    exp.add_argument("--queue-delay-us", type=int, default=1000, help="triton: dynamic batching delay")
    exp.add_argument("--dali-threads", type=int, default=4,
                     help="triton-ensemble: CPU threads per DALI instance (header reads, crop boxes)")
    exp.add_argument("--no-verify", action="store_true", help="onnx: skip comparing onnxruntime with torch")
    add_model_options(exp)
    exp.set_defaults(func=_cmd_export)

    chk = msub.add_parser("check", help="top-1 agreement of bf16 with float32, and between engines, on real photos",
                          formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    chk.add_argument("model", help=MODEL_HELP)
    chk.add_argument("--images", type=int, default=300, help="photos to compare on")
    chk.add_argument("--photos", default="", help="a folder of your photos (default: a corpus built from "
                                                  "scikit-image's real photos, as `wanwu bench` uses)")
    chk.add_argument("--engines", nargs="+", default=list(ENGINE_ORDER), choices=ENGINES.names())
    chk.add_argument("--batch-size", type=int, default=32)
    chk.add_argument("--json", default="", metavar="PATH", help="also write the figures as JSON")
    chk.add_argument("--no-int8", action="store_true",
                     help="leave out the int8 rows (they need NNCF, wanwu[int8], and quantize on a cold cache)")
    chk.add_argument("--calibration", default="", metavar="DIR",
                     help="int8 calibration photos (default: built-in photos, other crops than the check's)")
    chk.add_argument("--min-agreement", type=float, default=0.0,
                     help="exit 1 when any top-1 agreement is below this (0..1)")
    add_model_options(chk)
    chk.set_defaults(func=_cmd_check)


def _cmd_list(args: argparse.Namespace) -> int:
    from wanwu.stages.models.base import MODELS
    from wanwu.stages.models.resolve import ALIASES, OTHER_FORMS

    print(f"{'NAME':<22}{'CLASSES':>8}  {'ARCHITECTURE':<24}WEIGHTS")
    for name in MODELS.names():
        try:
            spec = MODELS.create(name)
        except (ModelError, ConfigError) as exc:
            print(f"{name:<22}{'-':>8}  {'-':<24}unavailable: {str(exc).split(';')[-1].strip()}")
            continue
        print(f"{name:<22}{spec.num_classes:>8}  {spec.extra.get('architecture', spec.format):<24}{spec.weights}")
    for alias, name in sorted(ALIASES.items()):
        print(f"alias: {alias} -> {name}")
    print(f"also: {OTHER_FORMS}")
    return 0


def describe(spec: Any) -> dict[str, Any]:
    """A JSON-ready description of ``spec`` (what ``models show`` prints)."""
    labels = spec.labels()
    return {
        "name": spec.name, "format": spec.format, "architecture": spec.extra.get("architecture", ""),
        "weights": spec.weights or spec.path, "labels": spec.labels_path, "classes": spec.num_classes,
        "preprocess": asdict(spec.preprocess), "license": spec.license,
        "first_labels": [f"{zh} ({en})" if en else zh for zh, en in zip(labels.zh[:5], labels.en[:5])],
    }


def _cmd_show(args: argparse.Namespace) -> int:
    info = describe(_resolve(args))
    if args.json:
        print(json.dumps(info, ensure_ascii=False, indent=2))
        return 0
    for key, value in info.items():
        print(f"{key}: {'；'.join(value) if isinstance(value, list) else value}")
    return 0


def _run_hint(spec: Any, model: str, labels: Path, uint8: bool) -> str:
    from wanwu.stages.models.custom import DEFAULT_PREPROCESS

    pre, hint = spec.preprocess, f"wanwu run PHOTOS --out results.jsonl --model {model} --labels {labels}"
    if not uint8 and (pre.mean, pre.std) != (DEFAULT_PREPROCESS.mean, DEFAULT_PREPROCESS.std):
        hint += f" --mean {' '.join(map(str, pre.mean))} --std {' '.join(map(str, pre.std))}"
    if (pre.resize_shorter, pre.crop) != (DEFAULT_PREPROCESS.resize_shorter, DEFAULT_PREPROCESS.crop):
        hint += f" --resize-shorter {pre.resize_shorter} --crop {pre.crop}"
    return hint


def _cmd_export(args: argparse.Namespace) -> int:
    from wanwu.stages.models import export

    if args.format != "onnx" and args.input not in (None, "uint8"):
        raise ConfigError(f"expected --input uint8 (or none) for --format {args.format}, got --input {args.input}")
    spec = _resolve(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = args.name or spec.name
    triton = {"max_batch_size": args.max_batch_size, "instances": args.instances, "kind": args.kind,
              "queue_delay_us": args.queue_delay_us}
    if args.format == "triton":
        from wanwu.stages.models.triton import write_triton_repository

        folder = write_triton_repository(spec, out, name, **triton)
        print(f"wrote Triton model {folder.name} to {folder} (config.pbtxt, labels.txt, 1/model.onnx)")
        return 0
    if args.format == "triton-ensemble":
        from wanwu.stages.models.triton_ensemble import write_triton_ensemble

        folders = write_triton_ensemble(spec, out, name, num_threads=args.dali_threads, **triton)
        print(f"wrote Triton ensemble {folders['ensemble'].name} (encoded images in, logits out) to {out}: "
              f"{folders['dali'].name} (1/model.dali, DALI GPU decode, resize and crop) -> "
              f"{folders['onnx'].name} (1/model.onnx)\nserve it: tritonserver --model-repository={out}")
        return 0
    labels = export.copy_labels(spec, out)
    if args.format == "openvino":
        xml = export.export_openvino(spec, out / f"{name}.xml")
        print(f"wrote {xml} (uint8 NHWC input) and {labels}\nrun it: {_run_hint(spec, f'openvino:{xml}', labels, True)}")
        return 0
    kind = args.input or "float32"
    path = export.export_onnx(spec, out / f"{name}.onnx", input_kind=kind)
    print(f"wrote {path} ({kind} input) and {labels}")
    if not args.no_verify:
        report = export.verify_onnx(spec, path, _probe_pixels(spec), kind)
        print(f"onnxruntime vs torch on {report['images']} probe images: top-1 agreement "
              f"{report['top1_agreement']:.0%}, max |logit diff| {report['max_abs_diff']:.2e} "
              f"(logits up to {report['max_logit']:.1f})")
    print(f"run it: {_run_hint(spec, f'onnx:{path}', labels, kind == 'uint8')}")
    return 0


def _probe_pixels(spec: Any) -> Any:
    """Four deterministic crops with structure (gradients, stripes) and noise, for a quick export check."""
    import numpy as np

    crop = spec.preprocess.crop
    y, x = np.mgrid[0:crop, 0:crop] / crop
    noise = np.random.default_rng(0).integers(0, 64, (4, crop, crop, 3))
    base = np.stack([np.stack([x, y, 1 - x], -1), np.stack([np.sin(20 * x), y * x, np.cos(9 * y)], -1) * 0.5 + 0.5,
                     np.stack([y, y, x], -1), np.stack([(x * 8 % 1), 1 - y, x * y], -1)])
    return np.clip(base * 191 + noise, 0, 255).astype(np.uint8)


def _photo_paths(args: argparse.Namespace, workdir: str) -> list[Path]:
    if args.photos:
        paths = sorted(p for p in Path(args.photos).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not paths:
            raise ConfigError(f"expected photos in {args.photos}, found no image files")
        return paths[: args.images]
    try:
        from wanwu.stages.models.photos import build_corpus

        return build_corpus(workdir, args.images)
    except ImportError as exc:
        raise ConfigError(f"expected scikit-image for the built-in photos (pip install 'wanwu[bench]'), "
                          f"or --photos DIR: {exc}") from exc


def _int8_rows(args: argparse.Namespace) -> bool:
    """Whether ``models check`` adds int8 rows: unless --no-int8, where NNCF is installed."""
    from wanwu.stages.engines.quantize import nncf_version

    if args.no_int8:
        if args.calibration:
            raise ConfigError("expected --calibration for the int8 rows, got --no-int8 too")
        return False
    try:
        nncf_version()
    except ConfigError as exc:
        if args.calibration:
            raise
        print(f"wanwu: no int8 rows: {exc}", file=sys.stderr)
        return False
    return True


def _cmd_check(args: argparse.Namespace) -> int:
    from wanwu.stages.models.check import check_model, decode_batch

    if args.images < 1 or args.batch_size < 1:
        raise ConfigError(f"expected --images and --batch-size >= 1, got {args.images}, {args.batch_size}")
    spec = _resolve(args)
    with tempfile.TemporaryDirectory(prefix="wanwu-check-") as workdir:
        paths = _photo_paths(args, workdir)
        pixels = decode_batch(paths, spec)
    rows = check_model(spec, pixels, args.engines, args.batch_size, int8=_int8_rows(args),
                       calibration=args.calibration)
    print(f"{spec.name}: top-1 agreement on {len(pixels)} photos; bf16+fp32 is --precision auto "
          f"(bf16, near ties recomputed in fp32: the RECHECKED share), int8+fp32 likewise")
    print(f"{'ENGINE':<12}{'PRECISION':<11}{'VS':<16}{'TOP-1':>7}{'TOP-5':>7}{'MAX|DIFF|':>11}{'MS/IMG':>8}"
          f"{'RECHECKED':>11}")
    for r in rows:
        print(f"{r.engine:<12}{r.precision:<11}{r.reference:<16}{r.top1_agreement:>7.1%}{r.top5_overlap:>7.1%}"
              f"{r.max_abs_diff:>11.3g}{r.ms_per_image:>8.1f}{r.rechecked:>11.1%}")
    for r in rows:
        if r.needed_margin is not None:
            print(f"{r.engine} {r.precision}: {AGREEMENT_TARGET:.1%} top-1 agreement needs a recheck margin of "
                  f"{r.needed_margin[0]:.3f} here, which recomputes {r.needed_margin[1]:.1%} of the photos")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": spec.name, "images": len(pixels),
                                               "rows": [asdict(r) for r in rows]}, indent=2), encoding="utf-8")
    worst = min((r.top1_agreement for r in rows), default=1.0)
    if worst < args.min_agreement:
        print(f"wanwu: top-1 agreement {worst:.1%} is below --min-agreement {args.min_agreement:.1%}", file=sys.stderr)
        return 1
    return 0
