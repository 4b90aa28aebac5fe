"""``wanwu run --ray`` against a real Ray cluster: ``ray start --head`` on 127.0.0.1 with 2 CPUs and a
temporary directory, real photos and hostile files, an actor killed mid-run, a resumed job."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import pytest

from conftest import (CAT_CLASSES, COFFEE_CLASSES, count_lines, make_corpus, rss_mb, wanwu_cmd, write_hostile,
                      write_photos, write_slow_png)
from wanwu.stages.sinks.base import read_records

pytestmark = pytest.mark.slow
ray = pytest.importorskip("ray", reason="wanwu[ray] is not installed")
RAY = str(Path(sys.executable).with_name("ray"))
BIG = "000 big.png"
BIG_SIDE = 9000  # 81 megapixels: 243 MB of pixels
HOLDING_BIG_MB = 420  # a read task's process is about 250 MB; only the big image takes it past this


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster():
    """A one-node Ray cluster on 127.0.0.1 (token authentication on), stopped after the module."""
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": secrets.token_hex(32),
           # One machine: Ray then advertises the loopback address, not this host's network address.
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    port = _free_port()
    subprocess.run([RAY, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port), "--num-cpus", "2",
                    "--temp-dir", temp, "--include-dashboard=false", "--disable-usage-stats"],
                   env=env, check=True, capture_output=True, timeout=120)
    try:
        yield f"127.0.0.1:{port}", env
    finally:
        subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(temp, ignore_errors=True)


def _run(cluster, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    address, env = cluster
    return subprocess.run(wanwu_cmd("run", *args, "--ray", address, "--progress", "none"), env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_photos_and_hostile_files_get_their_labels_and_error_records_and_a_rerun_resumes(cluster, tmp_path, photos):
    folder = tmp_path / "in"
    good = write_photos(folder, photos)
    bad = write_hostile(folder / "bad", photos)
    out = tmp_path / "r.jsonl"
    proc = _run(cluster, str(folder), "--out", str(out), "--ray-shard-size", "3", "--batch-size", "4")
    assert proc.returncode == 3, proc.stderr  # finished, with error records
    records = read_records(str(out))
    by_key = {r["key"]: r for r in records}
    assert len(records) == len(by_key) == len(good) + len(bad)
    for key, name in good.items():
        rec = by_key[key]
        assert rec["error"] is None and rec["width"] > 0 and len(rec["labels"]) == 5, rec
        if name == "chelsea":
            assert rec["labels"][0]["class_id"] in CAT_CLASSES
        if name == "coffee":
            assert rec["labels"][0]["class_id"] in COFFEE_CLASSES
    for name, error_type in bad.items():
        rec = by_key[f"bad/{name}"]
        assert rec["error"]["type"] == error_type and not rec["labels"], rec
    assert f"{len(good)} recognised, {len(bad)} errors" in proc.stderr

    again = _run(cluster, str(folder), "--out", str(out))
    assert again.returncode == 3, again.stderr  # the output still holds error records
    assert f"0 recognised, 0 errors, {len(records)} already done ({len(bad)} errors)" in again.stderr
    assert count_lines(out) == len(records)


def test_a_list_file_and_an_lmdb_archive_are_read_in_shards(cluster, tmp_path, photos):
    folder = tmp_path / "in"
    keys = make_corpus(folder, photos, 30)
    listed = [str(folder / k) for k in keys[:12]]
    (tmp_path / "list.txt").write_text("\n".join(listed + listed[:2]) + "\n", encoding="utf-8")  # two listed twice
    archive = tmp_path / "a.lmdb"
    subprocess.run(wanwu_cmd("pack", str(folder), str(archive)), check=True, capture_output=True, timeout=120)
    out = tmp_path / "r.sqlite"
    proc = _run(cluster, "@" + str(tmp_path / "list.txt"), str(archive), "--out", str(out), "--ray-shard-size", "5")
    assert proc.returncode == 0, proc.stderr
    counts = Counter(r["key"] for r in read_records(str(out)))
    assert max(counts.values()) == 1
    assert set(counts) == set(listed) | {f"{archive}/{k}" for k in keys}
    assert all(r["labels"] for r in read_records(str(out)))


def _ray_processes() -> list[tuple[int, bytes]]:
    """(pid, command line) of Ray's worker processes (their titles start with "ray::")."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if cmdline.startswith(b"ray::"):
                found.append((int(entry.name), cmdline))
    return found


def _actor_pids() -> list[int]:
    """Processes of the classifier actors (Ray titles an actor's process after its class)."""
    return [pid for pid, cmdline in _ray_processes() if b"ClassifierActor" in cmdline]


def test_an_actor_killed_mid_run_is_replaced_and_every_input_has_exactly_one_record(cluster, tmp_path, photos):
    folder = tmp_path / "in"
    keys = make_corpus(folder, photos, 240)
    out = tmp_path / "r.jsonl"
    address, env = cluster
    proc = subprocess.Popen(wanwu_cmd("run", str(folder), "--out", str(out), "--ray", address, "--progress", "none",
                                      "--ray-shard-size", "20", "--batch-size", "8"),
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while count_lines(out) < 16:  # the actor is up and has answered a few batches
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else ""
            time.sleep(0.05)
        victims = _actor_pids()
        assert victims
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        written_at_kill = count_lines(out)
        _, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert written_at_kill < len(keys)  # the kill came mid-run
    assert proc.returncode == 0, stderr
    records = read_records(str(out))
    counts = Counter(r["key"] for r in records)
    assert set(counts) == set(keys) and max(counts.values()) == 1
    assert all(r["error"] is None and r["labels"] for r in records)


def _read_task_pids() -> list[int]:
    """Processes running a read task (Ray titles a task's process after the task: ReadShard)."""
    return [pid for pid, cmdline in _ray_processes() if cmdline.startswith(b"ray::ReadShard")]


def test_an_image_that_kills_every_process_decoding_it_costs_only_itself(cluster, tmp_path, photos):
    folder = tmp_path / "in"
    keys = make_corpus(folder, photos, 20)
    write_slow_png(folder / BIG, BIG_SIDE)  # stands in for an image that crashes the decoder: it is killed each time
    out = tmp_path / "r.jsonl"
    address, env = cluster
    proc = subprocess.Popen(wanwu_cmd("run", str(folder), "--out", str(out), "--ray", address, "--progress", "none",
                                      "--ray-shard-size", "8"),
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    kills = 0
    try:
        deadline = time.monotonic() + 240
        while proc.poll() is None and time.monotonic() < deadline:
            for pid in _read_task_pids():
                if rss_mb(pid) > HOLDING_BIG_MB:
                    os.kill(pid, signal.SIGKILL)
                    kills += 1
            time.sleep(0.01)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 3, f"{kills} kills\n{stderr}"
    records = read_records(str(out))
    counts = Counter(r["key"] for r in records)
    assert set(counts) == set(keys) | {BIG} and max(counts.values()) == 1
    by_key = {r["key"]: r for r in records}
    assert by_key[BIG]["error"]["type"] == "StageError" and "died every time" in by_key[BIG]["error"]["message"]
    assert all(by_key[k]["error"] is None and by_key[k]["labels"] for k in keys)
    assert kills == 8  # four attempts in its shard, then four alone


@pytest.mark.parametrize("args, expected", [
    (["testsrc:", "--out", "r.jsonl"], "--ray reads folders, LMDB archives and list files"),
    (["in", "--out", "r.jsonl", "--cache", "c"], "--cache is not used with --ray"),
])
def test_what_the_cluster_runner_cannot_do_is_refused_before_any_cluster_is_joined(tmp_path, args, expected):
    (tmp_path / "in").mkdir()
    proc = subprocess.run(wanwu_cmd("run", *args, "--ray", "127.0.0.1:1"), cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and expected in proc.stderr, proc.stderr


def test_an_address_where_no_cluster_answers_fails_at_once_with_its_reason(tmp_path):
    (tmp_path / "in").mkdir()
    port = _free_port()  # nothing listens there
    proc = subprocess.run(wanwu_cmd("run", "in", "--out", "r.jsonl", "--ray", f"127.0.0.1:{port}"), cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert f"expected a Ray cluster at '127.0.0.1:{port}', nothing answers there" in proc.stderr
