"""The KServe v2 HTTP front door, driven by Triton's official client (unmodified) and by plain HTTP.

The server runs over ``InProcessBackend`` with the real model on real photos.
"""

from __future__ import annotations

import base64
import gzip
import http.client
import json

import numpy as np
import pytest

import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from conftest import CAT_CLASSES, COFFEE_CLASSES, in_threads, jpeg_bytes
from wanwu.pipeline.serve.inprocess import InProcessBackend
from wanwu.pipeline.serve.kserve import HttpLimits, KServeHTTPServer
from wanwu.stages.models.base import get_model_spec

MODEL = "efficientnet_lite0"
ZH = get_model_spec(MODEL).labels().zh


def _serve(backend, **kwargs):
    server = KServeHTTPServer(backend, port=0, **kwargs)
    return server, f"127.0.0.1:{server.start()}"


@pytest.fixture(scope="module")
def url(backend):
    server, url = _serve(backend)
    yield url
    server.shutdown()


@pytest.fixture
def client(url):
    with triton.InferenceServerClient(url) as client:
        yield client


def image_input(*datas: bytes) -> triton.InferInput:
    tensor = triton.InferInput("IMAGE", [len(datas), 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[d] for d in datas], dtype=np.object_), binary_data=True)
    return tensor


def status_of(call) -> str:
    with pytest.raises(InferenceServerException) as info:
        call()
    return info.value.status()


def parse_classes(row) -> list[tuple[float, int, str]]:
    out = []
    for item in row:
        score, class_id, label = (item.decode() if isinstance(item, bytes) else item).split(":", 2)
        out.append((float(score), int(class_id), label))
    return out


def check_photos(result, k: int = 3) -> None:
    """Chelsea then coffee: right top-1, Chinese labels, scores best first and matching."""
    classes = [parse_classes(row) for row in result.as_numpy("LABELS")]
    scores = result.as_numpy("SCORES")
    assert scores.dtype == np.float32 and scores.shape == (2, 5)
    assert [len(row) for row in classes] == [k, k]
    assert classes[0][0][1] in CAT_CLASSES and classes[1][0][1] in COFFEE_CLASSES
    for row, row_scores in zip(classes, scores):
        assert [label for _, _, label in row] == [ZH[c] for _, c, _ in row]
        assert np.all(np.diff(row_scores) <= 0)
        np.testing.assert_allclose([s for s, _, _ in row], row_scores[:k], atol=1e-6)


def test_health_metadata_and_config(client):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(MODEL) and client.is_model_ready(MODEL, "1")
    server = client.get_server_metadata()
    assert server["name"] == "wanwu"
    assert {"classification", "binary_tensor_data", "statistics", "model_configuration"} <= set(server["extensions"])
    meta = client.get_model_metadata(MODEL, "1")
    assert meta["name"] == MODEL and meta["versions"] == ["1"]
    assert meta["inputs"] == [{"name": "IMAGE", "datatype": "BYTES", "shape": [-1, 1]}]
    assert {(o["name"], o["datatype"]) for o in meta["outputs"]} == {("LABELS", "BYTES"), ("SCORES", "FP32")}
    config = client.get_model_config(MODEL)
    assert config["max_batch_size"] == 64 and config["input"][0]["dims"] == [1]
    assert [o["dims"] for o in config["output"]] == [[5], [5]]
    assert "max_queue_delay_microseconds" in config["dynamic_batching"]
    assert status_of(lambda: client.get_model_metadata(MODEL, "7")) == "404"
    assert status_of(lambda: client.get_model_metadata("resnet50")) == "404"


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_infer_classification(client, images, binary):
    outputs = [triton.InferRequestedOutput("LABELS", binary_data=binary, class_count=3),
               triton.InferRequestedOutput("SCORES", binary_data=binary)]
    result = client.infer(MODEL, [image_input(images["chelsea"], images["coffee"])], outputs=outputs,
                          request_id="req-1")
    assert result.get_response()["id"] == "req-1"
    assert ("parameters" in result.get_output("SCORES")) is binary
    check_photos(result)


def test_infer_default_outputs_and_label_dicts(client, images):
    result = client.infer(MODEL, [image_input(images["chelsea"], images["coffee"])])  # all outputs, binary
    labels = [[json.loads(item) for item in row] for row in result.as_numpy("LABELS")]
    assert [len(row) for row in labels] == [5, 5]
    top = labels[0][0]
    assert set(top) == {"label", "label_en", "class_id", "score"}
    assert top["class_id"] in CAT_CLASSES and top["label"] == ZH[top["class_id"]] and "cat" in top["label_en"]
    np.testing.assert_allclose([[d["score"] for d in row] for row in labels], result.as_numpy("SCORES"), atol=1e-6)


def test_compressed_request_and_response(client, images):
    outputs = [triton.InferRequestedOutput("LABELS", class_count=3), triton.InferRequestedOutput("SCORES")]
    result = client.infer(MODEL, [image_input(images["chelsea"], images["coffee"])], outputs=outputs,
                          request_compression_algorithm="gzip", response_compression_algorithm="gzip")
    check_photos(result)


def test_32_concurrent_clients(url, images):
    answers: list[tuple[int, int]] = []

    def work(n: int) -> None:
        with triton.InferenceServerClient(url) as client:  # one per thread: its event loop is per thread
            for i in range(3):
                first, second = ("chelsea", "coffee") if (n + i) % 2 else ("coffee", "chelsea")
                result = client.infer(MODEL, [image_input(images[first], images[second])],
                                      outputs=[triton.InferRequestedOutput("LABELS", class_count=1)])
                ids = [parse_classes(row)[0][1] for row in result.as_numpy("LABELS")]
                want = {"chelsea": CAT_CLASSES, "coffee": COFFEE_CLASSES}
                assert ids[0] in want[first] and ids[1] in want[second], (first, second, ids)
                answers.append((n, i))

    errors = in_threads(work, 32)
    assert not errors, errors[:3]
    assert len(answers) == 32 * 3


def post(url: str, path: str, body: bytes, headers: dict | None = None) -> tuple[int, dict, bytes]:
    host, port = url.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def json_request(*datas: bytes, encode: bool = True, **extra) -> bytes:
    tensor = {"name": "IMAGE", "shape": [len(datas), 1], "datatype": "BYTES",
              "data": [base64.b64encode(d).decode() for d in datas]}
    if encode:
        tensor["parameters"] = {"content_type": "base64"}
    return json.dumps({"inputs": [tensor], **extra}).encode()


def test_plain_http_base64_json(url, images):
    status, headers, body = post(url, f"/v2/models/{MODEL}/infer", json_request(images["chelsea"], images["coffee"]))
    assert status == 200 and headers["Content-Type"] == "application/json"
    doc = json.loads(body)
    outputs = {o["name"]: o for o in doc["outputs"]}
    assert outputs["LABELS"]["shape"] == [2, 5] and outputs["SCORES"]["shape"] == [2, 5]
    labels = [json.loads(s) for s in outputs["LABELS"]["data"]]
    assert labels[0]["class_id"] in CAT_CLASSES and labels[5]["class_id"] in COFFEE_CLASSES
    assert labels[0]["label"] == ZH[labels[0]["class_id"]]
    assert outputs["SCORES"]["data"][0] == pytest.approx(labels[0]["score"], abs=1e-6)
    status, headers, zipped = post(url, f"/v2/models/{MODEL}/infer", json_request(images["chelsea"], images["coffee"]),
                                   {"Accept-Encoding": "gzip"})
    assert status == 200 and headers["Content-Encoding"] == "gzip" and json.loads(gzip.decompress(zipped)) == doc


def test_bad_images_fail_the_request_naming_them(client, url, images):
    garbage = "这不是图片 not an image".encode()
    with pytest.raises(InferenceServerException) as info:
        client.infer(MODEL, [image_input(images["chelsea"], garbage, images["coffee"][:2000])])
    assert info.value.status() == "400"
    assert "image 1 of 3: DecodeError" in info.value.message() and "image 2 of 3: DecodeError" in info.value.message()
    assert "image 0" not in info.value.message()
    # Base64 strings sent without the content_type marker are taken as bytes (Triton's rule): not an image.
    status, _, body = post(url, f"/v2/models/{MODEL}/infer", json_request(images["chelsea"], encode=False))
    assert status == 400 and "image 0 of 1: DecodeError" in json.loads(body)["error"]


@pytest.mark.parametrize("doc, message", [
    (b"{not json", "invalid JSON"),
    (json.dumps({"inputs": [{"name": "PIXELS", "shape": [1, 1], "datatype": "BYTES", "data": ["x"]}]}).encode(),
     "unexpected inference input 'PIXELS'"),
    (json.dumps({"inputs": [{"name": "IMAGE", "shape": [1, 1], "datatype": "UINT8", "data": [1]}]}).encode(),
     "datatype BYTES"),
    (json.dumps({"inputs": [{"name": "IMAGE", "shape": [2, 1], "datatype": "BYTES", "data": ["x"]}]}).encode(),
     "expected 2 strings"),
    (json.dumps({"inputs": [{"name": "IMAGE", "shape": [1, 1], "datatype": "BYTES", "data": ["%%%"],
                             "parameters": {"content_type": "base64"}}]}).encode(), "expected base64"),
    (json_request(b"x", outputs=[{"name": "BOXES"}]), "unexpected inference output 'BOXES'"),
])
def test_malformed_requests_400(url, doc, message):
    status, _, body = post(url, f"/v2/models/{MODEL}/infer", doc)
    assert status == 400 and message in json.loads(body)["error"]


def test_limits_413_and_unknown_model_404(client, backend, images):
    assert status_of(lambda: client.infer(MODEL, [image_input(*[b"x"] * 65)])) == "413"
    assert status_of(lambda: client.infer("resnet50", [image_input(images["chelsea"])])) == "404"
    server, small_url = _serve(backend, limits=HttpLimits(max_request_bytes=100_000, max_json_bytes=100_000))
    try:
        big = jpeg_bytes(np.random.default_rng(0).integers(0, 256, (400, 400, 3), np.uint8), quality=95)
        assert len(big) > 100_000
        with triton.InferenceServerClient(small_url) as small:
            assert status_of(lambda: small.infer(MODEL, [image_input(big)])) == "413"
            assert small.infer(MODEL, [image_input(images["chelsea"])]).as_numpy("SCORES").shape == (1, 5)
        status, _, _ = post(small_url, f"/v2/models/{MODEL}/infer", gzip.compress(json_request(big)),
                            {"Content-Encoding": "gzip"})
        assert status == 413  # the limit holds after decompression too
    finally:
        server.shutdown()


def test_timeout_504(client, images):
    # Triton's "timeout" request parameter, in microseconds: 1 us passes before the engine is reached.
    assert status_of(lambda: client.infer(MODEL, [image_input(images["chelsea"])], timeout=1)) == "504"


def test_bearer_token(backend, images):
    server, token_url = _serve(backend, token="s3cret")
    try:
        with triton.InferenceServerClient(token_url) as client:
            assert client.is_server_live() and client.is_server_ready()  # probes stay open
            assert status_of(client.get_server_metadata) == "401"
            assert status_of(lambda: client.infer(MODEL, [image_input(images["chelsea"])])) == "401"
            wrong = {"Authorization": "Bearer guess"}
            assert status_of(lambda: client.infer(MODEL, [image_input(images["chelsea"])], headers=wrong)) == "401"
            right = {"Authorization": "Bearer s3cret"}
            result = client.infer(MODEL, [image_input(images["chelsea"])], headers=right)
            assert result.as_numpy("SCORES").shape == (1, 5)
            assert client.get_model_metadata(MODEL, headers=right)["name"] == MODEL
    finally:
        server.shutdown()


def test_not_ready_503(images):
    backend = InProcessBackend(MODEL)  # never started: no engine loaded
    server, url = _serve(backend)
    try:
        with triton.InferenceServerClient(url) as client:
            assert client.is_server_live()
            assert not client.is_server_ready() and not client.is_model_ready(MODEL)
            assert status_of(lambda: client.infer(MODEL, [image_input(images["chelsea"])])) == "503"
    finally:
        server.shutdown()
        server.shutdown()  # safe twice
        backend.shutdown()


def test_statistics(client, images):
    client.infer(MODEL, [image_input(images["chelsea"])])
    stats = client.get_inference_statistics(MODEL)["model_stats"][0]
    assert stats["name"] == MODEL and stats["version"] == "1"
    assert stats["inference_count"] >= 1 and stats["execution_count"] >= 1 and stats["last_inference"] > 0
    success = stats["inference_stats"]["success"]
    assert success["count"] >= 1 and success["ns"] > 0
    assert stats["inference_stats"]["fail"]["count"] >= 0
    assert any(b["compute_infer"]["count"] >= 1 for b in stats["batch_stats"])


def test_inprocess_backend_records(backend, images):
    records = backend.submit([images["chelsea"], b"", images["coffee"]], source="test")
    assert [r.key for r in records][:1][0].startswith("test-")
    assert len({r.key for r in records}) == 3
    cat, empty, coffee = records
    assert list(cat.to_dict()) == ["key", "source", "width", "height", "labels", "model", "elapsed_ms", "error"]
    assert (cat.width, cat.height, cat.error) == (451, 300, None)
    assert cat.labels[0]["class_id"] in CAT_CLASSES and coffee.labels[0]["class_id"] in COFFEE_CLASSES
    assert empty.labels == [] and empty.error["type"] == "DecodeError"
