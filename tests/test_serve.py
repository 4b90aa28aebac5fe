"""``wanwu serve``: the daemon as users run it (the CLI in a child process) and its backend.

Real processes, sockets, shared memory and the real model on real photos; the
HTTP client is Triton's own ``tritonclient.http``, unmodified.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as triton

from conftest import CAT_CLASSES, COFFEE_CLASSES, Served, in_threads, jpeg_bytes, make_corpus, png_bytes, wanwu_cmd
from wanwu.errors import ConfigError, StageError
from wanwu.pipeline.serve.backend import ServeError
from wanwu.pipeline.serve.config import ServeConfig
from wanwu.pipeline.serve.dispatch import PipelineBackend
from wanwu.stages.models.base import get_model_spec
from wanwu.stages.sinks.base import read_records

MODEL = "efficientnet_lite0"
ZH = get_model_spec(MODEL).labels().zh


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    out = tmp_path_factory.mktemp("d") / "stream.jsonl"
    served = Served("--max-queue-delay-ms", "5", "--decoders", "2", "--grpc-port", "0",
                    "--zmq", "tcp://127.0.0.1:0", "--zmq-stream", "tcp://127.0.0.1:0",
                    "--out", str(out))
    served.out = out
    yield served
    assert served.stop() == 0, served.stderr[-3000:]


def image_input(*datas: bytes) -> triton.InferInput:
    tensor = triton.InferInput("IMAGE", [len(datas), 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[d] for d in datas], dtype=np.object_), binary_data=True)
    return tensor


def check_labels(labels: np.ndarray, expected: list[set[int]]) -> None:
    """Rows of the LABELS output: JSON labels, or (with ``class_count``) Triton's classification
    strings ``score:class_id:label``; elements are bytes in binary outputs, str in JSON ones."""
    for row, classes in zip(labels, expected):
        text = row[0].decode("utf-8") if isinstance(row[0], bytes) else row[0]
        if text.startswith("{"):
            doc = json.loads(text)
            score, class_id, label = doc["score"], doc["class_id"], doc["label"]
        else:
            score, class_id, label = text.split(":", 2)
        assert int(class_id) in classes and label == ZH[int(class_id)] and 0 < float(score) <= 1


def test_tritonclient_from_32_threads_binary_and_json(daemon, images):
    answered = []

    def client_thread(i: int) -> None:
        with triton.InferenceServerClient(daemon.url) as client:
            assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(MODEL)
            meta = client.get_model_metadata(MODEL)
            assert meta["name"] == MODEL and meta["inputs"][0]["datatype"] == "BYTES"
            for round_ in range(3):
                binary = (i + round_) % 2 == 0
                outputs = [triton.InferRequestedOutput("LABELS", binary_data=binary, class_count=3),
                           triton.InferRequestedOutput("SCORES", binary_data=binary)]
                result = client.infer(MODEL, [image_input(images["chelsea"], images["coffee"])], outputs=outputs)
                check_labels(result.as_numpy("LABELS"), [CAT_CLASSES, COFFEE_CLASSES])
                scores = result.as_numpy("SCORES")
                assert scores.dtype == np.float32 and scores.shape == (2, 5)
                assert ("parameters" in result.get_output("SCORES")) is binary
                answered.append(binary)

    errors = in_threads(client_thread, 32)
    assert not errors, errors[:3]
    assert len(answered) == 96 and 0 < sum(answered) < 96  # both binary and JSON outputs were asked for
    with triton.InferenceServerClient(daemon.url) as client:
        stats = client.get_inference_statistics(MODEL)["model_stats"][0]
    # Requests from many clients were batched together: fewer engine calls than images.
    assert int(stats["inference_count"]) >= 192 > int(stats["execution_count"])


def test_tritonclient_grpc_from_32_threads(daemon, images):
    """The gRPC door passes the same checks as HTTP, batched with it by the same daemon."""
    import tritonclient.grpc as tgrpc

    answered = []

    def client_thread(i: int) -> None:
        with tgrpc.InferenceServerClient(daemon.addresses["grpc"]) as client:
            assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(MODEL)
            assert client.get_model_metadata(MODEL).inputs[0].datatype == "BYTES"
            for _ in range(3):
                tensor = tgrpc.InferInput("IMAGE", [2, 1], "BYTES")
                tensor.set_data_from_numpy(np.array([[images["chelsea"]], [images["coffee"]]], dtype=np.object_))
                outputs = [tgrpc.InferRequestedOutput("LABELS", class_count=3), tgrpc.InferRequestedOutput("SCORES")]
                result = client.infer(MODEL, [tensor], outputs=outputs)
                check_labels(result.as_numpy("LABELS"), [CAT_CLASSES, COFFEE_CLASSES])
                assert result.as_numpy("SCORES").shape == (2, 5)
                answered.append(i)

    errors = in_threads(client_thread, 32)
    assert not errors, errors[:3]
    assert len(answered) == 96


def test_plain_http_base64_json(daemon, images):
    tensor = {"name": "IMAGE", "shape": [2, 1], "datatype": "BYTES", "parameters": {"content_type": "base64"},
              "data": [base64.b64encode(images["chelsea"]).decode(), base64.b64encode(images["coffee"]).decode()]}
    request = urllib.request.Request(f"http://{daemon.url}/v2/models/{MODEL}/infer",
                                     json.dumps({"inputs": [tensor]}).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        doc = json.loads(response.read())
    outputs = {o["name"]: o for o in doc["outputs"]}
    labels = [json.loads(s) for s in outputs["LABELS"]["data"]]
    assert labels[0]["class_id"] in CAT_CLASSES and labels[5]["class_id"] in COFFEE_CLASSES
    assert labels[0]["label"] == ZH[labels[0]["class_id"]]


def test_readme_zmq_client_works_as_printed(daemon, photos, tmp_path):
    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    block = readme.split("<!-- zmq-client -->", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    client = tmp_path / "client.py"
    client.write_text(block, encoding="utf-8")
    cat, cup = tmp_path / "猫 cat.jpg", tmp_path / "cup.png"
    cat.write_bytes(jpeg_bytes(photos["chelsea"]))
    cup.write_bytes(png_bytes(photos["coffee"]))
    result = subprocess.run([sys.executable, str(client), daemon.addresses["zmq_request"], str(cat), str(cup)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith(str(cat)) and lines[1].startswith(str(cup))
    assert any(ZH[c] in lines[0] for c in CAT_CLASSES) and any(ZH[c] in lines[1] for c in COFFEE_CLASSES)


def test_zmq_stream_records_go_to_the_sink(daemon, images):
    import zmq

    push = zmq.Context.instance().socket(zmq.PUSH)
    push.linger = 5000
    push.connect(daemon.addresses["zmq_stream"])
    names = [f"摄像头-{i}.jpg" for i in range(10)]
    for name in names:
        push.send_multipart([name.encode(), images["chelsea"]])
    push.send_multipart([b"broken.jpg", b"not an image"])
    push.close()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        records = {r["key"]: r for r in read_records(str(daemon.out))} if daemon.out.exists() else {}
        if len(records) >= 11:
            break
        time.sleep(0.1)
    assert set(records) == set(names) | {"broken.jpg"}
    assert all(records[n]["labels"][0]["class_id"] in CAT_CLASSES and records[n]["source"] == "zmq" for n in names)
    assert records["broken.jpg"]["error"]["type"] == "DecodeError"


def test_zmq_stream_keys_never_repeat_across_restarts(tmp_path, images):
    # The output keeps one record per key: unnamed images numbered from 1 again after a restart,
    # or a name sent twice, used to lose their records without a word.
    import zmq

    out = tmp_path / "stream.jsonl"
    expected = 0
    for run, named in ((1, ["cam.jpg"]), (2, ["cam.jpg", "cam.jpg"])):
        served = Served("--no-http", "--decoders", "1", "--zmq-stream", "tcp://127.0.0.1:0", "--out", str(out))
        try:
            push = zmq.Context.instance().socket(zmq.PUSH)
            push.linger = 5000
            push.connect(served.addresses["zmq_stream"])
            for _ in range(3):
                push.send_multipart([images["chelsea"]])  # no name
            for name in named:
                push.send_multipart([name.encode(), images["chelsea"]])
            push.close()
            expected += 3 + len(named)
            deadline = time.monotonic() + 60
            while (len(read_records(str(out))) if out.exists() else 0) < expected and time.monotonic() < deadline:
                time.sleep(0.1)
        finally:
            assert served.stop() == 0, served.stderr[-3000:]
    keys = [r["key"] for r in read_records(str(out))]
    assert sorted(keys) == sorted([f"zmq-{i}" for i in range(1, 7)] + ["cam.jpg", "cam.jpg#2", "cam.jpg#3"])


def metrics(daemon) -> dict[str, float]:
    with urllib.request.urlopen(f"http://{daemon.addresses['metrics']}/metrics", timeout=10) as response:
        text = response.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def test_metrics(daemon, images):
    with triton.InferenceServerClient(daemon.url) as client:
        client.infer(MODEL, [image_input(images["chelsea"])])
        with pytest.raises(Exception):
            client.infer(MODEL, [image_input(b"not an image")])  # a request whose image fails
    m = metrics(daemon)
    assert m['wanwu_requests_total{door="http",outcome="ok"}'] >= 1
    assert m['wanwu_requests_total{door="http",outcome="image_errors"}'] >= 1
    assert m['wanwu_images_total{outcome="error"}'] >= 1
    assert m["wanwu_batch_size_count"] >= 1 and m["wanwu_batch_size_sum"] >= m["wanwu_batch_size_count"]
    assert m['wanwu_request_duration_seconds_count{door="http"}'] >= 2
    assert m["wanwu_ready"] == 1 and m["wanwu_queue_depth"] == 0
    assert 'wanwu_stage_busy_ratio{stage="inference"}' in m


def test_killed_decoders_lose_no_request(daemon, images):
    """Kill -9 one decoder under load, then the other: every request gets its labels (the images
    each held are sent again), no client waits, and the daemon stays ready with new decoders."""
    outcomes: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def client_thread() -> None:
        with triton.InferenceServerClient(daemon.url, network_timeout=120) as client:
            while not stop.is_set():  # load until after both deaths
                try:
                    result = client.infer(MODEL, [image_input(images["chelsea"], images["coffee"])])
                    check_labels(result.as_numpy("LABELS"), [CAT_CLASSES, COFFEE_CLASSES])
                    outcome = "ok"
                except triton.InferenceServerException as exc:
                    outcome = f"error: {exc}"  # explicit, with a message
                with lock:
                    outcomes.append(outcome)

    before = set(daemon.worker_pids("decoder"))
    threads = [threading.Thread(target=client_thread) for _ in range(8)]
    for t in threads:
        t.start()
    for victim in sorted(before):
        time.sleep(1.0)
        os.kill(victim, signal.SIGKILL)
    time.sleep(1.5)
    stop.set()
    for t in threads:
        t.join(180)
    assert not any(t.is_alive() for t in threads)  # no client is left waiting
    assert len(outcomes) >= 16
    failed = [o for o in outcomes if o != "ok"]
    assert not failed, failed[:3]
    deadline = time.monotonic() + 30
    while (after := set(daemon.worker_pids("decoder"))) and len(after) < len(before) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not after & before and len(after) == len(before)
    with triton.InferenceServerClient(daemon.url) as client:
        assert client.is_server_ready()
    assert metrics(daemon)['wanwu_worker_restarts_total{stage="decoder"}'] >= 2


@pytest.fixture(scope="module")
def backend():
    cfg = ServeConfig(http=False, zmq_request="tcp://127.0.0.1:0", max_images_per_request=4, max_queue_size=4,
                      decoders=1)
    backend = PipelineBackend(cfg)
    backend.start()
    yield backend
    backend.shutdown()


def test_queue_full_and_timeout_are_explicit(backend, images):
    records = backend.submit([images["chelsea"], b"junk"], source="test")
    assert records[0].labels[0]["class_id"] in CAT_CLASSES and records[0].error is None
    assert records[1].error["type"] == "DecodeError" and records[1].labels == []
    with pytest.raises(ServeError) as info:
        backend.submit([images["chelsea"]] * 5)
    assert info.value.reason == "too_large"
    with pytest.raises(ServeError) as info:
        backend.submit([images["chelsea"]], timeout_s=1e-4)
    assert info.value.reason == "timeout"
    for _ in range(10):  # fill the queue from one thread, then knock from another
        filler = threading.Thread(target=backend.submit, args=([images["chelsea"]] * 4,))
        filler.start()
        deadline = time.monotonic() + 5
        while backend.queue_depth() < 4 and filler.is_alive() and time.monotonic() < deadline:
            time.sleep(0.0005)
        try:
            if backend.queue_depth() == 4:
                with pytest.raises(ServeError) as info:
                    backend.submit([images["coffee"]])
                assert info.value.reason == "queue_full"
                break
        finally:
            filler.join()
    else:
        pytest.fail("never saw a full queue")
    assert backend.submit([images["coffee"]])[0].labels[0]["class_id"] in COFFEE_CLASSES  # still serving
    assert backend.ready()


def test_backend_that_cannot_start_says_why():
    """An engine that cannot load in the inference process (here: a GPU no machine has)
    fails start() with the worker's reason, instead of a daemon that restarts it forever."""
    backend = PipelineBackend(ServeConfig(engine="torch", device="cuda:99", decoders=1))
    with pytest.raises(StageError) as info:
        backend.start(timeout_s=120)
    assert "could not start" in str(info.value) and "inference: " in str(info.value)
    assert not backend.ready() and not backend.live()


def test_config_file_and_flags(tmp_path):
    path = tmp_path / "serve.toml"
    path.write_text('[http]\nhttp_port = 9100\ntoken = "s3cret"\n[batching]\nmax_batch_size = 16\n'
                    'preferred_batch_sizes = [8, 16]\n')
    cfg = ServeConfig.from_toml(str(path), http_port=9200)
    assert (cfg.http_port, cfg.token, cfg.batch_size, cfg.preferred_batch_sizes) == (9200, "s3cret", 16, (8, 16))
    path.write_text("max_batch = 16\n")
    with pytest.raises(ConfigError, match="max_batch"):
        ServeConfig.from_toml(str(path))
    with pytest.raises(ConfigError, match="out"):
        ServeConfig(watch=str(tmp_path))
    for stream in ("-", "/dev/null"):  # no ledger in a stream: the hot folder would repeat itself
        with pytest.raises(ConfigError, match="regular file for out"):
            ServeConfig(watch=str(tmp_path), out=stream)
    with pytest.raises(ConfigError, match="daemon's stdout"):
        ServeConfig(cameras=("front=rtsp://127.0.0.1:1/x",), camera_out="-")
    result = subprocess.run(wanwu_cmd("serve", "--config", str(path)), capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "max_batch" in result.stderr
    result = subprocess.run(wanwu_cmd("serve", "--print-config", "--http-port", "9300", "--crop", "192",
                                      "--mean", "0.4", "0.5", "0.6"), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "http_port = 9300" in result.stdout
    # The stage settings are the batch job's, model overrides included.
    assert "crop = 192" in result.stdout and "mean = [0.4, 0.5, 0.6]" in result.stdout


def test_hot_folder_once_each_across_restart(tmp_path, photos):
    """100 images dropped into the watched folder give 100 records, once each, though the
    daemon is stopped (SIGTERM, exit 0) and started again half way. A file larger than any
    image within the pixel limit gets an error record without being read."""
    watched, done, failed = tmp_path / "in", tmp_path / "done", tmp_path / "failed"
    staging = tmp_path / "staging"
    keys = make_corpus(staging, photos, 100)
    watched.mkdir()
    out = tmp_path / "watch.sqlite"
    args = ("--no-http", "--watch", str(watched), "--watch-done", str(done), "--watch-failed", str(failed),
            "--out", str(out), "--watch-settle-s", "0.2")

    def drop(batch: list[str]) -> None:
        for key in batch:
            target = watched / key
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging / key, target)  # atomic, like a careful uploader

    def wait_for(n: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if out.exists() and len(read_records(str(out))) >= n:
                return
            time.sleep(0.2)
        raise AssertionError(f"expected {n} records, have {len(read_records(str(out))) if out.exists() else 0}")

    first = Served(*args)
    drop(keys[:60])
    wait_for(30)
    assert first.stop() == 0, first.stderr[-3000:]  # mid-stream: drains what it took
    second = Served(*args)
    drop(keys[60:])
    (watched / "huge.jpg").touch()
    os.truncate(watched / "huge.jpg", 1 << 30)  # sparse: 1 GiB of nothing
    wait_for(101)
    time.sleep(1.0)  # a doubled record would show up now
    assert second.stop() == 0, second.stderr[-3000:]
    records = {r["key"]: r for r in read_records(str(out))}
    huge = records.pop("huge.jpg")
    assert huge["error"]["type"] == "ReadError" and "not read" in huge["error"]["message"], huge
    assert (failed / "huge.jpg").exists()
    assert sorted(records) == sorted(keys) and len(read_records(str(out))) == 101
    assert all(r["error"] is None and r["source"] == "watch" for r in records.values())
    assert sorted(str(p.relative_to(done)) for p in done.rglob("*.jpg")) == sorted(keys)
    assert not list(watched.rglob("*.jpg"))
