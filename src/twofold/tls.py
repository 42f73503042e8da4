"""TLS plumbing shared by the client and the servers.

Python's ``ssl`` only loads a certificate key from a file path. To accept encrypted keys,
DER, PKCS#12 and in-memory keys without ever writing a plaintext key to disk, the key is
re-encrypted under a random one-time password and handed to OpenSSL through an anonymous
in-memory file (``memfd``) where the platform has one, or a private temporary file that
is deleted at once otherwise.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import ssl
import tempfile
from collections.abc import Iterable, Iterator

from cryptography import x509

from twofold.crypto import certs as _certs
from twofold.crypto import keys as _keys

# Mozilla "intermediate" (v5.7) TLS 1.2 suites; TLS 1.3 suites are OpenSSL's defaults.
INTERMEDIATE_CIPHERS = ":".join(
    [
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
        "DHE-RSA-AES128-GCM-SHA256",
        "DHE-RSA-AES256-GCM-SHA384",
        "DHE-RSA-CHACHA20-POLY1305",
    ]
)


@contextlib.contextmanager
def _private_file(data: bytes) -> Iterator[str]:
    memfd = getattr(os, "memfd_create", None)
    if memfd is not None and os.path.isdir("/proc/self/fd"):
        fd = memfd("twofold-key", getattr(os, "MFD_CLOEXEC", 0))
        try:
            os.write(fd, data)
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
        return
    fd, path = tempfile.mkstemp(prefix="twofold-", suffix=".pem")  # created 0600
    try:
        os.write(fd, data)
        os.close(fd)
        yield path
    finally:
        os.unlink(path)


def load_into_context(
    context: ssl.SSLContext,
    key: _keys.PrivateKey,
    certificate: x509.Certificate,
    chain: Iterable[x509.Certificate] = (),
) -> None:
    """``context.load_cert_chain`` from objects, without a plaintext key on disk."""
    password = secrets.token_hex(32).encode()
    pem = b"".join(_certs.certificate_pem(c) for c in (certificate, *chain))
    pem += _keys.private_key_bytes(key, passphrase=password)
    with _private_file(pem) as path:
        context.load_cert_chain(path, password=password)


def pem_bundle(certificates: Iterable[x509.Certificate]) -> str:
    return b"".join(_certs.certificate_pem(c) for c in certificates).decode("ascii")


def server_context(
    key: _keys.PrivateKey,
    certificate: x509.Certificate,
    *,
    chain: Iterable[x509.Certificate] = (),
    trusted: Iterable[x509.Certificate] = (),
    require_client_cert: bool = True,
) -> ssl.SSLContext:
    """A TLS 1.2/1.3 server context: Mozilla intermediate suites, no session tickets, and
    client certificates required and checked against ``trusted`` — pinned leaves
    (``VERIFY_X509_PARTIAL_CHAIN``) or CAs."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(INTERMEDIATE_CIPHERS)
    # No renegotiation: a client certificate cannot change under an open connection.
    context.options |= (
        ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_NO_TICKET | ssl.OP_NO_RENEGOTIATION
    )
    context.num_tickets = 0
    load_into_context(context, key, certificate, chain)
    if require_client_cert:
        context.verify_mode = ssl.CERT_REQUIRED
        context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
        trusted = list(trusted)
        if trusted:
            context.load_verify_locations(cadata=pem_bundle(trusted))
    return context
