"""Command-line options that ``wanwu run``, ``wanwu serve`` and ``wanwu models`` share.

They map one to one onto ``PipelineConfig``'s fields (``pipeline_fields``). Choices
come from the registries, so a registered decoder or engine is a valid choice
everywhere at once. ``defaults=False`` gives every option the default None, for
``wanwu serve``, whose flags override a TOML file only when given.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from wanwu.pipeline.config import PRECISIONS, PipelineConfig, cpu_count, default_decoders
from wanwu.stages.decoders.base import DECODERS, DEFAULT_MAX_PIXELS
from wanwu.stages.engines.base import ENGINES

MODEL_HELP = ("a registered name (see `wanwu models list`), modelscope:DIR (万物识别), timm:NAME, "
              "onnx:FILE, openvino:FILE.xml, or a ModelScope folder")


def positive_int(text: str) -> int:
    """An argparse type: an integer > 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def add_model_options(p: argparse.ArgumentParser, defaults: bool = True) -> None:
    """The options that adjust a model (``--model`` itself is the caller's: an option or a positional)."""
    d = (lambda value: value) if defaults else (lambda value: None)
    g = p.add_argument_group("model", "--weights/--labels/--mean/--std/--resize-shorter/--crop override the model's own")
    g.add_argument("--weights", default=d(""), help="checkpoint for timm:NAME (timm naming), or the ModelScope folder")
    g.add_argument("--labels", default=d(""), help="label file: .txt (one a line, optionally index<TAB>label) or .json")
    g.add_argument("--mean", type=float, nargs=3, default=None, metavar="M",
                   help="per-channel mean on [0, 1] values (ONNX/IR/timm models: ImageNet's by default)")
    g.add_argument("--std", type=float, nargs=3, default=None, metavar="S", help="per-channel std, likewise")
    g.add_argument("--resize-shorter", type=positive_int, default=None, metavar="PX",
                   help="shorter side before the crop")
    g.add_argument("--crop", type=positive_int, default=None, metavar="PX", help="side of the square center crop")


def model_options(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of ``resolve_model`` from parsed model options."""
    return {"weights": args.weights or "", "labels": args.labels or "", "mean": args.mean, "std": args.std,
            "resize_shorter": args.resize_shorter, "crop": args.crop}


def add_stage_options(p: argparse.ArgumentParser, defaults: bool = True) -> None:
    """``--model`` and the stages' options (decoder, engine, their processes and batches)."""
    d = (lambda value: value) if defaults else (lambda value: None)
    g = p.add_argument_group("stages")
    g.add_argument("--model", default=d("efficientnet_lite0"), help=MODEL_HELP)
    g.add_argument("--engine", default=d("auto"), choices=["auto", *ENGINES.names()],
                   help="inference engine; auto picks the fastest installed one for the device and model")
    g.add_argument("--decoder", default=d("auto"), choices=["auto", *DECODERS.names()],
                   help="turbo: libjpeg-turbo with DCT-domain downscaling (fastest on CPU); dali: NVIDIA DALI")
    g.add_argument("--decoders", type=positive_int, default=d(default_decoders()),
                   help=f"decoder processes (this machine has {cpu_count()} cores)")
    g.add_argument("--batch-size", type=positive_int, default=d(32), help="most images per inference call")
    g.add_argument("--top-k", type=positive_int, default=d(5), help="labels per record")
    g.add_argument("--max-pixels", type=positive_int, default=d(DEFAULT_MAX_PIXELS),
                   help="refuse images with more pixels than this before decoding them (decompression bombs)")
    g.add_argument("--device", default=d("cpu"), help="cpu or cuda:N")
    g.add_argument("--precision", default=d("auto"), choices=list(PRECISIONS),
                   help="auto: bf16 where the hardware has it, near ties recomputed in fp32; int8: quantized "
                        "with NNCF (openvino engine, wanwu[int8]); int8+fp32: int8, near ties recomputed in fp32")
    g.add_argument("--calibration", metavar="DIR", default=d(""),
                   help="int8: photos to calibrate the quantization on (default: built-in photos, for the embedded model)")
    g.add_argument("--threads", type=int, default=d(0), help="inference threads (0: all cores)")
    g.add_argument("--cache", metavar="DIR", default=d(""),
                   help="result cache (LMDB): an image seen before, by content, is not recognised again")
    g.add_argument("--cache-max-bytes", type=positive_int, default=d(1 << 30), help="the cache's bound")
    add_model_options(p, defaults)


def pipeline_fields(args: argparse.Namespace) -> dict[str, Any]:
    """``PipelineConfig`` fields from parsed stage and model options (those given, for ``defaults=False``)."""
    names = {f.name for f in dataclasses.fields(PipelineConfig)}
    out = {}
    for name in names & set(vars(args)):
        value = getattr(args, name)
        if value is not None:
            out[name] = tuple(value) if isinstance(value, list) else value
    return out
