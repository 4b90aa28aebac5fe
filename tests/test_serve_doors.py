"""The ZeroMQ door (ROUTER request/reply, PULL stream, CURVE) and the hot folder, on real sockets and files.

Both run over ``InProcessBackend`` with the real model on real photos; two small
wrappers make it fail on purpose (``FlakyBackend``) or slow (``SlowBackend``).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import zmq
import zmq.auth

from conftest import CAT_CLASSES, COFFEE_CLASSES, REPO, in_threads, jpeg_bytes
from wanwu.errors import ConfigError
from wanwu.pipeline.serve.backend import ServeError
from wanwu.pipeline.serve.watch import HotFolder
from wanwu.pipeline.serve.curve import make_curve_keys
from wanwu.pipeline.serve.zmq_door import ZmqDoor
from wanwu.records import Record
from wanwu.stages.models.base import get_model_spec

MODEL = "efficientnet_lite0"
ZH = get_model_spec(MODEL).labels().zh
CAT_LABELS = {ZH[c] for c in CAT_CLASSES}


class Collector:
    """An ``on_records`` that keeps every record and lets a test wait for a count."""

    def __init__(self) -> None:
        self.records: list[dict] = []
        self._cond = threading.Condition()

    def __call__(self, records: list) -> None:
        with self._cond:
            self.records.extend(r.to_dict() for r in records)  # the fields a sink stores
            self._cond.notify_all()

    def wait_for(self, n: int, timeout_s: float = 30.0) -> list[dict]:
        with self._cond:
            self._cond.wait_for(lambda: len(self.records) >= n, timeout_s)
            return list(self.records)


class FlakyBackend:
    """The real backend, except that its first ``failures`` submits raise ``ServeError(reason)``."""

    def __init__(self, inner, failures: int, reason: str = "queue_full") -> None:
        self.inner, self.failures, self.reason = inner, failures, reason
        self._lock = threading.Lock()

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def submit(self, images, timeout_s=None, source="", keys=None):
        with self._lock:
            fail, self.failures = self.failures > 0, max(0, self.failures - 1)
        if fail:
            raise ServeError(self.reason, "test: the queue is full")
        return self.inner.submit(images, timeout_s, source, keys)


class SlowBackend:
    """Answers every request after ``delay_s`` with made-up records; counts requests in flight."""

    def __init__(self, inner, delay_s: float) -> None:
        self.inner, self.delay_s = inner, delay_s
        self.in_flight = self.most_in_flight = self.started = 0
        self._lock = threading.Lock()

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def submit(self, images, timeout_s=None, source="", keys=None):
        with self._lock:
            self.in_flight += 1
            self.started += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        time.sleep(self.delay_s)
        with self._lock:
            self.in_flight -= 1
        keys = keys or [f"slow-{i}" for i in range(len(images))]
        return [Record(key, source, None, None, [], "slow", 0.0) for key in keys]


@pytest.fixture
def ctx():
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


def ask(ctx, address: str, *frames: bytes, kind: int = zmq.DEALER, timeout_ms: int = 30_000,
        keys: tuple[bytes, bytes, bytes] | None = None) -> list[bytes] | None:
    """Send one message on a fresh socket; the reply's frames, or None if none came in time."""
    sock = ctx.socket(kind)
    sock.linger = 0
    if keys is not None:
        sock.curve_publickey, sock.curve_secretkey, sock.curve_serverkey = keys
    sock.connect(address)
    try:
        sock.send_multipart(list(frames))
        return sock.recv_multipart() if sock.poll(timeout_ms) else None
    finally:
        sock.close()


def top_class(record: dict) -> int:
    assert record["error"] is None, record
    best = record["labels"][0]
    assert best["label"] == ZH[best["class_id"]]
    return best["class_id"]


@pytest.fixture(scope="module")
def door(backend, tmp_path_factory):
    stream = Collector()
    sock_dir = tmp_path_factory.mktemp("zmq")
    door = ZmqDoor(backend, request_addr="tcp://127.0.0.1:0", stream_addr=f"ipc://{sock_dir}/stream",
                   on_records=stream)
    endpoints = door.start()
    assert door.start() == endpoints  # idempotent
    yield endpoints, stream
    door.shutdown()
    door.shutdown()


# --- request/reply


def test_dealer_gets_chinese_labels(door, ctx, images):
    endpoints, _ = door
    assert endpoints["request"].startswith("tcp://127.0.0.1:") and not endpoints["request"].endswith(":0")
    reply = ask(ctx, endpoints["request"], b"req-1", images["chelsea"], images["coffee"])
    assert reply is not None and len(reply) == 2 and reply[0] == b"req-1"
    doc = json.loads(reply[1].decode("utf-8"))
    assert doc["id"] == "req-1" and "error" not in doc
    cat, coffee = doc["records"]
    assert top_class(cat) in CAT_CLASSES and top_class(coffee) in COFFEE_CLASSES
    assert ZH[top_class(cat)].encode("utf-8") in reply[1]  # UTF-8 on the wire, not \u escapes
    assert (cat["source"], cat["width"], cat["height"], cat["model"]) == ("zmq", 451, 300, MODEL)


def test_req_clients_and_delimited_dealers_get_their_envelope_back(door, ctx, images):
    address = door[0]["request"]
    reply = ask(ctx, address, b"req-2", images["chelsea"], kind=zmq.REQ)
    assert reply is not None and reply[0] == b"req-2"
    assert top_class(json.loads(reply[1])["records"][0]) in CAT_CLASSES
    reply = ask(ctx, address, b"", b"req-3", images["coffee"])  # a DEALER talking like a REQ
    assert reply is not None and reply[:2] == [b"", b"req-3"]
    assert top_class(json.loads(reply[2])["records"][0]) in COFFEE_CLASSES


def test_a_garbage_image_is_an_error_in_its_record_only(door, ctx, images):
    reply = ask(ctx, door[0]["request"], b"mixed", images["chelsea"], "这不是图片".encode(), images["coffee"])
    assert reply is not None
    cat, garbage, coffee = json.loads(reply[1])["records"]
    assert top_class(cat) in CAT_CLASSES and top_class(coffee) in COFFEE_CLASSES
    assert garbage["error"]["type"] == "DecodeError" and garbage["labels"] == []


def test_requests_without_images_get_an_error_reply(door, ctx, images):
    address = door[0]["request"]
    for frames, want_id in [([b"empty"], "empty"), ([b"\xff\xfe"], "fffe"), ([b""], "")]:
        reply = ask(ctx, address, *frames)
        assert reply is not None
        doc = json.loads(reply[-1])
        assert doc["id"] == want_id and "records" not in doc
        assert doc["error"]["type"] == "bad_request" and "expected" in doc["error"]["message"]
    reply = ask(ctx, address, b"after", images["chelsea"])
    assert reply is not None and top_class(json.loads(reply[1])["records"][0]) in CAT_CLASSES


def test_oversize_requests_are_refused_and_the_door_keeps_serving(backend, ctx, images, photos):
    cat = images["chelsea"]
    tiny = jpeg_bytes(photos["chelsea"], size=(16, 12))
    door = ZmqDoor(backend, request_addr="tcp://127.0.0.1:*", max_request_bytes=2 * len(cat) + 100,
                   max_images_per_request=3)
    address = door.start()["request"]
    try:
        too_big = json.loads(ask(ctx, address, b"big", cat, cat, cat)[1])
        assert too_big["error"]["type"] == "too_large" and str(3 * len(cat)) in too_big["error"]["message"]
        too_many = json.loads(ask(ctx, address, b"many", tiny, tiny, tiny, tiny)[1])
        assert too_many["error"]["type"] == "too_large" and "got 4" in too_many["error"]["message"]
        # A frame far over the limit is refused by ZeroMQ itself (the connection drops): no reply.
        assert ask(ctx, address, b"huge", b"x" * (5 * len(cat)), timeout_ms=500) is None
        fine = json.loads(ask(ctx, address, b"fine", cat, cat)[1])
        assert [top_class(r) in CAT_CLASSES for r in fine["records"]] == [True, True]
    finally:
        door.shutdown()


def test_16_concurrent_dealers(door, images):
    address, answers = door[0]["request"], []
    ctx = zmq.Context()

    def client(n: int) -> None:
        for i in range(2):
            first, second = ("chelsea", "coffee") if (n + i) % 2 else ("coffee", "chelsea")
            rid = f"客户{n}-{i}".encode()
            reply = ask(ctx, address, rid, images[first], images[second], timeout_ms=60_000)
            assert reply is not None and reply[0] == rid
            records = json.loads(reply[1])["records"]
            want = {"chelsea": CAT_CLASSES, "coffee": COFFEE_CLASSES}
            assert top_class(records[0]) in want[first] and top_class(records[1]) in want[second]
            answers.append((n, i))

    errors = in_threads(client, 16, timeout=120)
    ctx.destroy(linger=0)
    assert not errors, errors[:3]
    assert sorted(answers) == [(n, i) for n in range(16) for i in range(2)]


def test_requests_run_concurrently_and_shutdown_lets_them_finish(backend, ctx):
    slow = SlowBackend(backend, delay_s=0.3)
    door = ZmqDoor(slow, request_addr="tcp://127.0.0.1:0", threads=16)
    address = door.start()["request"]
    sock = ctx.socket(zmq.DEALER)
    sock.connect(address)
    t0 = time.monotonic()
    for i in range(16):
        sock.send_multipart([str(i).encode(), b"image"])
    wait_until(lambda: slow.started == 16, timeout_s=5)
    door.shutdown()  # while requests are in flight: they still get their answers
    ids = {sock.recv_multipart()[0] for _ in range(16) if sock.poll(5000)}
    elapsed = time.monotonic() - t0
    sock.close(0)
    assert ids == {str(i).encode() for i in range(16)}
    assert slow.most_in_flight >= 8 and elapsed < 2.0, (slow.most_in_flight, elapsed)  # serially: 4.8 s


# --- stream


def test_stream_of_named_images_becomes_records(door, ctx, images):
    endpoints, stream = door
    push = ctx.socket(zmq.PUSH)
    push.connect(endpoints["stream"])
    names = {f"流/{i:02d}.jpg": ("chelsea", "coffee")[i % 2] for i in range(20)}
    for name, photo in names.items():
        push.send_multipart([name.encode(), images[photo]])
    push.send_multipart([images["chelsea"]])  # unnamed: a key is made up
    push.send_multipart([b"a", b"b", b"c"])  # malformed: an error record, not silence
    records = stream.wait_for(22)
    push.close(0)
    assert len(records) == 22
    by_key = {r["key"]: r for r in records}
    want = {"chelsea": CAT_CLASSES, "coffee": COFFEE_CLASSES}
    for name, photo in names.items():
        assert by_key[name]["source"] == "zmq" and top_class(by_key[name]) in want[photo]
    others = [r for r in records if r["key"] not in names]
    unnamed = next(r for r in others if r["error"] is None)
    assert unnamed["key"].startswith("zmq-") and top_class(unnamed) in CAT_CLASSES
    malformed = next(r for r in others if r["error"] is not None)
    assert malformed["error"]["type"] == "bad_request" and "3 frames" in malformed["error"]["message"]


def test_stream_request_errors_become_error_records(backend, ctx, images, tmp_path):
    stream = Collector()
    door = ZmqDoor(FlakyBackend(backend, failures=1), stream_addr=f"ipc://{tmp_path}/s", on_records=stream)
    address = door.start()["stream"]
    push = ctx.socket(zmq.PUSH)
    push.connect(address)
    try:
        push.send_multipart([b"first.jpg", images["chelsea"]])
        assert len(stream.wait_for(1)) == 1
        push.send_multipart([b"second.jpg", images["chelsea"]])
        first, second = stream.wait_for(2)
    finally:
        push.close(0)
        door.shutdown()
    assert first["key"] == "first.jpg" and first["source"] == "zmq" and first["model"] == MODEL
    assert first["error"] == {"type": "queue_full", "message": "test: the queue is full"} and first["labels"] == []
    assert second["key"] == "second.jpg" and top_class(second) in CAT_CLASSES


def test_stream_records_that_cannot_be_written_are_kept_and_the_door_stops_taking_images(backend, ctx, images,
                                                                                        tmp_path):
    """A full disk under --out: the door holds the records it could not write, tries again,
    and reads no new images meanwhile (at most its threads' worth are in flight), so senders
    wait at their high-water mark. Once the disk has room, every image has its record, once."""
    written = Collector()
    calls: list[int] = []
    disk_full = threading.Event()
    disk_full.set()

    def on_records(records):
        calls.append(len(records))
        if disk_full.is_set():
            raise OSError(28, "No space left on device")
        written(records)

    door = ZmqDoor(backend, stream_addr=f"ipc://{tmp_path}/s", on_records=on_records, threads=2)
    address = door.start()["stream"]
    push = ctx.socket(zmq.PUSH)
    push.connect(address)
    names = [f"s/{i:02d}.jpg" for i in range(12)]
    try:
        for name in names:
            push.send_multipart([name.encode(), images["chelsea"]])
        deadline = time.monotonic() + 30
        while len(calls) < 3 and time.monotonic() < deadline:  # three failed tries
            time.sleep(0.05)
        assert len(calls) >= 3 and max(calls) <= 2, calls  # never more than the threads' worth taken
        disk_full.clear()
        records = written.wait_for(len(names))
    finally:
        push.close(0)
        door.shutdown()
    assert sorted(r["key"] for r in records) == names and all(top_class(r) in CAT_CLASSES for r in records)


# --- CURVE


def test_curve_admits_only_known_clients(backend, ctx, images, tmp_path):
    server_public, server_secret = make_curve_keys(str(tmp_path / "server"))
    good = make_curve_keys(str(tmp_path / "keys"), "good")
    stranger = make_curve_keys(str(tmp_path / "keys"), "stranger")
    (tmp_path / "clients").mkdir()
    shutil.copy(good[0], tmp_path / "clients")
    server_key = zmq.auth.load_certificate(server_public)[0]

    def keys(pair):
        public, secret = zmq.auth.load_certificate(pair[1])
        return public, secret, server_key

    stream = Collector()
    door = ZmqDoor(backend, request_addr="tcp://127.0.0.1:0", stream_addr=f"ipc://{tmp_path}/stream",
                   on_records=stream, curve_secret_key_file=server_secret,
                   curve_clients_dir=str(tmp_path / "clients"))
    endpoints = door.start()
    try:
        reply = ask(ctx, endpoints["request"], b"good", images["chelsea"], keys=keys(good))
        assert reply is not None and top_class(json.loads(reply[1])["records"][0]) in CAT_CLASSES
        refused = {}

        def try_as(name, pair):
            refused[name] = ask(ctx, endpoints["request"], name.encode(), images["chelsea"], timeout_ms=1000,
                                keys=keys(pair) if pair else None)

        tries = [threading.Thread(target=try_as, args=a) for a in [("stranger", stranger), ("plain", None)]]
        for t in tries:
            t.start()
        for t in tries:
            t.join()
        assert refused == {"stranger": None, "plain": None}
        reply = ask(ctx, endpoints["request"], b"good-again", images["coffee"], keys=keys(good))
        assert reply is not None and top_class(json.loads(reply[1])["records"][0]) in COFFEE_CLASSES
        pushers = []
        for name, pair in [("stranger.jpg", stranger), ("good.jpg", good)]:
            push = ctx.socket(zmq.PUSH)
            push.curve_publickey, push.curve_secretkey, push.curve_serverkey = keys(pair)
            push.connect(endpoints["stream"])
            push.send_multipart([name.encode(), images["chelsea"]])  # queued until the handshake is done
            pushers.append(push)
        assert [r["key"] for r in stream.wait_for(1)] == ["good.jpg"]
        time.sleep(0.3)
        assert len(stream.records) == 1
        for push in pushers:
            push.close(0)
    finally:
        door.shutdown()


# --- sample client


def test_sample_client_prints_a_cat_for_chelsea(door):
    photo = REPO / "samples" / "猫 chelsea.jpg"
    run = subprocess.run([sys.executable, str(REPO / "samples" / "zmq_client.py"), door[0]["request"], str(photo)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    path, key, label_score = run.stdout.strip().split("\t")
    label, score = label_score.rsplit(" ", 1)
    assert path == str(photo) and key.startswith("zmq-") and label in CAT_LABELS and 0 < float(score) <= 1


# --- hot folder


def write_slowly(path: Path, data: bytes, chunks: int = 6, pause_s: float = 0.15) -> None:
    """Write ``data`` in pieces, the way a copy over a slow network lands."""
    step = -(-len(data) // chunks)
    with open(path, "wb") as f:
        for begin in range(0, len(data), step):
            f.write(data[begin:begin + step])
            f.flush()
            time.sleep(pause_s)


def drop_images(folder: Path, images: dict[str, bytes], names: list[str], slow: set[str] = frozenset()) -> None:
    """Photo copies under ``names`` ("cat..." = chelsea, anything else coffee); ``slow`` ones in chunks."""
    writers = []
    for name in names:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        data = images["chelsea" if Path(name).name.startswith("cat") else "coffee"]
        if name in slow:
            writers.append(threading.Thread(target=write_slowly, args=(path, data)))
            writers[-1].start()
        else:
            path.write_bytes(data)
    for t in writers:
        t.join()


def check_records(records: list[dict], names: list[str]) -> None:
    assert sorted(r["key"] for r in records) == sorted(names)  # each once
    for r in records:
        want = CAT_CLASSES if Path(r["key"]).name.startswith("cat") else COFFEE_CLASSES
        assert r["source"] == "watch" and top_class(r) in want, r


def wait_until(condition, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_hot_folder_recognises_each_file_once_across_restarts(backend, images, tmp_path):
    inbox, done, failed = tmp_path / "inbox", tmp_path / "inbox" / "done", tmp_path / "failed"
    names = [f"{['', 'a/', 'a/b/', '子目录 sub/'][i % 4]}{('cat', 'coffee')[i % 2]}_{i:03d}."
             f"{'png' if i % 10 == 9 else 'jpg'}" for i in range(100)]
    ignored = ["notes.txt", ".hidden.jpg", "a/cat.jpg.part", "a/cat.jpg.tmp", "done/old/cat_old.jpg"]
    drop_images(inbox, images, ignored[1:])
    (inbox / "notes.txt").write_text("不是图片")
    first_run = Collector()
    watcher = HotFolder(backend, str(inbox), on_records=first_run, done_dir=str(done), failed_dir=str(failed),
                        settle_s=0.5, poll_s=0.05, batch=16)
    watcher.start()
    drop_images(inbox, images, names, slow=set(names[::17]))
    (inbox / "a" / "garbage.jpg").write_text("这不是图片 this is not an image")
    (inbox / "empty.png").write_bytes(b"")
    records = first_run.wait_for(102)
    time.sleep(0.7)  # longer than settle_s: anything recognised twice would show now
    watcher.shutdown()
    watcher.shutdown()
    records = first_run.records
    errors = {r["key"]: r["error"]["type"] for r in records if r["error"] is not None}
    assert errors == {"a/garbage.jpg": "DecodeError", "empty.png": "ReadError"}
    check_records([r for r in records if r["key"] not in errors], names)  # slowly written ones too
    assert len(records) == 102
    assert watcher.stats() == {"seen": 102, "done": 100, "failed": 2, "moved": 102, "retries": 0, "watching": 0}
    assert all((done / n).exists() and not (inbox / n).exists() for n in names)
    assert (failed / "a" / "garbage.jpg").exists() and (failed / "empty.png").exists()
    assert all((inbox / n).exists() for n in ignored)

    # Restart: the ledger says what is done; a done file dropped again is moved aside, not recognised.
    second_run = Collector()
    new = [f"new/{('cat', 'coffee')[i % 2]}_{i:03d}.jpg" for i in range(10)]
    drop_images(inbox, images, new + [names[0]])
    watcher = HotFolder(backend, str(inbox), on_records=second_run, done_keys={r["key"] for r in records},
                        done_dir=str(done), failed_dir=str(failed), settle_s=0.4, poll_s=0.05)
    watcher.start()
    second_run.wait_for(10)
    wait_until(lambda: (done / "cat_000-1.jpg").exists())
    time.sleep(0.6)
    watcher.shutdown()
    check_records(second_run.records, new)
    assert not (inbox / names[0]).exists() and (done / names[0]).exists()
    assert watcher.stats()["moved"] == 11


@pytest.mark.parametrize("moved", [True, False], ids=["done-dir", "files-stay"])
def test_a_file_landing_again_under_a_done_name_is_recognised_under_a_key_of_its_own(backend, images, tmp_path,
                                                                                    moved):
    # A camera uploading cam/snapshot.jpg every minute: each upload after the first used to be
    # moved to done (or left alone) without a record.
    inbox, done = tmp_path / "inbox", tmp_path / "done"
    (inbox / "cam").mkdir(parents=True)
    snap = inbox / "cam" / "snapshot.jpg"
    written = Collector()
    watcher = HotFolder(backend, str(inbox), on_records=written, done_dir=str(done) if moved else None,
                        settle_s=0.2, poll_s=0.02)
    watcher.start()
    try:
        for n, photo in enumerate(["chelsea", "coffee", "chelsea"], start=1):
            if moved:
                wait_until(lambda: not snap.exists())  # the upload before was moved away
            else:
                time.sleep(0.05)  # a new modification time, as a new upload has
            snap.write_bytes(images[photo])
            written.wait_for(n)
        time.sleep(0.5)  # longer than settle_s: a file recognised twice would show now
    finally:
        watcher.shutdown()
    keys = [r["key"] for r in written.records]
    assert keys == ["cam/snapshot.jpg", "cam/snapshot.jpg#2", "cam/snapshot.jpg#3"]
    assert [top_class(r) in want for r, want in zip(written.records, (CAT_CLASSES, COFFEE_CLASSES, CAT_CLASSES))] \
        == [True] * 3
    if moved:
        assert sorted(p.name for p in (done / "cam").iterdir()) == ["snapshot-1.jpg", "snapshot-2.jpg",
                                                                     "snapshot.jpg"]


def test_a_file_written_again_before_it_was_moved_is_not_moved_away_unseen(backend, images, tmp_path):
    inbox, done = tmp_path / "inbox", tmp_path / "done"
    inbox.mkdir()
    snap = inbox / "snapshot.jpg"
    written = Collector()

    def on_records(records):
        written(records)
        if len(written.records) == 1:  # the upload after it lands between its record and its move
            snap.write_bytes(images["coffee"])

    watcher = HotFolder(backend, str(inbox), on_records=on_records, done_dir=str(done), settle_s=0.2, poll_s=0.02)
    snap.write_bytes(images["chelsea"])
    watcher.start()
    try:
        written.wait_for(2)
        wait_until(lambda: not snap.exists())
    finally:
        watcher.shutdown()
    assert [r["key"] for r in written.records] == ["snapshot.jpg", "snapshot.jpg#2"]
    assert top_class(written.records[1]) in COFFEE_CLASSES
    assert sorted(p.name for p in done.iterdir()) == ["snapshot.jpg"]  # the coffee: the cat was overwritten


def test_hot_folder_puts_files_off_when_the_request_fails(backend, images, tmp_path):
    inbox, done = tmp_path / "inbox", tmp_path / "done"
    names = ["cat_1.jpg", "coffee_2.jpg", "sub/cat_3.jpg"]
    drop_images(inbox, images, names)
    calls, written = [], Collector()

    def on_records(records):
        calls.append(len(records))
        if len(calls) == 1:
            raise OSError("test: disk full")
        written(records)

    watcher = HotFolder(FlakyBackend(backend, failures=1), str(inbox), on_records=on_records, done_dir=str(done),
                        settle_s=0.05, poll_s=0.02)
    watcher.start()
    written.wait_for(3)
    watcher.shutdown()
    check_records(written.records, names)
    assert calls == [3, 3]  # the backend refused once (nothing written), then on_records failed once
    assert watcher.stats()["retries"] == 2 and all((done / n).exists() for n in names)


def test_bad_configuration_is_refused_saying_what_was_expected(backend, tmp_path):
    public, _ = make_curve_keys(str(tmp_path / "keys"))
    bad = [dict(), dict(stream_addr="tcp://127.0.0.1:0"), dict(request_addr="tcp://127.0.0.1:0", threads=0),
           dict(request_addr="tcp://127.0.0.1:0", curve_clients_dir=str(tmp_path)),
           dict(request_addr="tcp://127.0.0.1:0", curve_secret_key_file=public)]
    for kwargs in bad:
        with pytest.raises(ConfigError, match="expected"):
            ZmqDoor(backend, **kwargs)
    door = ZmqDoor(backend, request_addr="tcp://no-such-interface-名:1")
    with pytest.raises(ConfigError, match="no-such-interface"):
        door.start()
    door.shutdown()
    with pytest.raises(ConfigError, match="expected a folder"):
        HotFolder(backend, str(tmp_path / "missing"), on_records=print)
    with pytest.raises(ConfigError, match="other than the watched folder"):
        HotFolder(backend, str(tmp_path), on_records=print, done_dir=str(tmp_path))
