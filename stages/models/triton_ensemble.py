"""A Triton ensemble that takes encoded images: DALI decodes and crops on the GPU, then the ONNX model.

Layout (three models in one ``--model-repository``)::

    DIR/<name>/                 the ONNX model, as ``triton.write_triton_repository`` writes it
    DIR/<name>_dali/config.pbtxt       backend "dali", KIND_GPU, dynamic batching
    DIR/<name>_dali/1/model.dali       the serialized pipeline (``triton_dali``)
    DIR/<name>_ensemble/config.pbtxt   platform "ensemble": IMAGE -> <name>_dali -> <name> -> logits
    DIR/<name>_ensemble/labels.txt     for the classification extension on the ensemble
    DIR/<name>_ensemble/1/             empty: Triton wants a version folder for every model

Clients send one encoded image per batch row (``IMAGE``, UINT8, dims ``[-1]``), as
wanwu's own clients send files; the DALI model's input allows ragged batches, so
requests with images of different byte lengths are batched together on the server.
"""

from __future__ import annotations

import logging
from pathlib import Path

from wanwu.errors import ConfigError

from wanwu.stages.models import triton_dali
from wanwu.stages.models.base import ModelSpec
from wanwu.stages.models.export import INPUT_NAMES, OUTPUT_NAME
from wanwu.stages.models.labels import write_label_lines
from wanwu.stages.models.triton import LABEL_FILE, check_values, triton_name, write_triton_repository

logger = logging.getLogger(__name__)

DALI_SUFFIX = "_dali"
ENSEMBLE_SUFFIX = "_ensemble"
PIXELS = INPUT_NAMES["uint8"]  # the tensor between the two steps: the DALI output, the ONNX input


def dali_config(spec: ModelSpec, name: str, max_batch_size: int = 32, instances: int = 1,
                queue_delay_us: int = 1000, num_threads: int = 4) -> str:
    """The DALI model's ``config.pbtxt``: encoded ``IMAGE`` in, uint8 (crop, crop, 3) ``pixels`` out.

    Always KIND_GPU: the serialized decoder is DALI's "mixed" one. The backend matches
    inputs to external sources by name and outputs to pipeline outputs by position.

    Raises:
        ConfigError: a value out of range.
    """
    if num_threads < 1:
        raise ConfigError(f"expected num_threads >= 1 for the DALI model, got {num_threads}")
    check_values(max_batch_size, instances, "gpu", queue_delay_us)
    crop = spec.preprocess.crop
    return f"""name: "{name}"
backend: "dali"
max_batch_size: {max_batch_size}
input [
  {{
    name: "{triton_dali.INPUT_NAME}"
    data_type: TYPE_UINT8
    dims: [ -1 ]
    allow_ragged_batch: true
  }}
]
output [
  {{
    name: "{PIXELS}"
    data_type: TYPE_UINT8
    dims: [ {crop}, {crop}, 3 ]
  }}
]
dynamic_batching {{
  max_queue_delay_microseconds: {queue_delay_us}
}}
instance_group [
  {{
    count: {instances}
    kind: KIND_GPU
  }}
]
parameters [
  {{
    key: "num_threads"
    value: {{ string_value: "{num_threads}" }}
  }}
]
"""


def ensemble_config(spec: ModelSpec, name: str, dali_name: str, onnx_name: str, max_batch_size: int = 32) -> str:
    """The ensemble's ``config.pbtxt``: ``IMAGE`` -> ``dali_name`` -> ``onnx_name`` -> ``logits``."""
    return f"""name: "{name}"
platform: "ensemble"
max_batch_size: {max_batch_size}
input [
  {{
    name: "{triton_dali.INPUT_NAME}"
    data_type: TYPE_UINT8
    dims: [ -1 ]
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
ensemble_scheduling {{
  step [
    {{
      model_name: "{dali_name}"
      model_version: -1
      input_map {{ key: "{triton_dali.INPUT_NAME}" value: "{triton_dali.INPUT_NAME}" }}
      output_map {{ key: "{PIXELS}" value: "{PIXELS}" }}
    }},
    {{
      model_name: "{onnx_name}"
      model_version: -1
      input_map {{ key: "{PIXELS}" value: "{PIXELS}" }}
      output_map {{ key: "{OUTPUT_NAME}" value: "{OUTPUT_NAME}" }}
    }}
  ]
}}
"""


def write_triton_ensemble(spec: ModelSpec, out_dir: str | Path, name: str = "", num_threads: int = 4,
                          **config: int | str) -> dict[str, Path]:
    """Export ``spec`` as an ONNX model, a DALI model and their ensemble into the repository ``out_dir``.

    Args:
        spec: a torch-format model spec.
        out_dir: the repository (created if absent); other models in it are left alone.
        name: the ONNX model's name; "" for ``triton_name(spec.name)``. The others add
            ``_dali`` and ``_ensemble``.
        num_threads: CPU threads of each DALI instance (the header reads and the box arithmetic).
        **config: ``max_batch_size``, ``instances``, ``kind`` (of the ONNX model), ``queue_delay_us``.

    Returns:
        ``{"onnx", "dali", "ensemble"}``: each model's folder.

    Raises:
        ConfigError: a bad config value, or DALI is not installed.
        ModelError: ``spec`` cannot be exported.
    """
    name = triton_name(name or spec.name)
    dali_name, ensemble_name = name + DALI_SUFFIX, name + ENSEMBLE_SUFFIX
    max_batch_size = int(config.get("max_batch_size", 32))
    dali_text = dali_config(spec, dali_name, max_batch_size, int(config.get("instances", 1)),
                            int(config.get("queue_delay_us", 1000)), num_threads)
    ensemble_text = ensemble_config(spec, ensemble_name, dali_name, name, max_batch_size)
    model_dali = triton_dali.serialize(spec.preprocess, max_batch_size, num_threads)  # before the long export
    onnx_folder = write_triton_repository(spec, out_dir, name, **config)
    dali_folder, ensemble_folder = Path(out_dir) / dali_name, Path(out_dir) / ensemble_name
    (dali_folder / "1").mkdir(parents=True, exist_ok=True)
    (dali_folder / "1" / "model.dali").write_bytes(model_dali)
    (dali_folder / "config.pbtxt").write_text(dali_text, encoding="utf-8")
    (ensemble_folder / "1").mkdir(parents=True, exist_ok=True)
    write_label_lines(spec.labels(), ensemble_folder / LABEL_FILE)
    (ensemble_folder / "config.pbtxt").write_text(ensemble_text, encoding="utf-8")
    logger.info("wrote Triton ensemble %s (%s -> %s) to %s", ensemble_name, dali_name, name, out_dir)
    return {"onnx": onnx_folder, "dali": dali_folder, "ensemble": ensemble_folder}
