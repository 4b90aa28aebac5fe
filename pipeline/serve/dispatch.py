"""The daemon's backend: the process topology behind the ``Backend`` protocol.

::

    front doors --submit()--> dispatcher --work--> decoder x N --decoded(slot)--> inference
         ^                        ^                                                   |
         +------ records ---------+---------- taken / results ------------------------+

The dispatcher lives in the daemon's process and is the topology's feeder, as the
loader is for ``wanwu run``. Request threads hand it images and wait; one router
thread owns every ZeroMQ socket (they are not thread-safe): it pushes work to
the decoders, matches records coming back to waiting requests by ticket, follows
the workers' events, and lets the ``Topology`` restart dead workers; the
``InFlight`` ledger says what to send again (the same rules as the batch job).
Dynamic batching happens in the inference process (``BatchPolicy``), across
requests from every front door.

Nothing waits forever: the queue is bounded (``max_queue_size`` images accepted
and not yet answered; beyond it a request fails at once with ``queue_full``), and
every request has a deadline (``timeout``).
"""

from __future__ import annotations

import itertools
import logging
import os
import pickle
import threading
import time
from dataclasses import dataclass, field
from typing import Sequence

import zmq

from wanwu.errors import StageError
from wanwu.records import Record
from wanwu.pipeline.serve.backend import ModelInfo, ServeError
from wanwu.pipeline.serve.config import ServeConfig
from wanwu.pipeline.serve.metrics import ServeMetrics
from wanwu.pipeline.serve.stats import ServeStats
from wanwu.pipeline.serve.twins import Twin, Twins
from wanwu.pipeline.topology import transport
from wanwu.pipeline.topology.inflight import Entry, InFlight
from wanwu.pipeline.topology.messages import Event, EventKind, Results, Taken, WorkItem
from wanwu.pipeline.topology.owner import Restart, RestartPolicy, Topology
from wanwu.pipeline.topology.plan import make_plan
from wanwu.pipeline.topology.transport import Waker
from wanwu.stages.models.base import get_model_spec

logger = logging.getLogger(__name__)

POLL_MS = 50  # router's longest sleep; supervision runs at least this often
STOP_TIMEOUT_S = 15.0


@dataclass(eq=False)
class _Request:
    records: list
    left: int
    source: str
    start: float = field(default_factory=time.perf_counter)
    done: threading.Event = field(default_factory=threading.Event)
    gave_up: bool = False  # timed out: nobody reads its records any more


class PipelineBackend:
    """``Backend`` over decoder and inference processes with dynamic batching. Thread-safe.

    ``start()`` launches the workers and returns once the model is loaded and
    warmed up; ``ready()`` is then True until ``shutdown()`` begins (or while a
    dead inference process is being replaced). ``shutdown()`` stops taking
    requests, answers those in flight (within ``drain_timeout_s``), stops the
    workers and frees the shared memory; safe to call twice. ``failure`` is set
    when the workers cannot be kept running (restarts keep failing).
    """

    def __init__(self, cfg: ServeConfig, metrics: ServeMetrics | None = None) -> None:
        self.cfg = cfg
        self.metrics = metrics
        self.spec = get_model_spec(cfg.model, **cfg.model_options())  # light: no framework import
        self.failure = ""  # why the backend stopped serving for good
        self._stats = ServeStats()
        self._lock = threading.Lock()  # guards _inflight and the flags below
        self._inflight = InFlight()
        self._requests = itertools.count()
        self._waker = Waker()  # submit threads wake the router thread's poll
        self._started = threading.Event()
        self._inference_ready = False
        self._decoders_ready = False  # at least one decoder is up
        self._draining = False
        self._closed = False
        self._stop_router = threading.Event()
        self._router: threading.Thread | None = None
        self._topology: Topology | None = None
        self.cache = cfg.open_cache(self.spec)  # None without --cache; refused here when it is not ours
        self._twins = Twins(self.cache) if self.cache is not None else None
        self._camera_fields: dict = {}  # the loader's and sink's WorkerSpec fields, with cameras
        self._streams: dict[str, dict] = {}  # the cameras' latest counters

    # ---- lifecycle -------------------------------------------------------------------------------

    def start(self, timeout_s: float = 600.0) -> None:
        """Start the workers; return once the model is loaded and warmed up.

        Raises:
            PlanError: the decoder's frames are not what the classifier takes.
            StageError: a worker failed to start (the model could not load, ...) or
                ``timeout_s`` passed first. Everything started is stopped again.
        """
        cameras = self.cfg.camera_sources(self.spec.preprocess)
        plan = make_plan(self.cfg, self.spec, cameras or None, doors=True)
        roles = [("inference", 0)] + [("decoder", i) for i in range(plan.decoders)]  # the model loads longest
        if cameras:  # the cameras' feeder and their records' writer, as in `wanwu run` on live streams
            roles += [("sink", 0), ("loader", 0)]
        # The cameras keep no ledger, so their loader and sink are restarted like any stateless worker.
        policy = RestartPolicy(stall_timeout_s=self.cfg.stall_timeout_s, also_restart=frozenset({"loader", "sink"}))
        self._topology = Topology(self.cfg, plan, roles, policy)
        if cameras:
            self._camera_fields = _camera_fields(self._topology.job_dir, cameras, self.cfg)
        self._router = threading.Thread(target=self._route, name="wanwu-dispatch", daemon=True)
        self._router.start()
        deadline = time.monotonic() + timeout_s
        while not self.ready():
            time.sleep(0.05)
            failure = self.failure or ("" if self._router.is_alive() else "the dispatcher stopped")
            if not failure and time.monotonic() > deadline:
                failure = f"the model was not ready within {timeout_s:.0f} s"
            if failure:
                self.shutdown()
                raise StageError(f"wanwu serve could not start: {failure}")
        logger.info("pipeline backend ready: %s, %d decoders", self.spec.name, plan.decoders)

    def shutdown(self) -> None:
        """Drain, then stop the workers and free everything. Safe to call twice."""
        with self._lock:
            if self._closed:
                return
            self._draining = True
        if self.metrics:
            self.metrics.ready.set(0)
        deadline = time.monotonic() + self.cfg.drain_timeout_s
        while time.monotonic() < deadline and len(self._inflight) and self._router and self._router.is_alive():
            time.sleep(0.02)
        with self._lock:
            self._closed = True
        self._fail_all(StageError("the daemon shut down before this image was recognised"))
        self._stop_router.set()
        self._waker.wake()
        if self._router is not None:
            self._router.join(STOP_TIMEOUT_S + 5)
        if self._topology is not None:
            self._topology.close()
        if self.cache is not None:
            self.cache.shutdown()
        self._waker.close()

    # ---- Backend protocol --------------------------------------------------------------------------

    def info(self) -> ModelInfo:
        cfg = self.cfg
        return ModelInfo(name=self.spec.name, num_classes=self.spec.num_classes, top_k=cfg.top_k,
                         max_batch_size=cfg.batch_size, max_queue_delay_ms=cfg.max_queue_delay_ms,
                         preferred_batch_sizes=cfg.preferred_batch_sizes,
                         max_images_per_request=cfg.max_images_per_request,
                         extra={"engine": cfg.engine, "decoder": cfg.decoder, "decoders": cfg.decoders,
                                "precision": cfg.precision})

    def live(self) -> bool:
        return not self._closed

    def alive(self) -> bool:
        """Whether the dispatcher thread runs (False before ``start`` and after it stopped)."""
        return self._router is not None and self._router.is_alive()

    def ready(self) -> bool:
        """Started, not draining, and able to serve now: the inference process and a decoder are up."""
        return self._ready_with(self._inference_ready, self._decoders_ready)

    def _ready_with(self, inference: bool, decoders: bool) -> bool:
        """``ready()`` for these worker facts."""
        return self._started.is_set() and not self._draining and not self.failure and inference and decoders

    def stats(self) -> dict:
        return self._stats.snapshot()

    def queue_depth(self) -> int:
        return len(self._inflight)

    def submit(self, images: Sequence[bytes], timeout_s: float | None = None, source: str = "",
               keys: Sequence[str] | None = None) -> list[Record]:
        """Recognise ``images``; see ``Backend.submit``.

        Raises:
            ServeError: ``not_ready`` (starting or draining), ``bad_request`` (no images, or
                keys that do not match them), ``too_large`` (over ``max_images_per_request``),
                ``queue_full`` (over ``max_queue_size`` images waiting) or ``timeout``.
        """
        n = len(images)
        timeout_s = self.cfg.timeout_s if timeout_s is None else min(timeout_s, self.cfg.timeout_s)
        if n == 0:
            raise ServeError("bad_request", "expected at least one image, got none")
        if n > self.cfg.max_images_per_request:
            raise ServeError("too_large", f"expected at most {self.cfg.max_images_per_request} images per request, "
                                          f"got {n}")
        if keys is not None and len(keys) != n:
            raise ServeError("bad_request", f"expected one key per image ({n}), got {len(keys)}")
        request = _Request([None] * n, n, source or "api")
        if keys is None:
            prefix = f"{request.source}-{next(self._requests)}"
            keys = [f"{prefix}-{i}" for i in range(n)]
        t0 = time.time()
        if not self._started.is_set() or self._draining:
            raise ServeError("not_ready", f"model {self.spec.name!r} is not ready (loading or shutting down)")
        contents, waiting = (self._twins.look_up(request, images, keys, t0) if self._twins is not None
                             else ([None] * n, set()))
        misses = [i for i in range(n) if request.records[i] is None]
        with self._lock:
            if not self._started.is_set() or self._draining:
                raise ServeError("not_ready", f"model {self.spec.name!r} is not ready (loading or shutting down)")
            if len(self._inflight) + len(misses) > self.cfg.max_queue_size:
                self._count(request, "queue_full")
                raise ServeError("queue_full", f"the queue holds {len(self._inflight)} images, at most "
                                               f"{self.cfg.max_queue_size}; try again later")
            tickets = []
            for i in misses:
                content, data = contents[i], bytes(images[i])
                if content is not None and self._twins.lead_or_wait(
                        content, Twin(request, i, keys[i], t0, data), looked_up=i not in waiting):
                    continue  # identical bytes are in flight: their answer will be this one's
                tickets.append(self._inflight.add(keys[i], request.source, t0, data, (request, i, content)).ticket)
        if tickets:
            self._waker.wake()
        elif not misses:
            request.done.set()
        if not request.done.wait(timeout_s):
            with self._lock:
                request.gave_up = True
                self._hand_over(self._inflight.discard(tickets))
            if not request.done.is_set():
                self._count(request, "timeout")
                raise ServeError("timeout", f"no answer within {timeout_s:g} s")
        outcome = "ok" if all(r.error is None for r in request.records) else "image_errors"
        self._count(request, outcome)
        return request.records

    def _hand_over(self, given_up: list[Entry]) -> None:
        """Send, for each image given up, the first identical one still waiting. Call with ``_lock`` held."""
        for entry in given_up:
            content = entry.context[2]
            twin = self._twins.given_up(content) if content is not None else None
            if twin is not None:
                self._inflight.add(twin.key, twin.request.source, twin.t0, twin.data, (twin.request, twin.index, content))
                self._waker.wake()

    def _count(self, request: _Request, outcome: str) -> None:
        elapsed = time.perf_counter() - request.start
        self._stats.add_request(outcome in ("ok", "image_errors"), int(elapsed * 1e9), {})
        if self.metrics:
            self.metrics.request(request.source, outcome, elapsed)
            self.metrics.queue_depth.set(len(self._inflight))

    # ---- answers -----------------------------------------------------------------------------------

    def _deliver(self, answers: list[tuple[Entry, Record]]) -> None:
        """Hand records to the requests waiting for them (entries already out of the ledger), and the
        same answers, under their own keys, to the identical images that waited on them."""
        deliveries = []
        for entry, record in answers:
            request, index, content = entry.context
            deliveries.append((request, index, record))
            if content is not None:
                deliveries += self._twins.answered(content, record)
        ok = errors = 0
        for request, index, record in deliveries:
            if request.records[index] is not None:
                continue
            request.records[index] = record
            request.left -= 1
            if record.error is None:
                ok += 1
            else:
                errors += 1
            if request.left == 0:
                request.done.set()
        if self.metrics and ok + errors:
            self.metrics.answered(ok, errors)

    def _fail(self, entries: list[Entry], exc: BaseException) -> None:
        self._deliver([(e, Record.failure(e.key, e.source, self.spec.name, exc, e.t0)) for e in entries])

    def _fail_all(self, exc: BaseException) -> None:
        with self._lock:
            entries = list(self._inflight.entries())
            for entry in entries:
                self._inflight.complete(entry.ticket)
        self._fail(entries, exc)

    # ---- the router thread -------------------------------------------------------------------------

    def _route(self) -> None:
        topology = self._topology
        assert topology is not None
        ep = topology.endpoints
        ctx = zmq.Context()
        work = transport.socket(ctx, zmq.PUSH, ep.work, bind=True, hwm=4 * max(1, topology.plan.decoders))
        results = transport.socket(ctx, zmq.PULL, ep.results, bind=True)
        try:
            topology.start(**self._camera_fields)
            poller = zmq.Poller()
            for sock in (results, topology.events_socket):
                poller.register(sock, zmq.POLLIN)
            poller.register(self._waker.fd, zmq.POLLIN)
            last_check = 0.0
            while not self._stop_router.is_set():
                with self._lock:
                    outbox = self._inflight.has_outbox()
                poller.register(work, zmq.POLLOUT if outbox else 0)
                ready = dict(poller.poll(POLL_MS))
                if ready.get(self._waker.fd):
                    self._waker.drain()
                # Events before results: a worker's READY was sent before any answer it gave, so
                # readiness (and its gauge) is up to date before a client can see that answer.
                for event in topology.poll(0):
                    self._on_event(event)
                    if event.kind is EventKind.READY:
                        self._refresh_ready(topology)
                self._take_results(results)
                self._send_work(work)
                now = time.monotonic()
                if now - last_check >= POLL_MS / 1000.0:
                    last_check = now
                    self._supervise(topology, now)
        except Exception as exc:  # a worker that cannot start or keep running, or a bug: fail clients, stop
            logger.exception("dispatcher stopped")
            self.failure = self.failure or str(exc)
            with self._lock:
                self._draining = True
            if self.metrics:
                self.metrics.ready.set(0)
            self._fail_all(StageError(f"the daemon's workers failed: {exc}"))
        finally:
            topology.stop(STOP_TIMEOUT_S)
            ctx.destroy(linger=0)

    def _send_work(self, work: zmq.Socket) -> None:
        while True:
            with self._lock:
                entry = self._inflight.peek()
                if entry is None:
                    return
                try:
                    transport.send(work, WorkItem(entry.ticket, entry.key, entry.source, entry.t0, entry.attempts),
                                   entry.payload, zmq.NOBLOCK)
                except zmq.Again:  # every decoder's queue is full (or none is connected): wait for POLLOUT
                    return
                self._inflight.sent(entry, time.monotonic())

    def _take_results(self, sock: zmq.Socket) -> None:
        for msg in transport.waiting(sock):
            if isinstance(msg, Taken):
                with self._lock:
                    self._inflight.taken(msg.tickets, (msg.producer, msg.generation))
            elif isinstance(msg, Results):
                with self._lock:
                    answers = [(e, r) for e, r in ((self._inflight.complete(t), r)
                                                   for t, r in zip(msg.tickets, msg.records)) if e is not None]
                self._deliver(answers)  # type: ignore[arg-type]
                if self.cache is not None:
                    self.cache.put([(e.context[2], r) for e, r in answers if e.context[2] is not None])

    def _on_event(self, event: Event) -> None:
        if event.kind is EventKind.READY and event.stage == "inference":
            self._started.set()
        elif event.kind is EventKind.BATCH:
            size, queue_s, compute_s = event.data["size"], event.data["queue_s"], event.data["compute_s"]
            self._stats.add_execution(size, {"compute_infer": int(compute_s * 1e9)})
            if self.metrics:
                self.metrics.batch(size, queue_s, compute_s)
        elif event.kind is EventKind.STREAMS:
            self._streams = event.data["streams"]
            if self.metrics:
                self.metrics.streams(self._streams)
        elif event.kind in (EventKind.BUSY, EventKind.STATS) and self.metrics:
            wall = event.data.get("wall_s") or 0.0
            if wall > 0:
                self.metrics.busy.labels(event.stage).set(event.data["busy_s"] / wall)

    def _supervise(self, topology: Topology, now: float) -> None:
        restart = topology.supervise()  # raises StageError when a worker cannot be kept running
        if restart is not None:
            self._on_restart(restart, now)
        self._refresh_ready(topology)
        with self._lock:
            failed = self._inflight.sweep(now)
        self._fail(failed, StageError("the worker process holding this image died twice"))

    def _refresh_ready(self, topology: Topology) -> None:
        """``ready()``'s worker facts and the ``wanwu_ready`` gauge, from the same facts: on every
        READY event and every tick. The gauge is set first, so it never says ready before ``ready()`` does
        (the daemon announces itself once ``ready()`` holds, and a scrape right then must agree)."""
        inference = topology.ready("inference")
        # A camera that is down does not make the daemon unready: only the model and the decoders count.
        decoders = any(topology.ready(name) for name in topology.positions if name.startswith("decoder"))
        if self.metrics:
            self.metrics.ready.set(1 if self._ready_with(inference, decoders) else 0)
        self._inference_ready, self._decoders_ready = inference, decoders

    def _on_restart(self, restart: Restart, now: float) -> None:
        if self.metrics:
            for name in restart.names:
                self.metrics.restarts.labels(name.split("-")[0]).inc()
            for name in restart.stalled:
                self.metrics.stalls.labels(name.split("-")[0]).inc()
        with self._lock:
            failed = self._inflight.lost(set(restart.dead), restart.everything, now)
        self._fail(failed, StageError("the worker process holding this image died twice"))


def _camera_fields(job_dir: str, cameras: list, cfg: ServeConfig) -> dict:
    """The ``WorkerSpec`` fields of the cameras' loader and sink: the sources, no keys done, the output."""
    done_path = os.path.join(job_dir, "done-keys.pickle")
    with open(done_path, "wb") as f:
        pickle.dump(set(), f)
    return {"sources": tuple(cameras), "inputs": tuple(cfg.camera_urls().values()), "done_keys_path": done_path,
            "out": cfg.camera_out}
