"""What probing the gateway found (issue 11 "Found" #1, #2, #3, #5; issue 12 #5), each
against a running gateway with short deadlines and a small connection cap: an absurd
Content-Length, slow heads and bodies, idle keep-alive connections, floods of connections
that never start TLS (here and with a lowered descriptor limit in a subprocess), a huge
chunk extension, and malformed requests that must be logged as one line without the
request's bytes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import resource
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

import twofold
from gatewaykit import (
    RawClient,
    World,
    http_request,
    running_world,
    seed_balance_client,
    wait_until,
)
from servekit import serve_process
from twofold.crypto import certs, keys

HEADER_TIMEOUT = 1.0
BODY_TIMEOUT = 1.0
KEEPALIVE_TIMEOUT = 1.5
MAX_CONNECTIONS = 12
SLACK = 1.2  # the deadline sweep runs twice a second; a loaded machine adds a little
JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with running_world(
        tmp_path_factory.mktemp("gateway-limits"),
        header_timeout=HEADER_TIMEOUT,
        body_timeout=BODY_TIMEOUT,
        idle_timeout=KEEPALIVE_TIMEOUT,
        max_connections=MAX_CONNECTIONS,
    ) as running:
        yield running
        running.assert_no_internal_errors()


def error_code(body: bytes) -> str:
    return str(json.loads(body)["error"]["code"])


# --- #1: a Content-Length of 2^63 ------------------------------------------------------------------


def test_a_content_length_of_2_to_the_63_is_refused_at_once(world: World) -> None:
    mark = world.upstream.count()
    for length, status, code in (
        (2**63, 413, "body_too_large"),
        (2**64 - 1, 413, "body_too_large"),
        (10**20, 400, "bad_request"),  # more than 64 bits: not a length at all
    ):
        with RawClient(world) as client:
            started = time.monotonic()
            client.send(
                f"POST /plain/x HTTP/1.1\r\nHost: localhost\r\nContent-Length: {length}\r\n\r\n{{}}".encode()
            )
            [answer] = client.answers(1, timeout=5)
            assert time.monotonic() - started < 1.0
            assert (answer.status, error_code(answer.body)) == (status, code), answer
            assert client.closed_by_server()
    assert world.upstream.since(mark) == []


# --- #5: a 100 KB chunk extension ------------------------------------------------------------------


def test_a_100_kb_chunk_extension_is_refused_and_a_small_one_is_not(world: World) -> None:
    mark = world.upstream.count()
    head = b"POST /plain/chunks HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    with RawClient(world) as client:
        client.send(head + b"2;" + b"x" * 100_000 + b"\r\n{}\r\n0\r\n\r\n")
        [answer] = client.answers(1)
    assert (answer.status, error_code(answer.body)) == (400, "chunk_framing_too_large"), answer
    assert world.upstream.since(mark) == []
    with RawClient(world) as client:
        client.send(head + b"2;name=value\r\n{}\r\n0\r\nX-Trailer: t\r\n\r\n")
        [answer] = client.answers(1)
    assert answer.status == 200, answer
    assert [s.body for s in world.upstream.since(mark)] == [b"{}"]


# --- #2: header, body and idle deadlines -----------------------------------------------------------


def test_heads_sent_one_line_at_a_time_are_cut_off_at_the_header_timeout(world: World) -> None:
    clients = [RawClient(world) for _ in range(5)]
    try:
        started = time.monotonic()
        for client in clients:
            client.send(b"GET /accessapi/balance HTTP/1.1\r\nHost: localhost\r\n")
        answered: dict[int, tuple[float, int, str]] = {}
        line = 0
        while len(answered) < len(clients) and time.monotonic() - started < HEADER_TIMEOUT + 4 * SLACK:
            time.sleep(0.3)
            line += 1
            for index, client in enumerate(clients):
                if index in answered:
                    continue
                got = client.answers(1, timeout=0.02)
                if got:
                    answered[index] = (time.monotonic() - started, got[0].status, error_code(got[0].body))
                    assert client.closed_by_server(1)
                    continue
                with contextlib.suppress(OSError):
                    client.send(f"X-Slow-{line}: still coming\r\n".encode())
        assert sorted(answered) == list(range(len(clients))), answered
        for elapsed, status, code in answered.values():
            assert (status, code) == (408, "request_timeout")
            assert HEADER_TIMEOUT - 0.1 <= elapsed < HEADER_TIMEOUT + 2 * SLACK, elapsed
    finally:
        for client in clients:
            client.close()


def test_a_body_sent_too_slowly_is_cut_off_at_the_body_timeout(world: World) -> None:
    mark = world.upstream.count()
    with RawClient(world) as client:
        client.send(
            b"POST /plain/slow-body HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"
        )
        started = time.monotonic()
        [answer] = client.answers(1, timeout=BODY_TIMEOUT + 3 * SLACK)
        assert time.monotonic() - started < BODY_TIMEOUT + 2 * SLACK
        assert (answer.status, error_code(answer.body)) == (408, "request_timeout"), answer
        assert client.closed_by_server(1)
    assert world.upstream.since(mark) == []


def test_a_body_queued_behind_a_slow_request_is_not_timed_out_while_the_gateway_waits(world: World) -> None:
    """The gateway stops reading while it forwards a request with another queued: the
    queued request's body deadline starts when the gateway reads again, not before."""
    body = b'{"queued": true}'
    head = http_request("POST", "/plain/queued", body, JSON)[: -len(body)]
    with RawClient(world) as client:
        client.send(http_request("GET", "/slow/first") + head + body[:3])  # the upstream times out after 1 s
        time.sleep(BODY_TIMEOUT + 0.6)
        client.send(body[3:])
        answers = client.answers(2, timeout=10)
    assert [(a.status, error_code(a.body) if a.status >= 400 else "") for a in answers] == [
        (504, "upstream_timeout"),
        (200, ""),
    ], answers


def test_idle_connections_are_closed_at_the_idle_timeout(world: World) -> None:
    with RawClient(world) as client:
        client.send(http_request("GET", "/accessapi/balance"))
        assert [a.status for a in client.answers(1)] == [200]
        started = time.monotonic()
        assert client.closed_by_server(KEEPALIVE_TIMEOUT + 3 * SLACK)
        assert KEEPALIVE_TIMEOUT - 0.1 <= time.monotonic() - started < KEEPALIVE_TIMEOUT + 2 * SLACK
    with RawClient(world) as silent:  # connected, handshaken, and nothing sent
        started = time.monotonic()
        assert silent.closed_by_server(HEADER_TIMEOUT + 3 * SLACK)
        assert time.monotonic() - started < HEADER_TIMEOUT + 2 * SLACK


# --- #2 and #3: the connection cap, and shedding what never authenticated --------------------------


def _balance(world: World) -> int:
    try:
        with world.client(world.orgs["acme"].mtls, timeout=5) as client:
            return client.get("/accessapi/balance").status_code
    except httpx.TransportError:
        return 0


def test_connections_without_tls_are_shed_for_clients_that_authenticate(world: World) -> None:
    shed_before = world.metric("twofold_gateway_connections_dropped_total", environment="cat", reason="shed")
    flood = [socket.create_connection(("127.0.0.1", world.port())) for _ in range(3 * MAX_CONNECTIONS)]
    try:
        for _ in range(3):  # the flood is there (and stays) while real clients come and go
            assert _balance(world) == 200
        shed = world.metric("twofold_gateway_connections_dropped_total", environment="cat", reason="shed")
        assert shed - shed_before >= 2 * MAX_CONNECTIONS, shed
        assert world.metric("twofold_gateway_connections", environment="cat") <= MAX_CONNECTIONS + 1
    finally:
        for sock in flood:
            sock.close()


def test_a_handshake_that_does_not_complete_in_time_is_ended_and_counted(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The listener's sweep ends handshakes older than HANDSHAKE_TIMEOUT: a client that
    connects and sends nothing, and one that stops half-way through its ClientHello."""
    from twofold.gateway import listeners

    monkeypatch.setattr(listeners, "HANDSHAKE_TIMEOUT", 1.0)
    failures = world.metric("twofold_gateway_tls_handshake_failures_total", environment="cat")
    silent = socket.create_connection(("127.0.0.1", world.port()))
    halfway = socket.create_connection(("127.0.0.1", world.port()))
    try:
        halfway.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")  # a record promising 512 bytes
        started = time.monotonic()
        for sock in (silent, halfway):
            sock.settimeout(1.0 + SLACK + 2)
            assert sock.recv(1024) == b"", "the gateway answered a handshake that never completed"
        elapsed = time.monotonic() - started
        assert 0.8 <= elapsed <= 1.0 + SLACK + 1, elapsed
        assert _balance(world) == 200  # and the listener goes on
    finally:
        silent.close()
        halfway.close()
    assert world.metric("twofold_gateway_tls_handshake_failures_total", environment="cat") - failures >= 2


def test_at_the_cap_authenticated_connections_are_kept_and_a_new_one_is_refused(world: World) -> None:
    wait_until(lambda: world.metric("twofold_gateway_connections", environment="cat") == 0, 5)
    full_before = world.metric("twofold_gateway_connections_dropped_total", environment="cat", reason="full")
    held = [RawClient(world) for _ in range(MAX_CONNECTIONS)]
    try:
        for client in held:  # every one of them authenticated and in use
            client.send(http_request("GET", "/accessapi/balance"))
            assert [a.status for a in client.answers(1)] == [200]
        assert _balance(world) == 0
        assert (
            world.metric("twofold_gateway_connections_dropped_total", environment="cat", reason="full")
            > full_before
        )
        for client in held:  # and they still work
            client.send(http_request("GET", "/accessapi/balance"))
            assert [a.status for a in client.answers(1)] == [200]
    finally:
        for client in held:
            client.close()
    wait_until(lambda: _balance(world) == 200, 5)


# --- issue 12 #5: what malformed requests leave in the log -----------------------------------------


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self._guard = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        with self._guard:
            self.records.append(record)


@pytest.fixture
def records() -> Iterator[_Records]:
    handler = _Records()
    root, ours = logging.getLogger(), logging.getLogger("twofold")
    previous = ours.level
    root.addHandler(handler)
    ours.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        ours.setLevel(previous)


def test_malformed_requests_are_logged_as_one_line_without_their_bytes_or_a_traceback(
    world: World, records: _Records
) -> None:
    secret = f"tf_{uuid.uuid4().hex}"
    malformed = [
        f"GET /accessapi/balance HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {secret}\x01\r\n\r\n",
        f"GET /accessapi/balance HTTP/1.1\r\nHost: localhost\r\nAuthorization Bearer {secret}\r\n\r\n",
        f"GET /{secret} HTTP/9.9\r\nHost: localhost\r\n\r\n",
        f"G\x00T /{secret} HTTP/1.1\r\n\r\n",
        f"POST /plain/x HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n{secret}\r\n",
        f"GET /plain/x HTTP/1.1\r\nHost: localhost\r\nX-Pad: {secret}{'a' * 20000}\r\n\r\n",
        f"GET /plain/x HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n{secret}",
    ]
    for request in malformed:
        with RawClient(world) as client:
            client.send(request.encode("latin-1"))
            [answer] = client.answers(1)
            assert answer.status == 400, (request[:60], answer)
            assert answer.headers["content-type"].startswith("application/json")
            assert secret not in answer.body.decode()
    time.sleep(0.3)
    refusals = [r for r in records.records if r.getMessage().startswith("refused a request from")]
    assert len(refusals) == len(malformed), [r.getMessage() for r in records.records]
    for record in refusals:
        assert record.levelno == logging.INFO
        assert record.getMessage().startswith("refused a request from 127.0.0.1: "), record.getMessage()
    for record in records.records:
        text = logging.Formatter().format(record)
        assert secret not in text, text
        assert "Traceback" not in text, text
        assert record.exc_info is None, text
        assert record.levelno < logging.ERROR, text


# --- #3: a lowered descriptor limit ----------------------------------------------------------------


def _lowered_limit(limit: int) -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))


def test_with_a_low_descriptor_limit_a_flood_without_tls_does_not_lock_clients_out(tmp_path: Path) -> None:
    """1,100 unauthenticated connections made `serve` fail new clients with the default
    limit of 1,024; here the limit is 256 (soft and hard, so it cannot be raised) and 400
    connections never send a TLS byte."""
    key = keys.generate_private_key("ec")
    cert = certs.self_signed_certificate(key, "/O=Acme/CN=acme-fd")
    (tmp_path / "mtls.crt").write_bytes(certs.certificate_pem(cert))
    (tmp_path / "mtls.key").write_bytes(keys.private_key_bytes(key))
    flood: list[socket.socket] = []
    with serve_process(tmp_path / "serve", preexec_fn=lambda: _lowered_limit(256)) as served:
        try:

            def ready() -> bool:
                try:
                    return httpx.get(f"http://127.0.0.1:{served.admin}/readyz", timeout=1).status_code == 200
                except httpx.TransportError:
                    return False

            wait_until(ready, 60, 0.2)
            asyncio.run(seed_balance_client(served.data / "twofold.db", certs.certificate_pem(cert)))

            def call() -> int:
                try:
                    with twofold.Client(
                        verify=str(served.ca),
                        cert=tmp_path / "mtls.crt",
                        key=tmp_path / "mtls.key",
                        timeout=5,
                    ) as client:
                        return client.get(f"https://localhost:{served.cat}/accessapi/balance").status_code
                except httpx.TransportError:
                    return 0

            wait_until(lambda: call() == 200, 10, 0.2)
            flood = [socket.create_connection(("127.0.0.1", served.cat)) for _ in range(400)]
            time.sleep(0.5)
            assert [call() for _ in range(3)] == [200] * 3
            assert served.alive(), served.log()[-2000:]
        finally:
            for sock in flood:
                sock.close()
