"""Connection-level defences of the HTTP door, in front of aiohttp's protocol.

aiohttp parses and answers requests; what it does not bound is how many
connections are open and how long a client may take to send a request's head.
A client that opens sockets and trickles header bytes would hold them forever
(slowloris), and enough of them exhaust the daemon's file descriptors. So each
accepted connection is wrapped in a ``Guard``, a transparent ``asyncio.Protocol``
that forwards everything to aiohttp's and adds three rules:

* at most ``max_connections`` are open. At the cap, a new connection takes the
  place of the one that has waited longest without a request in progress (idle, or
  still trickling a head: what a slowloris flood is made of), so a real client still
  gets in (it sends its request at once, and the flood's older connections give
  way first). When every connection has a request in progress (or is draining a
  refused body, below), the new one is answered ``503`` and closed, before a byte
  of it is read;
* an idle connection (new, or between keep-alive requests) is closed after
  ``keepalive_timeout_s`` without a byte;
* once a request's first byte has arrived, its head (request line and headers)
  must be complete within ``header_timeout_s``, however slowly the bytes trickle;
* except while a body answered without being read (a 413, say) is still arriving:
  aiohttp reads and drops it for up to ``linger_s`` (a "lingering close"), and those
  bytes are not the next request's head. Cutting the connection then would reset
  it under the client, who could lose the answer that says what was wrong.

The request handler tells the guard when a request's head was parsed
(``request_started``) and when its answer was sent (``request_finished``); the
body's own minimum rate is the handler's to enforce, since only it knows how
many bytes to expect. All of this runs on the event loop's thread.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from dataclasses import dataclass
from typing import Callable

logger = logging.getLogger(__name__)

_REFUSAL_BODY = b'{"error": "too many connections; try again later"}'
_REFUSAL = (b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Type: application/json\r\n"
            b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(_REFUSAL_BODY), _REFUSAL_BODY))


@dataclass(frozen=True)
class GuardLimits:
    """How many connections, and how long a client may stay silent or slow."""

    max_connections: int = 512  # open connections; more are refused at once
    keepalive_timeout_s: float = 15.0  # a connection without a request in progress closes after this long idle
    header_timeout_s: float = 10.0  # a request's head must be complete this long after its first byte
    linger_s: float = 10.0  # an unread body is drained this long after its answer (aiohttp's lingering_time)


class GuardedConnections:
    """The protocol factory for ``loop.create_server``: a ``Guard`` around each of aiohttp's protocols.

    Args:
        inner: aiohttp's protocol factory (``AppRunner.server``).
        limits: the rules above.
    """

    def __init__(self, inner: Callable[[], asyncio.Protocol], limits: GuardLimits) -> None:
        self.inner = inner
        self.limits = limits
        self.open: weakref.WeakSet[Guard] = weakref.WeakSet()
        self.refused = 0  # connections turned away at the cap
        self.evicted = 0  # waiting connections closed at the cap to make room for new ones
        self.timed_out = 0  # connections closed for silence or a slow head
        self._by_transport: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def __call__(self) -> asyncio.Protocol:
        if len(self.open) >= self.limits.max_connections and not self._evict():
            self.refused += 1
            return _Refuse()
        guard = Guard(self, self.inner())
        self.open.add(guard)
        return guard

    def _evict(self) -> bool:
        """Close the connection that has waited longest without a request in progress; False if none."""
        # A lingering connection has its answer on the way: cutting it could reset the answer away.
        waiting = [g for g in self.open if not g.in_request and not g.lingering and g.transport is not None]
        if not waiting:
            return False
        oldest = min(waiting, key=lambda g: g.waiting_since)
        self.open.discard(oldest)
        self.evicted += 1
        assert oldest.transport is not None
        oldest.transport.abort()
        return True

    def of(self, transport: asyncio.BaseTransport | None) -> "Guard | None":
        """The guard of the connection behind ``transport`` (a request's ``request.transport``)."""
        return self._by_transport.get(transport) if transport is not None else None


class Guard(asyncio.Protocol):
    """One connection: forwards to aiohttp's protocol, enforces the idle and head deadlines."""

    def __init__(self, owner: GuardedConnections, inner: asyncio.Protocol) -> None:
        self.owner = owner
        self.inner = inner
        self.transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.in_request = False  # a request's head was parsed and its answer not yet sent
        self.waiting_since = 0.0  # loop time it began waiting for its next request (or its first)
        self._head_started = False  # bytes of the next request's head have arrived
        self.lingering = False  # the last request's unread body is being drained

    # -- the rules

    def request_started(self) -> None:
        """The handler has the request's head: no head deadline until its answer is sent."""
        self.in_request = True
        self.lingering = False
        self._cancel()

    def request_finished(self, body_left: bool = False) -> None:
        """The answer was sent: the connection is idle until the next request's first byte.

        Args:
            body_left: the request's body had not all arrived; aiohttp drains it for up to
                ``linger_s``, and the idle and head deadlines wait until then.
        """
        self.in_request = False
        self._head_started = False
        self.lingering = body_left
        self.waiting_since = asyncio.get_running_loop().time()
        if body_left:  # aiohttp closes after linger_s; this is only its backstop
            self._arm(self.owner.limits.linger_s + 1.0, "unread body still arriving after the linger time")
        else:
            self._arm(self.owner.limits.keepalive_timeout_s, "idle")

    def _arm(self, delay_s: float, why: str) -> None:
        self._cancel()
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(delay_s, self._expire, why)

    def _cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expire(self, why: str) -> None:
        self._timer = None
        if self.transport is not None and not self.in_request:
            self.owner.timed_out += 1
            logger.debug("closing a connection: %s", why)
            self.transport.abort()

    # -- asyncio.Protocol, forwarded

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.waiting_since = asyncio.get_running_loop().time()
        self.owner._by_transport[transport] = self
        self._arm(self.owner.limits.keepalive_timeout_s, "idle")
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if not self.in_request and not self._head_started and not self.lingering:
            self._head_started = True  # the head's clock starts at its first byte
            self._arm(self.owner.limits.header_timeout_s, "request head too slow")
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel()
        self.owner.open.discard(self)
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


class _Refuse(asyncio.Protocol):
    """Past the connection cap: a 503 and the door, before reading anything."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        try:
            transport.write(_REFUSAL)  # type: ignore[attr-defined]
        finally:
            transport.close()

    def data_received(self, data: bytes) -> None:
        pass
