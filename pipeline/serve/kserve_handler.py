"""Request handling of the KServe v2 HTTP front door: routing, limits, auth, answers.

One handler instance serves one connection (keep-alive, HTTP/1.1) in its own
thread; ``kserve.KServeHTTPServer`` owns the server and the backend. Every answer
leaves the connection ready for the next request: a body left unread by an
early error is read away, or the connection is closed.
"""

from __future__ import annotations

import gzip
import hmac
import json
import logging
import zlib
from http.server import BaseHTTPRequestHandler
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

import wanwu
from wanwu.pipeline.serve import kserve_codec as codec
from wanwu.pipeline.serve import kserve_meta as meta
from wanwu.pipeline.serve.backend import ServeError

if TYPE_CHECKING:
    from wanwu.pipeline.serve.kserve import _Server

logger = logging.getLogger(__name__)

_OPEN_PATHS = frozenset({"/v2/health/live", "/v2/health/ready"})  # no token needed: probes


class KServeHandler(BaseHTTPRequestHandler):
    """Answers one connection's requests; see ``kserve`` for the endpoints."""

    protocol_version = "HTTP/1.1"  # keep-alive: Triton clients reuse connections
    # Headers and body leave in two writes; with Nagle's algorithm on, the body waits for the
    # client's delayed ACK of the headers: 40 ms on every answer (one client, median: 56 -> 12 ms).
    disable_nagle_algorithm = True
    server_version = f"wanwu/{wanwu.__version__}"
    sys_version = ""  # no Python version in the Server header
    timeout = 120  # seconds an idle keep-alive connection (or a stalled upload) holds its thread
    server: _Server
    _body_done = True  # whether this request's body was read (or there is none to read)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
        logger.debug("%s %s", self.address_string(), format % args)

    # -- routing ---------------------------------------------------------------------------------

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def handle_expect_100(self) -> bool:
        """Refuse a body before the client sends it (curl sends ``Expect: 100-continue``)."""
        try:
            self._check_auth(urlsplit(self.path).path)
            self._body_length()
        except codec.RequestError as exc:
            self._body_done = True  # the client sends nothing after a final answer
            self._send_error(exc.status, str(exc), close=True)
            return False
        return super().handle_expect_100()

    def _dispatch(self, method: str) -> None:
        path = urlsplit(self.path).path.rstrip("/")
        self._body_done = False
        try:
            self._check_auth(path)
            self._route(method, path)
        except codec.RequestError as exc:
            self._send_error(exc.status, str(exc))
        except ServeError as exc:
            self._send_error(exc.http_status, str(exc))
        except Exception as exc:  # a bug: answer 500 and keep serving
            logger.exception("%s %s failed", method, path)
            self._send_error(500, f"internal error: {type(exc).__name__}: {exc}")

    def _route(self, method: str, path: str) -> None:
        backend = self.server.front.backend
        if method == "GET" and path == "/v2/health/live":
            return self._send_status(backend.live())
        if method == "GET" and path == "/v2/health/ready":
            return self._send_status(backend.live() and backend.ready())
        if method == "GET" and path == "/v2":
            return self._send_json(meta.server_metadata(wanwu.__version__))
        if method == "GET" and path == "/v2/models/stats":
            return self._send_json(meta.model_stats(backend.info(), backend.stats()))
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
            return self._send_json(meta.model_metadata(info))
        if method == "GET" and action == "ready":
            return self._send_status(backend.ready())
        if method == "GET" and action == "config":
            return self._send_json(meta.model_config(info))
        if method == "GET" and action == "stats":
            return self._send_json(meta.model_stats(info, backend.stats()))
        if method == "POST" and action == "infer":
            return self._infer()
        raise codec.RequestError(404, f"unknown endpoint {method} {path!r}")

    # -- inference -------------------------------------------------------------------------------

    def _infer(self) -> None:
        backend = self.server.front.backend
        body = self._read_body()
        header_length = self.headers.get("Inference-Header-Content-Length")
        try:
            header_length = int(header_length) if header_length is not None else None
        except ValueError:
            raise codec.RequestError(400, f"expected an integer Inference-Header-Content-Length, "
                                          f"got {header_length!r}") from None
        info = backend.info()
        request = codec.parse_infer_request(body, header_length, info.name)
        if not request.images:
            raise codec.RequestError(400, f"expected at least one image in input {codec.INPUT!r}, got none")
        if len(request.images) > info.max_images_per_request:
            raise codec.RequestError(413, f"expected at most {info.max_images_per_request} images per request, "
                                          f"got {len(request.images)}")
        records = backend.submit(request.images, timeout_s=request.timeout_s, source="http")
        codec.check_records(records)
        payload, json_length = codec.encode_infer_response(info, request, records)
        headers = {"Inference-Header-Content-Length": str(json_length)} if json_length is not None else {}
        content_type = "application/octet-stream" if json_length is not None else "application/json"
        self._send(200, payload, content_type, headers, compress=True)

    def _read_body(self) -> bytes:
        length = self._body_length()
        body = self.rfile.read(length)
        self._body_done = True
        if len(body) != length:
            self.close_connection = True
            raise codec.RequestError(400, f"expected a body of {length} bytes, the connection ended after "
                                          f"{len(body)}")
        encoding = self.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding in ("", "identity"):
            return body
        if encoding not in ("gzip", "deflate"):
            raise codec.RequestError(400, f"expected Content-Encoding gzip, deflate or identity, got {encoding!r}")
        # A bounded decompressor: a small gzip bomb must not become gigabytes here.
        inflater = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
        limit = self.server.front.max_request_bytes
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

    def _body_length(self) -> int:
        """The declared body length, checked against the limit (413) before anything is read."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            raise codec.RequestError(411, "expected a Content-Length, got a chunked body")
        raw = self.headers.get("Content-Length", "0")
        try:
            length = int(raw)
        except ValueError:
            length = -1
        if length < 0:
            raise codec.RequestError(400, f"expected a non-negative Content-Length, got {raw!r}")
        limit = self.server.front.max_request_bytes
        if length > limit:
            raise codec.RequestError(413, f"expected a request body of at most {limit} bytes, got {length}")
        return length

    def _discard_body(self) -> None:
        """Read away a body left unread by an early answer, so the connection can carry the next
        request; close it instead when the body is too large or its length unknown. Reading it
        also spares the client a reset that would hide the answer."""
        if self._body_done:
            return
        self._body_done = True
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            length = -1
        chunked = "chunked" in self.headers.get("Transfer-Encoding", "").lower()
        # Up to twice the limit is read away, so a client slightly over it reliably sees its 413.
        if chunked or not 0 <= length <= 2 * self.server.front.max_request_bytes:
            self.close_connection = True
            return
        while length > 0:
            chunk = self.rfile.read(min(length, 1 << 20))
            if not chunk:
                self.close_connection = True
                return
            length -= len(chunk)

    def _check_auth(self, path: str) -> None:
        token = self.server.front.token
        if token is None or path.rstrip("/") in _OPEN_PATHS:
            return
        scheme, _, given = self.headers.get("Authorization", "").partition(" ")
        # compare_digest: the time taken must not tell how much of a guessed token was right.
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode("utf-8"), token):
            raise codec.RequestError(401, "expected header 'Authorization: Bearer <token>' with the server's "
                                          "token, got " + ("a wrong token" if scheme else "none"))

    # -- answers ---------------------------------------------------------------------------------

    def _send_status(self, ok: bool) -> None:
        self._send(200 if ok else 503, b"", None)

    def _send_json(self, doc: dict) -> None:
        self._send(200, json.dumps(doc, ensure_ascii=False).encode("utf-8"), "application/json")

    def _send_error(self, status: int, message: str, close: bool = False) -> None:
        if status >= 500 or status == 413:
            logger.warning("%s %s -> %d: %s", self.command, self.path, status, message)
        else:
            logger.debug("%s %s -> %d: %s", self.command, self.path, status, message)
        self.close_connection = self.close_connection or close
        self._send(status, json.dumps({"error": message}, ensure_ascii=False).encode("utf-8"), "application/json")

    def _send(self, status: int, body: bytes, content_type: str | None, headers: dict | None = None,
              compress: bool = False) -> None:
        if compress:
            body, encoding = _compress(body, self.headers.get("Accept-Encoding", ""))
            if encoding:
                headers = {**(headers or {}), "Content-Encoding": encoding}
        try:
            self._discard_body()
            if self.server.closing:
                self.close_connection = True
            self.send_response(status)
            if content_type:
                self.send_header("Content-Type", content_type)
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            if self.close_connection:
                self.send_header("Connection", "close")
            if status == 401:
                self.send_header("WWW-Authenticate", 'Bearer realm="wanwu"')
            self.end_headers()
            if body:
                self.wfile.write(body)
        except OSError as exc:  # the client went away (or stalled past the timeout): nobody to answer
            logger.debug("could not answer %s %s: %s", self.command, self.path, exc)
            self.close_connection = True


def _compress(body: bytes, accept: str) -> tuple[bytes, str]:
    """Compress an answer the way the client accepts (gzip first; level 1: the answer is latency)."""
    accepted = {part.split(";")[0].strip().lower() for part in accept.split(",")}
    if "gzip" in accepted:
        return gzip.compress(body, compresslevel=1, mtime=0), "gzip"
    if "deflate" in accepted:
        return zlib.compress(body, 1), "deflate"
    return body, ""
