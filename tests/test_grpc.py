"""The KServe v2 gRPC front door, driven by Triton's official client (``tritonclient.grpc``, unmodified).

A real gRPC server on 127.0.0.1 serves ``InProcessBackend`` with the real model on
real photos. ``Watched`` passes every call to that backend and only counts the
submits in flight (and can hold them), to show what reaches the backend and when.
"""

from __future__ import annotations

import json
import queue
import threading
import time

import grpc
import numpy as np
import pytest

import tritonclient.grpc as triton
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc
from tritonclient.utils import InferenceServerException

from conftest import CAT_CLASSES, COFFEE_CLASSES, in_threads, jpeg_bytes
from wanwu.errors import ConfigError, TransportError
from wanwu.pipeline.serve import grpc_codec
from wanwu.pipeline.serve.backend import ServeError
from wanwu.pipeline.serve.grpc_door import GrpcDoor
from wanwu.pipeline.serve.inprocess import InProcessBackend
from wanwu.stages.models.base import get_model_spec

MODEL = "efficientnet_lite0"
ZH = get_model_spec(MODEL).labels().zh
WANT = {"chelsea": CAT_CLASSES, "coffee": COFFEE_CLASSES}


class Watched:
    """The real backend; counts submits (all, and in flight at once) and holds them while ``gate`` is clear."""

    def __init__(self, backend) -> None:
        self.backend = backend
        self.lock = threading.Lock()
        self.calls = self.now = self.peak = 0
        self.entered = threading.Event()
        self.gate = threading.Event()
        self.gate.set()

    def __getattr__(self, name: str):
        return getattr(self.backend, name)

    def submit(self, images, **kwargs):
        with self.lock:
            self.calls += 1
            self.now += 1
            self.peak = max(self.peak, self.now)
        self.entered.set()
        try:
            assert self.gate.wait(60), "the test never opened the gate"
            return self.backend.submit(images, **kwargs)
        finally:
            with self.lock:
                self.now -= 1


@pytest.fixture(scope="module")
def watched(backend):
    return Watched(backend)


@pytest.fixture(scope="module")
def address(watched):
    door = GrpcDoor(watched)
    yield door.start()
    door.shutdown()


@pytest.fixture
def client(address):
    with triton.InferenceServerClient(address) as client:
        yield client


def image_input(*datas: bytes) -> triton.InferInput:
    tensor = triton.InferInput("IMAGE", [len(datas), 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[d] for d in datas], dtype=np.object_))
    return tensor


def refusal(call) -> tuple[str, str]:
    """The gRPC status (``"StatusCode.X"``) and message ``call()`` fails with."""
    with pytest.raises(InferenceServerException) as info:
        call()
    return info.value.status(), info.value.message()


def parse_classes(row) -> list[tuple[float, int, str]]:
    out = []
    for item in row:
        score, class_id, label = item.decode().split(":", 2)
        out.append((float(score), int(class_id), label))
    return out


def test_health_metadata_config_and_stats(client, images):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(MODEL) and client.is_model_ready(MODEL, "1")
    server = client.get_server_metadata(as_json=True)
    assert server["name"] == "wanwu"
    assert {"classification", "binary_tensor_data", "statistics", "model_configuration"} <= set(server["extensions"])
    meta = client.get_model_metadata(MODEL, "1")
    assert meta.name == MODEL and list(meta.versions) == ["1"]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [("IMAGE", "BYTES", [-1, 1])]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [("LABELS", "BYTES", [-1, 5]),
                                                                        ("SCORES", "FP32", [-1, 5])]
    config = client.get_model_config(MODEL).config
    assert config.name == MODEL and config.max_batch_size == 64 and list(config.input[0].dims) == [1]
    assert [list(o.dims) for o in config.output] == [[5], [5]]
    assert config.parameters["num_classes"].string_value == "1000"
    client.infer(MODEL, [image_input(images["chelsea"])])
    for name in (MODEL, ""):  # "" asks for every model
        stats = client.get_inference_statistics(name).model_stats[0]
        assert stats.name == MODEL and stats.version == "1"
        assert stats.inference_count >= 1 and stats.inference_stats.success.count >= 1
        assert any(b.compute_infer.count >= 1 for b in stats.batch_stats)
    assert refusal(lambda: client.get_model_metadata(MODEL, "7"))[0] == "StatusCode.NOT_FOUND"
    status, message = refusal(lambda: client.get_model_config("resnet50"))
    assert status == "StatusCode.NOT_FOUND" and "unknown model 'resnet50'" in message
    assert refusal(lambda: client.is_model_ready("resnet50"))[0] == "StatusCode.NOT_FOUND"
    assert refusal(client.get_model_repository_index) == ("StatusCode.UNIMPLEMENTED",
                                                          "RepositoryIndex is not served by wanwu")


def test_16_threads_at_once(address, watched, images):
    answers = []

    def work(n: int) -> None:
        with triton.InferenceServerClient(address) as client:
            for i in range(3):
                first, second = ("chelsea", "coffee") if (n + i) % 2 else ("coffee", "chelsea")
                result = client.infer(MODEL, [image_input(images[first], images[second])], request_id=f"{n}-{i}")
                assert result.get_response().id == f"{n}-{i}"
                labels = [[json.loads(item) for item in row] for row in result.as_numpy("LABELS")]
                scores = result.as_numpy("SCORES")
                assert scores.dtype == np.float32 and scores.shape == (2, 5) and [len(r) for r in labels] == [5, 5]
                assert labels[0][0]["class_id"] in WANT[first] and labels[1][0]["class_id"] in WANT[second]
                assert set(labels[0][0]) == {"label", "label_en", "class_id", "score"}
                assert all(d["label"] == ZH[d["class_id"]] for row in labels for d in row)
                np.testing.assert_allclose([[d["score"] for d in row] for row in labels], scores, atol=1e-6)
                answers.append((n, i))

    watched.peak = 0
    errors = in_threads(work, 16)
    assert not errors, errors[:3]
    assert len(answers) == 16 * 3
    assert watched.peak >= 2  # requests reach the backend together, not one at a time


def test_classification_strings(client, images):
    outputs = [triton.InferRequestedOutput("LABELS", class_count=3), triton.InferRequestedOutput("SCORES")]
    result = client.infer(MODEL, [image_input(images["chelsea"], images["coffee"])], outputs=outputs)
    assert [o.name for o in result.get_response().outputs] == ["LABELS", "SCORES"]
    classes = [parse_classes(row) for row in result.as_numpy("LABELS")]
    scores = result.as_numpy("SCORES")
    assert [len(row) for row in classes] == [3, 3] and scores.shape == (2, 5)
    assert classes[0][0][1] in CAT_CLASSES and classes[1][0][1] in COFFEE_CLASSES
    for row, row_scores in zip(classes, scores):
        assert [label for _, _, label in row] == [ZH[c] for _, c, _ in row]
        np.testing.assert_allclose([s for s, _, _ in row], row_scores[:3], atol=1e-6)
    only = client.infer(MODEL, [image_input(images["coffee"])],
                        outputs=[triton.InferRequestedOutput("SCORES", class_count=9)])  # at most top_k strings
    assert [o.name for o in only.get_response().outputs] == ["SCORES"]
    assert len(parse_classes(only.as_numpy("SCORES")[0])) == 5


def test_bytes_contents_and_shape_n(address, images):
    # tritonclient sends raw_input_contents; other clients put the images in the tensor itself.
    request = pb.ModelInferRequest(model_name=MODEL, id="plain")
    tensor = request.inputs.add(name="IMAGE", datatype="BYTES", shape=[2])
    tensor.contents.bytes_contents.extend([images["coffee"], images["chelsea"]])
    with grpc.insecure_channel(address) as channel:
        response = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=60)
    assert response.id == "plain" and [list(o.shape) for o in response.outputs] == [[2, 5], [2, 5]]
    scores = np.frombuffer(response.raw_output_contents[1], "<f4").reshape(2, 5)
    assert np.all(np.diff(scores, axis=1) <= 0) and np.all(scores[:, 0] > 0.05)
    labels = triton.InferResult(response).as_numpy("LABELS")
    assert json.loads(labels[0, 0])["class_id"] in COFFEE_CLASSES
    assert json.loads(labels[1, 0])["class_id"] in CAT_CLASSES


def test_bad_images_fail_the_request_naming_them(client, images):
    garbage = "这不是图片 not an image".encode()
    status, message = refusal(lambda: client.infer(MODEL, [image_input(images["chelsea"], garbage,
                                                                       images["coffee"][:2000])]))
    assert status == "StatusCode.INVALID_ARGUMENT"
    assert "image 1 of 3: DecodeError" in message and "image 2 of 3: DecodeError" in message
    assert "image 0" not in message


def test_too_many_images_refused_before_decoding(client, address, watched, backend, images):
    calls = watched.calls
    status, message = refusal(lambda: client.infer(MODEL, [image_input(*[b"x"] * 65)]))
    assert status == "StatusCode.INVALID_ARGUMENT" and "expected at most 64 images per request, got 65" in message
    # A shape of a billion images over one byte of contents: the count is refused, the contents never split.
    request = pb.ModelInferRequest(model_name=MODEL, raw_input_contents=[b"\x01"])
    request.inputs.add(name="IMAGE", datatype="BYTES", shape=[10**9, 1])
    with grpc.insecure_channel(address) as channel, pytest.raises(grpc.RpcError) as info:
        pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=60)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "got 1000000000" in info.value.details() and "truncated" not in info.value.details()
    assert watched.calls == calls  # the backend saw none of them
    door = GrpcDoor(backend, max_images_per_request=2)  # the door's own limit, under the backend's 64
    try:
        with triton.InferenceServerClient(door.start()) as small:
            status, message = refusal(lambda: small.infer(MODEL, [image_input(*[images["chelsea"]] * 3)]))
            assert status == "StatusCode.INVALID_ARGUMENT" and "at most 2 images" in message
            assert small.infer(MODEL, [image_input(images["chelsea"])]).as_numpy("SCORES").shape == (1, 5)
    finally:
        door.shutdown()


def test_message_size_limit(backend, images):
    door = GrpcDoor(backend, max_request_bytes=100_000)
    try:
        big = jpeg_bytes(np.random.default_rng(0).integers(0, 256, (400, 400, 3), np.uint8), quality=95)
        assert len(big) > 100_000 + (64 << 10)  # over the limit and the room left for the envelope
        with triton.InferenceServerClient(door.start()) as small:
            assert refusal(lambda: small.infer(MODEL, [image_input(big)]))[0] == "StatusCode.RESOURCE_EXHAUSTED"
            assert small.infer(MODEL, [image_input(images["chelsea"])]).as_numpy("SCORES").shape == (1, 5)
    finally:
        door.shutdown()


@pytest.mark.parametrize("timeout_us", [2**62, -5], ids=["huge", "negative"])
def test_bad_timeout_invalid_argument(client, images, timeout_us):
    status, message = refusal(lambda: client.infer(MODEL, [image_input(images["chelsea"])], timeout=timeout_us))
    assert status == "StatusCode.INVALID_ARGUMENT" and "parameter 'timeout'" in message


def test_timeouts_deadline_exceeded(client, images):
    # 1 us passes before the engine is reached: the backend's timeout, as gRPC's code.
    status, _ = refusal(lambda: client.infer(MODEL, [image_input(images["chelsea"])], timeout=1))
    assert status == "StatusCode.DEADLINE_EXCEEDED"
    assert grpc_codec.wait_s(None, None) is None
    assert grpc_codec.wait_s(5.0, 2.0) == 2.0 and grpc_codec.wait_s(1.0, 10.0) == 1.0
    assert grpc_codec.wait_s(None, 1e12) == 86_400.0  # a far deadline stays a wait the backend can express
    with pytest.raises(ServeError) as info:
        grpc_codec.wait_s(3.0, -0.1)
    assert info.value.reason == "timeout"


def test_bearer_token(backend, images):
    door = GrpcDoor(backend, token="s3cret")
    try:
        with triton.InferenceServerClient(door.start()) as client:
            assert client.is_server_live() and client.is_server_ready()  # probes stay open
            status, message = refusal(client.get_server_metadata)
            assert status == "StatusCode.UNAUTHENTICATED" and message.endswith("got none")
            assert refusal(lambda: client.is_model_ready(MODEL))[0] == "StatusCode.UNAUTHENTICATED"
            wrong = {"authorization": "Bearer guess"}
            status, message = refusal(lambda: client.infer(MODEL, [image_input(images["chelsea"])], headers=wrong))
            assert status == "StatusCode.UNAUTHENTICATED" and "wrong token" in message
            right = {"authorization": "Bearer s3cret"}
            result = client.infer(MODEL, [image_input(images["chelsea"])], headers=right)
            assert json.loads(result.as_numpy("LABELS")[0, 0])["class_id"] in CAT_CLASSES
            assert client.get_model_metadata(MODEL, headers=right).name == MODEL
            answers: queue.Queue = queue.Queue()
            client.start_stream(lambda result, error: answers.put((result, error)))  # no token
            try:
                client.async_stream_infer(MODEL, [image_input(images["chelsea"])])
            except InferenceServerException:  # the refusal came first: the client knows the stream is over
                pass
            result, error = answers.get(timeout=60)
            client.stop_stream()
            assert result is None and error.status() == "StatusCode.UNAUTHENTICATED"
            client.start_stream(lambda result, error: answers.put((result, error)), headers=right)
            client.async_stream_infer(MODEL, [image_input(images["chelsea"])], request_id="with-token")
            result, error = answers.get(timeout=60)
            client.stop_stream()
            assert error is None and result.get_response().id == "with-token"
    finally:
        door.shutdown()


def test_stream_answers_every_request(client, watched, images):
    watched.peak = 0
    answers: queue.Queue = queue.Queue()
    client.start_stream(lambda result, error: answers.put((result, error)))
    try:
        sent = {}
        for i in range(6):
            name = ("chelsea", "coffee")[i % 2]
            sent[f"s{i}"] = name
            outputs = [triton.InferRequestedOutput("LABELS", class_count=1)]
            client.async_stream_infer(MODEL, [image_input(images[name])], request_id=f"s{i}", outputs=outputs)
        client.async_stream_infer(MODEL, [image_input(b"not an image")], request_id="bad")
        got, errors = {}, []
        for _ in range(7):
            result, error = answers.get(timeout=120)
            if error is not None:
                errors.append(error.message())
                continue
            got[result.get_response().id] = parse_classes(result.as_numpy("LABELS")[0])[0][1]
    finally:
        client.stop_stream()
    assert set(got) == set(sent)
    assert all(got[rid] in WANT[name] for rid, name in sent.items()), got
    assert len(errors) == 1 and "image 0 of 1: DecodeError" in errors[0]
    assert watched.peak >= 2  # a stream's requests run concurrently, so the backend can batch them


def test_shutdown_lets_in_flight_finish_and_is_safe_twice(backend, images):
    held = Watched(backend)
    held.gate.clear()  # the request waits at the backend until the shutdown has begun
    door = GrpcDoor(held)
    address = door.start()
    events: list[str] = []
    results: list = []

    def infer() -> None:
        with triton.InferenceServerClient(address) as client:
            results.append(client.infer(MODEL, [image_input(images["chelsea"])], client_timeout=60))
        events.append("answered")

    def shutdown() -> None:
        door.shutdown(grace_s=30)
        events.append("shut down")

    asker = threading.Thread(target=infer)
    asker.start()
    assert held.entered.wait(60)
    closer = threading.Thread(target=shutdown)
    closer.start()
    time.sleep(0.3)
    assert closer.is_alive()  # it waits for the request in flight
    held.gate.set()
    asker.join(60)
    closer.join(60)
    # Both happened; which thread records first after the answer leaves is a race. That the shutdown
    # waited for the request in flight is shown above: it was still running while the request was held.
    assert sorted(events) == ["answered", "shut down"]
    assert json.loads(results[0].as_numpy("LABELS")[0, 0])["class_id"] in CAT_CLASSES
    door.shutdown()  # safe twice
    with triton.InferenceServerClient(address) as client:
        assert refusal(lambda: client.is_server_live(client_timeout=5))[0] == "StatusCode.UNAVAILABLE"
    with pytest.raises(TransportError):
        door.start()


def test_not_ready_unavailable_and_port_in_use(address, images):
    backend = InProcessBackend(MODEL)  # never started: no engine loaded
    door = GrpcDoor(backend)
    try:
        with triton.InferenceServerClient(door.start()) as client:
            assert client.is_server_live() and not client.is_server_ready() and not client.is_model_ready(MODEL)
            status, message = refusal(lambda: client.infer(MODEL, [image_input(images["chelsea"])]))
            assert status == "StatusCode.UNAVAILABLE" and "not ready" in message  # the code clients retry
    finally:
        door.shutdown()
        backend.shutdown()
    with pytest.raises(ConfigError, match="bind"):  # not a second server sharing the port (SO_REUSEPORT)
        GrpcDoor(backend, port=int(address.rsplit(":", 1)[1])).start()
