"""The Python front door: wanwu's processes behind a call, for programs that would write their own loop.

::

    from wanwu import Recognizer

    with Recognizer(top_k=3) as wanwu:
        (record,) = wanwu.recognise([open("cat.jpg", "rb").read()])
        for record in wanwu.map(paths):  # a huge iterable: bounded memory, records in input order
            ...

It is the daemon's engine room (``PipelineBackend``: decoder processes, one
inference process, shared memory, dynamic batching, workers restarted when they
die) with this module as its only door: no port is opened. ``map`` keeps a
window of images in flight, in requests of a few images each from a small pool
of threads (reading files there, so that slow storage overlaps the work), and
yields each record as soon as it and every record before it are known.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import os
import threading
import time
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from typing import Any, Iterable, Iterator, Sequence, Union

import numpy as np

from wanwu.errors import ConfigError, DecodeError, InputError, ReadError
from wanwu.records import Record
from wanwu.pipeline.serve.backend import ModelInfo, ServeError
from wanwu.pipeline.serve.config import ServeConfig
from wanwu.stages.decoders.base import max_encoded_bytes
from wanwu.stages.sources.files import read_file

# Encoded bytes, a file's path, or pixels: an RGB (H, W, 3) or grayscale (H, W) uint8 array.
Image = Union[bytes, bytearray, memoryview, str, "os.PathLike[str]", np.ndarray]

SOURCE = "python"
REQUEST_TIMEOUT_S = 600.0  # the caller is the only client: a slow machine, not a crowd, makes requests wait


class Recognizer:
    """wanwu's pipeline (decoder and inference processes) in this program. Thread-safe.

    Args:
        config: a ``ServeConfig`` (its front doors are ignored); None builds one from ``settings``.
        **settings: any ``wanwu run``/``wanwu serve`` setting by its field name: ``model``,
            ``engine``, ``precision``, ``top_k``, ``batch_size``, ``decoders``, ``device``,
            ``cache``, ``timeout_s`` (per request of a few images), ...

    Raises:
        ConfigError: an unknown setting, or a value of the wrong type or out of range.

    ``start()`` (or ``with``) launches the processes and returns once the model is
    loaded; ``close()`` answers what is in flight, stops them and frees the shared
    memory. A bad image (not an image, unreadable, too many pixels) gets a record
    with ``error`` set; ``ServeError`` (``timeout``, ``not_ready``) and ``StageError``
    (the workers cannot be kept running) are about the call, not one image.
    """

    def __init__(self, config: ServeConfig | None = None, **settings: Any) -> None:
        if config is not None and settings:
            raise ConfigError(f"expected a config or settings, got both (settings {sorted(settings)})")
        values = {"timeout_s": REQUEST_TIMEOUT_S, **settings}
        doors = [k for k in ("http", "grpc_port", "metrics_port", "zmq_request", "zmq_stream", "watch", "cameras")
                 if k in values]
        if doors:
            raise ConfigError(f"expected no front-door settings for the Python API (use `wanwu serve`), got {doors}")
        base = config if config is not None else ServeConfig.build(values)
        self.config = dataclasses.replace(base, http=False, grpc_port=-1, metrics_port=-1, zmq_request="",
                                          zmq_stream="", watch="", cameras=(), python=True)
        self._backend: Any = None
        self._pool: ThreadPoolExecutor | None = None
        self._lifecycle = threading.Lock()  # start and close, from any thread

    # ---- lifecycle

    def start(self, timeout_s: float = 600.0) -> "Recognizer":
        """Launch the processes; return once the model is loaded and warmed up. A no-op when started.

        Raises:
            StageError: a worker could not start (the model cannot load, ...) within ``timeout_s``.
        """
        with self._lifecycle:
            if self._backend is None:
                from wanwu.pipeline.serve.dispatch import PipelineBackend

                backend = PipelineBackend(self.config)
                backend.start(timeout_s)
                self._pool = ThreadPoolExecutor(max_workers=self._requests_at_once(), thread_name_prefix="wanwu-api")
                self._backend = backend
        return self

    def close(self) -> None:
        """Answer what is in flight, stop the processes, free the shared memory. Safe to call twice."""
        with self._lifecycle:
            pool, backend, self._pool, self._backend = self._pool, self._backend, None, None
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
            if backend is not None:
                backend.shutdown()

    def __enter__(self) -> "Recognizer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def info(self) -> ModelInfo:
        """The model being served (name, classes, top-k, batch size)."""
        return self._started().info()

    # ---- work

    def recognise(self, images: Sequence[Image], keys: Sequence[str] | None = None) -> list[Record]:
        """One record per image, in order; blocks until all are known.

        Args:
            images: encoded images (bytes), paths of image files, or pixels (uint8 arrays, RGB
                (H, W, 3) or gray (H, W); an OpenCV frame is BGR: pass ``frame[..., ::-1]``).
            keys: the records' keys; None gives a path's own string, or ``"{i}"`` otherwise.

        Raises:
            ConfigError: ``keys`` does not have one key per image.
            ServeError: a request timed out (``timeout_s``) or the pipeline is shutting down.
            StageError: the workers could not be kept running.
        """
        if keys is not None and len(keys) != len(images):
            raise ConfigError(f"expected one key per image ({len(images)}), got {len(keys)}")
        keyed = zip(keys if keys is not None else [None] * len(images), images)
        return list(self._map(((_key(k, image, i), image) for i, (k, image) in enumerate(keyed)), 0))

    def map(self, images: Iterable[Image], window: int = 0, ordered: bool = True) -> Iterator[Record]:
        """Records of ``images`` (as for ``recognise``; any number, read lazily), as they come.

        Args:
            images: an iterable of encoded images, paths or pixels; a path's record has the path
                as its key, the others their position (``"0"``, ``"1"``, ...).
            window: images in flight at most (0: four batches). More keeps every process busy
                when images vary in size; fewer bounds memory (encoded bytes of the window).
            ordered: records in input order (a slow image holds back those after it, and the
                window stops filling behind it); False yields each few records as soon as they
                are known, so one huge image never idles the pipeline.

        Raises:
            ConfigError: ``window`` is above ``max_queue_size``.
            ServeError (from the iterator, after every record before the failed request was
                yielded): a request timed out, or the pipeline is shutting down.
            StageError (from the iterator): the workers could not be kept running.
        """
        return self._map(((_key(None, image, i), image) for i, image in enumerate(images)), window, ordered)

    def _map(self, keyed: Iterator[tuple[str, Image]], window: int, ordered: bool = True) -> Iterator[Record]:
        self._started()
        chunk = self._chunk()
        window = max(chunk, window or 4 * self.config.batch_size)
        if window > self.config.max_queue_size:
            raise ConfigError(f"expected a window of at most max_queue_size ({self.config.max_queue_size}) images, "
                              f"got {window}")
        return self._stream(keyed, chunk, window, ordered)

    def _stream(self, keyed: Iterator[tuple[str, Image]], chunk: int, window: int, ordered: bool
                ) -> Iterator[Record]:
        pending: collections.deque[Future] = collections.deque()
        try:
            while True:
                batch = [pair for _, pair in zip(range(chunk), keyed)]
                if batch:
                    pending.append(self._submit(batch))
                if ordered:
                    while pending and (not batch or len(pending) * chunk >= window or pending[0].done()):
                        yield from _result(pending.popleft())
                elif pending:
                    if not batch or len(pending) * chunk >= window:  # wait for whichever request ends first
                        concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)
                    for future in [f for f in pending if f.done()]:
                        pending.remove(future)
                        yield from _result(future)
                if not batch and not pending:
                    return
        finally:  # the caller stopped early, or a request failed: drop what was not started
            for future in pending:
                future.cancel()

    def _submit(self, batch: list[tuple[str, Image]]) -> Future:
        pool = self._pool
        if pool is None:
            raise ServeError("not_ready", "the recognizer was closed")
        return pool.submit(self._request, batch)

    def _request(self, batch: list[tuple[str, Image]]) -> list[Record]:
        """Read the paths, send the readable images as one request, put the unreadable ones' records in place."""
        backend = self._started()
        t0 = time.time()
        records: list[Record | None] = [None] * len(batch)
        datas, keys, where = [], [], []
        for i, (key, image) in enumerate(batch):
            try:
                datas.append(_read(image, max_encoded_bytes(self.config.max_pixels)))
            except InputError as exc:
                records[i] = Record.failure(key, SOURCE, backend.spec.name, exc, t0)
                continue
            keys.append(key)
            where.append(i)
        if datas:
            for i, record in zip(where, backend.submit(datas, source=SOURCE, keys=keys)):
                records[i] = record
        return records  # type: ignore[return-value]

    def _started(self) -> Any:
        backend = self._backend
        if backend is None:
            raise ServeError("not_ready", "expected a started Recognizer (use start() or `with`), got none running")
        return backend

    def _chunk(self) -> int:
        """Images per request: a quarter batch, so that several requests fill each batch."""
        return max(1, min(self.config.max_images_per_request, self.config.batch_size // 4))

    def _requests_at_once(self) -> int:
        return max(2, min(64, self.config.max_queue_size // self._chunk()))


def _result(future: Future) -> list[Record]:
    try:
        return future.result()
    except CancelledError:  # close() from another thread dropped the requests not yet started
        raise ServeError("not_ready", "the recognizer was closed while images were in flight") from None


def _key(given: str | None, image: Image, index: int) -> str:
    if given is not None:
        return given
    return os.fspath(image) if isinstance(image, (str, os.PathLike)) else str(index)


def _read(image: Image, max_bytes: int) -> bytes:
    """The encoded bytes of ``image`` (bytes as they are; a path read whole; pixels as PPM/PGM).

    Raises:
        ReadError: a path that cannot be read, is not a regular file, is empty or holds more
            than ``max_bytes`` (then it is not read).
        DecodeError: an array that is not uint8 RGB (H, W, 3) or grayscale (H, W).
    """
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    if isinstance(image, np.ndarray):
        return _netpbm(image)
    if not isinstance(image, (str, os.PathLike)):
        raise ReadError(f"expected encoded bytes, a path or a uint8 array, got {type(image).__name__}")
    # The batch job's reader: a named pipe cannot block the call, nor a huge file fill the memory.
    return read_file(os.fspath(image), max_bytes)


def _netpbm(pixels: np.ndarray) -> bytes:
    """``pixels`` as binary PPM (RGB) or PGM (gray): a header and the bytes, no compression to pay for."""
    rgb = pixels.ndim == 3 and pixels.shape[2] == 3
    if pixels.dtype != np.uint8 or not (rgb or pixels.ndim == 2) or 0 in pixels.shape:
        raise DecodeError(f"expected uint8 pixels of shape (H, W, 3) in RGB order or (H, W) gray, got "
                          f"{pixels.shape} {pixels.dtype}")
    height, width = pixels.shape[:2]
    header = f"{'P6' if rgb else 'P5'}\n{width} {height}\n255\n".encode()
    return header + np.ascontiguousarray(pixels).tobytes()
