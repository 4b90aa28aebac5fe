"""The inference process's device feed: it executes the GPU plan's per-batch steps (``gpu.batch_steps``).

Two device batch buffers; a copy stream for host-to-device copies out of the
pinned pool (none for the device pool, where the batch is gathered on the
compute stream); a compute stream for the model; events between them. Batch
n is enqueued before batch n-1's results are read, so the GPU always has the
next batch queued behind the current one. Imported only on CUDA.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

from wanwu.errors import StageError
from wanwu.pipeline.topology.gpu import GpuPlan, Step, batch_steps, flush_steps
from wanwu.pipeline.topology.messages import Decoded
from wanwu.stages.classifier import Classifier

logger = logging.getLogger(__name__)

Release = Callable[[list[Decoded]], None]
Done = Callable[[list[Decoded], list, float], None]  # items, records, seconds from submit to results


@dataclass
class _Batch:
    items: list[Decoded]
    t0: float
    events: dict[str, Any] = field(default_factory=dict)


class CudaFeed:
    """Runs batches through the device along ``gpu``'s plan.

    Args:
        gpu: the GPU plan.
        pool: the device slot pool (``DeviceSlotPool``) or the host ``SlotPool`` (pinned here).
        classifier: a loaded classifier whose engine has the device hooks (the torch engine).
        max_batch: the largest batch.
        release: called with a batch's items once its slots may be reused.
        done: called with a batch's items and records once they are known.
    """

    def __init__(self, gpu: GpuPlan, pool: Any, classifier: Classifier, max_batch: int, release: Release,
                 done: Done) -> None:
        engine = classifier.engine
        if not hasattr(engine, "submit_device"):
            raise StageError(f"expected an engine that runs device batches (torch) for the GPU feed, got "
                             f"{classifier.engine_name!r}")
        self.gpu, self.pool, self.classifier, self.engine = gpu, pool, classifier, engine
        self._release_cb, self._done_cb = release, done
        self.device = torch.device(gpu.device)
        shape = classifier.input_spec().shape
        self.pinned = gpu.pool.placement == "pinned"
        self.copy_stream = torch.cuda.Stream(self.device) if self.pinned else None
        self.compute_stream = torch.cuda.Stream(self.device)
        self.buffers = [torch.empty((max_batch, *shape), dtype=torch.uint8, device=self.device)
                        for _ in range(gpu.batch_buffers)]
        classes = classifier.model.num_classes
        self.logits = [torch.empty((max_batch, classes), dtype=torch.float32).pin_memory()
                       for _ in range(gpu.batch_buffers)]
        self._registration = None
        if self.pinned:
            from wanwu.pipeline.topology.gpu_pool import PinnedRegistration

            self._registration = PinnedRegistration(pool.frames, gpu.pool)
            self.host_frames = torch.from_numpy(pool.frames)
        with torch.cuda.stream(self.compute_stream):
            engine.capture_graphs(gpu.graph_batch_sizes)
            engine.warm_recheck(max_batch)
        self.compute_stream.synchronize()
        self.batches: dict[int, _Batch] = {}
        self.next = 0  # number of the next batch

    def submit(self, items: list[Decoded]) -> None:
        """Enqueue ``items`` as the next batch; release its slots; finish the batch before it."""
        n = self.next
        # A flush (the input paused) may have answered batch n-1 already; answering it twice
        # would read results that are gone.
        previous_pending = n - 1 in self.batches
        self.batches[n] = _Batch(items, time.perf_counter())
        self.next += 1
        self._execute(batch_steps(self.gpu.pool, n, self.gpu.batch_buffers, previous_pending))

    def outstanding(self) -> bool:
        """Whether a submitted batch still waits for its results."""
        return bool(self.batches)

    def computed(self) -> bool:
        """Whether the last submitted batch has finished computing (never blocks)."""
        last = self.batches.get(self.next - 1)
        return last is not None and "computed" in last.events and last.events["computed"].query()

    def flush(self) -> None:
        """Finish the last batch (nothing follows it yet). Safe to call when nothing is pending."""
        if self.next and self.next - 1 in self.batches:
            self._execute(flush_steps(self.next - 1, self.gpu.batch_buffers))

    def _execute(self, steps: Sequence[Step]) -> None:
        for step in steps:
            getattr(self, f"_{step.op}")(step)

    def _stream(self, step: Step) -> Any:
        return self.copy_stream if step.stream == "copy" else self.compute_stream

    def _event(self, name: str, n: int) -> Any:
        return self.batches[n].events.setdefault(name, torch.cuda.Event())

    # ---- the operations a Step names

    def _wait(self, step: Step) -> None:
        if step.event_batch in self.batches:  # a finished batch's event has fired already
            self._stream(step).wait_event(self._event(step.event, step.event_batch))

    def _record(self, step: Step) -> None:
        self._event(step.event, step.event_batch).record(self._stream(step))

    def _sync(self, step: Step) -> None:
        self._event(step.event, step.event_batch).synchronize()

    def _copy(self, step: Step) -> None:
        """Pinned pool -> device buffer, one DMA per slot (no host-side gather copy)."""
        items, out = self.batches[step.batch].items, self.buffers[step.buffer]
        with torch.cuda.stream(self.copy_stream):
            for i, m in enumerate(items):
                out[i].copy_(self.host_frames[m.slot], non_blocking=True)

    def _gather(self, step: Step) -> None:
        items, out = self.batches[step.batch].items, self.buffers[step.buffer]
        with torch.cuda.stream(self.compute_stream):
            self.pool.gather([m.slot for m in items], out=out[: len(items)])

    def _compute(self, step: Step) -> None:
        k = len(self.batches[step.batch].items)
        with torch.cuda.stream(self.compute_stream):
            logits = self.engine.submit_device(self.buffers[step.buffer][:k])
            self.logits[step.buffer][:k].copy_(logits, non_blocking=True)

    def _release(self, step: Step) -> None:
        self._release_cb(self.batches[step.batch].items)

    def _results(self, step: Step) -> None:
        batch = self.batches.pop(step.batch)
        k = len(batch.items)
        logits = self.logits[step.buffer][:k].numpy().copy()
        with torch.cuda.stream(self.compute_stream):
            logits = self.engine.recheck_device(self.buffers[step.buffer][:k], logits)
        records = self.classifier.records_for(logits, batch.items)
        self._done_cb(batch.items, records, time.perf_counter() - batch.t0)

    def close(self) -> None:
        """Wait for the device, unpin the host pool. Safe to call twice."""
        if self._registration is not None:
            torch.cuda.synchronize(self.device)
            self._registration.close()
            self._registration = None
