"""Prometheus metrics of the daemon, served on their own port (``/metrics``).

One ``ServeMetrics`` per daemon, on its own registry (so tests and embedders can
run several). The backend feeds it; nothing here knows about processes.

Metric names (all prefixed ``wanwu_``):

* ``requests_total{door, outcome}``: requests finished; ``outcome`` is ``ok``,
  ``image_errors`` (answered, some images failed) or a ``ServeError`` reason
  (``queue_full``, ``timeout``, ``not_ready``, ``too_large``, ``bad_request``,
  ``internal``);
* ``images_total{outcome}``: images answered (``ok`` or ``error``);
* ``request_duration_seconds{door}``, ``queue_duration_seconds`` (an image's
  wait in the inference process for its batch), ``compute_duration_seconds``
  (one batch: gather, engine, top-k) histograms;
* ``batch_size`` histogram; ``queue_depth`` (images accepted, not yet answered);
* ``stage_busy_ratio{stage}``: each worker's busy share of its wall time;
* ``images_per_second``: over the last ``RATE_WINDOW_S`` seconds;
* ``http{what}``: the HTTP door's ``connections`` open, ``refused_connections``,
  ``evicted_connections``, ``timed_out_connections`` (so far), ``inflight_bytes``,
  ``peak_inflight_bytes``, ``refused_for_budget``;
* ``cache{what}``: the result cache's ``hits``, ``misses``, ``insertions``, ``evictions``
  (so far; hits + misses = images looked up), ``entries`` and ``used_bytes``;
* per camera (``--camera NAME=URL``): ``stream_frames_total{stream, what}``, frames ``decoded``,
  ``sampled`` (picked by --fps/--every), ``duplicates`` (skipped by --dedupe), ``dropped`` (newer
  frames replaced them while inference was behind), ``recognised`` and ``errors``;
  ``stream_reconnects_total{stream}``; ``stream_up{stream}`` (1 while connected);
  ``stream_lag_seconds{stream}`` (from a frame's decoding to its hand-over to inference);
* ``worker_restarts_total{stage}``, ``worker_stalls_total{stage}`` (killed by the
  watchdog), ``ready`` (1 when ready: the same facts as the readiness probe).
"""

from __future__ import annotations

import collections
import threading
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

RATE_WINDOW_S = 10.0
_LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class ServeMetrics:
    """The daemon's Prometheus metrics. Thread-safe (prometheus-client is)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("wanwu_requests", "Requests finished, by front door and outcome",
                                ["door", "outcome"], registry=r)
        self.images = Counter("wanwu_images", "Images answered, by outcome", ["outcome"], registry=r)
        self.request_duration = Histogram("wanwu_request_duration_seconds", "Request latency, by front door",
                                          ["door"], buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_duration = Histogram("wanwu_queue_duration_seconds",
                                        "Wait of a batch's oldest image for its batch", buckets=_LATENCY_BUCKETS,
                                        registry=r)
        self.compute_duration = Histogram("wanwu_compute_duration_seconds", "One batch: gather, engine, top-k",
                                          buckets=_LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("wanwu_batch_size", "Images per engine call", buckets=_BATCH_BUCKETS,
                                    registry=r)
        self.queue_depth = Gauge("wanwu_queue_depth", "Images accepted and not yet answered", registry=r)
        self.busy = Gauge("wanwu_stage_busy_ratio", "Busy share of each worker's wall time", ["stage"], registry=r)
        self.rate = Gauge("wanwu_images_per_second", f"Images answered per second over {RATE_WINDOW_S:.0f} s",
                          registry=r)
        self.restarts = Counter("wanwu_worker_restarts", "Worker processes restarted by the supervisor",
                                ["stage"], registry=r)
        self.stalls = Counter("wanwu_worker_stalls", "Worker processes the watchdog found stuck and killed",
                              ["stage"], registry=r)
        self.ready = Gauge("wanwu_ready", "1 when the model is loaded and the daemon accepts requests", registry=r)
        self.cache = Gauge("wanwu_cache", "The result cache: hits, misses, insertions and evictions so far "
                                          "(hits + misses = images looked up), entries and bytes in it", ["what"],
                           registry=r)
        self.http = Gauge("wanwu_http", "The HTTP door: open connections, connections refused, evicted and timed "
                                        "out so far, bytes of bodies in flight and their peak, requests refused "
                                        "for the byte budget", ["what"], registry=r)
        self.stream_frames = Counter("wanwu_stream_frames", "Camera frames decoded, sampled, skipped as "
                                     "duplicates, dropped, recognised, and errors", ["stream", "what"], registry=r)
        self.stream_reconnects = Counter("wanwu_stream_reconnects", "Camera reconnections", ["stream"], registry=r)
        self.stream_up = Gauge("wanwu_stream_up", "1 while the camera is connected", ["stream"], registry=r)
        self.stream_lag = Gauge("wanwu_stream_lag_seconds", "From a camera frame's decoding to inference taking it",
                                ["stream"], registry=r)
        self._stream_last: dict[tuple[str, str], int] = {}  # the last totals reported, to count differences
        self._lock = threading.Lock()
        self._answered: collections.deque[tuple[float, int]] = collections.deque()
        self.rate.set_function(self._images_per_s)
        self._server = None

    def request(self, door: str, outcome: str, duration_s: float) -> None:
        """Count one finished request."""
        self.requests.labels(door or "api", outcome).inc()
        self.request_duration.labels(door or "api").observe(duration_s)

    def answered(self, ok: int, errors: int) -> None:
        """Count images answered (results and error records)."""
        if ok:
            self.images.labels("ok").inc(ok)
        if errors:
            self.images.labels("error").inc(errors)
        with self._lock:
            self._answered.append((time.monotonic(), ok + errors))

    def streams(self, stats: dict[str, dict]) -> None:
        """Take the camera reader's totals (``VideoSource.stats`` by stream); totals that went down
        come from a restarted reader and count from zero."""
        for stream, counts in stats.items():
            for what in ("decoded", "sampled", "duplicates", "dropped", "recognised", "errors", "reconnects"):
                total = int(counts.get(what, 0))
                last = self._stream_last.get((stream, what), 0)
                grown = total - last if total >= last else total
                self._stream_last[stream, what] = total
                if what == "reconnects":
                    self.stream_reconnects.labels(stream).inc(grown)
                else:
                    self.stream_frames.labels(stream, what).inc(grown)
            self.stream_up.labels(stream).set(1 if counts.get("up") else 0)
            self.stream_lag.labels(stream).set(float(counts.get("lag_s", 0.0)))

    def batch(self, size: int, queue_s: float, compute_s: float) -> None:
        """Count one engine call."""
        self.batch_size.observe(size)
        self.queue_duration.observe(queue_s)
        self.compute_duration.observe(compute_s)

    def _images_per_s(self) -> float:
        now = time.monotonic()
        with self._lock:
            while self._answered and now - self._answered[0][0] > RATE_WINDOW_S:
                self._answered.popleft()
            return sum(n for _, n in self._answered) / RATE_WINDOW_S

    def serve(self, host: str = "127.0.0.1", port: int = 8002) -> int:
        """Serve ``/metrics`` on ``host:port`` from a daemon thread; return the bound port."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._server = server
        return server.server_address[1]

    def shutdown(self) -> None:
        """Stop the metrics server. Safe to call twice."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
