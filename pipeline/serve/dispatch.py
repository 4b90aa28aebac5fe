"""The daemon's backend: the ``wanwu run`` process topology behind the ``Backend`` protocol.

::

    front doors --submit()--> dispatcher --work--> decoder x N --decoded(slot)--> inference
         ^                        ^                                                   |
         +------ records ---------+------------------- records -----------------------+

The dispatcher lives in the daemon's process. Request threads hand it images and
wait; one router thread owns every ZeroMQ socket (they are not thread-safe): it
pushes work to the decoders, matches records coming back to waiting requests by
key, follows the workers' events, and lets the ``Supervisor`` restart dead ones.
Dynamic batching happens in the inference process (``BatchPolicy``), across
requests from every front door.

Nothing waits forever: the queue is bounded (``max_queue_size`` images accepted
and not yet answered; beyond it a request fails at once with ``queue_full``), and
every request has a deadline (``timeout``). Decoders say which images they take;
when one dies, the images it held are sent again once (all images in flight when
the inference process dies), and an image whose holder dies a second time gets an
error record. Records are matched by key, so an image answered twice is answered once.
"""

from __future__ import annotations

import collections
import itertools
import logging
import math
import shutil
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import zmq

from wanwu.errors import StageError
from wanwu.pipeline import transport
from wanwu.pipeline.messages import Event, Records, WorkItem
from wanwu.pipeline.records import error_record
from wanwu.pipeline.serve.backend import ModelInfo, ServeError
from wanwu.pipeline.serve.config import ServeConfig
from wanwu.pipeline.serve.metrics import ServeMetrics
from wanwu.pipeline.serve.stats import ServeStats
from wanwu.pipeline.serve.supervisor import Supervisor
from wanwu.pipeline.shm import SlotPool, reclaim_stale_segments
from wanwu.pipeline.transport import Endpoints, Waker, make_job_dir, reclaim_stale_job_dirs
from wanwu.pipeline.worker import WorkerSpec
from wanwu.stages.models.base import get_model_spec

logger = logging.getLogger(__name__)

POLL_MS = 50  # router's longest sleep; supervision runs at least this often
RESWEEP_S = 1.0  # after a death, images no decoder took within this long are sent again (see _supervise)
STOP_TIMEOUT_S = 15.0
MAX_UNCLAIMED_RESENDS = 3


@dataclass(eq=False)
class _Request:
    records: list
    left: int
    source: str
    start: float = field(default_factory=time.perf_counter)
    done: threading.Event = field(default_factory=threading.Event)
    cancelled: bool = False


@dataclass(eq=False)
class _Item:
    """One image in flight."""

    key: str
    request: _Request
    index: int
    data: bytes
    t0: float
    attempts: int = 1
    sent_at: float = 0.0  # monotonic; 0 = waiting in the outbox
    holder: tuple[str, int] | None = None  # (decoder, generation) that said it took the image
    unclaimed_resends: int = 0  # re-sent with no decoder known to have held it


class PipelineBackend:
    """``Backend`` over decoder and inference processes with dynamic batching. Thread-safe.

    ``start()`` launches the workers and returns once the model is loaded and
    warmed up; ``ready()`` is then True until ``shutdown()`` begins (or while a
    dead inference process is being replaced). ``shutdown()`` stops taking
    requests, answers those in flight (within ``drain_timeout_s``), stops the
    workers and frees the shared memory; safe to call twice.
    """

    def __init__(self, cfg: ServeConfig, metrics: ServeMetrics | None = None) -> None:
        self.cfg = cfg
        self.job = cfg.job()
        self.metrics = metrics
        self.spec = get_model_spec(cfg.model, **self.job.model_options())  # light: no framework import
        self._stats = ServeStats()
        self._lock = threading.Lock()  # guards _pending, _outbox, the flags below
        self._pending: dict[str, _Item] = {}
        self._outbox: collections.deque[_Item] = collections.deque()
        self._requests = itertools.count()
        self._waker = Waker()  # submit threads wake the router thread's poll
        self._started = threading.Event()
        self._startup_failure = ""
        self._inference_ready = False
        self._draining = False
        self._closed = False
        self._stop_router = threading.Event()
        self._router: threading.Thread | None = None
        self._resweeps: list[float] = []  # monotonic times of pending re-sends
        self._job_dir = ""
        self._pool: SlotPool | None = None
        self.supervisor: Supervisor | None = None

    # ---- lifecycle -------------------------------------------------------------------------------

    def start(self, timeout_s: float = 600.0) -> None:
        """Start the workers; return once the model is loaded and warmed up.

        Raises:
            StageError: a worker failed to start (the model could not load, ...) or
                ``timeout_s`` passed first. Everything started is stopped again.
        """
        reclaim_stale_segments()
        reclaim_stale_job_dirs()
        self._job_dir = make_job_dir()
        # The pool stays named while the daemon lives: restarted workers attach to it by
        # name. It is named after this process, so the next start reclaims it after a kill -9.
        self._pool = SlotPool.create(self.spec.preprocess.frame, self.job.n_slots)
        base = WorkerSpec("", 0, self.job, Endpoints(self._job_dir), str(self._pool.path), self.spec.preprocess,
                          self.job.n_slots, model_name=self.spec.name)
        self.supervisor = Supervisor(base, self.job.decoders)
        self._router = threading.Thread(target=self._route, name="wanwu-dispatch", daemon=True)
        self._router.start()
        deadline = time.monotonic() + timeout_s
        while not self._started.wait(0.1):
            failure = self._startup_failure or ("" if self._router.is_alive() else "the dispatcher stopped")
            if not failure and time.monotonic() > deadline:
                failure = f"the model was not ready within {timeout_s:.0f} s"
            if failure:
                self.shutdown()
                raise StageError(f"wanwu serve could not start: {failure}")
        logger.info("pipeline backend ready: %s, %d decoders", self.spec.name, self.job.decoders)

    def shutdown(self) -> None:
        """Drain, then stop the workers and free everything. Safe to call twice."""
        with self._lock:
            if self._closed:
                return
            self._draining = True
        if self.metrics:
            self.metrics.ready.set(0)
        deadline = time.monotonic() + self.cfg.drain_timeout_s
        while time.monotonic() < deadline and self._pending and self._router and self._router.is_alive():
            time.sleep(0.02)
        with self._lock:
            self._closed = True
            left = list(self._pending.values())
        self._fail(left, StageError("the daemon shut down before this image was recognised"))
        self._stop_router.set()
        self._waker.wake()
        if self._router is not None:
            self._router.join(STOP_TIMEOUT_S + 5)
        if self._pool is not None:
            self._pool.close()
        if self._job_dir:
            shutil.rmtree(self._job_dir, ignore_errors=True)
        self._waker.close()

    # ---- Backend protocol --------------------------------------------------------------------------

    def info(self) -> ModelInfo:
        return ModelInfo(name=self.spec.name, num_classes=self.spec.num_classes, top_k=self.job.top_k,
                         max_batch_size=self.job.batch_size, max_queue_delay_ms=self.cfg.max_queue_delay_ms,
                         preferred_batch_sizes=self.cfg.preferred_batch_sizes,
                         max_images_per_request=self.cfg.max_images_per_request,
                         extra={"engine": self.cfg.engine, "decoder": self.cfg.decoder,
                                "decoders": self.job.decoders, "precision": self.cfg.precision})

    def live(self) -> bool:
        return not self._closed

    def ready(self) -> bool:
        return self._started.is_set() and self._inference_ready and not self._draining

    def stats(self) -> dict:
        return self._stats.snapshot()

    def queue_depth(self) -> int:
        return len(self._pending)

    def submit(self, images: Sequence[bytes], timeout_s: float | None = None, source: str = "") -> list[dict]:
        """Recognise ``images``; see ``Backend.submit``.

        Raises:
            ServeError: ``not_ready`` (starting or draining), ``bad_request`` (no images),
                ``too_large`` (over ``max_images_per_request``), ``queue_full`` (over
                ``max_queue_size`` images waiting) or ``timeout``.
        """
        n = len(images)
        timeout_s = self.cfg.timeout_s if timeout_s is None else min(timeout_s, self.cfg.timeout_s)
        if n == 0:
            raise ServeError("bad_request", "expected at least one image, got none")
        if n > self.cfg.max_images_per_request:
            raise ServeError("too_large", f"expected at most {self.cfg.max_images_per_request} images per request, "
                                          f"got {n}")
        request = _Request([None] * n, n, source or "api")
        prefix = f"{request.source}-{next(self._requests)}"
        t0 = time.time()
        items = [_Item(f"{prefix}-{i}", request, i, bytes(data), t0) for i, data in enumerate(images)]
        with self._lock:
            if not self._started.is_set() or self._draining:
                raise ServeError("not_ready", f"model {self.spec.name!r} is not ready (loading or shutting down)")
            if len(self._pending) + n > self.cfg.max_queue_size:
                self._count(request, "queue_full")
                raise ServeError("queue_full", f"the queue holds {len(self._pending)} images, at most "
                                               f"{self.cfg.max_queue_size}; try again later")
            for item in items:
                self._pending[item.key] = item
                self._outbox.append(item)
        self._waker.wake()
        if not request.done.wait(timeout_s):
            with self._lock:
                request.cancelled = True
                for item in items:
                    self._pending.pop(item.key, None)
            if not request.done.is_set():
                self._count(request, "timeout")
                raise ServeError("timeout", f"no answer within {timeout_s:g} s")
        outcome = "ok" if all(r["error"] is None for r in request.records) else "image_errors"
        self._count(request, outcome)
        return request.records

    def _count(self, request: _Request, outcome: str) -> None:
        elapsed = time.perf_counter() - request.start
        self._stats.add_request(outcome in ("ok", "image_errors"), int(elapsed * 1e9), {})
        if self.metrics:
            self.metrics.request(request.source, outcome, elapsed)
            self.metrics.queue_depth.set(len(self._pending))

    # ---- answers -----------------------------------------------------------------------------------

    def _deliver(self, records: Sequence[dict]) -> None:
        """Hand records to their requests; records of keys no longer waited for are dropped."""
        ok = errors = 0
        with self._lock:
            for record in records:
                item = self._pending.pop(record["key"], None)
                if item is None:  # answered already (a re-sent image), or its request timed out
                    continue
                request = item.request
                request.records[item.index] = record
                request.left -= 1
                if record["error"] is None:
                    ok += 1
                else:
                    errors += 1
                if request.left == 0:
                    request.done.set()
        if self.metrics and ok + errors:
            self.metrics.answered(ok, errors)

    def _fail(self, items: Sequence[_Item], exc: BaseException) -> None:
        self._deliver([error_record(item.key, item.request.source, self.spec.name, exc, item.t0) for item in items])

    # ---- the router thread -------------------------------------------------------------------------

    def _route(self) -> None:
        ctx = zmq.Context()
        assert self.supervisor is not None
        ep = self.supervisor.slots["inference"].spec.endpoints
        work = transport.socket(ctx, zmq.PUSH, ep.work, bind=True, hwm=4 * self.job.decoders)
        records = transport.socket(ctx, zmq.PULL, ep.records, bind=True)
        events = transport.socket(ctx, zmq.PULL, ep.events, bind=True)
        control = transport.socket(ctx, zmq.PUB, ep.control, bind=True)
        try:
            self.supervisor.start()
            poller = zmq.Poller()
            for sock in (records, events):
                poller.register(sock, zmq.POLLIN)
            poller.register(self._waker.fd, zmq.POLLIN)
            last_check = 0.0
            while not self._stop_router.is_set():
                poller.register(work, zmq.POLLOUT if self._outbox else 0)
                ready = dict(poller.poll(POLL_MS))
                if ready.get(self._waker.fd):
                    self._waker.drain()
                self._drain_records(records)
                self._drain_events(events)
                self._send_work(work)
                now = time.monotonic()
                if now - last_check >= POLL_MS / 1000.0:
                    last_check = now
                    self._supervise(now)
            self.supervisor.stop(control, STOP_TIMEOUT_S)
        except Exception as exc:  # a bug here must not leave clients waiting: fail them, stop workers
            logger.exception("dispatcher failed")
            self._startup_failure = self._startup_failure or f"dispatcher failed: {exc}"
            with self._lock:
                self._draining = True
                left = list(self._pending.values())
            self._fail(left, StageError(f"the dispatcher failed: {exc}"))
            self.supervisor.stop(control, STOP_TIMEOUT_S)
        finally:
            ctx.destroy(linger=0)

    def _send_work(self, work: zmq.Socket) -> None:
        while True:
            with self._lock:
                while self._outbox and self._outbox[0].request.cancelled:
                    self._outbox.popleft()
                if not self._outbox:
                    return
                item = self._outbox[0]
            try:
                transport.send(work, WorkItem(item.key, item.request.source, item.t0), item.data, zmq.NOBLOCK)
            except zmq.Again:  # every decoder's queue is full (or none is connected): wait for POLLOUT
                return
            with self._lock:
                if self._outbox and self._outbox[0] is item:
                    self._outbox.popleft()
                item.sent_at = time.monotonic()

    def _drain_records(self, sock: zmq.Socket) -> None:
        for msg in _waiting(sock):
            if isinstance(msg, Records):
                self._deliver(msg.records)

    def _drain_events(self, sock: zmq.Socket) -> None:
        for event in _waiting(sock):
            if isinstance(event, Event):
                self._on_event(event)

    def _on_event(self, event: Event) -> None:
        assert self.supervisor is not None
        if event.kind == "taken":  # a decoder holds these images now: its death is theirs
            holder = (event.stage, event.data["generation"])
            with self._lock:
                for key in event.data["keys"]:
                    item = self._pending.get(key)
                    if item is not None and item.sent_at:
                        item.holder = holder
        elif event.kind == "ready" and event.stage == "inference":
            self._inference_ready = True
            self._started.set()
            if self.metrics:
                self.metrics.ready.set(0 if self._draining else 1)
        elif event.kind == "batch":
            size, queue_s, compute_s = event.data["size"], event.data["queue_s"], event.data["compute_s"]
            self._stats.add_execution(size, {"compute_infer": int(compute_s * 1e9)})
            if self.metrics:
                self.metrics.batch(size, queue_s, compute_s)
        elif event.kind in ("busy", "stats") and self.metrics:
            wall = event.data.get("wall_s") or 0.0
            if wall > 0:
                self.metrics.busy.labels(event.stage).set(event.data["busy_s"] / wall)
        elif event.kind == "fatal":
            logger.error("%s failed: %s: %s\n%s", event.stage, event.data["type"], event.data["message"],
                         event.data.get("traceback", ""))
            if not self._started.is_set():  # a worker that cannot start will not start on a retry either
                self._startup_failure = f"{event.stage}: {event.data['type']}: {event.data['message']}"

    def _supervise(self, now: float) -> None:
        assert self.supervisor is not None
        if self._startup_failure and not self._started.is_set():
            return  # start() is about to give up; restarting would only repeat the failure
        generations = {name: self.supervisor.generation(name) for name in self.supervisor.slots}
        restarted = self.supervisor.check()
        if restarted:
            if "inference" in restarted:
                self._inference_ready = False
                if self.metrics:
                    self.metrics.ready.set(0)
            if self.metrics:
                for name in restarted:
                    self.metrics.restarts.labels(name.split("-")[0]).inc()
            # The inference process's death (which restarts every decoder) loses everything in flight.
            self._resend({(name, generations[name]) for name in restarted}, everything="inference" in restarted)
            self._resweeps.append(now + RESWEEP_S)
        if self._resweeps and now >= self._resweeps[0]:
            # Images pushed into a dead decoder's queue after it died but before ZeroMQ noticed
            # are lost there, and no decoder says it took them: send those again too.
            self._resweeps.pop(0)
            self._resend(set(), everything=False, untaken_before=now - RESWEEP_S / 2)

    def _resend(self, dead: set[tuple[str, int]], everything: bool, untaken_before: float = math.inf) -> None:
        """Send again the images held by the ``dead`` workers (an attempt: the second fails the
        image), and those sent before ``untaken_before`` that no decoder has said it took (they
        may sit in a dead decoder's queue): free the first ``MAX_UNCLAIMED_RESENDS`` times, then
        as attempts. Answers are deduplicated."""
        failed: list[_Item] = []
        with self._lock:
            for item in self._pending.values():
                if not item.sent_at:
                    continue  # still in the outbox
                unclaimed = item.holder is None and item.sent_at <= untaken_before
                if unclaimed and item.unclaimed_resends < MAX_UNCLAIMED_RESENDS:
                    item.unclaimed_resends += 1
                elif everything or item.holder in dead or unclaimed:
                    # An image that kills its decoder before the "taken" event leaves still runs
                    # out of resends here, so a poisonous image cannot crash decoders forever.
                    if item.attempts >= 2:
                        failed.append(item)
                        continue
                    item.attempts += 1
                else:
                    continue
                item.sent_at, item.holder = 0.0, None
                self._outbox.appendleft(item)
        if failed:
            self._fail(failed, StageError("the worker process holding this image died twice"))


def _waiting(sock: zmq.Socket) -> Iterator[object]:
    """The messages waiting on ``sock``, without blocking."""
    while True:
        try:
            msg, _ = transport.recv(sock, zmq.NOBLOCK)
        except zmq.Again:
            return
        yield msg
