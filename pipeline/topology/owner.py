"""The one owner of the process topology, for ``wanwu run`` and ``wanwu serve`` alike.

``Topology`` takes a ``Plan`` and the worker roles a front door needs, creates the
shared memory and the job's socket folder, spawns the workers, follows their
events, restarts the ones that die, and stops them all. The front doors keep
only what really differs: the batch job its loader and sink processes, the
daemon its front doors and in-flight ledger (the dispatcher thread).

Restart rules, chosen so that no slot is ever read while someone writes it:

* a dead decoder is restarted alone, one generation on: it writes the other half
  of its slot range, so frames its predecessor handed over stay intact;
* a dead inference process took the release messages of the slots it held with
  it, so every producer moves on a generation too: decoders are restarted, and a
  loader that writes frames is told (``Lost``) and resets itself;
* the feeder hears of every death (``Lost``) and sends again what the dead held;
* the loader and the sink are not restarted: the job's ledger lives in them, and
  their death fails the job;
* the first death of a worker, or one after a long life, is restarted at once;
  quick repeats wait, up to ``max_backoff_s``;
* a worker that dies before it was ever ready (the model cannot load) ends
  everything with its reason, and so do ``max_failed_starts`` incarnations in a
  row that die before they are ready (restarts that keep failing);
* a replacement that cannot even be spawned (no file descriptors or memory left)
  is tried again later, with the same growing delay, rather than given up on;
* the watchdog: every worker beats once a second from a thread of its own, with
  how long its work in progress has run. A worker whose beats stop (a frozen
  process) or whose one piece of work outlasts ``stall_timeout_s`` (a hang) is
  killed, and so replaced by the rules above; one that is not restartable (the
  batch job's loader and sink, which hold its ledger) ends the job with the reason,
  rather than leave it hanging for ever: a rerun resumes. When the owner finds that it
  did not run itself for a while (the whole job or daemon was stopped with Ctrl-Z or
  SIGSTOP, or starved), every worker gets a fresh stall timeout instead.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from typing import Sequence

import zmq

from wanwu.errors import StageError
from wanwu.pipeline.config import PipelineConfig
from wanwu.pipeline.topology import transport
from wanwu.pipeline.topology.messages import Event, EventKind, Lost, Stop
from wanwu.pipeline.topology.plan import Plan
from wanwu.pipeline.topology.shm import SlotPool
from wanwu.pipeline.topology.transport import Endpoints, make_job_dir, reclaim_stale_job_dirs
from wanwu.pipeline.workers.base import WorkerSpec, spawn

logger = logging.getLogger(__name__)

RESTARTABLE = frozenset({"decoder", "inference"})  # roles whose death the topology repairs
# The owner looks at least every 0.1 s: a longer pause means it was frozen itself (Ctrl-Z and
# fg, SIGSTOP of the process group, a paused container or VM) or starved of CPU.
OWNER_PAUSE_S = 5.0


@dataclass(frozen=True)
class RestartPolicy:
    """When to restart, and when to give up."""

    max_backoff_s: float = 10.0  # longest wait before restarting a worker that keeps dying
    stable_s: float = 30.0  # a worker that lived this long is restarted without waiting
    max_failed_starts: int = 3  # incarnations in a row that die before ready: give up
    stall_timeout_s: float = 60.0  # no heartbeat, or one piece of work, this long: the worker is stuck
    # Roles restarted beyond decoders and inference: the daemon's camera loader and sink, which keep
    # no ledger. The batch job's loader and sink never are (the ledger lives in them).
    also_restart: frozenset[str] = frozenset()


@dataclass
class Position:
    """One worker position (the inference process, decoder i, the loader, the sink) across its incarnations."""

    spec: WorkerSpec
    can_restart: bool = False  # the topology repairs this position's death
    proc: subprocess.Popen | None = None
    started: float = 0.0  # monotonic, of this incarnation
    ready: bool = False  # this incarnation said it is ready
    ever_ready: bool = False  # some incarnation was
    failed_starts: int = 0  # incarnations in a row that died before ready
    backoff_s: float = 0.0
    restarts: int = 0
    due: float = 0.0  # restart not before this (monotonic)
    fatal: str = ""  # the last failure this position reported
    last_seen: float = 0.0  # monotonic time of its last event (heartbeats included)
    busy_for_s: float = 0.0  # how long its work in progress had run, at its last heartbeat

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def restartable(self) -> bool:
        return self.can_restart

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@dataclass(frozen=True)
class Restart:
    """What ``supervise`` restarted, for the feeder and the metrics."""

    names: tuple[str, ...]  # workers started again
    dead: tuple[tuple[int, int], ...]  # producer incarnations that are gone
    everything: bool  # the inference process died: everything in flight is lost
    generations: tuple[tuple[int, int], ...] = field(default=())  # producers' new incarnation numbers
    stalled: tuple[str, ...] = ()  # workers the watchdog killed since the last restart


class Topology:
    """Owns the workers of one job or daemon. Not thread-safe: one thread drives it.

    Args:
        cfg: the shared settings (every worker gets them).
        plan: the topology's shape (``make_plan``).
        roles: ``(role, index)`` of each worker, in start order.
        policy: restart rules.
    """

    def __init__(self, cfg: PipelineConfig, plan: Plan, roles: Sequence[tuple[str, int]],
                 policy: RestartPolicy = RestartPolicy()) -> None:
        reclaim_stale_job_dirs()
        self.cfg = cfg
        self.plan = plan
        self.roles = tuple(roles)
        self.policy = policy
        self.job_dir = make_job_dir()  # the sockets, and files a front door hands its workers
        self.endpoints = Endpoints(self.job_dir)
        self.ctx = zmq.Context()
        self.pool: SlotPool | None = None
        try:
            if cfg.device.startswith("cuda"):
                from wanwu.pipeline.topology.gpu_pool import open_gpu  # CUDA is imported for GPU jobs only

                self.plan, self.pool = open_gpu(cfg, plan)
            else:
                self.pool = SlotPool.create(plan.frame, plan.n_slots)
            self.events_socket = transport.socket(self.ctx, zmq.PULL, self.endpoints.events, bind=True)
            self._control = transport.socket(self.ctx, zmq.PUB, self.endpoints.control, bind=True)
        except BaseException:
            self.close()
            raise
        self.positions: dict[str, Position] = {}
        self._held_events: list[Event] = []  # read while looking for a dying worker's last words
        self._stalled: list[str] = []  # killed by the watchdog, not yet reported in a Restart
        self.restarts = 0
        self.stalls = 0  # workers the watchdog killed
        self._last_watch = 0.0  # monotonic time of the watchdog's last look
        self._grace_until = 0.0  # no stall verdicts before this (the owner itself was frozen)
        self.spawn_failures = 0  # replacements that could not be spawned (and were tried again later)
        self.stopping = False

    # ---- lifecycle

    def start(self, **spec_fields: object) -> None:
        """Start every worker, in the order of ``roles``.

        Args:
            **spec_fields: extra ``WorkerSpec`` fields every worker gets (the loader's sources
                and ledger).
        """
        assert self.pool is not None
        base = WorkerSpec(role="", index=0, cfg=self.cfg, plan=self.plan, endpoints=self.endpoints,
                          pool_fd=self.pool.fd, **spec_fields)  # type: ignore[arg-type]
        for role, index in self.roles:
            position = Position(dataclasses.replace(base, role=role, index=index),
                                can_restart=role in RESTARTABLE | self.policy.also_restart)
            self.positions[position.name] = position
            self._spawn(position)

    def stop(self, timeout_s: float) -> None:
        """Broadcast stop until every worker has exited; kill those that outstay ``timeout_s``."""
        self.stopping = True
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and any(p.alive() for p in self.positions.values()):
            self.broadcast(Stop())  # repeated: a worker that subscribed late must still hear it
            time.sleep(0.05)
        for position in self.positions.values():
            if position.alive():
                logger.warning("%s did not stop within %.0f s; killing it", position.name, timeout_s)
            self._kill(position)

    def close(self) -> None:
        """Free the shared memory, the sockets and the socket folder (after ``stop``). Safe twice."""
        if self.pool is not None:
            self.pool.close()
            self.pool = None
        self.ctx.destroy(linger=0)
        shutil.rmtree(self.job_dir, ignore_errors=True)

    def broadcast(self, msg: object) -> None:
        """Send a control message to every worker."""
        transport.send(self._control, msg)

    # ---- following the workers

    def ready(self, name: str) -> bool:
        """Whether the current incarnation of ``name`` said it is ready."""
        return self.positions[name].ready

    def all_ready(self) -> bool:
        return all(p.ready for p in self.positions.values())

    def pids(self) -> dict[str, int]:
        """The live workers' process ids, by name."""
        return {n: p.proc.pid for n, p in self.positions.items() if p.proc is not None and p.alive()}

    def poll(self, timeout_ms: float = 0) -> list[Event]:
        """The workers' events, waiting up to ``timeout_ms`` for the first; bookkeeping is updated."""
        events, self._held_events = self._held_events, []
        if not events and timeout_ms > 0:
            self.events_socket.poll(timeout_ms)
        events.extend(self._read_events())
        return events

    def _read_events(self) -> list[Event]:
        events = []
        for event in transport.waiting(self.events_socket):
            position = self.positions.get(event.stage)
            if position is not None and position.proc is not None and event.pid == position.proc.pid:
                position.last_seen = time.monotonic()
                if event.kind is EventKind.ALIVE:
                    position.busy_for_s = event.data.get("busy_for_s", 0.0)
                elif event.kind is EventKind.READY:
                    position.ready = position.ever_ready = True
                    position.failed_starts = 0
                elif event.kind is EventKind.FATAL:
                    position.fatal = f"{event.data['type']}: {event.data['message']}"
                    if event.data.get("expected"):  # the message says it all; the traceback is for debugging
                        logger.error("%s failed: %s", event.stage, position.fatal)
                        logger.debug("%s", event.data.get("traceback", ""))
                    else:  # a bug: its traceback, once
                        logger.error("%s failed:\n%s", event.stage, event.data.get("traceback", ""))
            events.append(event)
        return events

    def supervise(self) -> Restart | None:
        """Restart dead workers whose delay is over; tell the feeder (``Lost``).

        Returns:
            What was restarted now, or None.

        Raises:
            StageError: a worker that is not restarted died, a worker died before it was ever
                ready, or restarts keep failing; the message gives the worker's own reason.
        """
        if self.stopping:
            return None
        now = time.monotonic()
        self._watch(now)
        dead = [p for p in self.positions.values() if p.proc is None or p.proc.poll() is not None]
        for position in dead:
            if position.proc is not None:  # just noticed: judge it once, then schedule
                self._held_events.extend(self._read_events())  # its last words, if any
                self._judge(position, now)
        restarted: list[Position] = []
        for position in dead:
            if now < position.due or position in restarted:
                continue
            group = self._producers() + [position] if position.spec.role == "inference" else [position]
            for member in group:
                if member not in restarted:
                    restarted.append(member)
        if not restarted:
            return None
        return self._restart(restarted)

    def _watch(self, now: float) -> None:
        """The watchdog: kill workers that stopped beating, or hang in one piece of work (a worker that
        cannot be restarted then ends everything, in ``supervise``)."""
        limit = self.policy.stall_timeout_s
        paused = now - self._last_watch if self._last_watch else 0.0
        self._last_watch = now
        if paused > OWNER_PAUSE_S:
            # The workers were most likely frozen with us, and their beats could not arrive while
            # we were: judging their silence (or the work they report, timed across the pause)
            # now would kill every healthy worker. Each gets a full stall timeout from now.
            logger.warning("the supervisor did not run for %.0f s (stopped or starved); the stall clock "
                           "starts again for every worker", paused)
            self._grace_until = now + limit
            for position in self.positions.values():
                position.last_seen = max(position.last_seen, now)
        if now < self._grace_until:
            return
        for position in self.positions.values():
            if not (position.ready and position.alive()):
                continue
            silent = now - position.last_seen
            if silent <= limit and position.busy_for_s <= limit:
                continue
            why = (f"no sign of life for {silent:.0f} s" if silent > limit else
                   f"one piece of work ran {position.busy_for_s:.0f} s")
            logger.error("%s is stuck (%s, stall timeout %.0f s); killing it%s", position.name, why, limit,
                         "" if position.restartable else ", which ends the job (a rerun resumes it)")
            position.fatal = f"stuck: {why}"
            self._kill(position)  # reaped here; supervise notices the death and applies the restart rules
            self.stalls += 1
            self._stalled.append(position.name)

    def _judge(self, position: Position, now: float) -> None:
        """A worker just died: decide whether to restart it, and when."""
        assert position.proc is not None
        code, pid = position.proc.returncode, position.proc.pid
        position.proc = None
        when = "" if position.ready else (" before it was ready" if not position.ever_ready else
                                          " before it was ready again")
        why = f"{position.name}: {position.fatal or 'the process died'} (pid {pid}, exit status {code}{when})"
        if not position.restartable:
            raise StageError(why)
        if not position.ready:
            position.failed_starts += 1
            if not position.ever_ready or position.failed_starts >= self.policy.max_failed_starts:
                raise StageError(why)
        position.ready = False  # dead: not ready until a replacement says it is
        logger.error("%s, generation %d; restarting it", why, position.spec.generation)
        lived = now - position.started
        quick_repeat = lived < self.policy.stable_s and position.restarts > 0
        position.backoff_s = (min(self.policy.max_backoff_s, max(0.5, position.backoff_s * 2))
                              if quick_repeat else 0.0)
        position.due = now + position.backoff_s

    def _producers(self) -> list[Position]:
        return [p for p in self.positions.values() if p.spec.producer >= 0]

    def _restart(self, group: list[Position]) -> Restart:
        everything = any(p.spec.role == "inference" for p in group)
        dead: list[tuple[int, int]] = []
        generations: list[tuple[int, int]] = []
        names = []
        for position in group:
            if position.spec.producer >= 0:
                dead.append((position.spec.producer, position.spec.generation))
                generations.append((position.spec.producer, position.spec.generation + 1))
            position.spec = dataclasses.replace(position.spec, generation=position.spec.generation + 1)
            if position.restartable:  # a frame-writing loader is reset by Lost, not restarted
                self._kill(position)
                position.restarts += 1
                try:
                    self._spawn(position)
                except OSError as exc:  # EMFILE, ENOMEM: try again later, as after a quick death
                    self.spawn_failures += 1
                    position.proc = None
                    position.backoff_s = min(self.policy.max_backoff_s, max(0.5, position.backoff_s * 2))
                    position.due = time.monotonic() + position.backoff_s
                    logger.error("cannot start %s (%s); trying again in %.1f s", position.name, exc,
                                 position.backoff_s)
                    continue
                names.append(position.name)
        self.restarts += len(names)
        stalled, self._stalled = tuple(self._stalled), []
        restart = Restart(tuple(names), tuple(dead), everything, tuple(generations), stalled)
        self.broadcast(Lost(restart.dead, everything, restart.generations))
        return restart

    def _spawn(self, position: Position) -> None:
        position.proc = spawn(position.spec)
        position.started = position.last_seen = time.monotonic()
        position.ready = False
        position.busy_for_s = 0.0
        position.fatal = ""

    @staticmethod
    def _kill(position: Position) -> None:
        """Kill and reap the worker (``proc`` stays set: its exit status tells what happened)."""
        if position.proc is not None:
            if position.proc.poll() is None:
                position.proc.kill()
            position.proc.wait()
