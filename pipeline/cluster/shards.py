"""Shards: a job's inputs cut into key ranges that tasks on other machines read by themselves.

The driver scans the inputs once, keys only (no image bytes), and cuts the scan
into ranges of about ``size`` inputs still to do. A shard names its input and
the positions where its range starts and stops (``Source.scan_range``), plus the
keys inside the range that are already in the output (a resumed job), so the
task that reads it skips them. A shard never lists its inputs: what the driver
holds is a few hundred bytes per shard, whatever the shard size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Container, Iterator, Sequence

from wanwu.errors import ConfigError
from wanwu.stages.sources.base import Source, SourceItem, job_key


@dataclass(frozen=True)
class Shard:
    """One range of one input: what a read task reads, decodes and hands on.

    ``start`` is the position of its first input; ``stop`` that of the first input of
    the next shard of the same input, or None for the rest of it. ``skip`` holds the
    keys in the range the output already has.
    """

    index: int  # unique within the job; records name their shard by it
    input_index: int  # which of the job's inputs
    start: str
    stop: str | None
    skip: frozenset[str] = frozenset()
    planned: int = 0  # inputs to do in the range when the driver cut it (the task counts again)


def shard_key(location: str, item: SourceItem, several_inputs: bool) -> str:
    """The record key of ``item`` of the input ``location``, as ``wanwu run`` names it."""
    return job_key(location, item.key, several_inputs)


def plan_shards(locations: Sequence[str], sources: Sequence[Source], done: set[str] | frozenset[str],
                size: int, ramp: tuple[int, int] = (0, 0)) -> Iterator[Shard]:
    """Cut the inputs into shards of about ``size`` inputs that are not in ``done``.

    A shard starts at an input still to do (a finished prefix costs nothing) and ends
    where the next one starts; ranges with nothing to do are left out. ``ramp``
    (count, smaller size): the first ``count`` shards hold at most the smaller size,
    so a job's first records come soon and a small job still spreads over every CPU
    (Ray Data hands a shard's frames on when its read task ends).

    Raises:
        ConfigError: ``size`` is not positive, or an input cannot be scanned.
    """
    if size <= 0:
        raise ConfigError(f"expected a shard size >= 1, got {size}")
    several = len(sources) > 1
    index = 0
    ramp_count, ramp_size = ramp

    def limit() -> int:
        return min(size, ramp_size) if ramp_size > 0 and index < ramp_count else size
    for input_index, (location, source) in enumerate(zip(locations, sources)):
        start: str | None = None  # position of the current shard's first input to do
        skip: set[str] = set()  # done keys after that
        pending = 0
        for item in source.scan_range():
            position = item.position or item.locator
            key = shard_key(location, item, several)
            if key in done:
                if start is not None:
                    skip.add(key)
                continue
            if pending == limit():
                yield Shard(index, input_index, start, position, frozenset(skip), pending)  # type: ignore[arg-type]
                index, start, skip, pending = index + 1, None, set(), 0
            if start is None:
                start = position
            pending += 1
        if start is not None:
            yield Shard(index, input_index, start, None, frozenset(skip), pending)
            index += 1


def split_shard(shard: Shard, source: Source, location: str, several_inputs: bool, done: Container[str],
                first_index: int) -> list[Shard]:
    """The inputs of ``shard`` not in ``done``, one shard each: how a shard that kept failing is retried,
    so an input that kills the process reading it is found and blamed alone."""
    items = [item for item in source.scan_range(shard.start, shard.stop)]
    out: list[Shard] = []
    for i, item in enumerate(items):
        if shard_key(location, item, several_inputs) in done:
            continue
        following = items[i + 1] if i + 1 < len(items) else None
        stop = (following.position or following.locator) if following is not None else shard.stop
        out.append(Shard(first_index + len(out), shard.input_index, item.position or item.locator, stop,
                         frozenset(), 1))
    return out
