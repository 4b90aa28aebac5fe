"""KServe v2 (open inference protocol) messages as Triton speaks them over HTTP, without the HTTP.

The served model has one input and two outputs (shapes with the batch dimension
first, as Triton reports a model with ``max_batch_size > 0``):

* ``IMAGE``: BYTES ``[-1, 1]``, one encoded image (JPEG, PNG, ...) per row; ``[n]``
  is accepted too.
* ``LABELS``: BYTES ``[-1, k]``: per image its top-k labels best first, each the
  UTF-8 JSON of ``{"label", "label_en", "class_id", "score"}``. With the
  classification extension (output parameter ``"classification": K``) it is
  ``[-1, min(K, k)]`` strings ``"score:class_id:中文标签"`` instead.
* ``SCORES``: FP32 ``[-1, k]``, the matching softmax probabilities. Asked with
  ``"classification": K`` it is the same classification strings as ``LABELS``.

Image bytes travel either with the binary tensor data extension (JSON header
whose input has ``parameters.binary_data_size``, its length in the
``Inference-Header-Content-Length`` HTTP header, then each element as a 4-byte
little-endian length and its bytes), or inside the JSON as base64 strings, marked
by the input parameter ``"content_type": "base64"`` (MLServer's convention for
the same thing). Without that marker JSON strings are taken as UTF-8 bytes, as
Triton does. Outputs come back as binary data when the output asks for
``"binary_data": true`` or, for outputs that do not say, when the request has
``"binary_data_output": true``; JSON otherwise. No ``outputs`` means both. The
request's ``id`` is echoed; its parameter ``timeout`` (microseconds, as Triton's
clients send it) bounds the wait for the backend.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from wanwu.errors import WanwuError
from wanwu.pipeline.serve.backend import ModelInfo
from wanwu.records import Record

logger = logging.getLogger(__name__)

INPUT = "IMAGE"
OUTPUTS = ("LABELS", "SCORES")
BASE64 = "base64"  # value of the input parameter "content_type" that marks base64 JSON strings


class RequestError(WanwuError):
    """A request the front door refuses, with the HTTP status to answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class RequestedOutput:
    name: str  # "LABELS" or "SCORES"
    binary: bool  # send as binary tensor data
    classification: int = 0  # > 0: the classification extension's K strings per image


@dataclass(frozen=True)
class InferRequest:
    images: list[bytes]  # encoded images, in order
    outputs: tuple[RequestedOutput, ...]  # what to send back, in order
    id: str | None = None  # echoed in the response
    timeout_s: float | None = None  # from the request parameter "timeout" (microseconds, as Triton)


MAX_TIMEOUT_US = 24 * 3600 * 10**6  # a day: longer is a mistake, and 10**400 must not overflow a float


def parse_infer_request(body: bytes, header_length: int | None, model: str,
                        max_images: int | None = None) -> InferRequest:
    """Parse an infer request body (JSON, or JSON header + binary tensor data).

    Sizes and counts are checked before objects are built: the JSON header's count of
    objects and arrays against what a request of ``max_images`` images can hold, and
    the input's declared image count before its binary data is split.

    Raises:
        RequestError: 400 with what was expected and what came; 413 over ``max_images``.
    """
    if header_length is None:
        header, blob = body, b""
    elif 0 < header_length <= len(body):
        header, blob = body[:header_length], memoryview(body)[header_length:]
    else:
        raise _bad(f"expected Inference-Header-Content-Length in 1..{len(body)}, got {header_length}")
    if max_images is not None:
        _check_json_size(header, max_images)
    try:
        doc = json.loads(header)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise _bad(f"expected a JSON inference request, got invalid JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise _bad(f"expected a JSON object as inference request, got {type(doc).__name__}")
    inputs = doc.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise _bad(f"expected exactly one input {INPUT!r} for model {model!r}, got {_names(inputs)}")
    images = _parse_input(inputs[0], blob, model, max_images)
    params = _dict(doc.get("parameters"), "request parameters")
    binary_default = params.get("binary_data_output", False) is True
    timeout_s = timeout_from_us(params.get("timeout"))
    request_id = doc.get("id")
    return InferRequest(images, _parse_outputs(doc.get("outputs"), binary_default),
                        str(request_id) if request_id is not None else None, timeout_s)


def _check_json_size(header: bytes | memoryview, max_images: int) -> None:
    """Refuse JSON whose objects and arrays could not belong to a request of ``max_images`` images.

    ``json.loads`` turns ``{"x":[{},{},...]}`` into about 30 times its size in Python
    objects; counting the brackets first (strings included, which only overcounts) costs
    one pass over the bytes and builds nothing.
    """
    data = bytes(header)
    containers = data.count(b"{") + data.count(b"[")
    allowed = 64 + 2 * max_images  # envelope, parameters and outputs, plus [s] per image
    if containers > allowed:
        raise RequestError(413, f"expected a JSON request of at most {allowed} objects and arrays for "
                                f"{max_images} images, got {containers}")


def _parse_input(tensor: dict, blob: memoryview | bytes, model: str, max_images: int | None = None) -> list[bytes]:
    if tensor.get("name") != INPUT:
        raise _bad(f"unexpected inference input {tensor.get('name')!r} for model {model!r}, expected {INPUT!r}")
    if tensor.get("datatype") != "BYTES":
        raise _bad(f"expected input {INPUT!r} of datatype BYTES, got {tensor.get('datatype')!r}")
    shape = tensor.get("shape")
    if (not isinstance(shape, list) or len(shape) not in (1, 2) or not all(isinstance(d, int) for d in shape)
            or shape[0] < 0 or (len(shape) == 2 and shape[1] != 1)):
        raise _bad(f"expected input {INPUT!r} of shape [n, 1] or [n], got {shape!r}")
    count = shape[0]
    if max_images is not None and count > max_images:
        raise RequestError(413, f"expected at most {max_images} images per request, got {count}")
    params = _dict(tensor.get("parameters"), f"parameters of input {INPUT!r}")
    size = params.get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or size != len(blob):
            raise _bad(f"expected binary_data_size equal to the {len(blob)} bytes after the JSON header, "
                       f"got {size!r}")
        return deserialize_bytes(blob, count)
    if len(blob):
        raise _bad(f"got {len(blob)} bytes of binary data but no input declares binary_data_size")
    data = tensor.get("data")
    if not isinstance(data, list):
        raise _bad(f"expected input {INPUT!r} to carry 'data' or parameters.binary_data_size, got neither")
    # Row-major data may come flat or nested as [[s], [s], ...]; both are shape [n, 1].
    strings = [item[0] if isinstance(item, list) and len(item) == 1 else item for item in data]
    if len(strings) != count or not all(isinstance(s, str) for s in strings):
        raise _bad(f"expected {count} strings in the data of input {INPUT!r} (shape {shape}), "
                   f"got {len(strings)} elements")
    if params.get("content_type") != BASE64:
        return [s.encode("utf-8") for s in strings]
    images = []
    for i, s in enumerate(strings):
        try:
            images.append(base64.b64decode(s, validate=True))
        except (binascii.Error, ValueError) as exc:
            raise _bad(f"image {i}: expected base64 (content_type {BASE64!r}), got invalid data: {exc}") from exc
    return images


def _parse_outputs(outputs: Any, binary_default: bool) -> tuple[RequestedOutput, ...]:
    if outputs is None:
        return tuple(RequestedOutput(name, binary_default) for name in OUTPUTS)
    if not isinstance(outputs, list) or not all(isinstance(o, dict) for o in outputs):
        raise _bad(f"expected 'outputs' as a list of objects, got {outputs!r:.100}")
    parsed = []
    for out in outputs:
        name = out.get("name")
        if name not in OUTPUTS:
            raise _bad(f"unexpected inference output {name!r}, expected one of {list(OUTPUTS)}")
        params = _dict(out.get("parameters"), f"parameters of output {name!r}")
        binary = params.get("binary_data", binary_default)
        count = params.get("classification", 0)
        if not isinstance(binary, bool) or not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise _bad(f"expected output {name!r} parameters binary_data (bool) and classification (int >= 0), "
                       f"got {binary!r} and {count!r}")
        parsed.append(RequestedOutput(name, binary, count))
    return tuple(parsed)


def deserialize_bytes(buf: memoryview | bytes, count: int) -> list[bytes]:
    """Split binary BYTES tensor data (4-byte little-endian length, then the bytes) into ``count`` elements."""
    buf = memoryview(buf)
    out, offset = [], 0
    while offset < len(buf):
        if offset + 4 > len(buf):
            raise _bad(f"truncated BYTES tensor data: element {len(out)} has {len(buf) - offset} of 4 length bytes")
        (length,) = struct.unpack_from("<I", buf, offset)
        offset += 4
        if offset + length > len(buf):
            raise _bad(f"truncated BYTES tensor data: element {len(out)} declares {length} bytes, "
                       f"{len(buf) - offset} remain")
        out.append(bytes(buf[offset:offset + length]))
        offset += length
        if len(out) > count:  # stop at once: millions of tiny elements must not be split first
            break
    if len(out) != count:
        got = f"{len(out)}" if offset >= len(buf) else f"more than {count}"
        raise _bad(f"expected {count} elements in input {INPUT!r} as its shape says, got {got}")
    return out


def serialize_bytes(items: list[bytes]) -> bytes:
    """Binary BYTES tensor data: each element as a 4-byte little-endian length and its bytes."""
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


# Error record types that are the input's fault; any other (a worker that died, a drain) is the server's.
CLIENT_ERRORS = frozenset({"InputError", "ReadError", "DecodeError", "PixelLimitError"})


def check_records(records: list[Record]) -> None:
    """Fail the whole request when an image could not be recognised, naming each bad image.

    Raises:
        RequestError: 400 ``"image 2 of 3: DecodeError: ..."`` when the images are at fault, as
            Triton fails a request with a bad input; 503 (retryable) when any failure was the
            server's (a worker died, the daemon is draining).
    """
    bad = [(i, r.error) for i, r in enumerate(records) if r.error]
    if bad:
        detail = "; ".join(f"image {i} of {len(records)}: {e.get('type')}: {e.get('message')}" for i, e in bad)
        server_side = any(e.get("type") not in CLIENT_ERRORS for _, e in bad)
        raise RequestError(503, detail) if server_side else _bad(detail)


def encode_infer_response(info: ModelInfo, request: InferRequest, records: list[Record]) -> tuple[bytes, int | None]:
    """The response body and, when some output is binary, the length of its JSON header."""
    k = min(len(r.labels) for r in records)
    doc: dict[str, Any] = {"model_name": info.name, "model_version": info.version, "outputs": []}
    if request.id is not None:
        doc["id"] = request.id
    blobs = []
    for out in request.outputs:
        datatype, shape, values = _output_values(out, records, k)
        tensor: dict[str, Any] = {"name": out.name, "datatype": datatype, "shape": shape}
        if out.binary:
            blob = serialize_bytes(values) if datatype == "BYTES" else np.asarray(values, "<f4").tobytes()
            tensor["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            tensor["data"] = [v.decode("utf-8") for v in values] if datatype == "BYTES" else values
        doc["outputs"].append(tensor)
    header = json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return (header + b"".join(blobs), len(header)) if blobs else (header, None)


def _output_values(out: RequestedOutput, records: list[Record], k: int) -> tuple[str, list[int], list]:
    """Datatype, shape and flat row-major values of one output."""
    rows = [r.labels[:k] for r in records]
    if out.classification:
        count = min(out.classification, k)
        values = [f"{d['score']:f}:{d['class_id']}:{d['label']}".encode("utf-8") for row in rows for d in row[:count]]
        return "BYTES", [len(rows), count], values
    if out.name == "SCORES":
        return "FP32", [len(rows), k], [float(d["score"]) for row in rows for d in row]
    return "BYTES", [len(rows), k], [json.dumps(d, ensure_ascii=False).encode("utf-8") for row in rows for d in row]


def timeout_from_us(value: Any) -> float | None:
    """The request parameter ``timeout`` (microseconds, as Triton's clients send it) in seconds.

    None (no parameter) stays None: the backend's default applies.

    Raises:
        RequestError: 400 unless ``value`` is an int in ``1..MAX_TIMEOUT_US`` (the check
            ``parse_infer_request`` makes), so that a negative or huge value is refused here
            rather than overflow a wait later.
    """
    if value is None:
        return None
    if type(value) is not int or not 0 < value <= MAX_TIMEOUT_US:  # bool is an int too
        raise _bad(f"expected parameter 'timeout' in 1..{MAX_TIMEOUT_US} microseconds, got {value!r:.40}")
    return value / 1e6


@dataclass(frozen=True)
class RawOutput:
    """One output tensor as binary tensor data: the HTTP binary extension's blob, gRPC's raw contents."""

    name: str  # "LABELS" or "SCORES"
    datatype: str  # "BYTES" or "FP32"
    shape: tuple[int, ...]  # (images, labels per image)
    data: bytes  # row-major; BYTES as 4-byte little-endian lengths and bytes, FP32 little-endian


def raw_outputs(outputs: tuple[RequestedOutput, ...], records: list[Record]) -> list[RawOutput]:
    """The requested outputs of ``records`` (none with an error; see ``check_records``), in order.

    Same tensors as ``encode_infer_response`` sends as binary data: every image gets the
    labels all of them have (``k``), classification strings when the output asks.
    """
    k = min(len(r.labels) for r in records)
    raw = []
    for out in outputs:
        datatype, shape, values = _output_values(out, records, k)
        data = serialize_bytes(values) if datatype == "BYTES" else np.asarray(values, "<f4").tobytes()
        raw.append(RawOutput(out.name, datatype, tuple(shape), data))
    return raw


def _dict(value: Any, what: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _bad(f"expected {what} as a JSON object, got {type(value).__name__}")
    return value


def _names(inputs: Any) -> str:
    if not isinstance(inputs, list):
        return repr(inputs)[:100]
    return repr([i.get("name") if isinstance(i, dict) else i for i in inputs])[:200]


def _bad(message: str) -> RequestError:
    return RequestError(400, message)
