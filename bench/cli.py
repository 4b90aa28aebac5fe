"""``wanwu bench``: a subcommand the benchmarks add to the ``wanwu`` command line.

Registered as the ``bench`` entry point of the ``wanwu.commands`` group, so the
product's command line never imports the benchmarks.
"""

from __future__ import annotations

import argparse
import sys


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``bench`` to the ``wanwu`` subcommands."""
    from wanwu.pipeline.cli.options import positive_int

    p = sub.add_parser(
        "bench", help="benchmark wanwu against a for-loop and DataLoaders on the same photos",
        description="Builds a deterministic corpus of real-photo JPEGs and measures, in one run: a naive "
        "for-loop, a torch DataLoader, a DataLoader feeding OpenVINO (each configured for this CPU), decode "
        "and inference alone, wanwu end to end, and wanwu on a packed LMDB. Prints a table and writes "
        "bench.json, bench.md and bench.png.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--images", type=positive_int, default=300, help="corpus size")
    p.add_argument("--repeats", type=positive_int, default=3, help="timed runs per row, after a warm-up")
    p.add_argument("--quick", action="store_true", help="a small, fast run (for CI): 64 images, 1 repeat")
    p.add_argument("--precisions", nargs="*", default=None, metavar="P",
                   help="precisions to measure side by side (inference only and end to end, with top-1 agreement "
                        "with fp32); default: those this machine runs (fp32, bf16 if native, int8 and int8+fp32 "
                        "with NNCF), none for --quick; give none to skip them")
    p.add_argument("--memory", action="store_true", help="also compare peak memory of 500- and 5000-image jobs")
    p.add_argument("--video", action="store_true",
                   help="run the video part instead: a 1080p30 H.264 file at --fps 1, --fps 5, every frame and "
                        "--keyframes beside an OpenCV VideoCapture loop, and how many live 1080p30 streams keep up")
    p.add_argument("--ray", action="store_true",
                   help="run the cluster part instead: wanwu run, wanwu run --ray local and Ray Data's documented "
                        "read_images + map_batches pattern on --images JPEGs, and the driver's sink alone")
    p.add_argument("--workdir", default="", help="where the corpus and archives live (reused between runs)")
    p.add_argument("--out", default="bench-results", help="folder for bench.json, bench.md, bench.png")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    if args.video:
        return _video(args)
    if args.ray:
        return _cluster(args)

    from wanwu.bench.report import text_table, write_reports
    from wanwu.bench.suite import BenchConfig, run_suite

    from wanwu.errors import ConfigError
    from wanwu.stages.engines.hw import PRECISIONS

    precisions = None if args.precisions is None else tuple(args.precisions)
    unknown = [p for p in precisions or () if p not in PRECISIONS]
    if unknown:
        raise ConfigError(f"expected --precisions among {', '.join(PRECISIONS)}, got {', '.join(unknown)}")
    if args.quick:
        cfg = BenchConfig(images=64, repeats=1, naive_images=16, workdir=args.workdir,
                          precisions=precisions if precisions is not None else ())
    else:
        cfg = BenchConfig(images=args.images, repeats=args.repeats, workdir=args.workdir,
                          memory_images=(500, 5000) if args.memory else (), precisions=precisions)
    result = run_suite(cfg)
    print(text_table(result))
    for row in result["rows"]:
        if row.get("limit_images_per_s"):
            print(f"{row['name']}: limit {row['limit_images_per_s']:.1f} images/s, reached {row['of_limit']:.0%}")
    for path in write_reports(result, Path(args.out)):
        print(f"wrote {path}", file=sys.stderr)
    return 0


def _video(args: argparse.Namespace) -> int:
    from pathlib import Path

    from wanwu.bench.suite import machine_description
    from wanwu.bench.video import run_video, video_table

    result = {"machine": machine_description(), **run_video(Path(args.workdir or "bench-video"))}
    return _write_part(args.out, "video", result, video_table(result))


def _cluster(args: argparse.Namespace) -> int:
    from pathlib import Path

    from wanwu.bench.cluster import cluster_table, run_cluster_bench
    from wanwu.bench.suite import machine_description

    images, repeats = (32, 1) if args.quick else (args.images, args.repeats)
    result = {"machine": machine_description(),
              **run_cluster_bench(Path(args.workdir or "bench-cluster"), images, repeats)}
    return _write_part(args.out, "cluster", result, cluster_table(result))


def _write_part(out: str, name: str, result: dict, table: str) -> int:
    """``NAME.json`` and ``NAME.md`` (the machine line, then ``table``) into ``out``; the table on stdout."""
    import json
    import os
    from pathlib import Path

    from wanwu.bench.report import machine_line

    os.makedirs(out, exist_ok=True)
    (Path(out) / f"{name}.json").write_text(json.dumps(result, indent=2, ensure_ascii=False), encoding="utf-8")
    (Path(out) / f"{name}.md").write_text(f"{machine_line(result['machine'])}\n\n{table}\n", encoding="utf-8")
    print(table)
    return 0
