"""``wanwu run`` timed from the moment its model is loaded, through the product's Python API.

The benchmark compares rates with start-up (model load) excluded everywhere. For
wanwu that means reading no input before every worker is ready: each input is
wrapped in a ``GatedSource`` whose scan waits for a gate file, which this module
creates once the job reports that every worker is ready. The job itself runs
exactly as ``wanwu run`` runs it; only its inputs wait.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any, Iterator

from wanwu.stages.sources.base import Source, SourceItem, open_byte_source

GATE_POLL_S = 0.005


class GatedSource(Source):
    """A byte source whose scan starts only once ``gate`` (a file) exists."""

    kind = "gated"

    def __init__(self, inner: Source, gate: str) -> None:
        super().__init__(inner.location)
        self.inner = inner
        self.gate = gate

    def scan(self) -> Iterator[SourceItem]:
        while not os.path.exists(self.gate):
            time.sleep(GATE_POLL_S)
        yield from self.inner.scan()

    def read(self, item: SourceItem, max_bytes: int | None = None) -> bytes | memoryview:
        return self.inner.read(item, max_bytes)

    def _shutdown(self) -> None:
        self.inner.shutdown()


def timed_run(inputs: list[str], out: str, options: dict[str, Any]) -> dict[str, Any]:
    """Run the job on ``inputs``; return its stats and ``rate``, images/s from the gate's opening."""
    from wanwu.pipeline.config import JobConfig
    from wanwu.pipeline.run.job import Job

    gate = f"{out}.gate"
    if os.path.exists(gate):
        os.unlink(gate)
    cfg = JobConfig(inputs=tuple(inputs), out=out, progress="none", **options)
    job = Job(cfg, [GatedSource(open_byte_source(loc), gate) for loc in inputs])
    opened: list[float] = []

    def open_when_ready() -> None:
        while job.result.ready_s is None and job.result.status != "finished" and not job.result.failure:
            time.sleep(GATE_POLL_S)
        opened.append(time.perf_counter())
        open(gate, "w").close()

    opener = threading.Thread(target=open_when_ready, daemon=True)
    opener.start()
    result = job.run()  # in the main thread: the job installs signal handlers
    opener.join(5)
    if os.path.exists(gate):
        os.unlink(gate)
    if result.status != "finished" or not opened:
        raise RuntimeError(f"the job did not finish: {result.status}: {result.failure}")
    window = job.started_at + result.elapsed_s - opened[0]
    stats = result.to_dict()
    stats["rate"] = (result.ok + result.errors) / window if window > 0 else 0.0
    return stats
