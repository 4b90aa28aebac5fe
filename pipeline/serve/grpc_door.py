"""The gRPC front door: KServe v2 (open inference protocol) as NVIDIA Triton serves it over gRPC.

Triton's official client (``tritonclient.grpc``) works unmodified. The service is
``inference.GRPCInferenceService`` from the protobuf modules ``tritonclient`` ships
(``service_pb2``, ``model_config_pb2``), served by grpcio's asyncio server; the
messages are converted by ``grpc_codec``, the tensors and documents are the HTTP
door's (``kserve_codec``, ``kserve_meta``). Calls:

* ``ServerLive``, ``ServerReady`` (open without the token: probes), ``ModelReady``;
* ``ServerMetadata``, ``ModelMetadata``, ``ModelConfig``, ``ModelStatistics``;
* ``ModelInfer``: input ``IMAGE`` BYTES ``[n, 1]`` or ``[n]``, outputs ``LABELS`` and
  ``SCORES`` in ``raw_output_contents`` (see ``grpc_codec``). The request parameter
  ``timeout`` (microseconds) and the call's deadline bound the wait, the shorter wins;
* ``ModelStreamInfer``: many infer requests on one bidirectional stream. They run
  concurrently and are answered as they finish (match answers by ``id``); a failed
  request is answered with ``error_message`` and the stream goes on.

Every other call (model repository, shared memory, trace and log settings) answers
UNIMPLEMENTED. Errors carry the HTTP door's messages with these codes:

* INVALID_ARGUMENT: a malformed request, more than ``max_images_per_request`` images,
  a bad ``timeout``, an image that cannot be recognised (``"image 1 of 3: DecodeError: ..."``);
* NOT_FOUND: another model or version; UNAUTHENTICATED: token missing or wrong;
* UNAVAILABLE (retry later): queue full, model not ready, a worker lost the image;
* DEADLINE_EXCEEDED: past the timeout or deadline; INTERNAL: a server failure;
* RESOURCE_EXHAUSTED: a message over ``max_request_bytes``, refused by gRPC before it is read.

The server runs on its own event loop in a daemon thread. ``backend.submit`` blocks,
so it runs in a pool of ``threads`` threads: concurrent requests reach the backend
together (which batches them), while health and metadata calls stay on the loop and
answer even when every thread waits on the backend.

Needs ``grpcio`` and ``tritonclient[grpc]``: import this module only when the door is asked for.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import logging
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

import wanwu
from wanwu.errors import ConfigError, TransportError
from wanwu.pipeline.serve import grpc_codec
from wanwu.pipeline.serve import kserve_codec as codec
from wanwu.pipeline.serve.backend import Backend

logger = logging.getLogger(__name__)

_SERVICE = "inference.GRPCInferenceService"
_OPEN_METHODS = frozenset({f"/{_SERVICE}/ServerLive", f"/{_SERVICE}/ServerReady"})  # probes need no token
# Room for what wraps the images in a request (names, shape, parameters, per-image framing).
_ENVELOPE_BYTES = 64 << 10
_START_TIMEOUT_S = 30.0


class GrpcDoor:
    """Serve ``backend`` over gRPC as Triton's ``inference.GRPCInferenceService``.

    ``start()`` binds and serves from a daemon thread that runs the door's own event loop;
    ``shutdown()`` stops accepting calls, lets those in flight finish (at most ``grace_s``)
    and is safe to call twice. A door that was shut down cannot start again.

    Args:
        backend: what recognises the images.
        host: address to bind; ``"0.0.0.0"`` or ``"::"`` to serve other machines.
        port: port to bind; 0 picks a free one (``start()`` says which).
        token: when set, every call but ``ServerLive`` and ``ServerReady`` needs the metadata
            ``authorization: Bearer <token>``.
        max_request_bytes: most image bytes in one request message; gRPC refuses a larger
            message (RESOURCE_EXHAUSTED) before reading it.
        max_images_per_request: most images in one request; None = the backend's limit.
        threads: requests waiting on ``backend.submit`` at once; more wait their turn.
    """

    def __init__(self, backend: Backend, host: str = "127.0.0.1", port: int = 0, token: str | None = None,
                 max_request_bytes: int = 64 << 20, max_images_per_request: int | None = None,
                 threads: int = 16, drain_s: float = 30.0) -> None:
        if threads < 1 or max_request_bytes < 1 or (max_images_per_request is not None and max_images_per_request < 1):
            raise ConfigError(f"expected threads, max_request_bytes and max_images_per_request >= 1, got {threads}, "
                              f"{max_request_bytes}, {max_images_per_request}")
        if not 0 <= port <= 65535:
            raise ConfigError(f"expected a port in 0..65535 (0 = any free port), got {port}")
        # The receive limit is a 32-bit int inside gRPC.
        if max_request_bytes + _ENVELOPE_BYTES > 2**31 - 1:
            raise ConfigError(f"expected max_request_bytes below 2 GiB (gRPC's message limit), got {max_request_bytes}")
        self.backend = backend
        self.host, self.port = host, port
        self.token = token.encode("utf-8") if token else None
        self.max_request_bytes = max_request_bytes
        self.max_images_per_request = max_images_per_request
        self.threads = threads
        self.drain_s = drain_s  # shutdown's default grace period
        self.address: str | None = None  # "host:port" as bound, after start()
        self._lock = threading.Lock()
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: grpc.aio.Server | None = None
        self._pool: ThreadPoolExecutor | None = None

    def start(self) -> str:
        """Bind and serve from a daemon thread; return ``"host:port"`` as bound. Idempotent while running.

        Raises:
            ConfigError: the address cannot be bound (in use, not an address of this host).
            TransportError: the door was shut down already.
        """
        with self._lock:
            if self._closed:
                raise TransportError("expected a door that was not shut down; create a new GrpcDoor to serve again")
            if self.address is not None:
                return self.address
            loop = asyncio.new_event_loop()
            thread = threading.Thread(target=loop.run_forever, name="grpc-door", daemon=True)
            thread.start()
            pool = ThreadPoolExecutor(self.threads, thread_name_prefix="grpc-infer")
            try:
                # The server belongs to the loop it is made in: make it there.
                server, port = asyncio.run_coroutine_threadsafe(self._bind(pool), loop).result(_START_TIMEOUT_S)
            except BaseException:
                _stop_loop(loop, thread)
                pool.shutdown(wait=False)
                raise
            self._loop, self._thread, self._server, self._pool = loop, thread, server, pool
            self.port = port
            self.address = _address(self.host, port)
            logger.info("KServe v2 gRPC front door on %s%s", self.address, " (token)" if self.token else "")
            return self.address

    def alive(self) -> bool:
        """Whether the door's event loop thread runs."""
        return self._thread is not None and self._thread.is_alive()

    def shutdown(self, grace_s: float | None = None) -> None:
        """Stop accepting calls, let those in flight finish (at most ``grace_s``, by default
        ``drain_s``), close. Safe to call twice.

        Calls still running after ``grace_s`` are cancelled: their clients get CANCELLED.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            loop, thread, server, pool = self._loop, self._thread, self._server, self._pool
        if loop is None or thread is None or server is None or pool is None:
            return
        try:
            grace_s = self.drain_s if grace_s is None else grace_s
            asyncio.run_coroutine_threadsafe(server.stop(grace_s), loop).result()
        finally:
            # A submit still blocked after the grace period answers nobody; do not wait for it.
            pool.shutdown(wait=False, cancel_futures=True)
            _stop_loop(loop, thread)
            logger.info("KServe v2 gRPC front door on %s closed", self.address)

    async def _bind(self, pool: ThreadPoolExecutor) -> tuple[grpc.aio.Server, int]:
        options = [
            ("grpc.max_receive_message_length", self.max_request_bytes + _ENVELOPE_BYTES),
            # gRPC sets SO_REUSEPORT by default: a second daemon would then share the port
            # silently instead of failing to start.
            ("grpc.so_reuseport", 0),
        ]
        interceptors = [_TokenCheck(self.token)] if self.token else None
        server = grpc.aio.server(options=options, interceptors=interceptors)
        limit = self.max_images_per_request
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(_Servicer(self.backend, pool, limit, self.threads), server)
        where = _address(self.host, self.port)
        try:
            port = server.add_insecure_port(where)
        except RuntimeError as exc:  # grpcio >= 1.50 raises; older versions return 0
            port, reason = 0, f": {exc}"
        else:
            reason = ""
        if port == 0:
            raise ConfigError(f"expected a host:port this machine can bind for the gRPC door, got {where!r}{reason}")
        await server.start()
        return server, port


class _Servicer(pb_grpc.GRPCInferenceServiceServicer):
    """The calls; runs on the door's event loop, blocking work in ``pool``."""

    def __init__(self, backend: Backend, pool: ThreadPoolExecutor, max_images: int | None, threads: int) -> None:
        self.backend = backend
        self.pool = pool
        self.max_images = max_images
        self.stream_slots = threads  # requests of one stream in flight at once

    async def ServerLive(self, request: pb.ServerLiveRequest, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=self.backend.live())

    async def ServerReady(self, request: pb.ServerReadyRequest, context: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.backend.live() and self.backend.ready())

    async def ModelReady(self, request: pb.ModelReadyRequest, context: Any) -> pb.ModelReadyResponse:
        def ready() -> pb.ModelReadyResponse:
            grpc_codec.check_model(self.backend.info(), request.name, request.version)
            return pb.ModelReadyResponse(ready=self.backend.ready())
        return await _unary(context, ready)

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: Any) -> pb.ServerMetadataResponse:
        return await _unary(context, lambda: grpc_codec.server_metadata(wanwu.__version__))

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Any) -> pb.ModelMetadataResponse:
        return await _unary(context, lambda: grpc_codec.model_metadata(self.backend.info(), request))

    async def ModelConfig(self, request: pb.ModelConfigRequest, context: Any) -> pb.ModelConfigResponse:
        return await _unary(context, lambda: grpc_codec.model_config(self.backend.info(), request))

    async def ModelStatistics(self, request: pb.ModelStatisticsRequest, context: Any) -> pb.ModelStatisticsResponse:
        return await _unary(context, lambda: grpc_codec.model_stats(self.backend.info(), request,
                                                                     self.backend.stats()))

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        try:
            return await self._infer(request, context)
        except Exception as exc:  # answered with its code; a bug is logged by _status
            code, message = _status(exc)
        await context.abort(code, message)

    async def ModelStreamInfer(self, requests: AsyncIterator[pb.ModelInferRequest], context: Any) -> None:
        # Each request runs as its own task, so a stream's requests reach the backend together;
        # at most stream_slots at once: beyond that the stream is not read, and gRPC's flow
        # control holds the client back.
        slots = asyncio.Semaphore(self.stream_slots)
        write_lock = asyncio.Lock()  # one write at a time on a call
        tasks: set[asyncio.Task] = set()

        async def answer(request: pb.ModelInferRequest) -> None:
            try:
                try:
                    response = pb.ModelStreamInferResponse(infer_response=await self._infer(request, context))
                except Exception as exc:  # the stream goes on: this request's answer is its error
                    response = grpc_codec.stream_error(request, _status(exc)[1])
                async with write_lock:
                    await context.write(response)
            finally:
                slots.release()

        try:
            async for request in requests:
                await slots.acquire()
                task = asyncio.create_task(answer(request))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            await asyncio.gather(*tasks)  # the client has sent everything: answer it, then end the call
        finally:  # the call ended early (cancelled, a write failed): stop what it left running
            for task in tasks:
                task.cancel()

    async def _infer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        """One infer request, answered; raises RequestError or ServeError."""
        info = self.backend.info()
        parsed = grpc_codec.parse_infer_request(request, info, self.max_images or info.max_images_per_request)
        wait_s = grpc_codec.wait_s(parsed.timeout_s, context.time_remaining())
        submit = functools.partial(self.backend.submit, parsed.images, timeout_s=wait_s, source="grpc")
        records = await asyncio.get_running_loop().run_in_executor(self.pool, submit)
        codec.check_records(records)
        return grpc_codec.infer_response(info, parsed, records)


def _unimplemented(name: str) -> Callable:
    async def refuse(self: _Servicer, request: Any, context: Any) -> None:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{name} is not served by wanwu")
    refuse.__name__ = name
    return refuse


# Every unary call of the service not served above answers UNIMPLEMENTED with a message
# (the generated base class raises NotImplementedError, which gRPC logs as a failure).
for _method in pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods:
    if _method.name not in vars(_Servicer) and not (_method.client_streaming or _method.server_streaming):
        setattr(_Servicer, _method.name, _unimplemented(_method.name))


async def _unary(context: Any, build: Callable[[], Any]) -> Any:
    """``build()``'s answer, or the call aborted with the code of what it raised."""
    try:
        return build()
    except Exception as exc:  # answered with its code; a bug is logged by _status
        code, message = _status(exc)
    await context.abort(code, message)


def _status(exc: Exception) -> tuple[grpc.StatusCode, str]:
    """The gRPC code and message of an exception; call it in the ``except`` block (it logs bugs)."""
    status = grpc_codec.http_status(exc)
    if status is None:
        logger.exception("gRPC door: a call failed")
        return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"
    code = grpc_codec.code_of(status)
    if status >= 500:
        logger.warning("gRPC door: %s: %s", code.name, exc)
    else:
        logger.debug("gRPC door: %s: %s", code.name, exc)
    return code, str(exc)


class _TokenCheck(grpc.aio.ServerInterceptor):
    """Refuse calls without ``authorization: Bearer <token>`` (UNAUTHENTICATED), probes excepted."""

    def __init__(self, token: bytes) -> None:
        self.token = token

    async def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None or details.method in _OPEN_METHODS:
            return handler
        given = [value for key, value in details.invocation_metadata or () if key == "authorization"]
        scheme, _, token = (given[0] if given else "").partition(" ")
        if isinstance(token, bytes):
            token = token.decode("utf-8", "replace")
        # compare_digest: the time taken must not tell how much of a guessed token was right.
        if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode("utf-8"), self.token):
            return handler
        message = ("expected metadata 'authorization: Bearer <token>' with the server's token, got "
                   + ("a wrong token" if given else "none"))
        return _refusal(handler, grpc.StatusCode.UNAUTHENTICATED, message)


def _refusal(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as ``handler`` (unary or streaming) that aborts with ``code``."""
    async def refuse(request: Any, context: Any) -> None:
        await context.abort(code, message)

    make = {(False, False): grpc.unary_unary_rpc_method_handler, (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler, (True, True): grpc.stream_stream_rpc_method_handler}
    return make[(handler.request_streaming, handler.response_streaming)](
        refuse, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def _stop_loop(loop: asyncio.AbstractEventLoop, thread: threading.Thread) -> None:
    loop.call_soon_threadsafe(loop.stop)
    thread.join()
    loop.close()
