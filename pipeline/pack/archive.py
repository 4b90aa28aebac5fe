"""Writing a new LMDB archive: checking its place, filling it in batches, moving it in."""

from __future__ import annotations

import logging
import os

import lmdb

from wanwu.errors import ConfigError, StageError

logger = logging.getLogger(__name__)

ARCHIVE_FILES = frozenset({"data.mdb", "lock.mdb"})  # what an LMDB folder holds


class ArchiveWriter:
    """The only writer of a new LMDB environment at ``path``.

    ``put_batch`` stores a batch in one transaction; ``close`` syncs it to disk.
    No lock file and no sync per commit: nothing else may open the environment
    while it is written (pack builds it under a staging name), and a crash leaves
    only that staging copy to delete. Not thread-safe.
    """

    def __init__(self, path: str, subdir: bool, map_size_bytes: int) -> None:
        self.path = path
        self._env = lmdb.open(
            path, subdir=subdir, map_size=map_size_bytes, lock=False, sync=False,
            metasync=False, readahead=False, mode=0o644,
        )
        self.max_key_bytes = self._env.max_key_size()  # longer keys are refused by LMDB

    def put_batch(self, batch: list[tuple[bytes, bytes]]) -> list[bool]:
        """Store ``batch`` in one transaction; for each item, False if its key was already stored.

        A stored key keeps its first value. When the map is full, it doubles and
        the whole batch is retried (the failed transaction stored nothing).

        Raises:
            StageError: the disk refused the write (full, failing): the message says where.
        """
        if not batch:
            return []
        while True:
            try:
                with self._env.begin(write=True) as txn:
                    return [txn.put(key, value, overwrite=False) for key, value in batch]
            except lmdb.MapFullError:
                size = self._env.info()["map_size"] * 2
                logger.info("%s is full; growing its map to %d bytes", self.path, size)
                self._env.set_mapsize(size)
            except lmdb.Error as exc:  # LMDB reports a full disk as ENOSPC or, from its commit, EIO
                raise StageError(f"cannot write the archive at {self.path!r} (is its disk full?): {exc}") from exc

    def close(self, sync: bool = True) -> None:
        """Flush everything to disk (unless ``sync`` is False) and close. Safe to call twice."""
        if self._env is not None:
            try:
                if sync:
                    self._env.sync(True)
            except lmdb.Error as exc:
                raise StageError(f"cannot write the archive at {self.path!r} (is its disk full?): {exc}") from exc
            finally:
                self._env.close()
                self._env = None


def check_output(out: str, overwrite: bool) -> None:
    """Refuse an existing ``out`` unless ``overwrite``; never plan to delete other files."""
    if not os.path.lexists(out):
        return
    if os.path.isdir(out) and not os.path.islink(out):
        entries = set(os.listdir(out))
        if not entries:
            return  # an empty folder made ready for the archive
        if not entries <= ARCHIVE_FILES:
            raise ConfigError(
                f"expected a new path or an LMDB archive for the output, "
                f"{out!r} is a folder holding {sorted(entries)[:5]}"
            )
    if not overwrite:
        raise ConfigError(f"{out!r} already exists; pass overwrite=True to replace it")


def publish(env_path: str, out: str, overwrite: bool) -> None:
    """Move the finished archive to ``out``, removing what ``check_output`` allowed."""
    check_output(out, overwrite)  # again: out may have appeared while packing
    if os.path.isdir(out) and not os.path.islink(out):
        for name in ARCHIVE_FILES & set(os.listdir(out)):
            os.remove(os.path.join(out, name))
        os.rmdir(out)
    elif os.path.lexists(out):
        os.remove(out)
    os.rename(env_path, out)
