"""Recognising what a blob of bytes is, before trying to parse it as the wrong thing.

Integrators hand over whatever file they have; a message such as "this is a certificate,
a private key was expected" is worth more than a parser's stack trace.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterator
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.serialization import load_der_public_key

_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n(.*?)-----END \1-----", re.DOTALL)

# PEM label → what a person calls it.
LABELS = {
    "PRIVATE KEY": "a private key (PKCS#8)",
    "ENCRYPTED PRIVATE KEY": "an encrypted private key (PKCS#8)",
    "RSA PRIVATE KEY": "an RSA private key (PKCS#1)",
    "EC PRIVATE KEY": "an EC private key (SEC1)",
    "OPENSSH PRIVATE KEY": "an OpenSSH private key",
    "DSA PRIVATE KEY": "a DSA private key",
    "PUBLIC KEY": "a public key",
    "RSA PUBLIC KEY": "an RSA public key (PKCS#1)",
    "CERTIFICATE": "a certificate",
    "TRUSTED CERTIFICATE": "a certificate",
    "X509 CRL": "a certificate revocation list",
    "CERTIFICATE REQUEST": "a certificate signing request",
    "NEW CERTIFICATE REQUEST": "a certificate signing request",
    "PKCS7": "a PKCS#7 bundle",
    "EC PARAMETERS": "EC parameters",
}

PRIVATE_LABELS = frozenset(
    {
        "PRIVATE KEY",
        "ENCRYPTED PRIVATE KEY",
        "RSA PRIVATE KEY",
        "EC PRIVATE KEY",
        "OPENSSH PRIVATE KEY",
        "DSA PRIVATE KEY",
    }
)
CERTIFICATE_LABELS = frozenset({"CERTIFICATE", "TRUSTED CERTIFICATE"})


@dataclass(frozen=True)
class PemBlock:
    label: str
    text: bytes  # the whole block, BEGIN to END, as the loaders want it
    der: bytes | None  # None when the body is not valid base64 (encrypted PKCS#1 has headers)


def is_pem(data: bytes) -> bool:
    return b"-----BEGIN " in data[:65536]


def pem_blocks(data: bytes) -> Iterator[PemBlock]:
    for m in _BLOCK.finditer(data):
        label = m.group(1).decode("ascii")
        body = m.group(2)
        der: bytes | None
        if b":" in body:  # RFC 1421 headers (Proc-Type: 4,ENCRYPTED …)
            der = None
        else:
            try:
                der = base64.b64decode(b"".join(body.split()), validate=True)
            except (binascii.Error, ValueError):
                der = None
        yield PemBlock(label, m.group(0) + b"\n", der)


def looks_like_private_key(data: bytes) -> bool:
    """True if the bytes contain any private key, in any of the usual encodings.

    Used to refuse uploads that would leak a secret: it must err on the side of "yes".
    """
    if any(b.label in PRIVATE_LABELS for b in pem_blocks(data)):
        return True
    if b"PRIVATE KEY-----" in data:
        return True
    if is_pem(data):
        return False
    return sniff_der(data) in ("private key", "pkcs12")


def sniff_der(data: bytes) -> str:
    """Name what a DER blob is: certificate, csr, public key, private key, pkcs12 or unknown."""
    from cryptography.hazmat.primitives.serialization import load_der_private_key

    try:
        x509.load_der_x509_certificate(data)
        return "certificate"
    except x509.InvalidVersion:
        return "certificate"  # of a version that does not exist: the loader says so
    except ValueError:
        pass
    try:
        x509.load_der_x509_csr(data)
        return "csr"
    except (ValueError, UnsupportedAlgorithm):
        pass
    try:
        load_der_public_key(data)
        return "public key"
    except (ValueError, TypeError, UnsupportedAlgorithm):
        pass
    try:
        load_der_private_key(data, password=None)
        return "private key"
    except TypeError:  # encrypted, password missing
        return "private key"
    except (ValueError, UnsupportedAlgorithm):
        pass  # not a private key; go on sniffing
    if _looks_like_pkcs12(data):
        return "pkcs12"
    if _looks_like_encrypted_pkcs8(data):
        return "private key"
    return "unknown"


def _looks_like_pkcs12(data: bytes) -> bool:
    # PFX ::= SEQUENCE { version INTEGER (3), authSafe ContentInfo (OID pkcs7-data) ... }
    return (
        len(data) > 16
        and data[0] == 0x30
        and b"\x02\x01\x03\x30" in data[:8]
        and (b"\x06\x09\x2a\x86\x48\x86\xf7\x0d\x01\x07\x01" in data[:40])
    )


def _looks_like_encrypted_pkcs8(data: bytes) -> bool:
    # EncryptedPrivateKeyInfo starts with an AlgorithmIdentifier for PBES2 / PBE.
    return (
        data[:1] == b"\x30"
        and (
            b"\x06\x09\x2a\x86\x48\x86\xf7\x0d\x01\x05\x0d" in data[:32]  # PBES2
            or b"\x06\x0a\x2a\x86\x48\x86\xf7\x0d\x01\x0c\x01" in data[:32]  # pkcs12 PBE
        )
    )


def describe(data: bytes) -> str:
    """A short human description of a file's content, for error messages."""
    if not data.strip():
        return "an empty file"
    if is_pem(data):
        labels = [b.label for b in pem_blocks(data)]
        if not labels:
            return "a damaged PEM file"
        names = [LABELS.get(label, f"a PEM '{label}' block") for label in labels]
        if len(names) == 1:
            return names[0]
        return "a PEM file holding " + ", ".join(names)
    kind = sniff_der(data)
    return {
        "certificate": "a certificate (DER)",
        "csr": "a certificate signing request (DER)",
        "public key": "a public key (DER)",
        "private key": "a private key (DER)",
        "pkcs12": "a PKCS#12 bundle",
    }.get(kind, "neither PEM nor DER key or certificate data")
