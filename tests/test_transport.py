"""What the processes share, piece by piece: messages, the wake-up pipe, the slot pool, the batching
policy, and the registries the stages are found in."""

from __future__ import annotations

import math
import os
import pickle
import subprocess
import sys
import threading
import time
from dataclasses import fields

import numpy as np
import pytest
import zmq

from wanwu.errors import ConfigError, TransportError
from wanwu.pipeline.topology import messages, transport
from wanwu.pipeline.topology.batching import BatchPolicy
from wanwu.pipeline.topology.messages import Event, EventKind
from wanwu.pipeline.topology.shm import SlotPool
from wanwu.pipeline.topology.transport import Waker
from wanwu.records import Record
from wanwu.registry import Registry
from wanwu.specs import FrameSpec

RECORD = Record("猫.jpg", "photos", 451, 300, [{"label": "埃及猫", "label_en": "Egyptian cat", "class_id": 285,
                                                "score": 0.39}], "efficientnet_lite0", 12.5)


def _instances() -> list[object]:
    try:
        raise ValueError("坏了 broken")
    except ValueError as exc:
        fatal = Event.fatal("decoder-1", 42, exc)
    return [
        messages.WorkItem(7, "a/猫.jpg", "photos", 1.5, attempt=2),
        messages.Decoded(7, "a/猫.jpg", "photos", 3, 451, 300, 1.5, producer=1, generation=4),
        messages.Release((1, 2, 3)),
        messages.Taken((7, 8), 1, 4),
        messages.Results((7,), (RECORD,)),
        messages.Records((RECORD, Record.failure("bad.jpg", "photos", "m", ValueError("x"), 0.0))),
        messages.ScanDone(41),
        messages.End(complete=False),
        Event(EventKind.BATCH, "inference", 9, {"size": 8}),
        fatal,
        messages.Stop(),
        messages.Drain(),
        messages.Lost(((0, 1),), True, ((0, 2),)),
    ]


@pytest.mark.parametrize("msg", _instances(), ids=lambda m: type(m).__name__)
def test_every_message_survives_the_trip_between_processes(msg):
    again = messages.loads(messages.dumps(msg))
    assert again == msg and type(again) is type(msg)


def test_a_fatal_event_carries_the_exception_across():
    fatal = next(m for m in _instances() if isinstance(m, Event) and m.kind is EventKind.FATAL)
    assert fatal.data["type"] == "ValueError" and fatal.data["message"] == "坏了 broken"
    assert "raise ValueError" in fatal.data["traceback"]


def test_a_payload_frame_travels_after_its_message():
    ctx = zmq.Context()
    try:
        addr = "inproc://payload"
        pull = transport.socket(ctx, zmq.PULL, addr, bind=True)
        push = transport.socket(ctx, zmq.PUSH, addr, bind=False)
        transport.send(push, messages.WorkItem(1, "k", "s", 0.0), b"\xff\xd8 jpeg bytes")
        msg, payload = transport.recv(pull)
        assert msg == messages.WorkItem(1, "k", "s", 0.0) and bytes(payload.buffer) == b"\xff\xd8 jpeg bytes"
    finally:
        ctx.destroy(linger=0)


def test_records_keep_their_field_order_and_error_types():
    from wanwu.records import RECORD_FIELDS

    assert list(RECORD.to_dict()) == list(RECORD_FIELDS) == [f.name for f in fields(Record)][:-2]
    assert [f.name for f in fields(Record)][-2:] == ["cached", "frame"]  # optional, written only when set
    assert RECORD.__class__(**{**RECORD.to_dict(), "cached": True}).to_dict()["cached"] is True
    frame = {"stream": "cam", "frame": 7, "pts_s": 0.28}
    assert list(RECORD.__class__(**{**RECORD.to_dict(), "frame": frame}).to_dict())[-1] == "frame"
    from wanwu.pipeline.serve.backend import ServeError

    failed = Record.failure("k", "zmq", "m", ServeError("queue_full", "full"), t0=time.time() - 0.01)
    assert failed.error == {"type": "queue_full", "message": "full"} and failed.elapsed_ms >= 10
    assert (failed.width, failed.height, failed.labels, failed.ok) == (None, None, [], False)


def test_the_waker_interrupts_a_poll_from_another_thread_and_is_safe_after_close():
    waker = Waker()
    poller = zmq.Poller()
    poller.register(waker.fd, zmq.POLLIN)
    threading.Timer(0.1, waker.wake).start()
    start = time.monotonic()
    assert dict(poller.poll(5000)).get(waker.fd) and time.monotonic() - start < 4
    waker.drain()
    assert not dict(poller.poll(0))  # drained
    for _ in range(100_000):  # a full pipe does not block the waker
        waker.wake()
    waker.close()
    waker.close()
    waker.wake()  # after close: nothing, not a write to a descriptor number reused since


def _attach_and_write(fd: int) -> None:
    pool = SlotPool.attach(fd, FrameSpec((4, 4, 3)), 3)
    pool.frame(2)[...] = 7
    pool.close()


def test_the_slot_pool_is_shared_with_a_child_by_descriptor_and_has_no_name(tmp_path):
    pool = SlotPool.create(FrameSpec((4, 4, 3)), 3)
    try:
        assert os.readlink(f"/proc/self/fd/{pool.fd}").startswith("/memfd:wanwu-pool-")
        code = ("import sys; from wanwu.specs import FrameSpec; from wanwu.pipeline.topology.shm import SlotPool; "
                "p = SlotPool.attach(int(sys.argv[1]), FrameSpec((4, 4, 3)), 3); p.frame(2)[...] = 7; p.close()")
        subprocess.run([sys.executable, "-c", code, str(pool.fd)], pass_fds=(pool.fd,), check=True, timeout=60)
        assert (pool.frames[2] == 7).all() and (pool.frames[:2] == 0).all()
        batch = pool.gather([2, 0], out=np.empty((2, 4, 4, 3), np.uint8))
        assert (batch[0] == 7).all() and (batch[1] == 0).all()
        with pytest.raises(TransportError, match="expected"):
            SlotPool.attach(os.dup(pool.fd), FrameSpec((4, 4, 3)), 4)  # a wrong size is refused
    finally:
        pool.close()
        pool.close()
    with pytest.raises(TransportError, match="host memory"):
        SlotPool.create(FrameSpec((4, 4, 3), device="cuda:0"), 1)


def test_the_batch_policy_runs_full_batches_at_once_and_partial_ones_on_either_clock():
    policy = BatchPolicy(max_batch_size=8, max_queue_delay_ms=5.0, idle_flush_ms=2.0, preferred_batch_sizes=(4,))
    assert policy.take(0, 1.0, 1.0) == 0
    assert policy.take(12, 0.0, 0.0) == 8  # full
    assert policy.take(5, 0.0, 0.0) == 4  # a preferred size reached
    assert policy.take(3, 0.0, 0.0) == 0  # wait for company
    assert policy.take(3, 0.006, 0.0) == 3  # the oldest waited max_queue_delay_ms
    assert policy.take(3, 0.0, 0.003) == 3  # the input paused idle_flush_ms
    assert policy.wait_s(3, 0.001, 0.0) == pytest.approx(0.002)  # until the idle clock runs out
    assert policy.wait_s(0, 0.0, 0.0) > 0
    batch_job = BatchPolicy(32, math.inf, 50.0)
    assert batch_job.take(31, 100.0, 0.01) == 0 and batch_job.take(31, 100.0, 0.05) == 31
    for bad in ({"max_batch_size": 0}, {"idle_flush_ms": -1}, {"preferred_batch_sizes": (9,), "max_batch_size": 8}):
        with pytest.raises(ConfigError):
            BatchPolicy(**bad)


def test_a_registry_refuses_a_second_registration_and_names_its_choices():
    registry: Registry[object] = Registry("widget")
    registry.register("a", "os.path:join")
    registry.register("a", "os.path:join")  # the same target again is harmless
    with pytest.raises(ConfigError, match="widget 'a' is already registered"):
        registry.register("a", "os.path:split")
    with pytest.raises(ConfigError, match="unknown widget 'b'; expected one of a"):
        registry.get("b")
    assert registry.get("a") is os.path.join  # imported on first use


def test_every_registered_stage_imports():
    from wanwu.stages.decoders.base import DECODERS
    from wanwu.stages.engines.base import ENGINES
    from wanwu.stages.models.base import MODELS
    from wanwu.stages.sinks.base import SINKS
    from wanwu.stages.sources.base import FRAME_SOURCES, SOURCES

    for registry in (DECODERS, ENGINES, MODELS, SINKS, SOURCES, FRAME_SOURCES):
        for name in registry.names():
            if registry is DECODERS and name == "dali":
                pytest.importorskip("nvidia.dali")
            assert callable(registry.get(name)), (registry.kind, name)


def test_pickled_worker_specs_carry_sources(tmp_path):
    from wanwu.pipeline.config import JobConfig
    from wanwu.pipeline.topology.plan import make_plan
    from wanwu.pipeline.topology.transport import Endpoints
    from wanwu.pipeline.workers.base import WorkerSpec
    from wanwu.stages.models.base import get_model_spec
    from wanwu.stages.sources.base import open_source

    cfg = JobConfig(inputs=(str(tmp_path),), out="r.jsonl", decoders=1)
    sources = (open_source(str(tmp_path)),)
    spec = WorkerSpec("loader", 0, cfg, make_plan(cfg, get_model_spec(), sources), Endpoints(str(tmp_path)), 5,
                      sources=sources)
    again = pickle.loads(pickle.dumps(spec))
    assert (again.cfg, again.plan, again.endpoints) == (spec.cfg, spec.plan, spec.endpoints)
    assert [(s.kind, s.location) for s in again.sources] == [("folder", str(tmp_path))]
    assert again.name == "loader" and again.producer == -1 and not again.uses_pool


def test_a_second_live_binder_of_an_ipc_address_is_refused_and_a_dead_ones_file_is_taken_over(tmp_path):
    """ZeroMQ would let the second bind silently take the address from the first."""
    addr = f"ipc://{tmp_path / 'work'}"
    ctx = zmq.Context()
    try:
        first = transport.socket(ctx, zmq.PUSH, addr, bind=True)
        with pytest.raises(TransportError, match="only process bound to"):
            transport.socket(ctx, zmq.PUSH, addr, bind=True)
        first.close()
        # A worker killed -9 leaves its socket file behind; its replacement binds the address again.
        code = f"import zmq, os; s = zmq.Context().socket(zmq.PULL); s.bind({addr!r}); os._exit(0)"
        subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
        assert (tmp_path / "work").exists()
        again = transport.socket(ctx, zmq.PUSH, addr, bind=True)
        peer = transport.socket(ctx, zmq.PULL, addr, bind=False)
        transport.send(again, {"ok": 1})
        assert peer.poll(5000) and transport.recv(peer)[0] == {"ok": 1}
        again.close()
        peer.close()
    finally:
        ctx.destroy(linger=0)
