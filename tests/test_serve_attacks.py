"""``wanwu serve`` attacked from 127.0.0.1, as an attacker would, and holding.

One real daemon (a child process running the CLI) under the file-descriptor limit
systemd gives services by default (1,024), with short timeouts so the tests stay
short. The attack clients are in ``wanwu.bench.attacks``, which also measures them.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from conftest import Served, children_of, jpeg_bytes
from wanwu.bench.attacks import (Flood, ProcessSampler, binary_count_bomb, infer_seconds, json_amplification_body,
                                 metric, pid_of, raw_post, statuses_during_drain, zmq_big_message)

pytestmark = pytest.mark.slow

MODEL = "efficientnet_lite0"
INFER = f"/v2/models/{MODEL}/infer"


@pytest.fixture(scope="module")
def image(photos) -> bytes:
    return jpeg_bytes(photos["chelsea"])


@pytest.fixture(scope="module")
def daemon():
    served = Served("--decoders", "2", "--zmq", "tcp://127.0.0.1:0", "--max-connections", "256",
                    "--header-timeout-s", "3", "--keepalive-timeout-s", "3", "--stall-timeout-s", "4",
                    nofile=1024)
    yield served
    served.stop()


def test_slow_clients_are_cut_off_at_the_head_deadline(daemon):
    metrics = daemon.addresses["metrics"]
    before = metric(metrics, "wanwu_http", 'what="timed_out_connections"')
    flood = Flood(daemon.host, daemon.port, n=100, byte_interval_s=0.5).start()  # below the cap
    try:
        time.sleep(3 + 2)  # the head deadline (3 s) and the metrics' refresh
    finally:
        flood.stop()
    assert flood.closed_by_server >= 100  # every one of them, however steadily it trickled bytes
    assert metric(metrics, "wanwu_http", 'what="timed_out_connections"') - before >= 100


def test_a_thousand_slow_clients_do_not_keep_out_a_normal_request(daemon, image):
    flood = Flood(daemon.host, daemon.port, n=1100, byte_interval_s=0.5).start()
    try:
        time.sleep(2)
        with ProcessSampler(daemon.proc.pid) as sampler:
            latencies = [infer_seconds(daemon.url, image, timeout_s=30) for _ in range(5)]
        assert max(latencies) < 5, latencies  # answered, not shut out by the flood
        assert sampler.max_threads < 200  # no thread per connection
    finally:
        flood.stop()
    assert flood.closed_by_server > 1100 - 256  # the flood's oldest connections gave way at the cap (256)
    time.sleep(1)
    assert metric(daemon.addresses["metrics"], "wanwu_http", 'what="evicted_connections"') > 0
    assert infer_seconds(daemon.url, image) < 5


def test_a_flood_under_the_default_file_limit_plus_a_dead_worker_recovers(daemon, image):
    flood = Flood(daemon.host, daemon.port, n=1500, byte_interval_s=0.5).start()
    try:
        time.sleep(1)
        before = metric(daemon.addresses["metrics"], "wanwu_worker_restarts_total", 'stage="decoder"')
        os.kill(pid_of("decoder", daemon.proc.pid), signal.SIGKILL)  # its replacement needs descriptors
        deadline = time.monotonic() + 30
        while metric(daemon.addresses["metrics"], "wanwu_worker_restarts_total", 'stage="decoder"') <= before:
            assert time.monotonic() < deadline, "the dead decoder was not replaced during the flood"
            time.sleep(0.2)
        assert infer_seconds(daemon.url, image, timeout_s=30) < 10
    finally:
        flood.stop()
    assert daemon.proc.poll() is None and metric(daemon.addresses["metrics"], "wanwu_ready") == 1


def test_json_amplification_is_refused_before_parsing_and_memory_stays_bounded(daemon, image):
    import threading

    body = json_amplification_body(64 << 20)
    statuses = []
    with ProcessSampler(daemon.proc.pid) as sampler:
        baseline, _ = sampler.sample()
        threads = [threading.Thread(target=lambda: statuses.append(
            raw_post(daemon.host, daemon.port, INFER, {"Content-Type": "application/json"}, body)[0]))
            for _ in range(4)]
        for t in threads:
            t.start()
        latency = infer_seconds(daemon.url, image)
        for t in threads:
            t.join()
        # The same bytes as the JSON header of a binary-tensor request: counted, refused, never parsed.
        header_status, _ = raw_post(daemon.host, daemon.port, INFER, {"Inference-Header-Content-Length":
                                                                     str(len(body))}, body)
    assert statuses == [413] * 4 and header_status == 413
    assert sampler.peak_rss_mb - baseline < 256 + 64  # the byte budget (256 MiB), not gigabytes of objects
    assert latency < 10


def test_a_too_large_body_sent_slowly_is_drained_and_its_413_read_not_reset(daemon):
    """The 413 goes out at once; the client, still uploading for longer than the idle and head
    deadlines (3 s here), must be able to finish and then read it (a lingering close), even when
    a flood of new connections reaches the cap meanwhile (the oldest waiting ones give way, but
    not one whose answer is on its way)."""
    import socket

    body = json_amplification_body(16 << 20)  # over the JSON limit (8 MiB), so refused unread
    head = (f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    chunk, rate = 1 << 20, 3 << 20  # 16 MiB at 3 MiB/s: about 5 s
    with socket.create_connection((daemon.host, daemon.port), timeout=30) as sock:
        sock.sendall(head)
        start = time.monotonic()
        flood = []
        try:
            for i in range(0, len(body), chunk):
                sock.sendall(body[i:i + chunk])  # raises BrokenPipe or ConnectionReset if the server cut it
                if i == 2 * chunk:
                    flood = [socket.create_connection((daemon.host, daemon.port), timeout=30) for _ in range(300)]
                time.sleep(max(0.0, start + (i + chunk) / rate - time.monotonic()))
        finally:
            for other in flood:
                other.close()
        assert time.monotonic() - start > 4
        reply = b""
        while b"\r\n\r\n" not in reply:
            part = sock.recv(65536)
            assert part, f"closed after {reply!r}"
            reply += part
    assert reply.startswith(b"HTTP/1.1 413 "), reply[:200]


def test_a_binary_request_of_millions_of_tiny_images_is_refused_at_once(daemon):
    body, header_length = binary_count_bomb(11_000_000)
    start = time.perf_counter()
    status, reply = raw_post(daemon.host, daemon.port, INFER,
                             {"Inference-Header-Content-Length": str(header_length)}, body)
    assert status == 413 and b"at most 64 images" in reply.split(b"\r\n\r\n", 1)[1]
    assert time.perf_counter() - start < 5  # the count was checked before 11 million elements were split


def test_a_huge_timeout_parameter_is_a_400(daemon, image):
    import json

    doc = {"inputs": [{"name": "IMAGE", "shape": [1], "datatype": "BYTES", "data": ["x"]}],
           "parameters": {"timeout": 10 ** 400}}
    status, reply = raw_post(daemon.host, daemon.port, INFER, {}, json.dumps(doc).encode())
    assert status == 400 and b"parameter 'timeout'" in reply


def test_a_zeromq_message_of_eight_100_mb_frames_is_refused_without_being_held(daemon, image):
    with ProcessSampler(daemon.proc.pid) as sampler:
        baseline, _ = sampler.sample()
        replied = zmq_big_message(daemon.addresses["zmq_request"], frames=8, frame_bytes=100 << 20, wait_s=3)
    assert not replied  # the first frame's header was over the limit: the connection was dropped
    assert sampler.peak_rss_mb - baseline < 150  # not 800 MB held
    assert infer_seconds(daemon.url, image) < 10


def test_a_frozen_inference_worker_is_detected_and_replaced(daemon, image):
    metrics = daemon.addresses["metrics"]
    frozen = pid_of("inference", daemon.proc.pid)
    os.kill(frozen, signal.SIGSTOP)
    try:
        deadline = time.monotonic() + 60
        while metric(metrics, "wanwu_worker_stalls_total", 'stage="inference"') < 1:
            assert time.monotonic() < deadline, "the frozen inference worker was never detected"
            time.sleep(0.2)
        assert metric(metrics, "wanwu_ready") == 0 or pid_of("inference", daemon.proc.pid) != frozen
    finally:
        try:
            os.kill(frozen, signal.SIGCONT)
        except ProcessLookupError:
            pass
    assert not os.path.exists(f"/proc/{frozen}") or open(f"/proc/{frozen}/stat").read().split()[2] == "Z"
    assert infer_seconds(daemon.url, image, timeout_s=60) < 30  # the replacement answers
    assert metric(metrics, "wanwu_ready") == 1


def test_a_daemon_frozen_whole_and_resumed_keeps_its_workers(daemon, image):
    # Ctrl-Z then fg, SIGSTOP of the process group, a paused container: the workers were
    # frozen with the supervisor, so their silence says nothing. The watchdog used to kill
    # every one of them as stuck on resume.
    metrics = daemon.addresses["metrics"]
    restarts = {stage: metric(metrics, "wanwu_worker_restarts_total", f'stage="{stage}"')
                for stage in ("decoder", "inference")}
    family = [daemon.proc.pid, *children_of(daemon.proc.pid)]
    for pid in family:
        os.kill(pid, signal.SIGSTOP)
    time.sleep(4 + 4)  # twice the stall timeout (4 s)
    for pid in reversed(family):
        os.kill(pid, signal.SIGCONT)
    time.sleep(4 + 3)  # past the fresh stall timeout, with beats coming in again
    assert infer_seconds(daemon.url, image, timeout_s=30) < 10
    for stage, before in restarts.items():
        assert metric(metrics, "wanwu_worker_restarts_total", f'stage="{stage}"') == before, stage
    assert set(children_of(daemon.proc.pid)) == set(family[1:])  # the very same processes
    assert metric(metrics, "wanwu_ready") == 1


def test_the_ready_gauge_agrees_the_moment_the_daemon_says_it_is_ready():
    # The gauge was set on the dispatcher's next tick only, so a scrape right after the
    # daemon announced itself (or right after a replacement's first answer) read 0.
    for _ in range(3):
        served = Served("--decoders", "1")
        try:
            assert metric(served.addresses["metrics"], "wanwu_ready") == 1  # at once: no waiting for a tick
        finally:
            assert served.stop() == 0, served.stderr[-3000:]


def test_a_second_sigterm_during_the_drain_does_not_cut_it_short(image):
    """Supervisors retry SIGTERM and people press Ctrl-C twice: the drain still ends cleanly."""
    served = Served("--decoders", "1")
    try:
        assert infer_seconds(served.url, image) < 30
        served.proc.send_signal(signal.SIGTERM)
        time.sleep(0.05)  # inside the drain: stopping the doors and the workers takes longer
        assert served.proc.poll() is None
        served.proc.send_signal(signal.SIGTERM)
    finally:
        code = served.stop()
    assert code == 0, served.stderr[-3000:]
    assert "received SIGTERM again: already draining" in served.stderr


def test_requests_in_flight_during_a_drain_get_a_retryable_status(tmp_path, image):
    served = Served("--decoders", "1", "--drain-timeout-s", "0")
    try:
        seen = statuses_during_drain(served.url, image, clients=8, duration_s=4,
                                     sigterm=lambda: served.proc.send_signal(signal.SIGTERM))
    finally:
        code = served.stop()
    assert code == 0
    assert set(seen) <= {200, 503, 0}, seen  # answered, told to retry, or the door was closed: never a 4xx or 500
    assert seen.get(200, 0) > 0
