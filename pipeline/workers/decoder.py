"""A decoder process: bytes in, pixels into the slots it owns, headers out.

Backpressure is explicit: the decoder asks for work only while it holds a free
slot, and a slot comes back only when the inference process has copied it out.
So memory stays bounded whatever the job size.

Before decoding, it tells the feeder which inputs it holds (``Taken``), so its
death re-sends exactly those. An input sent again after a death is decoded in a
batch of its own: if it kills this decoder too, it alone is blamed.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Iterator

import zmq

from wanwu.errors import InputError
from wanwu.records import Record
from wanwu.pipeline.topology import transport
from wanwu.pipeline.topology.messages import Decoded, Results, Taken, WorkItem
from wanwu.pipeline.workers.base import Worker
from wanwu.pipeline.workers.slots import ProducerSlots
from wanwu.stages.decoders.base import DecodeConfig, create_decoder

logger = logging.getLogger(__name__)

Item = tuple[WorkItem, zmq.Frame]
# Images per decode call: enough for DALI's batching, few enough that even a chunk of
# images at the pixel limit (seconds each) finishes well within the watchdog's stall timeout.
DECODE_CHUNK = 8


class DecoderWorker(Worker):
    """Decodes work items into the slots it owns; see the module docstring."""

    def _setup(self) -> None:
        ep = self.spec.endpoints
        self.producer = self.spec.producer
        self.slots = ProducerSlots(self.plan, self.producer, self.spec.generation)
        self.work = transport.socket(self.ctx, zmq.PULL, ep.work, bind=False, hwm=2)
        self.release = transport.socket(self.ctx, zmq.PULL, ep.release(self.producer), bind=True)
        self.decoded = transport.socket(self.ctx, zmq.PUSH, ep.decoded, bind=False)
        self.results = transport.socket(self.ctx, zmq.PUSH, ep.results, bind=False)
        self.decoder = create_decoder(*self._decoder_settings())

    def _decoder_settings(self) -> tuple[str, DecodeConfig]:
        """The decoder and its settings; a GPU plan adds DALI's mixed options and where frames go."""
        cfg, gpu = self.cfg.decode_config(self.plan.preprocess), self.plan.gpu
        if gpu is None:
            return self.cfg.decoder, cfg
        if gpu.decode.mixed is not None:
            mixed = dataclasses.replace(gpu.decode.mixed, device_output=gpu.pool.placement == "device")
            cfg = dataclasses.replace(cfg, mixed=mixed)
        return gpu.decode.decoder, cfg

    def _loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self.release, zmq.POLLIN)
        poller.register(self.control, zmq.POLLIN)
        while not self.stopped():
            self.slots.take_releases(self.release)
            free = bool(self.slots)
            if free:
                poller.register(self.work, zmq.POLLIN)
            ready = dict(poller.poll(200))
            if free:
                poller.unregister(self.work)
            if ready.get(self.work):
                self._decode_available()

    def _decode_available(self) -> None:
        """Decode as many queued items as there are free slots: first attempts as one batch,
        items sent again one by one."""
        items: list[Item] = []
        while len(items) < len(self.slots):
            try:
                msg, payload = transport.recv(self.work, zmq.NOBLOCK)
            except zmq.Again:
                break
            items.append((msg, payload))
        for group in _groups(items):
            self._decode_group(group)
        self.items += len(items)

    def _decode_group(self, group: list[Item]) -> None:
        transport.send(self.results, Taken(tuple(item.ticket for item, _ in group), self.producer,
                                           self.spec.generation))
        slots = [self.slots.take() for _ in group]
        assert self.pool is not None
        datas, frames = [payload.buffer for _, payload in group], [self.pool.frame(s) for s in slots]
        outcomes = []
        for start in range(0, len(group), DECODE_CHUNK):
            with self.busy():  # one span per chunk: the watchdog's unit of work stays short
                outcomes += self.decoder.decode_batch_into(datas[start:start + DECODE_CHUNK],
                                                           frames[start:start + DECODE_CHUNK])
        tickets, errors = [], []
        for (item, _), slot, outcome in zip(group, slots, outcomes):
            if isinstance(outcome, InputError):
                self.slots.give_back(slot)
                tickets.append(item.ticket)
                errors.append(Record.failure(item.key, item.source, self.plan.model_name, outcome, item.t0))
            else:
                transport.send(self.decoded, Decoded(item.ticket, item.key, item.source, slot, outcome.width,
                                                     outcome.height, item.t0, self.producer, self.spec.generation))
        if errors:
            transport.send(self.results, Results(tuple(tickets), tuple(errors)))

    def _shutdown(self) -> None:
        if hasattr(self, "decoder"):
            self.decoder.shutdown()


def _groups(items: list[Item]) -> Iterator[list[Item]]:
    """Consecutive first attempts together; each item sent again alone."""
    batch: list[Item] = []
    for item in items:
        if item[0].attempt > 1:
            if batch:
                yield batch
                batch = []
            yield [item]
        else:
            batch.append(item)
    if batch:
        yield batch
