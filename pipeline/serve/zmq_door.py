"""The ZeroMQ front door: request/reply on a ROUTER socket, fire-and-forget on a PULL socket.

Request/reply (``request_addr``): a DEALER client sends ``[request_id, image_1, ...,
image_n]`` and gets ``[request_id, json]`` back, json being UTF-8 (Chinese labels
unescaped) and one of::

    {"id": "<request_id>", "records": [record, ...]}            # one per image, in order
    {"id": "<request_id>", "error": {"type": reason, "message": "..."}}

``id`` is the request id decoded as UTF-8, or in hex when it is not UTF-8; it must
be non-empty. A REQ client (or a DEALER that starts its messages with an empty
frame) works too: whatever envelope came in goes back in front of the reply.
An image that cannot be recognised is a record with ``error`` set; ``error`` at
the top is about the request as a whole: a ``ServeError`` reason (``queue_full``,
``timeout``, ``not_ready``, ``too_large``, ...), ``bad_request`` for a message
without images, ``too_large`` for more than ``max_request_bytes`` or
``max_images_per_request``, ``internal`` for anything unexpected.

Stream (``stream_addr``): a PUSH client sends ``[name, image]`` or ``[image]``;
each image becomes one record, keyed by ``name`` (or ``zmq-<n>``), handed to
``on_records``. Nothing is answered and nothing is dropped: a request-level
failure becomes that image's error record.

One I/O thread owns the sockets (ZeroMQ sockets are not thread-safe); requests
and stream images run in two thread pools, so concurrent requests reach the
backend together (which batches them) and a busy stream cannot starve replies.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

import zmq

from wanwu.errors import ConfigError, TransportError
from wanwu.records import Record
from wanwu.pipeline.topology.transport import Waker
from wanwu.pipeline.serve.backend import Backend, ServeError
from wanwu.pipeline.serve.curve import load_server_key, start_authenticator

logger = logging.getLogger(__name__)

# libzmq delivers a multipart message only once all its frames have arrived, and holds
# them until then; its only bound is on one frame (MAXMSGSIZE), checked against the
# frame's header before the frame is read. So a frame larger than a whole request may
# be is refused there (the connection drops, nothing is held); a message of frames
# each within the limit but together over it is read and answered "too_large".
_HARD_FRAME_FACTOR = 1
_LINGER_MS = 1000  # on shutdown, give replies already queued this long to leave
_POLL_MS = 500  # the I/O thread is woken explicitly; this is only a safety net
_READ_BURST = 64  # messages read per socket per loop, so replies are not held back
STREAM_PREFIX = "zmq-"  # keys of unnamed stream images: zmq-1, zmq-2, ...
# A failed write of stream records (a full disk) is tried again after this, doubling up to the
# most: meanwhile the door takes no new images, so senders wait at their high-water mark.
WRITE_RETRY_S, WRITE_RETRY_MAX_S = 0.5, 10.0


class ZmqDoor:
    """Serve ``backend`` over ZeroMQ: ROUTER request/reply and/or PULL stream.

    ``start()`` binds and serves from a background thread; ``shutdown()`` stops reading,
    lets work in flight finish (at most ``drain_s``) and is safe to call twice.

    Args:
        backend: what recognises the images.
        request_addr: ROUTER endpoint to bind, e.g. ``"tcp://127.0.0.1:5555"`` (port ``0`` or
            ``*`` picks a free one); None = no request/reply.
        stream_addr: PULL endpoint to bind; None = no stream. Needs ``on_records``.
        on_records: receives stream records; returns once they are durable. Called from
            worker threads, one call at a time; records waiting meanwhile go in the next call.
        curve_secret_key_file: the server's ``zmq.auth`` certificate with its secret key; both
            sockets become CURVE servers. None = plain sockets.
        curve_clients_dir: folder of client public certificates (``*.key``, read at start);
            only those clients are admitted. None = any client that knows the server key.
        max_request_bytes: most image bytes in one request or stream message.
        max_images_per_request: most images in one request; None = the backend's limit.
        threads: requests (and, separately, stream images) in flight at once; more wait in
            ZeroMQ's queues, which pushes back on clients at the high-water mark.
        timeout_s: passed to ``backend.submit``; None = the backend's default.
        drain_s: how long ``shutdown()`` waits for work in flight.
    """

    def __init__(self, backend: Backend, *, request_addr: str | None = None, stream_addr: str | None = None,
                 on_records: Callable[[list[Record]], None] | None = None, curve_secret_key_file: str | None = None,
                 curve_clients_dir: str | None = None, max_request_bytes: int = 64 << 20,
                 max_images_per_request: int | None = None, threads: int = 16, timeout_s: float | None = None,
                 drain_s: float = 30.0, claim_key: Callable[[str | None, str], str] | None = None) -> None:
        if request_addr is None and stream_addr is None:
            raise ConfigError("expected a request_addr, a stream_addr or both, got neither")
        if stream_addr is not None and on_records is None:
            raise ConfigError(f"expected on_records to receive the records of stream {stream_addr!r}, got None")
        if curve_clients_dir is not None and curve_secret_key_file is None:
            raise ConfigError("expected curve_secret_key_file with curve_clients_dir (clients are checked only "
                              "on CURVE sockets), got no secret key file")
        if threads < 1 or max_request_bytes < 1 or (max_images_per_request is not None and max_images_per_request < 1):
            raise ConfigError(f"expected threads, max_request_bytes and max_images_per_request >= 1, got {threads}, "
                              f"{max_request_bytes}, {max_images_per_request}")
        self.backend = backend
        self.request_addr, self.stream_addr = request_addr, stream_addr
        self.on_records = on_records
        # The stream's keys, unique in the output across runs (SinkWriter.claim_key); without
        # one, names are used as sent and unnamed images are numbered from 1.
        self._claim_key = claim_key
        self.max_request_bytes = max_request_bytes
        self.max_images_per_request = max_images_per_request
        self.threads = threads
        self.timeout_s = timeout_s
        self.drain_s = drain_s
        self.endpoints: dict[str, str] = {}  # "request"/"stream" -> bound endpoint, after start()
        self._curve = load_server_key(curve_secret_key_file) if curve_secret_key_file else None
        self._clients_dir = curve_clients_dir
        if curve_clients_dir is not None and not os.path.isdir(curve_clients_dir):
            raise ConfigError(f"expected a folder of client public keys (*.key), got {curve_clients_dir!r}")
        self._lock = threading.Lock()
        self._closed = False
        self._ctx: zmq.Context | None = None
        self._auth = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        # Workers hand finished work to the I/O thread here and wake it through a pipe,
        # which zmq.Poller watches next to the sockets.
        self._finished: queue.SimpleQueue = queue.SimpleQueue()
        self._waker: Waker | None = None
        self._requests_in_flight = self._stream_in_flight = 0  # touched by the I/O thread only
        self._stream_count = 0
        self._pending: list[Record] = []  # stream records waiting for on_records
        self._pending_lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._request_pool: ThreadPoolExecutor | None = None
        self._stream_pool: ThreadPoolExecutor | None = None

    def start(self) -> dict[str, str]:
        """Bind and serve from a background thread; return ``{"request": ep, "stream": ep}`` as bound.

        Idempotent while running.

        Raises:
            ConfigError: an address cannot be bound (malformed, in use, not allowed).
            TransportError: the door was shut down already.
        """
        with self._lock:
            if self._closed:
                raise TransportError("expected a door that was not shut down; create a new ZmqDoor to serve again")
            if self._thread is not None:
                return dict(self.endpoints)
            ctx = zmq.Context()
            router = pull = None
            try:
                if self._clients_dir is not None:
                    self._auth = start_authenticator(ctx, self._clients_dir)
                if self.request_addr is not None:
                    # Few requests wait here per client; the rest wait at the client, whose send blocks.
                    router = self._bind(ctx, zmq.ROUTER, self.request_addr, "request", rcvhwm=2 * self.threads)
                if self.stream_addr is not None:
                    # Few stream images wait here; the rest wait at the pusher, whose send blocks.
                    pull = self._bind(ctx, zmq.PULL, self.stream_addr, "stream", rcvhwm=2 * self.threads)
            except BaseException:
                for sock in (router, pull):
                    if sock is not None:
                        sock.close(0)
                if self._auth is not None:
                    self._auth.stop()
                self._auth, self.endpoints = None, {}
                ctx.term()
                raise
            self._ctx = ctx
            self._waker = Waker()
            self._request_pool = ThreadPoolExecutor(self.threads, thread_name_prefix="zmq-request")
            self._stream_pool = ThreadPoolExecutor(self.threads, thread_name_prefix="zmq-stream")
            # Sockets move to the I/O thread here; starting a thread is the memory barrier ZeroMQ asks for.
            self._thread = threading.Thread(target=self._serve, args=(router, pull), name="zmq-door", daemon=True)
            self._thread.start()
            logger.info("ZeroMQ front door on %s%s", self.endpoints, " (CURVE)" if self._curve else "")
            return dict(self.endpoints)

    def alive(self) -> bool:
        """Whether the door's I/O thread runs."""
        return self._thread is not None and self._thread.is_alive()

    def shutdown(self) -> None:
        """Stop reading, let work in flight finish (at most ``drain_s``), close. Safe to call twice."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            thread = self._thread
        if thread is None:
            return
        self._stopping.set()
        self._wake()
        thread.join()
        for pool in (self._request_pool, self._stream_pool):
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)
        if self._waker is not None:
            self._waker.close()  # a late worker's wake() is then a no-op
        if self._auth is not None:
            self._auth.stop()
        if self._ctx is not None:
            self._ctx.term()  # the I/O thread closed the sockets with a linger, so this returns promptly

    # --- the I/O thread

    def _bind(self, ctx: zmq.Context, kind: int, addr: str, role: str, rcvhwm: int = 1000) -> zmq.Socket:
        sock = ctx.socket(kind)
        sock.linger = _LINGER_MS
        sock.rcvhwm = rcvhwm  # before bind: a pipe takes the high-water mark set when it is made
        sock.maxmsgsize = _HARD_FRAME_FACTOR * self.max_request_bytes
        if self._curve is not None:
            sock.curve_publickey, sock.curve_secretkey = self._curve
            sock.curve_server = True
        try:
            sock.bind(addr)
        except zmq.ZMQError as exc:
            sock.close(0)
            raise ConfigError(f"expected a ZeroMQ endpoint this host can bind for the {role} socket "
                              f"(e.g. tcp://127.0.0.1:5555), got {addr!r}: {exc}") from exc
        self.endpoints[role] = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        return sock

    def _serve(self, router: zmq.Socket | None, pull: zmq.Socket | None) -> None:
        poller = zmq.Poller()
        assert self._waker is not None
        poller.register(self._waker.fd, zmq.POLLIN)
        deadline = None
        try:
            while True:
                self._collect(router)
                if self._stopping.is_set():
                    deadline = deadline or time.monotonic() + self.drain_s
                    if self._requests_in_flight + self._stream_in_flight == 0:
                        break
                    if time.monotonic() >= deadline:
                        logger.warning("ZeroMQ door closing with %d requests and %d stream images unfinished",
                                       self._requests_in_flight, self._stream_in_flight)
                        break
                # Read a socket only while a worker is free for what it brings: the rest
                # waits in ZeroMQ's queues, up to the high-water mark that stops senders.
                if router is not None:
                    poller.register(router, zmq.POLLIN if self._accepting(self._requests_in_flight) else 0)
                if pull is not None:
                    poller.register(pull, zmq.POLLIN if self._accepting(self._stream_in_flight) else 0)
                events = dict(poller.poll(_POLL_MS))
                if self._waker.fd in events:
                    self._waker.drain()
                if router is not None and router in events:
                    self._read_requests(router)
                if pull is not None and pull in events:
                    self._read_stream(pull)
        except Exception:  # a bug here must not leave clients hanging silently
            logger.exception("ZeroMQ door I/O thread failed; closing the door")
        finally:
            for sock in (router, pull):
                if sock is not None:
                    sock.close()

    def _accepting(self, in_flight: int) -> bool:
        return not self._stopping.is_set() and in_flight < self.threads

    def _collect(self, router: zmq.Socket | None) -> None:
        """Send the replies workers finished and count finished stream images."""
        while True:
            try:
                kind, frames = self._finished.get_nowait()
            except queue.Empty:
                return
            if kind == "stream":
                self._stream_in_flight -= 1
                continue
            self._requests_in_flight -= 1
            if router is not None and frames is not None:
                _send(router, frames)

    def _read_requests(self, router: zmq.Socket) -> None:
        for _ in range(_READ_BURST):
            if not self._accepting(self._requests_in_flight):
                return
            try:
                frames = router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                self._dispatch_request(router, frames)
            except Exception:  # one odd message must not stop the door
                logger.exception("ZeroMQ door: could not handle a request of %d frames", len(frames))

    def _dispatch_request(self, router: zmq.Socket, frames: list[bytes]) -> None:
        # frames[0] is the peer identity ROUTER prepends; an empty frame after it is a
        # REQ client's delimiter, which must come back in the reply's envelope.
        split = 2 if len(frames) > 1 and frames[1] == b"" else 1
        envelope, body = frames[:split], frames[split:]
        request_id = body[0] if body else b""
        images = body[1:]
        problem = self._check_request(body, images)
        if problem is not None:
            _send(router, envelope + [request_id, _error_reply(request_id, problem)])
            return
        self._requests_in_flight += 1
        assert self._request_pool is not None
        self._request_pool.submit(self._handle_request, envelope, request_id, images)

    def _check_request(self, body: list[bytes], images: list[bytes]) -> ServeError | None:
        if not body:
            return ServeError("bad_request", "expected [request_id, image, ...], got an empty message")
        if not images:
            return ServeError("bad_request", "expected at least one image after the request id, got none")
        size = sum(len(image) for image in images)
        if size > self.max_request_bytes:
            return ServeError("too_large", f"expected at most {self.max_request_bytes} bytes of images per "
                                           f"request, got {size}")
        limit = self.max_images_per_request
        if limit is not None and len(images) > limit:
            return ServeError("too_large", f"expected at most {limit} images per request, got {len(images)}")
        return None

    def _read_stream(self, pull: zmq.Socket) -> None:
        for _ in range(_READ_BURST):
            if not self._accepting(self._stream_in_flight):
                return
            try:
                frames = pull.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._stream_count += 1
            given = frames[0].decode("utf-8", "backslashreplace") if len(frames) == 2 and frames[0] else None
            if self._claim_key is not None:  # a name sent again, or an earlier run's numbers, would lose the record
                name = self._claim_key(given, STREAM_PREFIX)
            else:
                name = given if given is not None else f"{STREAM_PREFIX}{self._stream_count}"
            image, problem = frames[-1], None
            if len(frames) > 2:
                problem = ServeError("bad_request", f"expected [name, image] or [image], got {len(frames)} frames")
            elif len(image) > self.max_request_bytes:
                problem = ServeError("too_large", f"expected an image of at most {self.max_request_bytes} bytes, "
                                                  f"got {len(image)}")
            self._stream_in_flight += 1
            assert self._stream_pool is not None
            self._stream_pool.submit(self._handle_stream, name, image, problem)

    # --- worker threads

    def _handle_request(self, envelope: list[bytes], request_id: bytes, images: Sequence[bytes]) -> None:
        frames = None
        try:
            frames = envelope + [request_id, self._answer(request_id, images)]
        finally:  # the I/O thread must count this request as finished, answered or not
            self._post("reply", frames)

    def _answer(self, request_id: bytes, images: Sequence[bytes]) -> bytes:
        """The reply's JSON: records, or the error that stopped the request as a whole."""
        try:
            records = self.backend.submit(images, timeout_s=self.timeout_s, source="zmq")
            return json.dumps({"id": _id_text(request_id), "records": [r.to_dict() for r in records]},
                              ensure_ascii=False).encode("utf-8")
        except ServeError as exc:
            return _error_reply(request_id, exc)
        except Exception as exc:  # a backend bug: answer rather than leave the client waiting
            logger.exception("ZeroMQ door: request %r failed", _id_text(request_id))
            return _error_reply(request_id, ServeError("internal", f"{type(exc).__name__}: {exc}"))

    def _handle_stream(self, name: str, image: bytes, problem: ServeError | None) -> None:
        try:
            self._deliver([self._stream_record(name, image, problem)])
        except Exception:
            logger.exception("ZeroMQ door: stream image %r was lost", name)
        finally:  # the I/O thread must count this image as finished, written or not
            self._post("stream", None)

    def _stream_record(self, name: str, image: bytes, problem: ServeError | None) -> Record:
        """The backend's record under the stream's name, or an error record naming the request's failure."""
        t0 = time.time()
        if problem is None:
            try:
                return self.backend.submit([image], timeout_s=self.timeout_s, source="zmq", keys=[name])[0]
            except ServeError as exc:
                problem = exc
            except Exception as exc:
                logger.exception("ZeroMQ door: stream image %r failed", name)
                problem = ServeError("internal", f"{type(exc).__name__}: {exc}")
        try:
            model = self.backend.info().name
        except Exception:  # the record matters more than its model name
            model = ""
        return Record.failure(name, "zmq", model, problem, t0)  # type: the ServeError's reason

    def _deliver(self, records: list[Record]) -> None:
        """Hand records to ``on_records`` one call at a time; returns once they were written.

        Group commit: records that arrive while a call runs are written together by the
        next one, so a durable sink syncs once per group rather than once per image.

        A fire-and-forget sender cannot be told of a failed write, so a failed group is
        kept and tried again (``WRITE_RETRY_S``, doubling) until it is written. The images
        waiting on it stay in flight meanwhile, which stops the door from reading new ones
        (``_accepting``): the senders wait at their high-water mark and nothing is lost.
        Only when the door closes while writes still fail are records given up, with an error.
        """
        assert self.on_records is not None
        with self._pending_lock:
            self._pending.extend(records)
        delay = WRITE_RETRY_S
        with self._write_lock:
            while True:
                with self._pending_lock:
                    group, self._pending = self._pending, []
                if not group:
                    return
                try:
                    self.on_records(group)
                    return
                except Exception as exc:
                    if self._stopping.is_set():
                        logger.exception("ZeroMQ door closing: %d stream records could not be written and are "
                                         "lost", len(group))
                        return
                    logger.error("ZeroMQ door: %d stream records could not be written (%s); trying again in "
                                 "%.1f s, taking no new images meanwhile", len(group), exc, delay)
                    with self._pending_lock:
                        self._pending[:0] = group
                    self._stopping.wait(delay)  # a closing door tries once more at once
                    delay = min(WRITE_RETRY_MAX_S, delay * 2)

    def _post(self, kind: str, frames: list[bytes] | None) -> None:
        self._finished.put((kind, frames))
        self._wake()

    def _wake(self) -> None:
        if self._waker is not None:
            self._waker.wake()


def _send(sock: zmq.Socket, frames: list[bytes]) -> None:
    try:
        sock.send_multipart(frames, zmq.NOBLOCK)  # ROUTER drops replies to peers that are gone
    except zmq.ZMQError as exc:
        logger.warning("ZeroMQ door: a reply was dropped (%s)", exc)


def _id_text(request_id: bytes) -> str:
    try:
        return request_id.decode("utf-8")
    except UnicodeDecodeError:
        return request_id.hex()


def _error_reply(request_id: bytes, exc: ServeError) -> bytes:
    doc = {"id": _id_text(request_id), "error": {"type": exc.reason, "message": str(exc)}}
    return json.dumps(doc, ensure_ascii=False).encode("utf-8")
