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
from dataclasses import dataclass
from typing import cast

import httptools

MAX_RESPONSE = 16 * 1024 * 1024
MAX_HEADERS = 100
MAX_HEADER_BYTES = 64 * 1024
IDLE_SECONDS = 4.0  # below common upstream keep-alive timeouts (nginx 75 s, many apps 5 s)
MAX_IDLE_PER_HOST = 64


class UpstreamError(Exception):
    """The upstream could not be reached, broke the protocol, or sent too much."""


@dataclass(frozen=True)
class UpstreamResponse:
    status: int
    headers: list[tuple[str, str]]
    body: bytes


class _Connection(asyncio.Protocol):
    """One keep-alive connection; one request at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.idle_since = 0.0
        self.closed = False
        self._parser = httptools.HttpResponseParser(self)
        self._waiter: asyncio.Future[UpstreamResponse] | None = None
        self._headers: list[tuple[str, str]] = []
        self._body: list[bytes] = []
        self._size = 0
        self._header_bytes = 0
        self._complete = False
        self._headers_done = False
        self._keep_alive = False
        self._interim = False  # a 1xx response (103 Early Hints …): the real one follows

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses

    def data_received(self, data: bytes) -> None:
        if self._waiter is None:  # bytes nobody asked for: the connection is unusable
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
            waiter.set_result(self._response())
            return
        waiter.set_exception(UpstreamError("the upstream closed the connection"))

    def _delimited_by_close(self) -> bool:
        names = {name.lower() for name, _ in self._headers}
        return "content-length" not in names and "transfer-encoding" not in names

    # httptools callbacks
    def on_message_begin(self) -> None:
        if self._complete or self._waiter is None or self._waiter.done():
            # More bytes than one response: whatever they are, they must never become the
            # answer to another organisation's request on this pooled connection.
            self._fail(UpstreamError("the upstream sent more than one response to one request"))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value)
        if len(self._headers) >= MAX_HEADERS or self._header_bytes > MAX_HEADER_BYTES:
            self._fail(UpstreamError("the upstream's response headers are too many or too large"))
            return
        self._headers.append((name.decode("latin-1"), value.decode("utf-8", "surrogateescape")))

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
        self._keep_alive = self._parser.should_keep_alive()  # only meaningful inside this callback
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(self._response())

    def _response(self) -> UpstreamResponse:
        return UpstreamResponse(self._parser.get_status_code(), list(self._headers), b"".join(self._body))

    def _reset(self) -> None:
        self._headers, self._body, self._size, self._header_bytes = [], [], 0, 0
        self._complete = self._headers_done = self._keep_alive = self._interim = False

    # use
    async def exchange(self, request: bytes) -> UpstreamResponse:
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        self._waiter = loop.create_future()
        self._reset()
        self.transport.write(request)
        try:
            return await self._waiter
        finally:
            self._waiter = None

    @property
    def reusable(self) -> bool:
        return not self.closed and self._complete and self._keep_alive

    def _fail(self, error: UpstreamError) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(error)
        self._abort()

    def _abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class UpstreamPool:
    """Keep-alive connections per (host, port)."""

    def __init__(self) -> None:
        self._idle: dict[tuple[str, int], deque[_Connection]] = {}

    async def _connection(self, host: str, port: int) -> _Connection:
        idle = self._idle.get((host, port))
        now = time.monotonic()
        while idle:
            connection = idle.pop()
            if not connection.closed and now - connection.idle_since < IDLE_SECONDS:
                return connection
            connection.close()
        loop = asyncio.get_running_loop()
        try:
            _transport, connection = await loop.create_connection(_Connection, host, port)
        except OSError as exc:
            raise UpstreamError(f"cannot connect to {host}:{port} ({exc.strerror or exc})") from None
        return connection

    async def request(self, host: str, port: int, request: bytes) -> UpstreamResponse:
        """Send one serialised request and read its response. A failure closes the connection
        (it may be half-way through a response); nothing is retried, as a POST may have been
        acted on."""
        connection = await self._connection(host, port)
        try:
            response = await connection.exchange(request)
        except BaseException:
            connection.close()
            raise
        if connection.reusable:
            connection.idle_since = time.monotonic()
            idle = self._idle.setdefault((host, port), deque())
            if len(idle) < MAX_IDLE_PER_HOST:
                idle.append(connection)
                return response
        connection.close()
        return response

    def close(self) -> None:
        for idle in self._idle.values():
            for connection in idle:
                connection.close()
        self._idle.clear()


def serialise(method: str, target: str, host_header: str, headers: dict[str, str], body: bytes) -> bytes:
    """An HTTP/1.1 request in one buffer. Header values were received by the gateway's
    parser (llhttp refuses CR/LF; undecodable bytes come back as they were sent); values the
    gateway adds are its own."""
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host_header}"]
    lines.extend(f"{name}: {value}" for name, value in headers.items())
    if body or method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(body)}")
    head = "\r\n".join(lines).encode("utf-8", "surrogateescape") + b"\r\n\r\n"
    return head + body if body else head
