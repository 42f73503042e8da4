"""`twofold.gateway.tls_transport.TLSConnection` on its own, with real TLS on loopback: what a
listener's tests do not reach easily — a slow reader of a large answer written just before the
close, and a client that keeps the socket full."""

from __future__ import annotations

import asyncio
import socket
import ssl
import sys
import time
from collections.abc import Awaitable, Callable

import pytest
import uvloop

from twofold.crypto import certs, keys
from twofold.gateway import tls_transport
from twofold.gateway.tls_transport import TLSConnection
from twofold.tls import server_context


def _contexts() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    key = keys.generate_private_key("ec", curve="P-256")
    certificate = certs.self_signed_certificate(
        key, "/CN=localhost", days=1, usage="server", sans=["localhost"]
    )
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.load_verify_locations(cadata=certs.certificate_pem(certificate).decode())
    return server_context(key, certificate, require_client_cert=False), client


def _serve(
    protocol: Callable[[], asyncio.Protocol], client: Callable[[int, ssl.SSLContext], Awaitable[None]]
) -> None:
    """Accept connections into TLSConnection with ``protocol`` and run ``client(port, context)``."""
    server_ssl, client_ssl = _contexts()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        listening = socket.socket()
        listening.bind(("127.0.0.1", 0))
        listening.listen(16)
        listening.setblocking(False)

        def accept() -> None:
            sock, address = listening.accept()
            sock.setblocking(False)
            TLSConnection(
                loop, sock, address, server_ssl, lambda _c: protocol(), lambda _c, _shed: None
            ).start()

        loop.add_reader(listening.fileno(), accept)
        try:
            await client(listening.getsockname()[1], client_ssl)
        finally:
            loop.remove_reader(listening.fileno())
            listening.close()

    uvloop.run(main())


def test_a_large_answer_written_before_the_close_reaches_a_slow_reader_whole(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The close waits for what is buffered (bounded by progress, not by LINGER)."""
    monkeypatch.setattr(tls_transport, "LINGER", 0.3)
    size = 4 * 1024 * 1024

    class Answer(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport

        def data_received(self, data: bytes) -> None:
            self.transport.write(b"x" * size)  # type: ignore[attr-defined]
            self.transport.close()

    def read_slowly(port: int, context: ssl.SSLContext) -> tuple[int, float]:
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(b"go")
            got, started = 0, time.monotonic()
            while data := tls.recv(65536):
                got += len(data)
                time.sleep(0.005)
            return got, time.monotonic() - started

    result: list[tuple[int, float]] = []

    async def client(port: int, context: ssl.SSLContext) -> None:
        result.append(await asyncio.get_running_loop().run_in_executor(None, read_slowly, port, context))

    _serve(Answer, client)
    [(got, seconds)] = result
    assert seconds > 0.3 * 2, f"the read took {seconds:.2f} s: too fast to test the linger"
    assert got == size, f"got {got} of {size} bytes in {seconds:.1f} s"


_FLOOD = """
import socket, ssl, sys, time
context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
chunk, sent = b"x" * (1 << 20), 0
with context.wrap_socket(socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=10)) as tls:
    until = time.monotonic() + float(sys.argv[2])
    while time.monotonic() < until:
        tls.sendall(chunk)
        sent += len(chunk)
print(sent)
"""


def test_a_client_that_keeps_the_socket_full_does_not_hold_the_loop() -> None:
    """A client in another process sends as fast as it can for 3 s; a 10 ms timer of the
    server's loop must keep running (reading the whole flood in one callback held it ~4 s)."""

    class Sink(asyncio.Protocol):
        def data_received(self, data: bytes) -> None:
            until = time.perf_counter() + 0.0001  # the work of a protocol (parsing, refusing)
            while time.perf_counter() < until:
                pass

    lateness: list[float] = []

    async def client(port: int, _context: ssl.SSLContext) -> None:
        flood = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _FLOOD, str(port), "3", stdout=asyncio.subprocess.PIPE
        )
        waiting = asyncio.ensure_future(flood.communicate())
        while not waiting.done():
            expected = time.monotonic() + 0.01
            await asyncio.sleep(0.01)
            lateness.append(time.monotonic() - expected)
        out, _ = await waiting
        assert flood.returncode == 0, out
        assert int(out) > 50 * (1 << 20), f"the flood sent only {int(out)} bytes"

    _serve(Sink, client)
    assert max(lateness) < 1.0, f"a 10 ms timer ran {max(lateness):.2f} s late while one client flooded"
