"""Listening for HTTP/1.1 under limits, for the servers of `twofold serve`.

aiohttp holds a connection as long as its client wishes: an idle keep-alive for an hour, a
request whose headers arrive one line every few seconds, a body that never ends, a TCP
connection that never starts its TLS handshake. And a listener accepts until the process
runs out of file descriptors, after which nobody is served. Here:

* :class:`ConnectionLimits` — the header-read, body-read and idle keep-alive timeouts and
  the cap on connections per listener (settings of `twofold serve`);
* :func:`raise_nofile_limit` — the soft RLIMIT_NOFILE raised to the hard limit, and
  :meth:`ConnectionLimits.fitted` — the caps fitted to it, with headroom;
* :class:`GuardedSite` — an aiohttp site that accepts connections itself, so that it can
  count them from the moment they are accepted and, at the cap, shed the connections that
  have proved nothing first: those still in their TLS handshake, then those that have not
  sent a request, then idle keep-alives — never one whose request is being handled;
* :class:`GuardedRequestHandler` — aiohttp's protocol with the timeouts, which also never
  puts a request's bytes into a log line (aiohttp logs the raw header line of a request it
  cannot parse — a bearer token included).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import resource
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

log = logging.getLogger("twofold.listener")

HEADROOM = 256  # descriptors kept free of client connections: database, upstreams, files, logs
MIN_CONNECTIONS = 16


@dataclass(frozen=True)
class ConnectionLimits:
    """What every listener enforces. Timeouts in seconds."""

    header_timeout: float = 10.0  # TLS handshake, and a request's first byte to its last header
    body_timeout: float = 30.0  # complete headers to the end of the body
    idle_timeout: float = 75.0  # a keep-alive connection between two requests
    max_connections: int = 4096  # per listener

    def fitted(self, listeners: int, nofile: int) -> ConnectionLimits:
        """The cap lowered, if need be, so that ``listeners`` full listeners still leave
        headroom under ``nofile`` descriptors (one eighth, at least :data:`HEADROOM`)."""
        budget = nofile - max(HEADROOM, nofile // 8)
        fair = max(MIN_CONNECTIONS, budget // max(listeners, 1))
        return replace(self, max_connections=min(self.max_connections, fair))


def raise_nofile_limit() -> int:
    """Raise this process's soft limit of open files to its hard limit (Linux's default
    soft limit of 1024 is what a flood of idle connections exhausts); returns the limit now
    in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-files limit from %d to %d (%s)", soft, target, exc)
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


# --- one connection's place in the listener's books -----------------------------------------------

HANDSHAKE, WAITING, ACTIVE, IDLE, GONE = "handshake", "waiting", "active", "idle", "gone"
# Shed first to last; an ACTIVE connection (a request being handled) is never shed.
SHED_ORDER = (HANDSHAKE, WAITING, IDLE)


class _Entry:
    __slots__ = ("handler", "state", "task")

    def __init__(self) -> None:
        self.task: asyncio.Task[None] | None = None  # accepting it (the TLS handshake)
        self.handler: GuardedRequestHandler | None = None  # once connected
        self.state = GONE


class _Books:
    """The connections of one listener by state, each state oldest first."""

    def __init__(self) -> None:
        self.by_state: dict[str, dict[_Entry, None]] = {s: {} for s in (HANDSHAKE, WAITING, ACTIVE, IDLE)}
        self.shed = 0
        self.refused = 0

    def __len__(self) -> int:
        return sum(len(entries) for entries in self.by_state.values())

    def move(self, entry: _Entry, state: str) -> None:
        """Record a new state; a connection that is gone stays gone."""
        if entry.state == GONE and state != HANDSHAKE:
            return
        self.by_state.get(entry.state, {}).pop(entry, None)
        entry.state = state
        self.by_state[state][entry] = None

    def forget(self, entry: _Entry) -> None:
        self.by_state.get(entry.state, {}).pop(entry, None)
        entry.state = GONE

    def shed_one(self) -> bool:
        """Close the connection that has proved least; False when every one is busy."""
        for state in SHED_ORDER:
            entries = self.by_state[state]
            if entries:
                entry = next(iter(entries))
                self.forget(entry)
                self.shed += 1
                if entry.handler is not None:
                    entry.handler.force_close()
                elif entry.task is not None:
                    entry.task.cancel()  # mid-handshake: the loop closes the socket
                return True
        return False


# --- the protocol ---------------------------------------------------------------------------------


class GuardedRequestHandler(RequestHandler):
    """aiohttp's HTTP/1.1 protocol with the header and body timeouts, reporting its state to
    the listener's books, and logging refusals without a byte of the request."""

    __slots__ = ("_body_timer", "_books", "_entry", "_header_timer", "_limits")

    def __init__(
        self, manager: web.Server, *, limits: ConnectionLimits, books: _Books, entry: _Entry, **kwargs: Any
    ) -> None:
        super().__init__(manager, keepalive_timeout=limits.idle_timeout, **kwargs)
        self._limits = limits
        self._books = books
        self._entry = entry
        self._header_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None

    # -- states and timers

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._entry.handler = self
        self._books.move(self._entry, WAITING)
        self._arm_header_timer()  # a new connection owes its first request's headers
        super().connection_made(transport)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._books.forget(self._entry)
        self._cancel_timers()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        before = self._request_count
        super().data_received(data)
        if self._request_count != before:  # one or more requests' headers are complete
            self._cancel_header_timer()
            if self._entry.state != ACTIVE:
                self._books.move(self._entry, ACTIVE)
            payload = self._messages[-1][1] if self._messages else None
            if payload is not None and not payload.is_eof():
                self._arm_body_timer(payload)
        elif data and self._header_timer is None and self._entry.state == IDLE:
            self._arm_header_timer()  # the first bytes of a next request: its headers are owed

    async def _handle_request(
        self,
        request: web.BaseRequest,
        start_time: float | None,
        request_handler: Callable[[web.BaseRequest], Awaitable[web.StreamResponse]],
    ) -> tuple[web.StreamResponse, bool]:
        if self._entry.state != ACTIVE:
            self._books.move(self._entry, ACTIVE)
        try:
            return await super()._handle_request(request, start_time, request_handler)
        finally:
            self._cancel_body_timer()
            if not self._messages and self._entry.state == ACTIVE:
                self._books.move(self._entry, IDLE)

    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        self._header_timer = self._loop.call_later(self._limits.header_timeout, self._headers_late)

    def _arm_body_timer(self, payload: Any) -> None:
        self._cancel_body_timer()
        self._body_timer = self._loop.call_later(self._limits.body_timeout, self._body_late, payload)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _cancel_body_timer(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _cancel_timers(self) -> None:
        self._cancel_header_timer()
        self._cancel_body_timer()

    def _headers_late(self) -> None:
        self._header_timer = None
        if self._entry.state in (WAITING, IDLE):
            log.debug(
                "closed a connection: no complete request headers within %g s", self._limits.header_timeout
            )
            self.force_close()

    def _body_late(self, payload: Any) -> None:
        """The handler reading the body gets a 408; the connection closes after the answer
        (nothing more of that body is waited for)."""
        self._body_timer = None
        if not payload.is_eof():
            self._lingering_time = 0.0
            payload.set_exception(
                web.HTTPRequestTimeout(
                    text=f"the request body did not arrive within {self._limits.body_timeout:g} s"
                )
            )

    # -- refusals of requests that cannot be parsed

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """aiohttp's version logs the parser's message — which quotes the offending header
        line, a bearer token or a cookie included — with a traceback, and sends it back.
        Here: one line with the status, the error's type and the client's address."""
        what = type(exc).__name__ if exc is not None else "error"
        level = logging.ERROR if status >= 500 else logging.INFO
        log.log(level, "refused a request from %s: %d %s", request.remote, status, what)
        if request.writer.output_size > 0:
            raise ConnectionError("a response was already sent; the connection is dropped")
        text = "the request could not be read as HTTP/1.1" if status < 500 else "internal error"
        response = web.json_response({"error": {"code": f"http_{status}", "message": text}}, status=status)
        response.force_close()
        return response


# --- the site -------------------------------------------------------------------------------------


class GuardedServer:
    """Accepts on its sockets and hands each connection to the event loop (TLS included)
    with :class:`GuardedRequestHandler`; what aiohttp's ``BaseSite`` expects of a server."""

    def __init__(
        self,
        server: web.Server,
        sockets: list[socket.socket],
        *,
        ssl_context: ssl.SSLContext | None,
        limits: ConnectionLimits,
    ) -> None:
        self._server = server
        self.sockets = sockets
        self._ssl = ssl_context
        self.limits = limits
        self.books = _Books()
        self._loop = asyncio.get_running_loop()
        self._accepting = [self._loop.create_task(self._accept(sock)) for sock in sockets]
        self._kwargs: dict[str, Any] = dict(getattr(server, "_kwargs", {}))
        self._kwargs.pop("keepalive_timeout", None)
        self._last_warning = 0.0

    def is_serving(self) -> bool:
        return bool(self._accepting)

    def close(self) -> None:
        for task in self._accepting:
            task.cancel()
        self._accepting = []
        for sock in self.sockets:
            sock.close()
        for entry in list(self.books.by_state[HANDSHAKE]):
            if entry.task is not None:
                entry.task.cancel()

    async def wait_closed(self) -> None:
        await asyncio.sleep(0)

    async def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                conn, _address = await self._loop.sock_accept(listener)
            except asyncio.CancelledError:
                raise
            except OSError as exc:
                if exc.errno == errno.EBADF:  # the listener was closed
                    return
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self._warn(f"out of file descriptors ({exc.strerror}); shedding connections")
                    self.books.shed_one()
                    await asyncio.sleep(0.05)
                continue
            self._admit(conn)

    def _admit(self, conn: socket.socket) -> None:
        if len(self.books) >= self.limits.max_connections and not self.books.shed_one():
            self.books.refused += 1
            self._warn(f"{self.limits.max_connections} connections, all busy: refusing new ones")
            conn.close()
            return
        conn.setblocking(False)
        entry = _Entry()
        self.books.move(entry, HANDSHAKE)
        entry.task = self._loop.create_task(self._connect(conn, entry))
        entry.task.add_done_callback(lambda _task: self._handshake_over(entry))

    async def _connect(self, conn: socket.socket, entry: _Entry) -> None:
        def protocol() -> GuardedRequestHandler:
            return GuardedRequestHandler(
                self._server,
                limits=self.limits,
                books=self.books,
                entry=entry,
                loop=self._loop,
                **self._kwargs,
            )

        try:
            if self._ssl is None:
                await self._loop.connect_accepted_socket(protocol, conn)
            else:
                await self._loop.connect_accepted_socket(
                    protocol, conn, ssl=self._ssl, ssl_handshake_timeout=self.limits.header_timeout
                )
        except (OSError, ssl.SSLError, TimeoutError, EOFError) as exc:
            log.debug("a connection ended before its TLS handshake completed (%s)", type(exc).__name__)
            with contextlib.suppress(OSError):
                conn.close()

    def _handshake_over(self, entry: _Entry) -> None:
        entry.task = None
        if entry.state == HANDSHAKE:  # failed, timed out or shed: it never became a connection
            self.books.forget(entry)

    def _warn(self, message: str) -> None:
        now = time.monotonic()
        if now - self._last_warning > 10:  # at most one line every 10 s under a flood
            self._last_warning = now
            log.warning("listener %s: %s", _name(self.sockets), message)


def _name(sockets: list[socket.socket]) -> str:
    with contextlib.suppress(OSError):
        return ", ".join(str(s.getsockname()[:2]) for s in sockets)
    return "?"


def bind(
    host: str | None, port: int, *, reuse_port: bool = False, backlog: int = 1024
) -> list[socket.socket]:
    """Listening sockets for every address of ``host`` (all interfaces when empty)."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    seen: set[tuple[int, Any]] = set()
    try:
        for family, kind, proto, _canon, address in infos:
            if (family, address) in seen:
                continue
            seen.add((family, address))
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(backlog)
            sock.setblocking(False)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


class GuardedSite(web.BaseSite):
    """``web.TCPSite`` with :class:`ConnectionLimits` (see the module's description)."""

    __slots__ = ("_host", "_limits", "_port", "_reuse_port")

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str | None,
        port: int,
        *,
        limits: ConnectionLimits | None = None,
        ssl_context: ssl.SSLContext | None = None,
        reuse_port: bool = False,
    ) -> None:
        super().__init__(runner, ssl_context=ssl_context, backlog=1024)
        self._host, self._port, self._reuse_port = host, port, reuse_port
        self._limits = limits or ConnectionLimits()

    @property
    def name(self) -> str:
        scheme = "https" if self._ssl_context else "http"
        return f"{scheme}://{self._host or '0.0.0.0'}:{self._port}"  # noqa: S104 - a description

    @property
    def guarded(self) -> GuardedServer:
        assert isinstance(self._server, GuardedServer), "start() first"
        return self._server

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        sockets = bind(self._host, self._port, reuse_port=self._reuse_port, backlog=self._backlog)
        self._server = GuardedServer(server, sockets, ssl_context=self._ssl_context, limits=self._limits)  # type: ignore[assignment]
