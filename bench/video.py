"""The video part of ``wanwu bench``: a 1080p H.264 file and concurrent live 1080p30 streams.

Every row stands beside the loop people write first: OpenCV ``VideoCapture`` + the
same torch model as the image baselines (configured for this CPU), every N-th
frame; measured in the same run.

* A file at ``--fps 1``, ``--fps 5``, every frame, and ``--keyframes``. The OpenCV loop
  cannot skip decoding: it ``grab()``\\ s every frame and ``retrieve()``\\ s every N-th.
  Figures are whole-command wall times (start-up and model loading included, for both).
* Live streams: N copies of the clip served in real time as MPEG-TS over TCP (remuxed,
  not re-encoded), which the readers connect to, at ``--fps 2`` for ``STREAM_SECONDS``.
  A configuration keeps up when every stream was read at >= 95% of 30 frames/s and
  (wanwu) >= 95% of the frames it sampled were recognised. TCP pushes back on a reader
  that falls behind, so falling behind shows as a lower read rate. The OpenCV loop
  reads each stream in a thread of its own (OpenCV releases the GIL) and shares one
  model, as its users write it.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

CLIP_SECONDS, CLIP_FPS, CLIP_GOP = 30, 30, 60  # a camera-like GOP: a key frame every 2 s
STREAM_SECONDS = 20.0
KEEP_UP = 0.95


def make_clip(path: Path, seconds: int = CLIP_SECONDS, fps: int = CLIP_FPS) -> Path:
    """A 1080p H.264 clip panning slowly across real photos (so frames differ), made once."""
    if path.exists():
        return path
    import av
    import skimage.data as data
    from PIL import Image

    photos = [data.coffee(), data.chelsea(), data.astronaut(), data.rocket()]
    tmp = path.with_suffix(".part.mp4")
    with av.open(str(tmp), "w") as container:
        stream = container.add_stream("h264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 1920, 1080, "yuv420p"
        stream.options = {"g": str(CLIP_GOP), "bf": "0", "preset": "veryfast", "crf": "23"}
        per_photo = seconds * fps // len(photos)
        for i in range(seconds * fps):
            big = np.asarray(Image.fromarray(photos[min(i // per_photo, len(photos) - 1)]).resize((2112, 1188)))
            shift = (i % per_photo) * 192 // per_photo  # a slow pan, 192 pixels per photo
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(big[54:1134, shift:shift + 1920]),
                                               format="rgb24")
            frame.pts = i
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    tmp.rename(path)
    return path


def wanwu_file(clip: Path, workdir: Path, mode: dict) -> dict:
    """``wanwu run`` on the clip with ``mode``'s options: wall time and the stream's counts."""
    out, stats = workdir / "video-run.jsonl", workdir / "video-stats.json"
    for p in (out, stats):
        p.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "wanwu", "run", str(clip), "--out", str(out), "--progress", "none",
           "--stats-json", str(stats), *mode["wanwu"]]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    wall = time.perf_counter() - t0
    counts = next(iter(json.loads(stats.read_text())["streams"].values()))
    return {"wall_s": wall, "decoded": counts["decoded"], "recognised": counts["recognised"]}


def opencv_file(clip: Path, every: int, model: str) -> dict:
    """The loop people write first: VideoCapture, every ``every``-th frame through the torch model."""
    code = _OPENCV_LOOP.format(clip=str(clip), every=every, model=model)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    decoded, recognised = (int(x) for x in proc.stdout.split())
    return {"wall_s": wall, "decoded": decoded, "recognised": recognised}


# Run in a process of its own so its model and threads start as a user's script would.
_OPENCV_SETUP = '''
import threading, time, cv2, numpy as np, torch
from wanwu.bench.baselines import _torch_model, baseline_settings
from wanwu.stages.engines.hw import cpu_count, cpuinfo_text
settings = baseline_settings("naive", cpuinfo_text(), cpu_count())
spec, run = _torch_model("{model}", settings)
p = spec.preprocess
mean = np.array(p.mean, np.float32) * 255; std = np.array(p.std, np.float32) * 255
def tensor(bgr):
    h, w = bgr.shape[:2]; s = p.resize_shorter / min(h, w)
    img = cv2.resize(bgr, (round(w * s), round(h * s)), interpolation=cv2.INTER_AREA)
    y, x = (img.shape[0] - p.crop) // 2, (img.shape[1] - p.crop) // 2
    rgb = img[y:y + p.crop, x:x + p.crop, ::-1].astype(np.float32)
    return torch.from_numpy(((rgb - mean) / std).transpose(2, 0, 1).copy()).unsqueeze(0)
'''

_OPENCV_LOOP = _OPENCV_SETUP + '''
cap = cv2.VideoCapture("{clip}", cv2.CAP_FFMPEG)
i = done = 0
while cap.grab():
    if i % {every} == 0:
        ok, bgr = cap.retrieve()
        run(tensor(bgr)).softmax(-1).topk(5)
        done += 1
    i += 1
print(i, done)
'''


def file_rows(clip: Path, workdir: Path, model: str) -> list[dict]:
    """The file rows: each mode, wanwu then the OpenCV loop."""
    modes = [
        {"name": "--fps 1", "wanwu": ["--fps", "1"], "every": CLIP_FPS},
        {"name": "--fps 5", "wanwu": ["--fps", "5"], "every": CLIP_FPS // 5},
        {"name": "every frame", "wanwu": [], "every": 1},
        {"name": "--keyframes", "wanwu": ["--keyframes"], "every": CLIP_GOP},
    ]
    rows = []
    for mode in modes:
        ours = wanwu_file(clip, workdir, mode)
        theirs = opencv_file(clip, mode["every"], model)
        rows.append({"mode": mode["name"], "wanwu": ours, "opencv": theirs})
        logger.info("video %s: wanwu %.1f s, OpenCV loop %.1f s", mode["name"], ours["wall_s"], theirs["wall_s"])
    return rows


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Streamer:
    """Serves the clip, in a loop and in real time, as MPEG-TS on ``tcp://127.0.0.1:port`` to the one reader
    that connects (remuxed, not re-encoded): a camera's stream, which its reader connects to."""

    def __init__(self, clip: Path, port: int, seconds: float) -> None:
        import multiprocessing

        self.clip, self.port, self.seconds = clip, port, seconds
        # A process of its own: PyAV keeps the GIL while it waits in accept(), which would stall the bench.
        self.process = multiprocessing.get_context("spawn").Process(target=self._run, daemon=True)
        self.process.start()

    def join(self, timeout_s: float = 120) -> None:
        self.process.join(timeout_s)
        if self.process.is_alive():
            self.process.kill()

    @property
    def url(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    def _run(self) -> None:
        import av

        try:  # the reader connects to this; the clock starts then
            out = av.open(f"tcp://127.0.0.1:{self.port}?listen=1&listen_timeout=60000", "w", format="mpegts")
        except av.FFmpegError:
            return
        try:
            with av.open(str(self.clip)) as src:
                vin = src.streams.video[0]
                vout = out.add_stream_from_template(vin)
                packets = [p for p in src.demux(vin) if p.dts is not None]
            out.start_encoding()  # PyAV opens (accepts) on the first write: the clock starts after it
            period = float(CLIP_SECONDS)
            t0 = time.monotonic()
            loop = 0
            while time.monotonic() - t0 < self.seconds:
                for packet in packets:
                    at = loop * period + float(packet.pts * packet.time_base)
                    wait = t0 + at - time.monotonic()
                    if wait > 0:
                        time.sleep(wait)
                    if time.monotonic() - t0 >= self.seconds:
                        break
                    shift = int(loop * period / packet.time_base)
                    packet.pts += shift
                    packet.dts += shift
                    packet.stream = vout
                    out.mux(packet)
                    packet.pts -= shift
                    packet.dts -= shift
                loop += 1
        except (av.FFmpegError, OSError):
            pass  # the reader went away
        finally:
            try:
                out.close()
            except (av.FFmpegError, OSError):
                pass


def _start_streamers(clip: Path, n: int) -> list[Streamer]:
    streamers = [Streamer(clip, _free_port(), STREAM_SECONDS) for _ in range(n)]
    time.sleep(3)  # let them start and reach accept()
    return streamers


def wanwu_streams(clip: Path, workdir: Path, n: int) -> dict:
    """N live streams into one ``wanwu run`` at --fps 2: per-stream read rate and recognised share."""
    out, stats = workdir / "streams.jsonl", workdir / "streams-stats.json"
    for p in (out, stats):
        p.unlink(missing_ok=True)
    streamers = _start_streamers(clip, n)
    cmd = [sys.executable, "-m", "wanwu", "run", *[s.url for s in streamers], "--out", str(out), "--progress",
           "none", "--fps", "2", "--duration", str(STREAM_SECONDS + 2), "--stats-json", str(stats)]
    job = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for s in streamers:
        s.join()
    job.wait(timeout=120)
    counts = json.loads(stats.read_text())["streams"].values()
    fps = [c["decoded"] / STREAM_SECONDS for c in counts]
    share = [c["recognised"] / max(1, c["sampled"]) for c in counts]
    return {"streams": n, "min_fps": min(fps), "min_recognised_share": min(share),
            "keeps_up": min(fps) >= KEEP_UP * CLIP_FPS and min(share) >= KEEP_UP}


def opencv_streams(clip: Path, n: int, model: str) -> dict:
    """N streams read by the OpenCV loop, a thread each (OpenCV releases the GIL), one shared model.

    Each thread counts what it read within the live window after it connected (as ``--duration``
    bounds wanwu): frames still buffered in the socket after the window are not reading live.
    """
    streamers = _start_streamers(clip, n)
    code = _OPENCV_STREAMS.format(urls=[s.url for s in streamers], every=CLIP_FPS // 2, model=model,
                                  window=STREAM_SECONDS + 2)
    job = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for s in streamers:
        s.join()
    stdout, stderr = job.communicate(timeout=120)
    if job.returncode:
        logger.warning("the OpenCV streams loop failed: %s", stderr[-2000:])
    counts = [tuple(int(x) for x in line.split()) for line in stdout.splitlines() if line.strip()]
    fps = [d / STREAM_SECONDS for d, _ in counts] or [0.0]
    return {"streams": n, "min_fps": min(fps), "keeps_up": len(counts) == n and min(fps) >= KEEP_UP * CLIP_FPS}


_OPENCV_STREAMS = _OPENCV_SETUP + '''
lock = threading.Lock()
counts = {{}}
def read(url):
    cap = cv2.VideoCapture(url, cv2.CAP_FFMPEG)
    end = time.monotonic() + {window}  # what it read of the live window, as wanwu's --duration counts
    i = done = 0
    while time.monotonic() < end and cap.grab():
        if i % {every} == 0:
            ok, bgr = cap.retrieve()
            x = tensor(bgr)
            with lock:
                run(x).softmax(-1).topk(5)
            done += 1
        i += 1
    counts[url] = (i, done)
threads = [threading.Thread(target=read, args=(u,)) for u in {urls}]
for t in threads: t.start()
for t in threads: t.join()
for i, done in counts.values(): print(i, done)
'''


def stream_rows(clip: Path, workdir: Path, model: str, most: int = 16) -> list[dict]:
    """1, 2, 4, ... streams, each count for wanwu and the OpenCV loop, until neither keeps up."""
    rows = []
    n = 1
    while n <= most:
        ours = wanwu_streams(clip, workdir, n)
        theirs = opencv_streams(clip, n, model)
        rows.append({"streams": n, "wanwu": ours, "opencv": theirs})
        logger.info("streams %d: wanwu keeps up %s (slowest %.1f fps), OpenCV %s (%.1f fps)", n, ours["keeps_up"],
                    ours["min_fps"], theirs["keeps_up"], theirs["min_fps"])
        if not (ours["keeps_up"] or theirs["keeps_up"]):
            break
        n *= 2
    return rows


def run_video(workdir: Path, model: str = "efficientnet_lite0", streams: bool = True) -> dict:
    """The whole video part."""
    workdir.mkdir(parents=True, exist_ok=True)
    clip = make_clip(workdir / "clip-1080p30.mp4")
    result = {"clip": {"path": clip.name, "seconds": CLIP_SECONDS, "fps": CLIP_FPS, "gop": CLIP_GOP,
                       "size": "1920x1080", "codec": "h264"},
              "files": file_rows(clip, workdir, model)}
    if streams:
        result["streams"] = stream_rows(clip, workdir, model)
    return result


def video_table(result: dict) -> str:
    """Markdown tables of the video part."""
    files = [[row["mode"], f"{row['wanwu']['recognised']} (OpenCV {row['opencv']['recognised']})",
              f"{row['wanwu']['wall_s']:.1f}", f"{row['wanwu']['decoded'] / row['wanwu']['wall_s']:.0f}",
              f"{row['opencv']['wall_s']:.1f}", f"{row['opencv']['decoded'] / row['opencv']['wall_s']:.0f}",
              f"{row['opencv']['wall_s'] / row['wanwu']['wall_s']:.2f}x"] for row in result["files"]]
    lines = _markdown(["1080p30 H.264 file (30 s)", "frames recognised", "wanwu wall s", "wanwu frames decoded/s",
                       "OpenCV loop wall s", "OpenCV frames decoded/s", "speed-up"], files)
    if result.get("streams"):
        def yes(ok: bool) -> str:
            return "yes" if ok else "no"

        streams = [[str(row["streams"]), f"{row['wanwu']['min_fps']:.1f} fps",
                    f"{row['wanwu']['min_recognised_share']:.0%}", yes(row["wanwu"]["keeps_up"]),
                    f"{row['opencv']['min_fps']:.1f} fps", yes(row["opencv"]["keeps_up"])] for row in result["streams"]]
        lines += [""] + _markdown(["live 1080p30 streams at --fps 2", "wanwu: slowest stream read at", "recognised",
                                   "keeps up", "OpenCV loop: slowest stream", "keeps up"], streams)
    return "\n".join(lines)


def _markdown(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]
