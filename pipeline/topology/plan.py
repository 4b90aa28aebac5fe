"""Planning: chain the stages' declared specs and size the shared memory, before any process starts.

A plan answers: what one shared-memory slot holds (the frame every producer
writes and the classifier takes), who writes slots (decoder processes for byte
sources; the loader itself for a frame source), and which slots each of them
owns in each incarnation. It imports no backend: the stages declare their specs
from their configuration alone.

Slot ownership: producer ``p`` owns ``slots_per_producer`` slots in each of two
halves and writes the half of its current generation. A restarted (or reset)
producer writes the other half, so frames its predecessor handed over stay
intact until they are read or abandoned; the inference process ignores the
older generation's messages once it hears from the newer one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

from wanwu.errors import ConfigError
from wanwu.specs import FrameSpec, Preprocess, require_match
from wanwu.stages.classifier import Classifier
from wanwu.stages.decoders.base import declare_decoder_output, resolve_decoder_name
from wanwu.stages.engines.base import resolve_engine_name
from wanwu.stages.models.base import ModelSpec
from wanwu.stages.sources.base import FrameSource, Source

from wanwu.pipeline.config import PipelineConfig

if TYPE_CHECKING:
    from wanwu.pipeline.topology.gpu import GpuPlan

HALVES = 2  # slot ranges per producer: its current generation's, and its predecessor's


@dataclass(frozen=True)
class Plan:
    """The topology's shape, fixed before it starts."""

    frame: FrameSpec  # one slot: what producers write and the classifier takes
    decoders: int  # decoder processes (0 when every source makes its own frames)
    frame_producer: bool  # the loader writes frames itself (a frame source is among the inputs)
    slots_per_producer: int  # slots each producer may hold at once
    model_name: str  # the resolved model, for records
    preprocess: Preprocess  # the model's geometry, which decoders and frame sources deliver
    frames_apart: bool = False  # the loader's frames have a feeder of their own (the daemon's cameras
    # beside its doors): inference sends their results to ``Endpoints.frame_results``
    gpu: "GpuPlan | None" = None  # the GPU path (pool placement, streams, decoders); None on a CPU (gpu.py)

    @property
    def producers(self) -> int:
        """Who writes slots: the decoders, then the loader if it reads a frame source."""
        return self.decoders + int(self.frame_producer)

    @property
    def loader_producer(self) -> int:
        """The producer index of the loader (when ``frame_producer``)."""
        return self.decoders

    @property
    def n_slots(self) -> int:
        """Slots in the pool."""
        return self.slots_per_producer * self.producers * HALVES

    def slot_range(self, producer: int, generation: int) -> range:
        """The slots ``producer`` writes in its ``generation``-th incarnation."""
        if not 0 <= producer < self.producers:
            raise ConfigError(f"expected a producer in 0..{self.producers - 1}, got {producer}")
        first = (producer * HALVES + generation % HALVES) * self.slots_per_producer
        return range(first, first + self.slots_per_producer)


def make_plan(cfg: PipelineConfig, model: ModelSpec,
              sources: Sequence[Source | FrameSource] | None = None, doors: bool = False) -> Plan:
    """Chain sources -> decoder -> classifier and size the pool.

    Args:
        cfg: the shared settings.
        model: the resolved model.
        sources: a batch job's inputs, or the daemon's cameras; None for a daemon without cameras.
        doors: front doors hand encoded bytes to decoders as well (the daemon).

    Raises:
        PlanError: a producer's frames are not what the classifier takes (the message names both).
        ConfigError: endless sources mixed with finite ones, or nothing that makes frames.
    """
    engine_cfg = cfg.engine_config()
    consumer = Classifier.declare_input(model, engine_cfg)
    consumer_name = f"classifier {model.name!r} ({resolve_engine_name(cfg.engine, cfg.device, model.format)})"
    byte_sources = doors or sources is None or any(isinstance(s, Source) for s in sources)
    frame_sources = [s for s in sources or () if isinstance(s, FrameSource)]
    if sources is not None and any(s.endless for s in sources) and not all(s.endless for s in sources):
        # An endless job keeps no resume ledger, which the finite inputs would need.
        raise ConfigError("expected endless sources (live streams, endless test patterns) only with each other, "
                          f"got {sum(s.endless for s in sources)} endless among {len(sources)} inputs")
    if byte_sources:
        decoder = resolve_decoder_name(cfg.decoder, cfg.device)
        produced = declare_decoder_output(decoder, cfg.decode_config(model.preprocess))
        require_match(f"decoder {decoder!r}", produced, consumer_name, consumer)
    for source in frame_sources:
        require_match(f"source {source.kind!r} ({source.location})", source.output_spec(), consumer_name, consumer)
    decoders = cfg.decoders if byte_sources else 0
    producers = decoders + int(bool(frame_sources))
    total = cfg.slots or 2 * cfg.batch_size + 2 * producers
    return Plan(frame=consumer, decoders=decoders, frame_producer=bool(frame_sources),
                slots_per_producer=max(2, -(-total // producers)), model_name=model.name,
                preprocess=model.preprocess, frames_apart=bool(frame_sources) and (doors or sources is None))
