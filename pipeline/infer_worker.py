"""The inference process: gather decoded slots into batches, run the engine, take the top-k.

Slots are copied into one contiguous batch and handed back to their decoders
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

from wanwu.kernels.topk import softmax_topk
from wanwu.pipeline import transport
from wanwu.pipeline.messages import Decoded, Records, Release
from wanwu.pipeline.records import result_records
from wanwu.pipeline.worker import Worker
from wanwu.stages.engines.base import EngineConfig, create_engine
from wanwu.stages.models.base import get_model_spec

logger = logging.getLogger(__name__)


class InferenceWorker(Worker):
    stage = "inference"

    def _setup(self) -> None:
        ep = self.spec.endpoints
        self.decoded = transport.socket(self.ctx, zmq.PULL, ep.decoded, bind=True)
        self.records = transport.socket(self.ctx, zmq.PUSH, ep.records, bind=False)
        self.release = [
            transport.socket(self.ctx, zmq.PUSH, ep.release(i), bind=False) for i in range(self.job.decoders)
        ]
        self.model = get_model_spec(self.job.model, **self.job.model_options())
        labels = self.model.labels()
        self.label_zh, self.label_en = labels.zh, labels.en
        cfg = EngineConfig(self.job.device, self.job.precision, self.job.threads, self.job.batch_size)
        self.engine = create_engine(self.job.engine, self.model, cfg)
        self.engine.load()
        self.batch = np.empty((self.job.batch_size, *self.spec.frame.shape), np.uint8)
        self.generation: dict[int, int] = {}  # newest incarnation seen, per decoder
        logger.info("engine %s ready (%s)", self.engine.name, self.engine.precision)

    def _loop(self) -> None:
        policy = self.job.batch_policy
        pending: list[tuple[float, Decoded]] = []  # (arrival time, message)
        last_arrival = time.perf_counter()
        while not self.stopped():
            now = time.perf_counter()
            oldest = now - pending[0][0] if pending else 0.0
            if self.decoded.poll(policy.wait_s(len(pending), oldest, now - last_arrival) * 1000.0):
                last_arrival = time.perf_counter()
                for msg in self._drain():
                    pending.append((last_arrival, msg))
            while pending:
                now = time.perf_counter()
                n = policy.take(len(pending), now - pending[0][0], now - last_arrival)
                if not n:
                    break
                self._run_batch([m for _, m in pending[:n]], now - pending[0][0])
                del pending[:n]

    def _drain(self) -> list[Decoded]:
        """Waiting messages, minus those of decoders that have since been restarted."""
        out = []
        while True:
            try:
                msg, _ = transport.recv(self.decoded, zmq.NOBLOCK)
            except zmq.Again:
                return [m for m in out if m.generation >= self.generation.get(m.decoder, 0)]
            assert isinstance(msg, Decoded)
            # A newer incarnation of a decoder means its predecessor died: the images it
            # had handed over may sit in slots its successor reuses two restarts on, and
            # the daemon retries them anyway. Never read them.
            self.generation[msg.decoder] = max(self.generation.get(msg.decoder, 0), msg.generation)
            out.append(msg)

    def _run_batch(self, items: list[Decoded], waited_s: float) -> None:
        assert self.pool is not None
        n = len(items)
        t = time.perf_counter()
        with self.busy():
            batch = self.pool.gather([m.slot for m in items], out=self.batch[:n])
            self._release(items)
            logits = self.engine.infer(batch)
            scores, class_ids = softmax_topk(logits, self.job.top_k)
            records = tuple(result_records(items, scores, class_ids, self.label_zh, self.label_en,
                                           self.model.name))
        transport.send(self.records, Records(records))
        self.items += n
        if self.job.restartable:  # the daemon's metrics: batch sizes, queue and compute time
            self.emit("batch", size=n, queue_s=waited_s, compute_s=time.perf_counter() - t)

    def _release(self, items: list[Decoded]) -> None:
        by_decoder: dict[int, list[int]] = defaultdict(list)
        for m in items:
            by_decoder[m.decoder].append(m.slot)
        for decoder, slots in by_decoder.items():
            transport.send(self.release[decoder], Release(tuple(slots)))

    def _shutdown(self) -> None:
        if hasattr(self, "engine"):
            self.engine.shutdown()
