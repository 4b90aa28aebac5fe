"""The daemon's worker processes: start them, restart the ones that die, stop them all.

Restart rules, chosen so that no slot of the shared-memory pool is ever read while
someone writes it:

* a dead decoder is restarted alone, one generation on: it writes the other half
  of its slot range, so images its predecessor handed over stay intact, and the
  inference process ignores messages from older generations once it hears from
  the new one;
* a dead inference process took the release messages of the slots it held with
  it, so it is restarted together with every decoder (each one generation on,
  with a fresh free list).

A worker that keeps dying is restarted with a growing delay (up to
``MAX_BACKOFF_S``) instead of in a tight loop.
"""

from __future__ import annotations

import dataclasses
import logging
import subprocess
import time

import zmq

from wanwu.pipeline.messages import STOP
from wanwu.pipeline.worker import WorkerSpec, spawn

logger = logging.getLogger(__name__)

MAX_BACKOFF_S = 10.0
STABLE_S = 30.0  # a worker that lived this long starts again without delay


@dataclasses.dataclass
class _Slot:
    """One worker position (the inference process, or decoder i) across its incarnations."""

    spec: WorkerSpec
    proc: subprocess.Popen | None = None
    started: float = 0.0
    backoff_s: float = 0.0
    restarts: int = 0
    due: float = 0.0  # restart not before this (monotonic)


class Supervisor:
    """Owns the worker processes of one daemon. Not thread-safe: one thread drives it."""

    def __init__(self, base: WorkerSpec, decoders: int) -> None:
        self.slots: dict[str, _Slot] = {"inference": _Slot(dataclasses.replace(base, role="inference", index=0))}
        for i in range(decoders):
            self.slots[f"decoder-{i}"] = _Slot(dataclasses.replace(base, role="decoder", index=i))
        self.restarts = 0
        self.stopping = False

    def start(self) -> None:
        """Start every worker (inference first: it loads the model, the longest wait)."""
        for slot in self.slots.values():
            self._spawn(slot)

    def generation(self, name: str) -> int:
        return self.slots[name].spec.generation

    def alive(self, name: str) -> bool:
        proc = self.slots[name].proc
        return proc is not None and proc.poll() is None

    def check(self) -> list[str]:
        """Restart dead workers whose delay is over; return the names restarted now.

        The inference process's death restarts every decoder too (see the module doc).
        """
        if self.stopping:
            return []
        now = time.monotonic()
        dead = [name for name, slot in self.slots.items() if slot.proc is None or slot.proc.poll() is not None]
        for name in dead:
            slot = self.slots[name]
            if slot.proc is not None:  # just noticed: log once and schedule
                code = slot.proc.returncode
                logger.error("%s (pid %d, generation %d) died with status %s", name, slot.proc.pid,
                             slot.spec.generation, code)
                slot.proc = None
                lived = now - slot.started
                # The first death, or one after a long life, is restarted at once; quick repeats wait.
                quick_repeat = lived < STABLE_S and slot.restarts > 0
                slot.backoff_s = min(MAX_BACKOFF_S, max(0.5, slot.backoff_s * 2)) if quick_repeat else 0.0
                slot.due = now + slot.backoff_s
        restarted: list[str] = []
        for name in dead:
            slot = self.slots[name]
            if now < slot.due:
                continue
            names = list(self.slots) if name == "inference" else [name]
            for other in names:
                if other in restarted:
                    continue
                self._kill(self.slots[other])
                self._spawn(self.slots[other], next_generation=True)
                restarted.append(other)
        self.restarts += len(restarted)
        return restarted

    def stop(self, control: zmq.Socket, timeout_s: float) -> None:
        """Broadcast stop until every worker has exited; kill those that outstay ``timeout_s``."""
        self.stopping = True
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and any(self.alive(n) for n in self.slots):
            control.send(STOP)  # repeated: a worker that subscribed late must still hear it
            time.sleep(0.05)
        for name, slot in self.slots.items():
            if self.alive(name):
                logger.warning("%s did not stop within %.0f s; killing it", name, timeout_s)
            self._kill(slot)

    def _spawn(self, slot: _Slot, next_generation: bool = False) -> None:
        if next_generation:
            slot.spec = dataclasses.replace(slot.spec, generation=slot.spec.generation + 1)
            slot.restarts += 1
        slot.proc = spawn(slot.spec)
        slot.started = time.monotonic()

    @staticmethod
    def _kill(slot: _Slot) -> None:
        if slot.proc is not None:
            if slot.proc.poll() is None:
                slot.proc.kill()
            slot.proc.wait()
