"""The daemon's result cache at its door: answers the cache knows, and identical images in flight.

With ``--cache``, an image is known by the digest of its bytes. One already answered
is answered from the cache before it is queued; one whose identical bytes are in
flight (in this request or another) waits for that answer instead of being
recognised again, as ``wanwu run`` does with twins. If the image in flight is given
up (its request timed out), the first twin still waiting is sent in its place.
Each image looked up counts once: a hit or a miss (``hits + misses`` = images).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Sequence

from wanwu.records import Record


@dataclass(frozen=True)
class Twin:
    """An image waiting on the answer to identical bytes in flight."""

    request: Any  # the dispatcher's request object (``records``, ``source``, ``gave_up``)
    index: int  # its place in that request
    key: str
    t0: float
    data: bytes  # sent in the answer's place if the image in flight is given up


class Twins:
    """Cache lookups and the images waiting on identical ones in flight. Thread-safe.

    Lock order: the dispatcher may call ``lead_or_wait`` and ``given_up`` while holding its
    own lock; this class never calls back into the dispatcher.
    """

    def __init__(self, cache: Any) -> None:
        self.cache = cache  # a RecordCache
        self._lock = threading.Lock()
        self._waiting: dict[bytes, list[Twin]] = {}  # content in flight -> its twins

    def look_up(self, request: Any, images: Sequence[bytes], keys: Sequence[str], t0: float
                ) -> tuple[list[bytes], set[int]]:
        """Put the cache's answers into ``request.records``.

        Returns:
            Each image's content digest, and the images not looked up because identical
            bytes are in flight already or earlier in this request (they will wait on those).
        """
        from wanwu.stages.cache import digest

        contents = [digest(data) for data in images]
        with self._lock:
            waiting = {i for i, content in enumerate(contents) if content in self._waiting}
        answers: dict[bytes, dict | None] = {}  # each content of this request looked up once
        for i, content in enumerate(contents):
            if i in waiting:
                continue
            if content in answers:  # an earlier image of this request has the same bytes
                if answers[content] is None:
                    waiting.add(i)
                    continue
                self.cache.shared()
            else:
                answers[content] = self.cache.get(content)
            if answers[content] is not None:
                request.records[i] = self.cache.record(answers[content], keys[i], request.source, t0)
                request.left -= 1
        return contents, waiting

    def lead_or_wait(self, content: bytes, twin: Twin, looked_up: bool) -> bool:
        """Make ``twin`` wait on identical bytes in flight (True), or note it as the one in flight (False).

        ``looked_up``: it was looked up in the cache (a miss counted); otherwise a wait counts as a hit.
        """
        with self._lock:
            waits = content in self._waiting
            if waits:
                self._waiting[content].append(twin)
            else:
                self._waiting[content] = []
        if not looked_up:  # counted here, once: a hit, or a miss when what it would wait on was answered meanwhile
            if waits:
                self.cache.shared()
            else:
                self.cache.missed()
        return waits

    def answered(self, content: bytes, record: Record) -> list[tuple[Any, int, Record]]:
        """The twins of ``content``, now answered: (request, index, record under its own key)."""
        with self._lock:
            twins = self._waiting.pop(content, [])
        return [(t.request, t.index, record.shared_with(t.key, t.request.source, t.t0)) for t in twins]

    def given_up(self, content: bytes) -> Twin | None:
        """The image in flight for ``content`` was given up: the first twin still wanted, to send instead."""
        with self._lock:
            twins = [t for t in self._waiting.pop(content, []) if not t.request.gave_up]
            if not twins:
                return None
            self._waiting[content] = twins[1:]
            return twins[0]
