"""Sources: where inputs come from. Two kinds.

* A ``Source`` (byte source: folders, list files, LMDB archives) enumerates inputs
  and reads their encoded bytes, which decoders then turn into frames. Contract:
  ``scan()`` yields every input exactly once, in a deterministic order (so a
  resumed job sees the same stream), without reading image bytes; ``read(item)``
  returns the encoded bytes or raises ``ReadError``.
* A ``FrameSource`` (video files, cameras, test patterns) decodes by itself and
  writes each frame straight into a buffer it is handed, with its own metadata.
  It declares its frames (``output_spec``) before it runs, and may be endless.

Sources are built where the job is planned and pickled to the process that reads
them, so they open files, archives and streams lazily, on first use.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Iterator

import numpy as np

from wanwu.errors import ConfigError, StageError
from wanwu.registry import Registry
from wanwu.specs import FrameSpec, Preprocess

if TYPE_CHECKING:
    from wanwu.stages.sources.video import VideoConfig

# Extensions a folder scan picks up (compared lower-case).
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".bmp", ".dib", ".tif", ".tiff", ".gif"}
)


@dataclass(frozen=True)
class SourceItem:
    """One input, as the loader sees it before reading it."""

    key: str  # unique name of the input within the job; the record's "key"
    source: str  # the folder, list file or archive it came from; the record's "source"
    locator: str  # how the source finds it again: an absolute path, or an LMDB key
    position: str = ""  # where ``scan_range`` starts at this item ("": the locator)


class Source(ABC):
    """Base of every byte source."""

    kind: ClassVar[str] = "base"
    endless: ClassVar[bool] = False  # byte sources end when their scan does

    def __init__(self, location: str) -> None:
        self.location = location
        self._closed = False

    @abstractmethod
    def scan(self) -> Iterator[SourceItem]:
        """Yield every input once, in a deterministic order."""

    @abstractmethod
    def read(self, item: SourceItem, max_bytes: int | None = None) -> bytes | memoryview:
        """The encoded bytes of ``item``. Raises ``ReadError`` if they cannot be read, or if there
        are more than ``max_bytes`` of them (None: no bound; then they are not read)."""

    def scan_range(self, start: str | None = None, stop: str | None = None) -> Iterator[SourceItem]:
        """The items from the one at position ``start`` up to, not including, the one at ``stop``.

        A shard of the scan, for runners that split a job between machines
        (``wanwu run --ray``): positions are those of the items ``scan_range()`` yields,
        and ``scan_range(a, b)`` then ``scan_range(b, c)`` yield the items of
        ``scan_range(a, c)``. Unlike ``scan()``, it never drops an item as a repeat of
        one outside the range (a list file's line listed twice is yielded twice);
        the ledger that receives the records keeps one per key.
        """
        return self._scan_range(start, stop)

    def _scan_range(self, start: str | None, stop: str | None) -> Iterator[SourceItem]:
        """Hook: sources that can seek override this; the default walks ``scan()`` from the start."""
        started = start is None
        for item in self.scan():
            position = item.position or item.locator
            if not started:
                started = position == start
                if not started:
                    continue
            if stop is not None and position == stop:
                return
            yield item

    def shutdown(self) -> None:
        """Close files or environments. Safe to call twice."""
        if not self._closed:
            self._closed = True
            self._shutdown()

    def _shutdown(self) -> None:
        """Hook for subclasses holding resources."""


@dataclass(frozen=True)
class FrameInfo:
    """What a frame source says about the frame it just wrote."""

    key: str  # unique within the job; the record's "key"
    source: str  # the stream or file it came from; the record's "source"
    width: int  # of the frame as captured (before resizing for the model), in pixels
    height: int
    meta: dict | None = None  # where in its stream the frame was: stream, frame index, pts_s, time; the record's "frame"


@dataclass(frozen=True)
class FrameFailure:
    """What a frame source says instead of a frame it could not produce; becomes an error record."""

    key: str  # unique within the job, as a frame's key would be
    source: str
    error: Exception  # a WanwuError subclass naming what was expected and what came


class FrameSource(ABC):
    """Base of every frame source. ``read_into`` is fixed; subclasses implement ``_read_into``.

    Args:
        location: what the user named (a file, a URL, ``testsrc:...``).
        preprocess: the geometry the model wants; a source resizes and crops its frames
            to ``preprocess.frame`` unless its options say otherwise.
    """

    kind: ClassVar[str] = "base"

    def __init__(self, location: str, preprocess: Preprocess) -> None:
        self.location = location
        self.preprocess = preprocess
        self.endless = False  # a live stream never ends by itself; set by subclasses
        self.ended = False  # set once the last frame was handed over
        self.named = False  # the user named this stream: its keys are unique without the input's path
        self._closed = False

    def output_spec(self) -> FrameSpec:
        """What one frame looks like, declared before anything runs."""
        return self.preprocess.frame

    def stats(self) -> dict:
        """Counters of the source's own (a video stream's frames decoded, sampled, ...); {} if it keeps none."""
        return {}

    def read_into(self, out: np.ndarray, timeout_s: float) -> FrameInfo | FrameFailure | None:
        """Write the next frame into ``out``. Do not override: implement ``_read_into``.

        Returns:
            The frame's metadata; a ``FrameFailure`` for a frame (or a whole stream) that
            could not be read, after which reading goes on; or None when no frame came
            within ``timeout_s`` (then ``ended`` tells whether one ever will).

        Raises:
            StageError: ``out`` does not match ``output_spec()``, or the source broke for good.
        """
        spec = self.output_spec()
        if out.shape != spec.shape or out.dtype != np.dtype(spec.dtype):
            raise StageError(f"expected a frame buffer of {spec.describe()}, got {out.shape} {out.dtype}")
        if self.ended:
            return None
        return self._read_into(out, timeout_s)

    @abstractmethod
    def _read_into(self, out: np.ndarray, timeout_s: float) -> FrameInfo | FrameFailure | None:
        """Hook: write one frame, report a failure, or return None (setting ``ended`` when there will be no more)."""

    def shutdown(self) -> None:
        """Close streams and files. Safe to call twice."""
        if not self._closed:
            self._closed = True
            self._shutdown()

    def _shutdown(self) -> None:
        """Hook for subclasses holding resources."""


SOURCES: Registry[Source] = Registry("source")
SOURCES.register("folder", "wanwu.stages.sources.folder:FolderSource")
SOURCES.register("list", "wanwu.stages.sources.listfile:ListFileSource")
SOURCES.register("lmdb", "wanwu.stages.sources.lmdb:LmdbSource")

# Frame sources, chosen by the scheme of the location ("testsrc:...").
FRAME_SOURCES: Registry[FrameSource] = Registry("frame source")
FRAME_SOURCES.register("testsrc", "wanwu.stages.sources.testsrc:TestPatternSource")
FRAME_SOURCES.register("video", "wanwu.stages.sources.video:VideoSource")  # files and stream URLs, by is_video


def source_kind(location: str) -> str:
    """Which source a command-line input names: a frame source's scheme (``testsrc:``), a
    video file or stream URL (``video``), ``@list.txt``, an LMDB archive, or a folder."""
    import os

    from wanwu.stages.sources.video import is_video  # light: PyAV is imported when a stream opens

    scheme, colon, _ = location.partition(":")
    if colon and scheme in FRAME_SOURCES:
        return scheme
    if is_video(location):
        return "video"
    if location.startswith("@"):
        return "list"
    if os.path.isdir(location):
        # An LMDB environment is a folder holding data.mdb.
        return "lmdb" if os.path.isfile(os.path.join(location, "data.mdb")) else "folder"
    if os.path.isfile(location) and location.endswith((".lmdb", ".mdb")):
        return "lmdb"
    raise ConfigError(f"expected a folder, an LMDB archive, @list.txt, a video file or stream URL, or one of "
                      f"{', '.join(f'{n}:' for n in FRAME_SOURCES.names() if n != 'video')}, got {location!r}")


def job_key(location: str, key: str, several_inputs: bool) -> str:
    """The key of an input's item within a job: with several inputs, folder, archive and
    frame-source keys get the input as given as a prefix, so the same name in two folders
    stays two records (list-file keys are already the paths as written); a video frame's
    key names the input as given in place of the stream's short name."""
    kind = source_kind(location) if several_inputs else ""
    if kind == "video":  # "<name>@<when>" becomes "<input as given>@<when>"
        return f"{location}@{key.rpartition('@')[2]}"
    if several_inputs and kind != "list":
        return f"{location.rstrip('/')}/{key}"
    return key


def open_source(location: str, preprocess: Preprocess = Preprocess(), video: "VideoConfig | None" = None,
                name: str | None = None) -> Source | FrameSource:
    """Build (not open) the source for one command-line input.

    Args:
        location: what the user named.
        preprocess: the model's geometry, which frame sources deliver their frames in.
        video: how video inputs are sampled and reconnected; None = the defaults.
        name: a video stream's name in keys and records (``serve --camera NAME=URL``).
    """
    kind = source_kind(location)
    if kind == "video":
        from wanwu.stages.sources.video import VideoConfig, VideoSource

        return VideoSource(location, preprocess, video or VideoConfig(), name)
    if kind in FRAME_SOURCES:
        return FRAME_SOURCES.create(kind, location, preprocess)
    return SOURCES.create(kind, location[1:] if kind == "list" else location)


def open_byte_source(location: str) -> Source:
    """Build the byte source for ``location``; a frame source (which has no bytes to store) is refused.

    Raises:
        ConfigError: ``location`` is not a folder, LMDB archive or list file.
    """
    source = open_source(location)
    if not isinstance(source, Source):
        raise ConfigError(f"expected a folder, an LMDB archive or @list.txt, got {location!r}, a "
                          f"{source.kind} frame source (its frames have no encoded bytes to store)")
    return source
