"""The HTTP front door: KServe v2 (open inference protocol) as NVIDIA Triton serves it.

Triton's official clients (``tritonclient.http``) work unmodified. Endpoints:

* ``GET /v2/health/live``, ``/v2/health/ready``: 200, or 503 when not live/ready
  (bodiless, like Triton; Triton says 400, any non-200 means "no" to its clients);
* ``GET /v2``: server metadata; ``GET /v2/models/{m}[/versions/{v}]``: model metadata;
  ``.../ready`` (bodiless 200/503), ``.../config`` (Triton model configuration),
  ``.../stats`` and ``/v2/models/stats`` (statistics extension);
* ``POST /v2/models/{m}[/versions/{v}]/infer``: see ``kserve_codec`` for the tensors.

Errors are ``{"error": "..."}`` with Triton's status codes: 400 bad request (and
any image that cannot be recognised: the message names each by index), 401 token
missing or wrong (health endpoints stay open), 404 unknown model, version or
endpoint, 413 body or image count over the limit, 503 not ready or queue full,
504 timeout. Bodies may be gzip/deflate (``Content-Encoding``) and infer answers
are compressed when the client's ``Accept-Encoding`` names gzip or deflate.
"""

from __future__ import annotations

import logging
import socket
import threading
from http.server import ThreadingHTTPServer
from typing import Any

from wanwu.pipeline.serve.backend import Backend
from wanwu.pipeline.serve.kserve_handler import KServeHandler

logger = logging.getLogger(__name__)


class KServeHTTPServer:
    """Serve ``backend`` over HTTP on ``host:port``; ``token`` requires ``Authorization: Bearer``.

    ``start()`` binds and serves from a background thread and returns the port
    (``port=0`` picks a free one); ``shutdown()`` stops accepting, lets requests
    in flight finish and is safe to call twice. ``max_request_bytes`` bounds a
    request body (after decompression).
    """

    def __init__(self, backend: Backend, host: str = "127.0.0.1", port: int = 8000, token: str | None = None,
                 max_request_bytes: int = 64 << 20) -> None:
        self.backend = backend
        self.host, self.port = host, port
        self.token = token.encode("utf-8") if token else None
        self.max_request_bytes = max_request_bytes
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self) -> int:
        """Bind and serve in a daemon thread; return the bound port. Idempotent."""
        with self._lock:
            if self._httpd is None:
                self._httpd = _Server((self.host, self.port), KServeHandler, self)
                self.port = self._httpd.server_address[1]
                self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.1,), name="kserve-http",
                                                daemon=True)
                self._thread.start()
                logger.info("KServe v2 HTTP front door on http://%s:%d", self.host, self.port)
            return self.port

    def shutdown(self) -> None:
        """Stop accepting connections and close idle ones. Safe to call twice."""
        with self._lock:
            httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        httpd.shutdown()  # returns once serve_forever has stopped
        httpd.server_close()
        httpd.close_connections()
        if self._thread is not None:
            self._thread.join()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # many clients connect at once; the default backlog of 5 makes them retry
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], handler: type, front: KServeHTTPServer) -> None:
        super().__init__(address, handler)
        self.front = front
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        self.closing = False

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._connections_lock:
            self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        """End keep-alive connections: shutting the read side wakes idle readers with EOF, while a
        request in flight (its body already read) still writes its answer."""
        self.closing = True
        with self._connections_lock:
            connections = list(self._connections)
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RD)
            except OSError:  # already closed by its client
                pass
