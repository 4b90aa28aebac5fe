"""The loader process: enumerate inputs, skip those already done, read their bytes.

Bytes go to the decoders over a PUSH socket with a small high-water mark, so the
loader runs only as far ahead as the decoders can take. Inputs that cannot be
read become error records sent straight to the sink.
"""

from __future__ import annotations

import logging
import pickle
import time
from typing import Iterator

import zmq

from wanwu.errors import ReadError
from wanwu.pipeline import transport
from wanwu.pipeline.messages import Records, ScanDone, WorkItem
from wanwu.pipeline.records import error_record
from wanwu.pipeline.worker import Worker
from wanwu.stages.sources.base import Source, SourceItem, job_key, open_source

logger = logging.getLogger(__name__)

# Encoded images queued per decoder: enough to hide read latency, small enough
# to bound memory (a few 12-megapixel JPEGs at most).
WORK_HWM = 4


class LoaderWorker(Worker):
    stage = "loader"
    uses_pool = False

    def _setup(self) -> None:
        self.work = transport.socket(self.ctx, zmq.PUSH, self.spec.endpoints.work, bind=True, hwm=WORK_HWM)
        self.records = transport.socket(self.ctx, zmq.PUSH, self.spec.endpoints.records, bind=False)
        with open(self.spec.done_keys_path, "rb") as f:
            self.done: set[str] = pickle.load(f)
        self.sources: list[Source] = [open_source(loc) for loc in self.job.inputs]

    def _items(self) -> Iterator[tuple[Source, SourceItem, str]]:
        """Every input with its job-wide key; keys get the input as prefix when several are given."""
        several = len(self.sources) > 1
        for location, source in zip(self.job.inputs, self.sources):
            for item in source.scan():
                yield source, item, job_key(location, item, several)

    def _loop(self) -> None:
        if self.job.hold_until_ready:
            while not (self.stopped() or self.go):
                self.control.poll(50)
        emitted = 0
        seen: set[str] = set()
        for source, item, key in self._items():
            if key in self.done or key in seen:
                continue
            seen.add(key)
            t0 = time.time()
            try:
                with self.busy():
                    data = source.read(item)  # raises ReadError for missing or empty inputs
            except ReadError as exc:
                rec = error_record(key, item.source, self.spec.model, exc, t0)
                transport.send(self.records, Records((rec,)))
            else:
                if not self._send_work(WorkItem(key, item.source, t0), data):
                    return
            emitted += 1
            self.items = emitted
        transport.send(self.records, ScanDone(emitted))
        logger.info("scan done: %d inputs to process", emitted)
        self.wait_for_stop()

    def _send_work(self, item: WorkItem, data: bytes) -> bool:
        """Block until a decoder takes the item; False if the job is stopping."""
        while not self.stopped():
            if self.work.poll(100, zmq.POLLOUT):
                transport.send(self.work, item, data)
                return True
        return False

    def _shutdown(self) -> None:
        for source in getattr(self, "sources", []):
            source.shutdown()
