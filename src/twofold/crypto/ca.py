"""A small local certificate authority, for development servers and tests."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509

from twofold.crypto.certs import Usage, issue_certificate, self_signed_certificate
from twofold.crypto.keys import PrivateKey, generate_private_key


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
