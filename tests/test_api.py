"""The Python front door (``wanwu.Recognizer``): real worker processes, shared memory and the real model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import CAT_CLASSES, REPO, children_of, jpeg_bytes, run_wanwu, write_hostile, write_photos
from wanwu.errors import ConfigError
from wanwu.pipeline.serve.backend import ServeError
from wanwu.pipeline.serve.config import ServeConfig

SAMPLES = sorted((REPO / "samples").glob("*.jpg"))


@pytest.fixture(scope="module")
def recognizer():
    from wanwu import Recognizer

    with Recognizer(decoders=1, top_k=3) as r:
        yield r


def _workers() -> dict[int, str]:
    return {pid: cmd for pid, cmd in children_of(os.getpid()).items() if "wanwu.pipeline.workers" in cmd}


def test_records_match_wanwu_run_on_the_same_folder_with_hostile_files(recognizer, tmp_path, photos):
    folder = tmp_path / "in"
    good = write_photos(folder, photos)
    bad = write_hostile(folder, photos)
    out = tmp_path / "run.jsonl"
    proc = run_wanwu("run", str(folder), "--out", str(out), "--decoders", "1", "--top-k", "3", "--progress", "none")
    assert proc.returncode == 3, proc.stderr  # 3: finished, with error records
    by_run = {r["key"]: r for r in map(json.loads, out.read_text(encoding="utf-8").splitlines())}

    keys = sorted(by_run)
    records = recognizer.recognise([folder / k for k in keys], keys=keys)

    assert [r.key for r in records] == keys and {r.source for r in records} == {"python"}
    for record in records:
        theirs = by_run[record.key]
        if record.key in bad:
            assert record.error["type"] == theirs["error"]["type"] == bad[record.key], record
            continue
        assert record.error is None and (record.width, record.height) == (theirs["width"], theirs["height"])
        assert record.labels[0]["class_id"] == theirs["labels"][0]["class_id"], (record.key, good[record.key])
        assert record.labels[0]["score"] == pytest.approx(theirs["labels"][0]["score"], abs=0.02)
        assert len(record.labels) == 3


def test_map_is_lazy_ordered_and_puts_each_bad_input_in_its_place(recognizer, tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not an image")
    datas = [p.read_bytes() for p in SAMPLES]
    inputs = [datas[i % len(datas)] for i in range(150)]
    inputs[10], inputs[70], inputs[71] = tmp_path / "gone.jpg", tmp_path / "empty.jpg", tmp_path / "text.jpg"
    inputs[100] = SAMPLES[3]
    pulled = []

    def feed():
        for item in inputs:
            pulled.append(1)
            yield item

    window = 32
    records, pulled_at_first = [], None
    for record in recognizer.map(feed(), window=window):
        if pulled_at_first is None:
            pulled_at_first = len(pulled)
        records.append(record)

    # Memory stays bounded: the first record came before more than a window (and a request) was read.
    assert pulled_at_first <= window + recognizer._chunk() + 1, pulled_at_first
    assert [r.key for r in records] == [str(i) if i not in (10, 70, 71, 100) else str(inputs[i])
                                        for i in range(150)]
    assert records[10].error["type"] == "ReadError" and "gone.jpg" in records[10].error["message"]
    assert records[70].error["type"] == "ReadError" and records[71].error["type"] == "DecodeError"
    ok = [r for i, r in enumerate(records) if i not in (10, 70, 71)]
    assert all(r.error is None for r in ok)
    # Each photo gets one answer wherever it sits in the stream (the cat is one of SAMPLES).
    by_photo: dict[int, set[int]] = {}
    for i, r in enumerate(records):
        if r.error is None:
            by_photo.setdefault(3 if i == 100 else i % len(datas), set()).add(r.labels[0]["class_id"])
    assert all(len(ids) == 1 for ids in by_photo.values()), by_photo
    assert by_photo[SAMPLES.index(next(p for p in SAMPLES if "chelsea" in p.name))] <= CAT_CLASSES


def test_a_decoder_killed_during_map_loses_nothing(recognizer, photos):
    data = jpeg_bytes(photos["chelsea"], size=(1600, 1067))
    decoders = [pid for pid, cmd in _workers().items() if " decoder " in cmd]
    assert decoders, _workers()
    records = []
    for i, record in enumerate(recognizer.map([data] * 120, window=64)):
        if i == 5:
            os.kill(decoders[0], signal.SIGKILL)
        records.append(record)
    assert [r.key for r in records] == [str(i) for i in range(120)]
    assert all(r.error is None and r.labels[0]["class_id"] in CAT_CLASSES for r in records), \
        [r.error for r in records if r.error][:3]
    assert decoders[0] not in _workers()  # it was replaced, not spared


def test_stopping_early_then_closing_leaves_nothing_behind(tmp_path):
    from wanwu import Recognizer

    before = set(_workers())  # the module's recognizer's, when it runs
    r = Recognizer(decoders=1, top_k=1).start()
    try:
        workers = {pid: cmd for pid, cmd in _workers().items() if pid not in before}
        assert len(workers) == 2, workers  # one decoder, one inference process
        stream = r.map(SAMPLES * 100, window=16)
        first = [next(stream) for _ in range(3)]
        stream.close()  # the caller stops early: the rest is dropped, the recognizer stays usable
        assert [rec.key for rec in first] == [str(p) for p in SAMPLES[:3]]
        (again,) = r.recognise([SAMPLES[0].read_bytes()])
        assert again.error is None and again.labels[0]["class_id"] == first[0].labels[0]["class_id"]
    finally:
        r.close()
    deadline = time.monotonic() + 10
    while any(pid in children_of(os.getpid()) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not set(workers) & set(children_of(os.getpid()))
    with pytest.raises(ServeError, match="expected a started Recognizer"):
        r.recognise([SAMPLES[0].read_bytes()])
    r.close()  # twice is fine


def test_settings_are_checked_before_any_process_starts():
    from wanwu import Recognizer

    with pytest.raises(ConfigError, match="bogus"):
        Recognizer(bogus=1)
    with pytest.raises(ConfigError, match="front-door settings"):
        Recognizer(http=True)
    with pytest.raises(ConfigError, match="top_k must be positive|--top-k must be positive"):
        Recognizer(top_k=0)
    with pytest.raises(ConfigError, match="python"):  # the API's own door is not a daemon setting
        ServeConfig.build({"python": True})
    before = set(_workers())
    assert Recognizer(top_k=2).config.top_k == 2 and set(_workers()) == before  # nothing started


def test_keys_must_match_the_images(recognizer):
    with pytest.raises(ConfigError, match="one key per image"):
        recognizer.recognise([b"x", b"y"], keys=["a"])


def test_import_wanwu_stays_light_until_the_recognizer_is_asked_for():
    code = ("import sys, wanwu; print(json.dumps(['zmq' in sys.modules, 'wanwu.pipeline.api' in sys.modules])); "
            "from wanwu import Recognizer; print(json.dumps([Recognizer.__module__]))")
    out = subprocess.run([sys.executable, "-c", "import json; " + code], capture_output=True, text=True, check=True)
    lines = out.stdout.splitlines()
    assert json.loads(lines[0]) == [False, False] and json.loads(lines[1]) == ["wanwu.pipeline.api"]


def test_closing_from_another_thread_ends_a_map_with_a_clear_error():
    import threading

    from wanwu import Recognizer

    r = Recognizer(decoders=1, top_k=1).start()
    seen = []
    try:
        # Every request is submitted at once (a window of all 1,024 images): some run, the rest
        # wait in the thread pool, and close() cancels those.
        stream = r.map([SAMPLES[0].read_bytes()] * 1024, window=1024)
        seen.append(next(stream))
        threading.Thread(target=r.close).start()
        with pytest.raises(ServeError) as caught:
            for record in stream:
                seen.append(record)
    finally:
        r.close()
    assert caught.value.reason == "not_ready" and len(seen) < 1024
    # What came before the error is whole: real answers, or error records naming the shutdown.
    assert all(rec.error is None or "shut down" in rec.error["message"] for rec in seen)


def test_pixels_are_recognised_as_their_encoded_photo_is(recognizer):
    import numpy as np
    from PIL import Image

    coffee = next(p for p in SAMPLES if "coffee" in p.name)  # espresso by far (95%): no near tie to flip
    rgb = np.asarray(Image.open(coffee).convert("RGB"))
    gray = np.asarray(Image.open(coffee).convert("L"))
    inputs = [coffee.read_bytes(), rgb, gray, rgb.astype(np.float32), rgb[..., :2], 42]
    encoded, from_rgb, from_gray, floats, two_channels, number = recognizer.recognise(inputs)
    assert from_rgb.error is None and (from_rgb.width, from_rgb.height) == (rgb.shape[1], rgb.shape[0])
    assert from_rgb.labels[0]["class_id"] == encoded.labels[0]["class_id"]
    assert from_gray.error is None and (from_gray.width, from_gray.height) == (gray.shape[1], gray.shape[0])
    for bad in (floats, two_channels):  # refused in its place, with what came
        assert bad.error["type"] == "DecodeError" and "expected uint8 pixels" in bad.error["message"], bad
    assert number.error["type"] == "ReadError" and "got int" in number.error["message"]
    assert [r.key for r in (encoded, from_rgb, number)] == ["0", "1", "5"]


def test_unordered_map_does_not_hold_records_behind_a_slow_image(tmp_path):
    from conftest import write_slow_png
    from wanwu import Recognizer

    write_slow_png(tmp_path / "slow.png")  # seconds to decode, in one of the two decoders
    slow = str(tmp_path / "slow.png")
    inputs = [slow] + [SAMPLES[1].read_bytes()] * 20
    # batch 4: requests of one image each, so that each record can come on its own
    with Recognizer(decoders=2, batch_size=4, top_k=1) as r:
        unordered = [rec.key for rec in r.map(inputs, window=24, ordered=False)]
        ordered = [rec.key for rec in r.map(inputs, window=24)]
        with pytest.raises(ConfigError, match="window of at most"):  # refused at the call, not at the first record
            r.map(inputs, window=10 ** 6)
    assert sorted(unordered) == sorted([slow] + [str(i) for i in range(1, 21)])
    assert unordered[0] != slow  # the other decoder's images came first
    assert ordered == [slow] + [str(i) for i in range(1, 21)]
