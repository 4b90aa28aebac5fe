"""Configuration: frozen dataclasses, validated once, passed explicitly.

``PipelineConfig`` holds what every front door shares: the model and its
overrides, the stages (decoder, engine) and their processes, and the batching.
``JobConfig`` (``wanwu run``) and ``ServeConfig`` (``wanwu serve``,
``pipeline/serve/config.py``) add only what differs.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from wanwu.errors import ConfigError
from wanwu.specs import Preprocess
from wanwu.stages.decoders.base import DEFAULT_MAX_PIXELS, DecodeConfig
from wanwu.stages.engines.base import EngineConfig
from wanwu.stages.engines.hw import PRECISIONS
from wanwu.stages.sources.sampling import SamplingConfig
from wanwu.stages.sources.video import VideoConfig
from wanwu.pipeline.topology.batching import BatchPolicy

if TYPE_CHECKING:
    from wanwu.stages.cache import RecordCache
    from wanwu.stages.models.base import ModelSpec


def cpu_count() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_decoders() -> int:
    """Decoder processes: one per core.

    Decoders and inference share the cores; with one decoder fewer than cores, a
    core idles whenever the model is not running (measured on 2 cores: 145
    against 170 images/s).
    """
    return cpu_count()


@dataclass(frozen=True, kw_only=True)
class PipelineConfig:
    """The stages and their processes, as ``wanwu run`` and ``wanwu serve`` both configure them."""

    model: str = "efficientnet_lite0"  # registered name, modelscope:DIR, timm:NAME, onnx:FILE, openvino:FILE.xml
    weights: str = ""  # checkpoint (timm:NAME) or ModelScope folder; "" for the model's own
    labels: str = ""  # label file (.txt or .json); "" for the model's own
    mean: tuple[float, ...] = ()  # per-channel mean override on [0, 1] values; () for the model's
    std: tuple[float, ...] = ()  # per-channel std override; () for the model's
    resize_shorter: int = 0  # decoder resize override in pixels; 0 for the model's
    crop: int = 0  # center-crop override in pixels; 0 for the model's
    engine: str = "auto"  # auto or a registered engine (openvino, torch, onnxruntime)
    decoder: str = "auto"  # auto or a registered decoder (turbo, dali)
    decoders: int = field(default_factory=default_decoders)  # decoder processes
    batch_size: int = 32  # most images per inference call
    top_k: int = 5  # labels per record
    max_pixels: int = DEFAULT_MAX_PIXELS  # refuse larger images (decompression bombs)
    device: str = "cpu"  # "cpu" or "cuda:N"
    precision: str = "auto"  # auto | bf16 | fp32 | int8 | int8+fp32 (hw.PRECISIONS)
    calibration: str = ""  # int8: folder of calibration photos; "" = the built-in set
    threads: int = 0  # inference threads, 0 = all cores
    slots: int = 0  # shared-memory frame slots in use at once, 0 = sized from batch size and producers
    max_wait_ms: float = 50.0  # run a partial batch after the input stream pauses this long
    max_queue_delay_ms: float = math.inf  # run a partial batch once its oldest image waited this long
    preferred_batch_sizes: tuple[int, ...] = ()  # batch sizes to run without waiting for more
    cache: str = ""  # folder of the result cache (LMDB); "" = no cache
    cache_max_bytes: int = 1 << 30  # the cache file's bound; least recently used answers go first
    fps: float = 0.0  # video: recognise at most this many frames per second of stream time; 0 = every frame
    every: int = 1  # video: then every N-th of those
    keyframes: bool = False  # video: decode key frames only
    dedupe: float = 0.0  # video: skip frames this close to the last one recognised (0-255 thumbnail difference)
    rtsp_transport: str = "tcp"  # video: tcp | udp
    open_timeout_s: float = 10.0  # video: connecting to a stream
    read_timeout_s: float = 10.0  # video: silence from an open stream before it is reopened

    def __post_init__(self) -> None:
        positive = {"decoders": self.decoders, "batch_size": self.batch_size, "top_k": self.top_k,
                    "max_pixels": self.max_pixels}
        for name, value in positive.items():
            if value <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {value}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.precision.startswith("int8"):
            from wanwu.stages.engines.quantize import calibration_files, nncf_version

            nncf_version()  # before any process starts: NNCF missing is a usage error, naming the extra
            if self.calibration:
                calibration_files(self.calibration)
        elif self.calibration:
            raise ConfigError(f"--calibration applies to --precision int8 or int8+fp32, got --precision {self.precision}")
        if self.threads < 0:
            raise ConfigError(f"--threads must be 0 (all cores) or positive, got {self.threads}")
        if self.slots and self.slots < self.batch_size + self.decoders:
            raise ConfigError(
                f"--slots must be at least batch size + decoders ({self.batch_size + self.decoders}), got {self.slots}"
            )
        self.batch_policy()  # validates the batching fields
        self.video_config()  # validates the video fields

    def batch_policy(self) -> BatchPolicy:
        """When the inference process runs a batch."""
        return BatchPolicy(self.batch_size, self.max_queue_delay_ms, self.max_wait_ms, self.preferred_batch_sizes)

    def model_options(self) -> dict:
        """Keyword arguments for ``resolve_model(self.model, **...)``: the model overrides."""
        return {"weights": self.weights, "labels": self.labels, "mean": self.mean or None,
                "std": self.std or None, "resize_shorter": self.resize_shorter or None, "crop": self.crop or None}

    def video_config(self, retry_unopened: bool = False) -> VideoConfig:
        """How video files and streams are read; ``retry_unopened`` for cameras that must come up one day."""
        return VideoConfig(SamplingConfig(self.fps, self.every, self.dedupe), self.keyframes, self.rtsp_transport,
                           self.open_timeout_s, self.read_timeout_s, retry_unopened=retry_unopened)

    def engine_config(self) -> EngineConfig:
        """The engine's settings."""
        return EngineConfig(self.device, self.precision, self.threads, self.batch_size, calibration=self.calibration)

    def decode_config(self, preprocess: Preprocess) -> DecodeConfig:
        """The decoders' settings for a model's geometry."""
        return DecodeConfig(preprocess, self.max_pixels, self.device)

    def open_cache(self, model: "ModelSpec") -> "RecordCache | None":
        """The result cache for ``model`` under these settings, or None without ``cache``.

        Its identity covers what changes an answer: the model and its weights, the
        preprocessing, the labels, top-k, the engine, and the precision as this CPU runs it.

        Raises:
            ConfigError: ``cache`` is not a wanwu cache.
        """
        if not self.cache:
            return None
        from wanwu.stages.cache import RecordCache, answer_identity
        from wanwu.stages.engines.base import resolve_engine_name
        from wanwu.stages.engines.hw import cpu_precision, cpuinfo_text

        engine = resolve_engine_name(self.engine, self.device, model.format)
        precision = self.precision if self.device != "cpu" else (
            f"{self.precision}:{cpu_precision(self.precision, cpuinfo_text())}")
        if self.precision.startswith("int8"):  # int8 answers depend on the calibration set and recipe too
            from wanwu.stages.engines.quantize import answer_identity as int8_identity

            precision += f":{int8_identity(model, self.calibration)}"
        identity = answer_identity(model, engine, precision, self.top_k)
        return RecordCache(self.cache, identity, self.cache_max_bytes)


@dataclass(frozen=True, kw_only=True)
class JobConfig(PipelineConfig):
    """Everything ``wanwu run`` needs: the shared settings, the inputs and the output."""

    inputs: tuple[str, ...]  # folders, LMDB archives, @list.txt files or frame sources (testsrc:...)
    out: str  # results.jsonl or results.sqlite; also the resume ledger
    progress: str = "auto"  # auto | bar | log | none
    log_interval_s: float = 10.0  # between progress lines when not on a terminal
    duration_s: float = 0.0  # stop taking input after this long (live streams); 0 = until the inputs end
    retry_errors: bool = False  # drop the output's error records first: their inputs are tried again
    stall_timeout_s: float = 60.0  # a worker without a heartbeat, or stuck in one piece of work, this long

    def __post_init__(self) -> None:
        super().__post_init__()
        from wanwu.pipeline.run.progress import MODES

        if self.progress not in MODES:
            raise ConfigError(f"--progress must be one of {', '.join(MODES)}, got {self.progress!r}")
        if self.duration_s < 0:
            raise ConfigError(f"--duration must be 0 (no limit) or positive, got {self.duration_s}")
        if not self.stall_timeout_s > 0:
            raise ConfigError(f"--stall-timeout-s must be positive, got {self.stall_timeout_s}")
        _check_distinct(self.inputs)


def _check_distinct(inputs: tuple[str, ...]) -> None:
    """Refuse an input given twice, or a folder inside another: their images would be read twice."""
    from wanwu.stages.sources.base import FRAME_SOURCES

    folders: list[tuple[str, str]] = []
    for location in inputs:
        if location.partition(":")[0] in FRAME_SOURCES or "://" in location:
            canonical = location
        else:
            canonical = os.path.realpath(location.removeprefix("@"))
        for other, other_location in folders:
            if canonical == other:
                raise ConfigError(f"expected each input once, got {location!r} and {other_location!r}")
            if os.path.isdir(canonical) and os.path.isdir(other) and (
                    canonical.startswith(other + os.sep) or other.startswith(canonical + os.sep)):
                raise ConfigError(f"expected inputs that do not overlap, got {location!r} and {other_location!r} "
                                  "(one folder is inside the other)")
        folders.append((canonical, location))
