"""A lean, pooled HTTP/1.1 client for plain-HTTP upstreams — the gateway's hot path.

Measured in `bench/gateway_bench.py`: forwarding through ``aiohttp.ClientSession`` was the
largest single cost of a signed request (about 28% of the gateway's CPU); this client
writes each request in one call and parses responses with ``httptools`` (llhttp, in C),
cutting the gateway's CPU per request by about 40% in the trial that led to it. HTTPS
upstreams and HEAD requests (whose responses have no body despite a length) still go
through ``aiohttp``.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import cast

import httptools

MAX_RESPONSE = 16 * 1024 * 1024
MAX_HEADERS = 100
MAX_HEADER_BYTES = 64 * 1024
IDLE_SECONDS = 4.0  # below common upstream keep-alive timeouts (nginx 75 s, many apps 5 s)
MAX_IDLE_PER_HOST = 64
SWEEP_SECONDS = 0.1  # how often deadlines of exchanges are checked
_HEADER_WEIGHT = MAX_HEADER_BYTES // MAX_HEADERS // 2  # every header line costs at least this much


class UpstreamError(Exception):
    """The upstream could not be reached, broke the protocol, or sent too much."""


# Response header fields a proxy never relays (hop-by-hop, and the framing it sets itself).
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"content-length",
    }
)


class ResponseHead:
    """A response's header fields as they arrive: the lines to relay kept as received
    (``Name: value\\r\\n``, nothing decoded), the framing remembered apart."""

    __slots__ = ("dated", "framed", "length", "lines", "size", "typed")

    def __init__(self) -> None:
        self.lines: list[bytes] = []
        self.length = b""  # Content-Length as sent
        self.framed = False  # a Transfer-Encoding
        self.typed = self.dated = False  # a Content-Type, a Date among the lines
        self.size = 0

    def add(self, name: bytes, value: bytes) -> bool:
        """False once the fields are too many or too large."""
        self.size += len(name) + len(value) + _HEADER_WEIGHT  # so that many tiny ones count too
        if self.size > MAX_HEADER_BYTES:
            return False
        lower = name.lower()
        if lower in HOP_BY_HOP:
            if lower == b"content-length":
                self.length = value
            elif lower == b"transfer-encoding":
                self.framed = True
            return True
        if lower == b"content-type":
            self.typed = True
        elif lower == b"date":
            self.dated = True
        self.lines.append(name + b": " + value + b"\r\n")
        return True


class UpstreamResponse:
    __slots__ = ("body", "head", "status")

    def __init__(self, status: int, head: ResponseHead, body: bytes) -> None:
        self.status, self.head, self.body = status, head, body

    @property
    def headers(self) -> list[tuple[str, str]]:
        """The relayable fields decoded, and Content-Length when there was one."""
        pairs = [line.rstrip(b"\r\n").partition(b": ")[::2] for line in self.head.lines]
        if self.head.length:
            pairs.append((b"Content-Length", self.head.length))
        return [(n.decode("latin-1"), v.decode("utf-8", "surrogateescape")) for n, v in pairs]


class _Connection(asyncio.Protocol):
    """One keep-alive connection; one request at a time. Completing the exchange (answer,
    failure, timeout) happens here, and a connection that can be reused goes back to its
    pool at once."""

    def __init__(self, pool: UpstreamPool, key: tuple[str, int]) -> None:
        self.transport: asyncio.Transport | None = None
        self.idle_since = 0.0
        self.closed = False
        self._pool, self._key = pool, key
        self._parser = httptools.HttpResponseParser(self)
        self._waiter: asyncio.Future[UpstreamResponse] | None = None
        self.deadline: float | None = None  # of the exchange in progress (the pool checks it)
        self._head = ResponseHead()
        self._body: list[bytes] = []
        self._size = 0
        self._complete = False
        self._headers_done = False
        self._interim = False  # a 1xx response (103 Early Hints …): the real one follows

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses

    def data_received(self, data: bytes) -> None:
        waiter = self._waiter
        if waiter is None or waiter.done():  # bytes nobody asked for: the connection is unusable
            self._abort()
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(UpstreamError("the upstream switched protocols"))
        except httptools.HttpParserError as exc:
            self._fail(UpstreamError(f"the upstream broke HTTP/1.1 ({exc})"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        waiter = self._waiter
        if waiter is None or waiter.done():
            return
        if self._headers_done and self._delimited_by_close():  # HTTP/1.0 style: the body ends at EOF
            self._complete = True
            self._finish(self._response(), reuse=False)
            return
        self._fail(UpstreamError("the upstream closed the connection"))

    def _delimited_by_close(self) -> bool:
        return not self._head.length and not self._head.framed

    # httptools callbacks
    def on_message_begin(self) -> None:
        if self._complete or self._waiter is None or self._waiter.done():
            # More bytes than one response: whatever they are, they must never become the
            # answer to another organisation's request on this pooled connection.
            self._fail(UpstreamError("the upstream sent more than one response to one request"))

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._head.add(name, value):
            self._fail(UpstreamError("the upstream's response headers are too many or too large"))

    def on_headers_complete(self) -> None:
        self._headers_done = True
        status = self._parser.get_status_code()
        self._interim = 100 <= status < 200 and status != 101

    def on_body(self, body: bytes) -> None:
        self._size += len(body)
        if self._size > MAX_RESPONSE:
            self._fail(UpstreamError(f"the upstream's response is larger than {MAX_RESPONSE} bytes"))
            return
        self._body.append(body)

    def on_message_complete(self) -> None:
        if self._interim:  # drop it and wait for the final response on this connection
            self._reset()
            return
        self._complete = True
        # should_keep_alive() is only meaningful inside this callback
        self._finish(self._response(), reuse=self._parser.should_keep_alive())

    def _response(self) -> UpstreamResponse:
        body = self._body[0] if len(self._body) == 1 else b"".join(self._body)
        return UpstreamResponse(self._parser.get_status_code(), self._head, body)

    def _reset(self) -> None:
        self._head, self._body, self._size = ResponseHead(), [], 0
        self._complete = self._headers_done = self._interim = False

    # use
    def start(self, request: bytes, waiter: asyncio.Future[UpstreamResponse], timeout: float | None) -> None:
        """Send the request; ``waiter`` gets the response, or an :class:`UpstreamError` (a
        ``TimeoutError`` once ``timeout`` seconds have passed)."""
        assert self.transport is not None
        self._waiter = waiter
        self._reset()
        if timeout is not None:
            self.deadline = time.monotonic() + timeout
            self._pool.timed.add(self)
        self.transport.write(request)

    def _finish(self, response: UpstreamResponse, *, reuse: bool) -> None:
        waiter, self._waiter = self._waiter, None
        if self.deadline is not None:
            self.deadline = None
            self._pool.timed.discard(self)
        if reuse and not self.closed:
            self._pool.release(self)
        else:
            self.close()
        if waiter is not None and not waiter.done():
            waiter.set_result(response)

    def timed_out(self) -> None:
        self._fail(TimeoutError())

    def _fail(self, error: Exception) -> None:
        waiter, self._waiter = self._waiter, None
        if self.deadline is not None:
            self.deadline = None
            self._pool.timed.discard(self)
        self._abort()
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)

    def _abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class UpstreamPool:
    """Keep-alive connections per (host, port). Nothing is retried: a POST may have been
    acted on before a connection failed."""

    def __init__(self) -> None:
        self._idle: dict[tuple[str, int], deque[_Connection]] = {}
        self.timed: set[_Connection] = set()  # exchanges with a deadline
        self._sweeper: asyncio.Task[None] | None = None

    async def _sweep(self) -> None:
        """Time out exchanges past their deadline (a timer per request costs more)."""
        while True:
            await asyncio.sleep(SWEEP_SECONDS)
            now = time.monotonic()
            for connection in [c for c in self.timed if c.deadline is not None and c.deadline <= now]:
                connection.timed_out()

    def _idle_connection(self, key: tuple[str, int]) -> _Connection | None:
        idle = self._idle.get(key)
        if not idle:
            return None
        now = time.monotonic()
        while idle:
            connection = idle.pop()
            if not connection.closed and now - connection.idle_since < IDLE_SECONDS:
                return connection
            connection.close()
        return None

    def release(self, connection: _Connection) -> None:
        connection.idle_since = time.monotonic()
        idle = self._idle.get(connection._key)
        if idle is None:
            idle = self._idle[connection._key] = deque()
        if len(idle) < MAX_IDLE_PER_HOST:
            idle.append(connection)
        else:
            connection.close()

    def send(
        self, host: str, port: int, request: bytes, timeout: float | None
    ) -> asyncio.Future[UpstreamResponse] | None:
        """The hot path: the request sent at once on an idle connection, its answer a future;
        None when no connection is idle (then :meth:`request` connects)."""
        connection = self._idle_connection((host, port))
        if connection is None:
            return None
        assert connection.transport is not None
        loop = asyncio.get_running_loop()
        if timeout is not None and self._sweeper is None:
            self._sweeper = loop.create_task(self._sweep())
        waiter: asyncio.Future[UpstreamResponse] = loop.create_future()
        connection.start(request, waiter, timeout)
        return waiter

    async def request(self, host: str, port: int, request: bytes) -> UpstreamResponse:
        """Send one serialised request (connecting when no connection is idle) and read its
        response. A failure or a cancellation closes the connection (it may be half-way
        through a response)."""
        key = (host, port)
        connection = self._idle_connection(key)
        loop = asyncio.get_running_loop()
        if connection is None:
            try:
                _transport, connection = await loop.create_connection(
                    lambda: _Connection(self, key), host, port
                )
            except OSError as exc:
                raise UpstreamError(f"cannot connect to {host}:{port} ({exc.strerror or exc})") from None
        waiter: asyncio.Future[UpstreamResponse] = loop.create_future()
        connection.start(request, waiter, None)  # the caller's asyncio.timeout bounds it
        try:
            return await waiter
        except BaseException:
            if connection._waiter is waiter:  # cancelled from outside: the exchange is not over
                connection._fail(UpstreamError("cancelled"))
            raise

    def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for idle in self._idle.values():
            for connection in idle:
                connection.close()
        self._idle.clear()


def serialise(method: str, target: str, host_header: str, headers: dict[str, str], body: bytes) -> bytes:
    """An HTTP/1.1 request in one buffer. Header values were received by the gateway's
    parser (llhttp refuses CR/LF; undecodable bytes come back as they were sent); values the
    gateway adds are its own."""
    fields = _FIELDS(map(_FIELD, headers.items()))
    length = f"Content-Length: {len(body)}\r\n" if body or method in ("POST", "PUT", "PATCH") else ""
    head = (
        f"{method} {target} HTTP/1.1\r\nHost: {host_header}\r\n{fields}{_CRLF if fields else ''}{length}\r\n"
    )
    data = head.encode("utf-8", "surrogateescape")
    return data + body if body else data


_FIELD, _FIELDS, _CRLF = ": ".join, "\r\n".join, "\r\n"
