"""Which decoded video frames are recognised: by time, by count, and not twice the same scene.

Pure functions of the frames' timestamps and pixels, with no codec: the video
source feeds every decoded frame through a ``FrameSampler``, and a test can feed
it any sequence. Decisions are deterministic for a given stream, so a resumed
file run picks exactly the frames the first run picked.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from wanwu.errors import ConfigError

logger = logging.getLogger(__name__)

THUMB_SIDE = 16  # the duplicate test compares 16 x 16 grey thumbnails: cheap, and blind to noise


@dataclass(frozen=True)
class SamplingConfig:
    """How frames are picked from a stream."""

    fps: float = 0.0  # at most this many frames per second of presentation time; 0 = no limit
    every: int = 1  # then every N-th of those; 1 = each
    dedupe: float = 0.0  # skip a frame whose thumbnail differs from the last picked one by less (0-255 scale); 0 = off

    def __post_init__(self) -> None:
        if self.fps < 0 or self.every < 1 or self.dedupe < 0:
            raise ConfigError(f"expected fps >= 0, every >= 1 and dedupe >= 0, got fps={self.fps}, "
                              f"every={self.every}, dedupe={self.dedupe}")


class FrameSampler:
    """Decides, frame by frame, which to keep. One per stream; ``reset`` after a reconnect.

    Order of the tests: the time grid (``fps``), then the count (``every``), then the
    duplicate test, which needs the pixels and so runs last, on the few frames left.
    """

    def __init__(self, config: SamplingConfig) -> None:
        self.config = config
        self.duplicates = 0  # frames skipped as near-duplicates of the last picked one
        self.reset()

    def reset(self) -> None:
        """Forget the stream's timeline (a reconnected live stream starts its clock again)."""
        self._next_t: float | None = None  # presentation time from which the next frame may be taken
        self._seen = 0  # frames that passed the time grid
        self._last_thumb: np.ndarray | None = None

    def by_time(self, t_s: float | None) -> bool:
        """True when a frame presented at ``t_s`` passes the time grid and the count.

        Frames are taken on a grid of ``1 / fps`` seconds: the first frame at or after
        each grid point. A jump in time (a gap in the stream) restarts the grid there
        rather than taking a burst of frames to catch up. A frame without a timestamp
        passes the grid.
        """
        fps = self.config.fps
        if fps > 0 and t_s is not None:
            period = 1.0 / fps
            if self._next_t is not None and t_s < self._next_t - 1e-6:
                return False
            grid = self._next_t if self._next_t is not None else t_s
            self._next_t = grid + period if t_s < grid + period else t_s + period
        self._seen += 1
        return (self._seen - 1) % self.config.every == 0

    def is_duplicate(self, frame: np.ndarray) -> bool:
        """True when ``frame`` (HWC uint8) looks like the last frame kept; otherwise it becomes that frame.

        The difference is the mean absolute difference of grey thumbnails, on a 0-255 scale.
        """
        if self.config.dedupe <= 0:
            return False
        thumb = thumbnail(frame)
        if self._last_thumb is not None and float(np.abs(thumb - self._last_thumb).mean()) < self.config.dedupe:
            self.duplicates += 1
            return True
        self._last_thumb = thumb
        return False


def thumbnail(frame: np.ndarray) -> np.ndarray:
    """A ``THUMB_SIDE``-square grey float32 thumbnail of an HWC uint8 frame, by block means."""
    height, width = frame.shape[:2]
    by, bx = max(1, height // THUMB_SIDE), max(1, width // THUMB_SIDE)
    h, w = by * min(THUMB_SIDE, height), bx * min(THUMB_SIDE, width)
    grey = frame[:h, :w].astype(np.float32).mean(axis=2)
    return grey.reshape(h // by, by, w // bx, bx).mean(axis=(1, 3))
