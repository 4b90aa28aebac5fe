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
        self.model = get_model_spec(self.job.model)
        labels = self.model.labels()
        self.label_zh, self.label_en = labels.zh, labels.en
        cfg = EngineConfig(self.job.device, self.job.precision, self.job.threads, self.job.batch_size)
        self.engine = create_engine(self.job.engine, self.model, cfg)
        self.engine.load()
        self.batch = np.empty((self.job.batch_size, *self.spec.frame.shape), np.uint8)
        logger.info("engine %s ready (%s)", self.engine.name, self.engine.precision)

    def _loop(self) -> None:
        pending: list[Decoded] = []
        last_arrival = time.perf_counter()
        wait_s = self.job.max_wait_ms / 1000.0
        bs = self.job.batch_size
        while not self.stopped():
            idle_s = time.perf_counter() - last_arrival
            timeout_ms = max(0.0, wait_s - idle_s) * 1000.0 if pending else 200.0
            if self.decoded.poll(timeout_ms):
                while True:
                    try:
                        msg, _ = transport.recv(self.decoded, zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    pending.append(msg)  # type: ignore[arg-type]
                last_arrival = time.perf_counter()
            while len(pending) >= bs:
                self._run_batch(pending[:bs])
                del pending[:bs]
            # A partial batch runs once the stream pauses (its end, or decoders all busy on big images).
            if pending and time.perf_counter() - last_arrival >= wait_s:
                self._run_batch(pending)
                pending = []

    def _run_batch(self, items: list[Decoded]) -> None:
        assert self.pool is not None
        n = len(items)
        with self.busy():
            batch = self.pool.gather([m.slot for m in items], out=self.batch[:n])
            self._release(items)
            logits = self.engine.infer(batch)
            scores, class_ids = softmax_topk(logits, self.job.top_k)
            records = self._records(items, scores, class_ids)
        transport.send(self.records, Records(records))
        self.items += n

    def _release(self, items: list[Decoded]) -> None:
        per = self.job.slots_per_decoder
        by_decoder: dict[int, list[int]] = defaultdict(list)
        for m in items:
            by_decoder[m.slot // per].append(m.slot)
        for decoder, slots in by_decoder.items():
            transport.send(self.release[decoder], Release(tuple(slots)))

    def _records(self, items: list[Decoded], scores: np.ndarray, class_ids: np.ndarray) -> tuple[dict, ...]:
        now = time.time()
        zh, en, model = self.label_zh, self.label_en, self.model.name
        out = []
        for m, row_scores, row_ids in zip(items, scores.tolist(), class_ids.tolist()):
            labels = [
                {"label": zh[c], "label_en": en[c], "class_id": c, "score": round(s, 6)}
                for s, c in zip(row_scores, row_ids)
            ]
            out.append({
                "key": m.key, "source": m.source, "width": m.width, "height": m.height, "labels": labels,
                "model": model, "elapsed_ms": round((now - m.t0) * 1000.0, 3), "error": None,
            })
        return tuple(out)

    def _shutdown(self) -> None:
        if hasattr(self, "engine"):
            self.engine.shutdown()
