"""Request handling of the KServe v2 HTTP front door: routing, limits, auth, answers.

aiohttp calls ``KServeRoutes.handle`` on the door's event loop for every request;
``kserve.KServeHTTPServer`` owns the loop, the server and the connection guard.
Inference runs the blocking ``backend.submit`` in a bounded thread pool, so the
loop keeps serving other connections meanwhile.

Limits come before parsing, in this order: the token; the body's declared length
(over ``max_request_bytes``, or over ``max_json_bytes`` for a request that is JSON
only, is 413 before a byte is read); the memory budget of bodies being received
at once (``max_inflight_bytes``: past it, 503 with ``Retry-After``); a minimum
upload rate (a body must arrive within ``header_timeout_s`` plus its length at
``min_body_rate``); then, while parsing, the count of JSON objects and of images.
"""

from __future__ import annotations

import asyncio
import gzip
import hmac
import json
import logging
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Awaitable, Callable
from urllib.parse import unquote

from aiohttp import web

import wanwu
from wanwu.pipeline.serve import kserve_codec as codec
from wanwu.pipeline.serve import kserve_meta as meta
from wanwu.pipeline.serve.backend import ServeError

if TYPE_CHECKING:
    from wanwu.pipeline.serve.kserve import KServeHTTPServer

logger = logging.getLogger(__name__)

_OPEN_PATHS = frozenset({"/v2/health/live", "/v2/health/ready"})  # no token needed: probes
RETRY_AFTER_S = 1  # what 503 answers suggest


class ByteBudget:
    """Bytes of request bodies being received or worked on at once, bounded. Thread-safe."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.peak = 0
        self.refused = 0
        self._lock = threading.Lock()

    def take(self, n: int) -> bool:
        """Reserve ``n`` bytes; False (and nothing reserved) when they do not fit."""
        with self._lock:
            if self.used + n > self.limit:
                self.refused += 1
                return False
            self.used += n
            self.peak = max(self.peak, self.used)
            return True

    def give(self, n: int) -> None:
        with self._lock:
            self.used -= n


class KServeRoutes:
    """The endpoints of ``kserve`` (see there), over the front's backend and limits."""

    def __init__(self, front: "KServeHTTPServer") -> None:
        self.front = front
        self.limits = front.limits
        self.budget = ByteBudget(front.limits.max_inflight_bytes)
        self.pool = ThreadPoolExecutor(front.limits.threads, thread_name_prefix="kserve-infer")

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.limits.max_request_bytes, middlewares=[self._guarded])
        app.router.add_route("*", "/{tail:.*}", self.handle, expect_handler=self._expect)
        return app

    # -- around every request -------------------------------------------------------------------

    @web.middleware
    async def _guarded(self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                       ) -> web.StreamResponse:
        guard = self.front.connections.of(request.transport) if self.front.connections else None
        if guard is not None:
            guard.request_started()
        try:
            return await handler(request)
        except codec.RequestError as exc:
            return self._error(request, exc.status, str(exc))
        except ServeError as exc:
            return self._error(request, exc.http_status, str(exc))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug: answer 500 and keep serving
            logger.exception("%s %s failed", request.method, request.path)
            return self._error(request, 500, f"internal error: {type(exc).__name__}: {exc}")
        finally:
            if guard is not None:
                guard.request_finished(body_left=not request.content.is_eof())

    async def _expect(self, request: web.Request) -> web.StreamResponse | None:
        """Refuse a body before the client sends it (curl sends ``Expect: 100-continue``)."""
        try:
            self._check_auth(request)
            self._body_length(request)
        except codec.RequestError as exc:
            return self._error(request, exc.status, str(exc), close=True)
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0
        return None

    # -- routing --------------------------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.StreamResponse:
        path = request.path.rstrip("/")
        method = request.method
        self._check_auth(request)
        backend = self.front.backend
        if method == "GET" and path == "/v2/health/live":
            return _status(backend.live())
        if method == "GET" and path == "/v2/health/ready":
            return _status(backend.live() and backend.ready())
        if method == "GET" and path == "/v2":
            return _json(meta.server_metadata(wanwu.__version__))
        if method == "GET" and path == "/v2/models/stats":
            return _json(meta.model_stats(backend.info(), backend.stats()))
        parts = [unquote(p) for p in path.split("/")[1:]]  # ["v2", "models", m, ("versions", v), (action)]
        if len(parts) < 3 or parts[:2] != ["v2", "models"]:
            raise codec.RequestError(404, f"unknown endpoint {method} {path!r}")
        info = backend.info()
        if parts[2] != info.name:
            raise codec.RequestError(404, f"unknown model {parts[2]!r}; this server serves {info.name!r}")
        rest = parts[3:]
        if rest[:1] == ["versions"]:
            if len(rest) < 2 or rest[1] != info.version:
                asked = rest[1] if len(rest) > 1 else ""
                raise codec.RequestError(404, f"unknown version {asked!r} of model {info.name!r}; "
                                              f"expected {info.version!r}")
            rest = rest[2:]
        action = rest[0] if len(rest) == 1 else ("" if not rest else None)
        if method == "GET" and action == "":
            return _json(meta.model_metadata(info))
        if method == "GET" and action == "ready":
            return _status(backend.ready())
        if method == "GET" and action == "config":
            return _json(meta.model_config(info))
        if method == "GET" and action == "stats":
            return _json(meta.model_stats(info, backend.stats()))
        if method == "POST" and action == "infer":
            return await self._infer(request)
        raise codec.RequestError(404, f"unknown endpoint {method} {path!r}")

    # -- inference ------------------------------------------------------------------------------

    async def _infer(self, request: web.Request) -> web.StreamResponse:
        header_length = request.headers.get("Inference-Header-Content-Length")
        try:
            header_length = int(header_length) if header_length is not None else None
        except ValueError:
            raise codec.RequestError(400, f"expected an integer Inference-Header-Content-Length, "
                                          f"got {header_length!r}") from None
        length = self._body_length(request, json_only=header_length is None)
        if not self.budget.take(length):
            raise ServeError("queue_full", f"the door is receiving {self.budget.used} bytes of requests, at most "
                                           f"{self.budget.limit}; try again later")
        try:
            body = await self._read_body(request, length)
            loop = asyncio.get_running_loop()
            payload, json_length = await loop.run_in_executor(self.pool, self._answer, body, header_length)
        finally:
            self.budget.give(length)
        headers = {"Inference-Header-Content-Length": str(json_length)} if json_length is not None else {}
        content_type = "application/octet-stream" if json_length is not None else "application/json"
        payload, encoding = _compress(payload, request.headers.get("Accept-Encoding", ""))
        if encoding:
            headers["Content-Encoding"] = encoding
        return web.Response(status=200, body=payload, content_type=content_type, headers=headers)

    def _answer(self, body: bytes, header_length: int | None) -> tuple[bytes, int | None]:
        """Parse, recognise and encode, in a pool thread (the backend blocks until it answers)."""
        backend = self.front.backend
        info = backend.info()
        parsed = codec.parse_infer_request(body, header_length, info.name, info.max_images_per_request)
        del body
        if not parsed.images:
            raise codec.RequestError(400, f"expected at least one image in input {codec.INPUT!r}, got none")
        records = backend.submit(parsed.images, timeout_s=parsed.timeout_s, source="http")
        codec.check_records(records)
        return codec.encode_infer_response(info, parsed, records)

    async def _read_body(self, request: web.Request, length: int) -> bytes:
        """The whole body, arriving at ``min_body_rate`` at least, then inflated (bounded) if compressed."""
        deadline = time.monotonic() + self.limits.header_timeout_s + length / self.limits.min_body_rate
        chunks, got = [], 0
        while got < length:
            left = deadline - time.monotonic()
            try:
                chunk = await asyncio.wait_for(request.content.read(min(length - got, 1 << 20)), max(0.0, left))
            except asyncio.TimeoutError:
                if request.transport is not None:
                    request.transport.close()  # the rest of a slow body is not worth waiting for
                raise codec.RequestError(408, f"expected the body's {length} bytes at {self.limits.min_body_rate:.0f} "
                                              f"bytes/s at least, got {got} in time") from None
            if not chunk:
                raise codec.RequestError(400, f"expected a body of {length} bytes, the connection ended after {got}")
            chunks.append(chunk)
            got += len(chunk)
        body = b"".join(chunks)
        encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding in ("", "identity"):
            return body
        if encoding not in ("gzip", "deflate"):
            raise codec.RequestError(400, f"expected Content-Encoding gzip, deflate or identity, got {encoding!r}")
        # A bounded decompressor: a small gzip bomb must not become gigabytes here.
        inflater = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
        limit = self.limits.max_request_bytes
        try:
            data = inflater.decompress(body, limit + 1)
        except zlib.error as exc:
            raise codec.RequestError(400, f"expected a {encoding} body, got corrupt data: {exc}") from exc
        if len(data) > limit:
            raise codec.RequestError(413, f"expected at most {limit} bytes of request body after {encoding}, "
                                          "got more")
        if not inflater.eof:
            raise codec.RequestError(400, f"expected a complete {encoding} body, got a truncated one")
        return data

    def _body_length(self, request: web.Request, json_only: bool = False) -> int:
        """The declared body length, checked against the limits (413) before anything is read."""
        if "chunked" in request.headers.get("Transfer-Encoding", "").lower():
            raise codec.RequestError(411, "expected a Content-Length, got a chunked body")
        raw = request.headers.get("Content-Length", "0")
        try:
            length = int(raw)
        except ValueError:
            length = -1
        if length < 0:
            raise codec.RequestError(400, f"expected a non-negative Content-Length, got {raw!r}")
        limit = self.limits.max_json_bytes if json_only else self.limits.max_request_bytes
        if length > limit:
            what = "a JSON request body (send images as binary tensor data)" if json_only else "a request body"
            raise codec.RequestError(413, f"expected {what} of at most {limit} bytes, got {length}")
        return length

    def _check_auth(self, request: web.Request) -> None:
        token = self.front.token
        if token is None or request.path.rstrip("/") in _OPEN_PATHS:
            return
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        # compare_digest: the time taken must not tell how much of a guessed token was right.
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode("utf-8"), token):
            raise codec.RequestError(401, "expected header 'Authorization: Bearer <token>' with the server's "
                                          "token, got " + ("a wrong token" if scheme else "none"))

    # -- answers --------------------------------------------------------------------------------

    def _error(self, request: web.Request, status: int, message: str, close: bool = False) -> web.Response:
        if status >= 500 or status == 413:
            logger.warning("%s %s -> %d: %s", request.method, request.path, status, message)
        else:
            logger.debug("%s %s -> %d: %s", request.method, request.path, status, message)
        headers = {}
        if status == 401:
            headers["WWW-Authenticate"] = 'Bearer realm="wanwu"'
        if status == 503:
            headers["Retry-After"] = str(RETRY_AFTER_S)
        if close or status in (408, 411, 413) or self.front.closing:
            headers["Connection"] = "close"  # the unread rest of the body must not be taken for a request
        return web.Response(status=status, headers=headers, content_type="application/json",
                            body=json.dumps({"error": message}, ensure_ascii=False).encode("utf-8"))

    def shutdown(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


def _status(ok: bool) -> web.Response:
    return web.Response(status=200 if ok else 503)


def _json(doc: dict) -> web.Response:
    return web.Response(status=200, content_type="application/json",
                        body=json.dumps(doc, ensure_ascii=False).encode("utf-8"))


def _compress(body: bytes, accept: str) -> tuple[bytes, str]:
    """Compress an answer the way the client accepts (gzip first; level 1: the answer is latency)."""
    accepted = {part.split(";")[0].strip().lower() for part in accept.split(",")}
    if "gzip" in accepted:
        return gzip.compress(body, compresslevel=1, mtime=0), "gzip"
    if "deflate" in accepted:
        return zlib.compress(body, 1), "deflate"
    return body, ""
