"""SSL contexts for mTLS clients from keys in any form, and explanations of TLS failures."""

from __future__ import annotations

import os
import ssl
from collections.abc import Iterator
from pathlib import Path

from cryptography import x509

from twofold.crypto import certs as _certs
from twofold.crypto import keys as _keys
from twofold.errors import ClientError, TwofoldError
from twofold.tls import load_into_context

KeySource = str | os.PathLike[str] | bytes | _keys.PrivateKey
CertSource = str | os.PathLike[str] | bytes | x509.Certificate


def read_source(source: str | os.PathLike[str] | bytes, what: str) -> tuple[bytes, str]:
    """The bytes of a file (or given bytes) and a name for messages."""
    if isinstance(source, bytes):
        return source, what
    path = Path(source)
    try:
        return path.read_bytes(), str(path)
    except FileNotFoundError:
        raise ClientError(f"{what} {path} does not exist", code="file_not_found") from None
    except IsADirectoryError:
        raise ClientError(f"{what} {path} is a directory, not a file", code="file_not_found") from None
    except PermissionError:
        raise ClientError(
            f"{what} {path} cannot be read (permission denied)", code="file_unreadable"
        ) from None


def load_client_credentials(
    cert: CertSource | None,
    key: KeySource | None,
    passphrase: _keys.Passphrase = None,
) -> tuple[_keys.PrivateKey, x509.Certificate, tuple[x509.Certificate, ...]]:
    """The key, leaf certificate and chain for an mTLS client, from any mix of sources.

    ``key`` may be a PKCS#12 bundle (then ``cert`` may be omitted), or a PEM file holding
    both the key and its certificate.
    """
    if key is None and cert is None:
        raise ClientError("give a client certificate and its key", code="usage")
    if key is None and isinstance(cert, x509.Certificate):
        raise ClientError("give the private key of the client certificate too (key=...)", code="usage")
    certificate: x509.Certificate | None = None
    chain: tuple[x509.Certificate, ...] = ()
    if isinstance(key, _keys.PrivateKey):
        private = key
    else:
        data, name = read_source(key if key is not None else cert, "the key file")  # type: ignore[arg-type]
        creds = _keys.load_credentials(data, passphrase, name=name)
        private, certificate, chain = creds.key, creds.certificate, creds.chain
    # Without a key, ``cert`` was just read as the credentials (PKCS#12, or a PEM holding key
    # and certificate): keep the certificate found there rather than re-reading the file.
    if cert is not None and not (key is None and certificate is not None):
        if isinstance(cert, x509.Certificate):
            certificate, chain = cert, ()
        else:
            data, name = read_source(cert, "the certificate file")
            listed = _certs.load_certificates(data, name=name)
            certificate, chain = listed[0], tuple(listed[1:])
    if certificate is None:
        raise ClientError(
            "no client certificate: give --cert (or a PKCS#12 / PEM file holding key and certificate)",
            code="usage",
        )
    mine = _keys.public_key_bytes(private, der=True)
    if _keys.public_key_bytes(certificate.public_key(), der=True) != mine:  # type: ignore[arg-type]
        raise ClientError(
            "the private key does not belong to the certificate (their public keys differ)",
            code="key_cert_mismatch",
        )
    return private, certificate, chain


def client_context(
    *,
    cert: CertSource | None = None,
    key: KeySource | None = None,
    passphrase: _keys.Passphrase = None,
    verify: bool | str | os.PathLike[str] | bytes = True,
) -> ssl.SSLContext:
    """A TLS 1.2+ client context presenting the client certificate (if any) and trusting
    ``verify``: True for the system CAs, a CA file (or PEM bytes), or False (no checks)."""
    if verify is False:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    elif verify is True:
        context = ssl.create_default_context()
    else:
        data, name = read_source(verify, "the CA file")
        cas = _certs.load_certificates(data, name=name)
        context = ssl.create_default_context(
            cadata=b"".join(_certs.certificate_pem(c) for c in cas).decode("ascii")
        )
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert is not None or key is not None:
        private, certificate, chain = load_client_credentials(cert, key, passphrase)
        load_into_context(context, private, certificate, chain)
    return context


_REFUSED_CLIENT_CERT = (
    "CERTIFICATE_REQUIRED",
    "BAD_CERTIFICATE",
    "UNKNOWN_CA",
    "CERTIFICATE_UNKNOWN",
    "HANDSHAKE_FAILURE",
    "CERTIFICATE_EXPIRED",
    "CERTIFICATE_REVOKED",
    "UNSUPPORTED_CERTIFICATE",
    "ACCESS_DENIED",
)


def explain_tls_failure(exc: BaseException, *, sent_client_cert: bool, host: str = "") -> TwofoldError:
    """Turn a TLS or connection failure into a message that names the likely cause."""
    text = " ".join(dict.fromkeys(str(e) for e in _chain(exc) if str(e)))
    upper = text.upper()
    if "CERTIFICATE_VERIFY_FAILED" in upper or "CERTIFICATE VERIFY FAILED" in upper:
        if "hostname" in text.lower() or "IP address mismatch" in text:
            return ClientError(
                f"the server's certificate does not name {host or 'this host'}: call it by a name in "
                "its certificate",
                code="tls_server_name",
            )
        return ClientError(
            "the server's certificate is not trusted (wrong CA for the server?): pass the CA that "
            "issued it with --cacert",
            code="tls_server_untrusted",
        )
    if any(marker in upper for marker in _REFUSED_CLIENT_CERT):
        if not sent_client_cert:
            return ClientError(
                "the server requires a client certificate and none was sent: pass --cert and --key",
                code="tls_no_client_cert",
            )
        return ClientError(
            "the server did not trust the client certificate (not registered for this "
            "environment, removed, or expired): check it is registered in the portal",
            code="tls_client_cert_refused",
        )
    if "WRONG_VERSION_NUMBER" in upper or "record layer failure" in text.lower():
        return ClientError("the server did not answer with TLS: is the URL http:// ?", code="tls_not_tls")
    if "Connection refused" in text or "ConnectionRefused" in text or "[Errno 111]" in text:
        return ClientError(f"nothing accepts connections at {host or 'that address'}", code="connect_refused")
    if "timed out" in text.lower():
        return ClientError(f"the connection to {host or 'the server'} timed out", code="timeout")
    if "EOF" in upper or "reset" in text.lower() or "disconnected" in text.lower():
        # Under TLS 1.3 a refused client certificate shows up as a closed connection on
        # the first read, after a handshake that looked successful.
        if not sent_client_cert:
            return ClientError(
                "the server closed the connection after the TLS handshake: it most likely requires a "
                "client certificate; pass --cert and --key",
                code="tls_no_client_cert",
            )
        return ClientError(
            "the server closed the connection after the TLS handshake: it most likely did not accept "
            "the client certificate (not registered for this environment, removed, or expired)",
            code="tls_client_cert_refused",
        )
    return ClientError(f"the connection failed: {text.strip() or type(exc).__name__}", code="connect_failed")


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__
