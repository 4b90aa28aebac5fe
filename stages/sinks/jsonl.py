"""Records as JSON Lines: one UTF-8 JSON object per line, appended."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import stat
import tempfile
from typing import IO, Iterable, Iterator

from wanwu.errors import SinkError
from wanwu.stages.sinks.base import STDOUT, Record, Sink, Writable, check_still_there, is_stream
from wanwu.stages.sinks.records import dumps, normalise, unique_new

logger = logging.getLogger(__name__)


class JsonlSink(Sink):
    """Appends records to a ``.jsonl`` file, which is also the resume ledger.

    Each record is one line: the fields of ``RECORD_FIELDS`` in that order,
    non-ASCII text unescaped. ``open()`` takes an exclusive lock on the file (a
    second job writing the same output fails with ``SinkError``), cuts off what a
    crash left after the last whole, valid line, and returns the keys in the file.
    ``write()`` skips keys already in the file and appends the rest with one
    ``write`` to the OS before returning, so they survive ``kill -9``; with
    ``fsync=True`` they are also forced to disk (they survive power loss).

    A stream (``is_stream``: ``-``, a named pipe, ``/dev/null``) is no ledger: ``open()``
    returns no keys and only checks that it may be written; the stream itself is opened at
    the first ``write()``, in the process that writes. A job that opens its output to read
    the ledger and closes it again would otherwise hand a pipe's reader an early end of file.

    Not thread-safe: call from one thread at a time.
    """

    kind = "jsonl"

    def __init__(self, path: str, fsync: bool = False) -> None:
        super().__init__(path)
        self.fsync = fsync  # fsync after every write(): survives power loss, costs a disk flush
        self._file: IO[bytes] | None = None  # unbuffered, append-only; set by open()
        self._keys: set[str] | None = set()  # keys in the file; None without a ledger
        self._size = 0  # bytes of whole, valid lines: where a failed write is cut back to
        self._broken: str | None = None  # why writing is no longer safe, if it is not
        self._stream: str | None = None  # what a stream output opens at the first write()

    def open(self, ledger: bool = True) -> set[str]:
        """Create the file or repair it; lock it; return the keys it holds (none without ``ledger``).

        Raises:
            SinkError: the file cannot be created or locked, or a line before the
                last valid one is not a record (corruption this sink did not cause).
        """
        if self._file is not None:
            return set(self._keys or ())
        if is_stream(self.path):
            return self._open_stream()
        directory = os.path.dirname(os.path.abspath(self.path))
        try:
            os.makedirs(directory, exist_ok=True)
            existed = os.path.exists(self.path)
            # buffering=0: each write() goes straight to the OS, nothing lingers in
            # a Python buffer that a kill would lose or a cut-back would miss.
            handle = open(self.path, "ab", buffering=0)
        except OSError as exc:
            raise SinkError(f"cannot open {self.path!r} for writing: {exc}") from exc
        try:
            _lock(handle, self.path)
            keys, good_end, self.prior_errors = _read_ledger(self.path, ledger)
            size = os.fstat(handle.fileno()).st_size
            if good_end < size:
                logger.warning(
                    "%s: dropping %d bytes after the last whole record (left by a crash)",
                    self.path, size - good_end,
                )
                os.ftruncate(handle.fileno(), good_end)
                os.fsync(handle.fileno())
            if self.fsync and not existed:
                _fsync_dir(directory)
        except OSError as exc:
            handle.close()
            raise SinkError(f"cannot repair {self.path!r}: {exc}") from exc
        except SinkError:
            handle.close()
            raise
        self._file, self._keys, self._size = handle, keys, good_end
        return set(keys or ())

    def write(self, records: Iterable[Writable]) -> None:
        """Append the records whose key is not yet in the file (first one per key wins;
        without a ledger, only repeats within ``records`` are dropped).

        When this returns, the records are in the OS (and on disk if ``fsync``).

        Raises:
            SinkError: before ``open()``, on a record that cannot be serialised, or
                when the OS refuses the write (the file is cut back to its last
                whole record first, so a later ``open()`` finds it consistent).
        """
        if self._file is None and self._stream and not self._broken:
            try:
                self._file = open(self._stream, "ab", buffering=0)
            except OSError as exc:
                raise SinkError(f"cannot open {self.path!r} for writing: {exc}") from exc
        if self._file is None or self._broken:
            raise SinkError(f"cannot write to {self.path!r}: {self._broken or 'open() it first'}")
        if not self._stream:
            mine = os.fstat(self._file.fileno())
            check_still_there(self.path, (mine.st_dev, mine.st_ino))
        batch = unique_new(records, self._keys if self._keys is not None else set())
        if not batch:
            return
        try:
            data = "".join(dumps(record) + "\n" for record in batch).encode("utf-8")
        except (TypeError, ValueError) as exc:
            raise SinkError(f"cannot serialise records for {self.path!r}: {exc}") from exc
        try:
            _write_all(self._file, data)
            if self.fsync and not self._stream:  # a pipe has no disk to force
                os.fsync(self._file.fileno())
        except OSError as exc:
            if self._stream:  # what a reader took cannot be taken back
                self._broken = f"a write failed ({exc})"
            else:
                self._cut_back(self._file.fileno())
            reader_gone = " (its reader went away)" if isinstance(exc, BrokenPipeError) else ""
            raise SinkError(f"cannot write {len(batch)} records to {self.path!r}{reader_gone}: {exc}") from exc
        self._size += len(data)
        if self._keys is not None:
            self._keys.update(record["key"] for record in batch)

    def drop_errors(self) -> int:
        """Rewrite the file without its error records (a stream has none to drop).

        The other lines are copied as they are into a new file beside it, which then takes its
        place in one rename: a crash leaves the old file or the new one, both whole. Streams
        through the file: memory stays flat however large it is.

        Raises:
            SinkError: after ``open()``; the file cannot be read, written or replaced; or it
                is corrupt before its last record.
        """
        if self._file is not None or self._stream:
            raise SinkError(f"cannot drop the error records of {self.path!r} once it is open")
        if is_stream(self.path) or not os.path.exists(self.path):
            return 0
        target = os.path.realpath(self.path)  # a symlink keeps pointing at the output
        directory = os.path.dirname(target)
        dropped = 0
        try:
            with open(target, "rb") as old:
                _lock(old, self.path)  # no job may append to it meanwhile
                fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(target)}.", suffix=".retry", dir=directory)
                try:
                    with os.fdopen(fd, "wb") as new:
                        for record, _, line in _records(old, self.path):
                            if record.get("error") is None:
                                new.write(line)
                            else:
                                dropped += 1
                        new.flush()
                        os.fsync(new.fileno())
                        os.chmod(tmp, stat.S_IMODE(os.fstat(old.fileno()).st_mode))
                    if dropped:
                        os.replace(tmp, target)
                        _fsync_dir(directory)
                finally:
                    if os.path.exists(tmp):
                        os.unlink(tmp)
        except OSError as exc:
            raise SinkError(f"cannot drop the error records of {self.path!r}: {exc}") from exc
        return dropped

    def _open_stream(self) -> set[str]:
        """No ledger, no lock (two jobs may both write to /dev/null); only a check that the
        stream can be written, so that a job is refused before it starts rather than at its
        first record."""
        target = "/dev/stdout" if self.path == STDOUT else self.path
        if not os.access(target, os.W_OK):
            raise SinkError(f"cannot open {self.path!r} for writing: permission denied")
        self._stream, self._keys, self.prior_errors = target, None, 0
        return set()

    def _cut_back(self, fd: int) -> None:
        """Remove a partly written batch so the file ends with a whole record."""
        try:
            os.ftruncate(fd, self._size)
        except OSError as exc:
            self._broken = f"a failed write could not be cut back ({exc}); reopen to repair"

    def _shutdown(self) -> None:
        if self._file is not None:
            try:
                if self.fsync and not self._stream:  # a pipe has no disk to force
                    os.fsync(self._file.fileno())
            finally:
                self._file.close()  # also releases the lock
                self._file = None

    @classmethod
    def read_records(cls, path: str) -> list[Record]:
        """Every whole record in ``path`` (``-``: standard input), in file order; a torn last
        line is ignored.

        Raises:
            SinkError: the file cannot be read or is corrupt before its last record.
        """
        try:
            with open("/dev/stdin" if path == STDOUT else path, "rb") as lines:
                return [normalise(record) for record, _, _ in _records(lines, path)]
        except OSError as exc:
            raise SinkError(f"cannot read {path!r}: {exc}") from exc


def _read_ledger(path: str, ledger: bool = True) -> tuple[set[str] | None, int, int]:
    """The keys in ``path`` (None without ``ledger``), how many are errors, and the offset after
    its last whole, valid record."""
    keys: set[str] = set()
    good_end = errors = 0
    with open(path, "rb") as lines:
        for record, good_end, _ in _records(lines, path):
            if record.get("error") is not None and (not ledger or record["key"] not in keys):
                errors += 1
            if ledger:
                keys.add(record["key"])
    return (keys if ledger else None), good_end, errors


def _records(lines: IO[bytes], path: str) -> Iterator[tuple[Record, int, bytes]]:
    """Each valid record with the offset just after its line, and the line.

    A crash can leave only a tail that is not a whole record: a line without its
    newline, or (after a power loss) junk lines. Those are skipped here and cut off
    by ``open()``. A bad line followed by a good one is not crash damage.
    """
    offset = 0
    bad_line = 0  # number of the first bad line since the last good one
    for number, line in enumerate(lines, 1):
        offset += len(line)
        if not line.strip():
            continue  # a blank line holds nothing, and losing it loses nothing
        record = _parse(line) if line.endswith(b"\n") else None
        if record is None:
            bad_line = bad_line or number
            continue
        if bad_line:
            raise SinkError(
                f"{path}: line {bad_line} is not a JSON record but later lines are; "
                "expected damage only at the end of the file; fix or remove that line"
            )
        yield record, offset, line


def _parse(line: bytes) -> Record | None:
    try:
        record = json.loads(line)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError are both ValueErrors
        return None
    if isinstance(record, dict) and isinstance(record.get("key"), str):
        return record
    return None


def _lock(handle: IO[bytes], path: str) -> None:
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        raise SinkError(f"{path!r} is being written by another process") from exc


def _write_all(handle: IO[bytes], data: bytes) -> None:
    # One write() normally takes everything; the loop covers the OS taking less
    # (a signal, a nearly full disk) rather than silently dropping the rest.
    view = memoryview(data)
    while view:
        written = handle.write(view)
        if not written:
            raise OSError(f"the OS accepted 0 of {len(view)} bytes")
        view = view[written:]


def _fsync_dir(directory: str) -> None:
    """Make a new file's name durable, not just its content."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
