"""The job's configuration: one frozen dataclass, validated once, passed explicitly."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from wanwu.errors import ConfigError
from wanwu.stages.decoders.base import DEFAULT_MAX_PIXELS

if TYPE_CHECKING:
    from wanwu.pipeline.batching import BatchPolicy


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


@dataclass(frozen=True)
class JobConfig:
    """Everything ``wanwu run`` needs."""

    inputs: tuple[str, ...]  # folders, LMDB archives, or @list.txt files (none for the daemon)
    out: str  # results.jsonl or results.sqlite; also the resume ledger
    model: str = "efficientnet_lite0"  # registered name, modelscope:DIR, timm:NAME, onnx:FILE, openvino:FILE.xml
    weights: str = ""  # checkpoint (timm:NAME) or ModelScope folder; "" for the model's own
    labels: str = ""  # label file (.txt or .json); "" for the model's own
    mean: tuple[float, ...] = ()  # per-channel mean override on [0, 1] values; () for the model's
    std: tuple[float, ...] = ()  # per-channel std override; () for the model's
    resize_shorter: int = 0  # decoder resize override in pixels; 0 for the model's
    crop: int = 0  # center-crop override in pixels; 0 for the model's
    engine: str = "auto"  # auto | openvino | torch | onnxruntime
    decoder: str = "auto"  # auto | turbo | dali
    decoders: int = field(default_factory=default_decoders)  # decoder processes
    batch_size: int = 32  # images per inference call
    top_k: int = 5  # labels per record
    max_pixels: int = DEFAULT_MAX_PIXELS  # refuse larger images (decompression bombs)
    device: str = "cpu"  # "cpu" or "cuda:N"
    precision: str = "auto"  # auto | bf16 | fp32
    threads: int = 0  # inference threads, 0 = all cores
    slots: int = 0  # shared-memory frame slots, 0 = sized from batch size and decoders
    max_wait_ms: float = 50.0  # run a partial batch after the input stream pauses this long
    max_queue_delay_ms: float = float("inf")  # run a partial batch once its oldest image waited this long
    preferred_batch_sizes: tuple[int, ...] = ()  # batch sizes to run without waiting for more
    restartable: bool = False  # workers may be restarted (the daemon): decoders get two slot ranges
    progress: str = "auto"  # auto | bar | log | none
    log_interval_s: float = 10.0  # between progress lines when not on a terminal
    hold_until_ready: bool = False  # read no input before the model is loaded (clean timings for benchmarks)

    def __post_init__(self) -> None:
        positive = {"decoders": self.decoders, "batch_size": self.batch_size, "top_k": self.top_k,
                    "max_pixels": self.max_pixels}
        for name, value in positive.items():
            if value <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {value}")
        if self.progress not in ("auto", "bar", "log", "none"):
            raise ConfigError(f"--progress must be auto, bar, log or none, got {self.progress!r}")
        if self.slots and self.slots < self.batch_size + self.decoders:
            raise ConfigError(
                f"--slots must be at least batch size + decoders ({self.batch_size + self.decoders}), got {self.slots}"
            )

    @property
    def batch_policy(self) -> "BatchPolicy":
        from wanwu.pipeline.batching import BatchPolicy

        return BatchPolicy(self.batch_size, self.max_queue_delay_ms, self.max_wait_ms, self.preferred_batch_sizes)

    @property
    def n_slots(self) -> int:
        """Slots in the pool: each decoder's share, twice over when a restarted decoder
        must not write where its dead predecessor's images may still wait."""
        return self.slots_per_decoder * self.decoders * (2 if self.restartable else 1)

    def slot_range(self, decoder: int, generation: int) -> range:
        """The slots decoder ``decoder`` writes in its ``generation``-th incarnation."""
        per = self.slots_per_decoder
        halves = 2 if self.restartable else 1
        first = (decoder * halves + generation % halves) * per
        return range(first, first + per)

    def model_options(self) -> dict:
        """Keyword arguments for ``resolve_model(self.model, **...)``: the model overrides."""
        return {"weights": self.weights, "labels": self.labels, "mean": self.mean or None,
                "std": self.std or None, "resize_shorter": self.resize_shorter or None, "crop": self.crop or None}

    @property
    def slots_per_decoder(self) -> int:
        """Each decoder owns a fixed share of slots: a decoder writes only into a slot it holds."""
        total = self.slots or 2 * self.batch_size + 2 * self.decoders
        return max(2, -(-total // self.decoders))
