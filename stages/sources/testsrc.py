"""A test pattern: synthetic frames, endless unless told how many (as FFmpeg's ``testsrc``).

``wanwu run testsrc: --out r.jsonl`` runs the whole topology on generated frames,
with no file or network I/O: a smoke test of an installation, and the ceiling of
the pipeline without decoding. Options follow the colon, comma-separated::

    testsrc:frames=1000          # end after 1000 frames (default 0: endless)
    testsrc:fps=25               # pace frames as a camera would (default 0: as fast as taken)
    testsrc:size=320x240         # frames of exactly this size (default: the model's input)
    testsrc:device=cuda:0        # declare frames in device memory (for planning only)

Frame ``i`` is a colour gradient shifted by ``i`` pixels, so consecutive frames differ.
Keys are ``testsrc/000000000``, ``testsrc/000000001``, ... in order.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from wanwu.errors import ConfigError
from wanwu.specs import FrameSpec, Preprocess
from wanwu.stages.sources.base import FrameInfo, FrameSource

logger = logging.getLogger(__name__)


class TestPatternSource(FrameSource):
    """Generated frames; see the module docstring for the options."""

    __test__ = False  # not a pytest test class, whatever its name says
    kind = "testsrc"

    def __init__(self, location: str, preprocess: Preprocess) -> None:
        super().__init__(location, preprocess)
        options = _options(location)
        try:
            self.frames = int(options.pop("frames", 0))
            self.fps = float(options.pop("fps", 0))
            height, width = _size(options.pop("size", ""), preprocess.frame.shape[:2])
        except ValueError as exc:
            raise ConfigError(f"expected testsrc:frames=N,fps=F,size=WxH, got {location!r}: {exc}") from exc
        self.device = options.pop("device", "cpu")
        if options or self.frames < 0 or self.fps < 0:
            raise ConfigError(f"expected testsrc options frames >= 0, fps >= 0, size, device; got {location!r}")
        self.spec = FrameSpec((height, width, 3), "uint8", self.device, "HWC")
        self.endless = self.frames == 0
        self._next = 0  # index of the next frame
        self._t_start = 0.0  # when frame 0 was handed over (for fps pacing)
        self._base: np.ndarray | None = None  # the gradient, twice as wide, built on first use

    def output_spec(self) -> FrameSpec:
        return self.spec

    def _read_into(self, out: np.ndarray, timeout_s: float) -> FrameInfo | None:
        if self.frames and self._next >= self.frames:
            self.ended = True
            return None
        if self.fps > 0:
            if self._next == 0:
                self._t_start = time.monotonic()
            wait = self._t_start + self._next / self.fps - time.monotonic()
            if wait > timeout_s:
                time.sleep(max(0.0, timeout_s))
                return None
            if wait > 0:
                time.sleep(wait)
        height, width = self.spec.shape[:2]
        if self._base is None:
            y, x = np.mgrid[0:height, 0:2 * width]
            self._base = np.stack([x * 255 // (2 * width), y * 255 // height, (x + y) % 256], -1).astype(np.uint8)
        shift = self._next % width
        out[...] = self._base[:, shift:shift + width]
        info = FrameInfo(f"testsrc/{self._next:09d}", self.location, width, height)
        self._next += 1
        return info


def _options(location: str) -> dict[str, str]:
    _, _, text = location.partition(":")
    options = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, eq, value = part.partition("=")
        if not eq:
            raise ConfigError(f"expected testsrc options as name=value, got {part!r} in {location!r}")
        options[name.strip()] = value.strip()
    return options


def _size(text: str, default: tuple[int, ...]) -> tuple[int, int]:
    """(height, width) from ``WxH`` or ``N`` (square); ``default`` when empty."""
    if not text:
        return int(default[0]), int(default[1])
    width, x, height = text.lower().partition("x")
    return (int(height), int(width)) if x else (int(width), int(width))
