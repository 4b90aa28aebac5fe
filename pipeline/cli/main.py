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

from importlib.metadata import entry_points

from wanwu import __version__
from wanwu.errors import ConfigError, WanwuError
from wanwu.pipeline.cli.cache import add_cache_parser
from wanwu.pipeline.cli.cluster import add_ray_options, ray_config
from wanwu.pipeline.cli.models import add_models_parser
from wanwu.pipeline.cli.options import add_stage_options, model_options, pipeline_fields, positive_int
from wanwu.pipeline.cli.serve import add_serve_parser
from wanwu.pipeline.cli.video import add_video_options, expand_inputs, non_negative
from wanwu.pipeline.config import JobConfig
from wanwu.pipeline.run.progress import MODES as PROGRESS_MODES

logger = logging.getLogger("wanwu")

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_SOME_ERRORS = 0, 1, 2, 3
COMMANDS_GROUP = "wanwu.commands"  # entry points adding subcommands (wanwu bench): add_parser(subparsers)


def _add_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run", help="recognise every image in folders, LMDB archives or path lists, or frames of videos and streams",
        description="Stream images through loader, decoder and inference processes and write one "
        "record per input (per sampled frame of a video). Running the same command again resumes where a "
        "previous run stopped; a live stream runs until Ctrl-C, SIGTERM or --duration.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="a folder (searched recursively), an LMDB archive made by `wanwu pack`, @list.txt "
                        "(of images, or of videos and stream URLs), a video file, a stream URL (rtsp://, "
                        "http(s)://, tcp://, udp://), or testsrc: (generated frames; see the README)")
    p.add_argument("--out", "-o", required=True,
                   help="results.jsonl or results.sqlite, also the resume ledger; "
                        "- writes JSON Lines to stdout (no resume)")
    p.add_argument("--progress", default="auto", choices=PROGRESS_MODES,
                   help="bar on a terminal, log lines otherwise")
    p.add_argument("--stats-json", metavar="PATH", default=None,
                   help="also write the job's counts and timings as JSON")
    p.add_argument("--duration", dest="duration_s", type=non_negative, default=0.0, metavar="S",
                   help="stop taking input after S seconds, then finish what is in flight (0: no limit)")
    p.add_argument("--stall-timeout-s", type=float, default=60.0, metavar="S",
                   help="a decoder or inference process stuck this long is replaced; a stuck loader or sink "
                        "(they hold the ledger) ends the job with exit 1 instead of leaving it hanging; "
                        "a rerun resumes")
    p.add_argument("--retry-errors", action="store_true",
                   help="drop the error records the output holds, so that their inputs are tried again")
    add_stage_options(p)
    add_video_options(p)
    add_ray_options(p)
    p.set_defaults(func=_cmd_run)


def _add_pack(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pack", help="pack a folder of images into an LMDB archive",
        description="Store every image under its relative name (UTF-8 key, encoded bytes value).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="folders or @list.txt")
    p.add_argument("out", metavar="OUT.lmdb", help="archive to create")
    p.add_argument("--resize-shorter", type=positive_int, default=None,
                   help="store JPEGs resized so the shorter side is N (only images larger than that)")
    p.add_argument("--quality", type=positive_int, default=90, help="JPEG quality when resizing")
    p.add_argument("--workers", type=int, default=0, help="resizing processes (0: all cores)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing archive")
    p.set_defaults(func=_cmd_pack)


def _add_show(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("show", help="print the records of a results file as a table")
    p.add_argument("results", help="results.jsonl or results.sqlite; - reads JSON Lines from stdin")
    p.add_argument("--top", type=positive_int, default=3, help="labels per image to show")
    p.set_defaults(func=_cmd_show)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wanwu", description="万物识别: streaming image recognition with Chinese labels.")
    parser.add_argument("--version", action="version", version=f"wanwu {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_run(sub)
    _add_pack(sub)
    _add_show(sub)
    add_models_parser(sub)
    add_serve_parser(sub)
    add_cache_parser(sub)
    for entry in entry_points(group=COMMANDS_GROUP):  # commands shipped apart from the product (wanwu bench)
        try:
            entry.load()(sub)
        except ImportError as exc:  # an optional part that is not installed: its command is just absent
            logger.debug("command %s unavailable: %s", entry.name, exc)
    return parser


def _cmd_run(args: argparse.Namespace) -> int:
    from wanwu.pipeline.run.job import run_job
    from wanwu.stages.sources.base import source_kind

    inputs = expand_inputs(args.inputs)
    for location in inputs:
        source_kind(location)  # fail fast on a bad input, before anything else
    cfg = JobConfig(inputs=tuple(inputs), out=args.out, progress=args.progress, duration_s=args.duration_s,
                    retry_errors=args.retry_errors, stall_timeout_s=args.stall_timeout_s,
                    **pipeline_fields(args))
    _check_model(args)
    cluster = ray_config(args)
    if cluster is not None:
        from wanwu.pipeline.cluster.runner import run_cluster_job

        result = run_cluster_job(cfg, cluster)
    else:
        result = run_job(cfg)
    say(result.summary(args.out))
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
    from wanwu.pipeline.pack.pack import pack

    stats = pack(list(args.inputs), args.out, resize_shorter=args.resize_shorter, quality=args.quality,
                 workers=args.workers, overwrite=args.overwrite)
    print(f"wanwu: packed {stats.images} images ({stats.bytes_in / 1e6:.1f} MB -> {stats.bytes_out / 1e6:.1f} MB) "
          f"into {args.out} in {stats.seconds:.1f} s", file=sys.stderr)
    return EXIT_OK


def _cmd_show(args: argparse.Namespace) -> int:
    from wanwu.stages.sinks.base import read_records

    if args.results != "-" and not os.path.exists(args.results):
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


def say(text: str) -> None:
    """A line on stderr. When nobody reads it any more (its reader exited: EPIPE; the terminal
    hung up: EIO), stderr goes to /dev/null: the exit status is the job's, not the log's."""
    try:
        print(text, file=sys.stderr, flush=True)
    except OSError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stderr.fileno())  # the text still buffered is flushed there at exit
        os.close(devnull)


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
        say(f"wanwu: error: {exc}")
        return EXIT_USAGE
    except WanwuError as exc:
        say(f"wanwu: failed: {exc}")
        return EXIT_FAILED
    except KeyboardInterrupt:
        say("wanwu: interrupted")
        return 130
