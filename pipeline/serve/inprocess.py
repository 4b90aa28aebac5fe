"""A ``Backend`` that runs the real stages in the calling process: a decoder and the classifier.

It is the simple way to serve: no child processes, no shared memory, one engine
behind a lock. Request threads decode their own images concurrently (decoding
is most of the CPU work per image and libjpeg-turbo and Pillow release the GIL),
then take turns on the engine, which already uses every core for one batch.
Front-door tests and small deployments use it; the multi-process backend keeps
the same contract with dynamic batching across requests.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from typing import Sequence

import numpy as np

from wanwu.errors import ConfigError, InputError, StageError
from wanwu.records import Item, Record
from wanwu.pipeline.serve.backend import ModelInfo, ServeError
from wanwu.pipeline.serve.stats import ServeStats
from wanwu.stages.classifier import Classifier
from wanwu.stages.decoders.base import DEFAULT_MAX_PIXELS, DecodeConfig, create_decoder
from wanwu.stages.engines.base import EngineConfig
from wanwu.stages.models.base import get_model_spec

logger = logging.getLogger(__name__)


class InProcessBackend:
    """``Backend`` over a decoder and an engine in this process. Thread-safe.

    ``ready()`` is False until ``start()`` has loaded and warmed up the engine,
    and again after ``shutdown()``. Images that cannot be decoded (any
    ``InputError``) get error records; the others are recognised in engine
    batches of at most ``max_batch_size``. Keys are the ones given, else
    ``"{source}-{request}-{i}"``.
    """

    def __init__(
        self,
        model: str = "efficientnet_lite0",
        engine: str = "auto",
        top_k: int = 5,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        max_batch_size: int = 32,
        max_images_per_request: int = 64,
        default_timeout_s: float = 30.0,
    ) -> None:
        if top_k < 1 or max_batch_size < 1 or max_images_per_request < 1 or default_timeout_s <= 0:
            raise ConfigError("expected top_k, max_batch_size, max_images_per_request >= 1 and "
                              f"default_timeout_s > 0, got {top_k}, {max_batch_size}, {max_images_per_request}, "
                              f"{default_timeout_s}")
        self.spec = get_model_spec(model)  # light: imports no framework
        self._classifier = Classifier(self.spec, engine, EngineConfig(max_batch_size=max_batch_size), top_k)
        self._top_k = self._classifier.top_k
        self._max_batch = max_batch_size
        self._max_images = max_images_per_request
        self._default_timeout_s = default_timeout_s
        self._decoder = create_decoder("turbo", DecodeConfig(self.spec.preprocess, max_pixels))
        self._engine_lock = threading.Lock()  # the classifier runs one batch at a time
        self._state_lock = threading.Lock()
        self._ready = False
        self._closed = False
        self._requests = itertools.count()  # next() is atomic under the GIL
        self._stats = ServeStats()

    def start(self) -> None:
        """Build, load and warm up the engine; then ``ready()`` is True. Idempotent.

        Raises:
            StageError: the model or engine could not be loaded.
        """
        with self._state_lock:
            if self._ready or self._closed:
                return
            self._classifier.load()  # compiles (or reads the cache) and runs one warm-up batch
            self._ready = True
            logger.info("in-process backend ready: %s (%s)", self._classifier.describe(), self._classifier.precision)

    def info(self) -> ModelInfo:
        extra = {"decoder": self._decoder.name, "engine": self._classifier.engine_name}
        if self._ready:
            extra.update(precision=self._classifier.precision)
        return ModelInfo(name=self.spec.name, num_classes=self.spec.num_classes, top_k=self._top_k,
                         max_batch_size=self._max_batch, max_queue_delay_ms=0.0,
                         max_images_per_request=self._max_images, extra=extra)

    def live(self) -> bool:
        return not self._closed

    def ready(self) -> bool:
        return self._ready

    def stats(self) -> dict:
        return self._stats.snapshot()

    def submit(self, images: Sequence[bytes], timeout_s: float | None = None, source: str = "",
               keys: Sequence[str] | None = None) -> list[Record]:
        """Recognise ``images``; see ``Backend.submit``.

        Raises:
            ServeError: ``not_ready``, ``bad_request`` (no images, or keys that do not match
                them), ``too_large`` (more than
                ``max_images_per_request``), ``timeout`` (the engine stayed busy too long)
                or ``internal`` (the engine failed).
        """
        if not self._ready:
            raise ServeError("not_ready", f"model {self.spec.name!r} is not ready (loading or shutting down)")
        n = len(images)
        if n == 0:
            raise ServeError("bad_request", "expected at least one image, got none")
        if n > self._max_images:
            raise ServeError("too_large", f"expected at most {self._max_images} images per request, got {n}")
        if keys is not None and len(keys) != n:
            raise ServeError("bad_request", f"expected one key per image ({n}), got {len(keys)}")
        t0, start_ns = time.time(), time.perf_counter_ns()
        timeout_s = self._default_timeout_s if timeout_s is None else timeout_s
        deadline_ns = start_ns + int(timeout_s * 1e9)
        if keys is None:
            prefix = f"{source or 'request'}-{next(self._requests)}"
            keys = [f"{prefix}-{i}" for i in range(n)]
        phases = dict.fromkeys(("queue", "compute_input", "compute_infer", "compute_output"), 0)
        try:
            records = self._run(images, keys, source, t0, deadline_ns, phases)
        except ServeError:
            self._stats.add_request(False, time.perf_counter_ns() - start_ns, phases)
            raise
        ok = all(r.error is None for r in records)
        self._stats.add_request(ok, time.perf_counter_ns() - start_ns, phases)
        return records

    def _run(self, images: Sequence[bytes], keys: Sequence[str], source: str, t0: float, deadline_ns: int,
             phases: dict[str, int]) -> list[Record]:
        tick = time.perf_counter_ns()
        pixels = np.empty((len(images), *self._decoder.output_spec().shape), np.uint8)
        decoded = self._decoder.decode_batch_into(images, list(pixels))
        phases["compute_input"] += time.perf_counter_ns() - tick
        records: list[Record | None] = [None] * len(images)
        good = []
        for i, (key, info) in enumerate(zip(keys, decoded)):
            if isinstance(info, InputError):
                records[i] = Record.failure(key, source, self.spec.name, info, t0)
            else:
                good.append((i, Item(key, source, info.width, info.height, t0)))
        for begin in range(0, len(good), self._max_batch):
            chunk = good[begin:begin + self._max_batch]
            tick = time.perf_counter_ns()
            batch = pixels[[i for i, _ in chunk]]  # fancy indexing: a contiguous copy
            gather_ns = time.perf_counter_ns() - tick
            phases["compute_input"] += gather_ns
            items = [item for _, item in chunk]
            for (i, _), record in zip(chunk, self._classify(batch, items, gather_ns, deadline_ns, phases)):
                records[i] = record
        return records  # type: ignore[return-value]

    def _classify(self, batch: np.ndarray, items: list[Item], gather_ns: int, deadline_ns: int,
                  phases: dict[str, int]) -> list[Record]:
        """Run one classifier batch under the lock, waiting at most until the deadline."""
        tick = time.perf_counter_ns()
        wait_s = (deadline_ns - tick) / 1e9
        if wait_s <= 0 or not self._engine_lock.acquire(timeout=wait_s):
            raise ServeError("timeout", "the engine stayed busy past the request's timeout")
        try:
            queued = time.perf_counter_ns()
            if not self._ready:
                raise ServeError("not_ready", f"model {self.spec.name!r} was shut down")
            try:
                records = self._classifier.classify(batch, items)
            except StageError as exc:
                logger.exception("classifier failed on a batch of %d", len(items))
                raise ServeError("internal", f"inference failed: {type(exc).__name__}: {exc}") from exc
        finally:
            self._engine_lock.release()
        done = time.perf_counter_ns()
        phases["queue"] += queued - tick
        phases["compute_infer"] += done - queued  # engine, top-k and records: one stage
        self._stats.add_execution(len(items), {"compute_input": gather_ns, "compute_infer": done - queued})
        return records

    def shutdown(self) -> None:
        """Stop accepting requests and release the engine and decoder. Safe to call twice."""
        with self._state_lock:
            if self._closed:
                return
            self._closed = True
            self._ready = False
        with self._engine_lock:  # let a running batch finish before its engine goes
            self._classifier.shutdown()
        self._decoder.shutdown()
