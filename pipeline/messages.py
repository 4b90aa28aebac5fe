"""Messages between the job's processes: small frozen types, one per purpose.

They travel pickled as the first frame of a ZeroMQ multipart message; encoded
image bytes, when there are any, follow as a second frame. Pixels never travel
here: a ``Decoded`` names the shared-memory slot that holds them.
"""

from __future__ import annotations

import pickle
import traceback
from dataclasses import dataclass, field
from typing import Any

_PROTOCOL = pickle.HIGHEST_PROTOCOL


@dataclass(frozen=True)
class WorkItem:
    """Loader to decoder: one input to decode; its bytes are the next frame."""

    key: str
    source: str
    t0: float  # wall time the loader read it, for the record's elapsed_ms


@dataclass(frozen=True)
class Decoded:
    """Decoder to inference: the pixels of ``key`` are ready in ``slot``."""

    key: str
    source: str
    slot: int
    width: int
    height: int
    t0: float
    decoder: int = 0  # which decoder owns the slot
    generation: int = 0  # that decoder's incarnation (restarts count up)


@dataclass(frozen=True)
class Release:
    """Inference to decoder: these slots may be written again."""

    slots: tuple[int, ...]


@dataclass(frozen=True)
class Records:
    """Any stage to the sink: finished records (results or errors)."""

    records: tuple[dict, ...]


@dataclass(frozen=True)
class ScanDone:
    """Loader to sink: the loader emitted ``total`` inputs; expect that many records."""

    total: int


@dataclass(frozen=True)
class Event:
    """Worker to the job's owner: lifecycle, progress and failures.

    ``kind`` is one of ``attached`` (mapped shared memory), ``ready`` (can work),
    ``progress`` (sink counts), ``done`` (sink has every record), ``stats``
    (busy time, at exit) or ``fatal`` (the worker cannot go on).
    """

    kind: str
    stage: str
    pid: int
    data: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def fatal(cls, stage: str, pid: int, exc: BaseException) -> "Event":
        """A failure report that carries the exception text and traceback across."""
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        return cls("fatal", stage, pid, {"type": type(exc).__name__, "message": str(exc), "traceback": tb})


STOP = b"stop"  # the owner's broadcast to every worker
GO = b"go"  # the owner's broadcast once every worker is ready (heeded by a loader told to hold)


def dumps(msg: object) -> bytes:
    return pickle.dumps(msg, protocol=_PROTOCOL)


def loads(frame: bytes | memoryview) -> Any:
    return pickle.loads(frame)
