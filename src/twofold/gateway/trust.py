"""TLS trust that follows the registry: each environment's listener trusts its active mTLS
certificates (pinned leaves) and its configured CAs.

Python cannot remove a trust anchor from a live ``SSLContext``, so a fresh context is built
whenever an environment's trusted set changes, and every new connection is set up with the
newest one (the listener asks :meth:`Trust.context` for each accepted socket): a removed
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
        self._newest: dict[str, ssl.SSLContext] = {}  # per listening environment
        self._marker: dict[str, frozenset[str]] = {}

    def update(self, snapshot: Snapshot) -> None:
        """Build a new context for every listening environment whose trusted set changed (an
        environment without a TLS listener — none, or behind a TLS edge — builds none)."""
        for env in list(self._newest):
            marker = _marker(snapshot, env)
            if self._marker.get(env) != marker:
                self._newest[env] = self._context(snapshot.trusted_certificates(env))
                self._marker[env] = marker

    def _context(self, trusted: list[x509.Certificate]) -> ssl.SSLContext:
        return server_context(self.key, self.certificate, chain=self.chain, trusted=trusted)

    def context(self, env: str, snapshot: Snapshot) -> ssl.SSLContext:
        """The newest context of an environment's listener (built on the first call; from then
        on the environment's contexts follow the snapshot)."""
        context = self._newest.get(env)
        if context is None:
            context = self._newest[env] = self._context(snapshot.trusted_certificates(env))
            self._marker[env] = _marker(snapshot, env)
        return context


def _marker(snapshot: Snapshot, env: str) -> frozenset[str]:
    """What an environment's TLS layer trusts, by fingerprint (without parsing a certificate)."""
    view = snapshot.environments.get(env)
    cas = (fingerprint_sha256(c) for c in (view.cas if view else ()))
    return frozenset(snapshot.mtls.get(env, {})).union(cas)
