"""A decoder process: bytes in, pixels into the slots it owns, headers out.

Backpressure is explicit: the decoder asks for work only while it holds a free
slot, and a slot comes back only when the inference process has copied it out.
So memory stays bounded whatever the job size.
"""

from __future__ import annotations

import logging
from collections import deque

import zmq

from wanwu.errors import InputError
from wanwu.pipeline import transport
from wanwu.pipeline.messages import Decoded, Records, Release, WorkItem
from wanwu.pipeline.records import error_record
from wanwu.pipeline.worker import Worker
from wanwu.stages.decoders.base import DecodeConfig, create_decoder

logger = logging.getLogger(__name__)


class DecoderWorker(Worker):
    stage = "decoder"

    def _setup(self) -> None:
        ep = self.spec.endpoints
        self.mine = self.job.slot_range(self.spec.index, self.spec.generation)
        self.free: deque[int] = deque(self.mine)
        self.work = transport.socket(self.ctx, zmq.PULL, ep.work, bind=False, hwm=2)
        self.release = transport.socket(self.ctx, zmq.PULL, ep.release(self.spec.index), bind=True)
        self.decoded = transport.socket(self.ctx, zmq.PUSH, ep.decoded, bind=False)
        self.records = transport.socket(self.ctx, zmq.PUSH, ep.records, bind=False)
        cfg = DecodeConfig(self.spec.preprocess, self.job.max_pixels, self.job.device)
        self.decoder = create_decoder(self.job.decoder, cfg)

    def _loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self.release, zmq.POLLIN)
        poller.register(self.control, zmq.POLLIN)
        while not self.stopped():
            self._take_releases()
            if self.free:
                poller.register(self.work, zmq.POLLIN)
            ready = dict(poller.poll(200))
            if self.free:
                poller.unregister(self.work)
            if ready.get(self.work):
                self._decode_available()

    def _take_releases(self) -> None:
        while True:
            try:
                msg, _ = transport.recv(self.release, zmq.NOBLOCK)
            except zmq.Again:
                return
            assert isinstance(msg, Release)
            # A predecessor's slots may still come back after a restart: not ours to reuse.
            self.free.extend(s for s in msg.slots if s in self.mine)

    def _decode_available(self) -> None:
        """Decode as many queued items as there are free slots, as one batch."""
        items: list[tuple[WorkItem, zmq.Frame]] = []
        while len(items) < len(self.free):
            try:
                msg, payload = transport.recv(self.work, zmq.NOBLOCK)
            except zmq.Again:
                break
            items.append((msg, payload))
        if not items:
            return
        if self.job.restartable:  # the daemon retries only what a dead decoder held
            self.emit("taken", keys=[item.key for item, _ in items], generation=self.spec.generation)
        slots = [self.free.popleft() for _ in items]
        assert self.pool is not None
        with self.busy():
            results = self.decoder.decode_batch_into(
                [payload.buffer for _, payload in items], [self.pool.frame(s) for s in slots]
            )
        errors = []
        for (item, _), slot, result in zip(items, slots, results):
            if isinstance(result, InputError):
                self.free.append(slot)
                errors.append(error_record(item.key, item.source, self.spec.model, result, item.t0))
            else:
                transport.send(self.decoded, Decoded(item.key, item.source, slot, result.width, result.height,
                                                     item.t0, self.spec.index, self.spec.generation))
        if errors:
            transport.send(self.records, Records(tuple(errors)))
        self.items += len(items)

    def _shutdown(self) -> None:
        if hasattr(self, "decoder"):
            self.decoder.shutdown()
