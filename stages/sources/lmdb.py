"""An LMDB archive of encoded images, as written by ``wanwu pack``."""

from __future__ import annotations

import logging
import os
import threading
from typing import Any, Iterator

from wanwu.errors import ConfigError, ReadError
from wanwu.stages.sources.base import Source, SourceItem
from wanwu.stages.sources.files import check_size

logger = logging.getLogger(__name__)

# Read-only with lock=False uses no reader table, so this only needs to be large
# enough that LMDB never refuses a reader; it costs nothing.
_MAX_READERS = 4096


class LmdbSource(Source):
    """Every key/value of an LMDB environment, in key order.

    ``location`` is a folder holding ``data.mdb`` or a single ``.mdb``/``.lmdb``
    file. The environment is opened read-only and without locking, lazily, in the
    process that first uses it; pickling drops it, so a source can be built in one
    process and used in another (each opens its own). Sources naming the same
    archive in one process share one environment.

    Items: ``key`` is the LMDB key as UTF-8 text, ``source`` the archive as given,
    ``locator`` the key again (with undecodable bytes kept as surrogates, so
    ``read()`` finds the exact bytes).
    """

    kind = "lmdb"

    def __init__(self, location: str) -> None:
        super().__init__(location)
        self._env: Any = None  # lmdb.Environment, opened on first use
        self._shared_key: tuple[int, str] | None = None  # its entry in _shared

    def __getstate__(self) -> dict[str, Any]:
        # An open environment must not cross processes; the receiver reopens it.
        state = self.__dict__.copy()
        state["_env"] = state["_shared_key"] = None
        return state

    def scan(self) -> Iterator[SourceItem]:
        """Yield every key once, in LMDB's (byte-wise) key order, without reading values.

        Raises:
            ConfigError: the archive cannot be opened.
        """
        return self._scan_range(None, None)

    def _scan_range(self, start: str | None, stop: str | None) -> Iterator[SourceItem]:
        """Positions are the keys (as locators): a shard's cursor starts at its first key."""
        env = self._open()
        end = None if stop is None else stop.encode("utf-8", "surrogateescape")
        with env.begin(buffers=False) as txn:
            cursor = txn.cursor()
            if start is not None and not cursor.set_range(start.encode("utf-8", "surrogateescape")):
                return
            for raw in cursor.iternext(keys=True, values=False):
                if end is not None and raw >= end:
                    return
                locator = raw.decode("utf-8", "surrogateescape")
                try:
                    key = raw.decode("utf-8")
                except UnicodeDecodeError:
                    key = raw.decode("utf-8", "backslashreplace")
                yield SourceItem(key=key, source=self.location, locator=locator, position=locator)

    def read(self, item: SourceItem, max_bytes: int | None = None) -> bytes:
        """A copy of the value stored under ``item.locator``.

        Raises:
            ReadError: the key is not in the archive, or its value is empty or larger
                than ``max_bytes`` (then it is not copied).
        """
        env = self._open()
        with env.begin(buffers=True) as txn:  # a view into the map: measured before it is copied
            view = txn.get(item.locator.encode("utf-8", "surrogateescape"))
            if view is None:
                raise ReadError(f"cannot read {item.key!r}: no such key in {self.location!r}")
            if not len(view):
                raise ReadError(f"{item.key!r} in {self.location!r} is empty (0 bytes)")
            check_size(f"{self.location}:{item.key}", len(view), max_bytes)
            return bytes(view)

    def _open(self) -> Any:
        if self._env is None:
            self._shared_key, self._env = _acquire(self.location)
            self._closed = False
        return self._env

    def _shutdown(self) -> None:
        if self._env is not None:
            _release(self._shared_key)
            self._env = None


# py-lmdb refuses to open one environment twice in a process, yet two sources may
# name the same archive (the same input given twice, a clone in a thread). They
# share one environment, closed when its last user shuts down. Keyed by process
# id too: a forked child must never use its parent's environment.
_shared: dict[tuple[int, str], list[Any]] = {}  # (pid, real path) -> [environment, users]
_shared_lock = threading.Lock()


def _acquire(location: str) -> tuple[tuple[int, str], Any]:
    import lmdb

    if not os.path.exists(location):
        raise ConfigError(f"expected an LMDB archive, {location!r} does not exist")
    key = (os.getpid(), os.path.realpath(location))
    with _shared_lock:
        entry = _shared.get(key)
        if entry is None:
            try:
                env = lmdb.open(
                    location,
                    subdir=os.path.isdir(location),
                    readonly=True,
                    lock=False,
                    readahead=False,  # random reads of many values; readahead wastes I/O
                    max_readers=_MAX_READERS,
                )
            except lmdb.Error as exc:
                raise ConfigError(f"expected an LMDB archive, got {location!r}: {exc}") from exc
            entry = _shared[key] = [env, 0]
        entry[1] += 1
        return key, entry[0]


def _release(key: tuple[int, str] | None) -> None:
    with _shared_lock:
        entry = _shared.get(key)
        if entry is not None:
            entry[1] -= 1
            if entry[1] <= 0:
                entry[0].close()
                del _shared[key]
