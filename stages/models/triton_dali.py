"""The DALI pipeline of the Triton ensemble: encoded image bytes in, the model's uint8 crop out.

Triton's DALI backend loads a serialized pipeline (``model.dali``) and feeds each
``fn.external_source`` by name. This pipeline does what wanwu's decoders do
(``stages/decoders``): decode to RGB after EXIF orientation, resize the shorter side
to ``resize_shorter`` and center-crop ``crop x crop`` with torchvision's rounding,
leaving uint8 HWC pixels, the input of the ``uint8`` ONNX export.

wanwu's own DALI decoder computes the crop's source box on the host from a header
probe (``kernels.geometry.resize_crop_box``); a Triton model gets no host code, so
here the same arithmetic runs inside the graph on ``fn.peek_image_shape``: integer
floor division for torchvision's truncated long side, round-half-to-even for the
``CenterCrop`` offsets, float64 for the box, cast to float32 as the decoder feeds it.
The box is therefore the one the decoder computes, and on a CPU the two give the same
pixels.

One definition serves two devices: ``"mixed"`` (nvJPEG and the hardware JPEG
decoder, resize on the GPU), the one serialized for Triton, and ``"cpu"``, which runs
here without a GPU and is what the tests compare with wanwu's decoders. A mixed
pipeline cannot be built or deserialized without CUDA, so ``read_pipeline_def``
parses the serialized protobuf itself to check what was written.

DALI is imported inside the functions that need it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from wanwu.errors import ConfigError
from wanwu.specs import Preprocess

logger = logging.getLogger(__name__)

INPUT_NAME = "IMAGE"  # the external source Triton feeds: one encoded image per sample, uint8 [-1]
DECODER_DEVICES = ("mixed", "cpu")

# Share of JPEG work sent to the hardware decoder (A100/H100/H200 have one); the
# rest goes to nvJPEG's CUDA decoder so both engines stay busy. NVIDIA/DALI#5362
# measured ~75% on the hardware engine as the fast split on an A100.
HW_DECODER_LOAD = 0.75
# Camera-size photos (12 MP): the hardware decoder's buffers are allocated once for
# them instead of growing on the first large image of a live server.
PREALLOCATE_WIDTH_HINT = 4032
PREALLOCATE_HEIGHT_HINT = 3024
# nvJPEG's per-thread device and pinned host buffers, sized so a 12 MP RGB frame
# (36.6 MB) and its encoded bytes fit without a reallocation mid-request.
DEVICE_MEMORY_PADDING_BYTES = 48 << 20
HOST_MEMORY_PADDING_BYTES = 16 << 20


def _check_dali() -> None:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError as exc:
        raise ConfigError(f"expected NVIDIA DALI for the Triton ensemble (pip install 'wanwu[dali]'), got: {exc}") from exc


def _crop_roi(encoded: Any, pre: Preprocess) -> tuple[Any, Any]:
    """``(roi_start, roi_end)`` DataNodes, ``(y, x)`` float32, of ``resize_crop_box`` for each image.

    Must be called inside a pipeline's ``with`` block. Mirrors
    ``kernels.geometry.resize_crop_box`` step by step; every step is integer
    arithmetic until the final box, so it is exact, not approximately equal.
    """
    from nvidia.dali import fn, types

    size, crop = pre.resize_shorter, pre.crop
    # Displayed (EXIF-oriented) height and width, as the decoder's output will have them.
    shape = fn.peek_image_shape(encoded, adjust_orientation=True, dtype=types.INT64)
    h, w = shape[0], shape[1]
    tall = fn.cast(w <= h, dtype=types.INT64)  # 1: width is the shorter side (ties too, as torchvision)
    # torchvision truncates the long side: int(size * long / short) == size * long // short for positive ints.
    new_w = tall * size + (1 - tall) * (size * w // h)
    new_h = tall * (size * h // w) + (1 - tall) * size
    left, top = _round_half_even_half(new_w - crop), _round_half_even_half(new_h - crop)
    scale_x = fn.cast(w, dtype=types.FLOAT64) / fn.cast(new_w, dtype=types.FLOAT64)
    scale_y = fn.cast(h, dtype=types.FLOAT64) / fn.cast(new_h, dtype=types.FLOAT64)
    start = fn.cast(fn.stack(top * scale_y, left * scale_x), dtype=types.FLOAT)
    end = fn.cast(fn.stack((top + crop) * scale_y, (left + crop) * scale_x), dtype=types.FLOAT)
    return start, end


def _round_half_even_half(d: Any) -> Any:
    """Python's ``int(round(d / 2))`` for an integer DataNode ``d``: halves go to the even neighbour.

    ``CenterCrop`` rounds ``(size - crop) / 2`` with Python's ``round``; an odd ``d``
    lands on a half, where round-half-up would shift the crop by one pixel.
    """
    q = d // 2
    odd = d - 2 * q
    q_odd = q - 2 * (q // 2)
    return q + odd * q_odd


def define_outputs(pre: Preprocess, decoder_device: str = "mixed") -> Any:
    """Add the graph to the pipeline being defined; returns its one output, uint8 (crop, crop, 3) RGB.

    Must be called inside a ``with pipeline:`` block (or a ``pipeline_def``).

    Args:
        pre: the model's geometry (``resize_shorter``, ``crop``); mean/std stay in the ONNX graph.
        decoder_device: "mixed" (GPU, for Triton) or "cpu" (the same graph without a GPU).

    Raises:
        ConfigError: an unknown ``decoder_device``.
    """
    if decoder_device not in DECODER_DEVICES:
        raise ConfigError(f"expected a decoder device in {DECODER_DEVICES}, got {decoder_device!r}")
    from nvidia.dali import fn, types

    encoded = fn.external_source(name=INPUT_NAME, dtype=types.UINT8, ndim=1, device="cpu")
    roi_start, roi_end = _crop_roi(encoded, pre)
    gpu_hints = {
        "hw_decoder_load": HW_DECODER_LOAD,
        "preallocate_width_hint": PREALLOCATE_WIDTH_HINT,
        "preallocate_height_hint": PREALLOCATE_HEIGHT_HINT,
        "device_memory_padding": DEVICE_MEMORY_PADDING_BYTES,
        "host_memory_padding": HOST_MEMORY_PADDING_BYTES,
    } if decoder_device == "mixed" else {}
    images = fn.decoders.image(
        encoded,
        device=decoder_device,
        output_type=types.RGB,
        adjust_orientation=True,
        jpeg_fancy_upsampling=True,  # as libjpeg-turbo and Pillow upsample chroma
        **gpu_hints,
    )
    # As in wanwu's DALI decoder: resizing only the box that survives the crop equals
    # resize-then-crop with torchvision's rounding, and touches fewer pixels.
    return fn.resize(
        images,
        size=(pre.crop, pre.crop),
        roi_start=roi_start,
        roi_end=roi_end,
        antialias=True,
        interp_type=types.INTERP_LINEAR,
    )


def build_pipeline(
    pre: Preprocess,
    decoder_device: str = "mixed",
    max_batch_size: int = 32,
    num_threads: int = 4,
    device_id: int | None = None,
) -> Any:  # -> nvidia.dali.Pipeline, defined but not built
    """A pipeline holding ``define_outputs``; call ``.build()`` to run it, ``.serialize()`` to save it.

    ``device_id=None`` is DALI's CPU-only mode: enough to serialize a mixed pipeline,
    or to build and run a "cpu" one. Building a "mixed" one needs ``device_id`` and a GPU.

    Raises:
        ConfigError: DALI is missing, or a value is out of range.
    """
    if max_batch_size < 1 or num_threads < 1:
        raise ConfigError(f"expected max_batch_size >= 1 and num_threads >= 1, got {max_batch_size}, {num_threads}")
    _check_dali()
    from nvidia.dali import Pipeline, types

    # The declared output type and rank are serialized too: Triton's DALI backend
    # checks the model config against them when it loads the pipeline.
    pipe = Pipeline(batch_size=max_batch_size, num_threads=num_threads, device_id=device_id, prefetch_queue_depth=1,
                    output_dtype=types.UINT8, output_ndim=3)
    with pipe:
        pipe.set_outputs(define_outputs(pre, decoder_device))
    return pipe


def serialize(pre: Preprocess, max_batch_size: int = 32, num_threads: int = 4) -> bytes:
    """The mixed (GPU) pipeline as ``model.dali`` bytes, serialized without a GPU.

    It is serialized with ``device_id=None``: Triton's DALI backend creates the
    pipeline from these bytes with the instance's own device, batch size and thread
    count (``daliCreatePipeline``), so nothing device-specific is stored.
    """
    data = build_pipeline(pre, "mixed", max_batch_size, num_threads).serialize()
    logger.debug("serialized the mixed DALI pipeline: %d bytes", len(data))
    return data


def run_batch(pipe: Any, datas: Sequence[bytes]) -> np.ndarray:
    """Feed encoded images to a built pipeline and return its frames, uint8 (n, crop, crop, 3) in host memory.

    Raises:
        RuntimeError: DALI's error when an image does not decode (the whole batch fails).
    """
    pipe.feed_input(INPUT_NAME, [np.frombuffer(d, np.uint8) for d in datas])
    (images,) = pipe.run()
    if hasattr(images, "as_cpu"):
        images = images.as_cpu()
    return np.stack([np.asarray(images[i]) for i in range(len(datas))])


def read_pipeline_def(data: bytes) -> Any:
    """Parse ``model.dali`` bytes into a ``dali_proto.PipelineDef`` message, without DALI or a GPU.

    The message types are built here from DALI's ``dali/pipeline/proto/dali.proto``
    (the fields read: ops with their inputs, outputs and arguments; the pipeline's
    outputs and batch size), every field optional so a newer DALI's extra fields are
    kept as unknown rather than refused.

    Raises:
        ConfigError: ``data`` is not a serialized DALI pipeline.
    """
    from google.protobuf import message as pb_message

    cls = _pipeline_def_class()
    msg = cls()
    try:
        msg.ParseFromString(data)
    except pb_message.DecodeError as exc:
        raise ConfigError(f"expected a serialized DALI pipeline, got {len(data)} bytes that do not parse: {exc}") from exc
    if not msg.op:
        raise ConfigError(f"expected a serialized DALI pipeline with operators, got {len(data)} bytes with none")
    return msg


def op_devices(pipeline_def: Any) -> dict[str, str]:
    """``{operator schema name: its "device" argument}`` for each op of a parsed ``PipelineDef``."""
    return {op.name: next((a.strings[0] for a in op.args if a.name == "device" and a.strings), "")
            for op in pipeline_def.op}


_PIPELINE_DEF: Any = None
# (message, [(field, number, type, repeated, message type)]) from dali.proto, the parts read here.
_PROTO = (
    ("Argument", [("name", 1, "string", False, ""), ("type", 2, "string", False, ""), ("floats", 3, "float", True, ""),
                  ("ints", 4, "int64", True, ""), ("strings", 5, "string", True, ""), ("bools", 6, "bool", True, ""),
                  ("extra_args", 7, "message", True, "Argument"), ("is_vector", 8, "bool", False, "")]),
    ("InputOutput", [("name", 1, "string", False, ""), ("device", 2, "string", False, ""),
                     ("is_argument_input", 3, "bool", False, ""), ("arg_name", 4, "string", False, ""),
                     ("dtype", 5, "int32", False, ""), ("ndim", 6, "int32", False, "")]),
    ("OpDef", [("name", 1, "string", False, ""), ("input", 2, "message", True, "InputOutput"),
               ("output", 3, "message", True, "InputOutput"), ("args", 4, "message", True, "Argument"),
               ("inst_name", 5, "string", False, ""), ("logical_id", 6, "int32", False, "")]),
    ("PipelineDef", [("num_threads", 1, "int64", False, ""), ("batch_size", 2, "int32", False, ""),
                     ("op", 5, "message", True, "OpDef"), ("pipe_outputs", 7, "message", True, "InputOutput"),
                     ("device_id", 8, "int32", False, "")]),
)


def _pipeline_def_class() -> Any:
    global _PIPELINE_DEF
    if _PIPELINE_DEF is None:
        from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

        fdp = descriptor_pb2.FileDescriptorProto(name="wanwu_dali_pipeline.proto", package="dali_proto", syntax="proto2")
        F = descriptor_pb2.FieldDescriptorProto
        for message, fields in _PROTO:
            m = fdp.message_type.add(name=message)
            for field, number, kind, repeated, type_name in fields:
                m.field.add(name=field, number=number, type=getattr(F, f"TYPE_{kind.upper()}"),
                            label=F.LABEL_REPEATED if repeated else F.LABEL_OPTIONAL,
                            type_name=f".dali_proto.{type_name}" if type_name else None)
        pool = descriptor_pool.DescriptorPool()
        pool.Add(fdp)
        _PIPELINE_DEF = message_factory.GetMessageClass(pool.FindMessageTypeByName("dali_proto.PipelineDef"))
    return _PIPELINE_DEF
