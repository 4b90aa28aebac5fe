"""What every worker process shares: start-up, the stop signal, busy-time accounting.

A worker is started as ``python -m wanwu.pipeline.worker`` with a pickled
``WorkerSpec`` on its standard input, so each process imports only what its
role needs: only the inference process imports torch or OpenVINO.
"""

from __future__ import annotations

import ctypes
import logging
import os
import pickle
import signal
import subprocess
import sys
import time
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar, Iterator

import zmq

from wanwu.pipeline import transport
from wanwu.pipeline.config import JobConfig
from wanwu.pipeline.messages import GO, STOP, Event
from wanwu.pipeline.shm import SlotPool
from wanwu.pipeline.transport import Endpoints
from wanwu.specs import FrameSpec, Preprocess

logger = logging.getLogger(__name__)

BUSY_REPORT_S = 2.0  # between a daemon worker's busy-share reports

ROLES = {
    "loader": "wanwu.pipeline.loader:LoaderWorker",
    "decoder": "wanwu.pipeline.decode_worker:DecoderWorker",
    "inference": "wanwu.pipeline.infer_worker:InferenceWorker",
    "sink": "wanwu.pipeline.sink_worker:SinkWorker",
}


@dataclass(frozen=True)
class WorkerSpec:
    """What one worker process needs to know; sent pickled on its stdin."""

    role: str  # a key of ROLES
    index: int  # which decoder (0 for the single-instance roles)
    job: JobConfig
    endpoints: Endpoints
    pool_path: str  # the shared-memory slot pool
    preprocess: Preprocess  # the model's geometry; one slot is preprocess.frame
    n_slots: int  # slots in the pool
    done_keys_path: str = ""  # loader: pickled set of keys already in the output
    generation: int = 0  # restarts of this worker so far (the daemon restarts dead workers)
    model_name: str = ""  # the resolved model's name, for error records ("" = job.model as given)

    @property
    def model(self) -> str:
        """The ``model`` field of the records this worker writes."""
        return self.model_name or self.job.model

    @property
    def frame(self) -> FrameSpec:
        return self.preprocess.frame


class Worker(ABC):
    """Base of the worker processes. ``run`` is fixed; roles implement ``_setup`` and ``_loop``."""

    stage: ClassVar[str] = "worker"
    uses_pool: ClassVar[bool] = True

    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.job = spec.job
        self.ctx = zmq.Context.instance()
        self.events = transport.socket(self.ctx, zmq.PUSH, spec.endpoints.events, bind=False)
        self.control = transport.socket(self.ctx, zmq.SUB, spec.endpoints.control, bind=False)
        self.pool: SlotPool | None = None
        self.busy_s = 0.0
        self.items = 0
        self._stopped = False
        self.go = False  # the owner said every worker is ready
        self._t_start = time.perf_counter()
        self._last_busy_report = self._t_start

    @property
    def name(self) -> str:
        return f"{self.stage}-{self.spec.index}" if self.stage == "decoder" else self.stage

    def emit(self, kind: str, **data: object) -> None:
        transport.send(self.events, Event(kind, self.name, os.getpid(), dict(data)))

    def stopped(self) -> bool:
        """True once the owner has broadcast stop (checked without blocking)."""
        while not self._stopped:
            try:
                msg = self.control.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            self._stopped = msg == STOP
            self.go = self.go or msg == GO
        return self._stopped

    @contextmanager
    def busy(self) -> Iterator[None]:
        """Count the enclosed time as this stage's work (for the busy-share summary)."""
        t = time.perf_counter()
        try:
            yield
        finally:
            now = time.perf_counter()
            self.busy_s += now - t
            # A daemon never exits to report its busy share: tell the owner now and then.
            if self.job.restartable and now - self._last_busy_report >= BUSY_REPORT_S:
                self._last_busy_report = now
                self.emit("busy", busy_s=self.busy_s, wall_s=now - self._t_start, items=self.items)

    def run(self) -> int:
        """Attach, set up, loop until stopped, report stats. Returns the exit status."""
        status = 0
        try:
            if self.uses_pool:
                self.pool = SlotPool.attach(self.spec.pool_path, self.spec.frame, self.spec.n_slots)
            self.emit("attached")
            self._setup()
            self._t_start = time.perf_counter()  # busy share counts from here, not from imports
            self.emit("ready")
            self._loop()
        except Exception as exc:  # report any failure to the owner, who ends the job
            logger.exception("%s failed", self.name)
            transport.send(self.events, Event.fatal(self.name, os.getpid(), exc))
            status = 1
        finally:
            wall = time.perf_counter() - self._t_start
            self.emit("stats", busy_s=self.busy_s, wall_s=wall, items=self.items)
            self._shutdown()
            if self.pool is not None:
                self.pool.close()
            # Give the last events a moment to leave before the context dies.
            self.events.setsockopt(zmq.LINGER, 2000)
            self.ctx.destroy(linger=2000)
        return status

    def _setup(self) -> None:
        """Hook: open sockets and stages."""

    @abstractmethod
    def _loop(self) -> None:
        """Hook: do the work until ``stopped()``."""

    def _shutdown(self) -> None:
        """Hook: release stages."""

    def wait_for_stop(self) -> None:
        """Block until the owner broadcasts stop."""
        while not self.stopped():
            self.control.poll(200)


def spawn(spec: WorkerSpec) -> subprocess.Popen:
    """Start the worker process for ``spec`` (its role and index in argv, so `ps` tells them apart)."""
    proc = subprocess.Popen([sys.executable, "-m", "wanwu.pipeline.worker", spec.role, str(spec.index)],
                            stdin=subprocess.PIPE)
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
    parent = os.getppid()
    _die_with_parent()
    if os.getppid() != parent:  # the parent died before prctl took effect
        return 1
    # Ctrl-C reaches the whole process group, and `systemctl stop` or `timeout` send SIGTERM
    # to every process: the owner coordinates the stop (it drains first), and if the owner
    # itself dies, PR_SET_PDEATHSIG ends us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    spec: WorkerSpec = pickle.load(sys.stdin.buffer)
    logging.basicConfig(
        level=os.environ.get("WANWU_LOG_LEVEL", "WARNING"),
        format=f"%(asctime)s {spec.role}[{os.getpid()}] %(levelname)s %(name)s: %(message)s",
    )
    module_name, _, cls_name = ROLES[spec.role].partition(":")
    import importlib

    worker_cls = getattr(importlib.import_module(module_name), cls_name)
    return worker_cls(spec).run()


if __name__ == "__main__":
    raise SystemExit(main())
