"""What makes an uploaded certificate acceptable — pure checks, no storage.

The counting rules (two per CN, two signature certificates) need the database and live
in :mod:`twofold.registry.service`; everything that can be decided from the file, the
environment and the clock is here.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from twofold.crypto import _pem, certs, keys
from twofold.errors import TwofoldError

MAX_UPLOAD = 64 * 1024  # a certificate is a few KB; anything bigger is not one
# What the registry stores must fit its columns on every backend (PostgreSQL enforces them).
MAX_NAME = 1000  # subject and issuer, as RFC 4514 text
MAX_COMMON_NAME = 64  # RFC 5280 ub-common-name
MAX_SERIAL_HEX = 100
USES = ("mtls", "signature")
USE_LABELS = {"mtls": "MTLS", "signature": "Digital Signature"}


class RegistryError(TwofoldError):
    code = "registry_error"
    status = 400


class Unauthorized(RegistryError):
    code = "unauthenticated"
    status = 401


class Forbidden(RegistryError):
    code = "forbidden"
    status = 403


class NotFound(RegistryError):
    code = "not_found"
    status = 404


class Conflict(RegistryError):
    code = "conflict"
    status = 409


@dataclass(frozen=True)
class UploadFacts:
    """What the registry stores about an accepted certificate."""

    certificate: x509.Certificate
    der: bytes
    fingerprint: str
    spki_sha256: str
    x5t_s256: str
    sha1_thumbprint: str
    subject: str
    common_name: str
    cn_key: str
    issuer: str
    serial: str
    not_before: dt.datetime
    not_after: dt.datetime
    key_type: str
    key_size: int
    self_signed: bool


def cn_key(common_name: str) -> str:
    return common_name.strip().casefold()


def inspect_upload(
    data: bytes,
    *,
    use: str,
    allow_self_signed: bool,
    trusted_cas: list[x509.Certificate],
    environment_name: str,
    now: dt.datetime | None = None,
) -> UploadFacts:
    """Accept one certificate for ``use`` in an environment, or raise a RegistryError whose
    message says what to do. A file holding a private key is refused before any parsing
    that could echo it, and nothing of it is kept."""
    now = now or dt.datetime.now(dt.UTC)
    if use not in USES:
        raise RegistryError(f"certificate use must be one of {', '.join(USES)}", code="use_invalid")
    if not data.strip():
        raise RegistryError(
            "the file is empty; choose the certificate file (.pem, .crt or .cer)", code="empty_file"
        )
    if _pem.looks_like_private_key(data):
        if not _pem.is_pem(data) and _pem.sniff_der(data) == "pkcs12":
            what, only = (
                "a PKCS#12 bundle (.p12/.pfx), which holds a PRIVATE KEY",
                "export the certificate alone (openssl pkcs12 -in bundle.p12 -clcerts -nokeys -out cert.pem) "
                "and upload that",
            )
        else:
            what, only = (
                "contains a PRIVATE KEY",
                "upload only the certificate (the file starting with -----BEGIN CERTIFICATE-----, or its DER form)",
            )
        raise RegistryError(
            f"this file {'is ' if what.startswith('a ') else ''}{what}. Nothing was stored. Never upload private "
            f"keys: treat this key as exposed — generate a new key pair and certificate, and {only}",
            code="private_key_uploaded",
        )
    if len(data) > MAX_UPLOAD:
        raise RegistryError(
            f"the file is {len(data):,} bytes; a certificate is a few KB — choose the certificate "
            "file, not a bundle or archive",
            code="file_too_large",
            status=413,
        )
    try:
        listed = certs.load_certificates(data, name="the file")
    except TwofoldError as error:
        if error.code in ("certificate_unreadable", "key_unsupported"):
            raise RegistryError(error.message, code=error.code) from None
        raise RegistryError(
            f"the file is {_pem.describe(data)}, not a certificate; upload a PEM or DER X.509 certificate",
            code="not_a_certificate",
        ) from None
    if len(listed) > 1:
        raise RegistryError(
            f"the file holds {len(listed)} certificates (a chain); upload only your own (leaf) certificate",
            code="certificate_chain",
        )
    cert = listed[0]
    public = cert.public_key()
    if isinstance(public, rsa.RSAPublicKey):
        key_type, key_size = "RSA", public.key_size
        if key_size < 2048:
            raise RegistryError(
                f"the certificate has an RSA key of {key_size} bits; 2048 is the minimum",
                code="key_too_small",
            )
    elif isinstance(public, ec.EllipticCurvePublicKey) and public.curve.name in (
        "secp256r1",
        "secp384r1",
        "secp521r1",
    ):
        key_type, key_size = "EC", public.curve.key_size
    else:
        raise RegistryError(
            "the certificate's key type is not supported; use RSA (2048+) or EC P-256", code="key_unsupported"
        )
    sig_hash = certs.signature_hash_name(cert)
    if sig_hash in ("SHA1", "MD5", "unknown", "none"):
        raise RegistryError(
            f"the certificate is signed with {sig_hash}, which is refused; reissue it with SHA-256",
            code="weak_signature",
        )
    if cert.not_valid_after_utc <= now:
        raise RegistryError(
            f"the certificate expired on {cert.not_valid_after_utc:%Y-%m-%d}; upload a current one",
            code="certificate_expired",
        )
    if cert.not_valid_before_utc > now:
        raise RegistryError(
            f"the certificate is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC; upload "
            "it once it is valid (or check the issuer's clock)",
            code="certificate_not_yet_valid",
        )
    if use == "mtls" and not certs.allows_client_auth(cert):
        raise RegistryError(
            "the certificate's Extended Key Usage lacks clientAuth, so it cannot authenticate a TLS "
            "client; reissue it with clientAuth",
            code="eku_missing_client_auth",
        )
    common_name = certs.common_name(cert.subject)
    if not common_name or not common_name.strip():
        raise RegistryError("the certificate has no Common Name (CN) in its subject", code="no_common_name")
    if len(common_name.strip()) > MAX_COMMON_NAME:
        raise RegistryError(
            f"the certificate's Common Name is {len(common_name.strip())} characters long; X.509 allows "
            f"at most {MAX_COMMON_NAME}: reissue it with a shorter CN",
            code="common_name_too_long",
        )
    subject, issuer = cert.subject.rfc4514_string(), cert.issuer.rfc4514_string()
    for what, text in (("subject", subject), ("issuer", issuer)):
        if len(text) > MAX_NAME:
            raise RegistryError(
                f"the certificate's {what} name is {len(text):,} characters long; the registry accepts "
                f"names up to {MAX_NAME:,}: reissue it with a shorter {what}",
                code="name_too_long",
            )
    if cert.serial_number <= 0:
        raise RegistryError(
            "the certificate's serial number is zero or negative, which X.509 (RFC 5280) forbids: "
            "ask the issuer for a conforming certificate",
            code="serial_invalid",
        )
    serial = format(cert.serial_number, "X")
    if len(serial) > MAX_SERIAL_HEX:
        raise RegistryError(
            f"the certificate's serial number is {(cert.serial_number.bit_length() + 7) // 8} bytes long; "
            "X.509 allows at most 20: ask the issuer for a conforming certificate",
            code="serial_too_long",
        )
    self_signed = certs.is_self_signed(cert)
    if self_signed and not allow_self_signed:
        raise RegistryError(
            f"{environment_name} does not accept self-signed certificates; send the CSR to a "
            "certificate authority and upload the certificate it issues",
            code="self_signed_not_allowed",
        )
    # A CA-issued certificate must come from one of the environment's CAs when it has any;
    # an environment that refuses self-signed certificates accepts nothing else.
    if not self_signed and (trusted_cas or not allow_self_signed):
        if not trusted_cas:
            raise RegistryError(
                f"{environment_name} has no certificate authority configured yet; ask the platform "
                "operator to add the CA that issues your certificates",
                code="untrusted_issuer",
            )
        if not any(_issued_by(cert, ca) for ca in trusted_cas):
            raise RegistryError(
                f"the certificate is not issued by a certificate authority that {environment_name} "
                f"trusts (issuer: {cert.issuer.rfc4514_string()})",
                code="untrusted_issuer",
            )
    der = certs.certificate_der(cert)
    return UploadFacts(
        certificate=cert,
        der=der,
        fingerprint=certs.fingerprint_sha256(der),
        spki_sha256=hashlib.sha256(keys.public_key_bytes(public, der=True)).hexdigest(),
        x5t_s256=certs.x5t_s256(der),
        sha1_thumbprint=certs.sha1_thumbprint(der),
        subject=subject,
        common_name=common_name.strip(),
        cn_key=cn_key(common_name),
        issuer=issuer,
        serial=serial,
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        key_type=key_type,
        key_size=key_size,
        self_signed=self_signed,
    )


def _issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    if cert.issuer != ca.subject:
        return False
    try:
        cert.verify_directly_issued_by(ca)
    except Exception:
        return False
    return True
