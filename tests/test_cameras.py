"""Live streams: a real RTSP camera (GStreamer's RTSP server on 127.0.0.1) recognised with the right labels,
a camera that goes away and comes back, and one that never answers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from PIL import Image

from conftest import run_wanwu, wanwu_cmd
from videokit import SCENES, RtspCamera, SilentServer
from wanwu.specs import Preprocess
from wanwu.stages.sinks.base import read_records

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def scene_labels(tmp_path_factory, photos) -> set[str]:
    """The top-1 labels of the camera's photos as stills."""
    folder = tmp_path_factory.mktemp("stills")
    for name in SCENES:
        Image.fromarray(photos[name]).resize((640, 480), Image.BICUBIC).save(folder / f"{name}.png")
    out = folder / "r.jsonl"
    assert run_wanwu("run", str(folder), "--out", str(out), "--progress", "none").returncode == 0
    return {r["labels"][0]["label"] for r in read_records(str(out))}


def test_a_live_camera_is_recognised_until_the_duration(tmp_path: Path, photos, scene_labels):
    with RtspCamera(tmp_path / "cam", photos) as camera:
        out = tmp_path / "r.sqlite"
        stats = tmp_path / "stats.json"
        t0 = time.monotonic()
        proc = run_wanwu("run", camera.url, "--out", str(out), "--progress", "none", "--fps", "2",
                         "--duration", "7", "--stats-json", str(stats), timeout=120)
        took = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr  # a live stream's normal end
    assert took < 40
    records = read_records(str(out))
    assert len(records) >= 6 and all(r["error"] is None for r in records), records
    assert {r["labels"][0]["label"] for r in records} == scene_labels  # every photo of the loop, nothing else
    for r in records:
        frame = r["frame"]
        assert frame["stream"] == f"127.0.0.1:{camera.port}/cam" and frame["time"].endswith("Z")
        assert r["key"] == f"{frame['stream']}@{frame['time']}" and (r["width"], r["height"]) == (640, 480)
    counts = json.loads(stats.read_text())["streams"][camera.url]
    assert counts["decoded"] > counts["sampled"] >= len(records) and counts["reconnects"] == 0


def test_a_camera_that_drops_and_comes_back_continues(tmp_path: Path, photos, scene_labels):
    camera = RtspCamera(tmp_path / "cam", photos).start()
    out = tmp_path / "r.jsonl"
    stats = tmp_path / "stats.json"
    job = subprocess.Popen(wanwu_cmd("run", camera.url, "--out", str(out), "--progress", "none", "--fps", "2",
                                     "--duration", "24", "--read-timeout", "2", "--stats-json", str(stats)),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(7)
        camera.stop()  # the camera goes away mid-stream
        stopped_at = time.time()
        time.sleep(4)
        camera.start()  # and comes back on the same address
        _, stderr = job.communicate(timeout=120)
    finally:
        camera.stop()
        job.kill()
    assert job.returncode == 0, stderr
    records = read_records(str(out))
    times = sorted(r["frame"]["time"] for r in records)
    after = [t for t in times if _epoch(t) > stopped_at + 4]
    assert after, f"nothing recognised after the camera came back: {times}"
    assert {r["labels"][0]["label"] for r in records if r["frame"]["time"] in after} <= scene_labels
    counts = json.loads(stats.read_text())["streams"][camera.url]
    assert counts["reconnects"] >= 1
    assert "reconnects" in stderr


def test_a_camera_that_never_answers_is_a_clear_error_within_the_timeout(tmp_path: Path):
    with SilentServer() as silent:
        out = tmp_path / "r.jsonl"
        url = f"rtsp://127.0.0.1:{silent.port}/cam"
        t0 = time.monotonic()
        proc = run_wanwu("run", url, "--out", str(out), "--progress", "none", "--open-timeout", "2", timeout=60)
        took = time.monotonic() - t0
    assert proc.returncode == 3, proc.stderr  # finished with an error record
    assert took < 30
    (record,) = read_records(str(out))
    assert record["key"] == f"127.0.0.1:{silent.port}/cam@open" and record["error"]["type"] == "ReadError"
    assert "open timeout 2 s" in record["error"]["message"]


def _epoch(iso: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def assert_one_binder_per_address(daemon) -> None:
    """Each of the daemon's ipc addresses is bound by one process: the dispatcher owns the work
    address beside the cameras' reader (which feeds no decoder)."""
    from conftest import children_of, listening_unix_paths

    paths = listening_unix_paths([daemon.proc.pid, *children_of(daemon.proc.pid)])
    assert any(p.endswith("/work") for p in paths), paths
    assert len(paths) == len(set(paths)), sorted(paths)


def test_the_daemon_recognises_cameras_beside_its_doors_and_counts_them(tmp_path: Path, photos, images,
                                                                        scene_labels):
    from bench.attacks import infer_seconds, metric

    from conftest import Served

    camera = RtspCamera(tmp_path / "cam", photos).start()
    out = tmp_path / "cameras.jsonl"
    down = f"rtsp://127.0.0.1:{camera.port + 1 if camera.port < 65535 else 1}/none"  # nothing listens there
    daemon = Served("--camera", f"front={camera.url}", "--camera", f"back={down}", "--camera-out", str(out),
                    "--fps", "2", "--read-timeout", "2")
    m = daemon.addresses["metrics"]
    try:
        deadline = time.monotonic() + 60
        while metric(m, "wanwu_stream_frames_total", 'stream="front",what="recognised"') < 4:
            assert time.monotonic() < deadline, "the camera's frames were not recognised"
            time.sleep(0.5)
        assert_one_binder_per_address(daemon)
        assert infer_seconds(daemon.url, images["chelsea"]) < 30  # the doors answer beside the cameras
        assert metric(m, "wanwu_stream_up", 'stream="front"') == 1
        assert metric(m, "wanwu_stream_up", 'stream="back"') == 0  # down, and the daemon is still ready
        assert metric(m, "wanwu_ready") == 1
        camera.stop()
        time.sleep(5)
        camera.start()
        recognised = metric(m, "wanwu_stream_frames_total", 'stream="front",what="recognised"')
        while metric(m, "wanwu_stream_frames_total", 'stream="front",what="recognised"') < recognised + 4:
            assert time.monotonic() < deadline + 60, "the camera was not recognised again after it came back"
            time.sleep(0.5)
        assert metric(m, "wanwu_stream_reconnects_total", 'stream="front"') >= 1
        assert metric(m, "wanwu_stream_reconnects_total", 'stream="back"') >= 1
        assert metric(m, "wanwu_stream_frames_total", 'stream="front",what="decoded"') > recognised
        # The process that reads the cameras dies (a native decoder's crash): it is replaced, and reading goes on.
        (loader,) = daemon.worker_pids("loader")
        os.kill(loader, signal.SIGKILL)
        recognised = metric(m, "wanwu_stream_frames_total", 'stream="front",what="recognised"')
        while metric(m, "wanwu_stream_frames_total", 'stream="front",what="recognised"') < recognised + 4:
            assert time.monotonic() < deadline + 120, "the cameras were not read again after their reader died"
            time.sleep(0.5)
        assert metric(m, "wanwu_worker_restarts_total", 'stage="loader"') == 1
        assert_one_binder_per_address(daemon)  # the new reader took no address of the doors' either
        assert infer_seconds(daemon.url, images["chelsea"]) < 30
        assert metric(m, "wanwu_ready") == 1
    finally:
        code = daemon.stop()
        print(daemon.stderr[-6000:])  # shown by pytest when the test fails
        assert code == 0, daemon.stderr
        camera.stop()
    records = read_records(str(out))
    fronts = [r for r in records if r["key"].startswith("front@")]
    assert len(fronts) >= 8 and {r["labels"][0]["label"] for r in fronts} <= scene_labels
    assert all(r["frame"]["stream"] == "front" for r in fronts)


def test_cameras_in_the_daemon_config(tmp_path: Path):
    from wanwu.errors import ConfigError
    from wanwu.pipeline.serve.config import ServeConfig

    toml = tmp_path / "serve.toml"
    toml.write_text('[cameras]\ngate = "rtsp://10.0.0.5/s1"\ndock = "udp://239.0.0.1:1234"\n'
                    '[out]\ncamera_out = "cams.sqlite"\nfps = 2\n', encoding="utf-8")
    cfg = ServeConfig.from_toml(str(toml))
    assert cfg.camera_urls() == {"gate": "rtsp://10.0.0.5/s1", "dock": "udp://239.0.0.1:1234"}
    sources = cfg.camera_sources(Preprocess())
    assert [(s.name, s.named, s.endless, s.config.retry_unopened) for s in sources] == [
        ("gate", True, True, True), ("dock", True, True, True)]  # cameras retry forever, even never opened
    assert sources[0].config.sampling.fps == 2
    with pytest.raises(ConfigError, match="NAME=URL"):
        ServeConfig.build({"cameras": ["gate"], "camera_out": "c.jsonl"})
    with pytest.raises(ConfigError, match="twice"):
        ServeConfig.build({"cameras": ["a=rtsp://h/1", "a=rtsp://h/2"], "camera_out": "c.jsonl"})
    with pytest.raises(ConfigError, match="camera_out"):
        ServeConfig.build({"cameras": ["a=rtsp://h/1"]})
    with pytest.raises(ConfigError, match="different files"):
        ServeConfig.build({"cameras": ["a=rtsp://h/1"], "camera_out": "r.jsonl", "out": "r.jsonl", "watch": "w"})
