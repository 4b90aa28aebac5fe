"""What the KServe v2 front door says about itself and its model: metadata, configuration, statistics.

Shapes follow Triton's conventions for a model with ``max_batch_size > 0``:
metadata shapes carry the batch dimension (``[-1, 1]``), configuration ``dims``
do not (``[1]``).
"""

from __future__ import annotations

import logging

from wanwu.pipeline.serve.backend import ModelInfo
from wanwu.pipeline.serve.kserve_codec import INPUT

logger = logging.getLogger(__name__)

EXTENSIONS = ("classification", "binary_tensor_data", "statistics", "model_configuration")
_DURATIONS = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output", "cache_hit",
              "cache_miss")


def server_metadata(version: str) -> dict:
    return {"name": "wanwu", "version": version, "extensions": list(EXTENSIONS)}


def model_metadata(info: ModelInfo) -> dict:
    k = info.top_k
    return {
        "name": info.name, "versions": [info.version], "platform": info.platform,
        "inputs": [{"name": INPUT, "datatype": "BYTES", "shape": [-1, 1]}],
        "outputs": [{"name": "LABELS", "datatype": "BYTES", "shape": [-1, k]},
                    {"name": "SCORES", "datatype": "FP32", "shape": [-1, k]}],
    }


def model_config(info: ModelInfo) -> dict:
    """Triton's model configuration as JSON.

    ``max_batch_size`` is the most images one request may carry (what a client must
    respect); the engine's own batch size shows as the preferred dynamic batch.
    """
    params = {"engine_max_batch_size": info.max_batch_size, "num_classes": info.num_classes, **info.extra}
    return {
        "name": info.name, "platform": info.platform, "backend": "wanwu",
        "version_policy": {"latest": {"num_versions": 1}},
        "max_batch_size": info.max_images_per_request,
        "input": [{"name": INPUT, "data_type": "TYPE_STRING", "format": "FORMAT_NONE", "dims": [1],
                   "is_shape_tensor": False, "allow_ragged_batch": False, "optional": False}],
        "output": [{"name": "LABELS", "data_type": "TYPE_STRING", "dims": [info.top_k], "label_filename": "",
                    "is_shape_tensor": False},
                   {"name": "SCORES", "data_type": "TYPE_FP32", "dims": [info.top_k], "label_filename": "",
                    "is_shape_tensor": False}],
        "dynamic_batching": {
            "preferred_batch_size": list(info.preferred_batch_sizes) or [info.max_batch_size],
            "max_queue_delay_microseconds": int(round(info.max_queue_delay_ms * 1000)),
            "preserve_ordering": False,
        },
        "instance_group": [{"name": info.name, "kind": "KIND_CPU", "count": 1}],
        "parameters": {key: {"string_value": str(value)} for key, value in params.items()},
    }


def model_stats(info: ModelInfo, stats: dict) -> dict:
    """Triton's statistics response, with zeros for whatever the backend does not count."""
    inference = {name: {"count": 0, "ns": 0} for name in _DURATIONS}
    inference.update(stats.get("inference_stats", {}))
    return {"model_stats": [{
        "name": info.name, "version": info.version,
        "last_inference": int(stats.get("last_inference", 0)),
        "inference_count": int(stats.get("inference_count", 0)),
        "execution_count": int(stats.get("execution_count", 0)),
        "inference_stats": inference,
        "batch_stats": list(stats.get("batch_stats", [])),
        "memory_usage": [],
    }]}
