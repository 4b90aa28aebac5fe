"""The daemon under load: throughput and latency percentiles at 1, 8 and 64 concurrent clients.

``python -m wanwu.bench.serve [--images 300] [--duration 20] [--clients 1 8 64]``

Starts ``wanwu serve`` (HTTP and gRPC) and drives each door with Triton's own
clients, ``tritonclient.http`` and ``tritonclient.grpc``: each client sends one image per request, waits for the
answer, and sends the next, for ``--duration`` seconds after a warm-up. Clients
are threads spread over a few processes (so the clients' own Python does not
serialise on one GIL). The offline figure is ``wanwu run`` on the same corpus in
the same session (median of ``--repeats`` runs, model load excluded).

The clients run on the same machine as the daemon and take CPU from it: on a
small machine the daemon's figures are a lower bound.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from wanwu.stages.models.photos import build_corpus

CLIENT_PROCESSES = 4
MODEL = "efficientnet_lite0"


def _client_process(door: str, url: str, images: list[bytes], threads: int, warm_from: float, count_from: float,
                    stop_at: float, first: int, out: mp.Queue) -> None:
    """``threads`` closed-loop clients of ``door`` ("http" or "grpc") from ``warm_from`` to ``stop_at``;
    puts ``(latencies of the requests started at or after ``count_from``, errors)``."""
    import importlib

    import numpy as np

    triton = importlib.import_module(f"tritonclient.{door}")
    options = {"network_timeout": 120} if door == "http" else {}

    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()

    def loop(index: int) -> None:
        mine: list[float] = []
        with triton.InferenceServerClient(url, **options) as client:
            i = first + index
            while time.time() < warm_from:
                time.sleep(0.001)
            while (started := time.time()) < stop_at:
                tensor = triton.InferInput("IMAGE", [1, 1], "BYTES")
                tensor.set_data_from_numpy(np.array([[images[i % len(images)]]], dtype=np.object_))
                t = time.perf_counter()
                try:
                    client.infer(MODEL, [tensor])
                    if started >= count_from:
                        mine.append(time.perf_counter() - t)
                except Exception as exc:  # counted and reported, never hidden
                    with lock:  # warm-up failures count too
                        errors.append(str(exc)[:200])
                i += 97  # walk the corpus in a different order per client
        with lock:
            latencies.extend(mine)

    workers = [threading.Thread(target=loop, args=(k,)) for k in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    out.put((latencies, errors))


def drive(door: str, url: str, images: list[bytes], clients: int, duration_s: float, warmup_s: float = 3.0) -> dict:
    """Run ``clients`` closed-loop clients of ``door`` for ``duration_s``; return rate and latency percentiles."""
    procs_n = min(clients, CLIENT_PROCESSES)
    per = [clients // procs_n + (1 if k < clients % procs_n else 0) for k in range(procs_n)]
    ctx = mp.get_context("spawn")
    queue: mp.Queue = ctx.Queue()
    warm_from = time.time() + 3.0  # the client processes start and import first
    count_from = warm_from + warmup_s
    procs = [ctx.Process(target=_client_process,
                         args=(door, url, images, n, warm_from, count_from, count_from + duration_s, 1000 * k,
                               queue))
             for k, n in enumerate(per)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=duration_s + warmup_s + 300) for _ in procs]
    for p in procs:
        p.join()
    latencies = sorted(l for lat, _ in results for l in lat)
    errors = [e for _, errs in results for e in errs]

    def pct(q: float) -> float:
        return latencies[min(len(latencies) - 1, math.ceil(q * len(latencies)) - 1)] * 1000 if latencies else 0.0

    return {"door": door, "clients": clients, "requests": len(latencies), "errors": len(errors), "error_samples": errors[:3],
            "images_per_s": len(latencies) / duration_s, "p50_ms": pct(0.50), "p90_ms": pct(0.90), "p99_ms": pct(0.99),
            "mean_ms": statistics.fmean(latencies) * 1000 if latencies else 0.0}


def start_daemon(extra: list[str]) -> tuple[subprocess.Popen, dict]:
    """``wanwu serve`` with HTTP and gRPC on free ports; returns the process and its addresses."""
    proc = subprocess.Popen([sys.executable, "-m", "wanwu", "serve", "--http-port", "0", "--grpc-port", "0",
                             "--metrics-port", "-1", *extra], stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError("wanwu serve did not start")
    return proc, json.loads(line)


def offline_rate(folder: Path, workdir: Path, repeats: int) -> float:
    from wanwu.bench.suite import Row, _interleaved, _wanwu

    row = Row("wanwu run")
    _interleaved([_wanwu(row, [str(folder)], workdir)], repeats)
    return row.rate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wanwu.bench.serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--duration", type=float, default=20.0, help="timed seconds per client count")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--doors", nargs="+", default=["http", "grpc"], choices=["http", "grpc"])
    parser.add_argument("--repeats", type=int, default=3, help="offline wanwu run repeats")
    parser.add_argument("--max-queue-delay-ms", default="5")
    parser.add_argument("--workdir", default="")
    parser.add_argument("--out", default="bench-results")
    args = parser.parse_args(argv)
    from wanwu.bench.suite import machine_description

    workdir = Path(args.workdir or Path(tempfile.gettempdir()) / "wanwu-bench")
    workdir.mkdir(parents=True, exist_ok=True)
    folder = workdir / f"corpus-{args.images}"
    paths = build_corpus(folder, args.images)
    images = [p.read_bytes() for p in paths]
    offline = offline_rate(folder, workdir, args.repeats)
    proc, addresses = start_daemon(["--max-queue-delay-ms", args.max_queue_delay_ms])
    try:
        rows = [drive(door, addresses[door], images, c, args.duration) for door in args.doors for c in args.clients]
    finally:
        proc.terminate()
        proc.wait(60)
    result = {"machine": machine_description(), "offline_images_per_s": offline, "rows": rows,
              "duration_s": args.duration, "max_queue_delay_ms": float(args.max_queue_delay_ms)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve.json").write_text(json.dumps(result, indent=2))
    table = markdown(result)
    (out / "serve.md").write_text(table + "\n")
    print(table)
    return 0


def markdown(result: dict) -> str:
    lines = ["| door | clients | images/s | vs offline | p50 ms | p90 ms | p99 ms | requests | errors |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    off = result["offline_images_per_s"]
    for r in result["rows"]:
        lines.append(f"| {r.get('door', 'http')} | {r['clients']} | {r['images_per_s']:.1f} | "
                     f"{r['images_per_s'] / off:.0%} | {r['p50_ms']:.1f} | {r['p90_ms']:.1f} | {r['p99_ms']:.1f} "
                     f"| {r['requests']} | {r['errors']} |")
    lines.append(f"| offline `wanwu run` | | {off:.1f} | 100% | | | | | |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
