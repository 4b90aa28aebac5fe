"""KServe v2 messages as Triton speaks them over gRPC, without the server: protobuf in, protobuf out.

The messages are those of ``tritonclient.grpc.service_pb2``; the tensors, documents
and error messages are the HTTP door's (``kserve_codec``, ``kserve_meta``), so both
doors answer the same request alike:

* input ``IMAGE``: BYTES ``[n, 1]`` or ``[n]``, in ``raw_input_contents[0]`` (each image
  as a 4-byte little-endian length and its bytes: what ``tritonclient`` sends) or in
  the tensor's ``contents.bytes_contents``. The shape is checked against the image limit
  before the contents are split;
* outputs ``LABELS`` and ``SCORES`` (none asked = both), always in ``raw_output_contents``,
  as Triton's gRPC server answers; an output's ``classification`` parameter (int) asks for
  ``"score:class_id:label"`` strings;
* request parameter ``timeout``: an integer of microseconds (``kserve_codec.timeout_from_us``);
* shared-memory parameters are refused: this server reads tensors from the message only.

Errors raise ``kserve_codec.RequestError`` with the HTTP door's status; ``code_of`` maps
a status to the gRPC code the door answers with.
"""

from __future__ import annotations

import logging
from typing import Any

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message
from tritonclient.grpc import model_config_pb2 as config_pb2
from tritonclient.grpc import service_pb2 as pb

from wanwu.pipeline.serve import kserve_codec as codec
from wanwu.pipeline.serve import kserve_meta as meta
from wanwu.pipeline.serve.backend import ModelInfo, ServeError
from wanwu.records import Record

logger = logging.getLogger(__name__)

# HTTP statuses (RequestError.status, ServeError.http_status) as gRPC codes, as Triton maps its errors.
# 413 (too many images) is an argument error, as Triton answers a batch over max_batch_size;
# 503 (queue full, not ready, a worker lost the image) is the code clients retry.
CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED, 404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.INVALID_ARGUMENT, 500: grpc.StatusCode.INTERNAL, 503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}
_INT_KINDS = ("int64_param", "uint64_param")


def http_status(exc: BaseException) -> int | None:
    """The HTTP door's status for ``exc``; None for anything but a refusal (a bug: INTERNAL)."""
    if isinstance(exc, codec.RequestError):
        return exc.status
    if isinstance(exc, ServeError):
        return exc.http_status
    return None


def code_of(status: int) -> grpc.StatusCode:
    """The gRPC code of an HTTP status: ``CODES``, else INTERNAL for 5xx and INVALID_ARGUMENT for 4xx."""
    return CODES.get(status, grpc.StatusCode.INTERNAL if status >= 500 else grpc.StatusCode.INVALID_ARGUMENT)


def check_model(info: ModelInfo, name: str, version: str) -> None:
    """Raises RequestError 404 unless ``name`` is the served model and ``version`` is empty or its version."""
    if name != info.name:
        raise codec.RequestError(404, f"unknown model {name!r}; this server serves {info.name!r}")
    if version and version != info.version:
        raise codec.RequestError(404, f"unknown version {version!r} of model {info.name!r}; "
                                      f"expected {info.version!r}")


def parse_infer_request(request: pb.ModelInferRequest, info: ModelInfo, max_images: int) -> codec.InferRequest:
    """The images, requested outputs, id and timeout of an infer request.

    Raises:
        RequestError: 404 another model or version; 413 more than ``max_images`` images
            (checked on the shape, before the contents are split); 400 anything else amiss.
    """
    check_model(info, request.model_name, request.model_version)
    if len(request.inputs) != 1:
        raise _bad(f"expected exactly one input {codec.INPUT!r} for model {info.name!r}, "
                   f"got {[t.name for t in request.inputs]!r:.200}")
    tensor = request.inputs[0]
    if tensor.name != codec.INPUT:
        raise _bad(f"unexpected inference input {tensor.name!r} for model {info.name!r}, expected {codec.INPUT!r}")
    if tensor.datatype != "BYTES":
        raise _bad(f"expected input {codec.INPUT!r} of datatype BYTES, got {tensor.datatype!r}")
    shape = list(tensor.shape)
    if len(shape) not in (1, 2) or shape[0] < 0 or (len(shape) == 2 and shape[1] != 1):
        raise _bad(f"expected input {codec.INPUT!r} of shape [n, 1] or [n], got {shape!r:.100}")
    count = shape[0]
    if count == 0:
        raise _bad(f"expected at least one image in input {codec.INPUT!r}, got none")
    if count > max_images:
        raise codec.RequestError(413, f"expected at most {max_images} images per request, got {count}")
    _refuse_shared_memory(tensor.parameters, f"input {codec.INPUT!r}")
    images = _images(request, tensor, count)
    outputs = tuple(_requested_output(out) for out in request.outputs)
    timeout_s = codec.timeout_from_us(_int_param(request.parameters, "timeout", "request parameter 'timeout'"))
    return codec.InferRequest(images, outputs or tuple(codec.RequestedOutput(name, True) for name in codec.OUTPUTS),
                              request.id, timeout_s)


def _images(request: pb.ModelInferRequest, tensor: Any, count: int) -> list[bytes]:
    raw, elements = request.raw_input_contents, tensor.contents.bytes_contents
    if raw:
        if len(raw) != 1 or elements:
            raise _bad(f"expected input {codec.INPUT!r} in one raw_input_contents entry or in "
                       f"contents.bytes_contents, got {len(raw)} raw entries and {len(elements)} elements")
        return codec.deserialize_bytes(raw[0], count)
    if len(elements) != count:
        raise _bad(f"expected {count} elements in input {codec.INPUT!r} as its shape says, got {len(elements)}")
    return list(elements)


def _requested_output(out: Any) -> codec.RequestedOutput:
    if out.name not in codec.OUTPUTS:
        raise _bad(f"unexpected inference output {out.name!r}, expected one of {list(codec.OUTPUTS)}")
    _refuse_shared_memory(out.parameters, f"output {out.name!r}")
    count = _int_param(out.parameters, "classification", f"parameter 'classification' of output {out.name!r}")
    if count is not None and count < 0:
        raise _bad(f"expected parameter 'classification' of output {out.name!r} >= 0, got {count}")
    return codec.RequestedOutput(out.name, True, count or 0)


def _int_param(params: Any, key: str, what: str) -> int | None:
    if key not in params:
        return None
    kind = params[key].WhichOneof("parameter_choice")
    if kind not in _INT_KINDS:
        raise _bad(f"expected {what} as an integer (int64_param or uint64_param), got {kind or 'no value'}")
    return getattr(params[key], kind)


def _refuse_shared_memory(params: Any, what: str) -> None:
    for key in params:
        if key.startswith("shared_memory_"):
            raise _bad(f"expected the tensor data of {what} in the request, got shared memory parameter {key!r} "
                       "(not supported)")


def wait_s(timeout_s: float | None, remaining_s: float | None) -> float | None:
    """How long the backend may take: the shorter of the ``timeout`` parameter and the call's
    deadline (``remaining_s``, None = no deadline); None when neither says (the backend's default).

    Raises:
        ServeError: ``timeout`` when the deadline has passed already.
    """
    if remaining_s is not None:
        if remaining_s <= 0:
            raise ServeError("timeout", "the call's deadline passed before the images reached the model")
        # A far deadline must not turn into a wait the backend cannot express.
        remaining_s = min(remaining_s, codec.MAX_TIMEOUT_US / 1e6)
    bounds = [t for t in (timeout_s, remaining_s) if t is not None]
    return min(bounds) if bounds else None


def infer_response(info: ModelInfo, request: codec.InferRequest, records: list[Record]) -> pb.ModelInferResponse:
    """The answer to ``request``: its outputs of ``records`` (none with an error) as raw contents."""
    response = pb.ModelInferResponse(model_name=info.name, model_version=info.version, id=request.id or "")
    for out in codec.raw_outputs(request.outputs, records):
        response.outputs.add(name=out.name, datatype=out.datatype, shape=out.shape)
        response.raw_output_contents.append(out.data)
    return response


def stream_error(request: pb.ModelInferRequest, message: str) -> pb.ModelStreamInferResponse:
    """A stream's answer to a failed request: the message, and the request's id to match it by."""
    return pb.ModelStreamInferResponse(error_message=message, infer_response=pb.ModelInferResponse(
        model_name=request.model_name, model_version=request.model_version, id=request.id))


def server_metadata(version: str) -> pb.ServerMetadataResponse:
    return _parse(meta.server_metadata(version), pb.ServerMetadataResponse())


def model_metadata(info: ModelInfo, request: pb.ModelMetadataRequest) -> pb.ModelMetadataResponse:
    check_model(info, request.name, request.version)
    return _parse(meta.model_metadata(info), pb.ModelMetadataResponse())


def model_config(info: ModelInfo, request: pb.ModelConfigRequest) -> pb.ModelConfigResponse:
    check_model(info, request.name, request.version)
    return pb.ModelConfigResponse(config=_parse(meta.model_config(info), config_pb2.ModelConfig()))


def model_stats(info: ModelInfo, request: pb.ModelStatisticsRequest, stats: dict) -> pb.ModelStatisticsResponse:
    """Statistics of the served model; an empty ``name`` asks for every model (Triton's rule), i.e. this one."""
    if request.name or request.version:
        check_model(info, request.name, request.version)
    return _parse(meta.model_stats(info, stats), pb.ModelStatisticsResponse())


def _parse(doc: dict, message: Message) -> Any:
    # Unknown fields are skipped: a backend may count more than Triton's statistics hold.
    return json_format.ParseDict(doc, message, ignore_unknown_fields=True)


def _bad(message: str) -> codec.RequestError:
    return codec.RequestError(400, message)
