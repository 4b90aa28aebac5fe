"""Test helpers for video: clips made with PyAV from real photos, and a real RTSP camera on 127.0.0.1."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

RTSP_SERVER = Path(__file__).with_name("rtsp_server.py")
SYSTEM_PYTHON = "/usr/bin/python3"  # Debian's, which has the GStreamer bindings (python3-gi)
SCENES = ("coffee", "chelsea", "rocket")  # photos the model names with confidence: espresso, cat, rocket


def make_clip(path: Path, photos: dict[str, np.ndarray], names=SCENES, fps: int = 10, seconds_each: int = 1,
              size: tuple[int, int] = (640, 480), gop: int = 10, codec: str = "h264") -> list[tuple[float, str]]:
    """Encode ``names``' photos, each held ``seconds_each`` seconds, as a video; returns (pts seconds, name) per frame."""
    import av

    frames = []
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        stream.options = {"g": str(gop), "bf": "0"}
        i = 0
        for name in names:
            rgb = np.asarray(Image.fromarray(photos[name]).resize(size, Image.BICUBIC))
            for _ in range(fps * seconds_each):
                frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
                frame.pts = i
                for packet in stream.encode(frame):
                    container.mux(packet)
                frames.append((i / fps, name))
                i += 1
        for packet in stream.encode():
            container.mux(packet)
    return frames


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def have_rtsp_server() -> str:
    """Why the RTSP camera cannot run here, or "" when it can."""
    if not os.path.exists(SYSTEM_PYTHON):
        return f"{SYSTEM_PYTHON} is missing"
    probe = subprocess.run([SYSTEM_PYTHON, "-c", "import gi; gi.require_version('GstRtspServer', '1.0'); "
                            "from gi.repository import GstRtspServer"], capture_output=True, text=True)
    if probe.returncode:
        return ("Debian's GStreamer RTSP server is missing: apt-get install python3-gi gir1.2-gst-rtsp-server-1.0 "
                "gstreamer1.0-plugins-good gstreamer1.0-plugins-bad gstreamer1.0-plugins-ugly (.ci/run does)")
    return ""


class RtspCamera:
    """``rtsp://127.0.0.1:PORT/cam`` serving photos in a loop, live; ``stop()`` and ``start()`` again at will."""

    def __init__(self, folder: Path, photos: dict[str, np.ndarray], fps: int = 10, port: int = 0) -> None:
        why = have_rtsp_server()
        if why:
            pytest.skip(why)
        self.folder, self.fps = folder, fps
        self.port = port or free_port()
        folder.mkdir(parents=True, exist_ok=True)
        for i, name in enumerate(SCENES):
            Image.fromarray(photos[name]).resize((640, 480), Image.BICUBIC).save(folder / f"{i:03d}.jpg", quality=92)
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"rtsp://127.0.0.1:{self.port}/cam"

    def start(self) -> "RtspCamera":
        self.proc = subprocess.Popen([SYSTEM_PYTHON, str(RTSP_SERVER), str(self.port), str(self.folder),
                                      str(self.fps)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()  # type: ignore[union-attr]
        if line.strip() != "ready":
            self.stop()
            raise RuntimeError(f"the RTSP server did not start: {line!r}")
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.communicate()
            self.proc = None

    def __enter__(self) -> "RtspCamera":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class SilentServer:
    """A TCP server on 127.0.0.1 that accepts connections and never says a word (a hung camera)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]

    def __enter__(self) -> "SilentServer":
        return self

    def __exit__(self, *exc) -> None:
        self.sock.close()


def wait_until(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)
