"""The GPU data path on a device: the IPC pool across processes, copy/compute overlap, labels end to end.

Every test but the first is marked ``gpu`` and skips with its reason here; the
first checks, on any machine, what ``gpu_check`` does without a GPU.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO, run_wanwu
from wanwu.bench.gpu_check import no_gpu_reason

NO_GPU = no_gpu_reason()
requires_gpu = pytest.mark.skipif(NO_GPU is not None, reason=f"needs a CUDA device: {NO_GPU}")


@pytest.mark.skipif(NO_GPU is None, reason="a CUDA device is present: gpu_check runs for real")
def test_gpu_check_without_a_gpu_exits_2_and_says_why(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "wanwu.bench.gpu_check", "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "gpu_check needs a CUDA GPU and found none" in proc.stderr and "Nothing was measured" in proc.stderr
    assert not (tmp_path / "o").exists()


CHILD = """
import sys, cupy
from wanwu.pipeline.topology.gpu_pool import DeviceSlotPool
import pickle
pool_plan, shape = pickle.loads(bytes.fromhex(sys.argv[2]))
pool = DeviceSlotPool.attach(int(sys.argv[1]), pool_plan, shape, "cuda:0")
assert int(pool.frame(5).sum()) == 7 * pool_plan.slot_bytes, "the owner's slot 5 is not seen"
pool.frame(3)[...] = 42
cupy.cuda.Device().synchronize()
pool.close()
"""


@pytest.mark.gpu
@requires_gpu
def test_device_pool_round_trip_across_two_processes():
    import pickle

    from wanwu.pipeline.topology.gpu import DeviceFacts, GpuSettings, plan_gpu
    from wanwu.pipeline.topology.gpu_pool import DeviceSlotPool
    from wanwu.pipeline.topology.plan import Plan
    from wanwu.specs import FrameSpec, Preprocess

    plan = plan_gpu(Plan(FrameSpec((299, 299, 3)), 1, False, 4, "m", Preprocess(299, 299)),
                    DeviceFacts("cuda:0", ipc=True, cupy=True, dali=True), "dali", "torch", 10**8, GpuSettings())
    pool = DeviceSlotPool.create(plan.gpu.pool, plan.frame.shape, "cuda:0")
    try:
        pool.frame(5)[...] = 7
        import cupy

        cupy.cuda.Device().synchronize()
        arg = pickle.dumps((plan.gpu.pool, plan.frame.shape)).hex()
        proc = subprocess.run([sys.executable, "-c", CHILD, str(pool.fd), arg], pass_fds=(pool.fd,),
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        frames = pool.frames()
        assert int(frames[3].min()) == int(frames[3].max()) == 42  # the child's write, seen here
        assert int(frames[4].max()) != 42 or int(frames[2].max()) != 42  # only slot 3 was written
        batch = pool.gather([3, 5])
        assert batch.shape == (2, 299, 299, 3) and batch[0].eq(42).all() and batch[1].eq(7).all()
    finally:
        pool.close()


@pytest.mark.gpu
@requires_gpu
def test_copies_and_compute_overlap_on_different_streams(tmp_path):
    from wanwu.bench.gpu_check import overlap_trace

    seen = overlap_trace(tmp_path / "trace.json")
    assert seen["answered"] == 8 * 32
    assert seen["copies"] and seen["kernels"]
    assert set(seen["copy_streams"]).isdisjoint(seen["kernel_streams"]), seen
    assert seen["overlap_us"] > 0, seen


@pytest.mark.gpu
@requires_gpu
def test_cuda_graphs_give_the_eager_answers_on_real_photos():
    import numpy as np
    import torch

    from wanwu.bench.gpu_check import sample_photos
    from wanwu.stages.classifier import Classifier
    from wanwu.stages.decoders.base import DecodeConfig, create_decoder
    from wanwu.stages.engines.base import EngineConfig
    from wanwu.stages.models.base import get_model_spec

    dec = create_decoder("turbo", DecodeConfig())
    datas = [p.read_bytes() for p in sample_photos()] * 2
    frames = np.empty((len(datas), *dec.output_spec().shape), np.uint8)
    dec.decode_batch_into(datas, list(frames))
    dec.shutdown()
    clf = Classifier(get_model_spec("efficientnet_lite0"), "torch", EngineConfig(device="cuda:0", max_batch_size=8))
    clf.load()
    try:
        pixels = torch.from_numpy(frames).to("cuda:0")
        eager = clf.engine.submit_device(pixels).cpu().numpy()
        clf.engine.capture_graphs((len(datas),))
        replayed = clf.engine.submit_device(pixels).cpu().numpy()
        again = clf.engine.submit_device(pixels.flip(0)).cpu().numpy()  # the static input is refilled per call
        partial = clf.engine.submit_device(pixels[:5]).cpu().numpy()  # replays the graph of 8, 3 rows padding
    finally:
        clf.shutdown()
    assert partial.shape == (5, eager.shape[1]) and (partial.argmax(1) == eager[:5].argmax(1)).all()
    assert np.abs(partial - eager[:5]).max() < 0.5
    assert (replayed.argmax(1) == eager.argmax(1)).all(), (replayed.argmax(1), eager.argmax(1))
    assert np.abs(replayed - eager).max() < 0.5, np.abs(replayed - eager).max()  # bf16 autocast both ways
    assert (again.argmax(1) == eager.argmax(1)[::-1]).all()


@pytest.mark.gpu
@requires_gpu
def test_the_feed_answers_every_batch_once_across_pauses():
    # The inference process flushes whenever its input pauses (a daemon between requests,
    # decoders slower than the device) and numbers batches on; the batch after a pause once
    # tried to answer the flushed one again (KeyError) and the inference process died.
    from wanwu.bench.gpu_check import PinnedFeed

    feed = PinnedFeed(batch=8)
    try:
        n = 0
        for burst in (3, 1, 1, 2):
            for _ in range(burst):
                feed.submit(n)
                n += 1
            feed.feed.flush()
            assert not feed.feed.outstanding()
        assert feed.answered == [(f"k{i}-0", 8) for i in range(n)]
    finally:
        feed.close()


@pytest.mark.gpu
@requires_gpu
def test_the_daemon_on_cuda_answers_requests_that_come_with_pauses(tmp_path):
    # A daemon's input pauses between every request: each one is a batch that is flushed,
    # and the next batch must not answer it again. One worker restart would hide a crash.
    import time
    import urllib.request

    import zmq

    from wanwu.bench.attacks import Daemon

    cpu = run_wanwu("run", str(REPO / "samples"), "--out", str(tmp_path / "cpu.jsonl"), "--progress", "none")
    assert cpu.returncode == 0, cpu.stderr
    expected = _top1(tmp_path / "cpu.jsonl")
    daemon = Daemon("--device", "cuda:0", "--engine", "torch", "--decoder", "turbo", "--zmq", "tcp://127.0.0.1:0")
    sock = zmq.Context.instance().socket(zmq.DEALER)
    try:
        sock.rcvtimeo, sock.linger = 60_000, 0
        sock.connect(daemon.addresses["zmq_request"])
        from wanwu.bench.gpu_check import sample_photos

        photos = sample_photos()
        for round_ in range(3):
            for i, photo in enumerate(photos):
                request_id = f"{round_}-{i}".encode()
                sock.send_multipart([request_id, photo.read_bytes()])
                rid, reply = sock.recv_multipart()
                records = json.loads(reply)["records"]
                assert rid == request_id and records[0]["labels"][0]["class_id"] == expected[photo.name], records
                time.sleep(0.2)  # the pause: the inference process flushes its last batch
        with urllib.request.urlopen(f"http://{daemon.addresses['metrics']}/metrics", timeout=10) as response:
            restarts = [line for line in response.read().decode().splitlines()
                        if line.startswith("wanwu_worker_restarts_total{") and not line.endswith(" 0.0")]
        assert not restarts, restarts
    finally:
        sock.close()
        assert daemon.stop() == 0, daemon.stderr[-3000:]


def _top1(path):
    return {r["key"]: r["labels"][0]["class_id"] for r in map(json.loads, path.read_text().splitlines())}


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("decoder", ["dali", "turbo"])  # device pool (IPC), pinned pool
def test_wanwu_run_on_cuda_gives_the_cpu_top1_on_real_photos(tmp_path, decoder):
    if decoder == "dali":
        pytest.importorskip("nvidia.dali", reason="nvidia-dali-cuda120 is not installed")
    from wanwu.bench.gpu_check import photos_corpus, sample_photos

    # Enough batches, in small ones, that the device runs ahead of the decoders and the
    # inference process pauses (flushes) and goes on many times within the run.
    corpus = tmp_path / "photos"
    photos_corpus(corpus, 24)
    cpu = run_wanwu("run", str(corpus), "--out", str(tmp_path / "cpu.jsonl"), "--progress", "none")
    assert cpu.returncode == 0, cpu.stderr
    gpu = run_wanwu("-v", "run", str(corpus), "--out", str(tmp_path / "gpu.jsonl"), "--progress", "none",
                    "--device", "cuda:0", "--engine", "torch", "--decoder", decoder, "--batch-size", "8",
                    "--stats-json", str(tmp_path / "stats.json"))
    assert gpu.returncode == 0, gpu.stderr
    assert json.loads((tmp_path / "stats.json").read_text())["restarts"] == 0, gpu.stderr
    top1 = _top1(tmp_path / "gpu.jsonl")
    assert len(top1) == 24 * len(sample_photos())
    assert top1 == _top1(tmp_path / "cpu.jsonl")
    placement = "device pool" if decoder == "dali" else "pinned host pool"
    assert placement in gpu.stderr  # the GPU plan's choice, logged by the owner


@pytest.mark.gpu
@requires_gpu
def test_hostile_files_still_become_error_records_on_cuda(tmp_path, photos):
    pytest.importorskip("nvidia.dali", reason="nvidia-dali-cuda120 is not installed")
    from conftest import write_hostile

    expected = write_hostile(tmp_path / "in", photos)
    proc = run_wanwu("run", str(tmp_path / "in"), "--out", str(tmp_path / "r.jsonl"), "--progress", "none",
                     "--device", "cuda:0", "--engine", "torch", "--decoder", "dali")
    assert proc.returncode == 3, proc.stderr
    records = {r["key"]: r for r in map(json.loads, (tmp_path / "r.jsonl").read_text().splitlines())}
    for key, kind in expected.items():
        assert records[key]["error"]["type"] == kind, (key, records[key])
