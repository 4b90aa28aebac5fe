"""A Triton Inference Server model repository for one model.

Layout (what Triton's ``--model-repository=DIR`` expects)::

    DIR/<name>/config.pbtxt   onnxruntime_onnx, dynamic batching, an instance group
    DIR/<name>/labels.txt     one Chinese label a line, line i = class i
    DIR/<name>/1/model.onnx   uint8 NHWC pixels in, float32 logits out

The output names ``labels.txt`` as its ``label_filename``, so Triton's
classification extension (``class_count`` in a request) answers
``"score:class_id:标签"`` strings. Clients send the resized, center-cropped
uint8 RGB crop; normalisation is inside the graph. ``triton_ensemble`` adds a DALI
model and an ensemble in front of this one, for clients that send encoded images.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from wanwu.errors import ConfigError

from wanwu.stages.models.base import ModelSpec
from wanwu.stages.models.export import INPUT_NAMES, OUTPUT_NAME, export_onnx
from wanwu.stages.models.labels import write_label_lines

logger = logging.getLogger(__name__)

LABEL_FILE = "labels.txt"
KINDS = {"auto": "KIND_AUTO", "cpu": "KIND_CPU", "gpu": "KIND_GPU"}


def triton_name(name: str) -> str:
    """``name`` as a Triton model (folder) name: letters, digits, ``_``, ``-`` and ``.`` only."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "model"


def check_values(max_batch_size: int, instances: int, kind: str, queue_delay_us: int) -> None:
    """Raise ``ConfigError`` unless every value is in range (see ``triton_config``)."""
    if max_batch_size < 1 or instances < 1 or queue_delay_us < 0 or kind not in KINDS:
        raise ConfigError(
            f"expected max_batch_size >= 1, instances >= 1, queue_delay_us >= 0 and kind in {sorted(KINDS)}, "
            f"got {max_batch_size}, {instances}, {queue_delay_us}, {kind!r}"
        )


def triton_config(
    spec: ModelSpec,
    name: str,
    max_batch_size: int = 32,
    instances: int = 1,
    kind: str = "auto",
    queue_delay_us: int = 1000,
) -> str:
    """The ``config.pbtxt`` text (protobuf text format of Triton's ``ModelConfig``).

    Args:
        spec: the model; its crop size and class count give the dims.
        name: the model's name in the repository (its folder name).
        max_batch_size: the largest batch Triton forms; the ONNX batch axis is dynamic.
        instances: model instances per device.
        kind: "auto" (GPUs where Triton sees them, else CPU), "cpu" or "gpu".
        queue_delay_us: how long the dynamic batcher waits to fill a batch, in microseconds.

    Raises:
        ConfigError: a value out of range.
    """
    check_values(max_batch_size, instances, kind, queue_delay_us)
    crop = spec.preprocess.crop
    preferred = sorted({max(1, max_batch_size // 2), max_batch_size})
    return f"""name: "{name}"
platform: "onnxruntime_onnx"
max_batch_size: {max_batch_size}
input [
  {{
    name: "{INPUT_NAMES['uint8']}"
    data_type: TYPE_UINT8
    format: FORMAT_NHWC
    dims: [ {crop}, {crop}, 3 ]
  }}
]
output [
  {{
    name: "{OUTPUT_NAME}"
    data_type: TYPE_FP32
    dims: [ {spec.num_classes} ]
    label_filename: "{LABEL_FILE}"
  }}
]
dynamic_batching {{
  preferred_batch_size: [ {', '.join(map(str, preferred))} ]
  max_queue_delay_microseconds: {queue_delay_us}
}}
instance_group [
  {{
    count: {instances}
    kind: {KINDS[kind]}
  }}
]
"""


def write_triton_repository(spec: ModelSpec, out_dir: str | Path, name: str = "", **config: int | str) -> Path:
    """Export ``spec`` into a Triton model repository at ``out_dir``; returns the model's folder.

    Args:
        spec: a torch-format model spec.
        out_dir: the repository (created if absent); other models in it are left alone.
        name: the model's name in the repository; "" for ``triton_name(spec.name)``.
        **config: ``max_batch_size``, ``instances``, ``kind``, ``queue_delay_us`` (see ``triton_config``).

    Raises:
        ConfigError: a bad config value.
        ModelError: ``spec`` cannot be exported (see ``export.export_onnx``).
    """
    name = triton_name(name or spec.name)
    text = triton_config(spec, name, **config)  # validate before a long export
    folder = Path(out_dir) / name
    (folder / "1").mkdir(parents=True, exist_ok=True)
    export_onnx(spec, folder / "1" / "model.onnx", input_kind="uint8")
    write_label_lines(spec.labels(), folder / LABEL_FILE)
    (folder / "config.pbtxt").write_text(text, encoding="utf-8")
    logger.info("wrote Triton model %s to %s", name, folder)
    return folder
