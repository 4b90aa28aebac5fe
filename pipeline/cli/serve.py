"""``wanwu serve``: flags over a TOML config over the defaults of ``ServeConfig``."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from wanwu.pipeline.cli.options import add_stage_options
from wanwu.pipeline.cli.video import add_video_options

# flag dest -> ServeConfig field, for flags whose names differ from the field's
_RENAMED = {"http_host": "host", "zmq": "zmq_request"}


def add_serve_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve", help="run the recognition daemon (KServe v2 / Triton HTTP and gRPC, ZeroMQ, hot folder, cameras)",
        description="Run the decoders and the model as a daemon behind up to three front doors: HTTP speaking "
        "KServe v2 as Triton does (tritonclient works), ZeroMQ request/reply and stream sockets, and a hot folder. "
        "Requests from every door are batched together. Settings come from --config (TOML, the field names of "
        "`wanwu serve --print-config`), then from flags. Binds 127.0.0.1 unless told otherwise. SIGTERM or Ctrl-C "
        "drains and exits 0.",
        argument_default=None,
    )
    p.add_argument("--config", help="TOML file of settings (flags override it)")
    p.add_argument("--print-config", action="store_true", help="print the effective settings as TOML and exit")
    add_stage_options(p, defaults=False)  # as for `wanwu run`; --batch-size is Triton's max_batch_size
    b = p.add_argument_group("dynamic batching")
    b.add_argument("--max-queue-delay-ms", type=float, help="longest wait of an image for company (default 5)")
    b.add_argument("--preferred-batch-sizes", type=int, nargs="+", metavar="N", help="sizes to run at once")
    b.add_argument("--max-queue-size", type=int, help="images waiting before requests get 'queue full' (1024)")
    b.add_argument("--timeout-s", type=float, help="per-request deadline (default 30)")
    b.add_argument("--max-images-per-request", type=int, help="default 64")
    b.add_argument("--max-request-bytes", type=int, help="one request's images, any door (default 64 MiB)")
    lim = p.add_argument_group("limits (see the README's 'Limits and security')")
    lim.add_argument("--max-json-bytes", type=int, help="an HTTP body that is JSON only (default 8 MiB)")
    lim.add_argument("--max-inflight-bytes", type=int,
                     help="HTTP bodies being received or worked on at once; past it, 503 (default 256 MiB)")
    lim.add_argument("--max-connections", type=int, help="open HTTP connections; more are refused (default 512)")
    lim.add_argument("--keepalive-timeout-s", type=float, help="an idle HTTP connection closes after this long (15)")
    lim.add_argument("--header-timeout-s", type=float,
                     help="a request's head must be complete this long after its first byte (10)")
    lim.add_argument("--min-body-rate", type=float, help="bytes/s an HTTP body must arrive at (default 65536)")
    lim.add_argument("--http-threads", type=int, help="HTTP requests inside the backend at once (default 64)")
    lim.add_argument("--stall-timeout-s", type=float,
                     help="a worker that shows no sign of life this long is replaced (default 30)")
    d = p.add_argument_group("front doors")
    d.add_argument("--host", dest="http_host", help="address to bind HTTP and /metrics (default 127.0.0.1)")
    d.add_argument("--http-port", type=int, help="KServe v2 HTTP port (default 8000)")
    d.add_argument("--no-http", dest="http", action="store_false", default=None, help="no HTTP front door")
    d.add_argument("--grpc-port", type=int, help="KServe v2 gRPC port (default -1: off; 0: any free port)")
    d.add_argument("--token", help="require `Authorization: Bearer TOKEN` on HTTP and gRPC (health stays open)")
    d.add_argument("--metrics-port", type=int, help="Prometheus /metrics port (default 8002, -1 = off)")
    d.add_argument("--zmq", help="ZeroMQ ROUTER address for request/reply, e.g. tcp://127.0.0.1:5555")
    d.add_argument("--zmq-stream", help="ZeroMQ PULL address for fire-and-forget images (records go to --out)")
    d.add_argument("--curve-secret-key", help="zmq.auth certificate with the server's CURVE secret key")
    d.add_argument("--curve-clients", help="folder of allowed client public certificates")
    d.add_argument("--watch", help="hot folder: recognise each new file once (records go to --out)")
    d.add_argument("--watch-done", help="move recognised files here")
    d.add_argument("--watch-failed", help="move files that got an error record here")
    d.add_argument("--watch-settle-s", type=float, help="a file is complete once unchanged this long (0.5)")
    d.add_argument("--out", help="records of the stream and hot-folder doors: .jsonl or .sqlite (also the ledger)")
    d.add_argument("--drain-timeout-s", type=float, help="on SIGTERM, finish in-flight work within this long (20)")
    c = p.add_argument_group("cameras", "live streams recognised all the time, batched with the doors' images")
    c.add_argument("--camera", dest="cameras", action="append", metavar="NAME=URL",
                   help="a camera or stream (rtsp://, http(s)://, tcp://, udp://); repeatable; reconnects forever")
    c.add_argument("--camera-out", help="the cameras' records: .jsonl or .sqlite")
    add_video_options(p, defaults=False)
    p.set_defaults(func=_cmd_serve)


def serve_config(args: argparse.Namespace):
    """The ``ServeConfig`` from ``--config`` and the flags given."""
    from wanwu.pipeline.serve.config import ServeConfig

    skip = {"config", "print_config", "func", "command", "verbose"}
    overrides: dict[str, Any] = {}
    for dest, value in vars(args).items():
        if dest in skip or value is None:
            continue
        overrides[_RENAMED.get(dest, dest)] = tuple(value) if isinstance(value, list) else value
    if args.config:
        return ServeConfig.from_toml(args.config, **overrides)
    return ServeConfig.build(overrides)


def _toml(cfg) -> str:
    import dataclasses

    lines = []
    for f in dataclasses.fields(cfg):
        if f.name == "python":  # the Python API's door, never a daemon setting
            continue
        value = getattr(cfg, f.name)
        text = json.dumps(list(value) if isinstance(value, tuple) else value, ensure_ascii=False)
        lines.append(f"{f.name} = {text}")
    return "\n".join(lines)


def _cmd_serve(args: argparse.Namespace) -> int:
    from wanwu.pipeline.serve.daemon import Daemon

    cfg = serve_config(args)
    if args.print_config:
        print(_toml(cfg))
        return 0
    daemon = Daemon(cfg)
    addresses = daemon.start()
    # One line on stdout for whoever started us (scripts, tests): where each door listens.
    print(json.dumps({"ready": True, **addresses}, ensure_ascii=False), flush=True)
    print("wanwu serve: " + ", ".join(f"{k} {v}" for k, v in addresses.items()) + " (SIGTERM or Ctrl-C to stop)",
          file=sys.stderr, flush=True)
    return daemon.serve_forever()
