"""Records: what wanwu says about one input. The one place a record is built.

A record is a ``Record``; sinks, front doors and resumed jobs all see the same
fields: ``key``, ``source``, ``width``, ``height``, ``labels`` (best first, each
``{"label", "label_en", "class_id", "score"}``), ``model``, ``elapsed_ms``,
``error`` (``None`` or ``{"type", "message"}``), and ``"cached": true`` after them
for an answer that came from the result cache, and ``"frame"`` for a video frame
(``{"stream", "frame", "pts_s"}``, plus ``"time"``, ISO 8601 UTC, for a live stream). ``to_dict()`` gives them in that
order, which is the order JSONL lines and SQLite columns keep.

Result records come from the classifier stage (``Record.results``); error records
from whoever found the problem (``Record.failure``): the loader for bytes it could
not read, a decoder for bytes that are not an image, the pipeline for an image
whose worker died twice, a front door for a request it could not serve.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any, Iterable, NamedTuple, Protocol, Sequence

import numpy as np

from wanwu.errors import error_dict

RECORD_FIELDS = ("key", "source", "width", "height", "labels", "model", "elapsed_ms", "error")


class Described(Protocol):
    """What ``Record.results`` needs to know of each recognised item."""

    key: str  # the record's key
    source: str  # where it came from (folder, archive, door)
    width: int  # of the original image as displayed, in pixels
    height: int
    t0: float  # time.time() when its bytes (or frame) were read


class Item(NamedTuple):
    """A ready-made ``Described`` for callers without a message type of their own."""

    key: str
    source: str
    width: int
    height: int
    t0: float


@dataclass(frozen=True, slots=True)
class Record:
    """One input's outcome. Build with ``results`` or ``failure``, not by hand."""

    key: str
    source: str
    width: int | None  # None for an error record
    height: int | None
    labels: list[dict[str, Any]]  # best first; empty for an error record
    model: str  # the resolved model's name
    elapsed_ms: float  # from reading the input to this record
    error: dict[str, str] | None = None  # {"type", "message"} or None
    cached: bool = False  # the answer came from the result cache (an identical image seen before)
    frame: dict[str, Any] | None = None  # a video frame's place in its stream: stream, frame, pts_s (, time)

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dict, in ``RECORD_FIELDS`` order (what sinks write); ``"cached": true``
        follows for an answer from the cache, and ``"frame"`` for a video frame; both are absent otherwise."""
        out = {"key": self.key, "source": self.source, "width": self.width, "height": self.height,
               "labels": self.labels, "model": self.model, "elapsed_ms": self.elapsed_ms, "error": self.error}
        if self.cached:
            out["cached"] = True
        if self.frame is not None:
            out["frame"] = self.frame
        return out

    @classmethod
    def results(cls, items: Iterable[Described], scores: np.ndarray, class_ids: np.ndarray,
                labels_zh: Sequence[str], labels_en: Sequence[str], model: str,
                now: float | None = None) -> list["Record"]:
        """One record per item from the top-k of its row.

        Args:
            items: the recognised images, in the order of the rows.
            scores: float (n, k) probabilities, best first (``softmax_topk``'s first result).
            class_ids: int (n, k) class ids matching ``scores``.
            labels_zh: Chinese label of each class id; ``labels_en``: English alongside.
            model: written into every record's ``model`` field.
            now: ``time.time()`` at the end of the work, shared by the batch; None = now.

        Returns:
            Records with ``error`` None; scores rounded to 6 digits (what JSON needs, no more).
        """
        now = time.time() if now is None else now
        out = []
        # tolist() once: per-element numpy scalars would cost more than the rest of this loop.
        for item, row_scores, row_ids in zip(items, scores.tolist(), class_ids.tolist()):
            labels = [{"label": labels_zh[c], "label_en": labels_en[c], "class_id": c, "score": round(s, 6)}
                      for s, c in zip(row_scores, row_ids)]
            out.append(cls(item.key, item.source, item.width, item.height, labels, model,
                           round((now - item.t0) * 1000.0, 3)))
        return out

    def shared_with(self, key: str, source: str, t0: float) -> "Record":
        """This answer for an identical image under another name (a twin that waited on it): its own
        key, source and time since ``t0``; ``cached``, as a cache hit is, unless it is an error."""
        return replace(self, key=key, source=source, elapsed_ms=round((time.time() - t0) * 1000.0, 3),
                       cached=self.error is None)

    @classmethod
    def failure(cls, key: str, source: str, model: str, exc: BaseException, t0: float,
                now: float | None = None) -> "Record":
        """The record of an input that failed: no size, no labels, ``error`` from ``error_dict(exc)``."""
        now = time.time() if now is None else now
        return cls(key, source, None, None, [], model, round((now - t0) * 1000.0, 3), error_dict(exc))
