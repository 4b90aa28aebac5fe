"""``wanwu run``: a batch job over the topology, with a loader, a sink and a resume ledger.

Topology (one OS process each, ZeroMQ between them, pixels in shared memory)::

    loader --work--> decoder x N --decoded(slot)--> inference
      ^  \\--frames of a frame source (slot)------------^  |
      +------------- taken / results ------------------+--+
      \\--records (one per input)--> sink

The ``Topology`` owns the processes and restarts dead decoders and inference;
the loader re-sends what they held. What is the job's own: the ledger (the
output file: inputs already in it are skipped), the sink process, the progress
display, and the signals. The first Ctrl-C or SIGTERM drains (no new input,
every input in flight gets its record); a second one, or a drain that outstays
``STOP_TIMEOUT_S``, stops at once.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pickle
import signal
import time
from dataclasses import dataclass, field
from typing import Sequence

from wanwu.errors import ConfigError, StageError
from wanwu.pipeline.config import JobConfig
from wanwu.pipeline.run.progress import Progress
from wanwu.pipeline.topology.messages import Drain, Event, EventKind
from wanwu.pipeline.topology.owner import RestartPolicy, Topology
from wanwu.pipeline.topology.plan import make_plan
from wanwu.stages.models.base import get_model_spec
from wanwu.stages.sinks.base import create_sink
from wanwu.stages.sources.base import FrameSource, Source, open_source

logger = logging.getLogger(__name__)

STOP_TIMEOUT_S = 15.0  # a drain, and workers after stop, get this long; then they are stopped or killed
POLL_MS = 100


@dataclass
class JobResult:
    """What a finished (or stopped) job reports."""

    status: str  # "finished", "interrupted" or "failed"
    ok: int = 0  # records with labels written this run
    errors: int = 0  # error records written this run
    skipped: int = 0  # inputs already in the output (resumed)
    retried: int = 0  # error records dropped from the output to try their inputs again (--retry-errors)
    prior_errors: int = 0  # error records among those
    total: int | None = None  # inputs this run had to process, once the scan is over
    elapsed_s: float = 0.0
    busy: dict[str, float] = field(default_factory=dict)  # worker -> busy share of its wall time
    failure: str = ""  # why the job failed
    restarts: int = 0  # workers restarted after they died
    cache: dict[str, int] = field(default_factory=dict)  # result cache: hits, misses, insertions, evictions
    streams: dict[str, dict] = field(default_factory=dict)  # per video input: frames decoded, sampled, skipped...
    ready_s: float | None = None  # from start until every worker was ready (model loaded)
    first_record_s: float | None = None  # from start until the sink reported its first records

    @property
    def images_per_s(self) -> float:
        return (self.ok + self.errors) / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def to_dict(self) -> dict:
        """Everything, for ``--stats-json``."""
        d = dataclasses.asdict(self)
        d.update(images_per_s=self.images_per_s, exit_code=self.exit_code)
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
        earlier += f", {self.retried} tried again after an error" if self.retried else ""
        lines = [
            f"wanwu: {self.status}: {self.ok} recognised, {self.errors} errors{earlier} "
            f"in {self.elapsed_s:.1f} s ({self.images_per_s:.1f} images/s) -> {'stdout' if out == '-' else out}"
        ]
        if self.busy:
            lines.append("busy share: " + ", ".join(f"{k} {v:.0%}" for k, v in sorted(self.busy.items())))
        if self.cache:
            c = self.cache
            lines.append(f"cache: {c['hits']} hits, {c['misses']} misses, {c['insertions']} insertions, "
                         f"{c['evictions']} evictions")
        for name, c in self.streams.items():
            lines.append(f"{name}: {c['decoded']} frames decoded, {c['sampled']} sampled, {c['duplicates']} "
                         f"skipped as duplicates, {c['dropped']} dropped, {c['errors']} errors, "
                         f"{c['reconnects']} reconnects")
        if self.restarts:
            lines.append(f"restarted {self.restarts} worker process(es) that died")
        if self.failure:
            lines.append(f"failure: {self.failure}")
        return "\n".join(lines)


class Job:
    """One run of the batch pipeline. Use ``run()``; it cleans up whatever happens.

    Args:
        cfg: the job's settings.
        sources: the inputs as source objects, one per ``cfg.inputs`` entry (the Python API's
            way to bring a source of one's own); None opens ``cfg.inputs``.
    """

    def __init__(self, cfg: JobConfig, sources: Sequence[Source | FrameSource] | None = None) -> None:
        if sources is not None and len(sources) != len(cfg.inputs):
            raise ConfigError(f"expected one source per input ({len(cfg.inputs)}), got {len(sources)}")
        self.cfg = cfg
        self.sources = list(sources) if sources is not None else None
        self.result = JobResult("failed")
        self.topology: Topology | None = None
        self._signals = 0
        self.started_at = time.perf_counter()  # perf_counter() when run() started; elapsed_s counts from here

    def run(self) -> JobResult:
        cfg = self.cfg
        model = get_model_spec(cfg.model, **cfg.model_options())  # light: no framework import
        sources = self.sources or [open_source(loc, model.preprocess, cfg.video_config()) for loc in cfg.inputs]
        plan = make_plan(cfg, model, sources)  # refuses mismatched stages before any process starts
        endless = any(s.endless for s in sources)
        sink = create_sink(cfg.out)
        self.result.retried = sink.drop_errors() if cfg.retry_errors else 0
        done = sink.open(ledger=not endless)  # repairs a torn tail left by a crash
        sink.shutdown()
        self.result.skipped, self.result.prior_errors = len(done), sink.prior_errors
        roles = [("sink", 0), ("inference", 0)] + [("decoder", i) for i in range(plan.decoders)] + [("loader", 0)]
        handlers = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        self.started_at = time.perf_counter()
        topology = self.topology = Topology(cfg, plan, roles, RestartPolicy(stall_timeout_s=cfg.stall_timeout_s))
        try:
            done_path = os.path.join(topology.job_dir, "done-keys.pickle")
            with open(done_path, "wb") as f:
                pickle.dump(done, f, protocol=pickle.HIGHEST_PROTOCOL)
            del done
            topology.start(sources=tuple(sources), inputs=cfg.inputs, done_keys_path=done_path, out=cfg.out)
            self._watch(topology, Progress(cfg.progress, cfg.log_interval_s, self.result.skipped))
        finally:
            if not self.result.elapsed_s:
                self.result.elapsed_s = self._since_start()
            topology.stop(STOP_TIMEOUT_S)
            for event in topology.poll(0):  # the workers' last busy figures
                self._note_stats(event)
            topology.close()
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
            self.result.restarts = topology.restarts
        return self.result

    def _since_start(self) -> float:
        return time.perf_counter() - self.started_at

    def _on_signal(self, signum: int, frame: object) -> None:
        self._signals += 1  # acted on by _watch: a handler must not interrupt a restart half-way

    def _watch(self, topology: Topology, progress: Progress) -> None:
        """Follow the workers until the sink has every record, the job is stopped, or it fails."""
        drain_deadline = 0.0
        try:
            while True:
                for event in topology.poll(POLL_MS):
                    if self._on_event(topology, event, progress):
                        return
                restart = topology.supervise()
                if restart is not None:
                    logger.warning("restarted %s", ", ".join(restart.names))
                timed_out = self.cfg.duration_s and self._since_start() >= self.cfg.duration_s
                if (self._signals or timed_out) and not drain_deadline:
                    logger.warning("stopping: no new inputs; waiting for those in flight (again to stop at once)"
                                   if self._signals else "--duration reached: finishing what is in flight")
                    topology.broadcast(Drain())
                    drain_deadline = time.monotonic() + STOP_TIMEOUT_S
                if self._signals > 1 or (drain_deadline and time.monotonic() > drain_deadline):
                    self.result.status = "interrupted"
                    return
                progress.tick(self.result.ok, self.result.errors, self.result.total)
        except StageError as exc:
            self.result.status = "failed"
            self.result.failure = str(exc)
        finally:
            progress.close()

    def _on_event(self, topology: Topology, event: Event, progress: Progress) -> bool:
        """Take one event into account; True when the job is over."""
        if event.kind is EventKind.READY:
            if self.result.ready_s is None and topology.all_ready():
                self.result.ready_s = self._since_start()
        elif event.kind in (EventKind.PROGRESS, EventKind.DONE):
            self.result.ok, self.result.errors = event.data["ok"], event.data["errors"]
            self.result.total = event.data["total"]
            if self.result.first_record_s is None and self.result.ok + self.result.errors:
                self.result.first_record_s = self._since_start()
            progress.update(self.result.ok, self.result.errors, self.result.total)
            if event.kind is EventKind.DONE:
                self.result.elapsed_s = self._since_start()
                progress.finish(self.result.ok, self.result.errors, self.result.total)
                self.result.status = "finished" if event.data["complete"] else "interrupted"
                return True
        else:
            self._note_stats(event)
        return False

    def _note_stats(self, event: Event) -> None:
        if event.kind is EventKind.STATS and "cache" in event.data:
            self.result.cache = event.data["cache"]
        if event.kind is EventKind.STATS and "streams" in event.data:
            self.result.streams = event.data["streams"]
        if event.kind in (EventKind.BUSY, EventKind.STATS):
            wall = event.data.get("wall_s") or 0.0
            if wall > 0:
                self.result.busy[event.stage] = event.data["busy_s"] / wall


def run_job(cfg: JobConfig, sources: Sequence[Source | FrameSource] | None = None) -> JobResult:
    """Run the batch job described by ``cfg`` to the end (or until stopped)."""
    if not cfg.inputs:
        raise ConfigError("expected at least one input, got none")
    return Job(cfg, sources).run()
