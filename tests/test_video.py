"""Video files: frames recognised with the labels of their photos, sampled, de-duplicated, resumable, and bad
files that give error records without stopping the job."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import count_lines, run_wanwu, wanwu_cmd
from videokit import SCENES, make_clip
from wanwu.errors import ConfigError
from wanwu.pipeline.cli.video import expand_inputs
from wanwu.specs import Preprocess
from wanwu.stages.sinks.base import read_records
from wanwu.stages.sources.base import FrameFailure, FrameInfo, job_key, source_kind
from wanwu.stages.sources.sampling import FrameSampler, SamplingConfig
from wanwu.stages.sources.video import VideoSource, is_live, is_video, stream_name

pytestmark = pytest.mark.slow


# ---- the pure parts


def test_the_time_grid_takes_the_first_frame_at_or_after_each_point():
    sampler = FrameSampler(SamplingConfig(fps=2))
    times = [i / 10 for i in range(30)]  # a 10 fps stream
    assert [t for t in times if sampler.by_time(t)] == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]
    sampler = FrameSampler(SamplingConfig(fps=2))
    # A gap restarts the grid where the stream resumes, without a burst of catch-up frames.
    assert [t for t in (0.0, 0.1, 0.5, 5.0, 5.1, 5.5) if sampler.by_time(t)] == [0.0, 0.5, 5.0, 5.5]


def test_every_nth_frame_after_the_time_grid():
    sampler = FrameSampler(SamplingConfig(every=3))
    assert [i for i in range(10) if sampler.by_time(i / 25)] == [0, 3, 6, 9]
    sampler = FrameSampler(SamplingConfig(fps=5, every=2))  # 5 fps of a 10 fps stream, then every second one
    assert [i for i in range(20) if sampler.by_time(i / 10)] == [0, 4, 8, 12, 16]


def test_near_duplicates_are_skipped_and_counted():
    sampler = FrameSampler(SamplingConfig(dedupe=2.0))
    grey = np.full((64, 64, 3), 100, np.uint8)
    noisy = grey.copy()
    noisy[::7, ::5] += 3  # sensor noise on a few pixels: the same scene
    brighter = np.full((64, 64, 3), 110, np.uint8)
    assert [sampler.is_duplicate(f) for f in (grey, noisy, grey, brighter, brighter)] == [
        False, True, True, False, True]
    assert sampler.duplicates == 3
    assert not FrameSampler(SamplingConfig()).is_duplicate(grey)  # off by default
    with pytest.raises(ConfigError, match="every"):
        SamplingConfig(every=0)


def test_video_locations_are_told_apart():
    assert is_video("clip.MP4") and is_video("rtsp://cam/1") and is_video("udp://239.0.0.1:1234")
    assert not is_video("photo.jpg") and not is_video("folder")
    assert is_live("http://host/live.ts") and not is_live("/data/clip.mkv")
    assert stream_name("rtsp://user:secret@10.0.0.5:554/stream1") == "10.0.0.5:554/stream1"
    assert stream_name("/data/clip.mkv") == "clip.mkv"
    assert source_kind("rtsp://127.0.0.1:9/x") == "video"
    assert job_key("/a/clip.mp4", "clip.mp4@1.500", True) == "/a/clip.mp4@1.500"
    assert job_key("/a/clip.mp4", "clip.mp4@1.500", False) == "clip.mp4@1.500"


def test_a_list_file_of_streams_expands_and_one_of_images_stays(tmp_path: Path):
    streams = tmp_path / "cams.txt"
    streams.write_text("# cameras\nrtsp://127.0.0.1:1/a\n\nrtsp://127.0.0.1:1/b\n", encoding="utf-8")
    images = tmp_path / "images.txt"
    images.write_text("a.jpg\nb.jpg\n", encoding="utf-8")
    assert expand_inputs([f"@{streams}", f"@{images}"]) == ["rtsp://127.0.0.1:1/a", "rtsp://127.0.0.1:1/b",
                                                            f"@{images}"]
    streams.write_text("rtsp://127.0.0.1:1/a\nphoto.jpg\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="photo.jpg"):
        expand_inputs([f"@{streams}"])


# ---- the source by hand


def test_the_source_writes_model_sized_frames_with_their_place(tmp_path: Path, photos):
    clip = tmp_path / "clip.mp4"
    truth = make_clip(clip, photos)
    source = VideoSource(str(clip), Preprocess())
    out = np.zeros(source.output_spec().shape, np.uint8)
    infos = []
    while not source.ended:
        info = source.read_into(out, 1.0)
        if info is not None:
            assert isinstance(info, FrameInfo)
            infos.append(info)
    source.shutdown()
    assert [i.key for i in infos] == [f"clip.mp4@{t:.3f}" for t, _ in truth]
    assert [i.meta["frame"] for i in infos] == list(range(len(truth)))
    assert (infos[0].width, infos[0].height) == (640, 480) and out.any()
    assert source.stats()["decoded"] == source.stats()["delivered"] == len(truth)


def test_key_frames_only(tmp_path: Path, photos):
    clip = tmp_path / "clip.mp4"
    make_clip(clip, photos, gop=10)
    source = VideoSource(str(clip), Preprocess(), _config(keyframes=True))
    out = np.zeros(source.output_spec().shape, np.uint8)
    keys = []
    while not source.ended:
        info = source.read_into(out, 1.0)
        if info is not None:
            keys.append(info.key)
    assert keys == ["clip.mp4@0.000", "clip.mp4@1.000", "clip.mp4@2.000"]
    assert source.stats()["decoded"] == 3  # FFmpeg skipped the others before decoding them


def test_a_file_that_is_not_a_video_is_one_error(tmp_path: Path):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"this is not a video" * 100)
    source = VideoSource(str(bad), Preprocess())
    out = np.zeros(source.output_spec().shape, np.uint8)
    results = []
    while not source.ended:
        results.append(source.read_into(out, 1.0))
    failures = [r for r in results if isinstance(r, FrameFailure)]
    assert len(failures) == 1 and failures[0].key == "bad.mp4@open" and "cannot open" in str(failures[0].error)


def _config(**kw):
    from wanwu.pipeline.config import PipelineConfig

    return PipelineConfig(**kw).video_config()


# ---- wanwu run on files


@pytest.fixture(scope="module")
def still_labels(tmp_path_factory, photos) -> dict[str, str]:
    """Each scene's top-1 label, from `wanwu run` on the photo as a still at the clip's size."""
    folder = tmp_path_factory.mktemp("stills")
    for name in SCENES:
        Image.fromarray(photos[name]).resize((640, 480), Image.BICUBIC).save(folder / f"{name}.png")
    out = folder / "r.jsonl"
    assert run_wanwu("run", str(folder), "--out", str(out), "--progress", "none").returncode == 0
    return {r["key"].removesuffix(".png"): r["labels"][0]["label"] for r in read_records(str(out))}


def test_a_clip_is_recognised_frame_by_frame(tmp_path: Path, photos, still_labels):
    clip = tmp_path / "clip.mp4"
    truth = dict(make_clip(clip, photos))
    out = tmp_path / "r.jsonl"
    proc = run_wanwu("run", str(clip), "--out", str(out), "--progress", "none", "--fps", "2")
    assert proc.returncode == 0, proc.stderr
    records = read_records(str(out))
    assert sorted(r["frame"]["pts_s"] for r in records) == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]
    for r in records:
        assert r["error"] is None and (r["width"], r["height"]) == (640, 480)
        assert r["frame"]["stream"] == "clip.mp4" and r["key"] == f"clip.mp4@{r['frame']['pts_s']:.3f}"
        assert r["labels"][0]["label"] == still_labels[truth[r["frame"]["pts_s"]]], r
    assert "30 frames decoded, 6 sampled" in proc.stderr


def test_static_scenes_are_recognised_once_each(tmp_path: Path, photos, still_labels):
    clip = tmp_path / "clip.mp4"
    make_clip(clip, photos)
    out = tmp_path / "r.sqlite"
    stats = tmp_path / "stats.json"
    proc = run_wanwu("run", str(clip), "--out", str(out), "--progress", "none", "--dedupe", "3",
                     "--stats-json", str(stats))
    assert proc.returncode == 0, proc.stderr
    records = read_records(str(out))
    assert [r["frame"]["pts_s"] for r in records] == [0.0, 1.0, 2.0]  # one per photo: the rest are duplicates
    assert [r["labels"][0]["label"] for r in records] == [still_labels[n] for n in SCENES]
    counts = json.loads(stats.read_text())["streams"][str(clip)]
    assert counts["decoded"] == 30 and counts["duplicates"] == 27 and counts["sampled"] == 3


def test_damaged_files_give_error_records_and_the_job_goes_on(tmp_path: Path, photos):
    stream = tmp_path / "clip.ts"  # MPEG-TS has no index to lose: damage stays where it is
    make_clip(stream, photos, gop=5)
    data = bytearray(stream.read_bytes())
    rng = np.random.default_rng(0)
    middle = len(data) // 2
    data[middle:middle + 20000] = rng.integers(0, 256, 20000, dtype=np.uint8).tobytes()
    damaged = tmp_path / "damaged.ts"
    damaged.write_bytes(bytes(data[: int(len(data) * 0.8)]))  # garbage in the middle, and cut short
    clip = tmp_path / "clip.mp4"
    make_clip(clip, photos)
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(clip.read_bytes()[: clip.stat().st_size // 2])  # its index (moov) was at the end
    garbage = tmp_path / "garbage.mkv"
    garbage.write_bytes(b"\x00garbage" * 500)
    out = tmp_path / "r.jsonl"
    proc = run_wanwu("run", str(damaged), str(cut), str(garbage), "--out", str(out), "--progress", "none")
    assert proc.returncode == 3, proc.stderr  # finished, with error records
    records = read_records(str(out))
    assert len({r["key"] for r in records}) == len(records)
    ok = [r for r in records if r["error"] is None]
    errors = {r["key"]: r["error"] for r in records if r["error"] is not None}
    assert len(ok) >= 10 and all(r["key"].startswith(f"{damaged}@") for r in ok)  # the frames before the damage
    assert len(ok) < 30  # the damaged and missing ones were not made up
    assert errors[f"{cut}@open"]["type"] == "ReadError" and "cannot open" in errors[f"{cut}@open"]["message"]
    assert errors[f"{garbage}@open"]["type"] == "ReadError"


def test_kill_9_during_a_file_then_a_rerun_gives_each_sampled_frame_once(tmp_path: Path, photos):
    clip = tmp_path / "long.mp4"
    frames = make_clip(clip, photos, names=SCENES * 4, fps=25, seconds_each=2)  # 600 frames
    out = tmp_path / "r.jsonl"
    args = ("run", str(clip), "--out", str(out), "--progress", "none", "--every", "2", "--batch-size", "8")
    proc = subprocess.Popen(wanwu_cmd(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.monotonic() + 120
    while count_lines(out) < 40:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no progress"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = len(read_records(str(out)))
    assert before < len(frames) // 2, "the job finished before it was killed; the test needs a longer clip"
    again = run_wanwu(*args)
    assert again.returncode == 0, again.stderr
    counts = Counter(r["key"] for r in read_records(str(out)))
    assert set(counts) == {f"long.mp4@{t:.3f}" for t, _ in frames[::2]}
    assert max(counts.values()) == 1
