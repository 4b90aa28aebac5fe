"""Sinks write records and double as the resume ledger.

Sinks take ``wanwu.records.Record`` objects, or plain dicts with the same fields
(``key``, ``source``, ``width``, ``height``, ``labels``, ``model``, ``elapsed_ms``,
``error``), and read records back as plain dicts.

Contract: ``open()`` repairs what a crash may have left (a torn last line, a
half-written transaction) and returns the keys already written; after
``write(records)`` returns, those records survive a ``kill -9`` of the process.
The output file itself is the ledger: a key is done once its record is in it.
``open(ledger=False)`` is for outputs that are logs rather than ledgers (an
endless stream's): it returns no keys and holds none in memory, so memory stays
bounded however long the stream runs.

An output that is not a regular file (``-`` for standard output, a named pipe,
``/dev/stdout``, ``/dev/null``) cannot be read back, so it is never a ledger: it
gets JSON Lines, and a job writing to it does not resume (``is_stream``).
"""

from __future__ import annotations

import os
import stat
from abc import ABC, abstractmethod
from typing import Any, ClassVar, Iterable

from wanwu.errors import ConfigError, SinkError
from wanwu.records import RECORD_FIELDS, Record as RecordObject
from wanwu.registry import Registry

Record = dict[str, Any]  # a record as sinks read it back
Writable = RecordObject | Record  # what sinks take

__all__ = ["RECORD_FIELDS", "Record", "SINKS", "Sink", "Writable", "check_still_there", "create_sink", "is_stream",
           "read_records", "sink_kind"]


class Sink(ABC):
    """Base of every sink."""

    kind: ClassVar[str] = "base"

    def __init__(self, path: str) -> None:
        self.path = path
        self.prior_errors = 0  # error records already in the output, counted by open()
        self._closed = False

    @abstractmethod
    def open(self, ledger: bool = True) -> set[str]:
        """Create or repair the output; set ``prior_errors``; return the keys it already holds
        (none with ``ledger=False``, which also stops this sink from holding keys in memory)."""

    @abstractmethod
    def write(self, records: Iterable[Writable]) -> None:
        """Append records durably (flushed to the OS before returning)."""

    @abstractmethod
    def drop_errors(self) -> int:
        """Remove the error records from the output, before ``open()``, so that a resumed job
        tries their inputs again (``wanwu run --retry-errors``); return how many were removed.
        All or nothing: a crash leaves the output as it was or without every error record."""

    def shutdown(self) -> None:
        """Flush and close the output. Safe to call twice."""
        if not self._closed:
            self._closed = True
            self._shutdown()

    def _shutdown(self) -> None:
        """Hook for subclasses holding resources."""

    @classmethod
    @abstractmethod
    def read_records(cls, path: str) -> list[Record]:
        """Every record in ``path`` (for tests, tools and `wanwu` summaries)."""


SINKS: Registry[Sink] = Registry("sink")
SINKS.register("jsonl", "wanwu.stages.sinks.jsonl:JsonlSink")
SINKS.register("sqlite", "wanwu.stages.sinks.sqlite:SqliteSink")


STDOUT = "-"  # the output path that means standard output
SQLITE_SUFFIXES = (".sqlite", ".sqlite3", ".db")


def is_stream(path: str) -> bool:
    """True for an output that can be written but not read back as a ledger: ``-`` (standard
    output), or an existing path that is neither a regular file nor a folder (a named pipe, a
    terminal, ``/dev/null``), symbolic links followed."""
    if path == STDOUT:
        return True
    try:
        mode = os.stat(path).st_mode
    except OSError:  # not there yet (it will be a regular file), or unreachable (open() says why)
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


def sink_kind(path: str) -> str:
    """``jsonl`` for ``.jsonl``/``.ndjson``/``.json`` and for streams (``is_stream``), ``sqlite`` for
    ``.sqlite``/``.db``/``.sqlite3``."""
    lower = path.lower()
    if is_stream(path):
        if lower.endswith(SQLITE_SUFFIXES):
            raise ConfigError(f"expected a regular file for an SQLite output, got {path!r}, which is not one "
                              "(a pipe or device takes JSON Lines: name it .jsonl, or use '-' for stdout)")
        return "jsonl"
    if lower.endswith((".jsonl", ".ndjson", ".json")):
        return "jsonl"
    if lower.endswith(SQLITE_SUFFIXES):
        return "sqlite"
    raise ConfigError(f"expected an output ending in .jsonl or .sqlite, or '-' for stdout, got {path!r}")


def check_still_there(path: str, identity: tuple[int, int]) -> None:
    """Raise ``SinkError`` unless ``path`` is still the file of ``identity`` (st_dev, st_ino).

    An output removed or replaced while a job writes it (a cleanup script, a log rotation)
    would take every later record with it, silently: the job would end "finished" with
    nothing at its path.
    """
    try:
        now = os.stat(path)
    except FileNotFoundError:
        what = "removed"
    else:
        if (now.st_dev, now.st_ino) == identity:
            return
        what = "replaced by another file"
    raise SinkError(f"expected {path!r} to stay this job's output, but it was {what} while the job ran: "
                    "what it wrote is no longer there; run the job again to write those records")


def create_sink(path: str) -> Sink:
    """The sink for an output path, chosen by its extension."""
    return SINKS.create(sink_kind(path), path)


def read_records(path: str) -> list[Record]:
    """Every record in the output at ``path``."""
    return SINKS.get(sink_kind(path)).read_records(path)
