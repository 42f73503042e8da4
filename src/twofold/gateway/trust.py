"""TLS trust that follows the registry: each environment's listener trusts its active mTLS
certificates (pinned leaves) and its configured CAs.

Python cannot remove a trust anchor from a live ``SSLContext``, so a fresh context is built
whenever an environment's trusted set changes, and every new connection is switched to the
newest one in the SNI callback (called on every ClientHello, with or without SNI): a removed
certificate stops completing handshakes at once. Connections already open are the
pipeline's job (it checks the fingerprint against the live snapshot on every request).
"""

from __future__ import annotations

import ssl

from cryptography import x509

from twofold.crypto.certs import fingerprint_sha256
from twofold.crypto.keys import PrivateKey
from twofold.gateway.snapshot import Snapshot
from twofold.tls import server_context


class Trust:
    def __init__(
        self, key: PrivateKey, certificate: x509.Certificate, chain: tuple[x509.Certificate, ...] = ()
    ) -> None:
        self.key, self.certificate, self.chain = key, certificate, chain
        self.listening: dict[str, ssl.SSLContext] = {}
        self._newest: dict[str, ssl.SSLContext] = {}
        self._marker: dict[str, frozenset[str]] = {}

    def update(self, snapshot: Snapshot) -> None:
        """Build a new context for every listening environment whose trusted set changed (an
        environment without a TLS listener — none, or behind a TLS edge — builds none)."""
        for env in list(self.listening):
            marker = _marker(snapshot, env)
            if self._marker.get(env) != marker:
                self._newest[env] = self._context(snapshot.trusted_certificates(env))
                self._marker[env] = marker

    def _context(self, trusted: list[x509.Certificate]) -> ssl.SSLContext:
        return server_context(self.key, self.certificate, chain=self.chain, trusted=trusted)

    def listening_context(self, env: str, snapshot: Snapshot) -> ssl.SSLContext:
        """The context a listener is created with; it hands each new connection the newest
        context of its environment."""
        if env in self.listening:
            return self.listening[env]
        context = self._newest.get(env) or self._context(snapshot.trusted_certificates(env))

        def switch(ssl_object: ssl.SSLObject, _name: str | None, current: ssl.SSLContext) -> None:
            newest = self._newest.get(env)
            if newest is not None and newest is not current:  # nothing to switch while trust is unchanged
                ssl_object.context = newest

        context.sni_callback = switch
        self.listening[env] = context
        self._newest[env], self._marker[env] = context, _marker(snapshot, env)
        return context


def _marker(snapshot: Snapshot, env: str) -> frozenset[str]:
    """What an environment's TLS layer trusts, by fingerprint (without parsing a certificate)."""
    view = snapshot.environments.get(env)
    cas = (fingerprint_sha256(c) for c in (view.cas if view else ()))
    return frozenset(snapshot.mtls.get(env, {})).union(cas)
