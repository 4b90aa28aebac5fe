"""Command-line options for video files and live streams, shared by ``wanwu run`` and ``wanwu serve``."""

from __future__ import annotations

import argparse
import logging
import os

from wanwu.errors import ConfigError

logger = logging.getLogger(__name__)


def non_negative(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text}")
    return value


def add_video_options(p: argparse.ArgumentParser, defaults: bool = True) -> None:
    """The video group: frame selection, timeouts and transport. ``defaults=False`` leaves them None
    (a config file's values then stand)."""
    d = (lambda value: value) if defaults else (lambda value: None)
    g = p.add_argument_group("video", "for video files and stream URLs (rtsp://, http://, tcp://, udp://)")
    g.add_argument("--fps", type=non_negative, default=d(0.0),
                   help="recognise at most N frames per second of stream time (0: every frame)")
    g.add_argument("--every", type=int, default=d(1), metavar="N", help="then every N-th of those")
    g.add_argument("--keyframes", action="store_true", default=d(False),
                   help="decode key frames only (skips most of the decoding)")
    g.add_argument("--dedupe", type=non_negative, default=d(0.0), metavar="DIFF",
                   help="skip a frame whose 16x16 grey thumbnail differs from the last recognised one by less "
                        "than DIFF (mean absolute, 0-255; about 2 for a static scene; 0: off)")
    g.add_argument("--rtsp-transport", choices=("tcp", "udp"), default=d("tcp"), help="RTSP over TCP or UDP")
    g.add_argument("--open-timeout", dest="open_timeout_s", type=non_negative, default=d(10.0), metavar="S",
                   help="give up connecting to a stream after S seconds")
    g.add_argument("--read-timeout", dest="read_timeout_s", type=non_negative, default=d(10.0), metavar="S",
                   help="reopen a stream silent for S seconds")


def expand_inputs(inputs: list[str]) -> list[str]:
    """Inputs with each list file of video locations (``@streams.txt``) replaced by its lines.

    A list file whose first entry is a video file or stream URL lists streams; one of
    images stays a list file (an image source). Blank lines and ``#`` comments are skipped.

    Raises:
        ConfigError: a list file mixes streams with images, or cannot be read.
    """
    from wanwu.stages.sources.video import is_video

    out: list[str] = []
    for location in inputs:
        if not location.startswith("@") or not os.path.isfile(location[1:]):
            out.append(location)
            continue
        try:
            with open(location[1:], encoding="utf-8") as f:
                lines = [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read the list file {location[1:]!r}: {exc}") from exc
        if not lines or not is_video(lines[0]):
            out.append(location)
            continue
        strays = [line for line in lines if not is_video(line)]
        if strays:
            raise ConfigError(f"expected {location[1:]} to list only video files or stream URLs, got {strays[0]!r}")
        out += lines
    return out
