"""The portal's listener under slow, idle, flooding and malformed clients (issue 11, items 2,
3 and 4), against the real `twofold serve` in its own process:

* header-read, body-read and idle keep-alive timeouts (short ones, set in the TOML file);
* a cap on connections per listener, with the open-files limit raised at start and the
  connections that proved nothing shed first — tested with a lowered limit;
* no request puts a header value into a log line: secrets in every header, malformed in
  several ways, and the real log output of the server searched for them.
"""

from __future__ import annotations

import re
import resource
import secrets
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from servekit import ServeProcess, serve_process
from twofold.listener import HEADROOM, ConnectionLimits
from twofold.settings import ServeConfig

HEADER_TIMEOUT, BODY_TIMEOUT, IDLE_TIMEOUT = 1.0, 1.5, 2.0
SLACK = 3.0  # a loaded 2-core machine may answer late, never early


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    settings = (
        f"header_timeout = {HEADER_TIMEOUT}\nbody_timeout = {BODY_TIMEOUT}\nidle_timeout = {IDLE_TIMEOUT}\n"
    )
    with serve_process(tmp_path_factory.mktemp("listener"), settings) as running:
        yield running


def _closed_after(sock: socket.socket, started: float, limit: float) -> tuple[float, bytes]:
    """Read until the server closes the connection; (seconds since ``started``, bytes read)."""
    sock.settimeout(limit)
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except (ConnectionResetError, ssl.SSLError, OSError) as exc:
        if isinstance(exc, TimeoutError):
            raise AssertionError(f"still open after {limit} s") from None
    return time.monotonic() - started, received


def _request(path: str = "/login", extra: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: localhost\r\n{extra}\r\n".encode()


# --- timeouts -------------------------------------------------------------------------------------


def test_a_tcp_connection_that_never_starts_tls_is_closed_after_the_header_timeout(
    served: ServeProcess,
) -> None:
    sock = socket.create_connection(("127.0.0.1", served.portal))
    started = time.monotonic()
    with sock:
        elapsed, _ = _closed_after(sock, started, HEADER_TIMEOUT + SLACK)
    assert elapsed >= HEADER_TIMEOUT * 0.8


def test_a_tls_connection_that_sends_nothing_is_closed_after_the_header_timeout(served: ServeProcess) -> None:
    with served.tls() as sock:
        started = time.monotonic()
        elapsed, received = _closed_after(sock, started, HEADER_TIMEOUT + SLACK)
    assert elapsed >= HEADER_TIMEOUT * 0.8
    assert received == b""


def test_headers_trickled_one_line_at_a_time_are_cut_off_at_the_header_timeout(served: ServeProcess) -> None:
    """Slowloris: a header line every 0.3 s keeps the connection busy but never finishes."""
    with served.tls() as sock:
        started = time.monotonic()
        sock.sendall(b"GET /login HTTP/1.1\r\nHost: localhost\r\n")
        sock.settimeout(0.3)
        closed_at = None
        for i in range(int((HEADER_TIMEOUT + SLACK) / 0.3)):
            try:
                sock.sendall(f"X-Trickle-{i}: {i}\r\n".encode())
                if sock.recv(1) == b"":
                    closed_at = time.monotonic()
                    break
            except TimeoutError:
                continue
            except (OSError, ssl.SSLError):
                closed_at = time.monotonic()
                break
        assert closed_at is not None, "the trickling connection was never closed"
    assert HEADER_TIMEOUT * 0.8 <= closed_at - started <= HEADER_TIMEOUT + SLACK


def test_a_body_that_stops_short_gets_a_408_after_the_body_timeout(served: ServeProcess) -> None:
    with served.tls() as sock:
        sock.sendall(
            b"POST /login HTTP/1.1\r\nHost: localhost\r\n"
            b"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 1000\r\n\r\nemail=a"
        )
        started = time.monotonic()
        elapsed, received = _closed_after(sock, started, BODY_TIMEOUT + SLACK)
    assert received.startswith(b"HTTP/1.1 408 "), received[:200]
    assert b"did not arrive in time" in received
    assert elapsed >= BODY_TIMEOUT * 0.8


def test_an_idle_keep_alive_connection_is_closed_after_the_idle_timeout(served: ServeProcess) -> None:
    with served.tls() as sock:
        sock.sendall(_request())
        sock.settimeout(10)
        first = sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 200 ")
        # Used again within the idle timeout, it stays open …
        time.sleep(IDLE_TIMEOUT / 2)
        sock.sendall(_request())
        answer = b""
        while b"</html>" not in answer:
            answer += sock.recv(65536)
        assert answer.startswith(b"HTTP/1.1 200 ")
        # … and left alone, it is closed.
        started = time.monotonic()
        elapsed, _ = _closed_after(sock, started, IDLE_TIMEOUT + SLACK)
    assert elapsed >= IDLE_TIMEOUT * 0.8


def test_a_slow_but_steady_client_within_the_limits_is_served(served: ServeProcess) -> None:
    with served.tls() as sock:
        for line in (b"GET /login HTTP/1.1\r\n", b"Host: localhost\r\n", b"\r\n"):
            sock.sendall(line)
            time.sleep(HEADER_TIMEOUT / 4)
        sock.settimeout(10)
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")


def test_the_limits_are_settings_of_serve_with_sane_defaults() -> None:
    assert ServeConfig().limits == ConnectionLimits(10.0, 30.0, 75.0, 4096)
    for name, value in (("header_timeout", 0), ("idle_timeout", -1), ("max_connections", 2.5)):
        with pytest.raises(Exception, match=name):
            ServeConfig(**{name: value})
    assert ConnectionLimits().fitted(listeners=3, nofile=1024).max_connections == (1024 - HEADROOM) // 3
    assert ConnectionLimits().fitted(listeners=3, nofile=1 << 20).max_connections == 4096


# --- descriptors: a lowered limit, a flood, shedding ------------------------------------------------

LOWERED = (200, 300)  # soft, hard: serve raises the soft one to 300


def _lower_nofile() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, LOWERED)


def _soft_limit(pid: int) -> int:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise AssertionError("no open-files line in /proc/<pid>/limits")


def test_a_flood_of_idle_connections_under_a_lowered_limit_does_not_lock_clients_out(
    tmp_path: Path,
) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    flood_size = 2 * LOWERED[1]  # more connections than serve may have descriptors
    if soft < flood_size + 100:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, flood_size + 200), hard))
    with serve_process(tmp_path / "flood", preexec_fn=_lower_nofile) as served:
        assert _soft_limit(served.process.pid) == LOWERED[1], "serve did not raise its soft limit"
        cap = ConnectionLimits().fitted(listeners=3, nofile=LOWERED[1]).max_connections
        assert cap < flood_size
        # A client that has made a request and keeps its connection (idle keep-alive) …
        keeper = served.tls()
        keeper.sendall(_request())
        keeper.settimeout(10)
        assert keeper.recv(65536).startswith(b"HTTP/1.1 200 ")
        # … then a flood of TCP connections that never send a byte.
        flood = []
        for _ in range(flood_size):
            flood.append(socket.create_connection(("127.0.0.1", served.portal), timeout=10))
        try:
            time.sleep(0.5)
            # A new client is served at once: the oldest silent connections made room.
            with httpx.Client(verify=served.client_context(), timeout=10) as client:
                started = time.monotonic()
                assert client.get(f"https://localhost:{served.portal}/login").status_code == 200
                assert time.monotonic() - started < 3
            # The keep-alive client was not shed while silent ones were left.
            keeper.sendall(_request())
            assert keeper.recv(65536).startswith(b"HTTP/1.1 200 ")
            closed = 0
            for sock in flood:
                sock.settimeout(0.01)
                try:
                    closed += sock.recv(1) == b""
                except TimeoutError:
                    pass
                except OSError:
                    closed += 1
            assert closed >= flood_size - cap, (closed, cap)
        finally:
            for sock in flood:
                sock.close()
            keeper.close()
        assert served.alive()
        log = served.log()
        assert "Too many open files" not in log
        assert "Traceback" not in log


# --- no header value in a log line -------------------------------------------------------------------


def _secret() -> str:
    return f"tf_{secrets.token_urlsafe(24)}"


def _malformed(secret: str) -> dict[str, bytes]:
    """Requests carrying ``secret`` in a header, each broken in its own way (or not at all)."""
    head = b"GET /api/v1/me HTTP/1.1\r\nHost: localhost\r\n"
    s = secret.encode()
    return {
        "control byte in a bearer token": head + b"Authorization: Bearer " + s + b"\x01\r\n\r\n",
        "DEL in a bearer token": head + b"Authorization: Bearer " + s + b"\x7f\r\n\r\n",
        "NUL in a cookie": head + b"Cookie: twofold_session=" + s + b"\x00\r\n\r\n",
        "not UTF-8 in a bearer token": head + b"Authorization: Bearer " + s + b"\xff\xfe\r\n\r\n",
        "bare CR in a value": head + b"X-Api-Key: " + s + b"\rX: y\r\n\r\n",
        "obsolete line folding": head + b"Authorization: Bearer\r\n " + s + b"\r\n\r\n",
        "space before the colon": head + b"Authorization : Bearer " + s + b"\r\n\r\n",
        "no colon": head + b"Authorization Bearer " + s + b"\r\n\r\n",
        "secret in the name": head + b"X-" + s + b"(): 1\r\n\r\n",
        "header over the size limit": head + b"Authorization: Bearer " + s + b"a" * 20000 + b"\r\n\r\n",
        "too many headers": head + b"".join(b"X-%d: " % i + s + b"\r\n" for i in range(200)) + b"\r\n",
        "content-length not a number": b"POST /login HTTP/1.1\r\nHost: localhost\r\nContent-Length: "
        + s
        + b"\r\n\r\n",
        "transfer-encoding unknown": b"POST /login HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: "
        + s
        + b"\r\n\r\n",
        "two content-lengths": b"POST /login HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1\r\nContent-Length: 2\r\nX-Key: "
        + s
        + b"\r\n\r\nab",
        "host with a control byte": b"GET / HTTP/1.1\r\nHost: " + s + b"\x01\r\n\r\n",
        "well-formed, every header a secret": b"GET /api/v1/me HTTP/1.1\r\n"
        + b"".join(
            name + b": " + s + b"\r\n"
            for name in (
                b"Host",
                b"Authorization",
                b"Cookie",
                b"X-Api-Key",
                b"User-Agent",
                b"Referer",
                b"X-Forwarded-For",
            )
        )
        + b"\r\n",
        "well-formed page request, every header a secret": b"GET /security HTTP/1.1\r\nHost: localhost\r\n"
        + b"Cookie: twofold_session="
        + s
        + b"\r\nAuthorization: Bearer "
        + s
        + b"\r\nX-Csrf-Token: "
        + s
        + b"\r\n\r\n",
    }


def test_no_request_puts_a_header_value_into_a_log_line(served: ServeProcess) -> None:
    secret = _secret()
    answers: dict[str, bytes] = {}
    for name, request in _malformed(secret).items():
        with served.tls() as sock:
            sock.sendall(request)
            sock.settimeout(10)
            received = b""
            try:
                while chunk := sock.recv(65536):
                    received += chunk
                    if b"\r\n\r\n" in received and (b"</html>" in received or b"}" in received):
                        break
            except (TimeoutError, ConnectionResetError, ssl.SSLError):
                pass
            answers[name] = received
    for name, received in answers.items():
        status = re.match(rb"HTTP/1\.[01] (\d{3}) ", received)
        assert status, (name, received[:200])
        assert status.group(1)[:1] in (b"3", b"4"), (name, received[:200])  # refused or redirected, never 5xx
        assert secret.encode() not in received, f"{name}: the answer echoes the secret"
    time.sleep(0.3)  # let the log lines land
    log = served.log()
    assert secret not in log, [line for line in log.splitlines() if secret in line][:3]
    assert "Traceback" not in log
    assert "refused a request from" in log  # the malformed ones were logged — without their bytes
