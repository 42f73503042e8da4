"""HTTP/1.1 on the wire, for the gateway's protocol: the limits a request must stay
within, and answers serialised in one buffer."""

from __future__ import annotations

import time
from dataclasses import dataclass
from email.utils import formatdate

from twofold.gateway.forward import Response, reason


@dataclass(frozen=True)
class Limits:
    max_body: int = 1024 * 1024
    max_target: int = 8 * 1024  # the request target (path and query)
    max_field: int = 16 * 1024  # one header line; also the slack of a chunked body's framing
    max_fields: int = 100
    max_head: int = 64 * 1024  # the request line and every header together
    header_timeout: float = 10.0  # from the first byte of a request (or the handshake) to its last header
    body_timeout: float = 30.0  # from the last header to the last byte of the body
    idle_timeout: float = 75.0  # idle between requests
    send_timeout: float = 30.0  # a client that stops reading its answers


_STATUS_LINES: dict[int, bytes] = {}


def _status_line(status: int) -> bytes:
    line = _STATUS_LINES.get(status)
    if line is None:
        line = _STATUS_LINES[status] = f"HTTP/1.1 {status} {reason(status)}\r\n".encode()
    return line


class _Clock:
    """The Date header, formatted once a second."""

    second = -1
    value = b""

    @classmethod
    def date(cls) -> bytes:
        now = int(time.time())
        if now != cls.second:
            cls.second, cls.value = now, f"Date: {formatdate(now, usegmt=True)}\r\n".encode()
        return cls.value


_FIELD, _FIELDS = ": ".join, "\r\n".join


def serialise_response(response: Response, *, head_only: bool, close: bool) -> bytes:
    """Status line, headers, framing and (unless answering HEAD) the body, in one buffer."""
    status, body = response.status, response.body
    parts = [_status_line(status), response.relayed]
    if response.headers:  # the gateway's own (never a Date: that comes from the clock or the upstream)
        parts.append(f"{_FIELDS(map(_FIELD, response.headers))}\r\n".encode("utf-8", "surrogateescape"))
    if not response.dated:
        parts.append(_Clock.date())
    if status >= 200 and status != 204:
        length = response.head_length if response.head_length is not None else len(body)
        parts.append(b"Content-Length: %d\r\n" % length)
    if close:
        parts.append(b"Connection: close\r\n")
    parts.append(b"\r\n")
    if body and not head_only and status not in (204, 304):
        parts.append(body)
    return b"".join(parts)
