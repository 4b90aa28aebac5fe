"""What every worker process shares: start-up, control messages, busy-time accounting.

A worker is started as ``python -m wanwu.pipeline.workers ROLE INDEX`` with a
pickled ``WorkerSpec`` on its standard input and the slot pool's descriptor
inherited, so each process imports only what its role needs: only the inference
process imports torch or OpenVINO.
"""

from __future__ import annotations

import ctypes
import importlib
import logging
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator

import zmq

from wanwu.pipeline.topology import transport
from wanwu.pipeline.topology.messages import Event, EventKind, Stop
from wanwu.pipeline.topology.shm import SlotPool, attach_pool
from wanwu.pipeline.topology.transport import Endpoints

if TYPE_CHECKING:
    from wanwu.pipeline.config import PipelineConfig
    from wanwu.pipeline.topology.plan import Plan

logger = logging.getLogger(__name__)

BUSY_REPORT_S = 2.0  # between busy-share reports (a daemon never exits to report at the end)
HEARTBEAT_S = 1.0  # between heartbeats from the worker's loop (the owner's watchdog waits for them)

ROLES = {
    "loader": "wanwu.pipeline.workers.loader:LoaderWorker",
    "decoder": "wanwu.pipeline.workers.decoder:DecoderWorker",
    "inference": "wanwu.pipeline.workers.inference:InferenceWorker",
    "sink": "wanwu.pipeline.workers.sink:SinkWorker",
}


@dataclass(frozen=True)
class WorkerSpec:
    """What one worker process needs to know; sent pickled on its stdin."""

    role: str  # a key of ROLES
    index: int  # which decoder (0 for the single-instance roles)
    cfg: "PipelineConfig"  # the shared settings (a JobConfig for the batch job)
    plan: "Plan"  # the topology's shape: the slot frame, producers and their slot ranges
    endpoints: Endpoints
    pool_fd: int  # the slot pool's descriptor, inherited from the owner
    generation: int = 0  # incarnation of this worker (restarts and resets count up)
    sources: tuple[Any, ...] = ()  # loader: the inputs, as Source/FrameSource objects
    inputs: tuple[str, ...] = ()  # loader: the inputs as the user named them (for keys), one per source
    done_keys_path: str = ""  # loader: pickled set of keys already in the output
    out: str = ""  # sink: the output file

    @property
    def name(self) -> str:
        return f"{self.role}-{self.index}" if self.role == "decoder" else self.role

    @property
    def producer(self) -> int:
        """This worker's producer index (it writes slots), or -1."""
        if self.role == "decoder":
            return self.index
        if self.role == "loader" and self.plan.frame_producer:
            return self.plan.loader_producer
        return -1

    @property
    def uses_pool(self) -> bool:
        return self.producer >= 0 or self.role == "inference"


class Worker(ABC):
    """Base of the worker processes. ``run`` is fixed; roles implement ``_setup`` and ``_loop``."""

    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.cfg = spec.cfg
        self.plan = spec.plan
        self.name = spec.name
        self.ctx = zmq.Context.instance()
        self.events = transport.socket(self.ctx, zmq.PUSH, spec.endpoints.events, bind=False)
        self.control = transport.socket(self.ctx, zmq.SUB, spec.endpoints.control, bind=False)
        self.pool: SlotPool | None = None
        self.busy_s = 0.0
        self.items = 0
        self._stopped = False
        self._t_start = time.perf_counter()
        self._last_busy_report = self._t_start
        self._busy_since = 0.0  # monotonic start of the work in progress; 0 while idle
        self._beat_stop = threading.Event()
        self._beat_thread: threading.Thread | None = None

    def emit(self, kind: EventKind, **data: object) -> None:
        transport.send(self.events, Event(kind, self.name, os.getpid(), dict(data)))

    def stopped(self) -> bool:
        """True once the owner has broadcast ``Stop`` (checked without blocking); other
        control messages go to ``_on_control`` on the way."""
        while not self._stopped:
            try:
                msg, _ = transport.recv(self.control, zmq.NOBLOCK)
            except zmq.Again:
                break
            if isinstance(msg, Stop):
                self._stopped = True
            else:
                self._on_control(msg)
        return self._stopped

    def _on_control(self, msg: object) -> None:
        """Hook: a control message other than ``Stop`` (``Drain``, ``Lost``)."""

    @contextmanager
    def busy(self) -> Iterator[None]:
        """Count the enclosed time as this stage's work (for the busy-share figures).

        One span is one unit of work for the watchdog too: a span longer than the
        owner's stall timeout means the worker hangs.
        """
        t = time.perf_counter()
        self._busy_since = time.monotonic()
        try:
            yield
        finally:
            self._busy_since = 0.0
            now = time.perf_counter()
            self.busy_s += now - t
            if now - self._last_busy_report >= BUSY_REPORT_S:
                self._last_busy_report = now
                self.emit(EventKind.BUSY, busy_s=self.busy_s, wall_s=now - self._t_start, items=self.items)

    def run(self) -> int:
        """Attach, set up, loop until stopped, report stats. Returns the exit status."""
        status = 0
        try:
            if self.spec.uses_pool:
                self.pool = attach_pool(self.spec.pool_fd, self.plan)
            self._setup()
            self._t_start = time.perf_counter()  # busy share counts from here, not from imports
            self.emit(EventKind.READY)
            self._start_heartbeat()
            self._loop()
        except Exception as exc:  # report any failure to the owner, who restarts us or ends the job
            # The owner logs it (with its traceback where it is a bug); logging it here too
            # would print every failure twice. Kept for --log-level debug.
            logger.debug("%s failed", self.name, exc_info=True)
            transport.send(self.events, Event.fatal(self.name, os.getpid(), exc))
            status = 1
        finally:
            self._beat_stop.set()
            if self._beat_thread is not None:
                self._beat_thread.join(2)
            wall = time.perf_counter() - self._t_start
            self.emit(EventKind.STATS, busy_s=self.busy_s, wall_s=wall, items=self.items, **self._final_stats())
            self._shutdown()
            if self.pool is not None:
                self.pool.close()
            # Give the last events a moment to leave before the context dies.
            self.events.setsockopt(zmq.LINGER, 2000)
            self.ctx.destroy(linger=2000)
        return status

    def _start_heartbeat(self) -> None:
        """Beat every ``HEARTBEAT_S`` from a thread of its own, saying how long the work in progress
        has run: the owner's watchdog replaces a worker whose beats stop (a frozen process) or
        whose one piece of work runs too long (a hang)."""
        self._beat_thread = threading.Thread(target=self._heartbeat, name="heartbeat", daemon=True)
        self._beat_thread.start()

    def _heartbeat(self) -> None:
        # A socket of its own: ZeroMQ sockets belong to one thread.
        sock = transport.socket(self.ctx, zmq.PUSH, self.spec.endpoints.events, bind=False)
        try:
            while not self._beat_stop.wait(HEARTBEAT_S):
                since = self._busy_since
                busy_for = time.monotonic() - since if since else 0.0
                transport.send(sock, Event(EventKind.ALIVE, self.name, os.getpid(), {"busy_for_s": busy_for}))
        finally:
            sock.close(linger=0)

    def _setup(self) -> None:
        """Hook: open sockets and stages."""

    @abstractmethod
    def _loop(self) -> None:
        """Hook: do the work until ``stopped()``."""

    def _final_stats(self) -> dict[str, Any]:
        """Hook: figures of the role's own for the owner's summary, sent once at exit."""
        return {}

    def _shutdown(self) -> None:
        """Hook: release stages (safe to call whether or not ``_setup`` finished)."""

    def wait_for_stop(self) -> None:
        """Block until the owner broadcasts stop."""
        while not self.stopped():
            self.control.poll(200)


def spawn(spec: WorkerSpec) -> subprocess.Popen:
    """Start the worker process for ``spec`` (its role and index in argv, so `ps` tells them apart).

    The owner's pid travels in argv too: a worker whose owner died while it was still starting
    would otherwise find itself adopted by init, ask for a death signal that never comes, and
    outlive the job (it ignores SIGTERM, so nothing would end it).
    """
    argv = [sys.executable, "-m", "wanwu.pipeline.workers", spec.role, str(spec.index), str(os.getpid())]
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE,
                            pass_fds=(spec.pool_fd,) if spec.uses_pool else ())
    assert proc.stdin is not None
    proc.stdin.write(pickle.dumps(spec, protocol=pickle.HIGHEST_PROTOCOL))
    proc.stdin.close()
    return proc


def _die_with_parent() -> None:
    """Ask Linux to kill this process when its parent dies, so no orphan outlives a kill -9."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass


def main() -> int:
    owner = int(sys.argv[3]) if len(sys.argv) > 3 else os.getppid()
    _die_with_parent()
    if os.getppid() != owner:  # the owner died before prctl took effect: nobody would signal us
        return 1
    # Ctrl-C reaches the whole process group, and `systemctl stop` or `timeout` send SIGTERM
    # to every process: the owner coordinates the stop (it drains first), and if the owner
    # itself dies, PR_SET_PDEATHSIG ends us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    spec: WorkerSpec = pickle.load(sys.stdin.buffer)
    if spec.role != "sink":
        # Standard output may be the job's records (``--out -``): whatever a library prints
        # in a decoder or the engine goes to stderr instead of into the data.
        os.dup2(2, 1)
    logging.basicConfig(
        level=os.environ.get("WANWU_LOG_LEVEL", "WARNING"),
        format=f"%(asctime)s {spec.name}[{os.getpid()}] %(levelname)s %(name)s: %(message)s",
    )
    module_name, _, cls_name = ROLES[spec.role].partition(":")
    worker_cls = getattr(importlib.import_module(module_name), cls_name)
    return worker_cls(spec).run()
