"""The inputs of the gateway's pipeline, whatever carried the request to it.

:class:`ConnectionFacts` is what is known about how a request arrived: the environment of
the listener, the client's address and the client certificate — from this process's own
TLS handshake (``via="tls"``), or, behind a TLS edge (nginx, HAProxy, Envoy), from the
header the edge forwards it in. The pipeline never looks at a socket: the listener builds
the facts (once per connection for direct TLS) and passes them in with each request.

:class:`RequestHead` is the request line and headers as parsed, before the body.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from urllib.parse import unquote


@dataclass(frozen=True, slots=True)
class ConnectionFacts:
    environment: str
    client_address: str
    certificate_der: bytes | None  # the client certificate, DER
    fingerprint: str | None  # SHA-256 of certificate_der, hex
    via: str = "tls"  # "tls": this listener's own handshake; otherwise the edge that sent it
    # Why the certificate could not be taken (code, status, message): a TLS edge's header that
    # cannot be read, or one sent by a peer that is not the edge. identify() refuses with it.
    problem: tuple[str, int, str] | None = None

    @classmethod
    def of(
        cls, environment: str, client_address: str, certificate_der: bytes | None, via: str = "tls"
    ) -> ConnectionFacts:
        fingerprint = hashlib.sha256(certificate_der).hexdigest() if certificate_der else None
        return cls(environment, client_address, certificate_der or None, fingerprint, via)


@dataclass(slots=True)
class RequestHead:
    method: str
    raw_path: str  # as sent (what a proxy forwards)
    path: str  # percent-decoded (what products are matched against)
    query: str  # as sent, without the '?'
    headers: list[tuple[str, str]]  # in order, names as sent
    content_type: str = ""  # the Content-Type header as sent, "" when absent
    content_length: int | None = None  # declared, None when absent
    chunked: bool = False
    content_encoding: str = ""
    expect: str | None = None
    request_id: str = ""  # X-Request-Id as sent

    @classmethod
    def parse_target(
        cls, method: str, raw_path: str, query: str, headers: list[tuple[str, str]]
    ) -> RequestHead:
        """A head from the request target's path and query as sent; the headers the
        pipeline reads are picked out in one pass (the first of each)."""
        path = unquote(raw_path, errors="surrogateescape") if "%" in raw_path else raw_path
        head = cls(method, raw_path, path, query, headers)
        picked: set[str] = set()
        for name, value in headers:
            field = _PICKED.get(name.lower())
            if field is None or field in picked:
                continue
            picked.add(field)
            if field == "content_length":
                if not value.isdigit():
                    raise ValueError("Content-Length is not a number")
                head.content_length = int(value)
            elif field == "chunked":
                head.chunked = "chunked" in value.lower()
            else:
                setattr(head, field, value)
        return head

    def header(self, name: str) -> str | None:
        """The first value of a header (case-insensitive name), None when absent."""
        lower = name.lower()
        for key, value in self.headers:
            if key.lower() == lower:
                return value
        return None

    @property
    def media_type(self) -> str:
        """The Content-Type's media type, lower case, without parameters ("" when absent)."""
        return self.content_type.split(";", 1)[0].strip().lower()

    @property
    def has_body(self) -> bool:
        return self.chunked or bool(self.content_length)


_PICKED = {  # header → the field it sets
    "content-type": "content_type",
    "content-length": "content_length",
    "transfer-encoding": "chunked",
    "content-encoding": "content_encoding",
    "expect": "expect",
    "x-request-id": "request_id",
}
