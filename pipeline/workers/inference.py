"""The inference process: gather decoded slots into batches and run the classifier stage.

Slots are copied into one contiguous batch and handed back to their producers
*before* the model runs, so decoding the next batch overlaps with computing
this one. On a GPU build this gather is where the uint8 batch is copied
host-to-device on one CUDA stream while the previous batch computes on another.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict

import numpy as np
import zmq

from wanwu.pipeline.topology import transport
from wanwu.pipeline.topology.messages import Decoded, EventKind, Release, Results
from wanwu.pipeline.workers.base import Worker
from wanwu.stages.classifier import Classifier
from wanwu.stages.models.base import get_model_spec

logger = logging.getLogger(__name__)

FEED_POLL_S = 0.002  # poll interval while a batch is on the device and nothing follows it


class InferenceWorker(Worker):
    """Batches decoded slots and runs the classifier stage on them; see the module docstring."""

    def _setup(self) -> None:
        ep = self.spec.endpoints
        self.decoded = transport.socket(self.ctx, zmq.PULL, ep.decoded, bind=True)
        self.results = transport.socket(self.ctx, zmq.PUSH, ep.results, bind=False)
        # The daemon's cameras have a feeder of their own (the loader), beside the doors' dispatcher.
        self.frame_results = (transport.socket(self.ctx, zmq.PUSH, ep.frame_results, bind=False)
                              if self.plan.frames_apart else None)
        self.release = [transport.socket(self.ctx, zmq.PUSH, ep.release(p), bind=False)
                        for p in range(self.plan.producers)]
        model = get_model_spec(self.cfg.model, **self.cfg.model_options())
        self.classifier = Classifier(model, self.cfg.engine, self.cfg.engine_config(), self.cfg.top_k)
        self.classifier.load()
        self.batch = np.empty((self.cfg.batch_size, *self.plan.frame.shape), np.dtype(self.plan.frame.dtype))
        self.feed = None  # the device feed of a GPU plan (streams, events, two batch buffers)
        if self.plan.gpu is not None and self.plan.gpu.feed == "device":
            from wanwu.pipeline.workers.gpu_feed import CudaFeed  # CUDA only for GPU jobs

            self.feed = CudaFeed(self.plan.gpu, self.pool, self.classifier, self.cfg.batch_size, self._release,
                                 self._finished)
        self.generation: dict[int, int] = {}  # newest incarnation seen, per producer

    def _loop(self) -> None:
        policy = self.cfg.batch_policy()
        pending: list[tuple[float, Decoded]] = []  # (arrival time, message)
        last_arrival = time.perf_counter()
        while not self.stopped():
            now = time.perf_counter()
            oldest = now - pending[0][0] if pending else 0.0
            wait_s = policy.wait_s(len(pending), oldest, now - last_arrival)
            if self.feed is not None and self.feed.outstanding():
                wait_s = min(wait_s, FEED_POLL_S)  # answer the batch on the device soon after it computed
            if self.decoded.poll(wait_s * 1000.0):
                last_arrival = time.perf_counter()
                for msg in self._drain():
                    pending.append((last_arrival, msg))
            ran = False
            while pending:
                now = time.perf_counter()
                n = policy.take(len(pending), now - pending[0][0], now - last_arrival)
                if not n:
                    break
                self._run_batch([m for _, m in pending[:n]], now - pending[0][0])
                ran = True
                del pending[:n]
            # Nothing follows the batch on the device yet: answer it once it computed, or now when idle.
            if self.feed is not None and not ran and (not pending or self.feed.computed()):
                with self.busy():
                    self.feed.flush()

    def _drain(self) -> list[Decoded]:
        """Waiting messages, minus those of producers that have since moved on a generation."""
        out = []
        for msg in transport.waiting(self.decoded):
            assert isinstance(msg, Decoded)
            # A newer incarnation of a producer means its predecessor died (or was reset): the
            # frames it had handed over may sit in slots its successor reuses two generations
            # on, and the feeder sends them again anyway. Never read them.
            self.generation[msg.producer] = max(self.generation.get(msg.producer, 0), msg.generation)
            out.append(msg)
        return [m for m in out if m.generation >= self.generation.get(m.producer, 0)]

    def _run_batch(self, items: list[Decoded], waited_s: float) -> None:
        assert self.pool is not None
        if self.feed is not None:
            self._waited_s = waited_s
            with self.busy():
                self.feed.submit(items)  # releases this batch's slots, answers the one before (_finished)
            return
        n = len(items)
        t = time.perf_counter()
        with self.busy():
            batch = self.pool.gather([m.slot for m in items], out=self.batch[:n])
            self._release(items)
            records = self.classifier.classify(batch, items)
        self._send_results(items, records)
        self.items += n
        self.emit(EventKind.BATCH, size=n, queue_s=waited_s, compute_s=time.perf_counter() - t)

    def _finished(self, items: list[Decoded], records: list, compute_s: float) -> None:
        """The device feed's answer to a batch."""
        self._send_results(items, records)
        self.items += len(items)
        self.emit(EventKind.BATCH, size=len(items), queue_s=getattr(self, "_waited_s", 0.0), compute_s=compute_s)

    def _send_results(self, items: list[Decoded], records: list) -> None:
        """Each record to the feeder of its frame: the loader's frames to it when it feeds apart."""
        if self.frame_results is None:
            transport.send(self.results, Results(tuple(m.ticket for m in items), tuple(records)))
            return
        loader = self.plan.loader_producer
        for sock, mine in ((self.results, False), (self.frame_results, True)):
            pairs = [(m.ticket, r) for m, r in zip(items, records) if (m.producer == loader) == mine]
            if pairs:
                transport.send(sock, Results(tuple(t for t, _ in pairs), tuple(r for _, r in pairs)))

    def _release(self, items: list[Decoded]) -> None:
        by_producer: dict[int, list[int]] = defaultdict(list)
        for m in items:
            by_producer[m.producer].append(m.slot)
        for producer, slots in by_producer.items():
            transport.send(self.release[producer], Release(tuple(slots)))

    def _shutdown(self) -> None:
        if getattr(self, "feed", None) is not None:
            self.feed.close()
        if hasattr(self, "classifier"):
            self.classifier.shutdown()
