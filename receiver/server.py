"""Serving the receiver so that no client on the machine can knock it over.

aiohttp's server has no timeout for a request's head and no cap on connections: 1,100
clients that each send half a request header hold 1,100 descriptors for as long as
they like, past the receiver's limit, and real alerts then time out. Here every
connection goes through :class:`GuardedProtocol`, a transparent proxy in front of
aiohttp's protocol that:

- holds at most ``receiver.max_connections`` (well below the descriptor limit, so the
  receiver keeps descriptors for its work): at the limit, the oldest connection still
  waiting for a request head is closed to make room, so stalled clients cannot lock
  out Alertmanager; only when every connection is in the middle of a request is the
  new one refused;
- closes a connection whose request head is not complete within
  ``receiver.header_timeout`` seconds of its opening or of its previous answer
  (slow-header clients; idle keep-alive connections).

Descriptors stay within :func:`descriptors_needed` (``max_connections`` + 112 with one
listening socket) even in a flood of new connections: asyncio accepts up to its
``backlog`` argument in one go before any of them reaches
:meth:`GuardedProtocol.connection_made` (and an evicted connection's descriptor is
closed only on the loop's next turn), so with asyncio's usual 128 a burst held
``max_connections`` + 3 x 128 descriptors, ran into the limit (EMFILE), and asyncio then
stopped accepting for a whole second (``ACCEPT_RETRY_DELAY``), real alerts included.
:func:`serve` lets asyncio accept :data:`ACCEPT_BATCH` at a time and keeps the kernel's
queue of finished handshakes at :data:`LISTEN_BACKLOG`, so a burst waits in the kernel
(costing no descriptor) instead of having its SYNs dropped.

The request body is read within ``receiver.body_timeout`` (a 408 otherwise, in
``app.read_notification``). Refusals and timeouts are counted in
``caretaker_receiver_connections_closed_total{reason}`` and logged at most once per
10 s (:class:`~receiver.app.QuietProtocolErrors`).
"""

from __future__ import annotations

import asyncio
import logging
import resource
import signal
import ssl
from collections.abc import Callable
from typing import Any

from aiohttp import web

__all__ = ["ACCEPT_BATCH", "LISTEN_BACKLOG", "ConnectionGuard", "GuardedProtocol", "descriptors_needed", "serve"]

log = logging.getLogger(__name__)

ACCEPT_BATCH = 16
"""Connections asyncio accepts in one turn of the loop (its ``backlog`` argument)."""
LISTEN_BACKLOG = 1024
"""The kernel's queue of finished handshakes (``listen(2)``; capped by net.core.somaxconn,
4096 by default since Linux 5.4, 128 before)."""
OWN_DESCRIPTORS = 64
"""Descriptors the receiver keeps for its own work: the state store (two SQLite
connections with their WAL files), Redis, probes, a pidfd per service it started, the
pipes of a repair's command."""


def descriptors_needed(max_connections: int, listening: int = 1) -> int:
    """Descriptors the receiver may hold at once with ``max_connections`` clients and
    ``listening`` listening sockets: the connections; three accept batches per listening
    socket in flight (in one turn of the loop one batch is accepted, the previous one's
    transports wait for ``connection_made``, and the one before's evicted connections
    are closed only on the next turn: measured, 8 connections and a burst of 300 peaked
    at 56 = 8 + 3 x 16); and :data:`OWN_DESCRIPTORS`."""
    return max_connections + 3 * ACCEPT_BATCH * listening + OWN_DESCRIPTORS


class ConnectionGuard:
    """Counts live connections and their timers; one for all of :func:`serve`'s listening sockets."""

    def __init__(self, factory: Callable[[], asyncio.Protocol], max_connections: int, header_timeout: float) -> None:
        self.factory = factory
        self.max_connections = max_connections
        self.header_timeout = header_timeout
        self.live: dict[GuardedProtocol, None] = {}
        """Open connections, oldest first."""
        self.closed = {"over_limit": 0, "header_timeout": 0}
        """Connections this guard closed, by reason (a counter)."""
        self._last_log = 0.0

    def __call__(self) -> GuardedProtocol:
        return GuardedProtocol(self)

    def note(self, reason: str) -> None:
        self.closed[reason] += 1
        now = asyncio.get_running_loop().time()
        if now - self._last_log >= 10.0:
            self._last_log = now
            log.warning("closing client connections: %d over the limit of %d, %d too slow to send a request "
                        "(in all)", self.closed["over_limit"], self.max_connections, self.closed["header_timeout"])


class GuardedProtocol(asyncio.Protocol):
    """Passes everything to aiohttp's protocol; see the module docstring for what it adds."""

    def __init__(self, guard: ConnectionGuard) -> None:
        self.guard = guard
        self.inner: Any = None
        self.transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None

    # --- the guard's part ---------------------------------------------------------------------
    def request_started(self) -> None:
        """A request's head is complete (called from the app's middleware)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def request_finished(self) -> None:
        """Its answer is sent: the next request must come within the header timeout."""
        self._arm()

    def _arm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(self.guard.header_timeout, self._too_slow)

    @property
    def waiting(self) -> bool:
        """No request in progress: waiting for the next request head (or stalled in it)."""
        return self._timer is not None

    def evict(self) -> None:
        """Close this connection to make room for a new one."""
        self.guard.live.pop(self, None)
        if self.transport is not None:
            self.transport.abort()

    def _too_slow(self) -> None:
        self._timer = None
        if self.transport is not None and not self.transport.is_closing():
            self.guard.note("header_timeout")
            self.transport.abort()

    # --- asyncio.Protocol, passed on ------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        if len(self.guard.live) >= self.guard.max_connections:
            waiting = next((c for c in self.guard.live if c.waiting), None)
            self.guard.note("over_limit")
            if waiting is None:  # every connection is in the middle of a request: refuse this one
                transport.abort()
                return
            waiting.evict()
        self.guard.live[self] = None
        transport.set_protocol(self)
        self.inner = self.guard.factory()
        self.inner.connection_made(transport)
        transport.set_protocol(self)  # aiohttp's protocol may set itself; keep the proxy in front
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self.inner is not None:
            self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received() if self.inner is not None else None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.guard.live.pop(self, None)
        if self.inner is not None:
            self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self.inner is not None:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.inner is not None:
            self.inner.resume_writing()


GUARD_KEY = web.AppKey("connection_guards", list[ConnectionGuard])
"""The guards of the app's listening sockets (for the connection metrics)."""


async def serve(app: web.Application, host: str, port: int, tls: ssl.SSLContext | None, max_connections: int,
                header_timeout: float, keepalive_timeout: float) -> None:
    """Run ``app`` on ``host:port`` behind a :class:`ConnectionGuard` until SIGINT or SIGTERM."""
    runner = web.AppRunner(app, access_log=None, keepalive_timeout=keepalive_timeout, handle_signals=False)
    await runner.setup()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    server = runner.server
    assert server is not None
    guard = ConnectionGuard(server, max_connections, header_timeout)
    app[GUARD_KEY].append(guard)
    # With TLS a connection reaches the guard only once its handshake is done: a client
    # that never finishes one is closed after header_timeout too (asyncio's default: 60 s).
    listener = await loop.create_server(guard, host, port, ssl=tls, backlog=ACCEPT_BATCH, reuse_address=True,
                                        ssl_handshake_timeout=header_timeout if tls is not None else None)
    try:
        for listening in listener.sockets:
            # asyncio passed ACCEPT_BATCH to listen(2) as well; a second listen(2) on the
            # same socket (a duplicate descriptor of it) changes only the kernel's queue.
            with listening.dup() as raw:
                raw.listen(LISTEN_BACKLOG)
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        needed = descriptors_needed(max_connections, len(listener.sockets))
        if soft != resource.RLIM_INFINITY and needed > soft:
            log.warning("receiver.max_connections %d needs about %d descriptors and the limit is %d (LimitNOFILE): "
                        "a flood of clients can make the receiver stop accepting for a second at a time; "
                        "lower max_connections or raise the limit", max_connections, needed, soft)
        await stop.wait()
    finally:
        listener.close()
        await listener.wait_closed()
        await runner.cleanup()
