"""``wanwu run`` repairs its topology: dead decoders and inference processes are replaced, and what
they held is sent again, so a job finishes with exactly one record per input."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest

from conftest import count_lines, make_corpus, rss_mb, wanwu_cmd, write_slow_png
from wanwu.bench.attacks import worker_pids
from wanwu.stages.sinks.base import read_records

pytestmark = pytest.mark.slow

BIG = "000 big.png"  # sorts first: the first batch the decoder takes holds it
HOLDING_BIG_MB = 150  # a decoder is about 40 MB; only the big image (write_slow_png) takes it past this


@pytest.fixture(scope="module")
def folder_with_a_slow_image(tmp_path_factory, photos) -> tuple[Path, list[str]]:
    folder = tmp_path_factory.mktemp("slow")
    keys = make_corpus(folder, photos, 40)
    write_slow_png(folder / BIG)
    return folder, keys + [BIG]


def kill_decoder_while_it_decodes_the_big_image(owner: int, deadline: float) -> int:
    """Wait for a decoder whose memory holds the big image's pixels (no other image needs as much); kill it."""
    while time.monotonic() < deadline:
        for pid in worker_pids(owner, "decoder"):
            if rss_mb(pid) > HOLDING_BIG_MB:
                os.kill(pid, signal.SIGKILL)
                return pid
        time.sleep(0.01)
    raise AssertionError("no decoder ever held the big image")


def test_a_decoder_killed_twice_holding_the_same_image_costs_only_that_image(folder_with_a_slow_image, tmp_path):
    folder, keys = folder_with_a_slow_image
    out = tmp_path / "r.jsonl"
    proc = subprocess.Popen(wanwu_cmd("run", str(folder), "--out", str(out), "--progress", "none", "--decoders", "1",
                                      "--batch-size", "8"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        first = kill_decoder_while_it_decodes_the_big_image(proc.pid, deadline)
        second = kill_decoder_while_it_decodes_the_big_image(proc.pid, deadline)  # its replacement, same image
        assert first != second
        _, stderr = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 3, stderr
    records = read_records(str(out))
    counts = Counter(r["key"] for r in records)
    assert set(counts) == set(keys) and max(counts.values()) == 1
    by_key = {r["key"]: r for r in records}
    assert by_key[BIG]["error"]["type"] == "StageError" and "died twice" in by_key[BIG]["error"]["message"]
    assert all(by_key[k]["error"] is None and by_key[k]["labels"] for k in keys if k != BIG)
    assert "restarted 2 worker process(es)" in stderr


def job_with_records(out: Path, n: int, *args: str) -> subprocess.Popen:
    """``wanwu run ARGS --out OUT`` in a session of its own, once ``n`` records are in ``out``."""
    proc = subprocess.Popen(wanwu_cmd("run", *args, "--out", str(out), "--progress", "none"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    while count_lines(out) < n:
        if proc.poll() is not None or time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):  # what is left of its session
                os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError(f"expected {n} records within 120 s: {proc.communicate()}")
        time.sleep(0.05)
    return proc


def test_a_killed_inference_process_is_replaced_and_every_record_is_written_once(tmp_path, photos):
    folder = tmp_path / "photos"
    keys = make_corpus(folder, photos, 120)
    out = tmp_path / "r.jsonl"
    stats = tmp_path / "stats.json"
    proc = job_with_records(out, 16, str(folder), "--batch-size", "8", "--stats-json", str(stats))
    try:
        (inference,) = worker_pids(proc.pid, "inference")
        decoders = set(worker_pids(proc.pid, "decoder"))
        os.kill(inference, signal.SIGKILL)
        _, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, stderr
    counts = Counter(r["key"] for r in read_records(str(out)))
    assert set(counts) == set(keys) and max(counts.values()) == 1
    summary = json.loads(stats.read_text())
    # The inference process and, with it, every decoder (their slots' releases died with it).
    assert summary["restarts"] == 1 + len(decoders) and (summary["ok"], summary["errors"]) == (len(keys), 0)


@pytest.mark.parametrize("role", ["loader", "sink"])
def test_a_stuck_loader_or_sink_ends_the_job_with_the_reason_instead_of_hanging(tmp_path, role):
    """They hold the ledger and are not restarted: frozen (SIGSTOP, as a hung mount would leave
    them), the watchdog kills it after --stall-timeout-s and the job fails (exit 1), saying
    which and why, and leaves no process behind; before, it waited for ever."""
    out = tmp_path / "r.jsonl"
    proc = job_with_records(out, 8, "testsrc:fps=25", "--batch-size", "4", "--stall-timeout-s", "3")
    try:
        (stuck,) = worker_pids(proc.pid, role)
        os.kill(stuck, signal.SIGSTOP)
        frozen_at = time.monotonic()
        _, stderr = proc.communicate(timeout=60)
        took = time.monotonic() - frozen_at
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 1, stderr
    assert f"{role} is stuck (no sign of life" in stderr and "ends the job" in stderr, stderr
    assert took < 30, took
    assert not worker_pids(proc.pid, role) and not os.path.exists(f"/proc/{stuck}")
