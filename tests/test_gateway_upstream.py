"""The gateway's pooled HTTP/1.1 upstream client against raw upstreams on loopback: what real
HTTP servers send (lengths, chunks, EOF-delimited bodies, repeated headers, keep-alive, closed
connections) must arrive intact, and what breaks the protocol must fail cleanly."""

from __future__ import annotations

import asyncio
import gzip
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from twofold.gateway import upstream
from twofold.gateway.upstream import UpstreamError, UpstreamPool, serialise

Reply = Callable[[bytes], Awaitable[bytes | None]]  # request head+body → raw response (None: hang up)


class RawUpstream:
    """A TCP server that answers each request with exactly the bytes a test chooses."""

    def __init__(self, reply: Callable[[bytes], bytes | None], *, close_after: bool = False) -> None:
        self.reply = reply
        self.close_after = close_after
        self.connections = 0
        self.requests: list[bytes] = []
        self.server: asyncio.Server | None = None
        self.port = 0

    async def __aenter__(self) -> RawUpstream:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                body = await reader.readexactly(length) if length else b""
                self.requests.append(head + body)
                answer = self.reply(head + body)
                if answer is None:
                    break
                writer.write(answer)
                await writer.drain()
                if self.close_after:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def pool() -> AsyncIterator[UpstreamPool]:
    pool = UpstreamPool()
    yield pool
    pool.close()


def ok(body: bytes = b'{"ok":true}', extra: bytes = b"") -> Callable[[bytes], bytes]:
    return lambda _request: (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
        + extra
        + b"Content-Length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body
    )


def request(method: str = "POST", body: bytes = b'{"a":1}', headers: dict[str, str] | None = None) -> bytes:
    return serialise(method, "/api/x?y=1", "127.0.0.1", headers or {"Content-Type": "application/json"}, body)


async def test_keep_alive_connections_are_reused(pool: UpstreamPool) -> None:
    async with RawUpstream(ok()) as up:
        for _ in range(5):
            answer = await pool.request("127.0.0.1", up.port, request())
            assert (answer.status, answer.body) == (200, b'{"ok":true}')
    assert up.connections == 1
    assert len(up.requests) == 5


async def test_the_request_arrives_as_serialised(pool: UpstreamPool) -> None:
    async with RawUpstream(ok()) as up:
        await pool.request("127.0.0.1", up.port, request(headers={"X-Twofold-Organisation": "acme"}))
    sent = up.requests[0]
    assert sent.startswith(b"POST /api/x?y=1 HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    assert b"X-Twofold-Organisation: acme\r\n" in sent
    assert b"Content-Length: 7\r\n" in sent
    assert sent.endswith(b'\r\n\r\n{"a":1}')


async def test_a_chunked_response_is_reassembled(pool: UpstreamPool) -> None:
    chunked = b'HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\n{"a"\r\n3\r\n:1}\r\n0\r\n\r\n'
    async with RawUpstream(lambda _r: chunked) as up:
        answer = await pool.request("127.0.0.1", up.port, request())
        again = await pool.request("127.0.0.1", up.port, request())
    assert answer.body == b'{"a":1}' == again.body
    assert up.connections == 1


async def test_a_body_delimited_by_the_connection_closing_is_complete(pool: UpstreamPool) -> None:
    eof_body = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\nall of it"
    async with RawUpstream(lambda _r: eof_body, close_after=True) as up:
        first = await pool.request("127.0.0.1", up.port, request())
        second = await pool.request("127.0.0.1", up.port, request())
    assert first.body == b"all of it" == second.body
    assert up.connections == 2  # the closed connection was not pooled


async def test_repeated_headers_and_compressed_bodies_pass_through(pool: UpstreamPool) -> None:
    packed = gzip.compress(b'{"big":"' + b"x" * 5000 + b'"}')
    extra = b"Set-Cookie: a=1\r\nSet-Cookie: b=2\r\nContent-Encoding: gzip\r\n"
    async with RawUpstream(ok(packed, extra)) as up:
        answer = await pool.request("127.0.0.1", up.port, request())
    assert [v for k, v in answer.headers if k.lower() == "set-cookie"] == ["a=1", "b=2"]
    assert answer.body == packed  # relayed as sent, with its Content-Encoding


async def test_a_connection_the_upstream_closed_while_idle_is_not_used(pool: UpstreamPool) -> None:
    async with RawUpstream(ok(extra=b"Connection: keep-alive\r\n"), close_after=True) as up:
        await pool.request("127.0.0.1", up.port, request())
        await asyncio.sleep(0.05)  # the upstream's close reaches the pooled connection
        answer = await pool.request("127.0.0.1", up.port, request())
    assert answer.status == 200
    assert up.connections == 2


async def test_a_response_larger_than_the_limit_fails(
    pool: UpstreamPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(upstream, "MAX_RESPONSE", 1000)
    async with RawUpstream(ok(b"x" * 5000)) as up:
        with pytest.raises(UpstreamError, match="larger than"):
            await pool.request("127.0.0.1", up.port, request())


async def test_garbage_instead_of_http_fails(pool: UpstreamPool) -> None:
    async with RawUpstream(lambda _r: b"SSH-2.0-OpenSSH_9.2\r\n\r\n") as up:
        with pytest.raises(UpstreamError, match="broke HTTP"):
            await pool.request("127.0.0.1", up.port, request())


async def test_a_hang_up_before_answering_fails(pool: UpstreamPool) -> None:
    async with RawUpstream(lambda _r: None) as up:
        with pytest.raises(UpstreamError, match="closed the connection"):
            await pool.request("127.0.0.1", up.port, request())


async def test_a_truncated_response_fails(pool: UpstreamPool) -> None:
    cut = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly a part"
    async with RawUpstream(lambda _r: cut, close_after=True) as up:
        with pytest.raises(UpstreamError, match="closed the connection"):
            await pool.request("127.0.0.1", up.port, request())


async def test_nothing_listening_fails_with_the_address(pool: UpstreamPool) -> None:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    with pytest.raises(UpstreamError, match=f"127.0.0.1:{port}"):
        await pool.request("127.0.0.1", port, request())


async def test_a_timed_out_exchange_leaves_no_connection_behind(pool: UpstreamPool) -> None:
    async with RawUpstream(lambda _r: b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nslow") as up:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.2):
                await pool.request("127.0.0.1", up.port, request())
        answer_after = RawUpstream(ok())
        async with answer_after:
            assert (await pool.request("127.0.0.1", answer_after.port, request())).status == 200
    assert not any(pool._idle.get(("127.0.0.1", up.port), ()))


def test_serialise_keeps_undecodable_header_bytes_as_sent() -> None:
    value = b"caf\xe9".decode("utf-8", "surrogateescape")
    raw = serialise("GET", "/x", "h", {"X-Name": value}, b"")
    assert b"X-Name: caf\xe9\r\n" in raw
    assert b"Content-Length" not in raw  # a GET without a body has none


async def test_interim_1xx_responses_are_skipped_for_the_final_one(pool: UpstreamPool) -> None:
    hints = (
        b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
        b"HTTP/1.1 102 Processing\r\n\r\n"
        b'HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n{"final":1}'
    )
    async with RawUpstream(lambda _r: hints) as up:
        answer = await pool.request("127.0.0.1", up.port, request())
        again = await pool.request("127.0.0.1", up.port, request())
    assert (answer.status, answer.body) == (200, b'{"final":1}')
    assert [k for k, _ in answer.headers] == ["Content-Length"]  # nothing of the 1xx leaks in
    assert (again.status, again.body) == (200, b'{"final":1}')
    assert up.connections == 1


async def test_a_second_unrequested_response_poisons_the_connection(pool: UpstreamPool) -> None:
    # An upstream that answers twice: the extra answer must never reach the next caller.
    twice = (
        b'HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n{"n":"a"}'
        b'HTTP/1.1 200 OK\r\nContent-Length: 15\r\n\r\n{"n":"someone"}'
    )
    async with RawUpstream(lambda _r: twice) as up:
        first = await pool.request("127.0.0.1", up.port, request())
        await asyncio.sleep(0.05)
        second = await pool.request("127.0.0.1", up.port, request())
    assert first.body == b'{"n":"a"}' == second.body  # each caller got the first answer to its own request
    assert up.connections == 2  # the connection that carried the extra answer was dropped


async def test_endless_response_headers_fail_instead_of_filling_memory(pool: UpstreamPool) -> None:
    many = (
        b"HTTP/1.1 200 OK\r\n"
        + b"".join(b"X-Pad-%d: %s\r\n" % (i, b"v" * 1000) for i in range(500))
        + b"\r\n"
    )
    async with RawUpstream(lambda _r: many) as up:
        with pytest.raises(UpstreamError, match="headers are too many or too large"):
            await pool.request("127.0.0.1", up.port, request())
