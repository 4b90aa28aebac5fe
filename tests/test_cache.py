"""The result cache: driven by hand over a real LMDB file, shared by processes, and end to end."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import signal
import time
from pathlib import Path

import pytest

from conftest import REPO, Served, jpeg_bytes, run_wanwu, write_slow_png
from wanwu.errors import ConfigError, DecodeError
from wanwu.records import Record
from wanwu.stages.cache import RecordCache, digest
from wanwu.stages.sinks.base import read_records

ID_A, ID_B = b"A" * 16, b"B" * 16


def answer(key: str, labels: int = 5) -> Record:
    """A record whose labels name its key, so a wrong answer for a key shows."""
    return Record(key, "photos", 640, 480, [{"label": f"标签 {key}", "label_en": key, "class_id": i, "score": 0.1}
                                             for i in range(labels)], "m", 1.0)


def test_answers_by_content_under_the_new_inputs_name(tmp_path):
    cache = RecordCache(str(tmp_path / "c"), ID_A, max_bytes=1 << 22)
    key = digest(b"jpeg bytes")
    assert cache.get(key) is None
    cache.put([(key, answer("first.jpg"))])
    hit = cache.get(key)
    record = cache.record(hit, "again/second.jpg", "other", time.time())
    assert (record.key, record.source, record.cached) == ("again/second.jpg", "other", True)
    assert record.labels[0]["label_en"] == "first.jpg" and (record.width, record.height) == (640, 480)
    assert record.to_dict()["cached"] is True and "cached" not in answer("x").to_dict()
    assert cache.counts.as_dict() == {"hits": 1, "misses": 1, "insertions": 1, "evictions": 0}
    cache.shutdown()
    cache.shutdown()
    # Another identity (model, weights, labels, preprocessing, top-k, precision, engine) never matches.
    with_b = RecordCache(str(tmp_path / "c"), ID_B, max_bytes=1 << 22)
    assert with_b.get(key) is None and with_b.stats()["entries"] == 1
    with_b.shutdown()


def test_error_records_are_not_kept(tmp_path):
    cache = RecordCache(str(tmp_path / "c"), ID_A, max_bytes=1 << 22)
    cache.put([(digest(b"half a jpeg"), Record.failure("cut.jpg", "photos", "m", DecodeError("truncated"), 0.0))])
    assert cache.get(digest(b"half a jpeg")) is None and cache.counts.insertions == 0
    cache.shutdown()


def test_eviction_keeps_the_file_under_its_bound_and_drops_the_least_recently_used(tmp_path):
    path = tmp_path / "c"
    bound = 1 << 20
    cache = RecordCache(str(path), ID_A, max_bytes=bound)
    keys = [digest(str(i).encode()) for i in range(3000)]
    for start in range(0, len(keys), 50):
        cache.put([(k, answer(f"{i}.jpg", labels=20)) for i, k in enumerate(keys[start:start + 50], start)])
        cache.get(keys[0])  # kept in use: it must survive
        cache.flush()
    assert cache.counts.evictions > 0 and os.path.getsize(path / "data.mdb") <= bound
    assert cache.get(keys[0]) is not None  # recently used
    assert cache.get(keys[1]) is None  # long unused: gone
    assert cache.used_bytes() < 0.85 * bound
    cache.shutdown()


def test_a_foreign_or_corrupt_cache_is_refused_and_left_untouched(tmp_path):
    plain = tmp_path / "notes.txt"
    plain.write_text("not a cache")
    with pytest.raises(ConfigError, match="got a file"):
        RecordCache(str(plain), ID_A)
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "cat.jpg").write_bytes(b"x")
    with pytest.raises(ConfigError, match="other files"):
        RecordCache(str(folder), ID_A)
    import lmdb

    other = tmp_path / "other.lmdb"
    env = lmdb.open(str(other), max_dbs=3)
    with env.begin(write=True, db=env.open_db(b"meta")) as txn:
        txn.put(b"format", b"someone else's 7")
    env.close()
    before = (other / "data.mdb").read_bytes()
    with pytest.raises(ConfigError, match="wanwu-cache 1"):
        RecordCache(str(other), ID_A)
    assert (other / "data.mdb").read_bytes() == before and plain.read_text() == "not a cache"
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "data.mdb").write_bytes(b"\0garbage" * 1000)
    with pytest.raises(ConfigError, match="LMDB cannot open"):
        RecordCache(str(broken), ID_A)


def _writer(path: str, first: int, count: int, ready=None) -> None:
    cache = RecordCache(path, ID_A, max_bytes=64 << 20)
    if ready is not None:
        ready.set()
    for i in range(first, first + count):
        cache.put([(digest(str(i).encode()), answer(f"{i}.jpg"))])
    cache.shutdown()


def test_two_processes_write_one_cache_at_once(tmp_path):
    path = str(tmp_path / "c")
    ctx = mp.get_context("spawn")
    writers = [ctx.Process(target=_writer, args=(path, first, 300)) for first in (0, 300)]
    for w in writers:
        w.start()
    for w in writers:
        w.join(120)
        assert w.exitcode == 0
    cache = RecordCache(path, ID_A, max_bytes=64 << 20)
    for i in range(600):
        hit = cache.get(digest(str(i).encode()))
        assert hit is not None and hit["labels"][0]["label_en"] == f"{i}.jpg"
    cache.shutdown()


def _opener(paths: list[str], barrier) -> None:
    for path in paths:
        barrier.wait(60)  # every process opens the same new cache at the same moment
        RecordCache(path, ID_A, max_bytes=64 << 20).shutdown()


def test_processes_creating_one_new_cache_together_all_open_it(tmp_path):
    """Creating the file and marking it a wanwu cache are two transactions; a process opening the
    cache between them must wait, not refuse it as another LMDB file."""
    ctx = mp.get_context("spawn")
    paths = [str(tmp_path / f"c{i}") for i in range(10)]
    barrier = ctx.Barrier(4)
    openers = [ctx.Process(target=_opener, args=(paths, barrier)) for _ in range(4)]
    for p in openers:
        p.start()
    for p in openers:
        p.join(120)
    assert [p.exitcode for p in openers] == [0] * 4


def test_kill_9_while_writing_loses_entries_at_worst_never_answers_wrong(tmp_path):
    path = str(tmp_path / "c")
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    writer = ctx.Process(target=_writer, args=(path, 0, 100_000, ready))
    writer.start()
    assert ready.wait(60)
    time.sleep(1.0)
    os.kill(writer.pid, signal.SIGKILL)
    writer.join()
    cache = RecordCache(path, ID_A, max_bytes=64 << 20)  # opens
    found = 0
    for i in range(100_000):
        hit = cache.get(digest(str(i).encode()))
        if hit is not None:
            assert hit["labels"][0]["label_en"] == f"{i}.jpg"
            found += 1
    assert found > 0
    cache.put([(digest(b"after"), answer("after.jpg"))])  # and takes writes again
    assert cache.get(digest(b"after")) is not None
    cache.shutdown()


@pytest.fixture(scope="module")
def twins(tmp_path_factory, photos) -> Path:
    """The same photo under three names in two folders, and two other photos."""
    folder = tmp_path_factory.mktemp("twins")
    (folder / "a").mkdir()
    (folder / "b").mkdir()
    cat = jpeg_bytes(photos["chelsea"])
    for name in ("a/cat.jpg", "a/同一只猫.jpg", "b/cat-copy.jpg"):
        (folder / name).write_bytes(cat)
    (folder / "a/coffee.jpg").write_bytes(jpeg_bytes(photos["coffee"]))
    (folder / "b/rocket.jpg").write_bytes(jpeg_bytes(photos["rocket"]))
    return folder


def run_cached(folder: Path, out: Path, cache: Path, *extra: str) -> dict:
    stats = out.with_suffix(".stats.json")
    proc = run_wanwu("run", str(folder), "--out", str(out), "--cache", str(cache), "--progress", "none",
                     "--stats-json", str(stats), *extra)
    assert proc.returncode == 0, proc.stderr
    return json.loads(stats.read_text())


@pytest.mark.slow
def test_the_same_photo_under_three_names_is_recognised_once(twins, tmp_path, lite0_exports):
    cache = tmp_path / "cache"
    stats = run_cached(twins, tmp_path / "r.jsonl", cache)
    records = {r["key"]: r for r in read_records(str(tmp_path / "r.jsonl"))}
    assert set(records) == {"a/cat.jpg", "a/同一只猫.jpg", "b/cat-copy.jpg", "a/coffee.jpg", "b/rocket.jpg"}
    cats = [records[k] for k in ("a/cat.jpg", "a/同一只猫.jpg", "b/cat-copy.jpg")]
    assert sum(1 for r in cats if r.get("cached")) == 2  # one recognised, two answered by it
    assert all(r["labels"] == cats[0]["labels"] and r["source"] == str(twins) for r in cats)
    # Looked up: 5 images; recognised: 3 (the cat once), kept: 3.
    assert stats["cache"] == {"hits": 2, "misses": 3, "insertions": 3, "evictions": 0}
    again = run_cached(twins, tmp_path / "again.jsonl", cache)
    assert again["cache"]["hits"] == 5 and again["cache"]["misses"] == 0
    assert all(r.get("cached") for r in read_records(str(tmp_path / "again.jsonl")))
    # What changes an answer changes the identity: no hit.
    other_model = ["--model", f"onnx:{lite0_exports['onnx_f32']}", "--labels", str(lite0_exports["labels"]),
                   "--mean", "0.5", "0.5", "0.5", "--std", "0.5", "0.5", "0.5"]  # the same network, as a file
    for extra in (["--top-k", "3"], ["--precision", "fp32"], ["--engine", "onnxruntime"], other_model):
        other = run_cached(twins, tmp_path / f"other{len(extra)}{extra[1][:5]}.jsonl", cache, *extra)
        assert other["cache"]["hits"] == 2, extra  # only the twins within that run


@pytest.mark.slow
def test_a_cache_filled_by_run_answers_serve(twins, tmp_path, photos):
    from wanwu.bench.attacks import infer_seconds, metric

    cache = tmp_path / "cache"
    run_cached(twins, tmp_path / "r.jsonl", cache)
    served = Served("--cache", str(cache), "--decoders", "1")
    try:
        infer_seconds(served.url, jpeg_bytes(photos["chelsea"]))  # the same bytes as a/cat.jpg
        time.sleep(1)  # the metrics are refreshed twice a second
        assert metric(served.addresses["metrics"], "wanwu_cache", 'what="hits"') == 1
        assert metric(served.addresses["metrics"], "wanwu_cache", 'what="misses"') == 0
    finally:
        assert served.stop() == 0


def test_a_cache_on_a_full_disk_costs_speed_never_the_job(tmp_path, photos):
    """The cache lives on a 128 KiB tmpfs (mounted in a user and mount namespace of the test's
    own): it opens, then its disk fills up after a few dozen answers. Every image still gets
    its record, the job ends 0, and the warning says why answers are not kept."""
    from conftest import make_corpus, run_on_a_full_disk

    keys = make_corpus(tmp_path / "in", photos, 100)
    cache, out = tmp_path / "cache", tmp_path / "r.jsonl"
    proc = run_on_a_full_disk(cache, "128k", "run", str(tmp_path / "in"), "--out", str(out), "--cache", str(cache),
                              "--progress", "none", "--stats-json", str(tmp_path / "stats.json"))
    assert proc.returncode == 0, proc.stderr
    records = read_records(str(out))
    assert sorted(r["key"] for r in records) == sorted(keys) and all(r["error"] is None for r in records)
    # LMDB reports the full disk as it sees it (ENOSPC, or EIO from its commit).
    assert proc.stderr.count("cannot write (mdb_") == 1 and "recognising without it" in proc.stderr, proc.stderr
    counts = json.loads((tmp_path / "stats.json").read_text())["cache"]
    assert counts["misses"] == 100 and 0 < counts["insertions"] < 100, counts  # some kept before the disk filled


def test_cache_command_stats_and_clear(tmp_path):
    cache = RecordCache(str(tmp_path / "c"), ID_A, max_bytes=1 << 22)
    cache.put([(digest(b"x"), answer("x.jpg"))])
    cache.shutdown()
    proc = run_wanwu("cache", "stats", str(tmp_path / "c"), "--json")
    assert proc.returncode == 0 and json.loads(proc.stdout)["entries"] == 1
    proc = run_wanwu("cache", "clear", str(tmp_path / "c"))
    assert proc.returncode == 0 and "dropped 1" in proc.stdout
    assert json.loads(run_wanwu("cache", "stats", str(tmp_path / "c"), "--json").stdout)["entries"] == 0
    assert run_wanwu("cache", "stats", str(REPO / "samples")).returncode == 2
    shutil.rmtree(tmp_path / "c")


@pytest.fixture
def cached_backend(tmp_path):
    """The daemon's backend (decoder and inference processes) with a cache that starts empty."""
    from wanwu import Recognizer
    from wanwu.pipeline.serve.dispatch import PipelineBackend

    backend = PipelineBackend(Recognizer(cache=str(tmp_path / "cache"), decoders=1, top_k=1).config)
    backend.start()
    yield backend
    backend.shutdown()


def test_identical_images_in_flight_in_the_daemon_are_recognised_once(cached_backend, photos):
    # Formerly each copy was recognised until the first answer was kept, as `wanwu run` already avoided.
    datas = [jpeg_bytes(photos[name]) for name in ("chelsea", "coffee", "rocket")]
    keys = [f"copy {i}" for i in range(24)]
    records = cached_backend.submit(datas * 8, keys=keys, source="test")

    assert [r.key for r in records] == keys and {r.source for r in records} == {"test"}
    assert all(r.error is None for r in records)
    for i, record in enumerate(records):  # the same answer as the first of its photo, marked cached after it
        first = records[i % 3]
        assert (record.labels, record.width, record.height) == (first.labels, first.width, first.height)
        assert record.cached == (i >= 3)
    deadline = time.monotonic() + 5
    while (cached_backend.stats()["inference_count"] < 3 or cached_backend.cache.counts.insertions < 3) \
            and time.monotonic() < deadline:
        time.sleep(0.05)  # batch events, and the answers kept, come after the answers are delivered
    time.sleep(0.3)
    assert cached_backend.stats()["inference_count"] == 3  # three images reached the model, not 24
    assert cached_backend.cache.counts.as_dict() == {"hits": 21, "misses": 3, "insertions": 3, "evictions": 0}
    # A second request of the same bytes is answered by the cache alone: hits + misses = images looked up.
    again = cached_backend.submit(datas * 2, keys=keys[:6])
    assert all(r.cached and r.labels == records[i % 3].labels for i, r in enumerate(again))
    assert cached_backend.cache.counts.as_dict() == {"hits": 27, "misses": 3, "insertions": 3, "evictions": 0}


def test_a_twin_waiting_on_a_request_that_timed_out_is_sent_in_its_place(cached_backend, tmp_path):
    import threading

    from wanwu.pipeline.serve.backend import ServeError

    write_slow_png(tmp_path / "slow.png")  # seconds to decode: the first request gives up meanwhile
    data = (tmp_path / "slow.png").read_bytes()
    outcome: dict = {}

    def first() -> None:
        try:
            cached_backend.submit([data], timeout_s=0.5, keys=["first"])
        except ServeError as exc:
            outcome["first"] = exc.reason

    thread = threading.Thread(target=first)
    thread.start()
    time.sleep(0.15)  # the first is in flight: the second waits on it
    (second,) = cached_backend.submit([data], timeout_s=40, keys=["second"])
    thread.join(10)
    assert outcome == {"first": "timeout"}
    assert second.key == "second" and second.error is None and second.labels, second
