"""The sink process: write records, count them, and say when every input has one.

The job is finished exactly when the number of records written this run equals
the number of inputs the loader emitted (``ScanDone``): one global condition,
whichever stage produced each record.
"""

from __future__ import annotations

import logging
import time

import zmq

from wanwu.pipeline import transport
from wanwu.pipeline.messages import Records, ScanDone
from wanwu.pipeline.worker import Worker
from wanwu.stages.sinks.base import create_sink

logger = logging.getLogger(__name__)

PROGRESS_INTERVAL_S = 0.25


class SinkWorker(Worker):
    stage = "sink"
    uses_pool = False

    def _setup(self) -> None:
        self.records = transport.socket(self.ctx, zmq.PULL, self.spec.endpoints.records, bind=True)
        self.sink = create_sink(self.job.out)
        self.sink.open()
        self.ok = 0
        self.errors = 0
        self.expected: int | None = None

    def _drain(self) -> list[dict]:
        """Every record waiting on the socket (noting ScanDone on the way)."""
        batch: list[dict] = []
        while True:
            try:
                msg, _ = transport.recv(self.records, zmq.NOBLOCK)
            except zmq.Again:
                return batch
            if isinstance(msg, Records):
                batch.extend(msg.records)
            elif isinstance(msg, ScanDone):
                self.expected = msg.total

    def _write(self, batch: list[dict]) -> None:
        with self.busy():
            self.sink.write(batch)
        n_err = sum(1 for r in batch if r["error"] is not None)
        self.errors += n_err
        self.ok += len(batch) - n_err
        self.items += len(batch)

    def _loop(self) -> None:
        last_progress = 0.0
        reported: tuple = ()
        finished = False
        while not self.stopped():
            batch = self._drain() if self.records.poll(100) else []
            if batch:
                self._write(batch)
            if finished:
                continue  # everything is written; wait for the owner's stop
            finished = self.expected is not None and self.items >= self.expected
            counts = (self.ok, self.errors, self.expected)
            now = time.perf_counter()
            if finished:
                self.emit("done", ok=self.ok, errors=self.errors, total=self.expected)
            elif counts != reported and now - last_progress >= PROGRESS_INTERVAL_S:
                self.emit("progress", ok=self.ok, errors=self.errors, total=self.expected)
                reported, last_progress = counts, now

    def _shutdown(self) -> None:
        if hasattr(self, "sink"):
            # On an early stop (Ctrl-C), keep what already arrived: less to redo on resume.
            batch = self._drain()
            if batch:
                self._write(batch)
            self.sink.close()
