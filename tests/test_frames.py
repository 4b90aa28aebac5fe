"""Frame sources: frames written straight into the slot pool by the loader, endless ones stopped by a signal."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import children_of, run_wanwu, segments_of, wanwu_cmd
from wanwu.errors import ConfigError, StageError
from wanwu.specs import Preprocess
from wanwu.stages.sources.testsrc import TestPatternSource

pytestmark = pytest.mark.slow


def test_the_test_pattern_declares_and_writes_its_frames():
    source = TestPatternSource("testsrc:frames=3,size=64x48", Preprocess())
    assert source.output_spec().shape == (48, 64, 3) and not source.endless
    out = np.zeros((48, 64, 3), np.uint8)
    frames = []
    while (info := source.read_into(out, 0.1)) is not None:
        frames.append((info.key, out.copy()))
    assert source.ended and [k for k, _ in frames] == [f"testsrc/{i:09d}" for i in range(3)]
    assert not np.array_equal(frames[0][1], frames[1][1])  # consecutive frames differ
    with pytest.raises(StageError, match="expected a frame buffer"):
        TestPatternSource("testsrc:", Preprocess()).read_into(out, 0.1)
    with pytest.raises(ConfigError):
        TestPatternSource("testsrc:frames=-1", Preprocess())


def test_a_finite_frame_source_runs_to_its_end(tmp_path: Path):
    out = tmp_path / "frames.jsonl"
    proc = run_wanwu("run", "testsrc:frames=50", "--out", str(out), "--progress", "none")
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert sorted(r["key"] for r in records) == [f"testsrc/{i:09d}" for i in range(50)]
    assert all(r["error"] is None and (r["width"], r["height"]) == (224, 224) and len(r["labels"]) == 5
               for r in records)


def _pool_mappers(owner: int) -> list[int]:
    """Processes that map the owner's shared-memory pool (a memfd named after it)."""
    name = f"memfd:wanwu-pool-{owner}"
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and name in (entry / "maps").read_text():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


@pytest.mark.parametrize("out_name", ["frames.jsonl", "frames.sqlite"])
def test_an_endless_frame_source_stopped_by_sigterm_has_one_record_per_frame(tmp_path: Path, out_name: str):
    from wanwu.stages.sinks.base import read_records

    out = tmp_path / out_name
    proc = subprocess.Popen(wanwu_cmd("run", "testsrc:", "--out", str(out), "--progress", "none",
                                      "--batch-size", "8"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:  # the source never ends: a failed assertion must not leave the job running for ever
        deadline = time.monotonic() + 120
        while (len(read_records(str(out))) if out.exists() else 0) < 40:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no records"
            time.sleep(0.1)
        workers = children_of(proc.pid)
        roles = {cmd.split("wanwu.pipeline.workers", 1)[1].split()[0]: pid for pid, cmd in workers.items()}
        assert sorted(roles) == ["inference", "loader", "sink"]  # no decoders: the loader writes the frames itself
        # The frames travel through the shared pool: the loader writes it, inference reads it, the sink has none.
        assert set(_pool_mappers(proc.pid)) & set(workers) == {roles["loader"], roles["inference"]}
        os.killpg(proc.pid, signal.SIGTERM)  # as systemd and `timeout` do: every process of the job
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, stderr  # an endless source's normal end
    records = read_records(str(out))
    keys = [r["key"] for r in records]
    # Every frame that entered has exactly one record: the frame numbers run 0..n-1 without a gap.
    assert sorted(keys) == [f"testsrc/{i:09d}" for i in range(len(keys))] and len(keys) >= 40
    assert all(r["error"] is None and r["labels"] for r in records)
    assert f"{len(keys)} recognised, 0 errors" in stderr
    assert not any(Path(f"/proc/{pid}").exists() for pid in workers)
    assert _pool_mappers(proc.pid) == [] and segments_of(proc.pid) == []
    assert not list(Path(tempfile.gettempdir()).glob(f"wanwu-job-{proc.pid}-*"))


def test_frames_in_flight_when_inference_dies_get_error_records_and_the_stream_goes_on(tmp_path: Path):
    from wanwu.stages.sinks.base import read_records

    out = tmp_path / "frames.jsonl"
    proc = subprocess.Popen(wanwu_cmd("run", "testsrc:", "--out", str(out), "--progress", "none",
                                      "--batch-size", "8"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while (len(read_records(str(out))) if out.exists() else 0) < 40:
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.1)
        (inference,) = [pid for pid, cmd in children_of(proc.pid).items() if "workers inference" in cmd]
        os.kill(inference, signal.SIGKILL)
        before = len(read_records(str(out)))
        while len(read_records(str(out))) < before + 40:  # the replacement recognises new frames
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 3, stderr  # finished, with error records for the frames that were lost
    records = read_records(str(out))
    keys = [r["key"] for r in records]
    assert sorted(keys) == [f"testsrc/{i:09d}" for i in range(len(keys))]  # still one record per frame
    lost = [r for r in records if r["error"] is not None]
    assert lost and all("inference process died" in r["error"]["message"] for r in lost)
    assert len(lost) < len(records) // 2
