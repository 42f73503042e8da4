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


# Mozilla "intermediate" key exchange groups; OpenSSL would also offer P-521, X448 and more.
INTERMEDIATE_GROUPS = b"X25519:P-256:P-384"
_SSL_CTRL_SET_GROUPS_LIST = 92  # SSL_CTX_set1_groups_list() is this SSL_CTX_ctrl() (OpenSSL 1.1.1+)


def restrict_groups(context: ssl.SSLContext) -> None:
    """Offer only :data:`INTERMEDIATE_GROUPS` for the key exchange.

    Python's ``ssl`` (3.11) has no way to set several groups: ``set_ecdh_curve`` leaves just
    one, so every TLS 1.3 client that leads with X25519 would need a HelloRetryRequest (an
    extra round trip per handshake). So OpenSSL's own call is made on the context's
    ``SSL_CTX`` — on CPython it is the first field after the object header. Where that
    cannot be done (another Python, another TLS library), P-256 alone, which is compliant too."""
    try:
        import _ssl
        import ctypes
        import sys

        if sys.implementation.name != "cpython" or not ssl.OPENSSL_VERSION.startswith("OpenSSL 3"):
            raise OSError("not CPython on OpenSSL 3")
        library = ctypes.CDLL(_ssl.__file__)
        ctrl = library.SSL_CTX_ctrl
        ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_char_p]
        ctrl.restype = ctypes.c_long
        ssl_ctx = ctypes.c_void_p.from_address(id(context) + object.__basicsize__).value
        if not ssl_ctx or ctrl(ssl_ctx, _SSL_CTRL_SET_GROUPS_LIST, 0, INTERMEDIATE_GROUPS) != 1:
            raise OSError("SSL_CTX_set1_groups_list failed")
    except (OSError, AttributeError, ImportError):
        context.set_ecdh_curve("prime256v1")


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
    restrict_groups(context)
    load_into_context(context, key, certificate, chain)
    if require_client_cert:
        context.verify_mode = ssl.CERT_REQUIRED
        context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
        trusted = list(trusted)
        if trusted:
            context.load_verify_locations(cadata=pem_bundle(trusted))
    return context
