"""Crashes and interruptions: kill -9 at any point, Ctrl-C, and resuming to exactly one record each."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest

from conftest import children_of, count_lines, make_corpus, proc_state, run_wanwu, segments_of, wanwu_cmd
from wanwu.stages.sinks.base import read_records

pytestmark = pytest.mark.slow

N_IMAGES = 160


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, photos) -> tuple[Path, list[str]]:
    folder = tmp_path_factory.mktemp("corpus")
    return folder, make_corpus(folder, photos, N_IMAGES)


def start(folder: Path, out: Path, *extra: str) -> subprocess.Popen:
    # A session of its own, so a signal to its group reaches the whole job as Ctrl-C would.
    return subprocess.Popen(
        wanwu_cmd("run", str(folder), "--out", str(out), "--progress", "none", "--batch-size", "8", *extra),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )


def wait_for_records(proc: subprocess.Popen, out: Path, n: int, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while count_lines(out) < n:
        assert proc.poll() is None, f"job ended early: {proc.communicate()}"
        assert time.monotonic() < deadline, "no progress"
        time.sleep(0.05)


def assert_exactly_once(out: Path, keys: list[str]) -> None:
    counts = Counter(r["key"] for r in read_records(str(out)))
    assert set(counts) == set(keys)
    assert max(counts.values()) == 1


def test_stages_run_as_separate_processes(corpus, tmp_path):
    folder, keys = corpus
    out = tmp_path / "r.jsonl"
    proc = start(folder, out, "--decoders", "2")
    wait_for_records(proc, out, 8)
    roles = Counter(cmd.split("wanwu.pipeline.workers", 1)[1].split()[0]
                    for cmd in children_of(proc.pid).values() if "wanwu.pipeline.workers" in cmd)
    proc.communicate(timeout=300)
    assert roles == {"loader": 1, "decoder": 2, "inference": 1, "sink": 1}
    assert proc.returncode == 0
    assert_exactly_once(out, keys)


@pytest.mark.parametrize("when", [0.0, 1.5, "records"])
def test_kill_9_of_the_whole_job_then_resume(corpus, tmp_path, when):
    folder, keys = corpus
    out = tmp_path / "r.sqlite" if when == 1.5 else tmp_path / "r.jsonl"
    proc = start(folder, out)
    if when == "records":
        wait_for_records(proc, out, 40)
    else:
        time.sleep(when)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(0.2)
    done_before = len(read_records(str(out))) if out.exists() else 0
    again = run_wanwu("run", str(folder), "--out", str(out), "--progress", "none")
    assert again.returncode == 0, again.stderr
    assert_exactly_once(out, keys)
    assert segments_of(proc.pid) == [], "a killed job's shared memory must not stay in /dev/shm"
    if when == "records":
        assert done_before >= 40 and f"{done_before} already done" in again.stderr


def test_kill_9_of_the_owner_leaves_no_orphans(corpus, tmp_path):
    folder, keys = corpus
    out = tmp_path / "r.jsonl"
    proc = start(folder, out)
    wait_for_records(proc, out, 8)
    workers = children_of(proc.pid)
    assert len(workers) >= 4
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{pid}").exists() and "Z" not in proc_state(pid) for pid in workers):
        assert time.monotonic() < deadline, "workers outlived their owner"
        time.sleep(0.1)
    again = run_wanwu("run", str(folder), "--out", str(out), "--progress", "none")
    assert again.returncode == 0, again.stderr
    assert_exactly_once(out, keys)


def test_ctrl_c_stops_cleanly_and_resumes(corpus, tmp_path):
    folder, keys = corpus
    out = tmp_path / "r.jsonl"
    proc = start(folder, out)
    wait_for_records(proc, out, 16)
    workers = children_of(proc.pid)
    os.killpg(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr
    assert not any(Path(f"/proc/{pid}").exists() and proc_state(pid) != "Z" for pid in workers)
    assert segments_of(proc.pid) == []
    assert not list(Path(os.environ.get("TMPDIR", "/tmp")).glob(f"wanwu-job-{proc.pid}-*"))
    again = run_wanwu("run", str(folder), "--out", str(out), "--progress", "none")
    assert again.returncode == 0, again.stderr
    assert_exactly_once(out, keys)
