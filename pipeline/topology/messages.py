"""Messages between the topology's processes: small frozen types, one per purpose.

They travel pickled as the first frame of a ZeroMQ multipart message; encoded
image bytes, when there are any, follow as a second frame. Pixels never travel
here: a ``Decoded`` names the shared-memory slot that holds them.

Every input in flight carries a ``ticket``: a number unique within the feeder
(the loader of ``wanwu run``, the dispatcher of ``wanwu serve``) that matches
records back to inputs whatever their keys, so a re-sent input answered twice is
answered once.

Who sends what::

    feeder    --WorkItem(+bytes)-->  decoder        --Decoded-->   inference
    producer  <--Release----------   inference
    decoder, inference --Taken / Results-->  feeder  --Records / ScanDone / End-->  sink
    every worker --Event--> owner;   owner --Stop / Drain / Lost--> every worker
"""

from __future__ import annotations

import enum
import pickle
import traceback
from dataclasses import dataclass, field
from typing import Any

from wanwu.errors import WanwuError
from wanwu.records import Record

_PROTOCOL = pickle.HIGHEST_PROTOCOL


@dataclass(frozen=True)
class WorkItem:
    """Feeder to decoder: one input to decode; its bytes are the next frame."""

    ticket: int
    key: str
    source: str
    t0: float  # wall time its bytes were read, for the record's elapsed_ms
    attempt: int = 1  # > 1: sent again after its decoder died; decoded alone, so a second death names it


@dataclass(frozen=True)
class Decoded:
    """Producer (decoder or frame source) to inference: the pixels of ``ticket`` are in ``slot``."""

    ticket: int
    key: str
    source: str
    slot: int
    width: int
    height: int
    t0: float
    producer: int = 0  # who owns the slot: decoder i, or the loader (after the decoders)
    generation: int = 0  # that producer's incarnation (restarts and resets count up)


@dataclass(frozen=True)
class Release:
    """Inference to producer: these slots may be written again."""

    slots: tuple[int, ...]


@dataclass(frozen=True)
class Taken:
    """Decoder to feeder: it holds these inputs now, so its death is theirs."""

    tickets: tuple[int, ...]
    producer: int
    generation: int


@dataclass(frozen=True)
class Results:
    """Decoder or inference to feeder: one record per ticket, in the same order."""

    tickets: tuple[int, ...]
    records: tuple[Record, ...]


@dataclass(frozen=True)
class Records:
    """Feeder to sink: records to write, at most one per input."""

    records: tuple[Record, ...]


@dataclass(frozen=True)
class ScanDone:
    """Feeder to sink: the scan is over after ``total`` inputs (for the progress display)."""

    total: int


@dataclass(frozen=True)
class End:
    """Feeder to sink: every input has its record in the stream before this; nothing follows.

    ``complete`` is False when a drain cut the scan short (inputs remain for a resume).
    """

    complete: bool


class EventKind(str, enum.Enum):
    """What a worker tells the owner."""

    ATTACHED = "attached"  # mapped the shared memory
    READY = "ready"  # set up (model loaded, decoder built): can work
    ALIVE = "alive"  # a heartbeat from the worker's loop, for the watchdog
    BUSY = "busy"  # now and then: busy seconds so far, for the busy-share figures
    STATS = "stats"  # at exit: the final busy seconds
    STREAMS = "streams"  # loader, now and then: each video stream's counters
    BATCH = "batch"  # inference ran a batch: size, queue and compute seconds (daemon metrics)
    PROGRESS = "progress"  # sink: records written so far
    DONE = "done"  # sink: every record is written (the End arrived)
    FATAL = "fatal"  # the worker cannot go on; it exits after sending this


@dataclass(frozen=True)
class Event:
    """Worker to owner: lifecycle, progress and failures."""

    kind: EventKind
    stage: str  # the worker's name: "loader", "decoder-0", "inference", "sink"
    pid: int
    data: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def fatal(cls, stage: str, pid: int, exc: BaseException) -> "Event":
        """A failure report that carries the exception text and traceback across.

        ``expected`` is True for wanwu's own errors (``WanwuError``): their message says what
        went wrong (a full disk, a model that cannot load), and a traceback would only bury it.
        """
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        return cls(EventKind.FATAL, stage, pid, {"type": type(exc).__name__, "message": str(exc), "traceback": tb,
                                                 "expected": isinstance(exc, WanwuError)})


@dataclass(frozen=True)
class Stop:
    """Owner to every worker: finish now (the sink writes what has arrived)."""


@dataclass(frozen=True)
class Drain:
    """Owner to the feeder: take no new input; end once every input in flight has its record."""


@dataclass(frozen=True)
class Lost:
    """Owner to the feeder: these producer incarnations died (or were reset), with what they held.

    ``everything``: the inference process died, so every input in flight is lost,
    and every producer moved on to ``generations`` (its new incarnation number).
    """

    dead: tuple[tuple[int, int], ...]  # (producer, generation) pairs that are gone
    everything: bool = False
    generations: tuple[tuple[int, int], ...] = ()  # (producer, new generation) after the restart


def dumps(msg: object) -> bytes:
    return pickle.dumps(msg, protocol=_PROTOCOL)


def loads(frame: bytes | memoryview) -> Any:
    return pickle.loads(frame)
