"""A small certificate authority: the local CA of development servers and tests, and the
issuing CA of an environment, which signs certificates from CSRs. Pure, no I/O."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from twofold.crypto.certs import Usage, issue_certificate, self_signed_certificate
from twofold.crypto.keys import PrivateKey, PublicKey, generate_private_key, public_key_bytes
from twofold.errors import CertificateError


@dataclass(frozen=True)
class Issued:
    key: PrivateKey
    certificate: x509.Certificate


class LocalCA:
    """``LocalCA("twofold local CA").issue("localhost", usage="server", sans=["DNS:localhost"])``."""

    def __init__(
        self,
        name: str = "twofold local CA",
        *,
        key: PrivateKey | None = None,
        certificate: x509.Certificate | None = None,
        days: int = 3650,
    ) -> None:
        self.key = key or generate_private_key("ec", curve="P-256")
        self.certificate = certificate or self_signed_certificate(
            self.key, f"/O=twofold/CN={name}", days=days, usage="ca"
        )

    def issue(
        self,
        cn: str,
        *,
        usage: Usage = "client",
        sans: Sequence[str] = (),
        days: int = 365,
        key: PrivateKey | None = None,
        subject: str | None = None,
    ) -> Issued:
        private = key or generate_private_key("ec", curve="P-256")
        certificate = issue_certificate(
            subject=subject or f"/O=twofold/CN={cn}",
            public_key=private.public_key(),
            issuer_key=self.key,
            issuer=self.certificate,
            days=days,
            usage=usage,
            sans=sans,
        )
        return Issued(private, certificate)

    def sign_csr(
        self,
        csr: x509.CertificateSigningRequest,
        *,
        subject: x509.Name,
        usage: Usage,
        days: int,
        now: dt.datetime | None = None,
    ) -> x509.Certificate:
        """A certificate for the CSR's public key, with ``subject`` and the key usages of
        ``usage`` chosen here: nothing of the CSR but its key is copied (no extensions, no
        alternative names). The CSR's own signature — the proof that its author holds the
        private key — must verify."""
        return issue_certificate(
            subject=subject,
            public_key=csr_public_key(csr),
            issuer_key=self.key,
            issuer=self.certificate,
            days=days,
            usage=usage,
            not_before=now,
        )


def csr_public_key(csr: x509.CertificateSigningRequest) -> PublicKey:
    """The CSR's public key, once its self-signature verifies (proof of possession)."""
    try:
        valid = csr.is_signature_valid
    except Exception:  # an algorithm cryptography cannot check
        valid = False
    if not valid:
        raise CertificateError(
            "the CSR's signature does not verify: it was altered, or not made with the private key "
            "of the public key it carries; make a new CSR with your key (openssl req -new -key …)",
            code="csr_signature_invalid",
        )
    public = csr.public_key()
    if not isinstance(public, (rsa.RSAPublicKey, ec.EllipticCurvePublicKey)):
        raise CertificateError(
            "the CSR's key type is not supported; use RSA (2048 bits or more) or EC P-256/P-384",
            code="key_unsupported",
        )
    return public


def check_issuing_ca(key: PrivateKey, certificate: x509.Certificate) -> None:
    """Refuse a key and certificate that cannot work as an issuing CA."""
    if public_key_bytes(key, der=True) != public_key_bytes(certificate.public_key(), der=True):  # type: ignore[arg-type]
        raise CertificateError(
            "the issuing CA's private key does not belong to its certificate (their public keys differ)",
            code="key_cert_mismatch",
        )
    try:
        constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.ca:
        raise CertificateError(
            "the issuing CA certificate is not a CA certificate (basicConstraints CA:TRUE is missing)",
            code="ca_invalid",
        )
    try:
        usage = certificate.extensions.get_extension_for_class(x509.KeyUsage).value
        if not usage.key_cert_sign:
            raise CertificateError(
                "the issuing CA certificate's key usage does not allow signing certificates (keyCertSign)",
                code="ca_invalid",
            )
    except x509.ExtensionNotFound:
        pass
    if certificate.not_valid_after_utc <= dt.datetime.now(dt.UTC):
        raise CertificateError(
            f"the issuing CA certificate expired on {certificate.not_valid_after_utc:%Y-%m-%d}",
            code="ca_expired",
        )
