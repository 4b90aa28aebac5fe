"""The job's owner: plan, start the process topology, watch it, stop it cleanly.

Topology (one OS process each, ZeroMQ between them, pixels in shared memory)::

    loader --work--> decoder x N --decoded(slot)--> inference --records--> sink
                        ^                               |
                        +-----------release(slot)-------+
    every stage --error records--> sink;  every worker --events--> owner

The owner sizes the slot pool once from the model's declared frame, unlinks it
as soon as every worker has mapped it, and ends the job when the sink reports a
record for every input, when a worker fails, or on Ctrl-C/SIGTERM.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pickle
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field

import zmq

from wanwu.errors import StageError, TransportError
from wanwu.pipeline import transport
from wanwu.pipeline.config import JobConfig
from wanwu.pipeline.messages import GO, STOP, Event
from wanwu.pipeline.progress import Progress
from wanwu.pipeline.shm import SlotPool, reclaim_stale_segments
from wanwu.pipeline.transport import Endpoints, make_job_dir, reclaim_stale_job_dirs
from wanwu.pipeline.worker import WorkerSpec, spawn
from wanwu.stages.models.base import get_model_spec
from wanwu.stages.sinks.base import create_sink

logger = logging.getLogger(__name__)

STOP_TIMEOUT_S = 15.0  # workers get this long to finish after stop, then are killed


@dataclass
class JobResult:
    """What a finished (or stopped) job reports."""

    status: str  # "finished", "interrupted" or "failed"
    ok: int = 0  # records with labels written this run
    errors: int = 0  # error records written this run
    skipped: int = 0  # inputs already in the output (resumed)
    prior_errors: int = 0  # error records among those
    total: int | None = None  # inputs this run had to process
    elapsed_s: float = 0.0
    busy: dict[str, float] = field(default_factory=dict)  # stage -> busy share of its wall time
    failure: str = ""  # why the job failed
    ready_s: float | None = None  # from start until every worker was ready (model loaded)
    first_record_s: float | None = None  # from start until the sink reported its first records

    @property
    def images_per_s(self) -> float:
        return (self.ok + self.errors) / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def steady_images_per_s(self) -> float:
        """Throughput once every worker was ready: start-up excluded.

        Exact with ``hold_until_ready`` (no input is read before); otherwise
        flattered by whatever the decoders did while the model loaded.
        """
        window = self.elapsed_s - (self.ready_s or 0.0)
        return (self.ok + self.errors) / window if window > 0 else 0.0

    def to_dict(self) -> dict:
        """Everything, for ``--stats-json``."""
        d = dataclasses.asdict(self)
        d.update(images_per_s=self.images_per_s, steady_images_per_s=self.steady_images_per_s,
                 exit_code=self.exit_code)
        return d

    @property
    def exit_code(self) -> int:
        """0 all recognised, 3 the output holds error records (this run's or a resumed run's),
        1 the job could not run, 130 interrupted."""
        if self.status == "failed":
            return 1
        if self.status == "interrupted":
            return 130
        return 3 if self.errors or self.prior_errors else 0

    def summary(self, out: str) -> str:
        """The final summary: counts, throughput and each stage's busy share."""
        earlier = f", {self.skipped} already done ({self.prior_errors} errors)" if self.skipped else ""
        lines = [
            f"wanwu: {self.status}: {self.ok} recognised, {self.errors} errors{earlier} "
            f"in {self.elapsed_s:.1f} s ({self.images_per_s:.1f} images/s) -> {out}"
        ]
        if self.busy:
            lines.append("busy share: " + ", ".join(f"{k} {v:.0%}" for k, v in sorted(self.busy.items())))
        if self.failure:
            lines.append(f"failure: {self.failure}")
        return "\n".join(lines)


class Job:
    """One run of the batch pipeline. Use ``run()``; it cleans up whatever happens."""

    def __init__(self, cfg: JobConfig) -> None:
        self.cfg = cfg
        self.procs: dict[str, subprocess.Popen] = {}
        self.result = JobResult("failed")
        self._interrupted = False
        self._t0 = time.perf_counter()

    def run(self) -> JobResult:
        reclaim_stale_segments()
        reclaim_stale_job_dirs()
        model = get_model_spec(self.cfg.model, **self.cfg.model_options())  # light: no framework import
        sink = create_sink(self.cfg.out)
        done = sink.open()  # repairs a torn tail left by a crash
        sink.close()
        self.result.skipped, self.result.prior_errors = len(done), sink.prior_errors
        job_dir = make_job_dir()
        n_slots = self.cfg.n_slots
        pool = SlotPool.create(model.preprocess.frame, n_slots)
        ctx = zmq.Context()
        control: zmq.Socket | None = None
        previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        self._t0 = time.perf_counter()
        try:
            endpoints = Endpoints(job_dir)
            events = transport.socket(ctx, zmq.PULL, endpoints.events, bind=True)
            control = transport.socket(ctx, zmq.PUB, endpoints.control, bind=True)
            done_path = os.path.join(job_dir, "done-keys.pickle")
            with open(done_path, "wb") as f:
                pickle.dump(done, f, protocol=pickle.HIGHEST_PROTOCOL)
            del done
            base = WorkerSpec("", 0, self.cfg, endpoints, str(pool.path), model.preprocess, n_slots, done_path,
                              model_name=model.name)
            self._start_workers(base)
            self._watch(events, control, pool, Progress(self.cfg.progress, self.cfg.log_interval_s, self.result.skipped))
            control.send(STOP)
            self._collect_stats(events)
        except KeyboardInterrupt:
            self._interrupted = True
            self.result.status = "interrupted"
        finally:
            if not self.result.elapsed_s:
                self.result.elapsed_s = self._since_start()
            signal.signal(signal.SIGTERM, previous)
            self._stop_all(control)
            pool.close()
            ctx.destroy(linger=0)
            shutil.rmtree(job_dir, ignore_errors=True)
        return self.result

    def _since_start(self) -> float:
        return time.perf_counter() - self._t0

    def _on_sigterm(self, signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    def _start_workers(self, base: WorkerSpec) -> None:
        roles = [("sink", 0), ("inference", 0)] + [("decoder", i) for i in range(self.cfg.decoders)] + [("loader", 0)]
        for role, index in roles:
            name = f"decoder-{index}" if role == "decoder" else role
            self.procs[name] = spawn(dataclasses.replace(base, role=role, index=index))

    def _watch(self, events: zmq.Socket, control: zmq.Socket, pool: SlotPool, progress: Progress) -> None:
        """Follow events until the sink has every record; raise on a dead or failed worker."""
        attached: set[str] = set()
        ready: set[str] = set()
        try:
            while True:
                if events.poll(100):
                    event, _ = transport.recv(events)
                    assert isinstance(event, Event)
                    if event.kind == "attached":
                        attached.add(event.stage)
                        if attached >= set(self.procs):
                            pool.unlink()  # every worker has mapped it: nothing can leak now
                    elif event.kind == "ready":
                        ready.add(event.stage)
                        if ready >= set(self.procs):
                            self.result.ready_s = self._since_start()
                    elif event.kind in ("progress", "done"):
                        self.result.ok = event.data["ok"]
                        self.result.errors = event.data["errors"]
                        self.result.total = event.data["total"]
                        if self.result.first_record_s is None and self.result.ok + self.result.errors:
                            self.result.first_record_s = self._since_start()
                        progress.update(self.result.ok, self.result.errors, self.result.total)
                        if event.kind == "done":
                            self.result.elapsed_s = self._since_start()
                            progress.finish(self.result.ok, self.result.errors, self.result.total)
                            self.result.status = "finished"
                            return
                    elif event.kind == "fatal":
                        self.result.failure = f"{event.stage}: {event.data['type']}: {event.data['message']}"
                        logger.error("%s failed:\n%s", event.stage, event.data["traceback"])
                        raise StageError(self.result.failure)
                    elif event.kind == "stats":
                        self._record_stats(event)
                if self.result.ready_s is not None and self.result.first_record_s is None:
                    control.send(GO)  # repeated until heard: a late subscriber must not miss it
                self._check_alive()
                progress.tick(self.result.ok, self.result.errors, self.result.total)
        except StageError:
            self.result.status = "failed"
        finally:
            progress.close()

    def _check_alive(self) -> None:
        for name, proc in self.procs.items():
            code = proc.poll()
            if code is not None:
                self.result.failure = self.result.failure or f"{name} process exited unexpectedly with status {code}"
                raise StageError(self.result.failure)

    def _record_stats(self, event: Event) -> None:
        wall = event.data.get("wall_s") or 0.0
        if wall > 0:
            self.result.busy[event.stage] = event.data["busy_s"] / wall

    def _collect_stats(self, events: zmq.Socket) -> None:
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while len(self.result.busy) < len(self.procs) and time.monotonic() < deadline:
            if events.poll(100):
                event, _ = transport.recv(events)
                if isinstance(event, Event) and event.kind == "stats":
                    self._record_stats(event)

    def _stop_all(self, control: zmq.Socket | None) -> None:
        """Broadcast stop until every worker has exited; kill those that outstay the timeout."""
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while time.monotonic() < deadline and any(p.poll() is None for p in self.procs.values()):
            if control is not None:
                # Repeated: a subscriber that joined late must still hear it.
                control.send(STOP)
            time.sleep(0.05)
        for name, proc in self.procs.items():
            if proc.poll() is None:
                logger.warning("%s did not stop within %.0f s; killing it", name, STOP_TIMEOUT_S)
                proc.kill()
                proc.wait()
        if self.result.status == "failed" and not self.result.failure:
            self.result.failure = "the job stopped before every input had a record"


def run_job(cfg: JobConfig) -> JobResult:
    """Run the batch job described by ``cfg`` to the end (or until stopped)."""
    if not cfg.inputs:
        raise TransportError("nothing to do")
    return Job(cfg).run()
