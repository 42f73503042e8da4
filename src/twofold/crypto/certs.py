"""Certificates and CSRs: build them, read them, fingerprint them, describe them."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import ipaddress
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from twofold.crypto import _pem
from twofold.crypto.keys import PrivateKey, PublicKey, describe_key
from twofold.errors import CertificateError

Usage = Literal["client", "signature", "server", "ca"]

_ATTRS = {
    "C": NameOID.COUNTRY_NAME,
    "ST": NameOID.STATE_OR_PROVINCE_NAME,
    "L": NameOID.LOCALITY_NAME,
    "O": NameOID.ORGANIZATION_NAME,
    "OU": NameOID.ORGANIZATIONAL_UNIT_NAME,
    "CN": NameOID.COMMON_NAME,
    "EMAILADDRESS": NameOID.EMAIL_ADDRESS,
    "SERIALNUMBER": NameOID.SERIAL_NUMBER,
    "DC": NameOID.DOMAIN_COMPONENT,
    "UID": NameOID.USER_ID,
    "STREET": NameOID.STREET_ADDRESS,
    "POSTALCODE": NameOID.POSTAL_CODE,
}
_OPENSSL_SPLIT = re.compile(r"(?<!\\)/")
_RFC4514_SPLIT = re.compile(r"(?<!\\),")


def parse_subject(text: str) -> x509.Name:
    """A distinguished name from OpenSSL's ``/C=US/O=Acme/CN=x`` or RFC 4514 ``CN=x,O=Acme``.

    The OpenSSL form is written in the order given (most significant first), as
    ``openssl req -subj`` does.
    """
    text = text.strip()
    if not text:
        raise CertificateError("the subject is empty: give at least /CN=name", code="subject_invalid")
    if text.startswith("/"):
        parts = [p for p in _OPENSSL_SPLIT.split(text[1:]) if p]
        ordered = parts
    else:
        ordered = list(reversed([p for p in _RFC4514_SPLIT.split(text) if p.strip()]))
    attributes = []
    for part in ordered:
        name, sep, value = part.partition("=")
        if not sep:
            raise CertificateError(
                f"cannot read {part!r} in the subject: write it as /C=US/O=Acme/CN=name",
                code="subject_invalid",
            )
        oid = _ATTRS.get(name.strip().upper())
        if oid is None:
            raise CertificateError(
                f"unknown subject attribute {name.strip()!r}: use {', '.join(_ATTRS)}",
                code="subject_invalid",
            )
        value = value.replace("\\/", "/").replace("\\,", ",").strip()
        if oid == NameOID.COUNTRY_NAME and len(value) != 2:
            raise CertificateError(
                f"the country must be a two-letter code such as US, not {value!r}", code="subject_invalid"
            )
        if not value:
            raise CertificateError(f"the subject attribute {name} is empty", code="subject_invalid")
        attributes.append(x509.NameAttribute(oid, value))
    return x509.Name(attributes)


def subject_from_cn(cn: str, base: str | None = None) -> x509.Name:
    """``base`` (a subject) with its CN replaced by ``cn`` (or just ``/CN=cn``)."""
    if base:
        name = parse_subject(base)
        kept = [a for a in name if a.oid != NameOID.COMMON_NAME]
        return x509.Name([*kept, x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def parse_san(items: Iterable[str]) -> list[x509.GeneralName]:
    """``DNS:host``, ``IP:127.0.0.1``, ``email:a@b`` or ``URI:…`` (a bare value means DNS)."""
    names: list[x509.GeneralName] = []
    for item in items:
        kind, sep, value = item.partition(":")
        if not sep:
            kind, value = "DNS", item
        kind = kind.strip().upper()
        try:
            if kind == "DNS":
                names.append(x509.DNSName(value))
            elif kind == "IP":
                names.append(x509.IPAddress(ipaddress.ip_address(value)))
            elif kind == "EMAIL":
                names.append(x509.RFC822Name(value))
            elif kind == "URI":
                names.append(x509.UniformResourceIdentifier(value))
            else:
                raise CertificateError(
                    f"unknown SAN type {kind!r}: use DNS:, IP:, email: or URI:", code="san_invalid"
                )
        except ValueError as exc:
            raise CertificateError(f"bad SAN {item!r}: {exc}", code="san_invalid") from None
    return names


def _hash_for(key: PrivateKey) -> hashes.SHA256 | hashes.SHA384 | hashes.SHA512:
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size > 384:
        return hashes.SHA512()
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size > 256:
        return hashes.SHA384()
    return hashes.SHA256()


def build_csr(
    key: PrivateKey, subject: str | x509.Name, *, sans: Sequence[str] = ()
) -> x509.CertificateSigningRequest:
    name = parse_subject(subject) if isinstance(subject, str) else subject
    builder = x509.CertificateSigningRequestBuilder().subject_name(name)
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(parse_san(sans)), critical=False)
    return builder.sign(key, _hash_for(key))


def _extensions_for(usage: Usage) -> list[tuple[x509.ExtensionType, bool]]:
    if usage == "ca":
        return [
            (x509.BasicConstraints(ca=True, path_length=0), True),
            (
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                True,
            ),
        ]
    eku = {
        "client": [ExtendedKeyUsageOID.CLIENT_AUTH],
        "server": [ExtendedKeyUsageOID.SERVER_AUTH],
        "signature": None,
    }[usage]
    exts: list[tuple[x509.ExtensionType, bool]] = [
        (x509.BasicConstraints(ca=False, path_length=None), True),
        (
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=usage == "signature",
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            True,
        ),
    ]
    if eku:
        exts.append((x509.ExtendedKeyUsage(eku), False))
    return exts


def issue_certificate(
    *,
    subject: str | x509.Name,
    public_key: PublicKey,
    issuer_key: PrivateKey,
    issuer: x509.Certificate | None = None,
    days: int = 365,
    usage: Usage = "client",
    sans: Sequence[str] = (),
    not_before: dt.datetime | None = None,
) -> x509.Certificate:
    """A certificate for ``public_key``, signed by ``issuer_key`` (self-signed when ``issuer``
    is None). Defaults are what an mTLS client certificate should carry."""
    if days < 1:
        raise CertificateError("--days must be at least 1", code="validity_invalid")
    name = parse_subject(subject) if isinstance(subject, str) else subject
    now = not_before or dt.datetime.now(dt.UTC)
    start = now - dt.timedelta(minutes=5)  # tolerate clocks a little behind ours
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.subject if issuer else name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )
    if issuer is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
    for ext, critical in _extensions_for(usage):
        builder = builder.add_extension(ext, critical=critical)
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(parse_san(sans)), critical=False)
    return builder.sign(issuer_key, _hash_for(issuer_key))


def self_signed_certificate(
    key: PrivateKey,
    subject: str | x509.Name,
    *,
    days: int = 365,
    usage: Usage = "client",
    sans: Sequence[str] = (),
) -> x509.Certificate:
    return issue_certificate(
        subject=subject, public_key=key.public_key(), issuer_key=key, days=days, usage=usage, sans=sans
    )


def certificate_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def certificate_der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def csr_pem(csr: x509.CertificateSigningRequest) -> bytes:
    return csr.public_bytes(serialization.Encoding.PEM)


# --- reading ---------------------------------------------------------------------------


def load_certificates(data: bytes, *, name: str = "the certificate file") -> list[x509.Certificate]:
    """Every certificate in a PEM bundle, or the one in a DER file."""
    if _pem.is_pem(data):
        blocks = list(_pem.pem_blocks(data))
        certs = [b for b in blocks if b.label in _pem.CERTIFICATE_LABELS]
        if not certs:
            raise _not_a_certificate(data, name)
        out = []
        for block in certs:
            if block.der is None:
                raise CertificateError(f"{name}: a certificate block is damaged (bad base64)")
            out.append(_load_der(block.der, name))
        return out
    if _pem.sniff_der(data) != "certificate":
        raise _not_a_certificate(data, name)
    return [_load_der(data, name)]


def private_key_content(data: bytes, name: str = "") -> str | None:
    """What private key material a file meant as a certificate carries — "a PKCS#12 bundle",
    "a private key and a certificate", "a private key" — or None when it carries none. Errs on
    the side of "yes": such a file must not be sent anywhere as a certificate."""
    if name.lower().endswith((".p12", ".pfx")) or (
        not _pem.is_pem(data) and _pem.sniff_der(data) == "pkcs12"
    ):
        return "a PKCS#12 bundle (it holds the private key)"
    if not _pem.looks_like_private_key(data):
        return None
    if any(b.label in _pem.CERTIFICATE_LABELS for b in _pem.pem_blocks(data)):
        return "a private key besides the certificate"
    return "a private key"


def load_certificate(data: bytes, *, name: str = "the certificate file") -> x509.Certificate:
    """Exactly one certificate (PEM or DER)."""
    certs = load_certificates(data, name=name)
    if len(certs) != 1:
        raise CertificateError(
            f"{name} holds {len(certs)} certificates; give the single leaf certificate",
            code="certificate_chain",
        )
    return certs[0]


def _load_der(der: bytes, name: str) -> x509.Certificate:
    try:
        cert = x509.load_der_x509_certificate(der)
    except x509.InvalidVersion:
        raise _unreadable(name, "version (only X.509 v1 and v3 exist)") from None
    except ValueError as exc:  # not a certificate at all (the registry says not_a_certificate)
        raise CertificateError(f"{name}: the certificate cannot be parsed ({exc})") from None
    _read_every_part(cert, name)
    return cert


def _unreadable(name: str, part: str) -> CertificateError:
    return CertificateError(
        f"{name}: the certificate's {part} cannot be read — the file is damaged or not valid X.509 DER; "
        "export the certificate again, or ask its issuer for a new one",
        code="certificate_unreadable",
    )


def _read_every_part(cert: x509.Certificate, name: str) -> None:
    """``cryptography`` parses a certificate's parts when first asked for them: ask for each
    now, so that a damaged part is refused here with a message instead of failing later, deep
    in whatever code happens to read it first."""
    try:
        cert.public_key()
    except UnsupportedAlgorithm:
        raise CertificateError(
            f"{name}: the certificate's key algorithm ({_key_algorithm(cert)}) is not supported; "
            "use RSA (2048 bits or more) or EC P-256",
            code="key_unsupported",
        ) from None
    except ValueError:
        raise _unreadable(name, "public key") from None
    parts: list[tuple[str, Callable[[], object]]] = [
        ("subject name", lambda: cert.subject.rfc4514_string()),
        ("issuer name", lambda: cert.issuer.rfc4514_string()),
        ("extensions", lambda: [ext.value for ext in cert.extensions]),
    ]
    for part, read in parts:
        try:
            read()
        except (ValueError, TypeError, x509.DuplicateExtension):
            raise _unreadable(name, part) from None


def _key_algorithm(cert: x509.Certificate) -> str:
    try:
        return cert.public_key_algorithm_oid.dotted_string
    except Exception:  # the OID itself is damaged
        return "unknown"


def _not_a_certificate(data: bytes, name: str) -> CertificateError:
    return CertificateError(
        f"{name} is {_pem.describe(data)}, but a certificate was expected", code="certificate_invalid"
    )


def load_csr(data: bytes, *, name: str = "the CSR file") -> x509.CertificateSigningRequest:
    try:
        if _pem.is_pem(data):
            return x509.load_pem_x509_csr(data)
        return x509.load_der_x509_csr(data)
    except ValueError:
        raise CertificateError(
            f"{name} is {_pem.describe(data)}, but a certificate signing request was expected",
            code="csr_invalid",
        ) from None


# --- identity --------------------------------------------------------------------------


def fingerprint_sha256(cert: x509.Certificate | bytes) -> str:
    """Lower-case hex SHA-256 of the DER encoding: the registry's primary key for a cert."""
    der = cert if isinstance(cert, bytes) else certificate_der(cert)
    return hashlib.sha256(der).hexdigest()


def x5t_s256(cert: x509.Certificate | bytes) -> str:
    """The JOSE ``x5t#S256`` header value: base64url of the SHA-256 of the DER."""
    der = cert if isinstance(cert, bytes) else certificate_der(cert)
    return base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode()


def sha1_thumbprint(cert: x509.Certificate | bytes) -> str:
    """Upper-case hex SHA-1 of the DER, the "thumbprint" banks often use as a JWS ``kid``."""
    der = cert if isinstance(cert, bytes) else certificate_der(cert)
    return hashlib.sha1(der, usedforsecurity=False).hexdigest().upper()


def days_left(not_after: dt.datetime, now: dt.datetime | None = None) -> int:
    """Whole days until expiry, rounded up: a certificate valid for 365 days shows 365."""
    now = now or dt.datetime.now(dt.UTC)
    return -((now - not_after) // dt.timedelta(days=1))


def common_name(name: x509.Name) -> str | None:
    values = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not values:
        return None
    value = values[-1].value
    return value.decode() if isinstance(value, bytes) else value


def is_self_signed(cert: x509.Certificate) -> bool:
    if cert.issuer != cert.subject:
        return False
    try:
        cert.verify_directly_issued_by(cert)
    except ValueError:  # cryptography will not check SHA-1 (or MD5) signatures this way
        return _signed_by_own_key(cert)
    except Exception:
        return False
    return True


def _signed_by_own_key(cert: x509.Certificate) -> bool:
    """The certificate's signature checks out with its own public key, whatever the hash."""
    public = cert.public_key()
    try:
        digest = cert.signature_hash_algorithm
        params = cert.signature_algorithm_parameters
        if digest is None:
            return False
        if isinstance(public, rsa.RSAPublicKey) and isinstance(params, (padding.PKCS1v15, padding.PSS)):
            public.verify(cert.signature, cert.tbs_certificate_bytes, params, digest)
        elif isinstance(public, ec.EllipticCurvePublicKey) and isinstance(params, ec.ECDSA):
            public.verify(cert.signature, cert.tbs_certificate_bytes, params)
        else:
            return False
    except Exception:
        return False
    return True


def _eku(cert: x509.Certificate) -> list[str] | None:
    try:
        ext = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage)
    except x509.ExtensionNotFound:
        return None
    names = {
        ExtendedKeyUsageOID.CLIENT_AUTH: "clientAuth",
        ExtendedKeyUsageOID.SERVER_AUTH: "serverAuth",
        ExtendedKeyUsageOID.CODE_SIGNING: "codeSigning",
        ExtendedKeyUsageOID.EMAIL_PROTECTION: "emailProtection",
        ExtendedKeyUsageOID.TIME_STAMPING: "timeStamping",
        ExtendedKeyUsageOID.OCSP_SIGNING: "OCSPSigning",
        ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE: "anyExtendedKeyUsage",
    }
    return [names.get(oid, oid.dotted_string) for oid in ext.value]


def allows_client_auth(cert: x509.Certificate) -> bool:
    """No EKU at all means any use (RFC 5280 §4.2.1.12); otherwise clientAuth or any must be listed."""
    eku = _eku(cert)
    return eku is None or "clientAuth" in eku or "anyExtendedKeyUsage" in eku


def signature_hash_name(cert: x509.Certificate) -> str:
    try:
        algo = cert.signature_hash_algorithm
    except Exception:
        return "unknown"
    return algo.name.upper() if algo is not None else "none"


@dataclass(frozen=True)
class CertificateInfo:
    """Everything ``twofold cert show`` prints; ``to_dict`` is the stable ``--json`` form."""

    subject: str
    common_name: str | None
    issuer: str
    serial: str
    not_before: str
    not_after: str
    days_left: int
    expired: bool
    not_yet_valid: bool
    key: str
    key_type: str
    key_size: int
    signature_algorithm: str
    sha256_fingerprint: str
    x5t_s256: str
    sha1_thumbprint: str
    self_signed: bool
    is_ca: bool
    key_usage: list[str]
    extended_key_usage: list[str] | None
    subject_alt_names: list[str]
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _key_usage(cert: x509.Certificate) -> list[str]:
    try:
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return []
    out = []
    for attr in (
        "digital_signature",
        "content_commitment",
        "key_encipherment",
        "data_encipherment",
        "key_agreement",
        "key_cert_sign",
        "crl_sign",
    ):
        if getattr(ku, attr):
            out.append(attr)
    return out


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


_SAN_PREFIX = {"DNSName": "DNS", "IPAddress": "IP", "RFC822Name": "email", "UniformResourceIdentifier": "URI"}


def _sans(cert: x509.Certificate) -> list[str]:
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    out = []
    for gn in ext:
        prefix = _SAN_PREFIX.get(type(gn).__name__, type(gn).__name__)
        out.append(f"{prefix}:{gn.value}")
    return out


def certificate_warnings(cert: x509.Certificate, now: dt.datetime | None = None) -> list[str]:
    now = now or dt.datetime.now(dt.UTC)
    warnings = []
    if cert.not_valid_after_utc < now:
        warnings.append(f"expired on {cert.not_valid_after_utc:%Y-%m-%d}")
    elif cert.not_valid_before_utc > now:
        warnings.append(f"not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC")
    elif days_left(cert.not_valid_after_utc, now) < 30:
        warnings.append(f"expires in {days_left(cert.not_valid_after_utc, now)} days")
    public = cert.public_key()
    if isinstance(public, rsa.RSAPublicKey) and public.key_size < 2048:
        warnings.append(f"RSA key of {public.key_size} bits is too weak (2048 is the minimum)")
    sig_hash = signature_hash_name(cert)
    if sig_hash in ("SHA1", "MD5"):
        warnings.append(f"signed with {sig_hash}, which banks refuse; reissue with SHA-256")
    eku = _eku(cert)
    if eku is not None and not allows_client_auth(cert):
        warnings.append("extended key usage lacks clientAuth: unusable for mTLS")
    return warnings


def describe_certificate(cert: x509.Certificate, now: dt.datetime | None = None) -> CertificateInfo:
    now = now or dt.datetime.now(dt.UTC)
    public = cert.public_key()
    if isinstance(public, rsa.RSAPublicKey):
        key_type, key_size = "RSA", public.key_size
        key = describe_key(public)
    elif isinstance(public, ec.EllipticCurvePublicKey):
        key_type, key_size = "EC", public.curve.key_size
        key = describe_key(public)
    else:
        key_type, key_size, key = type(public).__name__, 0, type(public).__name__
    try:
        sig_name = cert.signature_algorithm_oid._name
    except Exception:
        sig_name = cert.signature_algorithm_oid.dotted_string
    return CertificateInfo(
        subject=cert.subject.rfc4514_string(),
        common_name=common_name(cert.subject),
        issuer=cert.issuer.rfc4514_string(),
        serial=format(cert.serial_number, "X"),
        not_before=cert.not_valid_before_utc.isoformat(),
        not_after=cert.not_valid_after_utc.isoformat(),
        days_left=days_left(cert.not_valid_after_utc, now),
        expired=cert.not_valid_after_utc < now,
        not_yet_valid=cert.not_valid_before_utc > now,
        key=key,
        key_type=key_type,
        key_size=key_size,
        signature_algorithm=sig_name,
        sha256_fingerprint=fingerprint_sha256(cert),
        x5t_s256=x5t_s256(cert),
        sha1_thumbprint=sha1_thumbprint(cert),
        self_signed=is_self_signed(cert),
        is_ca=_is_ca(cert),
        key_usage=_key_usage(cert),
        extended_key_usage=_eku(cert),
        subject_alt_names=_sans(cert),
        warnings=certificate_warnings(cert, now),
    )
