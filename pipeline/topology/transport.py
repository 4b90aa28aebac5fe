"""ZeroMQ plumbing: where each socket lives and how it is opened.

Every socket is ``ipc://`` in the job's private folder. Binders and connecters
may start in any order (ZeroMQ reconnects). High-water marks are small so that
encoded bytes in flight stay bounded whatever the job size.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import zmq

from wanwu.errors import TransportError
from wanwu.pipeline.topology.messages import dumps, loads
from wanwu.pipeline.topology.shm import pid_alive

JOB_DIR_PREFIX = "wanwu-job-"


@dataclass(frozen=True)
class Endpoints:
    """The topology's socket addresses (all under one private folder)."""

    root: str  # the job's private folder

    def _ipc(self, name: str) -> str:
        return f"ipc://{os.path.join(self.root, name)}"

    @property
    def work(self) -> str:  # feeder PUSH (bind) -> decoders PULL
        return self._ipc("work")

    @property
    def decoded(self) -> str:  # producers PUSH -> inference PULL (bind)
        return self._ipc("decoded")

    def release(self, producer: int) -> str:  # inference PUSH -> producer i PULL (bind)
        return self._ipc(f"release-{producer}")

    @property
    def results(self) -> str:  # decoders and inference PUSH -> feeder PULL (bind): Taken, Results
        return self._ipc("results")

    @property
    def frame_results(self) -> str:  # inference PUSH -> the loader PULL (bind), when Plan.frames_apart
        return self._ipc("frame-results")

    @property
    def records(self) -> str:  # feeder PUSH -> sink PULL (bind): Records, ScanDone, End
        return self._ipc("records")

    @property
    def events(self) -> str:  # every worker PUSH -> owner PULL (bind)
        return self._ipc("events")

    @property
    def control(self) -> str:  # owner PUB (bind) -> every worker SUB
        return self._ipc("control")


def make_job_dir() -> str:
    """A private folder for the job's sockets, named after this process."""
    return tempfile.mkdtemp(prefix=f"{JOB_DIR_PREFIX}{os.getpid()}-")


def reclaim_stale_job_dirs() -> list[str]:
    """Remove socket folders of jobs whose owner process is gone."""
    removed = []
    for entry in Path(tempfile.gettempdir()).glob(f"{JOB_DIR_PREFIX}*"):
        pid = entry.name[len(JOB_DIR_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not pid_alive(int(pid)) and entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(str(entry))
    return removed


def socket(ctx: zmq.Context, kind: int, addr: str, *, bind: bool, hwm: int = 1000) -> zmq.Socket:
    """Open a socket with bounded queues that does not block the process on close."""
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, hwm)
    sock.setsockopt(zmq.RCVHWM, hwm)
    if kind == zmq.SUB:
        sock.setsockopt(zmq.SUBSCRIBE, b"")
    if bind:
        _refuse_live_ipc(addr)
    (sock.bind if bind else sock.connect)(addr)
    return sock


def _refuse_live_ipc(addr: str) -> None:
    """Raise if a live process listens at the ipc path ``addr``.

    ZeroMQ lets a second bind of an ipc path replace the first without a word: peers that
    connect afterwards reach the newcomer, and the first binder waits for messages that never
    come. A stale file left by a dead worker is fine (its replacement binds it again).

    Raises:
        TransportError: someone answers at that path.
    """
    import socket as _socket

    if not addr.startswith("ipc://") or not os.path.exists(addr[len("ipc://"):]):
        return
    probe = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        probe.connect(addr[len("ipc://"):])
    except OSError:  # ECONNREFUSED: nobody listens there any more
        return
    finally:
        probe.close()
    raise TransportError(f"expected to be the only process bound to {addr}, but a live process already is")


def send(sock: zmq.Socket, msg: object, payload: bytes | memoryview | None = None, flags: int = 0) -> None:
    """Send a pickled message, followed by a raw payload frame if given."""
    if payload is None:
        sock.send(dumps(msg), flags)
    else:
        sock.send_multipart([dumps(msg), payload], flags, copy=False)


def recv(sock: zmq.Socket, flags: int = 0) -> tuple[object, zmq.Frame | None]:
    """Receive ``(message, payload frame or None)``."""
    frames = sock.recv_multipart(flags, copy=False)
    return loads(frames[0].buffer), (frames[1] if len(frames) > 1 else None)


def waiting(sock: zmq.Socket) -> Iterator[object]:
    """The messages already waiting on ``sock``, without blocking (payload frames dropped)."""
    while True:
        try:
            msg, _ = recv(sock, zmq.NOBLOCK)
        except zmq.Again:
            return
        yield msg


class Waker:
    """Wakes a thread blocked in ``zmq.Poller.poll`` from any other thread.

    ZeroMQ sockets belong to one thread, so other threads cannot signal through
    them; a pipe can. Register ``fd`` with the poller (``zmq.POLLIN``), call
    ``drain()`` when it is readable, and ``wake()`` from anywhere. ``wake()`` after
    ``close()`` does nothing, so it never writes to a reused descriptor number.
    """

    def __init__(self) -> None:
        self.fd, self._w = os.pipe()
        os.set_blocking(self.fd, False)
        os.set_blocking(self._w, False)
        self._lock = threading.Lock()
        self._closed = False

    def wake(self) -> None:
        with self._lock:
            if self._closed:
                return
            try:
                os.write(self._w, b"\0")
            except BlockingIOError:  # the pipe is full: a wake-up is pending anyway
                pass

    def drain(self) -> None:
        """Consume the wake-ups so far (called by the polling thread)."""
        try:
            while os.read(self.fd, 4096):
                pass
        except (BlockingIOError, OSError):  # empty, or closed already
            pass

    def close(self) -> None:
        """Close the pipe. Safe to call twice."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            os.close(self._w)
            os.close(self.fd)
