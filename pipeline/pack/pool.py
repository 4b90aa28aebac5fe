"""An order-preserving process-pool map that keeps only a window of jobs in flight."""

from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import multiprocessing
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any, Callable, Iterable, Iterator, TypeVar

logger = logging.getLogger(__name__)

J = TypeVar("J")
R = TypeVar("R")

_worker_fn: Callable[[Any], Any] | None = None  # set in each worker by _init_worker


@contextlib.contextmanager
def bounded_map(
    fn: Callable[[J], R], jobs: Iterable[J], processes: int, in_flight: int, chunksize: int = 4
) -> Iterator[Iterator[R]]:
    """``fn`` applied to ``jobs`` in ``processes`` spawned workers, results in job order.

    At most about ``in_flight`` jobs are submitted but not yet consumed, so memory
    stays bounded on millions of jobs (``Pool.imap`` would queue them all). ``fn``
    is pickled once per worker, so it may carry state (e.g. sources). ``jobs`` is
    consumed lazily in the calling thread. Leaving the ``with`` block cancels what
    has not started and waits for the workers to exit.

    A ``concurrent.futures`` pool rather than ``multiprocessing.Pool``: when a
    worker dies (a segfault in a codec, the OOM killer) the results iterator raises
    ``BrokenProcessPool`` instead of waiting forever. An exception raised by ``fn``
    is raised again by the results iterator.
    """
    if processes < 1 or chunksize < 1 or in_flight < chunksize:
        raise ValueError(
            f"expected processes >= 1 and 1 <= chunksize <= in_flight, "
            f"got {processes}, {chunksize}, {in_flight}"
        )
    # spawn, not fork: the parent may hold threads and open LMDB environments.
    executor = ProcessPoolExecutor(
        processes, mp_context=multiprocessing.get_context("spawn"),
        initializer=_init_worker, initargs=(fn,),
    )
    try:
        yield _ordered(executor, jobs, in_flight // chunksize, chunksize)
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


def _ordered(
    executor: ProcessPoolExecutor, jobs: Iterable[J], window: int, chunksize: int
) -> Iterator[Any]:
    chunks = _chunked(jobs, chunksize)
    pending: collections.deque[Future[list[Any]]] = collections.deque(
        executor.submit(_call_chunk, chunk) for chunk in itertools.islice(chunks, window)
    )
    while pending:
        results = pending.popleft().result()
        # Refill before handing results out, so workers stay busy meanwhile.
        for chunk in itertools.islice(chunks, 1):
            pending.append(executor.submit(_call_chunk, chunk))
        yield from results


def _chunked(jobs: Iterable[J], size: int) -> Iterator[list[J]]:
    it = iter(jobs)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def _init_worker(fn: Callable[[Any], Any]) -> None:
    global _worker_fn
    _worker_fn = fn


def _call_chunk(chunk: list[Any]) -> list[Any]:
    if _worker_fn is None:
        raise RuntimeError("pool worker used before _init_worker ran")
    return [_worker_fn(job) for job in chunk]
