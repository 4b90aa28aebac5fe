"""What every front door (HTTP, ZeroMQ, hot folder) talks to.

A front door turns requests into lists of encoded images and hands them to a
``Backend``; the backend answers with one ``wanwu.records.Record`` per image, in
order, built with the keys and source the door gave: doors never rewrite records.

Errors about one image (not an image, too many pixels) come back as that
image's record with ``error`` set; errors about the request as a whole raise
``ServeError`` with a reason a front door maps to its status code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence

from wanwu.errors import WanwuError
from wanwu.records import Record


class ServeError(WanwuError):
    """A request as a whole cannot be served.

    ``reason`` is one of ``"queue_full"`` (HTTP 503), ``"timeout"`` (HTTP 504),
    ``"not_ready"`` (HTTP 503), ``"too_large"`` (HTTP 413), ``"bad_request"``
    (HTTP 400) or ``"internal"`` (HTTP 500).
    """

    STATUS = {"queue_full": 503, "timeout": 504, "not_ready": 503, "too_large": 413, "bad_request": 400,
              "internal": 500}

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason

    @property
    def record_type(self) -> str:
        """An image's error record names the reason (``queue_full``, ...), not this class."""
        return self.reason

    @property
    def http_status(self) -> int:
        return self.STATUS.get(self.reason, 500)


@dataclass(frozen=True)
class ModelInfo:
    """What a front door reports about the served model (KServe v2 metadata and config)."""

    name: str  # model name as served, e.g. "efficientnet_lite0"
    version: str = "1"
    platform: str = "wanwu"
    num_classes: int = 1000
    top_k: int = 5  # labels per image returned by default
    max_batch_size: int = 32
    max_queue_delay_ms: float = 5.0
    preferred_batch_sizes: tuple[int, ...] = ()
    max_images_per_request: int = 64
    extra: dict = field(default_factory=dict, hash=False, compare=False)


class Backend(Protocol):
    """The daemon's engine room, as front doors see it. Thread-safe."""

    def info(self) -> ModelInfo:
        """The served model."""

    def live(self) -> bool:
        """The process is up."""

    def ready(self) -> bool:
        """Model loaded and warmed up, and not draining."""

    def submit(self, images: Sequence[bytes], timeout_s: float | None = None, source: str = "",
               keys: Sequence[str] | None = None) -> list[Record]:
        """Recognise ``images``; block until every one has a record (or raise ``ServeError``).

        Args:
            images: encoded images (JPEG, PNG, ...), at most ``info().max_images_per_request``.
            timeout_s: give up after this long (``ServeError("timeout")``); None = the server default.
            source: the front door, for records and metrics ("http", "zmq", ...).
            keys: the records' keys, one per image (a file's name, a stream's name); None gives
                request-unique ids ``"{source}-{request}-{i}"``.

        Returns:
            One record per image, in order.
        """

    def stats(self) -> dict:
        """Counters for ``/v2/models/{model}/stats``: success/fail counts and durations in ns."""
