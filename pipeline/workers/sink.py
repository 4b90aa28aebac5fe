"""The sink process: write records, count them, and say when every input has one.

Its only input is the feeder (the loader), which forwards exactly one record per
input and then ``End``: so the job is finished exactly when ``End`` arrives, all
records before it written.
"""

from __future__ import annotations

import logging
import time

import zmq

from wanwu.pipeline.topology import transport
from wanwu.pipeline.topology.messages import End, EventKind, Records, ScanDone
from wanwu.pipeline.workers.base import Worker
from wanwu.records import Record
from wanwu.stages.sinks.base import create_sink

logger = logging.getLogger(__name__)

PROGRESS_INTERVAL_S = 0.25


class SinkWorker(Worker):
    """Writes what the feeder forwards and reports progress; see the module docstring."""

    def _setup(self) -> None:
        self.records = transport.socket(self.ctx, zmq.PULL, self.spec.endpoints.records, bind=True)
        self.sink = create_sink(self.spec.out)
        # An endless source's output is a log, not a resume ledger: no set of its keys in memory.
        self.sink.open(ledger=not any(s.endless for s in self.spec.sources))
        self.ok = 0
        self.errors = 0
        self.total: int | None = None
        self.end: End | None = None

    def _drain(self) -> list[Record]:
        """Every record waiting on the socket (noting ScanDone and End on the way)."""
        batch: list[Record] = []
        for msg in transport.waiting(self.records):
            if isinstance(msg, Records):
                batch.extend(msg.records)
            elif isinstance(msg, ScanDone):
                self.total = msg.total
            elif isinstance(msg, End):
                self.end = msg  # nothing follows it
                break
        return batch

    def _write(self, batch: list[Record]) -> None:
        with self.busy():
            self.sink.write(batch)
        n_err = sum(1 for r in batch if r.error is not None)
        self.errors += n_err
        self.ok += len(batch) - n_err
        self.items += len(batch)

    def _loop(self) -> None:
        last_progress = 0.0
        reported: tuple = ()
        while not self.stopped():
            batch = self._drain() if self.end is None and self.records.poll(100) else []
            if batch:
                self._write(batch)
            if self.end is not None:
                self.emit(EventKind.DONE, ok=self.ok, errors=self.errors, total=self.total,
                          complete=self.end.complete)
                self.wait_for_stop()
                return
            counts = (self.ok, self.errors, self.total)
            now = time.perf_counter()
            if counts != reported and now - last_progress >= PROGRESS_INTERVAL_S:
                self.emit(EventKind.PROGRESS, ok=self.ok, errors=self.errors, total=self.total)
                reported, last_progress = counts, now

    def _shutdown(self) -> None:
        if hasattr(self, "sink"):
            # On an early stop, keep what already arrived: less to redo on resume.
            batch = self._drain()
            if batch:
                self._write(batch)
            self.sink.shutdown()
