"""Building records: the one place that says what a result or an error record holds.

Every producer of records (the inference process of ``wanwu run``, the loader's
read errors, the in-process and multi-process backends of ``wanwu serve``) builds
them here, so a sink, a front door and a resumed job all see the same fields:
``key``, ``source``, ``width``, ``height``, ``labels`` (best first, each
``{"label", "label_en", "class_id", "score"}``), ``model``, ``elapsed_ms``,
``error`` (``None`` or ``{"type", "message"}``).
"""

from __future__ import annotations

import logging
import time
from typing import Iterable, NamedTuple, Protocol, Sequence

import numpy as np

from wanwu.errors import error_dict

logger = logging.getLogger(__name__)


class RecordItem(Protocol):
    """What ``result_records`` needs of an item (``messages.Decoded`` is one)."""

    key: str
    source: str
    width: int
    height: int
    t0: float  # time.time() when its bytes were read


class ImageItem(NamedTuple):
    """A ready-made ``RecordItem`` for producers without a message type of their own."""

    key: str
    source: str
    width: int
    height: int
    t0: float


def result_records(
    items: Iterable[RecordItem],
    scores: np.ndarray,
    class_ids: np.ndarray,
    labels_zh: Sequence[str],
    labels_en: Sequence[str],
    model_name: str,
    now: float | None = None,
) -> list[dict]:
    """One record per item, from the top-k of its row of logits.

    Args:
        items: the recognised images, in the order of the rows.
        scores: float (n, k) probabilities, best first (``softmax_topk``'s first result).
        class_ids: int (n, k) class ids matching ``scores``.
        labels_zh: Chinese label of each class id; ``labels_en``: English alongside.
        model_name: written into every record's ``model`` field.
        now: ``time.time()`` at the end of the work, shared by the batch; None = now.

    Returns:
        Records with ``error`` None; scores rounded to 6 digits (what JSON needs, no more).
    """
    now = time.time() if now is None else now
    out = []
    # tolist() once: per-element numpy scalars would cost more than the rest of this loop.
    for item, row_scores, row_ids in zip(items, scores.tolist(), class_ids.tolist()):
        labels = [
            {"label": labels_zh[c], "label_en": labels_en[c], "class_id": c, "score": round(s, 6)}
            for s, c in zip(row_scores, row_ids)
        ]
        out.append({
            "key": item.key, "source": item.source, "width": item.width, "height": item.height,
            "labels": labels, "model": model_name, "elapsed_ms": round((now - item.t0) * 1000.0, 3),
            "error": None,
        })
    return out


def error_record(key: str, source: str, model: str, exc: BaseException, t0: float,
                 now: float | None = None) -> dict:
    """The record of an input that failed (could not be read or decoded).

    ``width``/``height`` are None and ``labels`` empty; ``error`` is ``error_dict(exc)``.
    """
    now = time.time() if now is None else now
    return {
        "key": key, "source": source, "width": None, "height": None, "labels": [],
        "model": model, "elapsed_ms": round((now - t0) * 1000.0, 3), "error": error_dict(exc),
    }
