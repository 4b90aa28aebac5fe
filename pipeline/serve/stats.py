"""Serving counters in the shape of Triton's statistics extension, for any ``Backend``.

A backend calls ``add_request`` once per request and ``add_execution`` once per
engine call; ``snapshot()`` is what ``Backend.stats()`` returns and what the
KServe front door wraps into ``/v2/models/{model}/stats``.
"""

from __future__ import annotations

import logging
import threading
import time

logger = logging.getLogger(__name__)

_DURATIONS = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output", "cache_hit",
              "cache_miss")


class ServeStats:
    """Counters in the shape of Triton's statistics extension (one ``$model_stat`` less name/version).

    Requests count once in ``success`` or ``fail`` with their whole duration;
    ``queue`` is time spent waiting for the engine, ``compute_input`` decoding and
    gathering, ``compute_infer`` the engine, ``compute_output`` top-k and records.
    ``inference_count`` counts images recognised, ``execution_count`` engine calls.
    Thread-safe.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._durations = {name: [0, 0] for name in _DURATIONS}  # name -> [count, ns]
        self._batches: dict[int, dict[str, list[int]]] = {}  # batch size -> compute_* -> [count, ns]
        self._inferences = 0
        self._executions = 0
        self._last_inference_ms = 0

    def add_request(self, ok: bool, total_ns: int, phases_ns: dict[str, int]) -> None:
        """Count one finished request; ``phases_ns`` maps queue/compute_* names to ns."""
        with self._lock:
            self._add("success" if ok else "fail", total_ns)
            if ok:  # Triton counts phases of successful requests only
                for name, ns in phases_ns.items():
                    self._add(name, ns)

    def add_execution(self, batch_size: int, phases_ns: dict[str, int]) -> None:
        """Count one engine call of ``batch_size`` images."""
        with self._lock:
            self._inferences += batch_size
            self._executions += 1
            self._last_inference_ms = int(time.time() * 1000)
            per_size = self._batches.setdefault(batch_size, {})
            for name, ns in phases_ns.items():
                count_ns = per_size.setdefault(name, [0, 0])
                count_ns[0] += 1
                count_ns[1] += int(ns)

    def snapshot(self) -> dict:
        """A JSON-ready copy: ``last_inference`` (ms since the epoch), counts, ``inference_stats``,
        ``batch_stats``."""
        with self._lock:
            return {
                "last_inference": self._last_inference_ms,
                "inference_count": self._inferences,
                "execution_count": self._executions,
                "inference_stats": {name: {"count": c, "ns": ns} for name, (c, ns) in self._durations.items()},
                "batch_stats": [
                    {"batch_size": size, **{name: {"count": c, "ns": ns} for name, (c, ns) in phases.items()}}
                    for size, phases in sorted(self._batches.items())
                ],
            }

    def _add(self, name: str, ns: int) -> None:
        self._durations[name][0] += 1
        self._durations[name][1] += int(ns)
