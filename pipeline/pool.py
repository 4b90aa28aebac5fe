"""An order-preserving process pool map that holds only a window of jobs in flight."""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import threading
from typing import Any, Callable, Iterable, Iterator, TypeVar

logger = logging.getLogger(__name__)

J = TypeVar("J")
R = TypeVar("R")

_worker_fn: Callable[[Any], Any] | None = None  # set in each worker by _init_worker


@contextlib.contextmanager
def bounded_imap(
    fn: Callable[[J], R], jobs: Iterable[J], processes: int, in_flight: int, chunksize: int = 4
) -> Iterator[Iterator[R]]:
    """``fn`` applied to ``jobs`` in ``processes`` spawned workers, results in job order.

    ``Pool.imap`` alone queues every job at once and keeps every finished result
    until it is consumed; here at most ``in_flight`` jobs are queued or finished
    but not yet consumed, so memory stays bounded on millions of jobs. ``fn`` is
    pickled once per worker (it may carry state, e.g. sources). ``jobs`` is
    iterated in a thread of this process. Leaving the ``with`` block stops the
    workers, whether or not every result was consumed.

    An exception raised by ``fn`` is raised again by the results iterator.
    """
    if processes < 1 or in_flight < max(1, chunksize):
        raise ValueError(
            f"expected processes >= 1 and in_flight >= chunksize, got {processes}, {in_flight}"
        )
    slots = threading.Semaphore(in_flight)
    stopping = threading.Event()

    def throttled() -> Iterator[J]:
        for job in jobs:
            while not slots.acquire(timeout=0.1):
                if stopping.is_set():  # the consumer is gone; let the pool shut down
                    return
            yield job

    def released(results: Iterator[R]) -> Iterator[R]:
        for result in results:
            slots.release()
            yield result

    # spawn, not fork: the parent may hold threads and open LMDB environments.
    pool = multiprocessing.get_context("spawn").Pool(
        processes, initializer=_init_worker, initargs=(fn,)
    )
    try:
        yield released(pool.imap(_call_in_worker, throttled(), chunksize=chunksize))
    finally:
        stopping.set()
        pool.terminate()
        pool.join()


def _init_worker(fn: Callable[[Any], Any]) -> None:
    global _worker_fn
    _worker_fn = fn


def _call_in_worker(job: Any) -> Any:
    if _worker_fn is None:
        raise RuntimeError("pool worker used before _init_worker ran")
    return _worker_fn(job)
