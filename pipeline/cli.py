"""The ``wanwu`` command line.

Exit status: 0 every input recognised, 3 finished with some error records,
2 bad usage, 1 the job could not run, 130 interrupted (Ctrl-C / SIGTERM; run
the same command again to resume).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from wanwu import __version__
from wanwu.errors import ConfigError, WanwuError
from wanwu.pipeline.cli_models import MODEL_HELP, add_model_options, add_models_parser, model_options
from wanwu.pipeline.cli_serve import add_serve_parser
from wanwu.pipeline.config import JobConfig, cpu_count, default_decoders
from wanwu.stages.decoders.base import DEFAULT_MAX_PIXELS

logger = logging.getLogger("wanwu")

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_SOME_ERRORS = 0, 1, 2, 3


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _add_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run", help="recognise every image in folders, LMDB archives or path lists",
        description="Stream images through loader, decoder and inference processes and write one "
        "record per input. Running the same command again resumes where a previous run stopped.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="a folder (searched recursively), an LMDB archive made by `wanwu pack`, or @list.txt")
    p.add_argument("--out", "-o", required=True,
                   help="results.jsonl or results.sqlite; also the resume ledger")
    p.add_argument("--model", default="efficientnet_lite0", help=MODEL_HELP)
    p.add_argument("--engine", default="auto", choices=["auto", "openvino", "torch", "onnxruntime"],
                   help="inference engine; auto picks the fastest installed for the device")
    p.add_argument("--decoder", default="auto", choices=["auto", "turbo", "dali"],
                   help="turbo: libjpeg-turbo with DCT-domain downscaling (fastest on CPU); dali: NVIDIA DALI")
    p.add_argument("--decoders", type=_positive_int, default=default_decoders(),
                   help=f"decoder processes (this machine has {cpu_count()} cores)")
    p.add_argument("--batch-size", type=_positive_int, default=32, help="images per inference call")
    p.add_argument("--top-k", type=_positive_int, default=5, help="labels per record")
    p.add_argument("--max-pixels", type=_positive_int, default=DEFAULT_MAX_PIXELS,
                   help="refuse images with more pixels than this before decoding them (decompression bombs)")
    p.add_argument("--device", default="cpu", help="cpu or cuda:N")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                   help="auto uses bf16 where the hardware supports it")
    p.add_argument("--threads", type=int, default=0, help="inference threads (0: all cores)")
    p.add_argument("--progress", default="auto", choices=["auto", "bar", "log", "none"],
                   help="bar on a terminal, log lines otherwise")
    p.add_argument("--stats-json", metavar="PATH", default=None,
                   help="also write the job's counts and timings as JSON (for benchmarks)")
    p.add_argument("--hold-until-ready", action="store_true",
                   help="read no input until the model is loaded, so timings exclude start-up (for benchmarks)")
    add_model_options(p)
    p.set_defaults(func=_cmd_run)


def _add_pack(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pack", help="pack a folder of images into an LMDB archive",
        description="Store every image under its relative name (UTF-8 key, encoded bytes value).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="folders or @list.txt")
    p.add_argument("out", metavar="OUT.lmdb", help="archive to create")
    p.add_argument("--resize-shorter", type=_positive_int, default=None,
                   help="store JPEGs resized so the shorter side is N (only images larger than that)")
    p.add_argument("--quality", type=_positive_int, default=90, help="JPEG quality when resizing")
    p.add_argument("--workers", type=int, default=0, help="resizing processes (0: all cores)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing archive")
    p.set_defaults(func=_cmd_pack)


def _add_show(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("show", help="print the records of a results file as a table")
    p.add_argument("results", help="results.jsonl or results.sqlite")
    p.add_argument("--top", type=_positive_int, default=3, help="labels per image to show")
    p.set_defaults(func=_cmd_show)


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench", help="benchmark wanwu against a for-loop and a DataLoader on the same photos",
        description="Builds a deterministic corpus of real-photo JPEGs and measures, in one run: a naive "
        "for-loop, a torch DataLoader, decode and inference alone, wanwu end to end, and wanwu on a "
        "packed LMDB. Prints a table and writes bench.json, bench.md and bench.png.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--images", type=_positive_int, default=300, help="corpus size")
    p.add_argument("--repeats", type=_positive_int, default=3, help="timed runs per row, after a warm-up")
    p.add_argument("--quick", action="store_true", help="a small, fast run (for CI): 64 images, 1 repeat")
    p.add_argument("--memory", action="store_true", help="also compare peak memory of 500- and 5000-image jobs")
    p.add_argument("--workdir", default="", help="where the corpus and archives live (reused between runs)")
    p.add_argument("--out", default="bench-results", help="folder for bench.json, bench.md, bench.png")
    p.set_defaults(func=_cmd_bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wanwu", description="万物识别: streaming image recognition with Chinese labels.")
    parser.add_argument("--version", action="version", version=f"wanwu {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_run(sub)
    _add_pack(sub)
    _add_show(sub)
    _add_bench(sub)
    add_models_parser(sub)
    add_serve_parser(sub)
    return parser


def _cmd_run(args: argparse.Namespace) -> int:
    from wanwu.pipeline.job import run_job

    cfg = JobConfig(
        inputs=tuple(args.inputs), out=args.out, model=args.model, engine=args.engine, decoder=args.decoder,
        decoders=args.decoders, batch_size=args.batch_size, top_k=args.top_k, max_pixels=args.max_pixels,
        device=args.device, precision=args.precision, threads=args.threads, progress=args.progress,
        hold_until_ready=args.hold_until_ready, weights=args.weights, labels=args.labels,
        mean=tuple(args.mean or ()), std=tuple(args.std or ()), resize_shorter=args.resize_shorter or 0,
        crop=args.crop or 0,
    )
    _check_model(args)
    for location in cfg.inputs:
        from wanwu.stages.sources.base import source_kind

        source_kind(location)  # fail fast on a bad input, before starting processes
    result = run_job(cfg)
    print(result.summary(args.out), file=sys.stderr)
    if args.stats_json:
        import json

        with open(args.stats_json, "w", encoding="utf-8") as f:
            json.dump(result.to_dict(), f, indent=2)
    return result.exit_code


def _check_model(args: argparse.Namespace) -> None:
    """Fail fast, before starting processes, on a model that cannot be found or run by the engine."""
    from wanwu.stages.engines.base import check_engine_runs, resolve_engine_name
    from wanwu.stages.models.resolve import resolve_model

    spec = resolve_model(args.model, **model_options(args))
    check_engine_runs(resolve_engine_name(args.engine, args.device, spec.format), spec)


def _cmd_pack(args: argparse.Namespace) -> int:
    from wanwu.pipeline.pack import pack

    stats = pack(list(args.inputs), args.out, resize_shorter=args.resize_shorter, quality=args.quality,
                 workers=args.workers, overwrite=args.overwrite)
    print(f"wanwu: packed {stats.images} images ({stats.bytes_in / 1e6:.1f} MB -> {stats.bytes_out / 1e6:.1f} MB) "
          f"into {args.out} in {stats.seconds:.1f} s", file=sys.stderr)
    return EXIT_OK


def _cmd_show(args: argparse.Namespace) -> int:
    from wanwu.stages.sinks.base import read_records

    if not os.path.exists(args.results):
        raise ConfigError(f"expected a results file, got {args.results!r} which does not exist")
    for rec in read_records(args.results):
        if rec["error"]:
            print(f"{rec['key']}\t错误 error: {rec['error']['type']}: {rec['error']['message']}")
        else:
            labels = "；".join(
                f"{l['label']} ({l['label_en'].split(',')[0]}) {l['score']:.1%}" if l["label_en"]
                else f"{l['label']} {l['score']:.1%}"  # 万物识别 labels are Chinese only
                for l in rec["labels"][: args.top])
            print(f"{rec['key']}\t{rec['width']}x{rec['height']}\t{labels}")
    return EXIT_OK


def _cmd_bench(args: argparse.Namespace) -> int:
    from pathlib import Path

    from wanwu.bench.report import text_table, write_reports
    from wanwu.bench.suite import BenchConfig, run_suite

    if args.quick:
        cfg = BenchConfig(images=64, repeats=1, naive_images=16, workdir=args.workdir)
    else:
        cfg = BenchConfig(images=args.images, repeats=args.repeats, workdir=args.workdir,
                          memory_images=(500, 5000) if args.memory else ())
    result = run_suite(cfg)
    print(text_table(result))
    print(f"limit {result['limit_images_per_s']:.1f} images/s, wanwu at {result['efficiency']:.0%} of it")
    for path in write_reports(result, Path(args.out)):
        print(f"wrote {path}", file=sys.stderr)
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.verbose:
        os.environ["WANWU_LOG_LEVEL"] = logging.getLevelName(level)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"wanwu: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except WanwuError as exc:
        print(f"wanwu: failed: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("wanwu: interrupted", file=sys.stderr)
        return 130
