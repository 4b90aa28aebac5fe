"""Both sinks driven by hand over real files: round trips, resume, repair, kill -9."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from wanwu.errors import ConfigError, SinkError
from wanwu.stages.sinks.base import RECORD_FIELDS, SINKS, Sink, create_sink, read_records
from wanwu.stages.sinks.jsonl import JsonlSink
from wanwu.stages.sinks.sqlite import SqliteSink

KINDS = ["jsonl", "sqlite"]


def record(key: str, label: str = "虎斑猫", score: float = 0.75) -> dict:
    return {
        "key": key, "source": "照片 photos", "width": 451, "height": 300,
        "labels": [
            {"label": label, "label_en": "tabby", "class_id": 281, "score": score},
            {"label": "埃及猫", "label_en": "Egyptian cat", "class_id": 285, "score": 0.125},
        ],
        "model": "efficientnet_lite0", "elapsed_ms": 12.5, "error": None,
    }


def error_record(key: str) -> dict:
    return {
        "key": key, "source": "photos", "width": None, "height": None, "labels": [],
        "model": "efficientnet_lite0", "elapsed_ms": 0.5,
        "error": {"type": "DecodeError", "message": "不是图片: expected an image, got 12 bytes"},
    }


def out_path(tmp_path: Path, kind: str) -> Path:
    return tmp_path / ("results.jsonl" if kind == "jsonl" else "results.sqlite")


def opened(path: Path) -> tuple[Sink, set[str]]:
    sink = create_sink(str(path))
    return sink, sink.open()


def test_registry_builds_both_kinds() -> None:
    assert SINKS.names() == KINDS
    for name in KINDS:
        assert SINKS.get(name).kind == name


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_keeps_fields_order_and_types(tmp_path: Path, kind: str) -> None:
    path = out_path(tmp_path, kind)
    sink, done = opened(path)
    assert done == set()
    written = [record("猫 chelsea.jpg"), error_record("子目录/坏.jpg"), record("c.jpg", "咖啡")]
    sink.write(written)
    sink.shutdown()
    sink.shutdown()  # safe twice
    back = read_records(str(path))
    assert back == written
    assert all(list(r) == list(RECORD_FIELDS) for r in back)


@pytest.mark.parametrize("kind", KINDS)
def test_numpy_values_and_missing_fields_are_normalised(tmp_path: Path, kind: str) -> None:
    path = out_path(tmp_path, kind)
    sink, _ = opened(path)
    rec = record("n.jpg", score=np.float32(0.5))
    rec["labels"][1]["class_id"] = np.int64(285)
    rec["width"], rec["elapsed_ms"] = np.int64(451), 3  # an int time comes back a float
    sink.write([rec, {"key": "bare.jpg", "extra": "dropped"}])
    sink.shutdown()
    back = read_records(str(path))
    assert back[0]["labels"][0]["score"] == 0.5 and back[0]["labels"][1]["class_id"] == 285
    assert back[0]["width"] == 451 and back[0]["elapsed_ms"] == 3.0
    assert type(back[0]["elapsed_ms"]) is float
    assert back[1] == dict.fromkeys(RECORD_FIELDS) | {"key": "bare.jpg"}


def test_jsonl_bytes_are_utf8_with_chinese_unescaped(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    sink, _ = opened(path)
    sink.write([record("猫.jpg")])
    sink.shutdown()
    raw = path.read_bytes()
    assert "虎斑猫".encode("utf-8") in raw and b"\\u" not in raw
    lines = raw.split(b"\n")
    assert lines[-1] == b"" and len(lines) == 2
    assert list(json.loads(lines[0])) == list(RECORD_FIELDS)


@pytest.mark.parametrize("kind", KINDS)
def test_reopen_returns_done_keys_and_never_doubles(tmp_path: Path, kind: str) -> None:
    path = out_path(tmp_path, kind)
    sink, _ = opened(path)
    sink.write([record("a.jpg"), record("b.jpg"), record("a.jpg", "重复")])  # repeat in a batch
    sink.write([record("b.jpg", "重复")])  # repeat across batches
    sink.shutdown()
    sink, done = opened(path)
    assert done == {"a.jpg", "b.jpg"}
    sink.write([record("a.jpg", "重复"), record("c.jpg")])  # repeat across runs
    sink.shutdown()
    back = read_records(str(path))
    assert [r["key"] for r in back] == ["a.jpg", "b.jpg", "c.jpg"]
    assert all(r["labels"][0]["label"] == "虎斑猫" for r in back)  # the first record wins


@pytest.mark.parametrize("kind", KINDS)
def test_drop_errors_leaves_the_other_records_as_they_were_and_their_keys_to_do(tmp_path: Path, kind: str) -> None:
    path = out_path(tmp_path, kind)
    sink = create_sink(str(path))
    assert sink.drop_errors() == 0 and not path.exists()  # no output yet: nothing to drop, nothing made
    sink, _ = opened(path)
    written = [record("a.jpg"), error_record("坏 b.jpg"), record("c.jpg"), error_record("d.jpg"), record("e.jpg")]
    sink.write(written[:3])
    sink.write(written[3:])
    sink.shutdown()
    before = path.read_bytes()
    sink = create_sink(str(path))
    assert sink.drop_errors() == 2
    sink.shutdown()
    assert read_records(str(path)) == [written[0], written[2], written[4]]
    if kind == "jsonl":  # the kept lines byte for byte, and no temporary file left beside them
        kept = [line for line in before.splitlines(keepends=True) if b'"error":null' in line]
        assert path.read_bytes() == b"".join(kept)
        assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]
    sink, done = opened(path)
    assert done == {"a.jpg", "c.jpg", "e.jpg"} and sink.prior_errors == 0
    if kind == "jsonl":
        with pytest.raises(SinkError, match="once it is open"):
            sink.drop_errors()
    sink.write([record("坏 b.jpg", "修好了")])  # its input, tried again
    sink.shutdown()
    assert [r["key"] for r in read_records(str(path))] == ["a.jpg", "c.jpg", "e.jpg", "坏 b.jpg"]
    assert create_sink(str(path)).drop_errors() == 0


def test_jsonl_drop_errors_through_a_symlink_rewrites_its_target(tmp_path: Path) -> None:
    real = tmp_path / "store" / "r.jsonl"
    real.parent.mkdir()
    sink, _ = opened(real)
    sink.write([record("a.jpg"), error_record("b.jpg")])
    sink.shutdown()
    link = tmp_path / "r.jsonl"
    link.symlink_to(real)
    assert create_sink(str(link)).drop_errors() == 1
    assert link.is_symlink() and [r["key"] for r in read_records(str(real))] == ["a.jpg"]


@pytest.mark.parametrize(
    "tail", [b'{"key": "torn.jpg", "source": "pho', b'{"key": "x.jpg"}', b"\x00" * 300 + b"\n"]
)
def test_jsonl_torn_tail_is_cut_off_on_open(tmp_path: Path, tail: bytes) -> None:
    path = tmp_path / "r.jsonl"
    sink, _ = opened(path)
    sink.write([record("a.jpg"), record("b.jpg")])
    sink.shutdown()
    good = path.read_bytes()
    with open(path, "ab") as f:
        f.write(tail)  # what a kill in the middle of a write (or a power cut) leaves
    assert [r["key"] for r in read_records(str(path))] == ["a.jpg", "b.jpg"]
    sink, done = opened(path)
    assert done == {"a.jpg", "b.jpg"}
    assert path.read_bytes() == good
    sink.write([record("c.jpg")])
    sink.shutdown()
    assert [r["key"] for r in read_records(str(path))] == ["a.jpg", "b.jpg", "c.jpg"]


def test_jsonl_damage_before_the_end_is_an_error_not_a_silent_cut(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    line = json.dumps(record("a.jpg"), ensure_ascii=False)
    path.write_text(f"{line}\nnot json\n{line.replace('a.jpg', 'b.jpg')}\n", encoding="utf-8")
    with pytest.raises(SinkError, match="line 2"):
        JsonlSink(str(path)).open()
    assert path.read_text(encoding="utf-8").count("\n") == 3  # nothing was cut


def test_jsonl_second_writer_is_refused(tmp_path: Path) -> None:
    first, _ = opened(tmp_path / "r.jsonl")
    with pytest.raises(SinkError, match="another process"):
        JsonlSink(str(tmp_path / "r.jsonl")).open()
    first.shutdown()
    JsonlSink(str(tmp_path / "r.jsonl")).open()


def test_jsonl_fsync_option(tmp_path: Path) -> None:
    sink = JsonlSink(str(tmp_path / "new" / "r.jsonl"), fsync=True)
    assert sink.open() == set()
    sink.write([record("a.jpg")])
    sink.shutdown()
    assert [r["key"] for r in JsonlSink.read_records(str(tmp_path / "new" / "r.jsonl"))] == ["a.jpg"]


@pytest.mark.parametrize("kind", KINDS)
def test_write_before_open_is_an_error(tmp_path: Path, kind: str) -> None:
    with pytest.raises(SinkError, match="open"):
        create_sink(str(out_path(tmp_path, kind))).write([record("a.jpg")])


def test_sqlite_is_wal_with_a_unique_key_and_a_top_label(tmp_path: Path) -> None:
    path = tmp_path / "r.sqlite"
    sink, _ = opened(path)
    sink.write([record("a.jpg"), error_record("bad.jpg")])
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        rows = dict(conn.execute("SELECT key, top_label FROM results"))
        assert rows == {"a.jpg": "虎斑猫", "bad.jpg": None}
        labels = conn.execute("SELECT labels FROM results WHERE key = 'a.jpg'").fetchone()[0]
        assert "虎斑猫" in labels  # JSON text, not escaped
        with pytest.raises(sqlite3.IntegrityError, match="UNIQUE"):
            conn.execute("INSERT INTO results (key) VALUES ('a.jpg')")
    finally:
        conn.close()
        sink.shutdown()


def test_sqlite_refuses_a_foreign_database(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE results (name TEXT)")
    conn.close()
    with pytest.raises(SinkError, match="lacks columns"):
        SqliteSink(str(path)).open()
    (tmp_path / "junk.sqlite").write_bytes(b"not a database at all" * 100)
    with pytest.raises(SinkError, match="SQLite"):
        SqliteSink(str(tmp_path / "junk.sqlite")).open()


NEW_OUTPUTS = textwrap.dedent("""
    import sys
    from wanwu.stages.sinks.sqlite import SqliteSink
    for i in range(int(sys.argv[2])):
        sink = SqliteSink(f"{sys.argv[1]}/{i}.sqlite")
        sink.open()
        sink.shutdown()
""")


def test_a_new_sqlite_output_is_never_seen_without_its_table(tmp_path: Path) -> None:
    # A reader (wanwu show, a dashboard) that opens an output the moment it appears must
    # find it empty, not "no such table": SQLite creates the file before the table, and
    # this reader saw that state for about half of the outputs before they were linked
    # into place whole.
    n = 200
    writer = subprocess.Popen([sys.executable, "-c", NEW_OUTPUTS, str(tmp_path), str(n)])
    try:
        for i in range(n):
            path = tmp_path / f"{i}.sqlite"
            while not path.exists():
                assert writer.poll() in (None, 0), "the writer failed"
            assert SqliteSink.read_records(str(path)) == []
    finally:
        writer.wait(60)
    assert writer.returncode == 0
    assert not list(tmp_path.glob("*.creating*"))  # no temporary file left behind


KILLED_WRITER = textwrap.dedent("""
    import os, signal, sys
    from wanwu.stages.sinks.base import create_sink
    sink = create_sink(sys.argv[1])
    sink.open()
    for batch in range(3):
        sink.write([{"key": f"{batch}-{i}.jpg", "labels": [{"label": "猫"}], "error": None}
                    for i in range(100)])
    os.kill(os.getpid(), signal.SIGKILL)  # no close(), no atexit, no flush of anything
""")


@pytest.mark.parametrize("kind", KINDS)
def test_records_survive_sigkill_right_after_write(tmp_path: Path, kind: str) -> None:
    path = out_path(tmp_path, kind)
    proc = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(path)], timeout=60)
    assert proc.returncode == -9
    sink, done = opened(path)
    assert done == {f"{b}-{i}.jpg" for b in range(3) for i in range(100)}
    sink.shutdown()
    assert len(read_records(str(path))) == 300


@pytest.mark.parametrize("kind", KINDS)
def test_open_counts_the_error_records_already_written(tmp_path: Path, kind: str) -> None:
    path = out_path(tmp_path, kind)
    sink, _ = opened(path)
    assert sink.prior_errors == 0
    sink.write([record("a.jpg"), error_record("b.jpg"), error_record("c.jpg"), error_record("b.jpg")])
    sink.shutdown()
    sink, done = opened(path)
    assert done == {"a.jpg", "b.jpg", "c.jpg"}
    assert sink.prior_errors == 2
    sink.shutdown()


@pytest.mark.parametrize("kind", KINDS)
def test_record_objects_are_written_as_their_fields(tmp_path: Path, kind: str) -> None:
    from wanwu.records import Record

    path = out_path(tmp_path, kind)
    sink, _ = opened(path)
    sink.write([Record("a.jpg", "photos", 451, 300, record("a.jpg")["labels"], "efficientnet_lite0", 12.5),
                Record.failure("b.jpg", "photos", "efficientnet_lite0", SinkError("x"), 0.0, now=0.5)])
    sink.shutdown()
    back = read_records(str(path))
    assert back[0] == record("a.jpg") | {"source": "photos"}
    assert back[1]["error"] == {"type": "SinkError", "message": "x"} and back[1]["elapsed_ms"] == 500.0


@pytest.mark.parametrize("kind", KINDS)
def test_without_a_ledger_no_keys_are_returned_or_held(tmp_path: Path, kind: str) -> None:
    path = out_path(tmp_path, kind)
    sink, _ = opened(path)
    sink.write([record("a.jpg"), error_record("b.jpg")])
    sink.shutdown()
    log = create_sink(str(path))
    assert log.open(ledger=False) == set() and log.prior_errors == 1
    if kind == "jsonl":
        assert log._keys is None  # an endless stream's log holds no set of keys in memory
    log.write([record("c.jpg"), record("c.jpg")])  # repeats within one write are still dropped
    log.shutdown()
    assert [r["key"] for r in read_records(str(path))] == ["a.jpg", "b.jpg", "c.jpg"]


def test_a_named_pipe_gets_its_records_whole_after_a_ledger_read(tmp_path):
    """A pipe is a stream: no ledger, no lock. The job's owner opens the output to read the ledger
    and closes it before the sink process opens it again; a pipe's reader must not see the end of
    the file in between, and must get every record."""
    import os
    import threading

    fifo = tmp_path / "records.pipe"
    os.mkfifo(fifo)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()), daemon=True)  # to the last writer
    reader.start()
    owner = create_sink(str(fifo))  # no .jsonl suffix: a stream takes JSON Lines whatever its name
    assert owner.open() == set() and owner.prior_errors == 0
    owner.shutdown()
    assert reader.is_alive(), "the ledger read opened the pipe, and its reader saw an early end of file"
    sink = create_sink(str(fifo))
    assert sink.open() == set()
    sink.write([record("a.jpg"), record("a.jpg"), error_record("b.jpg")])
    sink.write([record("c.jpg")])
    sink.shutdown()
    reader.join(10)
    lines = got[0].decode().splitlines()
    assert [json.loads(line)["key"] for line in lines] == ["a.jpg", "b.jpg", "c.jpg"]


def test_a_stream_that_refuses_writes_fails_with_the_reason(tmp_path):
    full = tmp_path / "r.jsonl"
    full.symlink_to("/dev/full")  # reads give endless zeros: a ledger read of it would never end
    sink = create_sink(str(full))
    assert sink.open() == set()
    with pytest.raises(SinkError, match="No space left on device"):
        sink.write([record("a.jpg")])
    with pytest.raises(SinkError, match="a write failed"):  # nothing more is written after a failed write
        sink.write([record("b.jpg")])
    sink.shutdown()
    (tmp_path / "r.sqlite").symlink_to("/dev/null")
    with pytest.raises(ConfigError, match="regular file for an SQLite output"):
        create_sink(str(tmp_path / "r.sqlite"))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("how", ["removed", "replaced"])
def test_an_output_removed_or_replaced_while_written_stops_the_writer(tmp_path: Path, kind: str, how: str) -> None:
    """Writing on into a removed file (or one renamed over) would lose every later record
    without a word; the sink says what happened instead."""
    path = out_path(tmp_path, kind)
    sink, _ = opened(path)
    sink.write([record("a.jpg")])
    if how == "removed":
        path.unlink()
    else:
        other = out_path(tmp_path / "other", kind)
        other.parent.mkdir()
        writer, _ = opened(other)
        writer.write([record("x.jpg")])
        writer.shutdown()
        os.replace(other, path)
    with pytest.raises(SinkError, match=f"it was {how}.*while the job ran"):
        sink.write([record("b.jpg")])
    sink.shutdown()
    moved = tmp_path / f"moved.{kind}"
    sink, _ = opened(path if how == "replaced" else out_path(tmp_path, kind))
    os.rename(path, moved)  # a rename is a removal too, as seen from the path
    with pytest.raises(SinkError, match="it was removed"):
        sink.write([record("c.jpg")])
    sink.shutdown()
