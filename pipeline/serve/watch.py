"""The hot-folder front door: recognise image files as they land in a folder.

Drop (or copy, or rsync) images into the folder, at any depth; each one is
recognised once, its record handed to ``on_records`` (the daemon's durable sink),
and the file moved to ``done_dir`` or, for an error record, ``failed_dir``, under
the same relative path. Keys are paths relative to the folder with ``/``
separators, so the sink's ledger tells a restarted watcher what is done.

A file counts once it is completely written: its size and modification time
stayed the same for ``settle_s``. Writers that pause longer than that mid-file
should write to a name ending ``.part``/``.tmp`` (ignored) and rename when done.
"""

from __future__ import annotations

import itertools
import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass, replace
from typing import Callable, Iterator

from wanwu.errors import ConfigError, ReadError
from wanwu.records import Record
from wanwu.pipeline.serve.backend import Backend, ServeError
from wanwu.stages.sinks.records import free_key
from wanwu.stages.sources.files import key_text, read_file
from wanwu.stages.sources.folder import walk_images

logger = logging.getLogger(__name__)

# Names that download managers, rsync and editors give files still being written.
PARTIAL_SUFFIXES = (".part", ".tmp", ".crdownload", ".partial")
_MAX_BACKOFF_S = 30.0


@dataclass
class _Seen:
    """A file being watched until it settles."""

    rel: str  # path relative to the folder, OS separators
    signature: tuple[int, int]  # (size, mtime_ns) when last seen changing
    since: float  # time.monotonic() of that change
    record_key: str = ""  # chosen at the first try, kept for the next ones (a put-off batch)


class HotFolder:
    """Watch ``folder`` and recognise every image file that lands in it, once.

    ``start()`` polls from a background thread every ``poll_s``; ``shutdown()`` stops it
    after the batch in flight and is safe to call twice. ``poll_once()`` is one such poll,
    for driving the watcher by hand.

    Args:
        backend: what recognises the images (source ``"watch"``).
        folder: the folder to watch, recursively; hidden names (``.x``), partial downloads
            (``PARTIAL_SUFFIXES``) and names without an image extension are left alone,
            and so are ``done_dir``/``failed_dir`` when they lie inside it.
        on_records: receives each batch's records (one per file, in order) and returns once
            they are durable; only then are files moved. Called from the watcher thread.
        done_keys: keys already recognised (the sink's ledger from an earlier run): such files
            are not recognised again, only moved to ``done_dir`` (if set).
        done_dir: where recognised files go; None = they stay where they are.
        failed_dir: where files with an error record go; None = they stay.
        settle_s: a file is complete once unchanged for this long.
        poll_s: time between scans.
        batch: files per ``backend.submit`` (capped at the backend's images per request).
        timeout_s: passed to ``backend.submit``; None = the backend's default.
        claim_key: hands out the record key of a file (the daemon's sink, shared with the
            stream door); None = the key as the folder names it, or ``key#2``... when taken.
        max_bytes: a larger file gets an error record without being read (None: no bound).
    """

    def __init__(self, backend: Backend, folder: str, *, on_records: Callable[[list[Record]], None],
                 done_keys: set[str] | frozenset[str] = frozenset(), done_dir: str | None = None,
                 failed_dir: str | None = None, settle_s: float = 0.5, poll_s: float = 0.2, batch: int = 16,
                 timeout_s: float | None = None, claim_key: Callable[[str, str], str] | None = None,
                 max_bytes: int | None = None) -> None:
        if not os.path.isdir(folder):
            raise ConfigError(f"expected a folder to watch, got {folder!r}")
        if settle_s < 0 or poll_s <= 0 or batch < 1:
            raise ConfigError(f"expected settle_s >= 0, poll_s > 0 and batch >= 1, got {settle_s}, {poll_s}, {batch}")
        self.backend = backend
        self.folder = folder
        self.on_records = on_records
        self.done_dir, self.failed_dir = done_dir, failed_dir
        self.settle_s, self.poll_s, self.timeout_s = settle_s, poll_s, timeout_s
        self.batch = batch
        self.max_bytes = max_bytes  # a larger file gets an error record and is not read
        # The walk starts from the real path, so folder paths met on the way (never
        # through a symlink) compare directly with the real paths of the outputs.
        self._root = os.path.realpath(folder)
        self._skip = {os.path.realpath(d) for d in (done_dir, failed_dir) if d}
        if self._root in self._skip:  # moved files would land back in the watched folder, forever
            raise ConfigError(f"expected done_dir and failed_dir other than the watched folder, got {folder!r}")
        self._done = set(done_keys)  # the ledger, plus what this run recognised
        self._claim_key = claim_key
        self._watching: dict[str, _Seen] = {}  # key -> file not yet settled or not yet recognised
        # Done files that stay (no destination, or a move failed), with their (size, mtime) then:
        # the same path with another signature later is a new file.
        self._left: dict[str, tuple[int, int]] = {}
        self._first_poll = True
        self._counts = dict.fromkeys(("seen", "done", "failed", "moved", "retries"), 0)
        self._retry_at = 0.0
        self._backoff_s = 0.0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Watch from a daemon thread. Idempotent."""
        with self._lock:
            if self._thread is None and not self._stop.is_set():
                self._thread = threading.Thread(target=self._run, name="hot-folder", daemon=True)
                self._thread.start()
                logger.info("watching %r (done: %r, failed: %r)", self.folder, self.done_dir, self.failed_dir)

    def alive(self) -> bool:
        """Whether the watcher thread runs."""
        thread = self._thread
        return thread is not None and thread.is_alive()

    def shutdown(self) -> None:
        """Stop after the batch in flight (its records written, its files moved). Safe to call twice."""
        self._stop.set()
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            thread.join()

    def stats(self) -> dict[str, int]:
        """Counters since start: ``seen`` (image files found), ``done`` (result records), ``failed``
        (error records), ``moved`` (files moved), ``retries`` (batches put off by a ``ServeError``
        or a failed ``on_records``), ``watching`` (files waiting to settle or to be recognised)."""
        return {**self._counts, "watching": len(self._watching)}

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll_once()
            except Exception:  # whatever went wrong, the next poll tries again
                logger.exception("hot folder %r: poll failed", self.folder)
            self._stop.wait(self.poll_s)

    def poll_once(self) -> int:
        """Scan once; recognise the files that settled. Returns how many records were written.

        Do not call it while the thread started by ``start()`` runs.
        """
        now = time.monotonic()
        ready = []
        present = set()
        for key, rel in self._walk():
            present.add(key)
            if key in self._done and self._leftover(key, rel):
                self._move_leftover(key, rel)
            elif self._settled(key, rel, now):
                ready.append(key)
        self._first_poll = False
        for key in self._watching.keys() - present:  # vanished before it was recognised
            del self._watching[key]
        if not ready or now < self._retry_at:
            return 0
        written = 0
        batch = min(self.batch, self.backend.info().max_images_per_request)
        for begin in range(0, len(ready), batch):
            if self._stop.is_set() or not self._recognise(ready[begin:begin + batch]):
                break
            written += len(ready[begin:begin + batch])
        return written

    def _walk(self) -> Iterator[tuple[str, str]]:
        """``(key, relative path)`` of every candidate file (see ``walk_images``)."""
        def prune(entry: os.DirEntry[str]) -> bool:
            name = entry.name
            return name.startswith(".") or name.lower().endswith(PARTIAL_SUFFIXES) or entry.path in self._skip

        try:
            for rel in walk_images(self._root, prune):
                yield key_text(rel), rel
        except OSError as exc:  # the folder vanished or became unreadable: logged, the next poll tries again
            logger.warning("hot folder: cannot list %r: %s", self.folder, exc)

    def _signature(self, rel: str) -> tuple[int, int]:
        try:
            st = os.stat(os.path.join(self._root, rel))
            return st.st_size, st.st_mtime_ns
        except OSError:
            return -1, -1  # a dangling symlink: settles, then becomes an error record

    def _leftover(self, key: str, rel: str) -> bool:
        """Whether a file at a done key is the one already recognised, not a new one under that name.

        It is when it stayed unchanged since it was recognised (or found done), or when it was
        here when the watcher started: the crash window between writing a record and moving the
        file. A file that lands later under a done name (a camera uploading ``snapshot.jpg``
        again) is new, and is recognised under a key of its own.
        """
        if key in self._left:
            return self._left[key] == self._signature(rel)
        return self._first_poll

    def _record_key(self, key: str) -> str:
        """The record's key: the path's, or ``key#2``, ``#3``... when a record holds that one already."""
        if self._claim_key is not None:  # the daemon's sink knows the keys of every door
            return self._claim_key(key, "")
        return free_key(key, self._done)

    def _settled(self, key: str, rel: str, now: float) -> bool:
        """Whether the file stayed the same size and mtime for ``settle_s`` (first sighting: no)."""
        signature = self._signature(rel)
        seen = self._watching.get(key)
        if seen is None or seen.signature != signature:
            if seen is None:
                self._counts["seen"] += 1
            self._watching[key] = _Seen(rel, signature, now)
            return False
        return now - seen.since >= self.settle_s

    def _recognise(self, keys: list[str]) -> bool:
        """Recognise, write and move one batch. False: put off (nothing written, files stay)."""
        t0 = time.time()
        rels = [self._watching[key].rel for key in keys]
        records: list[Record | None] = [None] * len(keys)
        images, slots = [], []
        for i, (key, rel) in enumerate(zip(keys, rels)):
            try:
                images.append(read_file(os.path.join(self._root, rel), self.max_bytes))
                slots.append(i)
            except ReadError as exc:  # vanished, unreadable, empty, too large
                records[i] = Record.failure(key, "watch", self.backend.info().name, exc, t0)
        for key in keys:
            seen = self._watching[key]
            seen.record_key = seen.record_key or self._record_key(key)
        record_keys = [self._watching[key].record_key for key in keys]
        for i, record in enumerate(records):
            if record is not None:
                records[i] = replace(record, key=record_keys[i])
        if images:
            try:
                results = self.backend.submit(images, timeout_s=self.timeout_s, source="watch",
                                              keys=[record_keys[i] for i in slots])
            except Exception as exc:
                return self._put_off(len(keys), exc)
            if len(results) != len(images):
                return self._put_off(len(keys), ServeError("internal", f"expected {len(images)} records from the "
                                                                       f"backend, got {len(results)}"))
            for i, record in zip(slots, results):
                records[i] = record
        try:
            self.on_records(records)  # type: ignore[arg-type]
        except Exception as exc:
            return self._put_off(len(keys), exc)
        self._backoff_s = 0.0
        for key, rel, record in zip(keys, rels, records):
            assert record is not None
            self._done.update((key, record.key))
            signature = self._watching.pop(key).signature
            failed = record.error is not None
            self._counts["failed" if failed else "done"] += 1
            self._move(key, rel, self.failed_dir if failed else self.done_dir, signature)
        return True

    def _put_off(self, n: int, exc: Exception) -> bool:
        """Back off after a request-level failure: the files stay and are tried again later."""
        self._backoff_s = min(_MAX_BACKOFF_S, max(2 * self._backoff_s, self.poll_s, 0.25))
        self._retry_at = time.monotonic() + self._backoff_s
        self._counts["retries"] += 1
        if isinstance(exc, ServeError):
            logger.warning("hot folder: %d files put off for %.2fs: %s (%s)", n, self._backoff_s, exc, exc.reason)
        else:
            logger.error("hot folder: %d files put off for %.2fs", n, self._backoff_s, exc_info=exc)
        return False

    def _move_leftover(self, key: str, rel: str) -> None:
        """A file whose record is already written (by this run or an earlier one) but is still here."""
        if key not in self._left:
            self._move(key, rel, self.done_dir, self._signature(rel))

    def _move(self, key: str, rel: str, dest_root: str | None, signature: tuple[int, int]) -> None:
        """Move a done file (``signature``: its size and mtime when recognised) to ``dest_root``."""
        if dest_root is None:
            self._left[key] = signature
            return
        if self._signature(rel) != signature:  # written again since it was read: a new file, left to be seen
            self._left.pop(key, None)
            return
        src = os.path.join(self._root, rel)
        try:
            dest = move_no_clobber(src, os.path.join(dest_root, rel))
        except FileNotFoundError:  # vanished after it was read: nothing left to move
            return
        except OSError as exc:
            self._left[key] = signature
            logger.warning("hot folder: cannot move %r to %r: %s; it stays", src, dest_root, exc)
            return
        self._left.pop(key, None)  # a file landing at that path from now on is a new one
        self._counts["moved"] += 1
        logger.debug("hot folder: %r -> %r", src, dest)


def move_no_clobber(src: str, dest: str) -> str:
    """Move ``src`` to ``dest``, or to ``dest`` with ``-1``, ``-2``, ... before its extension if taken.

    Never overwrites: a hard link claims the name atomically (it fails if the name exists),
    then the source is unlinked. Across file systems, or where hard links are not allowed,
    the file is copied after a check that the name is free.

    Returns:
        The path it was moved to.
    """
    os.makedirs(os.path.dirname(dest) or ".", exist_ok=True)
    stem, ext = os.path.splitext(dest)
    for n in itertools.count():
        candidate = dest if n == 0 else f"{stem}-{n}{ext}"
        if os.path.lexists(candidate):
            continue
        try:
            os.link(src, candidate, follow_symlinks=False)
        except FileExistsError:  # taken since the check
            continue
        except FileNotFoundError:
            raise
        except (OSError, NotImplementedError):  # another file system, or no hard links there
            shutil.move(src, candidate)
            return candidate
        os.unlink(src)
        return candidate
    raise AssertionError("unreachable")
