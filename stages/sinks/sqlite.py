"""Records in an SQLite database: table ``results``, one row per key."""

from __future__ import annotations

import json
import logging
import os
import sqlite3
from typing import Any, Iterable

from wanwu.errors import SinkError
from wanwu.stages.sinks.base import RECORD_FIELDS, Record, Sink, Writable, check_still_there
from wanwu.stages.sinks.records import dumps, top_label, unique_new

logger = logging.getLogger(__name__)

# labels and error hold JSON text (non-ASCII unescaped); top_label is the best
# label, kept in its own column so it can be queried and indexed without JSON.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS results (
    key TEXT NOT NULL UNIQUE,
    source TEXT,
    width INTEGER,
    height INTEGER,
    labels TEXT,
    model TEXT,
    elapsed_ms REAL,
    error TEXT,
    top_label TEXT,
    cached INTEGER,
    frame TEXT
)"""
_COLUMNS = (*RECORD_FIELDS, "top_label", "cached", "frame")
_REQUIRED = (*RECORD_FIELDS, "top_label")  # outputs written before the cache or video lack "cached", "frame"
_ADDED = (("cached", "INTEGER"), ("frame", "TEXT"))  # columns added since, filled in on open
_INSERT = (
    f"INSERT OR IGNORE INTO results ({', '.join(_COLUMNS)}) "
    f"VALUES ({', '.join('?' for _ in _COLUMNS)})"
)
_BUSY_TIMEOUT_S = 30.0  # how long to wait for a reader or another writer to let go


class SqliteSink(Sink):
    """Writes records into ``results``, which is also the resume ledger.

    The database runs in WAL mode with ``synchronous=NORMAL``: a committed
    ``write()`` survives ``kill -9`` of the process, and a crash mid-transaction
    is rolled back by SQLite when the file is next opened. ``fsync=True`` uses
    ``synchronous=FULL`` so commits also survive power loss. The first record for
    a key wins (``INSERT OR IGNORE`` on the unique ``key``).

    Not thread-safe: call from one thread at a time.
    """

    kind = "sqlite"

    def __init__(self, path: str, fsync: bool = False) -> None:
        super().__init__(path)
        self.fsync = fsync  # synchronous=FULL: every commit reaches the disk
        self._conn: sqlite3.Connection | None = None  # set by open()
        self._identity = (0, 0)  # (st_dev, st_ino) of the database file, at open()

    def open(self, ledger: bool = True) -> set[str]:
        """Create or reopen the database; return the keys it holds (none without ``ledger``).

        Raises:
            SinkError: the file is not an SQLite database, or its ``results`` table
                lacks the expected columns.
        """
        if self._conn is None:
            directory = os.path.dirname(os.path.abspath(self.path))
            try:
                os.makedirs(directory, exist_ok=True)
            except OSError as exc:
                raise SinkError(f"cannot create the folder for {self.path!r}: {exc}") from exc
            if not os.path.exists(self.path):
                _create(self.path)
            conn = _connect(self.path)
            try:
                _prepare(conn, self.path, self.fsync)
                opened = os.stat(self.path)
            except OSError as exc:
                conn.close()
                raise SinkError(f"cannot open {self.path!r}: {exc}") from exc
            except SinkError:
                conn.close()
                raise
            self._conn, self._identity = conn, (opened.st_dev, opened.st_ino)
        self.prior_errors = _count_errors(self._conn, self.path)
        return _keys(self._conn, self.path) if ledger else set()

    def write(self, records: Iterable[Writable]) -> None:
        """Insert the records in one transaction; keys already present are ignored.

        When this returns, the transaction is committed.

        Raises:
            SinkError: before ``open()``, or when SQLite refuses (nothing of this
                batch is then written).
        """
        if self._conn is None:
            raise SinkError(f"cannot write to {self.path!r}: open() it first")
        check_still_there(self.path, self._identity)
        # The database ignores keys it holds; unique_new only drops repeats within
        # this batch, so no set of millions of keys is kept in memory.
        try:
            rows = [_row(record) for record in unique_new(records, set())]
        except (TypeError, ValueError) as exc:
            raise SinkError(f"cannot serialise records for {self.path!r}: {exc}") from exc
        if not rows:
            return
        try:
            self._conn.execute("BEGIN IMMEDIATE")
            self._conn.executemany(_INSERT, rows)
            self._conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
            raise SinkError(f"cannot write {len(rows)} records to {self.path!r}: {exc}") from exc

    def drop_errors(self) -> int:
        """Delete the error records in one statement, which SQLite runs as one transaction (none
        when there is no database yet).

        Raises:
            SinkError: the file is not a wanwu database, or SQLite refuses.
        """
        if not os.path.exists(self.path):
            return 0
        self.open(ledger=False)
        assert self._conn is not None
        try:
            return self._conn.execute("DELETE FROM results WHERE error IS NOT NULL").rowcount
        except sqlite3.Error as exc:
            raise SinkError(f"cannot drop the error records of {self.path!r}: {exc}") from exc

    def _shutdown(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    @classmethod
    def read_records(cls, path: str) -> list[Record]:
        """Every record, in the order written, with ``labels``/``error`` parsed back.

        The dicts equal those the JSONL sink reads back for the same records.

        Raises:
            SinkError: ``path`` does not exist or is not a wanwu SQLite output.
        """
        if not os.path.isfile(path):
            raise SinkError(f"expected an SQLite output, {path!r} does not exist")
        conn = _connect(path)
        try:
            present = {row[1] for row in conn.execute("PRAGMA table_info(results)")}
            extra = [name for name, _ in _ADDED if name in present]
            query = f"SELECT {', '.join((*RECORD_FIELDS, *extra))} FROM results ORDER BY rowid"
            rows = conn.execute(query).fetchall()
        except sqlite3.Error as exc:
            raise SinkError(f"cannot read records from {path!r}: {exc}") from exc
        finally:
            conn.close()
        records = []
        for row in rows:
            record = dict(zip(RECORD_FIELDS, row))
            for name in ("labels", "error"):
                if record[name] is not None:
                    record[name] = json.loads(record[name])
            more = dict(zip(extra, row[len(RECORD_FIELDS):]))
            if more.get("cached"):
                record["cached"] = True
            if more.get("frame") is not None:
                record["frame"] = json.loads(more["frame"])
            records.append(record)
        return records


def _connect(path: str) -> sqlite3.Connection:
    try:
        # isolation_level=None: transactions are begun and committed explicitly, so
        # one write() is exactly one transaction. check_same_thread=False lets the
        # pipeline hand the sink to its writer thread after open().
        return sqlite3.connect(
            path, timeout=_BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
        )
    except sqlite3.Error as exc:
        raise SinkError(f"cannot open {path!r} as an SQLite output: {exc}") from exc


def _create(path: str) -> None:
    """Create the output with its table under a temporary name, then link it into place.

    SQLite creates an empty file at ``connect`` and the table only later, so a reader
    (``wanwu show``, a dashboard, a test) that opened the output in between saw a database
    without ``results``. Linked into place whole, the output either does not exist yet or
    has its table. ``link`` (not ``rename``) never replaces an output another process
    created meanwhile: then that one is used.
    """
    tmp = f"{path}.{os.getpid()}.creating"
    conn = _connect(tmp)
    try:
        _prepare(conn, path, fsync=False)
    finally:
        conn.close()  # the last connection checkpoints the WAL into the file
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass
    except OSError as exc:  # no hard links on this file system: open() creates it in place
        logger.debug("cannot link %s into place (%s); creating it in place", path, exc)
    finally:
        for name in (tmp, f"{tmp}-wal", f"{tmp}-shm"):
            try:
                os.unlink(name)
            except FileNotFoundError:
                pass


def _prepare(conn: sqlite3.Connection, path: str, fsync: bool) -> None:
    """Set the journal and sync modes, create the table, check an existing one."""
    try:
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            logger.warning("%s: journal_mode is %s, expected wal", path, mode)
        conn.execute(f"PRAGMA synchronous={'FULL' if fsync else 'NORMAL'}")
        conn.execute(_SCHEMA)
        _check_columns(conn, path)
        present = {row[1] for row in conn.execute("PRAGMA table_info(results)")}
        for name, kind in _ADDED:
            if name not in present:
                conn.execute(f"ALTER TABLE results ADD COLUMN {name} {kind}")
    except sqlite3.Error as exc:
        raise SinkError(f"cannot open {path!r} as an SQLite output: {exc}") from exc


def _check_columns(conn: sqlite3.Connection, path: str) -> None:
    present = {row[1] for row in conn.execute("PRAGMA table_info(results)")}
    missing = [name for name in _REQUIRED if name not in present]
    if missing:
        raise SinkError(
            f"{path}: table 'results' lacks columns {missing}; expected a wanwu output "
            f"with columns {list(_COLUMNS)}"
        )


def _keys(conn: sqlite3.Connection, path: str) -> set[str]:
    try:
        return {row[0] for row in conn.execute("SELECT key FROM results")}
    except sqlite3.Error as exc:
        raise SinkError(f"cannot read keys from {path!r}: {exc}") from exc


def _count_errors(conn: sqlite3.Connection, path: str) -> int:
    try:
        return conn.execute("SELECT COUNT(*) FROM results WHERE error IS NOT NULL").fetchone()[0]
    except sqlite3.Error as exc:
        raise SinkError(f"cannot count error records in {path!r}: {exc}") from exc


def _row(record: Record) -> tuple[Any, ...]:
    labels, error = record["labels"], record["error"]
    return (
        record["key"],
        record["source"],
        record["width"],
        record["height"],
        None if labels is None else dumps(labels),
        record["model"],
        record["elapsed_ms"],
        None if error is None else dumps(error),
        top_label(labels),
        1 if record.get("cached") else None,
        None if record.get("frame") is None else dumps(record["frame"]),
    )
