"""Putting records into the one shape every sink stores and reads back."""

from __future__ import annotations

import json
import logging
from typing import Any, Container, Iterable

from wanwu.errors import SinkError
from wanwu.records import RECORD_FIELDS, Record as RecordObject
from wanwu.stages.sinks.base import Record, Writable

logger = logging.getLogger(__name__)


def normalise(record: Writable) -> Record:
    """``record`` as a dict with exactly ``RECORD_FIELDS`` (and ``"cached": True`` when it came from the
    result cache, ``"frame"`` for a video frame), in that order, and fixed types.

    Missing fields become ``None`` and other fields are dropped, so every sink
    reads back the same dict. ``width``/``height`` become ``int`` and
    ``elapsed_ms`` ``float`` (or ``None``), so a JSONL and an SQLite output of the
    same job compare equal.

    Raises:
        SinkError: the record has no string ``key`` or a field has the wrong type.
    """
    if isinstance(record, RecordObject):
        record = record.to_dict()
    key = record.get("key")
    if not isinstance(key, str):
        raise SinkError(f"expected a record with a str 'key', got key={key!r}")
    out = {name: record.get(name) for name in RECORD_FIELDS}
    if record.get("cached"):
        out["cached"] = True  # an answer from the result cache says so; others carry no such field
    if record.get("frame") is not None:
        out["frame"] = record["frame"]  # where a video frame was in its stream
    try:
        for name in ("width", "height"):
            if out[name] is not None:
                out[name] = int(out[name])
        if out["elapsed_ms"] is not None:
            out["elapsed_ms"] = float(out["elapsed_ms"])
    except (TypeError, ValueError) as exc:
        raise SinkError(f"record {key!r}: expected numbers for width/height/elapsed_ms: {exc}") from exc
    return out


def free_key(wanted: str, taken: Container[str]) -> str:
    """``wanted``, or ``wanted#2``, ``#3``...: the first not in ``taken``. An output keeps one record
    per key (``unique_new``), so a new input under a key already written needs a key of its own."""
    key, n = wanted, 1
    while key in taken:
        n += 1
        key = f"{wanted}#{n}"
    return key


def unique_new(records: Iterable[Writable], done: set[str]) -> list[Record]:
    """Normalised records whose key is not in ``done``, the first one per key.

    ``done`` is not changed: the caller adds the keys once the records are written.
    """
    batch: dict[str, Record] = {}
    for record in records:
        record = normalise(record)
        key = record["key"]
        if key in done or key in batch:
            logger.debug("skipping %r: already written", key)
            continue
        batch[key] = record
    return list(batch.values())


def dumps(value: Any) -> str:
    """Compact JSON with non-ASCII text unescaped; numpy scalars and arrays become numbers and lists."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=_plain)


def top_label(labels: Any) -> str | None:
    """The best label's ``label`` (labels are best first), or ``None``."""
    if isinstance(labels, list) and labels and isinstance(labels[0], dict):
        return labels[0].get("label")
    return None


def _plain(value: Any) -> Any:
    # Engines hand over numpy scores and class ids; json cannot encode those.
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"expected JSON-serialisable values, got {type(value).__name__}")
