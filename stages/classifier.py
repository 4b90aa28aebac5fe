"""The classifier stage: a batch of frames in, one ``Record`` per frame out.

It is the classification head in one place: the engine's logits (with the fp32
recheck of ``--precision auto`` and ``int8+fp32``), softmax top-k, the model's Chinese
and English labels, and the records built from them. An answer computed in int8 says so
in its record: its ``model`` is ``name@int8`` (``INT8_SUFFIX``); a near tie recomputed in
fp32 carries the plain name, as every other answer. Every place that recognises images uses
it: the inference process of ``wanwu run`` and ``wanwu serve``, the in-process
serving backend, the benchmark's inference row and ``wanwu models check``.

It knows nothing of processes: hand it a batch, get records back.
"""

from __future__ import annotations

import logging
import time
from typing import Sequence

import numpy as np

from wanwu.errors import ConfigError, StageError
from wanwu.kernels.topk import softmax_topk
from wanwu.records import Described, Record
from wanwu.specs import FrameSpec
from wanwu.stages.engines.base import Engine, EngineConfig, create_engine, resolve_engine_name
from wanwu.stages.models.base import ModelSpec

logger = logging.getLogger(__name__)

INT8_SUFFIX = "@int8"  # appended to the record's model for answers computed in int8


class Classifier:
    """Engine + top-k + labels. ``load()`` before the first batch; ``shutdown()`` is safe twice.

    Args:
        model: the model (light: nothing is imported until ``load``).
        engine: registered engine name or ``auto`` (resolved for the device and model format).
        cfg: the engine's settings (device, precision, threads, largest batch).
        top_k: labels per record (clamped to the number of classes).
    """

    def __init__(self, model: ModelSpec, engine: str = "auto", cfg: EngineConfig = EngineConfig(),
                 top_k: int = 5) -> None:
        if top_k < 1:
            raise ConfigError(f"expected top_k >= 1, got {top_k}")
        self.model = model
        self.cfg = cfg
        self.top_k = min(top_k, model.num_classes)
        self.engine_name = resolve_engine_name(engine, cfg.device, model.format)
        labels = model.labels()  # read now: a bad label file fails before the model loads
        self._zh, self._en = labels.zh, labels.en
        self._engine: Engine | None = None

    @staticmethod
    def declare_input(model: ModelSpec, cfg: EngineConfig) -> FrameSpec:
        """What a classifier for ``model`` takes, known without building or importing anything."""
        return Engine.declare_input(model, cfg)

    def input_spec(self) -> FrameSpec:
        """One item of the batches ``classify`` takes."""
        return self.declare_input(self.model, self.cfg)

    def describe(self) -> str:
        """E.g. ``classifier 'efficientnet_lite0' (openvino)``, for messages."""
        return f"classifier {self.model.name!r} ({self.engine_name})"

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            raise StageError(f"expected load() before {self.describe()} is used")
        return self._engine

    @property
    def precision(self) -> str:
        """What the engine runs in once loaded (``bf16+fp32`` for auto with rechecks)."""
        return self.engine.precision

    def load(self) -> None:
        """Build, load and warm up the engine. Idempotent.

        Raises:
            EngineError, ModelError: the engine or model cannot be loaded.
        """
        if self._engine is None:
            engine = create_engine(self.engine_name, self.model, self.cfg)
            engine.load()
            self._engine = engine
            logger.info("%s ready (%s)", self.describe(), engine.precision)

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """float32 (n, classes) logits of a uint8 batch (n, *input_spec().shape)."""
        return self.engine.infer(batch)

    def classify(self, batch: np.ndarray, items: Sequence[Described], now: float | None = None) -> list[Record]:
        """One record per row of ``batch``, built from ``items`` (key, source, size, t0) in the same order.

        Raises:
            EngineError: the batch does not match ``input_spec()`` or the engine failed.
        """
        return self.records_for(self.logits(batch), items, now)

    def records_for(self, logits: np.ndarray, items: Sequence[Described], now: float | None = None) -> list[Record]:
        """``classify``'s second half: records from the engine's float32 (n, classes) logits of the last batch
        (the GPU feed computes them on the device and hands them here)."""
        scores, class_ids = softmax_topk(logits, self.top_k)
        name = self.model.name
        if not self.engine.precision.startswith("int8"):
            return Record.results(items, scores, class_ids, self._zh, self._en, name, now)
        items, now = list(items), time.time() if now is None else now  # one time for both parts
        exact = np.zeros(len(items), bool)
        exact[self.engine.last_exact] = True
        out: list[Record | None] = [None] * len(items)
        for rows, model in ((np.flatnonzero(~exact), name + INT8_SUFFIX), (np.flatnonzero(exact), name)):
            part = Record.results([items[i] for i in rows], scores[rows], class_ids[rows], self._zh, self._en,
                                  model, now)
            for i, record in zip(rows.tolist(), part):
                out[i] = record
        return out  # type: ignore[return-value]  # every row was filled

    def shutdown(self) -> None:
        """Release the engine. Safe to call twice."""
        if self._engine is not None:
            self._engine.shutdown()
            self._engine = None
