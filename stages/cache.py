"""A content-addressed cache of answers: an image seen before is not recognised again.

The key is the 128-bit xxh3 hash of an image's encoded bytes, behind an
``identity`` that covers everything that changes the answer (``answer_identity``:
the model and the digest of its weights, the preprocessing, the digest of the
labels, top-k, precision and engine). The value is what the answer says about
the image (width, height, labels, model), not where the image came from: a hit
becomes a record with the new input's key and source, marked ``cached``.

The store is LMDB, safe for several processes at once (a batch job and a daemon
may share one cache): readers never wait, writers take turns. Commits are
durable and a killed writer leaves the last committed state, so a crash loses at
most what was not yet committed and never serves a wrong answer. The file is
bounded (``max_bytes``): past 60% of it the least recently used entries go, and
a hit renews its entry (recorded in batches, not one write per hit). A file
that is not a wanwu cache is refused, untouched. Error records are not cached by
default: a truncated upload may be sent whole again.

The cache is only ever a shortcut: when its disk is full or failing, a lookup
counts as a miss and answers are not kept (for ``WRITE_RETRY_S``, then writing is
tried again), with one warning; the job or the daemon goes on recognising.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import xxhash

from wanwu.errors import ConfigError
from wanwu.records import Record

logger = logging.getLogger(__name__)

FORMAT = b"wanwu-cache 1"  # in the meta database: a file without it is not ours
# Shares of max_bytes the entries' own pages may take. LMDB writes copy pages and frees the
# old ones only when no reader needs them, so the file needs room beyond the live entries:
# even a delete needs fresh pages, and a file that is completely full cannot be evicted from.
EVICT_AT = 0.6  # entries taking this share start an eviction
EVICT_TO = 0.45  # it stops at this share
TOUCH_FLUSH_S = 1.0  # hits renew their entries in one write at most this often
WRITE_RETRY_S = 60.0  # after a failed write (a full or failing disk), writes rest this long
_STAMP = struct.Struct(">d")  # last use, big-endian, so the LRU index sorts by time


def digest(data: bytes | memoryview) -> bytes:
    """The 16-byte content key of encoded image bytes (xxh3, 128 bits)."""
    return xxhash.xxh3_128_digest(data)


def file_digest(location: str) -> str:
    """xxh3-128 of a file's bytes, or of every file under a folder (names and bytes); "" for no file."""
    path = Path(location) if location else None
    if path is None or not path.exists():
        return ""
    h = xxhash.xxh3_128()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        h.update(str(file.relative_to(path) if file != path else file.name).encode())
        with open(file, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def _folder_lock(path: str) -> Iterator[None]:
    """An exclusive ``flock`` on the folder itself (no lock file: the folder holds only LMDB's)."""
    import fcntl

    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _check_ours(path: str) -> None:
    """Refuse, without writing to it, a folder that is not a wanwu cache."""
    import lmdb

    if not os.path.exists(os.path.join(path, "data.mdb")):
        raise ConfigError(f"expected a wanwu cache at {path!r}, got a folder of other files; it is left untouched")
    try:
        env = lmdb.open(path, readonly=True, lock=False, max_dbs=3, subdir=True)
    except lmdb.Error as exc:
        raise ConfigError(f"expected a wanwu cache at {path!r}, got one LMDB cannot open: {exc}") from exc
    try:
        try:
            meta = env.open_db(b"meta", create=False)
            with env.begin(db=meta) as txn:
                found = txn.get(b"format")
        except lmdb.Error:  # no such database: not ours
            found = None
    finally:
        env.close()
    if found != FORMAT:
        raise ConfigError(f"expected a wanwu cache ({FORMAT.decode()}) at {path!r}, got "
                          f"{'another format ' + repr(found) if found else 'another LMDB file'}; it is left untouched")


def answer_identity(model: Any, engine: str, precision: str, top_k: int) -> bytes:
    """16 bytes naming everything that changes an answer (``model`` is a ``ModelSpec``)."""
    parts = {
        "model": model.name, "format": model.format, "classes": model.num_classes,
        "weights": file_digest(model.weights), "file": file_digest(model.path), "labels": file_digest(model.labels_path),
        "preprocess": repr(model.preprocess), "engine": engine, "precision": precision, "top_k": top_k,
    }
    return xxhash.xxh3_128_digest(json.dumps(parts, sort_keys=True).encode())


@dataclass
class CacheCounts:
    """What this process did with the cache. ``hits + misses`` = images looked up."""

    hits: int = 0
    misses: int = 0
    insertions: int = 0
    evictions: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"hits": self.hits, "misses": self.misses, "insertions": self.insertions, "evictions": self.evictions}


class RecordCache:
    """Answers by content, on disk. Open it in the process that uses it (it does not pickle).

    Args:
        path: the cache's folder (created if missing).
        identity: ``answer_identity`` of the model and settings; entries of other identities
            live in the same file and never match.
        max_bytes: the file's bound.
        cache_errors: also keep error records (off: a truncated upload may be sent whole again).

    Raises:
        ConfigError: ``path`` exists but is not a wanwu cache (or cannot be opened).
    """

    def __init__(self, path: str, identity: bytes, max_bytes: int = 1 << 30, cache_errors: bool = False) -> None:
        import lmdb

        if max_bytes < 1 << 20:
            raise ConfigError(f"expected a cache of at least 1 MiB, got --cache-max-bytes {max_bytes}")
        self.path, self.identity, self.max_bytes, self.cache_errors = path, identity, max_bytes, cache_errors
        self.counts = CacheCounts()
        self._lock = threading.Lock()  # counts and pending touches: threads of a daemon share one cache
        self._touched: dict[bytes, float] = {}
        self._last_flush = time.monotonic()
        self._writes_resume = 0.0  # monotonic time before which writing is not tried (after a failure)
        self._failing = False  # a failure was reported and nothing has worked since
        if os.path.exists(path) and not os.path.isdir(path):
            raise ConfigError(f"expected a wanwu cache folder at {path!r}, got a file; it is left untouched")
        os.makedirs(path, exist_ok=True)
        # Creating the file and marking it ours are two transactions: a second process opening
        # the cache in between would find an LMDB file without the mark and refuse it. So the
        # check and the creation happen under a lock on the folder (flock, released on exit).
        with _folder_lock(path):
            if os.listdir(path):
                _check_ours(path)  # read-only: a file that is not ours is not written to, not even its map size
            try:
                self._env = lmdb.open(path, map_size=max_bytes, max_dbs=3, subdir=True, metasync=False,
                                      readahead=False, max_readers=1024)  # a reader slot per thread of a daemon
                self._meta = self._env.open_db(b"meta")
                self._answers = self._env.open_db(b"answers")  # identity + digest -> stamp + JSON
                self._lru = self._env.open_db(b"lru")  # stamp + identity + digest -> b""
                with self._env.begin(write=True) as txn:
                    if txn.get(b"format", db=self._meta) is None:
                        txn.put(b"format", FORMAT, db=self._meta)
            except lmdb.Error as exc:
                raise ConfigError(f"expected a wanwu cache at {path!r}, got one LMDB cannot open: {exc}") from exc

    # -- answers

    def get(self, key: bytes) -> dict[str, Any] | None:
        """The cached answer for content ``key`` (``digest``), or None; counted as a hit or a miss."""
        import lmdb

        full = self.identity + key
        try:
            with self._env.begin(buffers=True) as txn:
                value = txn.get(full, db=self._answers)
                answer = json.loads(bytes(value[_STAMP.size:])) if value is not None else None
        except lmdb.Error as exc:  # a failing disk: a miss, and the image is recognised
            self._failed("read", exc)
            answer = None
        with self._lock:
            if answer is None:
                self.counts.misses += 1
                return None
            self.counts.hits += 1
            self._touched[full] = time.time()
            due = time.monotonic() - self._last_flush >= TOUCH_FLUSH_S
        if due:
            self.flush()
        return answer

    def shared(self) -> None:
        """Count as a hit an image answered by an identical one still in flight (not looked up here)."""
        with self._lock:
            self.counts.hits += 1

    def missed(self) -> None:
        """Count as a miss an image that was to wait on an identical one, which was answered first."""
        with self._lock:
            self.counts.misses += 1

    def put(self, entries: list[tuple[bytes, Record]]) -> None:
        """Keep the answers of ``(key, record)`` pairs (error records only with ``cache_errors``)."""
        import lmdb

        keep = [(self.identity + key, r) for key, r in entries if r.error is None or self.cache_errors]
        if not keep or not self._may_write():
            return
        try:
            self._put(keep)
            self.flush()
            self._evict()
        except lmdb.Error as exc:  # a full or failing disk: what was not committed is not kept
            self._failed("write", exc)
        else:
            self._failing = not self._may_write()  # a spell of failures is over once a write went through

    def _put(self, keep: list[tuple[bytes, Record]]) -> None:
        import lmdb

        for attempt in range(2):
            inserted = 0
            try:
                with self._env.begin(write=True) as txn:
                    now = time.time()
                    for full, record in keep:
                        old = txn.get(full, db=self._answers)
                        if old is not None:
                            txn.delete(bytes(old[:_STAMP.size]) + full, db=self._lru)
                        else:
                            inserted += 1
                        answer = {"width": record.width, "height": record.height, "labels": record.labels,
                                  "model": record.model, "error": record.error}
                        txn.put(full, _STAMP.pack(now) + json.dumps(answer, ensure_ascii=False).encode(),
                                db=self._answers)
                        txn.put(_STAMP.pack(now) + full, b"", db=self._lru)
                with self._lock:
                    self.counts.insertions += inserted
                break
            except lmdb.MapFullError:  # nothing of this batch was kept: make room, once
                if attempt:
                    logger.warning("cache %s is full even after eviction; %d answers not kept", self.path, len(keep))
                    return
                self._evict(force=True)

    def _may_write(self) -> bool:
        return time.monotonic() >= self._writes_resume

    def _failed(self, doing: str, exc: Exception) -> None:
        """The disk under the cache failed: warn once per spell of failures; writes rest a while."""
        if doing == "write":
            self._writes_resume = time.monotonic() + WRITE_RETRY_S
        if not self._failing:
            self._failing = True
            logger.warning("cache %s: cannot %s (%s); recognising without it (writes tried again in %.0f s)",
                           self.path, doing, exc, WRITE_RETRY_S)

    def record(self, answer: dict[str, Any], key: str, source: str, t0: float) -> Record:
        """The record of a hit: the cached answer under the new input's key and source."""
        return Record(key, source, answer["width"], answer["height"], answer["labels"], answer["model"],
                      round((time.time() - t0) * 1000.0, 3), answer.get("error"), cached=True)

    # -- upkeep

    def flush(self) -> None:
        """Renew the entries of recent hits (their place in the eviction order)."""
        import lmdb

        with self._lock:
            touched, self._touched = self._touched, {}
            self._last_flush = time.monotonic()
        if not touched or not self._may_write():
            return
        try:
            self._renew(touched)
        except lmdb.Error as exc:  # renewals are a hint for eviction: lost, not fatal
            self._failed("write", exc)

    def _renew(self, touched: dict[bytes, float]) -> None:
        with self._env.begin(write=True) as txn:
            for full, stamp in touched.items():
                old = txn.get(full, db=self._answers)
                if old is None:
                    continue  # evicted since
                txn.delete(bytes(old[:_STAMP.size]) + full, db=self._lru)
                txn.put(full, _STAMP.pack(stamp) + bytes(old[_STAMP.size:]), db=self._answers)
                txn.put(_STAMP.pack(stamp) + full, b"", db=self._lru)

    def used_bytes(self) -> int:
        """Bytes of pages the entries take (what the bound is about)."""
        with self._env.begin() as txn:
            stats = [txn.stat(db) for db in (self._answers, self._lru, self._meta)]
        return sum((s["branch_pages"] + s["leaf_pages"] + s["overflow_pages"]) * s["psize"] for s in stats)

    def _evict(self, force: bool = False) -> None:
        """Drop the least recently used entries once they pass ``EVICT_AT`` of the bound (or at
        once with ``force``), down to ``EVICT_TO`` of it, in small transactions."""
        import lmdb

        if not force and self.used_bytes() < EVICT_AT * self.max_bytes:
            return
        batch = 256
        while True:
            try:
                with self._env.begin(write=True) as txn:
                    cursor = txn.cursor(db=self._lru)
                    oldest = [bytes(key) for key, _ in zip(cursor.iternext(values=False), range(batch))]
                    for stamp_key in oldest:
                        txn.delete(stamp_key, db=self._lru)
                        txn.delete(stamp_key[_STAMP.size:], db=self._answers)
            except lmdb.MapFullError:  # even deleting needs pages: smaller steps
                if batch == 1:
                    logger.warning("cache %s is too full to evict from; it stays as it is", self.path)
                    return
                batch = max(1, batch // 4)
                continue
            with self._lock:
                self.counts.evictions += len(oldest)
            if not oldest or self.used_bytes() <= EVICT_TO * self.max_bytes:
                return

    def stats(self) -> dict[str, Any]:
        """Entries and bytes in the file, and this process's counts."""
        with self._env.begin() as txn:
            entries = txn.stat(self._answers)["entries"]
        return {"path": self.path, "entries": entries, "used_bytes": self.used_bytes(), "max_bytes": self.max_bytes,
                **self.counts.as_dict()}

    def clear(self) -> None:
        """Drop every entry (of every identity)."""
        with self._env.begin(write=True) as txn:
            txn.drop(self._answers, delete=False)
            txn.drop(self._lru, delete=False)

    def shutdown(self) -> None:
        """Record pending hits and close. Safe to call twice."""
        if self._env is not None:
            try:
                self.flush()
            finally:
                self._env.close()
                self._env = None  # type: ignore[assignment]
