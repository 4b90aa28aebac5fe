"""Reading several frame sources together, inside the loader process.

Every frame source of a job (video files, cameras, test patterns) is read at
once, a frame from each in turn while slots are free, so a slow camera never
holds up another and a file never waits for a live stream to end. The sources
decode in their own threads (FFmpeg releases the GIL), so one process serves
many streams; what it does here is copy model-sized frames into slots.

Why one process for all streams rather than one per stream: a frame costs the
loader a 150 KB copy, the decoding happens in FFmpeg's threads either way, and
every extra process would need its own slot range and ZeroMQ sockets. Where one
process's decode threads are not enough, run more jobs or daemons.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any, Protocol

from wanwu.stages.sources.base import FrameFailure, FrameInfo, FrameSource, job_key

logger = logging.getLogger(__name__)


class FrameSink(Protocol):
    """What ``FrameReading`` needs of the loader."""

    done: set[str]

    def send_frame(self, slot: int, key: str, source: str, info: FrameInfo) -> None: ...

    def fail_frame(self, key: str, failure: FrameFailure) -> None: ...


class FrameReading:
    """The frame sources being read, in turn.

    Args:
        inputs: the job's inputs as given (for keys).
        several: the job has several inputs (keys then name the input).
    """

    def __init__(self, inputs: tuple[str, ...], several: bool) -> None:
        self.inputs, self.several = inputs, several
        self.active: list[tuple[int, FrameSource]] = []
        self.finished: list[FrameSource] = []
        self.recognised: Counter[str] = Counter()  # records with labels, by source location
        self._turn = 0  # the source read first next round, so none is always first

    def __bool__(self) -> bool:
        return bool(self.active)

    def add(self, index: int, source: FrameSource) -> None:
        self.active.append((index, source))

    def read_round(self, loader: Any) -> bool:
        """Read at most one frame from each source, while slots are free; True if anything came.

        ``loader`` is the ``LoaderWorker`` (a ``FrameSink`` with ``slots`` and ``pool``).
        """
        progressed = False
        n = len(self.active)
        for i in range(n):
            if not loader.slots:
                break
            index, source = self.active[(self._turn + i) % n]
            slot = loader.slots.take()
            result = source.read_into(loader.pool.frame(slot), 0.0)
            if isinstance(result, FrameInfo):
                key = self._key(index, source, result.key)
                if key in loader.done:  # recognised by an earlier run of this job
                    loader.slots.give_back(slot)
                else:
                    loader.send_frame(slot, key, result.source, result)
                progressed = True
                continue
            loader.slots.give_back(slot)
            if isinstance(result, FrameFailure):
                key = self._key(index, source, result.key)
                if key not in loader.done:
                    logger.warning("%s: %s", result.key, result.error)
                    loader.fail_frame(key, result)
                progressed = True
        self._turn += 1
        ended = [entry for entry in self.active if entry[1].ended]
        if ended:
            self.active = [entry for entry in self.active if not entry[1].ended]
            self.finished += [source for _, source in ended]
            progressed = True
        return progressed

    def _key(self, index: int, source: FrameSource, key: str) -> str:
        # A stream named by the user (a camera) keeps its key: the names are unique already.
        return key if source.named else job_key(self.inputs[index], key, self.several)

    def stats(self) -> dict[str, dict]:
        """Per stream (by its name when it has one, else by input as given), the counters of the
        sources that keep them, with the frames recognised."""
        out = {}
        for source in [s for _, s in self.active] + self.finished:
            stats = source.stats()
            if stats:
                name = source.name if source.named else source.location  # type: ignore[attr-defined]  # named: a video
                out[name] = {**stats, "recognised": self.recognised[source.location]}
        return out
