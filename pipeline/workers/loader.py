"""The loader process: the batch job's feeder.

It enumerates the inputs, skips those already in the output, and feeds the
rest into the topology: encoded bytes to the decoders over a PUSH socket with a
small high-water mark (so it runs only as far ahead as they can take), frames
of a frame source straight into the slots it owns. Every record comes back
here first: the loader keeps the ledger of inputs in flight (``InFlight``),
sends again what a dead worker held, forwards exactly one record per input to
the sink, and ends the stream with ``End`` once nothing is in flight.

``Drain`` (Ctrl-C, SIGTERM) stops taking new inputs; the loader still waits for
every input in flight, so every input that entered has its record.

With a result cache, the bytes are hashed here, where they are first read: an
image answered before becomes its record at once and never takes a decoder
slot; the answers of the others are kept as their records come back. An image
whose twin (the same bytes under another name) is still in flight waits for the
twin's answer instead of being decoded again.
"""

from __future__ import annotations

import logging
import pickle
import time
from dataclasses import dataclass, field, replace
from typing import Iterator

import zmq

from wanwu.errors import ReadError, StageError
from wanwu.pipeline.topology import transport
from wanwu.pipeline.topology.inflight import Entry, InFlight
from wanwu.pipeline.topology.messages import (Decoded, Drain, End, EventKind, Lost, Records, Results, ScanDone, Taken,
                                              WorkItem)
from wanwu.pipeline.workers.base import Worker
from wanwu.pipeline.workers.frames import FrameReading
from wanwu.pipeline.workers.slots import ProducerSlots
from wanwu.records import Record
from wanwu.stages.cache import digest
from wanwu.stages.decoders.base import max_encoded_bytes
from wanwu.stages.models.base import get_model_spec
from wanwu.stages.sources.base import FrameFailure, FrameInfo, FrameSource, SourceItem, job_key

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Frame:
    """What the loader keeps of a frame in flight: its place in its stream, for its record."""

    meta: dict | None


@dataclass
class _Content:
    """What the cache needs to know of an input in flight: its content, and its twins waiting on it."""

    digest: bytes
    twins: list[tuple[str, str, float]] = field(default_factory=list)  # (key, source, t0) of the same bytes


# Encoded images queued per decoder: enough to hide read latency, small enough
# to bound memory (a few 12-megapixel JPEGs at most).
WORK_HWM = 4
STREAMS_REPORT_S = 1.0  # between reports of the streams' counters
FRAME_POLL_MS = 5  # while frame sources are read: how long the sockets are watched before looking for frames


class LoaderWorker(Worker):
    """The batch job's feeder; see the module docstring."""

    def _setup(self) -> None:
        ep = self.spec.endpoints
        self.sources = list(self.spec.sources)
        self.inputs: tuple[str, ...] = self.spec.inputs
        self.max_bytes = max_encoded_bytes(self.spec.cfg.max_pixels)  # a larger input is refused unread
        self.results = transport.socket(self.ctx, zmq.PULL, ep.frame_results if self.plan.frames_apart else ep.results,
                                        bind=True)
        self.records = transport.socket(self.ctx, zmq.PUSH, ep.records, bind=False)
        # Beside the daemon's doors (frames_apart) the dispatcher feeds the decoders, and binding
        # the work address here too would take it over: ZeroMQ lets a second bind of an ipc path
        # replace the first, so decoders connecting afterwards would wait on a feeder of camera
        # frames, which sends them nothing, and the doors' requests would time out.
        feeds_decoders = self.plan.decoders and not self.plan.frames_apart
        self.work = transport.socket(self.ctx, zmq.PUSH, ep.work, bind=True, hwm=WORK_HWM) if feeds_decoders else None
        self.producer = self.spec.producer  # >= 0 when a frame source is among the inputs
        if self.producer >= 0:
            self.release = transport.socket(self.ctx, zmq.PULL, ep.release(self.producer), bind=True)
            self.decoded = transport.socket(self.ctx, zmq.PUSH, ep.decoded, bind=False)
            self.slots = ProducerSlots(self.plan, self.producer, self.spec.generation)
        with open(self.spec.done_keys_path, "rb") as f:
            self.done: set[str] = pickle.load(f)
        self.inflight = InFlight()
        self.cache = self.cfg.open_cache(get_model_spec(self.cfg.model, **self.cfg.model_options()))
        self.in_flight_content: dict[bytes, _Content] = {}  # digest -> the one input of that content in flight
        self.scan = self._scan()
        self.next_item: tuple[int, SourceItem, str] | None = None  # read from the scan, not yet sent
        self.frames = FrameReading(self.inputs, len(self.sources) > 1)  # the frame sources being read, together
        self.scanned = self.exhausted = self.draining = False
        self.emitted = 0

    # ---- the inputs

    def _scan(self) -> Iterator[tuple[int, SourceItem, str] | tuple[int, FrameSource]]:
        """Every byte input with its job-wide key; a frame source as itself, to be read frame by frame
        alongside the other frame sources and the byte inputs (a camera does not wait for another)."""
        several = len(self.sources) > 1
        for index, (location, source) in enumerate(zip(self.inputs, self.sources)):
            if isinstance(source, FrameSource):
                yield index, source
                continue
            for item in source.scan():
                key = job_key(location, item.key, several)
                if key not in self.done:
                    yield index, item, key

    # ---- the loop

    def _loop(self) -> None:
        next_report = time.monotonic() + STREAMS_REPORT_S
        while not self.stopped():
            if self.frames and time.monotonic() >= next_report:  # live figures, for the daemon's /metrics
                self.emit(EventKind.STREAMS, streams=self.frames.stats())
                next_report = time.monotonic() + STREAMS_REPORT_S
            if self.producer >= 0:
                self.slots.take_releases(self.release)
            self._take_results()
            self._fail(self.inflight.sweep(time.monotonic()))
            progressed = self._feed()
            if (self.exhausted or self.draining) and not self.inflight:
                endless = any(s.endless for s in self.sources)
                transport.send(self.records, End(complete=self.exhausted or endless))
                logger.info("end: %d inputs fed%s", self.emitted, "" if self.exhausted else " (drained early)")
                self.wait_for_stop()
                return
            if not progressed:
                self._wait()

    def _on_control(self, msg: object) -> None:
        if isinstance(msg, Drain):
            self.draining = True
        elif isinstance(msg, Lost):
            failed = self.inflight.lost(set(msg.dead), msg.everything, time.monotonic())
            for producer, generation in msg.generations:
                if producer == self.producer:  # the inference process died with our slots' releases
                    self.slots.reset(generation)
            self._fail(failed)

    def _wait(self) -> None:
        """Sleep until a socket has something for us (or a frame source may have a frame)."""
        poller = zmq.Poller()
        for sock in (self.results, self.control) + ((self.release,) if self.producer >= 0 else ()):
            poller.register(sock, zmq.POLLIN)
        if self.work is not None and self._wants_decoder():
            poller.register(self.work, zmq.POLLOUT)
        reading_frames = bool(self.frames) and bool(self.slots) and not self.draining
        poller.poll(FRAME_POLL_MS if reading_frames else 100)

    def _wants_decoder(self) -> bool:
        return self.inflight.has_outbox() or not (self.draining or self.exhausted or self.scanned)

    def _writable(self) -> bool:
        return self.work is not None and bool(self.work.get(zmq.EVENTS) & zmq.POLLOUT)

    def _feed(self) -> bool:
        """Send what can be sent without blocking: inputs sent again first, then new ones."""
        progressed = False
        while self.inflight.has_outbox() and self._writable():
            entry = self.inflight.peek()
            assert entry is not None
            index, item = entry.payload
            try:
                with self.busy():
                    data = self.sources[index].read(item, self.max_bytes)
            except ReadError as exc:
                self.inflight.complete(entry.ticket)
                self._forward([Record.failure(entry.key, entry.source, self.plan.model_name, exc, entry.t0)])
                continue
            self._send_work(entry, data)
            progressed = True
        if self.draining or self.exhausted or self.inflight.has_outbox():
            return progressed
        if self.frames and self.slots:
            progressed |= self.frames.read_round(self)
        while not self.scanned and not self.inflight.has_outbox():
            if self.next_item is None:
                nxt = next(self.scan, None)
                if nxt is None:
                    self.scanned = True
                    break
                if isinstance(nxt[1], FrameSource):
                    self.frames.add(*nxt)  # type: ignore[misc]
                    progressed = True
                    continue
                self.next_item = nxt  # type: ignore[assignment]
            if not self._writable():
                break
            self._read_and_send(*self.next_item)  # type: ignore[misc]
            self.next_item = None
            progressed = True
        if self.scanned and not self.frames:
            self._exhaust()
        return progressed

    def _exhaust(self) -> None:
        self.exhausted = True
        transport.send(self.records, ScanDone(self.emitted))

    def _read_and_send(self, index: int, item: SourceItem, key: str) -> None:
        t0 = time.time()
        self.emitted += 1
        self.items = self.emitted
        try:
            with self.busy():
                data = self.sources[index].read(item, self.max_bytes)  # ReadError: missing, empty, too large
        except ReadError as exc:
            self._forward([Record.failure(key, item.source, self.plan.model_name, exc, t0)])
            return
        content = None
        if self.cache is not None:
            content = _Content(digest(data))
            twin = self.in_flight_content.get(content.digest)
            if twin is not None:  # the same bytes are in flight under another name: share their answer
                twin.twins.append((key, item.source, t0))
                self.cache.shared()
                return
            answer = self.cache.get(content.digest)
            if answer is not None:  # seen before, under whatever name: answered without decoding
                self._forward([self.cache.record(answer, key, item.source, t0)])
                return
            self.in_flight_content[content.digest] = content
        self._send_work(self.inflight.add(key, item.source, t0, payload=(index, item), context=content), data)

    def _send_work(self, entry: Entry, data: bytes | memoryview) -> None:
        assert self.work is not None
        transport.send(self.work, WorkItem(entry.ticket, entry.key, entry.source, entry.t0, entry.attempts), data,
                       zmq.NOBLOCK)  # POLLOUT was checked: this cannot block
        self.inflight.sent(entry, time.monotonic())

    def send_frame(self, slot: int, key: str, source: str, info: FrameInfo) -> None:
        """Hand a frame written into ``slot`` to inference (``FrameReading`` calls this)."""
        self.emitted += 1
        self.items = self.emitted
        entry = self.inflight.add(key, source, time.time(), queue=False, context=_Frame(info.meta))
        self.inflight.sent(entry, time.monotonic(), holder=(self.producer, self.slots.generation))
        transport.send(self.decoded, Decoded(entry.ticket, key, source, slot, info.width, info.height, entry.t0,
                                             self.producer, self.slots.generation))

    def fail_frame(self, key: str, failure: FrameFailure) -> None:
        """The error record of a frame (or a stream) a frame source could not read."""
        self.emitted += 1
        self.items = self.emitted
        self._forward([Record.failure(key, failure.source, self.plan.model_name, failure.error, time.time())])

    # ---- what comes back

    def _take_results(self) -> None:
        for msg in transport.waiting(self.results):
            if isinstance(msg, Taken):
                self.inflight.taken(msg.tickets, (msg.producer, msg.generation))
            elif isinstance(msg, Results):
                done = [(entry, r) for entry, r in ((self.inflight.complete(t), r)
                                                    for t, r in zip(msg.tickets, msg.records)) if entry is not None]
                for e, r in done:
                    if isinstance(e.context, _Frame) and r.error is None:
                        self.frames.recognised[r.source] += 1
                self._forward([replace(r, frame=e.context.meta) if isinstance(e.context, _Frame) else r
                               for e, r in done] + self._twins_of(done))
                if self.cache is not None:
                    self.cache.put([(entry.context.digest, r) for entry, r in done
                                    if isinstance(entry.context, _Content)])

    def _twins_of(self, done: list[tuple[Entry, Record]]) -> list[Record]:
        """The records of the twins that waited on these inputs: the same answer under their own names."""
        records = []
        for entry, record in done:
            content = entry.context
            if not isinstance(content, _Content):
                continue
            self.in_flight_content.pop(content.digest, None)
            records += [record.shared_with(key, source, t0) for key, source, t0 in content.twins]
        return records

    def _fail(self, entries: list[Entry]) -> None:
        """Error records for inputs whose workers died with them once too often (and for their twins)."""
        done = []
        for entry in entries:
            why = ("the worker process holding this input died twice" if entry.payload is not None else
                   "the inference process died while this frame was in flight (a frame cannot be read again)")
            done.append((entry, Record.failure(entry.key, entry.source, self.plan.model_name, StageError(why),
                                               entry.t0)))
        self._forward([r for _, r in done] + self._twins_of(done))

    def _forward(self, records: list[Record]) -> None:
        if records:
            transport.send(self.records, Records(tuple(records)))

    def _final_stats(self) -> dict:
        cache = getattr(self, "cache", None)
        stats = {"cache": cache.counts.as_dict()} if cache is not None else {}
        streams = self.frames.stats() if hasattr(self, "frames") else {}
        return {**stats, "streams": streams} if streams else stats

    def _shutdown(self) -> None:
        for source in getattr(self, "sources", []):
            source.shutdown()
        if getattr(self, "cache", None) is not None:
            self.cache.shutdown()
