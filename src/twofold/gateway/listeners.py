"""One TLS listener per environment.

The listener accepts connections itself and runs TLS on each socket
(:class:`~twofold.gateway.tls_transport.TLSConnection`), so that until its handshake
completes it can end it: near the
connection cap of the listener (``max_connections``) or of the process (from its
descriptor limit), the oldest connection still in its handshake — unauthenticated — is shed
to make room, and connections that proved a client certificate are kept. Once TLS is up the
connection is a :class:`~twofold.gateway.protocol.GatewayProtocol`; the listener checks the
deadlines (handshake, head, body, idle, send) about twice a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import socket
import time
from typing import TYPE_CHECKING

from twofold.gateway.protocol import GatewayProtocol
from twofold.gateway.tls_transport import TLSConnection
from twofold.gateway.wire import Limits

if TYPE_CHECKING:
    from twofold.gateway.core import Gateway

log = logging.getLogger("twofold.gateway")

HANDSHAKE_TIMEOUT = 10.0
SWEEP_INTERVAL = 0.5
DESCRIPTOR_RESERVE = 64  # kept free for the database, the listeners, logs


def descriptor_budget() -> int:
    """Client connections one process may hold: half of what its descriptor limit leaves
    after a reserve (each forwarded request may hold an upstream connection too)."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1 << 20
    return max(16, (soft - DESCRIPTOR_RESERVE) // 2)


class Connections:
    """The client connections of one process's listeners: the process-wide cap and the
    deadline sweep."""

    def __init__(self, budget: int | None = None) -> None:
        self.budget = budget if budget is not None else descriptor_budget()
        self.open = 0
        self.listeners: list[Listener] = []
        self.active: set[GatewayProtocol] = set()
        self.others = 0  # listeners without TLS handshakes (a TLS edge's), whose deadlines are swept too
        self._sweeper: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None

    def listeners_started(self) -> None:
        """A listener other than :class:`Listener` (see :attr:`others`) started."""
        self.others += 1
        self.start()

    async def listener_stopped(self) -> None:
        self.others -= 1
        if not self.listeners and not self.others:
            await self.stop()

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            now = time.monotonic()
            for listener in self.listeners:
                try:
                    listener.expire_handshakes(now - HANDSHAKE_TIMEOUT)
                except Exception:  # the sweep must go on: every deadline depends on it
                    log.exception("ending timed-out handshakes failed")
            for protocol in [p for p in self.active if p.deadline is not None and p.deadline <= now]:
                try:
                    protocol.expire()
                except Exception:
                    log.exception("a connection's deadline could not be applied")
                    protocol.abort()

    def oldest_pending(self) -> TLSConnection | None:
        """The connection that has been in its TLS handshake longest, on any listener."""
        oldest: TLSConnection | None = None
        for listener in self.listeners:
            candidate = next(iter(listener.pending), None)
            if candidate is not None and (oldest is None or candidate.accepted < oldest.accepted):
                oldest = candidate
        return oldest


class Listener:
    """One environment's TLS listener: accepts connections itself and runs their TLS (to be
    able to end each one until its handshake completes), then hands them to the protocol."""

    def __init__(
        self, gateway: Gateway, env: str, limits: Limits, max_connections: int, connections: Connections
    ) -> None:
        self.gateway, self.env, self.limits = gateway, env, limits
        self.max_connections = max_connections
        self.connections = connections
        self.open = 0
        self.pending: dict[TLSConnection, None] = {}  # in their handshake, oldest first
        self.sockets: list[socket.socket] = []
        self._closing = False
        self._drained = asyncio.Event()
        metrics = gateway.metrics
        self._failures = metrics.handshake_failures.labels(env)
        self._shed = metrics.connections_dropped.labels(env, "shed")
        self._full = metrics.connections_dropped.labels(env, "full")
        metrics.connections.labels(env).set_function(lambda: self.open)  # read when scraped

    async def start(self, host: str, port: int, *, reuse_port: bool = False) -> None:
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        for family, kind, proto, _name, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if reuse_port:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(address)
                sock.listen(1024)
                sock.setblocking(False)
            except OSError:
                sock.close()
                for other in self.sockets:
                    other.close()
                raise
            self.sockets.append(sock)
        self.connections.listeners.append(self)
        self.connections.start()
        for sock in self.sockets:
            loop.add_reader(sock.fileno(), self._accept, sock)

    def _accept(self, server: socket.socket) -> None:
        for _ in range(64):  # then let other work run
            try:
                sock, address = server.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # out of descriptors (or memory): wait a moment
                log.warning("accepting a connection failed (%s); retrying in 0.1 s", exc.strerror)
                loop = asyncio.get_running_loop()
                loop.remove_reader(server.fileno())
                loop.call_later(0.1, self._resume_accepting, server)
                return
            self._accepted(sock, address)

    def _resume_accepting(self, server: socket.socket) -> None:
        if not self._closing:
            asyncio.get_running_loop().add_reader(server.fileno(), self._accept, server)

    def _accepted(self, sock: socket.socket, address: object) -> None:
        """A new connection: make room for it by shedding the oldest connection still in
        its handshake, or refuse it when every connection is authenticated."""
        connections = self.connections
        if self._closing:
            sock.close()
            return
        if self.open >= self.max_connections or connections.open >= connections.budget:
            # this listener full: only its own handshakes make room; else the process's oldest
            if self.open >= self.max_connections:
                victim = next(iter(self.pending), None)
            else:
                victim = connections.oldest_pending()
            if victim is None:
                self._full.inc()
                sock.close()
                return
            victim.end_handshake(shed=True)
        try:
            sock.setblocking(False)
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            connection = TLSConnection(
                asyncio.get_running_loop(),
                sock,
                address,
                self.gateway.listening_context(self.env),
                self._ready,
                self._failed,
            )
        except Exception as exc:  # the client may have gone already; the next one is accepted
            log.warning("a connection could not be set up for TLS (%s)", type(exc).__name__)
            sock.close()
            return
        self.open += 1
        connections.open += 1
        self.pending[connection] = None
        try:
            connection.start()
        except Exception:
            log.exception("a connection's TLS could not be started")
            connection.end_handshake(shed=False)

    def expire_handshakes(self, started_before: float) -> None:
        """End the handshakes that began before ``started_before`` (they took too long)."""
        while self.pending:
            oldest = next(iter(self.pending))
            if oldest.accepted > started_before:
                return
            oldest.end_handshake(shed=False)

    # --- accounting ----------------------------------------------------------------------------

    def _ready(self, connection: TLSConnection) -> GatewayProtocol:
        """The handshake completed: the connection is the protocol's from now on."""
        del self.pending[connection]
        protocol = GatewayProtocol(self.gateway, self.env, self.limits, on_close=self._closed)
        self.connections.active.add(protocol)
        return protocol

    def _failed(self, connection: TLSConnection, shed: bool) -> None:
        """It ended in its handshake: shed, timed out, untrusted, no certificate, or not TLS."""
        self.pending.pop(connection, None)
        if not self._closing:
            (self._shed if shed else self._failures).inc()
        self._release()

    def _closed(self, protocol: GatewayProtocol) -> None:
        self.connections.active.discard(protocol)
        self._release()

    def _release(self) -> None:
        self.open -= 1
        self.connections.open -= 1
        if self._closing and self.open <= 0:
            self._drained.set()

    # --- stopping -----------------------------------------------------------------------------

    async def close(self, grace: float = 2.0) -> None:
        """Stop accepting, drop handshakes, let answers in progress finish (up to ``grace``)."""
        self._closing = True
        loop = asyncio.get_running_loop()
        for sock in self.sockets:
            loop.remove_reader(sock.fileno())
            sock.close()
        for connection in list(self.pending):
            connection.end_handshake(shed=True)
        mine = [p for p in self.connections.active if p.environment == self.env and p.gateway is self.gateway]
        for protocol in mine:
            protocol.shutdown()
        if self.open > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drained.wait(), grace)
        for protocol in mine:
            protocol.abort()
        if self in self.connections.listeners:
            self.connections.listeners.remove(self)
        if not self.connections.listeners and not self.connections.others:
            await self.connections.stop()


async def serve_environment(
    gateway: Gateway, env: str, host: str, port: int, *, reuse_port: bool = False
) -> Listener:
    """Start the TLS listener of one environment; :func:`close_listener` stops it."""
    gateway.listening_context(env)  # built now, not on the first handshake
    listener = Listener(gateway, env, gateway.limits, gateway.config.max_connections, gateway.connections)
    await listener.start(host, port, reuse_port=reuse_port)
    return listener


async def close_listener(listener: Listener) -> None:
    await listener.close()
