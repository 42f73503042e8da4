"""The gateway behind a TLS edge (nginx, HAProxy, Envoy).

The edge terminates mutual TLS and forwards plain HTTP/1.1 with the client certificate in a
header; the gateway listens for it on a unix socket (or a port) and takes the certificate
from that header — **only** from the configured source: every connection on the unix socket
(its file permissions say who may connect), or, on a port, a peer address in the listed
proxies. From any other peer the header is ignored (and, like every certificate header,
never forwarded), so its request carries no certificate and is refused. The pipeline's
steps are the same as for direct TLS: the edge only changes how the
:class:`~twofold.gateway.facts.ConnectionFacts` are made — per request here, since one
keep-alive connection from the edge carries many clients' requests.

The headers, one per edge (:data:`EDGES`):

* nginx — ``X-SSL-Client-Cert: $ssl_client_escaped_cert`` (the PEM, URL-escaped);
* HAProxy — RFC 9440 ``Client-Cert: :%[ssl_c_der,base64]:`` (DER as a structured-field
  byte sequence);
* Envoy — ``x-forwarded-client-cert`` (XFCC) with its ``Hash`` (hex SHA-256 of the DER) and
  ``Cert`` (URL-escaped PEM) fields, as ``forward_client_cert_details: SANITIZE_SET`` sends it.

The client's address is the last ``X-Forwarded-For`` entry the edge set (else the peer's).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import grp
import hashlib
import ipaddress
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote

from twofold.gateway.facts import ConnectionFacts, RequestHead
from twofold.gateway.protocol import GatewayProtocol

if TYPE_CHECKING:
    from twofold.gateway.core import Gateway
    from twofold.gateway.wire import Limits

log = logging.getLogger("twofold.gateway")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_PEM = re.compile(r"-----BEGIN CERTIFICATE-----([A-Za-z0-9+/=\s]+?)-----END CERTIFICATE-----")
_HEX64 = re.compile(r"[0-9a-fA-F]{64}")


class HeaderError(ValueError):
    """The edge's header is there but cannot be read as one certificate."""


def _pem_der(text: str) -> bytes:
    blocks = _PEM.findall(text)
    if len(blocks) != 1:
        raise HeaderError(
            "it holds no PEM certificate" if not blocks else "it holds more than one certificate"
        )
    try:
        return base64.b64decode("".join(blocks[0].split()), validate=True)
    except binascii.Error:
        raise HeaderError("its PEM is not base64") from None


def nginx_certificate(value: str) -> tuple[bytes | None, str | None]:
    """``$ssl_client_escaped_cert``: the PEM, URL-escaped ("" without a certificate)."""
    if not value:
        return None, None
    return _pem_der(unquote(value)), None


def rfc9440_certificate(value: str) -> tuple[bytes | None, str | None]:
    """RFC 9440 ``Client-Cert``: the DER as a structured-field byte sequence, ``:base64:``."""
    value = value.strip()
    if not value:
        return None, None
    if len(value) < 3 or value[0] != ":" or value[-1] != ":":
        raise HeaderError("it is not a byte sequence (:base64 DER:)")
    try:
        return base64.b64decode(value[1:-1], validate=True), None
    except binascii.Error:
        raise HeaderError("its byte sequence is not base64") from None


def _split_outside_quotes(text: str, separator: str) -> list[str]:
    parts, current, quoted, escaped = [], [], False, False
    for char in text:
        if escaped:
            current.append(char)
            escaped = False
        elif char == "\\" and quoted:
            current.append(char)
            escaped = True
        elif char == '"':
            quoted = not quoted
            current.append(char)
        elif char == separator and not quoted:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    if quoted:
        raise HeaderError("a quoted value is not closed")
    parts.append("".join(current))
    return parts


def xfcc_fields(value: str) -> dict[str, str]:
    """The fields of one XFCC element (``Key=value;Key="quoted value"``), keys lower case.
    More than one element (a chain of proxies appending theirs) is refused: the edge must
    replace what the client sent (``SANITIZE_SET``), so there is exactly one, its own."""
    elements = [e for e in _split_outside_quotes(value, ",") if e.strip()]
    if len(elements) != 1:
        raise HeaderError(
            "it has more than one element (set forward_client_cert_details: SANITIZE_SET)"
            if elements
            else "it is empty"
        )
    fields: dict[str, str] = {}
    for pair in _split_outside_quotes(elements[0], ";"):
        if not pair.strip():
            continue
        key, sep, raw = pair.strip().partition("=")
        if not sep:
            raise HeaderError(f"the field {key!r} has no value")
        if len(raw) >= 2 and raw[0] == raw[-1] == '"':
            raw = re.sub(r"\\(.)", r"\1", raw[1:-1])
        key = key.strip().lower()
        if key in ("hash", "cert") and key in fields:
            raise HeaderError(f"the field {key} appears twice")
        fields[key] = raw
    return fields


def envoy_certificate(value: str) -> tuple[bytes | None, str | None]:
    """Envoy's ``x-forwarded-client-cert``: ``Cert`` (URL-escaped PEM) and ``Hash`` (hex
    SHA-256 of the DER). With both, they must agree; ``Hash`` alone identifies too."""
    if not value.strip():
        return None, None
    fields = xfcc_fields(value)
    digest = fields.get("hash")
    if digest is not None and not _HEX64.fullmatch(digest):
        raise HeaderError("its Hash is not a hex SHA-256")
    cert = fields.get("cert")
    if cert is None:
        if digest is None:
            return None, None  # no client certificate (Envoy sends By=… and the like)
        return None, digest.lower()
    der = _pem_der(unquote(cert))
    if digest is not None and hashlib.sha256(der).hexdigest() != digest.lower():
        raise HeaderError("its Hash is not the SHA-256 of its Cert")
    return der, None


@dataclass(frozen=True)
class Edge:
    name: str
    header: str  # the header the edge forwards the client certificate in
    decode: Callable[[str], tuple[bytes | None, str | None]]  # → (DER, or a fingerprint alone)


EDGES = {
    "nginx": Edge("nginx", "X-SSL-Client-Cert", nginx_certificate),
    "haproxy": Edge("haproxy", "Client-Cert", rfc9440_certificate),
    "envoy": Edge("envoy", "X-Forwarded-Client-Cert", envoy_certificate),
}


def parse_proxies(values: list[str]) -> tuple[Network, ...]:
    """Addresses or networks (``10.0.0.7``, ``10.0.0.0/24``, ``::1``) whose header is honoured."""
    networks = []
    for value in values:
        try:
            networks.append(ipaddress.ip_network(str(value).strip(), strict=False))
        except ValueError:
            raise ValueError(f"edge_proxies: {value!r} is not an IP address or network") from None
    return tuple(networks)


def _header_values(head: RequestHead, lower: str) -> list[str]:
    return [value for name, value in head.headers if name.lower() == lower]


def edge_facts(edge: Edge, environment: str, peer: str, trusted: bool, head: RequestHead) -> ConnectionFacts:
    """The facts of one request that came through the edge: the certificate of its header
    when the peer is the edge (``trusted``); otherwise none, whatever the header says."""
    address = peer
    if trusted:
        forwarded = _header_values(head, "x-forwarded-for")
        if forwarded:
            last = forwarded[-1].rsplit(",", 1)[-1].strip()
            address = last or peer
    values = _header_values(head, edge.header.lower())
    if not trusted:
        if values:
            problem = (
                "client_certificate_required",
                401,
                f"{peer} is not a configured TLS edge, so its {edge.header} header is ignored and "
                "the request carries no client certificate; call through the edge with your mTLS "
                "certificate and key",
            )
            return ConnectionFacts(environment, address, None, None, edge.name, problem)
        return ConnectionFacts(environment, address, None, None, edge.name)
    if len(values) > 1:
        problem = (
            "client_certificate_header_invalid",
            400,
            f"the TLS edge sent {edge.header} more than once; let it set the header, replacing "
            f"the client's (see `twofold edge config {edge.name}`)",
        )
        return ConnectionFacts(environment, address, None, None, edge.name, problem)
    try:
        der, fingerprint = edge.decode(values[0]) if values else (None, None)
    except HeaderError as exc:
        problem = (
            "client_certificate_header_invalid",
            400,
            f"the TLS edge's {edge.header} header cannot be read as a client certificate ({exc}); "
            f"check the edge's configuration (`twofold edge config {edge.name}`)",
        )
        return ConnectionFacts(environment, address, None, None, edge.name, problem)
    if der is None and fingerprint is not None:
        return ConnectionFacts(environment, address, None, fingerprint, edge.name)
    return ConnectionFacts.of(environment, address, der, via=edge.name)


class EdgeProtocol(GatewayProtocol):
    """A plain-HTTP connection from the edge: the facts are made per request from its
    headers (the last one's are kept, for keep-alive requests of the same client)."""

    def __init__(
        self,
        gateway: Gateway,
        environment: str,
        limits: Limits,
        edge: Edge,
        proxies: tuple[Network, ...] | None,
        *,
        on_open: Callable[[GatewayProtocol], None] | None = None,
        on_close: Callable[[GatewayProtocol], None] | None = None,
    ) -> None:
        super().__init__(gateway, environment, limits, on_open=on_open, on_close=on_close)
        self.edge = edge
        self._proxies = proxies  # None: a unix socket, every peer is the edge
        self._peer = "-"
        self._trusted = False
        self._head: RequestHead | None = None
        self._head_facts: ConnectionFacts | None = None
        self._last_key: tuple[str | None, str | None] | None = None

    def connection_facts(self, transport: asyncio.Transport) -> ConnectionFacts:
        peer = transport.get_extra_info("peername")
        if self._proxies is None:
            self._peer, self._trusted = "unix", True
        else:
            self._peer = str(peer[0]) if isinstance(peer, tuple) else "-"
            try:
                address = ipaddress.ip_address(self._peer.partition("%")[0])
            except ValueError:
                self._trusted = False
            else:
                if address.version == 6 and address.ipv4_mapped is not None:
                    address = address.ipv4_mapped
                self._trusted = any(address in network for network in self._proxies)
        return ConnectionFacts(self.environment, self._peer, None, None, self.edge.name)

    def facts_for(self, head: RequestHead) -> ConnectionFacts:
        if head is self._head and self._head_facts is not None:
            return self._head_facts
        key = (head.header(self.edge.header), head.header("X-Forwarded-For"))
        if key == self._last_key and self._head_facts is not None and key[0] is not None:
            facts = self._head_facts  # the same client again on this connection
        else:
            facts = edge_facts(self.edge, self.environment, self._peer, self._trusted, head)
            self._last_key = key
        self._head, self._head_facts = head, facts
        return facts


class EdgeListener:
    """One environment's plain-HTTP listener for the edge: a unix socket, or a port whose
    listed proxies are trusted. Connections are capped (the edge keeps a pool of keep-alive
    connections: the cap is a guard, not a queue) and their deadlines swept like the TLS
    listener's."""

    def __init__(self, gateway: Gateway, env: str, edge: Edge, proxies: tuple[Network, ...] | None) -> None:
        self.gateway, self.env, self.edge, self.proxies = gateway, env, edge, proxies
        self.connections = gateway.connections
        self.max_connections = gateway.config.max_connections
        self.open = 0
        self.server: asyncio.AbstractServer | None = None
        self.path: Path | None = None
        self.address = ""
        metrics = gateway.metrics
        self._full = metrics.connections_dropped.labels(env, "full")
        metrics.connections.labels(env).set_function(lambda: self.open)  # read when scraped
        self._mine: set[GatewayProtocol] = set()
        self._drained = asyncio.Event()
        self._closing = False

    def _protocol(self) -> EdgeProtocol:
        return EdgeProtocol(
            self.gateway,
            self.env,
            self.gateway.limits,
            self.edge,
            self.proxies,
            on_open=self._opened,
            on_close=self._closed,
        )

    async def start_unix(self, path: Path, group: str | None = None) -> None:
        """Listen on ``path`` (mode 0660; group ``group`` when given): who may connect is
        who may send the certificate header."""
        gid = grp.getgrnam(group).gr_gid if group is not None else -1
        _prepare_socket_path(path, gid)
        self.server = await asyncio.get_running_loop().create_unix_server(
            self._protocol, path=str(path), backlog=1024
        )
        os.chown(path, -1, gid)
        os.chmod(path, 0o660)  # the directory (0750) kept everyone else out meanwhile
        self.path, self.address = path, f"unix:{path}"
        self.connections.listeners_started()

    async def start_tcp(self, host: str, port: int, *, reuse_port: bool = False) -> None:
        self.server = await asyncio.get_running_loop().create_server(
            self._protocol, host, port, reuse_address=True, reuse_port=reuse_port or None, backlog=1024
        )
        self.address = f"http://{host}:{port}"
        self.connections.listeners_started()

    def _opened(self, protocol: GatewayProtocol) -> None:
        if (
            self._closing
            or self.open >= self.max_connections
            or self.connections.open >= self.connections.budget
        ):
            self._full.inc()
            protocol.abort()
            return
        self.open += 1
        self.connections.open += 1
        self._mine.add(protocol)
        self.connections.active.add(protocol)  # its deadlines are swept (uvloop sets TCP_NODELAY)

    def _closed(self, protocol: GatewayProtocol) -> None:
        if protocol not in self._mine:
            return
        self._mine.discard(protocol)
        self.connections.active.discard(protocol)
        self.open -= 1
        self.connections.open -= 1
        if self._closing and self.open <= 0:
            self._drained.set()

    async def close(self, grace: float = 2.0) -> None:
        """Stop accepting, let answers in progress finish (up to ``grace``), then close."""
        self._closing = True
        if self.server is not None:
            self.server.close()
        for protocol in list(self._mine):
            protocol.shutdown()
        if self.open > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drained.wait(), grace)
        for protocol in list(self._mine):
            protocol.abort()
        if self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        await self.connections.listener_stopped()


def _prepare_socket_path(path: Path, gid: int) -> None:
    if not path.parent.exists():
        path.parent.mkdir(parents=True, mode=0o750)
        os.chown(path.parent, -1, gid)
    with contextlib.suppress(FileNotFoundError):
        if path.is_socket():
            path.unlink()  # left by a process that did not stop cleanly


def socket_path(directory: Path, env: str, index: int) -> Path:
    """Where process ``index`` of a node listens for the edge in ``env`` (unix sockets cannot
    be shared between processes the way SO_REUSEPORT shares a port: each has its own, and the
    edge balances over them)."""
    return directory / f"{env}-{index}.sock"
