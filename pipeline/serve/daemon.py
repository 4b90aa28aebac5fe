"""``wanwu serve``: the backend, its front doors, the sink, and the signals that stop them.

Start order: metrics, backend (workers up, model loaded and warmed), sink, then the
front doors, so a door never takes a request the daemon cannot serve. Stop order
(SIGTERM or SIGINT): doors stop accepting, requests in flight are answered
(``drain_timeout_s``), the sink is flushed and closed, the workers stop, and the
process exits 0.

The sink lives in the daemon's process rather than in a worker: the hot folder
moves a file away only once its record is durable, which needs the write to have
returned, and answered HTTP/ZeroMQ requests need no sink at all.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Iterable

from wanwu.errors import ConfigError
from wanwu.pipeline.serve.config import ServeConfig
from wanwu.records import Record
from wanwu.pipeline.serve.dispatch import PipelineBackend
from wanwu.pipeline.serve.metrics import ServeMetrics
from wanwu.stages.decoders.base import max_encoded_bytes
from wanwu.stages.sinks.base import Sink, create_sink
from wanwu.stages.sinks.records import free_key

logger = logging.getLogger(__name__)


class SinkWriter:
    """A sink shared by the front doors that write records. Thread-safe; ``write`` is durable.

    The output keeps one record per key (a later one with the same key is dropped), so a door
    whose images have no key of their own takes one from ``claim_key``: never one the output
    holds (from any earlier run) or that was handed out before.
    """

    def __init__(self, path: str) -> None:
        self.sink: Sink = create_sink(path)
        self.done_keys = self.sink.open()  # the ledger: keys a previous run already wrote
        self._lock = threading.Lock()
        self._claimed = set(self.done_keys)
        self._numbers: dict[str, int] = {}  # prefix -> the last number handed out
        self._claim_lock = threading.Lock()

    def claim_key(self, wanted: str | None, prefix: str) -> str:
        """A key for a record no one else has: ``wanted``, else ``wanted#2``, ``#3``...; with no
        ``wanted``, ``prefix`` and the number after the highest any key with that prefix has."""
        with self._claim_lock:
            if wanted is None:
                if prefix not in self._numbers:
                    self._numbers[prefix] = max((int(k[len(prefix):]) for k in self._claimed
                                                 if k.startswith(prefix) and k[len(prefix):].isdigit()), default=0)
                self._numbers[prefix] += 1
                key = f"{prefix}{self._numbers[prefix]}"
            else:
                key = free_key(wanted, self._claimed)
            self._claimed.add(key)
            return key

    def write(self, records: Iterable[Record]) -> None:
        records = list(records)
        if records:
            with self._lock:
                self.sink.write(records)

    def shutdown(self) -> None:
        """Flush and close the sink. Safe to call twice."""
        with self._lock:
            self.sink.shutdown()


class Daemon:
    """One ``wanwu serve``. ``start()`` returns the bound addresses; ``shutdown()`` is safe twice."""

    def __init__(self, cfg: ServeConfig) -> None:
        self.cfg = cfg
        self.metrics = ServeMetrics()
        self.backend = PipelineBackend(cfg, self.metrics)
        self.sink: SinkWriter | None = None
        self.doors: list = []  # started front doors, each with alive() and shutdown()
        self.http = None  # the HTTP door, when on (KServeHTTPServer)
        self.addresses: dict[str, str] = {}
        self._stopped = threading.Event()
        self._shutdown_lock = threading.Lock()
        self._shut = False

    def start(self) -> dict[str, str]:
        """Start everything; return ``{"http": "127.0.0.1:8000", "metrics": ..., "zmq_request": ...}``.

        Raises:
            StageError: the workers could not start; ConfigError: a bad setting.
        """
        cfg = self.cfg
        try:
            if cfg.metrics_port >= 0:
                self.addresses["metrics"] = f"{cfg.host}:{self.metrics.serve(cfg.host, cfg.metrics_port)}"
            self.backend.start()
            if cfg.out:
                self.sink = SinkWriter(cfg.out)
            self._start_doors()
        except BaseException:
            self.shutdown()
            raise
        logger.info("wanwu serve ready: %s", ", ".join(f"{k} {v}" for k, v in self.addresses.items()))
        return dict(self.addresses)

    def _start_doors(self) -> None:
        cfg = self.cfg
        if cfg.http:
            from wanwu.pipeline.serve.kserve import KServeHTTPServer

            http = KServeHTTPServer(self.backend, cfg.host, cfg.http_port, cfg.token or None, cfg.http_limits(),
                                    drain_s=cfg.drain_timeout_s)
            self.addresses["http"] = f"{cfg.host}:{http.start()}"
            self.doors.append(http)
            self.http = http
        if cfg.grpc_port >= 0:
            try:
                from wanwu.pipeline.serve.grpc_door import GrpcDoor
            except ImportError as exc:
                raise ConfigError(f"the gRPC door needs grpcio and tritonclient[grpc] (pip install 'wanwu[grpc]'): "
                                  f"{exc}") from exc
            grpc = GrpcDoor(self.backend, cfg.host, cfg.grpc_port, cfg.token or None, cfg.max_request_bytes,
                            cfg.max_images_per_request, threads=cfg.http_threads, drain_s=cfg.drain_timeout_s)
            self.addresses["grpc"] = grpc.start()
            self.doors.append(grpc)
        if cfg.zmq_request or cfg.zmq_stream:
            from wanwu.pipeline.serve.zmq_door import ZmqDoor

            door = ZmqDoor(self.backend, request_addr=cfg.zmq_request or None, stream_addr=cfg.zmq_stream or None,
                           on_records=self.sink.write if self.sink else None,
                           claim_key=self.sink.claim_key if self.sink else None,
                           curve_secret_key_file=cfg.curve_secret_key or None,
                           curve_clients_dir=cfg.curve_clients or None, max_request_bytes=cfg.max_request_bytes,
                           max_images_per_request=cfg.max_images_per_request, timeout_s=cfg.timeout_s)
            for name, addr in door.start().items():
                self.addresses[f"zmq_{name}"] = addr
            self.doors.append(door)
        if cfg.watch:
            from wanwu.pipeline.serve.watch import HotFolder

            assert self.sink is not None  # ServeConfig requires `out` with `watch`
            hot = HotFolder(self.backend, cfg.watch, on_records=self.sink.write, done_keys=self.sink.done_keys,
                            claim_key=self.sink.claim_key,
                            done_dir=cfg.watch_done or None, failed_dir=cfg.watch_failed or None,
                            settle_s=cfg.watch_settle_s, batch=cfg.batch_size, timeout_s=cfg.timeout_s,
                            max_bytes=max_encoded_bytes(cfg.max_pixels))
            hot.start()
            self.addresses["watch"] = cfg.watch
            self.doors.append(hot)

    def serve_forever(self) -> int:
        """Block until SIGTERM/SIGINT (or ``stop()``), then shut down; return the exit status.

        0 after a signal or ``stop()``; 1 when the workers could not be kept running (so a
        service manager restarts the daemon rather than leave it up but dead).
        """
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        status = 0
        try:
            while not self._stopped.wait(0.5):
                if self.http is not None:  # the HTTP door's connection figures, as metrics
                    for what, value in self.http.stats().items():
                        self.metrics.http.labels(what).set(value)
                if self.backend.cache is not None:
                    for what, value in self.backend.cache.stats().items():
                        if what not in ("path", "max_bytes"):
                            self.metrics.cache.labels(what).set(value)
                problem = self.broken()
                if problem:
                    logger.error("%s; exiting with status 1 so that a service manager restarts the daemon", problem)
                    status = 1
                    break
        finally:
            # The handlers stay until the drain is over: a second SIGTERM (a supervisor's retry,
            # a double Ctrl-C) must not kill the daemon half-way through answering what it holds.
            try:
                self.shutdown()
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)
        return status

    def broken(self) -> str:
        """Why the daemon cannot serve any more ("" when it can): its workers cannot be kept
        running, or a thread it needs (the dispatcher, a front door's) has died."""
        if self.backend.failure:
            return f"the workers cannot be kept running: {self.backend.failure}"
        if not self.backend.alive():
            return "the dispatcher thread has stopped"
        for door in self.doors:
            if not door.alive():
                return f"the {type(door).__name__} front door's thread has stopped"
        return ""

    def stop(self) -> None:
        """Ask ``serve_forever`` to return (thread-safe)."""
        self._stopped.set()

    def _on_signal(self, signum: int, frame: object) -> None:
        name = signal.Signals(signum).name
        if self._stopped.is_set():
            logger.warning("received %s again: already draining (SIGKILL ends it at once)", name)
        else:
            logger.warning("received %s: draining", name)
        self._stopped.set()

    def shutdown(self) -> None:
        """Stop the doors, drain the backend, close the sink and the metrics server. Safe twice."""
        with self._shutdown_lock:
            if self._shut:
                return
            self._shut = True
        self.metrics.ready.set(0)  # draining starts now, before the backend hears of it
        # Doors first: the HTTP door's shutdown lets requests in flight finish, the hot folder
        # finishes its batch; the backend then answers anything still queued.
        for door in reversed(self.doors):
            try:
                door.shutdown()
            except Exception:  # one door failing to stop must not keep the others running
                logger.exception("stopping %s failed", type(door).__name__)
        self.backend.shutdown()
        if self.sink is not None:
            self.sink.shutdown()
        self.metrics.shutdown()
