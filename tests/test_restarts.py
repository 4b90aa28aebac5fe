"""``wanwu run`` repairs its topology: dead decoders and inference processes are replaced, and what
they held is sent again, so a job finishes with exactly one record per input."""

from __future__ import annotations

import io
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

from conftest import count_lines, make_corpus, wanwu_cmd
from wanwu.bench.attacks import worker_pids
from wanwu.stages.sinks.base import read_records

pytestmark = pytest.mark.slow

BIG = "000 big.png"  # sorts first: the first batch the decoder takes holds it
BIG_SIDE = 7000  # 49 megapixels: seconds to decode, and 147 MB of pixels the decoder's memory shows
HOLDING_BIG_MB = 150  # a decoder is about 40 MB; only the big image takes it past this


@pytest.fixture(scope="module")
def folder_with_a_slow_image(tmp_path_factory, photos) -> tuple[Path, list[str]]:
    folder = tmp_path_factory.mktemp("slow")
    keys = make_corpus(folder, photos, 40)
    ramp = np.arange(BIG_SIDE)
    pixels = np.empty((BIG_SIDE, BIG_SIDE, 3), np.uint8)
    pixels[..., 0] = (ramp % 256).astype(np.uint8)[None, :]
    pixels[..., 1] = (ramp % 256).astype(np.uint8)[:, None]
    pixels[..., 2] = (ramp // 7 % 256).astype(np.uint8)[None, :] + (ramp // 5 % 256).astype(np.uint8)[:, None]
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG", compress_level=1)
    (folder / BIG).write_bytes(buf.getvalue())
    return folder, keys + [BIG]


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


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


def test_a_killed_inference_process_is_replaced_and_every_record_is_written_once(tmp_path, photos):
    folder = tmp_path / "photos"
    keys = make_corpus(folder, photos, 120)
    out = tmp_path / "r.jsonl"
    stats = tmp_path / "stats.json"
    proc = subprocess.Popen(wanwu_cmd("run", str(folder), "--out", str(out), "--progress", "none", "--batch-size",
                                      "8", "--stats-json", str(stats)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while count_lines(out) < 16:
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
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
