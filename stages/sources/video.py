"""Video files and live streams through PyAV (FFmpeg): sampled, de-duplicated, reconnecting.

``VideoSource`` is a frame source. A reader thread per stream demuxes, decodes
(FFmpeg's own threads; PyAV releases the GIL while it decodes), picks frames
(``FrameSampler``), and has FFmpeg's swscale resize each picked frame to the
model's geometry, so only model-sized RGB frames reach Python; the loader's
``read_into`` copies the centre crop into a shared-memory slot.

Files and live streams differ in what happens when the consumer is slow:

* a **file** loses nothing: the reader blocks on a small queue, and a rerun after a
  crash meets the same frames under the same keys (``<name>@<pts seconds>``);
* a **live stream** cannot wait: the queue holds the newest frame only, older ones
  are dropped and counted. Keys carry the wall-clock time (``<name>@<ISO 8601 UTC>``)
  since a reconnected stream restarts its timestamps. A stream that ends or breaks
  is opened again with capped exponential backoff and jitter, forever, except one
  that never opened when ``retry_unopened`` is off: that ends with an error record,
  so ``wanwu run`` on a wrong URL says so within the open timeout.

Open and read timeouts are FFmpeg's interrupt callback (PyAV's ``timeout``), which
also covers a server that accepts a connection and then says nothing.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections import deque
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import numpy as np

from wanwu.errors import ConfigError, DecodeError, ReadError
from wanwu.kernels.geometry import resized_size
from wanwu.specs import Preprocess
from wanwu.stages.sources.base import FrameFailure, FrameInfo, FrameSource
from wanwu.stages.sources.sampling import FrameSampler, SamplingConfig

logger = logging.getLogger(__name__)

LIVE_SCHEMES = ("rtsp", "rtsps", "rtmp", "http", "https", "tcp", "udp", "srt")
VIDEO_EXTENSIONS = frozenset({".mp4", ".m4v", ".mkv", ".mov", ".ts", ".m2ts", ".mts", ".avi", ".webm", ".flv",
                              ".mpg", ".mpeg", ".wmv", ".3gp", ".h264", ".h265", ".hevc"})
FILE_QUEUE = 4  # decoded frames a file's reader may run ahead of the pipeline


@dataclass(frozen=True)
class VideoConfig:
    """How video inputs are read."""

    sampling: SamplingConfig = SamplingConfig()
    keyframes: bool = False  # decode key frames only (FFmpeg skips the others before decoding them)
    rtsp_transport: str = "tcp"  # tcp | udp
    open_timeout_s: float = 10.0  # connecting and reading the stream's header
    read_timeout_s: float = 10.0  # between packets once open
    backoff_first_s: float = 0.5  # first wait before reopening a live stream
    backoff_max_s: float = 30.0  # the cap of the doubling waits
    retry_unopened: bool = False  # keep retrying a live stream that never opened (the daemon's cameras)

    def __post_init__(self) -> None:
        if self.rtsp_transport not in ("tcp", "udp"):
            raise ConfigError(f"expected rtsp transport tcp or udp, got {self.rtsp_transport!r}")
        if min(self.open_timeout_s, self.read_timeout_s, self.backoff_first_s) <= 0 or \
                self.backoff_max_s < self.backoff_first_s:
            raise ConfigError("expected positive timeouts and 0 < backoff_first_s <= backoff_max_s, got "
                              f"{self.open_timeout_s}, {self.read_timeout_s}, {self.backoff_first_s}, "
                              f"{self.backoff_max_s}")


def is_video(location: str) -> bool:
    """True for a stream URL (``rtsp://``, ``http://`` ...) or a file with a video extension."""
    scheme, sep, _ = location.partition("://")
    if sep and scheme.lower() in LIVE_SCHEMES:
        return True
    return os.path.splitext(location)[1].lower() in VIDEO_EXTENSIONS


def is_live(location: str) -> bool:
    """True for a network stream: it never ends by itself and cannot wait for a slow reader."""
    scheme, sep, _ = location.partition("://")
    return bool(sep) and scheme.lower() in LIVE_SCHEMES


def stream_name(location: str) -> str:
    """A short name for keys: a file's name, or a URL's host and path without credentials."""
    if is_live(location):
        rest = location.partition("://")[2]
        return rest.rpartition("@")[2].rstrip("/") if "@" in rest.split("/")[0] else rest.rstrip("/")
    return os.path.basename(location)


class VideoSource(FrameSource):
    """Frames of one video file or live stream; see the module docstring.

    Args:
        location: a file path or a stream URL.
        preprocess: the model's geometry; frames are resized (shorter side) and centre-cropped to it.
        config: sampling, timeouts and reconnection.
        name: the stream's name in keys and records; default ``stream_name(location)``.
    """

    kind = "video"

    def __init__(self, location: str, preprocess: Preprocess, config: VideoConfig = VideoConfig(),
                 name: str | None = None) -> None:
        super().__init__(location, preprocess)
        self.config = config
        self.name = name or stream_name(location)
        self.named = name is not None
        self.live = is_live(location)
        self.endless = self.live
        self.counts = {"decoded": 0, "sampled": 0, "duplicates": 0, "dropped": 0, "delivered": 0,
                       "errors": 0, "reconnects": 0}
        self.up = False  # a live stream is connected and delivering
        self.lag_s = 0.0  # for the last frame handed over: from its decode to its hand-over
        self._mailbox: Mailbox | None = None  # built in the reading process, with the thread
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for name in ("_mailbox", "_thread", "_stop", "_lock"):
            state.pop(name)  # threads and locks live in the process that reads
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._mailbox, self._thread = None, None
        self._stop, self._lock = threading.Event(), threading.Lock()

    def stats(self) -> dict[str, Any]:
        """A snapshot of the stream's counters, with ``up`` and ``lag_s``."""
        with self._lock:
            return {**self.counts, "up": self.up, "lag_s": round(self.lag_s, 3)}

    def _count(self, what: str, n: int = 1) -> None:
        with self._lock:
            self.counts[what] += n

    # ---- the consumer's side (the loader's thread)

    def _read_into(self, out: np.ndarray, timeout_s: float) -> FrameInfo | FrameFailure | None:
        if self._thread is None:
            self._mailbox = Mailbox(1 if self.live else FILE_QUEUE, latest_only=self.live)
            self._thread = threading.Thread(target=self._run, name=f"video:{self.name}", daemon=True)
            self._thread.start()
        assert self._mailbox is not None
        item = self._mailbox.get(timeout_s)
        if item is None:
            return None
        if item is _END:  # the reader's last word
            self.ended = True
            return None
        if isinstance(item, FrameFailure):
            return item
        pixels, info, decoded_at = item
        crop = self.preprocess.crop
        top, left = (pixels.shape[0] - crop) // 2, (pixels.shape[1] - crop) // 2
        out[...] = pixels[top:top + crop, left:left + crop]
        with self._lock:
            self.counts["delivered"] += 1
            self.lag_s = time.monotonic() - decoded_at
        return info

    # ---- the reader thread

    def _run(self) -> None:
        try:
            self._read_forever()
        except Exception as exc:  # noqa: BLE001 - a bug here must end the stream with a record, not hang it
            logger.exception("%s: the reader failed", self.name)
            self._event(FrameFailure(f"{self.name}@reader", self.location, ReadError(f"reader failed: {exc}")))
        finally:
            self.up = False
            self._event(_END)

    def _read_forever(self) -> None:
        sampler = FrameSampler(self.config.sampling)
        backoff = self.config.backoff_first_s
        opened_once = False
        while not self._stop.is_set():
            try:
                container = self._open()
            except (ReadError, DecodeError) as exc:
                if not self.live or not (opened_once or self.config.retry_unopened):
                    self._event(FrameFailure(f"{self.name}@open", self.location, exc))
                    return
                logger.warning("%s: %s; again in %.1f s", self.name, exc, backoff)
            else:
                opened_once = True
                try:
                    delivered = self._read_container(container, sampler)
                finally:
                    container.close()
                if not self.live or self._stop.is_set():
                    return
                self.up = False
                if delivered:
                    backoff = self.config.backoff_first_s  # it worked for a while: start the backoff again
                logger.warning("%s: the stream ended or broke; reopening in %.1f s", self.name, backoff)
            # Jitter spreads the reconnections of many cameras behind one failed switch.
            if self._stop.wait(backoff * random.uniform(0.8, 1.2)):
                return
            backoff = min(backoff * 2.0, self.config.backoff_max_s)
            self._count("reconnects")
            sampler.reset()

    def _open(self) -> Any:
        import av  # heavy; only in the reading process

        options = {"rtsp_transport": self.config.rtsp_transport} if self.location.startswith("rtsp") else {}
        try:
            container = av.open(self.location, options=options,
                                timeout=(self.config.open_timeout_s, self.config.read_timeout_s))
        except (av.FFmpegError, OSError) as exc:
            raise ReadError(f"cannot open {self.location!r} (open timeout {self.config.open_timeout_s:g} s): "
                            f"{exc}") from exc
        if not container.streams.video:
            container.close()
            raise DecodeError(f"expected a video stream in {self.location!r}, found none")
        return container

    def _read_container(self, container: Any, sampler: FrameSampler) -> int:
        """Decode until the stream ends or breaks; returns how many frames were queued."""
        import av

        stream = container.streams.video[0]
        stream.thread_type = "AUTO"  # frame and slice threads inside FFmpeg
        if self.config.keyframes:
            stream.codec_context.skip_frame = "NONKEY"
        queued = 0
        self.up = True
        packets = container.demux(stream)  # ends with an empty packet, which flushes the decoder
        while not self._stop.is_set():
            try:
                packet = next(packets, None)
            except (av.FFmpegError, OSError) as exc:  # a timeout, a dropped connection, a truncated file
                if not self.live:
                    self._fail(f"{self.counts['decoded']}", f"cannot read {self.location!r} on: {exc}", ReadError)
                return queued
            if packet is None:
                return queued
            try:
                frames = stream.decode(packet)
            except av.FFmpegError as exc:  # one bad packet: its frames are lost, the stream goes on
                at = f"{float(packet.pts * packet.time_base):.3f}" if packet.pts is not None else "?"
                self._fail(at, f"cannot decode {self.location!r} at {at} s: {exc}", DecodeError)
                continue
            for frame in frames:
                with self._lock:
                    index = self.counts["decoded"]
                    self.counts["decoded"] += 1
                queued += self._offer(frame, index, sampler)
        return queued

    def _fail(self, at: str, message: str, kind: type[Exception]) -> None:
        self._count("errors")
        self._event(FrameFailure(f"{self.name}@error-{at}", self.location, kind(message)))

    def _offer(self, frame: Any, index: int, sampler: FrameSampler) -> int:
        """Sample, resize and queue one decoded frame; 1 if it was queued."""
        t_s = float(frame.time) if frame.time is not None else None
        if not sampler.by_time(t_s):
            return 0
        width, height = resized_size(frame.width, frame.height, self.preprocess.resize_shorter)
        pixels = frame.reformat(width=width, height=height, format="rgb24", interpolation="AREA").to_ndarray()
        if sampler.is_duplicate(pixels):
            self._count("duplicates")
            return 0
        self._count("sampled")
        meta: dict[str, Any] = {"stream": self.name, "frame": index, "pts_s": None if t_s is None else round(t_s, 6)}
        if self.live:
            meta["time"] = datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
            key = f"{self.name}@{meta['time']}"
        else:
            key = f"{self.name}@{t_s:.3f}" if t_s is not None else f"{self.name}@frame{index}"
        info = FrameInfo(key, self.location, frame.width, frame.height, meta)
        assert self._mailbox is not None
        self._count("dropped", self._mailbox.put_frame((pixels, info, time.monotonic()), self._stop))
        return 1

    def _event(self, item: Any) -> None:
        assert self._mailbox is not None
        self._mailbox.put_event(item)

    def _shutdown(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.config.open_timeout_s + 2.0)


_END = object()  # the reader's last item


class Mailbox:
    """Frames and events from a reader thread to its consumer.

    Frames queue up to ``capacity`` (the reader then waits: nothing is lost) or, with
    ``latest_only``, replace the one waiting (the newest wins). Events (errors, the end)
    are never dropped, and come after the frames queued before them.
    """

    def __init__(self, capacity: int, latest_only: bool) -> None:
        self.capacity, self.latest_only = capacity, latest_only
        self._frames: deque = deque()
        self._events: deque = deque()
        self._cond = threading.Condition()

    def put_frame(self, item: Any, stop: threading.Event) -> int:
        """Queue a frame; returns how many waiting frames it replaced (dropped)."""
        with self._cond:
            dropped = 0
            if self.latest_only:
                dropped = len(self._frames)
                self._frames.clear()
            else:
                while len(self._frames) >= self.capacity and not stop.is_set():
                    self._cond.wait(0.1)
            self._frames.append(item)
            self._cond.notify_all()
            return dropped

    def put_event(self, item: Any) -> None:
        with self._cond:
            self._events.append(item)
            self._cond.notify_all()

    def get(self, timeout_s: float) -> Any:
        """The next frame, else the next event; None when nothing came within ``timeout_s``."""
        deadline = time.monotonic() + max(0.0, timeout_s)
        with self._cond:
            while not (self._frames or self._events):
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)
            item = self._frames.popleft() if self._frames else self._events.popleft()
            self._cond.notify_all()
            return item
