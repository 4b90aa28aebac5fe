"""The torch engine's device side: batches already on the GPU, on the caller's stream, optionally as CUDA graphs.

The caller (the inference process's feed) owns the streams and events; these
functions only enqueue work on the current stream and never synchronise, except
the fp32 recheck, which needs the logits on the host to decide which rows to redo.
Imported only on CUDA.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch

from wanwu.errors import EngineError

logger = logging.getLogger(__name__)

GRAPH_WARMUP_RUNS = 3  # eager runs on a side stream before capture (cuDNN picks its algorithms there)


class CudaGraphs:
    """One CUDA graph per batch size: a static uint8 input, the module under autocast, a static output.

    A replay costs one launch instead of one per kernel, which matters for small
    models at small batches. Inputs are copied into the static buffer on the
    current stream (a device-to-device copy of a few MB). A partial batch replays
    the smallest captured size that holds it: the rows past it hold earlier frames,
    computed and dropped (rows are independent in eval mode). On an H200 the device
    feed took 4.8 ms per batch of 32 through a graph and 7.5 ms per eager batch of 8
    (some 250 kernel launches), so padding into the graph costs less than the launches
    it saves; more captured sizes (``GpuSettings.graph_batch_sizes``) pad less.
    """

    def __init__(self, run: Callable[[torch.Tensor], torch.Tensor], shape: tuple[int, ...], device: torch.device,
                 sizes: Sequence[int]) -> None:
        self._graphs: dict[int, tuple[Any, torch.Tensor, torch.Tensor]] = {}
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        for n in sizes:
            static_in = torch.zeros((n, *shape), dtype=torch.uint8, device=device)
            with torch.cuda.stream(side):
                for _ in range(GRAPH_WARMUP_RUNS):
                    run(static_in)
            torch.cuda.current_stream(device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = run(static_in)
            self._graphs[n] = (graph, static_in, static_out)
        logger.info("CUDA graphs captured for batch sizes %s", sorted(self._graphs))

    def size_for(self, n: int) -> int:
        """The captured batch size a batch of ``n`` replays, or 0 when none holds it."""
        return smallest_at_least(n, self._graphs)

    def __contains__(self, n: int) -> bool:
        return self.size_for(n) > 0

    def replay(self, pixels: torch.Tensor) -> torch.Tensor:
        """Logits for ``pixels`` (a size some graph holds); valid until the next replay of that graph."""
        n = pixels.shape[0]
        graph, static_in, static_out = self._graphs[self.size_for(n)]
        static_in[:n].copy_(pixels, non_blocking=True)
        graph.replay()
        return static_out[:n]


def smallest_at_least(n: int, sizes: Iterable[int]) -> int:
    """The smallest of ``sizes`` that is at least ``n``, or 0 when none is."""
    return min((s for s in sizes if s >= n), default=0)


def padded_rows(rows: np.ndarray, limit: int) -> np.ndarray:
    """``rows`` padded (with its first row) to the next power of two, at most ``limit`` and never fewer.

    The fp32 recheck runs on however many rows were near ties; padding keeps the shapes
    it runs to a handful (1, 2, 4, ... ``limit``), since cuDNN and cuBLAS pick and cache
    their algorithms per shape, and a first shape can cost more than a few extra rows.
    """
    if not rows.size:
        return rows
    size = max(rows.size, min(limit, 1 << (rows.size - 1).bit_length()))
    return np.concatenate([rows, np.full(size - rows.size, rows[0], rows.dtype)])


def recheck_sizes(limit: int) -> tuple[int, ...]:
    """Every row count :func:`padded_rows` can return for a batch of at most ``limit`` rows."""
    return tuple(sorted({min(limit, 1 << k) for k in range(limit.bit_length() + 1)}))


def recheck_rows(logits: np.ndarray, margin: float) -> np.ndarray:
    """Rows whose two best logits are closer than ``margin`` (the engine base's rule)."""
    if logits.shape[1] < 2:
        return np.empty(0, np.intp)
    top2 = np.partition(logits, -2, axis=1)[:, -2:]
    return np.flatnonzero(top2[:, 1] - top2[:, 0] < margin)


def check_device_batch(pixels: torch.Tensor, shape: tuple[int, ...], device: torch.device, max_batch: int) -> None:
    """Raise ``EngineError`` unless ``pixels`` is a uint8 (n, *shape) batch on ``device``."""
    if pixels.dtype != torch.uint8 or tuple(pixels.shape[1:]) != shape or pixels.device != device \
            or not 1 <= pixels.shape[0] <= max_batch:
        raise EngineError(f"expected a uint8 batch of 1 to {max_batch} x {shape} on {device}, got "
                          f"{tuple(pixels.shape)} {pixels.dtype} on {pixels.device}")
