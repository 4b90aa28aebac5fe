"""The HTTP front door: KServe v2 (open inference protocol) as NVIDIA Triton serves it.

Triton's official clients (``tritonclient.http``) work unmodified. Endpoints:

* ``GET /v2/health/live``, ``/v2/health/ready``: 200, or 503 when not live/ready
  (bodiless, like Triton; Triton says 400, any non-200 means "no" to its clients);
* ``GET /v2``: server metadata; ``GET /v2/models/{m}[/versions/{v}]``: model metadata;
  ``.../ready`` (bodiless 200/503), ``.../config`` (Triton model configuration),
  ``.../stats`` and ``/v2/models/stats`` (statistics extension);
* ``POST /v2/models/{m}[/versions/{v}]/infer``: see ``kserve_codec`` for the tensors.

Errors are ``{"error": "..."}`` with Triton's status codes: 400 bad request (and
images that cannot be recognised: the message names each by index), 401 token
missing or wrong (health endpoints stay open), 404 unknown model, version or
endpoint, 408 a body sent too slowly, 411 a chunked body, 413 body, JSON or image
count over the limit; and retryable ones: 503 not ready, draining, queue full,
too many bytes being received (with ``Retry-After``), or an image the server
failed (a worker died); 504 timeout. Bodies may be gzip/deflate
(``Content-Encoding``) and infer answers are compressed when the client's
``Accept-Encoding`` names gzip or deflate.

The server is aiohttp's, on its own event loop in a thread; each connection is
wrapped in a ``http_guard.Guard`` (connection cap, idle and slow-head deadlines).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass

from aiohttp import web

from wanwu.errors import ConfigError
from wanwu.pipeline.serve.backend import Backend
from wanwu.pipeline.serve.http_guard import GuardedConnections, GuardLimits
from wanwu.pipeline.serve.kserve_handler import KServeRoutes

logger = logging.getLogger(__name__)

ACCEPT_BACKLOG = 128
# How long the rest of a body answered without being read (413, 401...) is read and dropped
# before the connection closes, so that the client gets to read the answer; as nginx's
# lingering_time, and bounded the same way.
LINGER_S = 10.0


@dataclass(frozen=True)
class HttpLimits:
    """What one client, and all of them together, may cost the HTTP door."""

    max_request_bytes: int = 64 << 20  # one request body (after decompression)
    max_json_bytes: int = 8 << 20  # a body that is JSON only (base64 images): parsing JSON costs many times its size
    max_inflight_bytes: int = 256 << 20  # bodies being received or worked on at once; past it, 503
    max_connections: int = 512  # open connections; one more is answered 503 and closed
    keepalive_timeout_s: float = 15.0  # an idle connection closes after this long
    header_timeout_s: float = 10.0  # a request's head must be complete this long after its first byte
    min_body_rate: float = 64 << 10  # bytes/s a body must arrive at, after header_timeout_s of grace
    threads: int = 64  # requests inside the backend at once (the rest wait on the event loop)

    def __post_init__(self) -> None:
        bad = {name: value for name, value in vars(self).items() if not value > 0}
        if bad:
            raise ConfigError(f"expected positive HTTP limits, got {bad}")
        if self.max_json_bytes > self.max_request_bytes or self.max_request_bytes > self.max_inflight_bytes:
            raise ConfigError("expected max_json_bytes <= max_request_bytes <= max_inflight_bytes, got "
                              f"{self.max_json_bytes}, {self.max_request_bytes}, {self.max_inflight_bytes}")

    @property
    def guard(self) -> GuardLimits:
        return GuardLimits(self.max_connections, self.keepalive_timeout_s, self.header_timeout_s, LINGER_S)


class KServeHTTPServer:
    """Serve ``backend`` over HTTP on ``host:port``; ``token`` requires ``Authorization: Bearer``.

    ``start()`` binds and serves from a background thread and returns the port
    (``port=0`` picks a free one); ``shutdown()`` stops accepting, lets requests in
    flight finish (within ``drain_s``) and is safe to call twice. ``alive()`` is False
    once the server's thread has stopped, for whatever reason.
    """

    def __init__(self, backend: Backend, host: str = "127.0.0.1", port: int = 8000, token: str | None = None,
                 limits: HttpLimits = HttpLimits(), drain_s: float = 20.0) -> None:
        self.backend = backend
        self.host, self.port = host, port
        self.token = token.encode("utf-8") if token else None
        self.limits = limits
        self.drain_s = drain_s
        self.connections: GuardedConnections | None = None
        self.routes: KServeRoutes | None = None
        self.closing = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._server: asyncio.base_events.Server | None = None
        self._lock = threading.Lock()

    def start(self) -> int:
        """Bind and serve in a daemon thread; return the bound port. Idempotent.

        Raises:
            ConfigError: the address cannot be bound.
        """
        with self._lock:
            if self._thread is not None:
                return self.port
            loop = asyncio.new_event_loop()
            try:
                loop.run_until_complete(self._open())
            except OSError as exc:
                loop.run_until_complete(self._close())
                loop.close()
                raise ConfigError(f"expected an address this host can bind for HTTP, got {self.host}:{self.port}: "
                                  f"{exc}") from exc
            self._loop = loop
            self._thread = threading.Thread(target=self._serve, name="kserve-http", daemon=True)
            self._thread.start()
            logger.info("KServe v2 HTTP front door on http://%s:%d", self.host, self.port)
            return self.port

    async def _open(self) -> None:
        self.routes = KServeRoutes(self)
        # The guard's deadlines are the ones that apply (and are counted); aiohttp's own idle timer only
        # backs them up. No automatic decompression: the handler inflates bodies itself, bounded, so a
        # gzip bomb stays small.
        backstop_s = self.limits.keepalive_timeout_s + self.limits.header_timeout_s + 5
        self._runner = web.AppRunner(self.routes.app(), access_log=None, handle_signals=False,
                                     keepalive_timeout=backstop_s, shutdown_timeout=self.drain_s,
                                     auto_decompress=False, lingering_time=LINGER_S)
        await self._runner.setup()
        assert self._runner.server is not None
        self.connections = GuardedConnections(self._runner.server, self.limits.guard)
        loop = asyncio.get_running_loop()
        # asyncio accepts up to `backlog` connections in one go before the loop runs anything else (a
        # refused one's close included): a modest backlog keeps a connection burst from using up the
        # descriptors; connections beyond it wait in the clients' kernels, which retry.
        self._server = await loop.create_server(self.connections, self.host, self.port, backlog=ACCEPT_BACKLOG,
                                                reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]

    def _serve(self) -> None:
        assert self._loop is not None
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_forever()
        except Exception:  # the daemon notices through alive() and exits non-zero
            logger.exception("the HTTP door's event loop failed")

    def alive(self) -> bool:
        """Whether the door still serves (its thread runs)."""
        return self._thread is not None and self._thread.is_alive()

    def stats(self) -> dict[str, int]:
        """Open connections, refusals and timeouts, and the body budget (for metrics and tests)."""
        conns, routes = self.connections, self.routes
        return {
            "connections": len(conns.open) if conns else 0,
            "refused_connections": conns.refused if conns else 0,
            "evicted_connections": conns.evicted if conns else 0,
            "timed_out_connections": conns.timed_out if conns else 0,
            "inflight_bytes": routes.budget.used if routes else 0,
            "peak_inflight_bytes": routes.budget.peak if routes else 0,
            "refused_for_budget": routes.budget.refused if routes else 0,
        }

    def shutdown(self) -> None:
        """Stop accepting, let requests in flight finish, close. Safe to call twice."""
        with self._lock:
            loop, thread, self._thread = self._loop, self._thread, None
        if loop is None or thread is None:
            return
        self.closing = True
        try:
            asyncio.run_coroutine_threadsafe(self._close(), loop).result(self.drain_s + 10)
        except Exception:  # the loop died: nothing left to close gracefully
            logger.exception("closing the HTTP door failed")
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
        if self.routes is not None:
            self.routes.shutdown()

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()  # no new connections
        if self._runner is not None:
            await self._runner.cleanup()  # waits for handlers in flight, closes idle keep-alive connections
